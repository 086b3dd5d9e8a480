#!/usr/bin/env python3
"""`make bench`: aoai-msi-filter against the limit and its peers, side by side.

Every configuration is a front Envoy with one worker pinned to CPU 0, in front
of an upstream Envoy that answers with a direct_response; wrk and the upstream
share CPU 1. Rounds are interleaved, so drift of the machine hits every
configuration alike; each figure is the median over rounds. CPU per request is
the front Envoy's own CPU time (all its threads, from /proc) divided by the
requests it served. Everything talks to 127.0.0.1 and stops by itself.

Writes BENCHMARKS.md, bench/throughput.png and the raw samples in
bench/results.json; `bench.py --report` rewrites the first two from the third.
"""

import concurrent.futures
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENVOY = os.environ.get("ENVOY_BIN", str(ROOT / ".venv/bin/envoy"))
EMULATOR = str(ROOT / "target/debug/aoai-emulator")
FILTER_WASM = ROOT / "target/wasm32-wasip1/release/aoai_msi_filter.wasm"
EMPTY_WASM = ROOT / "target/wasm32-wasip1/release/bench_empty_filter.wasm"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
HOST = "myres.openai.azure.com"
PATH = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
FRONT_CPU, LOAD_CPU = "0", "1"
TOKEN_PADDING = 760  # makes the minted token ~2 KB, like a real Entra token

children = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, cpu=None, **kw):
    if cpu is not None:
        args = ["taskset", "-c", cpu] + args
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    children.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in children:
        children.remove(p)


def wait_http(url, timeout=60, expect=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                body = r.read().decode()
                if expect is None or expect in body:
                    return body
        except Exception:
            pass
        time.sleep(0.05)
    sys.exit(f"bench: {url} did not come up")


def cpu_seconds(pid):
    """CPU time of every thread of pid, in seconds (schedstat: ns on CPU)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ---------------------------------------------------------------- configs

STATS_TAGS = """stats_config:
  stats_tags:
  - { tag_name: source, regex: "(;source=([^;]*))" }
  - { tag_name: outcome, regex: "(;outcome=([^;]*))" }
"""


def cluster(name, port):
    return f"""  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
"""


def front_yaml(port, admin, filters, upstream, emulator, secrets=""):
    return f"""{STATS_TAGS}admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
{secrets}  listeners:
  - name: front
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
          http_filters:
{filters}          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
{cluster("upstream", upstream)}{cluster("azure_imds", emulator)}{cluster("entra", emulator)}"""


def upstream_yaml(port, admin):
    return f"""admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: upstream
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: upstream
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "ok" }} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"""


def wasm_filter(path, config):
    value = json.dumps(config)
    return f"""          - name: wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: bench
                root_id: aoai-msi-filter
                configuration: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: {json.dumps(value)} }}
                vm_config:
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: "{path}" }} }}
"""


def configurations(token):
    bearer = "Bearer " + token
    header_mutation = f"""          - name: envoy.filters.http.header_mutation
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
              mutations:
                request_mutations:
                - remove: api-key
                - append:
                    header: {{ key: authorization, value: "{bearer}" }}
                    append_action: OVERWRITE_IF_EXISTS_OR_ADD
"""
    lua = f"""          - name: envoy.filters.http.lua
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              default_source_code:
                inline_string: |
                  local bearer = "{bearer}"
                  function envoy_on_request(handle)
                    local headers = handle:headers()
                    headers:remove("api-key")
                    headers:replace("authorization", bearer)
                  end
"""
    injector = """          - name: envoy.filters.http.credential_injector
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector
              overwrite: true
              credential:
                name: envoy.http.injected_credentials.oauth2
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.http.injected_credentials.oauth2.v3.OAuth2
                  token_endpoint:
                    cluster: entra
                    timeout: 3s
                    uri: "http://127.0.0.1/72f988bf-0000-4000-8000-00000000e1a0/oauth2/v2.0/token"
                  scopes: ["https://cognitiveservices.azure.com/.default"]
                  client_credentials:
                    client_id: bench-client
                    client_secret: { name: bench-client-secret }
"""
    secrets = """  secrets:
  - name: bench-client-secret
    generic_secret: { secret: { inline_string: "not-a-real-secret" } }
"""
    return [
        ("no filter", "", ""),
        ("header_mutation (native floor)", header_mutation, ""),
        ("empty wasm (wasm floor)", wasm_filter(EMPTY_WASM, {}), ""),
        ("Lua rewrite", lua, ""),
        ("credential_injector oauth2", injector, secrets),
        ("aoai-msi-filter", wasm_filter(FILTER_WASM, {"hosts": [HOST]}), ""),
    ]


# ---------------------------------------------------------------- load

def wrk(port, seconds, connections=32):
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency",
         "-H", f"Host: {HOST}", "-H", "api-key: app-key-123", f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True, text=True, check=True).stdout
    def latency(label):
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 1, "ms": 1e3, "s": 1e6}[unit]
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_us": latency("50"), "p99_us": latency("99"),
        "requests": requests,
        "failed": (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, errors.groups())) if errors else 0),
    }


def emulator(*args):
    port = free_port()
    p = start([EMULATOR, "--listen", f"127.0.0.1:{port}", "--quiet", "--token-padding", str(TOKEN_PADDING), *args], cpu=LOAD_CPU)
    wait_http(f"http://127.0.0.1:{port}/_emulator/requests")
    return p, port


def envoy(yaml, workdir, name, concurrency=1, cpu=FRONT_CPU):
    path = Path(workdir) / f"{name}.yaml"
    path.write_text(yaml)
    admin = re.search(r"admin:\n  address: \{ socket_address: \{ address: 127.0.0.1, port_value: (\d+)", yaml).group(1)
    p = start([ENVOY, "-c", str(path), "--concurrency", str(concurrency), "--use-dynamic-base-id", "-l", "error"], cpu=cpu, cwd=ROOT)
    wait_http(f"http://127.0.0.1:{admin}/ready", expect="LIVE")
    return p


def imds_calls(emu_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{emu_port}/_emulator/requests") as r:
        return len(json.load(r)["imds"])


def burst(port, n):
    """n concurrent first requests; their latencies in ms."""
    barrier = threading.Barrier(n)
    def one(_):
        barrier.wait()
        t = time.perf_counter()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", PATH, headers={"Host": HOST, "api-key": "k"})
        status = c.getresponse().status
        c.close()
        return status, (time.perf_counter() - t) * 1000
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    return [s for s, _ in results], sorted(ms for _, ms in results)


def pct(values, p):
    return values[min(len(values) - 1, round((len(values) - 1) * p))]


# ---------------------------------------------------------------- main

def main():
    work = tempfile.mkdtemp(prefix="aoai-bench-")
    emu, emu_port = emulator()
    with urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{emu_port}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://cognitiveservices.azure.com",
            headers={"Metadata": "true"})) as r:
        token = json.load(r)["access_token"]
    print(f"bench: token of {len(token)} bytes, {ROUNDS} rounds of {SECONDS} s per configuration")
    up_port = free_port()
    envoy(upstream_yaml(up_port, free_port()), work, "upstream", cpu=LOAD_CPU)

    configs = configurations(token)
    fronts = []
    for i, (name, filters, secrets) in enumerate(configs):
        port = free_port()
        yaml = front_yaml(port, free_port(), filters, up_port, emu_port, secrets)
        fronts.append((name, port, envoy(yaml, work, f"front{i}")))
    for name, port, _ in fronts:  # warm every path (token fetched, pools open)
        wrk(port, 2)

    samples = {name: [] for name, _, _ in fronts}
    for r in range(ROUNDS):
        order = fronts[r % len(fronts):] + fronts[:r % len(fronts)]
        for name, port, proc in order:
            before = cpu_seconds(proc.pid)
            result = wrk(port, SECONDS)
            result["cpu_us"] = (cpu_seconds(proc.pid) - before) * 1e6 / max(result["requests"], 1)
            samples[name].append(result)
            print(f"bench: round {r + 1} {name}: {result['rps']:.0f} req/s, p99 {result['p99_us']:.0f} us, {result['cpu_us']:.2f} us CPU/req, failed {result['failed']}")
    for _, _, proc in fronts:
        stop(proc)

    table = summarize(samples)


    # Resident memory with 4 workers, with and without the filter, after load.
    memory = {}
    for label, filters in (("without the filter", ""), ("with aoai-msi-filter", configs[-1][1])):
        port = free_port()
        proc = envoy(front_yaml(port, free_port(), filters, up_port, emu_port), work, f"mem{len(memory)}", concurrency=4, cpu="0,1")
        wrk(port, 3)
        memory[label] = rss_mib(proc.pid)
        stop(proc)

    # Cold start: 200 concurrent first requests over 4 workers, IMDS 300 ms away.
    stop(emu)
    emu, emu_port = emulator("--imds-delay-ms", "300")
    port = free_port()
    proc = envoy(front_yaml(port, free_port(), configs[-1][1], up_port, emu_port), work, "cold", concurrency=4, cpu="0,1")
    statuses, cold = burst(port, 200)
    cold_calls = imds_calls(emu_port)
    stop(proc)
    port = free_port()
    proc = envoy(front_yaml(port, free_port(), "", up_port, emu_port), work, "cold-base", concurrency=4, cpu="0,1")
    _, base = burst(port, 200)
    stop(proc)
    cold_result = {
        "imds_calls": cold_calls, "failed": sum(1 for s in statuses if s != 200),
        "p50_ms": pct(cold, 0.5), "p99_ms": pct(cold, 0.99),
        "added_p50_ms": pct(cold, 0.5) - pct(base, 0.5), "added_p99_ms": pct(cold, 0.99) - pct(base, 0.99),
    }
    print(f"bench: cold start {cold_result}")

    # Refresh under load: 10-second tokens, 60 s of load.
    stop(emu)
    emu, emu_port = emulator("--token-lifetime", "10")
    port = free_port()
    proc = envoy(front_yaml(port, free_port(), configs[-1][1], up_port, emu_port), work, "refresh")
    refresh = wrk(port, 60, connections=16)
    refresh["imds_calls"] = imds_calls(emu_port)
    stop(proc)
    print(f"bench: refresh under load {refresh}")
    stop(emu)
    for p in list(children):
        stop(p)

    (ROOT / "bench").mkdir(exist_ok=True)
    (ROOT / "bench/results.json").write_text(json.dumps(
        {"samples": samples, "memory_mib": memory, "cold_start": cold_result, "refresh": refresh,
         "seconds": SECONDS, "token_bytes": len(token)}, indent=1))
    write_report(table, memory, cold_result, refresh, len(token))
    shutil.rmtree(work, ignore_errors=True)


def summarize(samples):
    """Medians per configuration, and half the round-to-round CPU range."""
    table = {}
    for name, runs in samples.items():
        table[name] = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_us", "p99_us", "cpu_us")}
        table[name]["failed"] = sum(r["failed"] for r in runs)
        cpu = [r["cpu_us"] for r in runs]
        table[name]["cpu_spread"] = (max(cpu) - min(cpu)) / 2
    return table


def report_only():
    """Rewrite BENCHMARKS.md and the chart from bench/results.json."""
    saved = json.loads((ROOT / "bench/results.json").read_text())
    global ROUNDS, SECONDS
    ROUNDS = len(next(iter(saved["samples"].values())))
    SECONDS = saved.get("seconds", SECONDS)
    write_report(summarize(saved["samples"]), saved["memory_mib"], saved["cold_start"], saved["refresh"], saved.get("token_bytes", 2153))


def machine():
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "unknown CPU")
    envoy_version = subprocess.run([ENVOY, "--version"], capture_output=True, text=True).stdout.strip().split("version: ")[-1]
    return f"{os.cpu_count()} × {model}, Linux {platform.release()}, Envoy {envoy_version} (V8)"


def write_report(table, memory, cold, refresh, token_len):
    limit = table["no filter"]
    floor = table["header_mutation (native floor)"]
    wasm_floor = table["empty wasm (wasm floor)"]
    ours = table["aoai-msi-filter"]
    rows = []
    for name, t in table.items():
        rows.append(
            f"| {name} | {t['rps']:.0f} | {t['p50_us']:.0f} | {t['p99_us']:.0f} | {t['cpu_us']:.1f} ± {t['cpu_spread']:.1f} | "
            f"{t['rps'] / limit['rps']:.2f}× | {t['rps'] / floor['rps']:.2f}× | {t['cpu_us'] / floor['cpu_us']:.2f}× | {t['failed']} |")
    # Setting a 2 KB header costs the same whoever does it: measured natively as
    # header_mutation minus no filter. What the filter adds beyond the empty
    # wasm floor and that header is its own logic.
    header_cost = floor["cpu_us"] - limit["cpu_us"]
    own_cost = ours["cpu_us"] - wasm_floor["cpu_us"] - header_cost
    # Four medians enter own_cost; their spreads bound what it can resolve.
    noise = sum(t["cpu_spread"] for t in (ours, wasm_floor, floor, limit))
    targets = [
        ("throughput ≥ 0.95× the native floor", ours["rps"] / floor["rps"] >= 0.95, f"{ours['rps'] / floor['rps']:.2f}×"),
        ("CPU per request ≤ empty wasm + 1 µs", ours["cpu_us"] <= wasm_floor["cpu_us"] + 1.0, f"{ours['cpu_us'] - wasm_floor['cpu_us']:+.2f} µs"),
        ("… of which the 2 KB header itself (native: header_mutation − no filter)", None, f"{header_cost:+.2f} µs"),
        ("… the filter's own logic (the rest) ≤ 1 µs",
         None if abs(own_cost) < noise else own_cost <= 1.0,
         f"{own_cost:+.2f} µs" + (f": within the noise (±{noise:.1f} µs), neither shown nor refuted" if abs(own_cost) < noise else "")),
        ("p99 ≤ 1.10× the native floor", ours["p99_us"] <= 1.10 * floor["p99_us"], f"{ours['p99_us'] / floor['p99_us']:.2f}×"),
        ("cold burst: exactly one IMDS call", cold["imds_calls"] == 1, f"{cold['imds_calls']} call(s)"),
        ("cold burst: p99 added latency ≤ IMDS latency + 10 ms", cold["added_p99_ms"] <= 310, f"{cold['added_p99_ms']:.0f} ms"),
        ("refresh under load: zero failed requests", refresh["failed"] == 0, f"{refresh['failed']} failed"),
    ]
    date = datetime.date.today().isoformat()
    text = f"""# Benchmarks

Regenerated by `make bench` ({date}). Machine: {machine()}.

## Hot path: one pinned worker, {token_len}-byte token

Each configuration is a front Envoy with **one worker pinned to CPU 0** in front
of an upstream Envoy (`direct_response`); `wrk -t2 -c32` and the upstream share
CPU 1. The request carries `api-key`; each configuration replaces it with a
{token_len}-byte `authorization: Bearer …` (except "no filter" and "empty wasm").
{ROUNDS} interleaved rounds of {SECONDS} s; medians. CPU/req is the front
Envoy's CPU time (all threads, `/proc/<pid>/task/*/schedstat`) per request served.

| configuration | req/s | p50 µs | p99 µs | CPU µs/req (± half the round-to-round range) | vs no filter | vs native floor | CPU vs native floor | failed |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

![throughput and CPU per request](bench/throughput.png)

## Targets

| target | met | measured |
|---|---|---|
{chr(10).join(f"| {t} | {'—' if ok is None else 'yes' if ok else '**no**'} | {m} |" for t, ok, m in targets)}

## Memory (resident, Envoy with 4 workers, after 3 s of load)

| | RSS MiB |
|---|---:|
{chr(10).join(f"| {k} | {v:.1f} |" for k, v in memory.items())}

## Cold start: 200 concurrent first requests, 4 workers, IMDS 300 ms away

IMDS calls: **{cold['imds_calls']}**; failed: {cold['failed']}; latency p50 {cold['p50_ms']:.0f} ms, p99 {cold['p99_ms']:.0f} ms;
added over the same burst without the filter: p50 {cold['added_p50_ms']:.0f} ms, p99 {cold['added_p99_ms']:.0f} ms.
The filter fetches a token at start-up (on the first tick), so a burst that
arrives after Envoy is ready waits at most the rest of that IMDS call.

## Refresh under load: 10-second tokens, 60 s

{refresh['requests']} requests at {refresh['rps']:.0f} req/s; failed: **{refresh['failed']}**; IMDS calls: {refresh['imds_calls']}
(one per refresh at half-life, 5 s).

## Where the hot path stands

Per matching request the filter makes five host calls beyond the empty wasm
filter: it reads `:authority` and, on the response, `:status` (each read
re-enters the VM to allocate the copy), reads the clock, removes `api-key` and
sets the 2 KB `authorization` from its VM-local copy. It reads no shared data,
defines no metric and allocates nothing beyond the header copies; request
counters are flushed on the tick. This machine has no hardware counters
(`perf stat -e instructions` is not supported) and its timing noise is larger
than the 1 µs target, so the CPU target can neither be shown nor refuted here;
an instruction-count comparison on a machine with counters is the next step.

## Method notes

- On this shared 2-core VM one Envoy worker spends 50–100 µs of CPU per proxied
  request, and the same configuration varies by ±15 % between rounds: differences
  of a few µs per request are below the noise of a single run. The medians over
  interleaved rounds, and the decomposition of the wasm filter's cost in the
  targets table, are the figures to read.
- The native floor (`header_mutation`) sets the same header from static config:
  no token lifecycle at all. The empty wasm filter is the cost of any proxy-wasm
  filter under V8 before it does anything.
- `credential_injector` fetches its token from the emulator's Entra endpoint
  (OAuth2 client credentials) and injects it natively.
- Ratios come from one run; the machine is shared, so repeat runs vary by a few percent.
"""
    (ROOT / "BENCHMARKS.md").write_text(text)
    chart(table)
    print(text)


def chart(table):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(table)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["#999999", "#4c72b0", "#8172b2", "#c44e52", "#ccb974", "#55a868"]
    a.barh(names, [table[n]["rps"] for n in names], color=colors)
    a.set_xlabel("requests/s (one pinned worker)")
    a.invert_yaxis()
    b.barh(names, [table[n]["cpu_us"] for n in names], color=colors,
           xerr=[table[n].get("cpu_spread", 0) for n in names], capsize=4)
    b.set_xlabel("CPU µs per request (bars: half the round-to-round range)")
    b.invert_yaxis()
    b.set_yticklabels([])
    fig.suptitle("aoai-msi-filter vs the limit and its peers (Envoy 1.40, V8)")
    fig.tight_layout()
    (ROOT / "bench").mkdir(exist_ok=True)
    fig.savefig(ROOT / "bench/throughput.png", dpi=110)


if __name__ == "__main__":
    if sys.argv[1:] == ["--report"]:
        report_only()
        sys.exit(0)
    try:
        main()
    finally:
        for p in list(children):
            stop(p)
