//! The Azure OpenAI surface beyond one chat call, through the shipped Envoy
//! configs (their clusters pointed at the emulator, everything else as
//! shipped): Realtime sessions over WebSocket opened by a real client, cold
//! and warm, with the key in a header or in the URL; streamed answers read by
//! the openai SDK chunk by chunk; a stream that lasts over a minute; 25 MiB
//! uploads while the token is still being fetched, with Envoy's memory
//! watched; the v1 API and the deployment routes; and a sidecar whose other
//! traffic never enters the filter.
#![cfg(not(target_arch = "wasm32"))]
// Test helpers: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aoai_emulator::Identity;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::*;

// ---------------------------------------------------------------- helpers

/// Run `tests/sdk/<script>` with the venv's Python; the JSON it printed.
fn run_script(script: &str, args: &[&str]) -> Value {
    let python = std::env::var("SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join(".venv/bin/python"));
    let out = Command::new(&python)
        .arg(repo().join("tests/sdk").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed (`make test-e2e` installs openai and websockets into .venv):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

/// The `oid` of the emulated VM's identity: what the emulator names as the
/// caller of a request it let through with the filter's token.
fn identity_oid() -> String {
    Identity::system().object_id
}

/// The one request the emulator saw at `path` with exactly this query, and
/// the checks every authorized request must pass: the emulator let it
/// through, no `api-key` in a header or the query, one Entra bearer token.
fn authorized_upstream(emulator: &Emulator, path: &str, query: &str) -> UpstreamRequest {
    let seen: Vec<UpstreamRequest> = emulator
        .upstream_requests()
        .into_iter()
        .filter(|r| r.path == path && r.query == query)
        .collect();
    assert_eq!(
        seen.len(),
        1,
        "one request to {path}?{query}; the emulator saw: {:?}",
        emulator
            .upstream_requests()
            .iter()
            .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
            .collect::<Vec<_>>()
    );
    let request = seen.into_iter().next().unwrap();
    assert_eq!(request.verdict, Verdict::Ok, "{request:?}");
    assert!(
        request.header_values("api-key").is_empty(),
        "no api-key header upstream: {request:?}"
    );
    let lowered = request.query.to_ascii_lowercase();
    assert!(
        !lowered.contains("api-key") && !lowered.contains("api%2dkey"),
        "no api-key query parameter upstream: {}",
        request.query
    );
    let authorization = request.header_values("authorization");
    assert_eq!(authorization.len(), 1, "{authorization:?}");
    assert!(authorization[0].starts_with("Bearer eyJ"), "an Entra JWT");
    request
}

/// Milliseconds of a JSON number.
fn ms(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Envoy's memory before and at its highest while something ran.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kib_before: u64,
    rss_kib_peak: u64,
    allocated_before: u64,
    allocated_peak: u64,
}

impl Memory {
    fn rss_growth_mib(&self) -> f64 {
        self.rss_kib_peak.saturating_sub(self.rss_kib_before) as f64 / 1024.0
    }

    fn allocated_growth(&self) -> u64 {
        self.allocated_peak.saturating_sub(self.allocated_before)
    }

    fn describe(&self) -> String {
        format!(
            "resident {:.1} MiB before, peak +{:.1} MiB; allocated {:.1} MiB before, peak +{:.2} MiB",
            self.rss_kib_before as f64 / 1024.0,
            self.rss_growth_mib(),
            self.allocated_before as f64 / MIB,
            self.allocated_growth() as f64 / MIB
        )
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Samples Envoy's resident memory (`/proc/<pid>/status`) and the bytes its
/// allocator has handed out and not taken back (admin `/memory`: what Envoy
/// holds, without the free pages the allocator keeps resident, tens of MiB
/// after start-up) every few milliseconds until stopped.
struct MemoryWatch {
    stop: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<Memory>,
}

impl MemoryWatch {
    fn start(envoy: &Envoy) -> MemoryWatch {
        let (pid, admin) = (envoy.pid(), envoy.admin);
        let allocated = move || {
            let (_, body) = get(admin, "/memory").unwrap();
            let memory: Value = serde_json::from_str(&body).unwrap();
            memory["allocated"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        };
        let before = Memory {
            rss_kib_before: rss_kib(pid),
            rss_kib_peak: rss_kib(pid),
            allocated_before: allocated(),
            allocated_peak: 0,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut seen = before;
            loop {
                let done = stopped.load(Ordering::Relaxed);
                seen.rss_kib_peak = seen.rss_kib_peak.max(rss_kib(pid));
                seen.allocated_peak = seen.allocated_peak.max(allocated());
                if done {
                    return seen;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        MemoryWatch { stop, sampler }
    }

    fn stop(self) -> Memory {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().unwrap()
    }
}

/// A multipart audio upload of exactly `size` bytes (its file part
/// pseudo-random, so nothing on the way can shrink it): (content type, body).
fn audio_upload(size: usize) -> (String, Vec<u8>) {
    let boundary = "aoai-msi-filter-surface-boundary";
    let head = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"speech.wav\"\r\ncontent-type: audio/wav\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(head.as_bytes());
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    while body.len() < size - tail.len() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        body.extend_from_slice(&state.to_le_bytes());
    }
    body.truncate(size - tail.len());
    body.extend_from_slice(tail.as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// `yaml` with Envoy's buffer filter first in its HTTP filter chain, holding
/// every request body whole (up to 32 MiB) before passing it on: what full
/// buffering looks like in Envoy's memory.
fn holding_whole_bodies(yaml: &str) -> String {
    let mut doc: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    let filters = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"]
        .as_sequence_mut()
        .unwrap();
    filters.insert(
        0,
        serde_yaml::from_str(
            "name: envoy.filters.http.buffer\ntyped_config:\n  \"@type\": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer\n  max_request_bytes: 33554432\n",
        )
        .unwrap(),
    );
    serde_yaml::to_string(&doc).unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A filter metric's value, if Envoy has the series at all.
fn series(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.parse().unwrap())
}

// ---------------------------------------------------------------- long stream

/// The longest silence the stream below holds, longer than a minute: a
/// reasoning model that thinks before its last words.
const LONG_SILENCE_MS: u64 = 65_000;

/// Its name sorts second, so it starts at once and the others run beside it
/// (two at a time): the binary takes about as long as this test alone.
#[test]
fn a_stream_that_falls_silent_for_over_a_minute_completes_through_the_shipped_vm_config() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start_yaml(&shipped_config_on("azure-vm.yaml", &emulator), 2);
    let started = Instant::now();
    let result = run_script(
        "stream.py",
        &[
            &format!("http://{}", envoy.listener),
            "2",
            &LONG_SILENCE_MS.to_string(),
            "150",
        ],
    );
    let took = started.elapsed();
    assert_eq!(result["ok"], true, "{result}");
    let chunks = result["chunks"].as_array().unwrap();
    let content: Vec<&Value> = chunks.iter().filter(|c| !c["index"].is_null()).collect();
    assert_eq!(content.len(), 2, "{result}");
    let gap = ms(&content[1]["arrived_ms"]) - ms(&content[0]["arrived_ms"]);
    println!(
        "long stream: {:.1} s of silence between the two chunks, {:.1} s in all, through azure-vm.yaml's timeouts",
        gap / 1000.0,
        took.as_secs_f64()
    );
    assert!(
        gap >= (LONG_SILENCE_MS - 1_000) as f64,
        "the stream really held a silence of over a minute: {gap} ms"
    );
    assert_eq!(content[1]["finish_reason"], "stop", "it ran to its end");
    let text: String = content
        .iter()
        .map(|c| c["content"].as_str().unwrap())
        .collect();
    assert!(text.ends_with("Stream this through Envoy"), "{text}");
    assert_eq!(content[0]["caller"], identity_oid().as_str());
    authorized_upstream(
        &emulator,
        "/openai/deployments/gpt-4o-mini/chat/completions",
        "api-version=2024-10-21",
    );
}

// ---------------------------------------------------------------- realtime

/// One Realtime session of the tests: where it goes and how its key travels.
struct Session {
    path: &'static str,
    /// The query the client sends.
    query: &'static str,
    /// The query Azure must receive: the same, without the key.
    upstream_query: &'static str,
    /// The key in an `api-key` header (else it is in the query).
    key_header: bool,
    model: &'static str,
}

const GA_KEY_IN_QUERY: Session = Session {
    path: "/openai/v1/realtime",
    query: "model=gpt-realtime&api-key=app-key-123&trace=ga%20query",
    upstream_query: "model=gpt-realtime&trace=ga%20query",
    key_header: false,
    model: "gpt-realtime",
};
const GA_KEY_IN_HEADER: Session = Session {
    path: "/openai/v1/realtime",
    query: "model=gpt-realtime&trace=ga%20header",
    upstream_query: "model=gpt-realtime&trace=ga%20header",
    key_header: true,
    model: "gpt-realtime",
};
const PREVIEW_KEY_IN_QUERY: Session = Session {
    path: "/openai/realtime",
    // Any spelling of the name: compared percent-decoded, without case.
    query: "Api-Key=app-key-123&api-version=2024-10-01-preview&deployment=gpt-4o-realtime-preview",
    upstream_query: "api-version=2024-10-01-preview&deployment=gpt-4o-realtime-preview",
    key_header: false,
    model: "gpt-4o-realtime-preview",
};
const PREVIEW_KEY_IN_HEADER: Session = Session {
    path: "/openai/realtime",
    query: "api-version=2025-04-01-preview&deployment=gpt-4o-realtime-preview&trace=preview",
    upstream_query:
        "api-version=2025-04-01-preview&deployment=gpt-4o-realtime-preview&trace=preview",
    key_header: true,
    model: "gpt-4o-realtime-preview",
};

impl Session {
    /// Open the session through Envoy with the `websockets` client, send one
    /// event, read its echo; what the client saw.
    fn open(&self, envoy: &Envoy) -> Value {
        let url = format!("ws://{}{}?{}", envoy.listener, self.path, self.query);
        let headers = if self.key_header {
            json!({"api-key": "app-key-123"})
        } else {
            json!({})
        };
        run_script("realtime.py", &[&url, &headers.to_string()])
    }

    /// The client's view: a completed handshake, the session of the asked
    /// model opened for the filter's identity, and a message both ways; then
    /// Azure's view: a WebSocket upgrade with the token and no key anywhere.
    fn check(&self, client: &Value, emulator: &Emulator) -> UpstreamRequest {
        assert_eq!(client["ok"], true, "{}?{}: {client}", self.path, self.query);
        assert_eq!(client["status"], 101, "{client}");
        assert_eq!(client["subprotocol"], "realtime", "{client}");
        assert_eq!(client["first"]["type"], "session.created", "{client}");
        assert_eq!(client["first"]["session"]["model"], self.model);
        assert_eq!(
            client["first"]["x_emulator_caller"],
            identity_oid().as_str(),
            "Azure accepted the session for the managed identity"
        );
        assert_eq!(client["echo"]["type"], "echo");
        assert_eq!(
            client["echo"]["data"], client["sent"],
            "a message round-tripped"
        );
        let upstream = authorized_upstream(emulator, self.path, self.upstream_query);
        assert!(upstream.websocket, "a WebSocket upgrade reached Azure");
        assert_eq!(upstream.method, "GET");
        upstream
    }
}

#[test]
fn realtime_sessions_opened_before_the_token_exists_wait_for_it_and_carry_it() {
    const IMDS_DELAY_MS: u64 = 3_000;
    let emulator = Emulator::start(Settings {
        imds_delay_ms: IMDS_DELAY_MS,
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start_yaml(&shipped_config_on("local.yaml", &emulator), 2);
    let opened_ms = epoch_ms();
    assert_eq!(emulator.tokens_minted(), 0, "no token yet");
    let cold: Vec<Value> = std::thread::scope(|scope| {
        let opening: Vec<_> = [&GA_KEY_IN_QUERY, &PREVIEW_KEY_IN_HEADER]
            .into_iter()
            .map(|session| scope.spawn(|| session.open(&envoy)))
            .collect();
        opening.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let imds = emulator.imds_requests();
    assert_eq!(imds.len(), 1, "one token request");
    let token_at = imds[0].at_ms;
    assert!(
        opened_ms < token_at,
        "the sessions were opened while the token was being fetched"
    );
    for (session, client) in [&GA_KEY_IN_QUERY, &PREVIEW_KEY_IN_HEADER]
        .into_iter()
        .zip(&cold)
    {
        let upstream = session.check(client, &emulator);
        assert!(
            upstream.at_ms >= token_at,
            "the handshake waited for the token"
        );
        println!(
            "realtime cold {}?{}: 101 after {} ms (IMDS answered {} ms after the session was opened)",
            session.path,
            session.query,
            client["handshake_ms"],
            token_at - opened_ms
        );
    }
}

#[test]
fn realtime_sessions_on_both_api_versions_get_the_token_and_lose_the_key_from_header_and_url() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start_yaml(&shipped_config_on("local.yaml", &emulator), 2);
    for session in [
        &GA_KEY_IN_QUERY,
        &GA_KEY_IN_HEADER,
        &PREVIEW_KEY_IN_QUERY,
        &PREVIEW_KEY_IN_HEADER,
    ] {
        let client = session.open(&envoy);
        session.check(&client, &emulator);
        println!(
            "realtime warm {}?{}: 101 after {} ms, key in {}",
            session.path,
            session.query,
            client["handshake_ms"],
            if session.key_header {
                "header"
            } else {
                "query"
            }
        );
    }
    assert_eq!(emulator.imds_requests().len(), 1);
}

// ---------------------------------------------------------------- streaming

#[test]
fn a_streamed_completion_reaches_the_openai_sdk_chunk_by_chunk_as_paced() {
    const CHUNKS: usize = 6;
    const INTERVAL_MS: f64 = 500.0;
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start_yaml(&shipped_config_on("local.yaml", &emulator), 2);
    let result = run_script(
        "stream.py",
        &[
            &format!("http://{}", envoy.listener),
            &CHUNKS.to_string(),
            &INTERVAL_MS.to_string(),
            "30",
        ],
    );
    assert_eq!(result["ok"], true, "{result}");
    let chunks: Vec<&Value> = result["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["index"].is_null())
        .collect();
    let indices: Vec<u64> = chunks
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(
        indices,
        (0..CHUNKS as u64).collect::<Vec<_>>(),
        "every chunk, in order"
    );
    let lags: Vec<f64> = chunks
        .iter()
        .map(|c| ms(&c["arrived_ms"]) - ms(&c["sent_ms"]))
        .collect();
    let sent_spread = ms(&chunks[CHUNKS - 1]["sent_ms"]) - ms(&chunks[0]["sent_ms"]);
    let arrived_spread = ms(&chunks[CHUNKS - 1]["arrived_ms"]) - ms(&chunks[0]["arrived_ms"]);
    println!(
        "sse: {CHUNKS} chunks paced {INTERVAL_MS} ms apart; sent over {sent_spread:.0} ms, arrived over {arrived_spread:.0} ms; lag from the emulator to the SDK per chunk (ms): {:?}",
        lags.iter().map(|l| l.round()).collect::<Vec<_>>()
    );
    // A proxy that buffered the stream would hand a chunk over only with a
    // later one (or all at the end): its lag would reach the pacing interval.
    for (i, lag) in lags.iter().enumerate() {
        assert!(
            *lag < INTERVAL_MS,
            "chunk {i} reached the SDK {lag:.0} ms after it was sent: held back"
        );
    }
    assert!(
        arrived_spread >= sent_spread / 2.0,
        "chunks arrived spread as they were sent, not coalesced: {arrived_spread:.0} ms vs {sent_spread:.0} ms"
    );
    let text: String = chunks
        .iter()
        .map(|c| c["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        text,
        "Hello from the Azure OpenAI emulator. You said: Stream this through Envoy"
    );
    assert_eq!(chunks[0]["caller"], identity_oid().as_str());
    authorized_upstream(
        &emulator,
        "/openai/deployments/gpt-4o-mini/chat/completions",
        "api-version=2024-10-21",
    );
}

// ---------------------------------------------------------------- uploads

const UPLOAD_BYTES: usize = 25 * 1024 * 1024;
const TRANSCRIPTIONS: &str = "/openai/deployments/whisper/audio/transcriptions";

/// One upload through Envoy while its memory is watched: (status, answer,
/// seconds taken, memory).
async fn upload(envoy: &Envoy, content_type: &str, body: &[u8]) -> (u16, Value, f64, Memory) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let watch = MemoryWatch::start(envoy);
    let started = Instant::now();
    let response = client
        .post(envoy.url(&format!("{TRANSCRIPTIONS}?api-version=2024-10-21")))
        .header("api-key", "app-key-123")
        .header("content-type", content_type)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    let took = started.elapsed().as_secs_f64();
    (status, answer, took, watch.stop())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_25_mib_upload_sent_while_the_token_is_fetched_arrives_whole_and_envoy_never_holds_it_all(
) {
    const IMDS_DELAY_MS: u64 = 2_000;
    let emulator = Emulator::start(Settings {
        imds_delay_ms: IMDS_DELAY_MS,
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start_yaml(&shipped_config_on("local.yaml", &emulator), 2);
    let (content_type, body) = audio_upload(UPLOAD_BYTES);
    let sha256 = sha256_hex(&body);

    let sent_ms = epoch_ms();
    assert_eq!(emulator.tokens_minted(), 0, "no token yet");
    let cold = upload(&envoy, &content_type, &body).await;
    let token_at = emulator.imds_requests()[0].at_ms;
    assert!(
        sent_ms < token_at,
        "the upload began while the token was being fetched"
    );
    let warm = upload(&envoy, &content_type, &body).await;

    for (label, (status, answer, took, memory)) in [("cold", &cold), ("warm", &warm)] {
        println!(
            "upload {label}: {} MiB in {took:.2} s; Envoy {}",
            UPLOAD_BYTES / (1024 * 1024),
            memory.describe()
        );
        assert_eq!(*status, 200, "{label}: {answer}");
        assert_eq!(answer["x_emulator_bytes"], UPLOAD_BYTES, "{label}");
        assert_eq!(answer["x_emulator_sha256"], sha256.as_str(), "{label}");
        assert_eq!(answer["x_emulator_caller"], identity_oid().as_str());
        // Envoy streams the body on (holding at most about its 1 MiB buffer
        // limit while the request waits): never a copy of the whole upload.
        assert!(
            memory.allocated_growth() < (UPLOAD_BYTES / 4) as u64,
            "{label}: Envoy held {} bytes more for a {UPLOAD_BYTES}-byte upload",
            memory.allocated_growth()
        );
        assert!(
            memory.rss_growth_mib() < (UPLOAD_BYTES / 2) as f64 / MIB,
            "{label}: {}",
            memory.describe()
        );
    }
    let seen: Vec<UpstreamRequest> = emulator
        .upstream_requests()
        .into_iter()
        .filter(|r| r.path == TRANSCRIPTIONS)
        .collect();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(request.verdict, Verdict::Ok);
        assert_eq!(request.body_len, UPLOAD_BYTES);
        assert_eq!(request.body_sha256, sha256);
        assert!(request.header_values("api-key").is_empty());
    }
    assert!(
        seen[0].at_ms >= token_at,
        "the cold upload waited for the token"
    );

    // Control: the same sidecar with a filter in front that holds whole
    // bodies shows the whole upload in what Envoy holds, so the small growth
    // above is not the measure missing it. This Envoy has no token yet either,
    // so the body it holds waits there for the token: long enough to sample.
    let holding = Envoy::start_yaml(
        &holding_whole_bodies(&shipped_config_on("local.yaml", &emulator)),
        2,
    );
    let (status, answer, took, memory) = upload(&holding, &content_type, &body).await;
    println!(
        "upload through Envoy's buffer filter (control): {took:.2} s; Envoy {}",
        memory.describe()
    );
    assert_eq!(status, 200, "{answer}");
    assert!(
        memory.allocated_growth() > (UPLOAD_BYTES * 9 / 10) as u64,
        "a body held whole shows in what Envoy holds: {}",
        memory.describe()
    );
}

// ---------------------------------------------------------------- v1 and deployments

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v1_api_and_the_deployment_routes_are_authorized_with_no_key_upstream() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start_yaml(&shipped_config_on("local.yaml", &emulator), 2);
    let (multipart, audio) = audio_upload(64 * 1024);
    let json_body = |v: Value| ("application/json".to_owned(), v.to_string().into_bytes());
    // (method, path, query, (content type, body), how the application sends its key)
    type Call<'a> = (
        &'a str,
        &'a str,
        &'a str,
        Option<(String, Vec<u8>)>,
        (&'a str, &'a str),
    );
    let calls: Vec<Call> = vec![
        (
            "POST",
            "/openai/v1/responses",
            "",
            Some(json_body(json!({"model": "gpt-4o-mini", "input": "hi"}))),
            ("api-key", "app-key-123"),
        ),
        (
            "POST",
            "/openai/v1/chat/completions",
            "",
            Some(json_body(
                json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
            )),
            // The plain OpenAI client on a v1 base URL sends its key as a bearer.
            ("authorization", "Bearer app-key-123"),
        ),
        (
            "POST",
            "/openai/v1/embeddings",
            "",
            Some(json_body(
                json!({"model": "text-embedding-3-small", "input": "hi"}),
            )),
            ("api-key", "app-key-123"),
        ),
        (
            "GET",
            "/openai/v1/models",
            "",
            None,
            ("api-key", "app-key-123"),
        ),
        (
            "POST",
            "/openai/deployments/text-embedding-3-small/embeddings",
            "api-version=2024-10-21",
            Some(json_body(json!({"input": ["one", "two"]}))),
            ("api-key", "app-key-123"),
        ),
        (
            "POST",
            TRANSCRIPTIONS,
            "api-version=2024-10-21",
            Some((multipart, audio)),
            ("api-key", "app-key-123"),
        ),
        (
            "POST",
            "/openai/deployments/dall-e-3/images/generations",
            "api-version=2024-10-21",
            Some(json_body(json!({"prompt": "a lighthouse", "n": 1}))),
            ("api-key", "app-key-123"),
        ),
    ];
    let client = client();
    for (method, path, query, body, (key_header, key)) in &calls {
        let url = if query.is_empty() {
            envoy.url(path)
        } else {
            envoy.url(&format!("{path}?{query}"))
        };
        let mut request = client
            .request(method.parse().unwrap(), url)
            .header(*key_header, *key);
        if let Some((content_type, bytes)) = body {
            request = request
                .header("content-type", content_type)
                .body(bytes.clone());
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{method} {path}: {answer}");
        assert_eq!(
            answer["x_emulator_caller"],
            identity_oid().as_str(),
            "{method} {path}: {answer}"
        );
        let upstream = authorized_upstream(&emulator, path, query);
        if path.starts_with("/openai/v1/") {
            assert!(upstream.query.is_empty(), "the v1 API has no api-version");
        }
        println!("{method} {path}: 200, authorized, no key upstream");
    }
}

// ---------------------------------------------------------------- mixed traffic

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_traffic_through_the_mixed_sidecar_never_enters_the_filter() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let shipped = shipped_config_on("sidecar-mixed-traffic.yaml", &emulator);
    assert!(shipped.contains("disabled: true"));
    // Control: the same sidecar with the filter on everywhere counts the
    // other request as one it passed through, so a zero below means something.
    let everywhere = shipped.replace("disabled: true", "disabled: false");
    for (yaml, filter_runs) in [(&shipped, false), (&everywhere, true)] {
        let envoy = Envoy::start_yaml(yaml, 2);
        let (status, body) = send_to(&envoy, AOAI_HOST, CHAT_PATH).await;
        assert_eq!(status, 200, "{body}");
        let other_path = "/v2/orders";
        let other_query = "api-key=other-service-key&page=2";
        let response = client()
            .post(envoy.url(&format!("{other_path}?{other_query}")))
            .header("host", "api.example.com")
            .header("api-key", "other-service-key")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert!(response.headers().get("x-aoai-msi-diagnosis").is_none());

        let other: Vec<UpstreamRequest> = emulator
            .upstream_requests()
            .into_iter()
            .filter(|r| r.path == other_path)
            .collect();
        let other = other.last().unwrap();
        assert_eq!(other.host, "api.example.com");
        assert_eq!(other.header_values("api-key"), ["other-service-key"]);
        assert!(other.header_values("authorization").is_empty());
        assert_eq!(
            other.query, other_query,
            "the other service's URL untouched"
        );
        let metrics = prometheus(&envoy);
        assert_eq!(
            series(
                &metrics,
                "aoai_msi_requests_authorized_total{target=\"azure-openai\"}"
            ),
            Some(1.0),
            "{metrics}"
        );
        let passed = series(&metrics, "aoai_msi_requests_passed_through_total{}").unwrap_or(0.0);
        if filter_runs {
            assert_eq!(passed, 1.0, "control: the filter saw the other request");
        } else {
            assert_eq!(
                passed, 0.0,
                "the other request never entered the filter: {metrics}"
            );
        }
    }
    let azure: Vec<UpstreamRequest> = emulator
        .upstream_requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/openai/"))
        .collect();
    assert_eq!(azure.len(), 2);
    for request in azure {
        assert_eq!(request.verdict, Verdict::Ok);
        assert!(request.header_values("api-key").is_empty());
    }
}

// ---------------------------------------------------------------- shipped configs

/// Seconds of an Envoy duration as YAML writes it (`900s`, `0s`, `1.5s`).
fn seconds(duration: &serde_yaml::Value) -> Option<f64> {
    duration.as_str()?.strip_suffix('s')?.parse().ok()
}

fn allows_websocket(upgrades: &serde_yaml::Value) -> bool {
    upgrades
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|u| u["upgrade_type"].as_str() == Some("websocket") && u["enabled"] != false)
}

#[test]
fn every_shipped_config_lets_streams_realtime_sessions_and_long_uploads_through_its_azure_routes() {
    let mut routes_checked = 0;
    for (path, doc) in shipped_configs() {
        for hcm in typed_configs(&doc, "HttpConnectionManager") {
            let Some(filter) = hcm["http_filters"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|f| f["name"].as_str() == Some("aoai-msi-filter"))
            else {
                continue;
            };
            let off_by_default = filter["disabled"] == true;
            let json = filter_json(filter).unwrap();
            let config =
                aoai_msi_filter::config::Config::parse_with_env(json.as_bytes(), &validation_env)
                    .unwrap();
            let azure_clusters: Vec<String> = config
                .targets
                .iter()
                .flat_map(|t| t.clusters.iter().cloned())
                .collect();
            let where_ = path.display();
            assert!(
                hcm["request_timeout"].is_null() || seconds(&hcm["request_timeout"]) == Some(0.0),
                "{where_}: no bound on receiving a whole upload"
            );
            for vhost in hcm["route_config"]["virtual_hosts"].as_sequence().unwrap() {
                let enabled_here = !vhost["typed_per_filter_config"]["aoai-msi-filter"].is_null();
                for route in vhost["routes"].as_sequence().unwrap() {
                    let action = &route["route"];
                    let Some(cluster) = action["cluster"].as_str() else {
                        continue;
                    };
                    let name =
                        format!("{where_}: virtual host {}", vhost["name"].as_str().unwrap());
                    if !azure_clusters.iter().any(|c| c == cluster) {
                        assert!(
                            !(off_by_default && enabled_here),
                            "{name}: the filter is turned on for traffic no target takes"
                        );
                        continue;
                    }
                    if off_by_default {
                        assert!(enabled_here, "{name}: the filter is off on an Azure route");
                    }
                    assert_eq!(
                        seconds(&action["timeout"]),
                        Some(0.0),
                        "{name}: `timeout: 0s`, no limit on a streamed answer"
                    );
                    assert!(
                        allows_websocket(&action["upgrade_configs"])
                            || allows_websocket(&hcm["upgrade_configs"]),
                        "{name}: WebSocket upgrades for the Realtime API"
                    );
                    let idle = seconds(&action["idle_timeout"])
                        .or_else(|| seconds(&hcm["stream_idle_timeout"]))
                        .unwrap_or(300.0);
                    assert!(
                        idle >= 600.0,
                        "{name}: an idle timeout of {idle} s cuts a reasoning model that thinks as long as the SDK waits (600 s)"
                    );
                    routes_checked += 1;
                }
            }
        }
    }
    assert!(
        routes_checked >= 10,
        "Azure routes checked: {routes_checked}"
    );
    let demo = std::fs::read_to_string(repo().join("scripts/run.sh")).unwrap();
    assert!(
        demo.contains("-c envoy/local.yaml"),
        "make run uses local.yaml"
    );
}
