"""One Realtime session through Envoy with the `websockets` client, opened as an
application with an api-key opens it (in a header, or in the URL as browsers
must). Prints what happened, as JSON.

usage: realtime.py URL [HEADERS_JSON]
"""
import json
import sys
import time

import websockets
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

url = sys.argv[1]
headers = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
result = {"websockets": websockets.__version__}
started = time.monotonic()
try:
    with connect(
        url,
        additional_headers=headers,
        subprotocols=["realtime"],
        open_timeout=30,
        close_timeout=5,
    ) as session:
        result["handshake_ms"] = round((time.monotonic() - started) * 1000)
        result["status"] = session.response.status_code
        result["subprotocol"] = session.subprotocol
        result["first"] = json.loads(session.recv(timeout=10))
        sent = {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "Hello over the Realtime API"}]}}
        session.send(json.dumps(sent))
        result["sent"] = json.dumps(sent)
        result["echo"] = json.loads(session.recv(timeout=10))
    result["ok"] = True
except InvalidStatus as e:
    result.update(
        ok=False,
        status=e.response.status_code,
        body=e.response.body.decode(errors="replace") if e.response.body else "",
    )
print(json.dumps(result))
