"""One chat completion through Envoy with the openai SDK, as an application
with an api-key makes it. Prints what the SDK returned or raised, as JSON.

usage: call.py ENDPOINT [MAX_RETRIES]
"""
import json
import sys

import openai
from openai import AzureOpenAI

endpoint = sys.argv[1]
retries = int(sys.argv[2]) if len(sys.argv) > 2 else 0
client = AzureOpenAI(
    azure_endpoint=endpoint,
    api_key="app-key-123",
    api_version="2024-10-21",
    max_retries=retries,
    timeout=30,
)
result = {"sdk": openai.__version__}
try:
    completion = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Hello from the openai SDK"}],
    )
    result.update(ok=True, content=completion.choices[0].message.content)
except openai.APIStatusError as e:
    result.update(
        ok=False,
        exception=type(e).__name__,
        status=e.status_code,
        printed=str(e),
        body=e.body,
        diagnosis_header=e.response.headers.get("x-aoai-msi-diagnosis"),
    )
print(json.dumps(result))
