#!/usr/bin/env bash
# `make run`: the local Azure emulator, Envoy with aoai-msi-filter, and one
# chat-completions request that carries only an api-key. Ctrl-C stops
# everything this script started. RUN_ONCE=1 exits after the request.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY=${ENVOY:-.venv/bin/envoy}
EMULATOR=target/debug/aoai-emulator
RUN=.run
APP=127.0.0.1:10000
ADMIN=127.0.0.1:9901
AZURE=127.0.0.1:8080
CHAT="http://$APP/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
fail() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

pids=()
stop() {
  trap - EXIT INT TERM
  if ((${#pids[@]})); then
    step "Stopping Envoy and the emulator"
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
trap stop EXIT
trap 'exit 130' INT TERM

for addr in $APP $ADMIN $AZURE; do
  if (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null; then
    fail "$addr is already in use; stop whatever listens there (an earlier make run?) and retry"
  fi
done
mkdir -p "$RUN"

step "Starting the Azure emulator on $AZURE (IMDS + Azure OpenAI with key auth disabled)"
"$EMULATOR" --listen "$AZURE" >"$RUN/emulator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs "http://$AZURE/_emulator/requests" >/dev/null && break; sleep 0.1; done
curl -fs "http://$AZURE/_emulator/requests" >/dev/null || fail "the emulator did not start: $(cat "$RUN/emulator.log")"

step "Starting Envoy with aoai-msi-filter: $ENVOY -c envoy/local.yaml"
# shellcheck disable=SC2086 # ENVOY may be "func-e run"
$ENVOY -c envoy/local.yaml --concurrency 2 --use-dynamic-base-id \
  -l warning --component-log-level wasm:info 2>"$RUN/envoy.log" &
pids+=($!)
for _ in $(seq 600); do [[ $(curl -s "http://$ADMIN/ready" 2>/dev/null) == LIVE ]] && break; sleep 0.1; done
[[ $(curl -s "http://$ADMIN/ready" 2>/dev/null) == LIVE ]] || fail "Envoy did not become ready: $(tail -5 "$RUN/envoy.log")"

step "Sending a chat completion that carries only an api-key"
echo "\$ curl $CHAT -H 'api-key: my-old-key' -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hello through Envoy\"}]}'"
status=$(curl -sS -o "$RUN/answer.json" -D "$RUN/answer.headers" -w '%{http_code}' "$CHAT" \
  -H 'api-key: my-old-key' -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"Hello through Envoy"}]}')
echo "HTTP $status"
python3 -m json.tool "$RUN/answer.json" || cat "$RUN/answer.json"

step "What Azure OpenAI (the emulator) received"
curl -fs "http://$AZURE/_emulator/requests" >"$RUN/received.json"
python3 - "$RUN/received.json" <<'PY'
import json, sys
seen = json.load(open(sys.argv[1]))
for call in seen["imds"]:
    q = call["query"]
    print(f"IMDS   GET /metadata/identity/oauth2/token api-version={q.get('api-version')} resource={q.get('resource')} -> {call['status']}")
for r in seen["upstream"]:
    headers = {}
    for name, value in r["headers"]:
        headers.setdefault(name, []).append(value)
    print(f"Azure  {r['method']} {r['path']}  host: {r['host']}")
    print(f"       authorization: {', '.join(headers.get('authorization', ['(none)']))}")
    print(f"       api-key: {', '.join(headers.get('api-key', ['(none)']))}")
    print(f"       verdict: {r['verdict']}")
PY

step "What the filter logged"
grep -h "wasm log" "$RUN/envoy.log" | sed -E 's/.*wasm log [^:]*: /  /' || true

python3 - "$RUN/received.json" "$status" <<'PY'
import json, sys
seen, status = json.load(open(sys.argv[1])), sys.argv[2]
last = seen["upstream"][-1] if seen["upstream"] else None
ok = (status == "200" and last and last["verdict"] == "Ok"
      and not any(n == "api-key" for n, _ in last["headers"]))
if not ok:
    sys.exit("the demo request did not go through as expected; see .run/envoy.log")
PY

if [[ ${RUN_ONCE:-} == 1 ]]; then
  step "Demo passed: the api-key was replaced by a managed-identity token"
  exit 0
fi

step "Envoy is running: try it yourself"
cat <<TXT
  curl $CHAT \\
    -H 'api-key: anything' -H 'content-type: application/json' \\
    -d '{"messages":[{"role":"user","content":"hi"}]}'

  # The openai SDK goes into the project venv (make test installs it there too),
  # and the project venv's Python runs it:
  .venv/bin/pip install openai${OPENAI_VERSION:+==$OPENAI_VERSION}
  .venv/bin/python -c 'from openai import AzureOpenAI; client = AzureOpenAI(azure_endpoint="http://$APP", api_key="anything", api_version="2024-10-21"); print(client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content)'

  Envoy admin: http://$ADMIN   logs: $RUN/envoy.log, $RUN/emulator.log
  Press Ctrl-C to stop Envoy and the emulator.
TXT
wait
