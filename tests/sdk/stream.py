"""One streamed chat completion through Envoy with the openai SDK
(`stream=True`), as an application with an api-key makes it. The emulator
paces the stream (`x_emulator_stream`) and stamps every chunk with its index
and the time it sent it; this script adds the time each chunk reached the
application. Prints everything as JSON.

usage: stream.py ENDPOINT CHUNKS INTERVAL_MS TIMEOUT_S
"""
import json
import sys
import time

import openai
from openai import AzureOpenAI

endpoint, chunks, interval_ms, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
client = AzureOpenAI(
    azure_endpoint=endpoint,
    api_key="app-key-123",
    api_version="2024-10-21",
    max_retries=0,
    timeout=timeout,
)


def now_ms():
    return time.time() * 1000


result = {"sdk": openai.__version__, "started_ms": now_ms(), "chunks": []}
try:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Stream this through Envoy"}],
        stream=True,
        extra_body={"x_emulator_stream": {"chunks": chunks, "interval_ms": interval_ms}},
    )
    for chunk in stream:
        arrived = now_ms()
        fields = chunk.to_dict()
        choice = (fields.get("choices") or [{}])[0]
        result["chunks"].append({
            "index": fields.get("x_emulator_index"),
            "sent_ms": fields.get("x_emulator_sent_ms"),
            "arrived_ms": arrived,
            "content": (choice.get("delta") or {}).get("content") or "",
            "finish_reason": choice.get("finish_reason"),
            "caller": fields.get("x_emulator_caller"),
        })
    result["ok"] = True
except openai.APIError as e:
    result.update(ok=False, exception=type(e).__name__, printed=str(e))
result["ended_ms"] = now_ms()
print(json.dumps(result))
