"""An application that only knows api-key: one process of the openai SDK
making CALLS chat completions through Envoy, one after another, with a key
the resource does not even accept. Prints what happened, as JSON.

usage: app.py ENDPOINT CALLS
"""
import json
import os
import sys
import time

import openai
from openai import AzureOpenAI

endpoint, calls = sys.argv[1], int(sys.argv[2])
client = AzureOpenAI(
    azure_endpoint=endpoint,
    api_key="app-key-123",
    api_version="2024-10-21",
    # A failure must show here, not be hidden by a retry.
    max_retries=0,
    timeout=30,
)
result = {"sdk": openai.__version__, "pid": os.getpid(), "ok": 0, "errors": []}
started = time.monotonic()
for i in range(calls):
    try:
        completion = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"call {i} from process {os.getpid()}"}],
        )
        if completion.choices[0].message.content:
            result["ok"] += 1
        else:
            result["errors"].append({"call": i, "error": "empty completion"})
    except openai.APIError as e:
        result["errors"].append(
            {"call": i, "error": type(e).__name__, "status": getattr(e, "status_code", None),
             "message": str(e)}
        )
result["seconds"] = round(time.monotonic() - started, 3)
print(json.dumps(result))
