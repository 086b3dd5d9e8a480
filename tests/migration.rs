//! End to end: moving real applications from keys to Entra ID without
//! changing them — many SDK processes on one token, keys rotated under load,
//! the way back to keys while IMDS is down, Azure ML scoring on short tokens,
//! gateway keys per team, applications that already bring their own Entra
//! token, and a key regenerated with no overlap. Real Envoy, real filter, the emulator as Azure; every
//! assertion is on what the emulator received, what the client got, the
//! filter's metrics and its log.
//!
//! The rotation test runs a minute; it sorts first so that, with
//! `--test-threads 2`, the other scenarios run beside it.
#![cfg(not(target_arch = "wasm32"))]
// Test helpers: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aoai_emulator::{Identity, ImdsReply, AI_RESOURCE, ML_RESOURCE, RESOURCE};
use serde_json::Value;
use support::*;

/// The key every application here was written with (`post_to`, `app.py`).
const APP_KEY: &str = "app-key-123";
const CHAT_BODY: &str = r#"{"messages":[{"role":"user","content":"hi"}]}"#;

/// The sidecar of envoy/local.yaml: every request goes to the `azure_openai`
/// cluster (the emulator); token sources reach `azure_imds` (IMDS on
/// `imds_port`) and `key_service` (the emulator's key service).
fn sidecar(config: &str, emulator: &Emulator, imds_port: u16, concurrency: u32) -> Envoy {
    let yaml = routed_envoy_yaml(
        config,
        "",
        &[VirtualHost {
            name: "azure_openai",
            domains: &["*"],
            routes: &[("/", "azure_openai")],
        }],
        &[
            ("azure_openai", emulator.port()),
            ("azure_imds", imds_port),
            ("key_service", emulator.port()),
        ],
    );
    Envoy::start_yaml(&yaml, concurrency)
}

/// One answer through Envoy, and how long it took.
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
    at_ms: u64,
    took: Duration,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// POST `body` to `path` through Envoy with this `Host` and these headers.
async fn send(
    client: &reqwest::Client,
    url: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> Reply {
    let mut request = client
        .post(url)
        .header("host", host)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let at_ms = epoch_ms();
    let started = Instant::now();
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response.text().await.unwrap_or_default();
            Reply {
                status,
                headers,
                body,
                at_ms,
                took: started.elapsed(),
            }
        }
        Err(e) => Reply {
            status: 0,
            headers: Default::default(),
            body: format!("no answer: {e}"),
            at_ms,
            took: started.elapsed(),
        },
    }
}

/// An application at a steady `per_second` for `duration`, in the
/// background: one request per tick whatever the previous ones are doing.
fn steady_load(
    url: String,
    host: &'static str,
    credential: (&'static str, &'static str),
    body: &'static str,
    per_second: u64,
    duration: Duration,
) -> tokio::task::JoinHandle<Vec<Reply>> {
    tokio::spawn(async move {
        let client = client();
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / per_second));
        let end = Instant::now() + duration;
        let mut sent = tokio::task::JoinSet::new();
        while Instant::now() < end {
            tick.tick().await;
            let (client, url) = (client.clone(), url.clone());
            sent.spawn(async move { send(&client, &url, host, &[credential], body).await });
        }
        let mut replies = Vec::new();
        while let Some(reply) = sent.join_next().await {
            replies.push(reply.unwrap());
        }
        replies.sort_by_key(|r| r.at_ms);
        replies
    })
}

/// The failed replies, shown.
fn failures(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .filter(|r| r.status != 200)
        .map(|r| format!("{} at {}: {}", r.status, r.at_ms, r.body))
        .collect()
}

/// Poll `check` every 50 ms until it answers, for at most `limit`.
async fn wait_for<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A key as the Azure portal shows one: 32 hex digits, new every run.
fn azure_like_key(n: usize) -> String {
    sha256_hex_of(&format!("key {n} of run {}", epoch_ms()))[..32].to_owned()
}

/// A key rotation as an operator (or a Key Vault rotation job) runs one.
struct Rotation {
    old: String,
    new: String,
    /// When the key file was replaced.
    changed_ms: u64,
    /// The first request that reached Azure with the new key.
    first_new_ms: u64,
    /// The last request that reached Azure with the old key.
    last_old_ms: u64,
}

/// Requests the emulator received with this `api-key`: their times.
fn seen_with_key(emulator: &Emulator, key: &str) -> Vec<u64> {
    emulator
        .upstream_requests()
        .iter()
        .filter(|r| r.header_values("api-key") == [key])
        .map(|r| r.at_ms)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_rotated_four_times_under_load_reaches_azure_within_one_poll_and_no_request_fails(
) {
    const POLL_MS: u64 = 2_000;
    const TARGET: &str = "legacy-keys";
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("aoai-key");
    let keys: Vec<String> = (0..5).map(azure_like_key).collect();
    replace_file_atomically(&key_file, &format!("{}\n", keys[0]));
    // A resource that still takes keys; its key lives in a file that ops
    // rotate, served by a local key service.
    let emulator = Emulator::start(Settings {
        local_auth_disabled: false,
        api_key: keys[0].clone(),
        key_file: Some(key_file.clone()),
        ..Settings::default()
    })
    .unwrap();
    let config = format!(
        r#"{{"targets": [{{"name": "{TARGET}", "hosts": ["*"], "clusters": ["azure_openai"],
            "token_source": {{"type": "http", "cluster": "key_service", "path": "/keyservice/key",
                              "credential": "api_key", "refresh_interval_ms": {POLL_MS}}}}}]}}"#
    );
    let envoy = sidecar(&config, &emulator, emulator.port(), 2);
    let started = Instant::now();
    let polls_before = emulator.key_requests();
    let load = steady_load(
        envoy.url(CHAT_PATH),
        AOAI_HOST,
        ("api-key", APP_KEY),
        CHAT_BODY,
        20,
        Duration::from_secs(60),
    );
    let mut rotations = Vec::new();
    for (n, pair) in keys.windows(2).enumerate() {
        let (old, new) = (&pair[0], &pair[1]);
        tokio::time::sleep_until((started + Duration::from_secs(5 + 13 * n as u64)).into()).await;
        // As with key1/key2: the resource takes the new key before anyone
        // uses it ...
        emulator.configure(|s| s.secondary_api_key = Some(new.clone()));
        replace_file_atomically(&key_file, &format!("{new}\n"));
        let changed_ms = epoch_ms();
        let first_new_ms = wait_for(Duration::from_millis(POLL_MS + 10_000), || {
            seen_with_key(&emulator, new).first().copied()
        })
        .await
        .unwrap_or_else(|| panic!("rotation {}: the new key never reached Azure", n + 1));
        // ... and the old one is retired once nobody has sent it for a second.
        let last_old_ms = wait_for(Duration::from_secs(10), || {
            let last = seen_with_key(&emulator, old).last().copied().unwrap_or(0);
            (epoch_ms() > last + 1_000).then_some(last)
        })
        .await
        .unwrap_or_else(|| panic!("rotation {}: the old key was still sent", n + 1));
        emulator.configure(|s| {
            s.api_key = new.clone();
            s.secondary_api_key = None;
        });
        rotations.push(Rotation {
            old: old.clone(),
            new: new.clone(),
            changed_ms,
            first_new_ms,
            last_old_ms,
        });
    }
    let replies = load.await.unwrap();
    let elapsed = started.elapsed();
    let polls = emulator.key_requests() - polls_before;

    let failed = failures(&replies);
    println!(
        "rotation under load: {} requests in {:.1} s, {} failed; {} key-service polls",
        replies.len(),
        elapsed.as_secs_f64(),
        failed.len(),
        polls
    );
    for (n, r) in rotations.iter().enumerate() {
        println!(
            "  rotation {}: first request with the new key {} ms after the file changed, last with the old key {} ms after",
            n + 1,
            r.first_new_ms as i64 - r.changed_ms as i64,
            r.last_old_ms as i64 - r.changed_ms as i64,
        );
    }
    assert!(replies.len() >= 1_100, "{} requests", replies.len());
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), failed);
    for (n, r) in rotations.iter().enumerate() {
        assert!(
            r.first_new_ms <= r.changed_ms + POLL_MS + 1_000,
            "rotation {}: the new key took {} ms to reach Azure (poll every {POLL_MS} ms)",
            n + 1,
            r.first_new_ms - r.changed_ms
        );
        assert!(
            r.last_old_ms <= r.changed_ms + POLL_MS + 1_000,
            "rotation {}: the old key was still sent {} ms after the change",
            n + 1,
            r.last_old_ms - r.changed_ms
        );
    }
    // One poll per interval for the whole Envoy, not one per worker.
    assert!(
        (polls as u64) <= elapsed.as_millis() as u64 / POLL_MS + 4,
        "{polls} polls in {elapsed:?}"
    );

    // Azure saw only the rotating keys, one per request, never a bearer or the app's own key.
    let seen = emulator.upstream_requests();
    assert_eq!(seen.len(), replies.len());
    for request in &seen {
        assert_eq!(request.verdict, Verdict::Ok);
        let sent = request.header_values("api-key");
        assert!(
            sent.len() == 1 && keys.iter().any(|k| k == sent[0]),
            "{sent:?}"
        );
        assert!(request.header_values("authorization").is_empty());
    }

    // Each rotation is one log line naming both fingerprints, never a key.
    let log = envoy.filter_log();
    let acquired = format!(
        "target {TARGET}: credential acquired (sha256 {}…)",
        credential_fingerprint(&keys[0])
    );
    assert_eq!(
        log.iter().filter(|l| l.contains(&acquired)).count(),
        1,
        "{acquired} in:\n{}",
        log.join("\n")
    );
    for r in &rotations {
        let line = format!(
            "target {TARGET}: credential rotated: sha256 {}… → {}…",
            credential_fingerprint(&r.old),
            credential_fingerprint(&r.new)
        );
        let found: Vec<&String> = log.iter().filter(|l| l.contains(&line)).collect();
        assert_eq!(found.len(), 1, "{line} in:\n{}", log.join("\n"));
        println!(
            "  {}",
            found[0]
                .split("wasm log aoai-msi-filter")
                .last()
                .unwrap_or_default()
        );
    }
    let whole_log = envoy.log();
    for key in &keys {
        assert!(!whole_log.contains(key.as_str()), "a key is in the log");
        assert!(
            !whole_log.contains(&sha256_hex_of(key)),
            "a key's hash is in the log"
        );
    }
    let metrics = prometheus(&envoy);
    assert_eq!(
        metric_labeled(
            &metrics,
            "aoai_msi_credential_rotations_total",
            &[("target", TARGET)]
        ),
        Some(rotations.len() as f64),
        "{metrics}"
    );
}

#[test]
fn an_app_that_only_knows_api_key_runs_in_eight_processes_through_four_workers_on_one_token_call() {
    const PROCESSES: usize = 8;
    const CALLS: usize = 5;
    let emulator = Emulator::start(Settings::default()).unwrap();
    // The shipped sidecar's target: whatever the application calls, what
    // Envoy routes to the Azure OpenAI cluster gets the token.
    let config = r#"{"targets": [{"name": "myres", "hosts": ["*"], "clusters": ["azure_openai"],
                     "token_source": {"type": "imds", "cluster": "azure_imds"}}]}"#;
    let envoy = sidecar(config, &emulator, emulator.port(), 4);
    let endpoint = format!("http://{}", envoy.listener);
    let started = Instant::now();
    let mut apps: Vec<std::process::Child> = (0..PROCESSES)
        .map(|_| {
            Command::new(venv_python())
                .arg(repo().join("tests/migration/app.py"))
                .arg(&endpoint)
                .arg(CALLS.to_string())
                .env("NO_PROXY", "127.0.0.1,localhost")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run {}: {e}; `make test` installs the openai SDK",
                        venv_python().display()
                    )
                })
        })
        .collect();
    // Bounded: processes still running after two minutes are stopped (by
    // their own handles) and fail the test.
    let deadline = Instant::now() + Duration::from_secs(120);
    while apps.iter_mut().any(|a| a.try_wait().unwrap().is_none()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut results = Vec::new();
    for mut app in apps.drain(..) {
        if app.try_wait().unwrap().is_none() {
            let _ = app.kill();
        }
        let out = app.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "an application process failed (is openai installed in .venv? `make test` installs it):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        results.push(serde_json::from_str::<Value>(stdout.trim()).unwrap());
    }
    let took = started.elapsed();
    let ok: u64 = results.iter().map(|r| r["ok"].as_u64().unwrap()).sum();
    let token_calls = emulator.imds_requests().len();
    println!(
        "{PROCESSES} processes of openai {} x {CALLS} calls through 4 workers: {ok} succeeded in {:.1} s, {token_calls} token call(s)",
        results[0]["sdk"],
        took.as_secs_f64()
    );
    for result in &results {
        assert_eq!(result["errors"], Value::Array(vec![]), "{result}");
        assert_eq!(result["ok"], CALLS, "{result}");
    }
    assert_eq!(token_calls, 1, "{:?}", emulator.imds_requests());
    let seen = emulator.upstream_requests();
    assert_eq!(seen.len(), PROCESSES * CALLS);
    let system = Identity::system().object_id;
    for request in &seen {
        assert_eq!(request.verdict, Verdict::Ok);
        assert_eq!(request.token_oid.as_ref(), Some(&system));
        assert!(
            request.header_values("api-key").is_empty(),
            "no key reached Azure"
        );
        let authorization = request.header_values("authorization");
        assert!(
            authorization.len() == 1 && authorization[0].starts_with("Bearer eyJ"),
            "{authorization:?}"
        );
        assert!(!request.headers.iter().any(|(_, v)| v.contains(APP_KEY)));
    }
    let metrics = prometheus(&envoy);
    assert_eq!(
        metric_labeled(
            &metrics,
            "aoai_msi_requests_authorized_total",
            &[("target", "myres")]
        ),
        Some((PROCESSES * CALLS) as f64),
        "{metrics}"
    );
}

/// A filter with two targets while IMDS does not answer: `rollback` goes back
/// to keys, `strict` keeps refusing.
fn rollback_envoy(emulator: &Emulator, imds_port: u16) -> Envoy {
    let config = r#"{"targets": [
        {"name": "rollback", "hosts": ["rollback.openai.azure.com"], "clusters": ["aoai_rollback"],
         "on_token_failure": "forward_key"},
        {"name": "strict", "hosts": ["strict.openai.azure.com"], "clusters": ["aoai_strict"]}],
      "token_wait_timeout_ms": 2000}"#;
    let yaml = routed_envoy_yaml(
        config,
        "",
        &[
            VirtualHost {
                name: "rollback",
                domains: &["rollback.openai.azure.com"],
                routes: &[("/", "aoai_rollback")],
            },
            VirtualHost {
                name: "strict",
                domains: &["strict.openai.azure.com"],
                routes: &[("/", "aoai_strict")],
            },
        ],
        &[
            ("aoai_rollback", emulator.port()),
            ("aoai_strict", emulator.port()),
            ("azure_imds", imds_port),
        ],
    );
    Envoy::start_yaml(&yaml, 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_imds_is_unreachable_a_forward_key_target_sends_the_apps_own_key_and_a_reject_target_explains(
) {
    // The resource still takes keys, and the application's key is valid.
    let emulator = Emulator::start(Settings {
        local_auth_disabled: false,
        api_key: APP_KEY.to_owned(),
        ..Settings::default()
    })
    .unwrap();
    // IMDS down: a port that refuses connections for the whole test.
    let imds = closed_port();
    let envoy = rollback_envoy(&emulator, imds.port);
    let client = client();
    let url = envoy.url(CHAT_PATH);
    let with_key = [("api-key", APP_KEY)];

    let mut fallbacks = Vec::new();
    for _ in 0..5 {
        fallbacks.push(
            send(
                &client,
                &url,
                "rollback.openai.azure.com",
                &with_key,
                CHAT_BODY,
            )
            .await,
        );
    }
    let keyless = send(&client, &url, "rollback.openai.azure.com", &[], CHAT_BODY).await;
    let strict = send(
        &client,
        &url,
        "strict.openai.azure.com",
        &with_key,
        CHAT_BODY,
    )
    .await;

    println!(
        "forward_key while IMDS is unreachable: {:?}, answered in {:?}",
        fallbacks.iter().map(|r| r.status).collect::<Vec<_>>(),
        fallbacks.iter().map(|r| r.took).collect::<Vec<_>>()
    );
    for reply in &fallbacks {
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(
            reply.header("x-aoai-msi-fallback"),
            Some("TokenEndpointUnreachable")
        );
        assert_eq!(reply.header("x-aoai-msi-diagnosis"), None);
        assert_eq!(reply.json()["object"], "chat.completion", "{}", reply.body);
    }
    // The first request arrives before the first attempt has ended: it goes
    // on the moment that attempt fails, well before token_wait_timeout_ms
    // (2 s). Once the failure is known, nobody waits for a token that will
    // not come.
    for reply in &fallbacks {
        assert!(
            reply.took < Duration::from_millis(1_500),
            "{:?}",
            reply.took
        );
    }
    // Without a key of its own, a request gets the diagnosis.
    assert_eq!(keyless.status, 503, "{}", keyless.body);
    assert_eq!(
        keyless.header("x-aoai-msi-diagnosis"),
        Some("TokenEndpointUnreachable")
    );
    assert_eq!(keyless.header("x-aoai-msi-fallback"), None);
    assert_eq!(keyless.json()["error"]["code"], "TokenEndpointUnreachable");
    // reject (the default) explains as it always has.
    assert_eq!(strict.status, 503, "{}", strict.body);
    assert_eq!(
        strict.header("x-aoai-msi-diagnosis"),
        Some("TokenEndpointUnreachable")
    );
    assert_eq!(strict.header("x-aoai-msi-fallback"), None);
    assert!(strict.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("169.254.169.254"));

    // Azure saw the five fallbacks, each with the app's own key, untouched.
    let seen = emulator.upstream_requests();
    assert_eq!(
        seen.len(),
        fallbacks.len(),
        "only the fallbacks went upstream"
    );
    for request in &seen {
        assert_eq!(request.host, "rollback.openai.azure.com");
        assert_eq!(request.header_values("api-key"), [APP_KEY]);
        assert!(request.header_values("authorization").is_empty());
        assert_eq!(request.verdict, Verdict::Ok);
    }
    let metrics = prometheus(&envoy);
    println!("{metrics}");
    assert_eq!(
        metric_labeled(
            &metrics,
            "aoai_msi_key_fallbacks_total",
            &[
                ("target", "rollback"),
                ("diagnosis", "TokenEndpointUnreachable")
            ]
        ),
        Some(fallbacks.len() as f64)
    );
    assert_eq!(
        metric_labeled(
            &metrics,
            "aoai_msi_key_fallbacks_total",
            &[
                ("target", "strict"),
                ("diagnosis", "TokenEndpointUnreachable")
            ]
        )
        .unwrap_or(0.0),
        0.0
    );
    let warning = "target rollback: no token (TokenEndpointUnreachable): requests go on with \
                   their own api-key (on_token_failure: forward_key) until a token is back";
    let log = envoy.filter_log();
    let warned = log.iter().filter(|l| l.contains(warning)).count();
    // Rate-limited: at most one line per worker in ten seconds.
    assert!(
        (1..=2).contains(&warned),
        "{warned} x {warning} in:\n{}",
        log.join("\n")
    );
    assert!(
        !envoy.log().contains(APP_KEY),
        "the app's key is in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_keys_stop_as_soon_as_imds_answers_again() {
    let emulator = Emulator::start(Settings {
        local_auth_disabled: false,
        api_key: APP_KEY.to_owned(),
        imds_failure: Some(ImdsReply::error(500, "server_error", "IMDS is unavailable")),
        ..Settings::default()
    })
    .unwrap();
    let envoy = rollback_envoy(&emulator, emulator.port());
    let client = client();
    let url = envoy.url(CHAT_PATH);
    let host = "rollback.openai.azure.com";
    let with_key = [("api-key", APP_KEY)];
    let outage = send(&client, &url, host, &with_key, CHAT_BODY).await;
    assert_eq!(outage.status, 200, "{}", outage.body);
    assert_eq!(
        outage.header("x-aoai-msi-fallback"),
        Some("TokenEndpointUnavailable")
    );
    // IMDS is back: within the urgent retry (at most 4 s) tokens flow again.
    emulator.configure(|s| s.imds_failure = None);
    let back_at = Instant::now();
    let mut during = 0;
    let recovered = loop {
        let reply = send(&client, &url, host, &with_key, CHAT_BODY).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        if reply.header("x-aoai-msi-fallback").is_none() {
            break reply;
        }
        during += 1;
        assert!(
            back_at.elapsed() < Duration::from_secs(15),
            "still falling back 15 s after IMDS came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "IMDS back: tokens again after {:?} ({during} more fallbacks meanwhile)",
        back_at.elapsed()
    );
    assert_eq!(recovered.header("x-aoai-msi-diagnosis"), None);
    let last = emulator.upstream_requests().pop().unwrap();
    assert!(
        last.header_values("api-key").is_empty(),
        "the key stays home again"
    );
    assert_eq!(last.verdict, Verdict::Ok);
    assert_eq!(
        last.token_oid,
        Some(Identity::system().object_id),
        "the managed identity's token"
    );
    let metrics = prometheus(&envoy);
    assert_eq!(
        metric_labeled(
            &metrics,
            "aoai_msi_key_fallbacks_total",
            &[
                ("target", "rollback"),
                ("diagnosis", "TokenEndpointUnavailable")
            ]
        ),
        Some(1.0 + during as f64),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_ml_endpoint_scored_for_twenty_seconds_on_eight_second_tokens_never_gets_an_expired_one(
) {
    const ENDPOINT: &str = "fraud-detector.eastus2.inference.ml.azure.com";
    const SCORE_BODY: &str =
        r#"{"input_data": {"columns": ["amount", "merchant"], "data": [[120.5, 7], [9.99, 3]]}}"#;
    let emulator = Emulator::start(Settings {
        token_lifetime_s: 8,
        ..Settings::default()
    })
    .unwrap();
    // The scoring client was written for `auth_mode: key` (the endpoint key
    // as a bearer); the endpoint now takes Entra tokens only.
    let config = r#"{"targets": [{"name": "scoring", "hosts": ["*.inference.ml.azure.com"],
                     "clusters": ["aml_endpoint"]}]}"#;
    let yaml = routed_envoy_yaml(
        config,
        "",
        &[VirtualHost {
            name: "aml",
            domains: &[ENDPOINT],
            routes: &[("/", "aml_endpoint")],
        }],
        &[
            ("aml_endpoint", emulator.port()),
            ("azure_imds", emulator.port()),
        ],
    );
    let envoy = Envoy::start_yaml(&yaml, 2);
    let replies = steady_load(
        envoy.url("/score"),
        ENDPOINT,
        ("authorization", "Bearer aml-endpoint-key-0000"),
        SCORE_BODY,
        10,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let failed = failures(&replies);
    assert!(failed.is_empty(), "{failed:?}");
    assert!(replies.len() >= 180, "{} requests", replies.len());
    assert_eq!(replies[0].json()["result"], serde_json::json!([0.5, 0.5]));

    let calls = emulator.imds_requests();
    for call in &calls {
        assert_eq!(
            call.query.get("resource").map(String::as_str),
            Some(ML_RESOURCE)
        );
    }
    // Tokens by first use: (first use, last use, exp in ms).
    let seen = emulator.upstream_requests();
    let mut tokens: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut least_left_ms = u64::MAX;
    for request in &seen {
        assert_eq!(request.verdict, Verdict::Ok, "{request:?}");
        assert_eq!(request.token_aud.as_deref(), Some(ML_RESOURCE));
        let exp_ms = request.token_exp.unwrap() * 1000;
        assert!(request.at_ms < exp_ms, "an expired token left the proxy");
        least_left_ms = least_left_ms.min(exp_ms - request.at_ms);
        let authorization = request.header_values("authorization")[0].to_owned();
        let entry = tokens
            .entry(authorization)
            .or_insert((request.at_ms, request.at_ms, exp_ms));
        entry.1 = entry.1.max(request.at_ms);
    }
    let mut by_first_use: Vec<(u64, u64, u64)> = tokens.into_values().collect();
    by_first_use.sort();
    let leads: Vec<i64> = by_first_use
        .windows(2)
        .map(|w| w[0].2 as i64 - w[1].0 as i64)
        .collect();
    println!(
        "Azure ML, 8 s tokens: {} scoring requests, {} token calls, {} tokens used; \
         least time left on a token sent: {least_left_ms} ms; each new token in use this long before the old expired: {leads:?} ms",
        seen.len(),
        calls.len(),
        by_first_use.len()
    );
    assert!(
        (4..=10).contains(&calls.len()),
        "refreshed at half-life, about every 4 s: {} calls",
        calls.len()
    );
    assert!(
        by_first_use.len() <= calls.len() && by_first_use.len() + 1 >= calls.len(),
        "{} tokens used, {} issued",
        by_first_use.len(),
        calls.len()
    );
    // Refreshed ahead: each token replaced while the one before was still valid,
    // and none sent within a second of its expiry (the margin is a quarter of 8 s).
    assert!(leads.iter().all(|lead| *lead > 0), "{leads:?}");
    assert!(least_left_ms >= 1_000, "{least_left_ms} ms");

    // The identity loses its role: the refusal names the role and the action.
    emulator.configure(|s| s.role_holders.clear());
    let denied = send(
        &client(),
        &envoy.url("/score"),
        ENDPOINT,
        &[("authorization", "Bearer aml-endpoint-key-0000")],
        SCORE_BODY,
    )
    .await;
    println!(
        "missing role: {} {:?}\n{}",
        denied.status,
        denied.header("x-aoai-msi-diagnosis"),
        denied.body
    );
    assert_eq!(denied.status, 401);
    assert!(denied.header("x-aoai-msi-diagnosis").is_some());
    let error = &denied.json()["error"];
    assert_eq!(error["code"], "PermissionDenied");
    assert_eq!(error["diagnosis"], "RoleMissing");
    let message = error["message"].as_str().unwrap();
    for needle in [
        "AzureML Data Scientist",
        "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/score/action",
        &Identity::system().object_id,
    ] {
        assert!(message.contains(needle), "{needle} in: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_keys_let_two_teams_borrow_the_identity_counted_apart_and_refuse_the_rest() {
    let team_a = format!("gw-team-a-{}", azure_like_key(1));
    let team_b = format!("gw-team-b-{}", azure_like_key(2));
    let unknown = format!("gw-team-c-{}", azure_like_key(3));
    let emulator = Emulator::start(Settings::default()).unwrap();
    let config = format!(
        r#"{{"targets": [{{"name": "shared", "hosts": ["*"], "clusters": ["azure_openai"],
            "client_keys": [{{"name": "team-a", "sha256": "{}"}}, {{"name": "team-b", "sha256": "{}"}}],
            "client_token": "keep"}}]}}"#,
        sha256_hex_of(&team_a),
        sha256_hex_of(&team_b)
    );
    let envoy = sidecar(&config, &emulator, emulator.port(), 2);
    let client = client();
    let url = envoy.url(CHAT_PATH);
    let chat = |headers: Vec<(&'static str, String)>, url: String| {
        let client = client.clone();
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            send(&client, &url, AOAI_HOST, &headers, CHAT_BODY).await
        }
    };
    for _ in 0..3 {
        let reply = chat(vec![("api-key", team_a.clone())], url.clone()).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    for _ in 0..2 {
        let reply = chat(vec![("api-key", team_b.clone())], url.clone()).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    // A browser client puts its key in the query; it never reaches Azure.
    let in_query = chat(vec![], format!("{url}&api-key={team_a}")).await;
    assert_eq!(in_query.status, 200, "{}", in_query.body);
    // An application that already has its own Entra token needs no gateway key.
    let own_token = emulator.mint(RESOURCE, 600);
    let with_token = chat(
        vec![("authorization", format!("Bearer {own_token}"))],
        url.clone(),
    )
    .await;
    assert_eq!(with_token.status, 200, "{}", with_token.body);
    let upstream_before = emulator.upstream_requests().len();

    let refused_unknown = chat(vec![("api-key", unknown.clone())], url.clone()).await;
    let refused_none = chat(vec![], url.clone()).await;
    let refused_query = chat(vec![], format!("{url}&api-key={unknown}")).await;
    for (reply, code) in [
        (&refused_unknown, "ClientKeyUnknown"),
        (&refused_none, "ClientKeyRequired"),
        (&refused_query, "ClientKeyUnknown"),
    ] {
        println!("refused: {} {}", reply.status, reply.body);
        assert_eq!(reply.status, 401, "{}", reply.body);
        assert_eq!(reply.header("x-aoai-msi-diagnosis"), Some(code));
        assert_eq!(reply.json()["error"]["code"], code, "{}", reply.body);
        assert!(reply.json()["error"]["message"].is_string());
        assert!(!reply.body.contains(&unknown), "the key is echoed");
        assert!(!reply.body.contains(&sha256_hex_of(&unknown)));
    }
    let seen = emulator.upstream_requests();
    assert_eq!(seen.len(), upstream_before, "nothing refused reached Azure");
    assert_eq!(seen.len(), 7);
    for request in &seen {
        assert_eq!(request.verdict, Verdict::Ok);
        assert!(request.header_values("api-key").is_empty());
        assert_eq!(
            request.query, "api-version=2024-10-21",
            "no key in the query"
        );
        for key in [&team_a, &team_b] {
            assert!(!request
                .headers
                .iter()
                .any(|(_, v)| v.contains(key.as_str())));
        }
    }
    assert_eq!(
        seen.last().unwrap().header_values("authorization"),
        [format!("Bearer {own_token}").as_str()],
        "the app's own token went as it came"
    );

    let metrics = prometheus(&envoy);
    println!("{metrics}");
    for (client, count) in [("team-a", 4.0), ("team-b", 2.0)] {
        assert_eq!(
            metric_labeled(
                &metrics,
                "aoai_msi_requests_authorized_total",
                &[("target", "shared"), ("client", client)]
            ),
            Some(count),
            "{client}"
        );
    }
    assert_eq!(
        metric_labeled(
            &metrics,
            "aoai_msi_client_tokens_kept_total",
            &[("target", "shared")]
        ),
        Some(1.0)
    );
    for (code, count) in [("ClientKeyUnknown", 2.0), ("ClientKeyRequired", 1.0)] {
        assert_eq!(
            metric_labeled(
                &metrics,
                "aoai_msi_local_replies_total",
                &[("target", "shared"), ("code", code)]
            ),
            Some(count),
            "{code}"
        );
    }
    // Not at trace level either: no key, no hash of one.
    let log = envoy.log();
    for key in [&team_a, &team_b, &unknown] {
        assert!(!log.contains(key.as_str()), "a gateway key is in the log");
        assert!(
            !log.contains(&sha256_hex_of(key)),
            "a gateway key's hash is in the log"
        );
    }
    assert!(!log.contains(&own_token), "the app's token is in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_own_valid_entra_token_is_kept_and_expired_foreign_or_key_bearers_are_replaced() {
    // The proxy has a user-assigned identity; the application its own (the
    // VM's system identity, which `mint` signs for).
    let proxy = Identity::user("aoai-proxy", 7);
    let app = Identity::system();
    let emulator = Emulator::start(Settings {
        user_identities: vec![proxy.clone()],
        role_holders: [proxy.object_id.clone(), app.object_id.clone()].into(),
        ..Settings::default()
    })
    .unwrap();
    let config = format!(
        r#"{{"targets": [{{"name": "chat", "hosts": ["*"], "clusters": ["azure_openai"],
            "token_source": {{"type": "imds", "cluster": "azure_imds", "client_id": "{}"}},
            "client_token": "keep"}}]}}"#,
        proxy.client_id
    );
    let envoy = sidecar(&config, &emulator, emulator.port(), 2);
    let client = client();
    let url = envoy.url(CHAT_PATH);

    let valid = format!("Bearer {}", emulator.mint(RESOURCE, 600));
    let expiring = format!("Bearer {}", emulator.mint(RESOURCE, 1));
    let foreign = format!("Bearer {}", emulator.mint(AI_RESOURCE, 600));
    let key_as_bearer = "Bearer sk-proj-Zx81kQeLw0aoai0migration0test";
    // Kept: its api-key, header and query, still goes.
    let kept = send(
        &client,
        &format!("{url}&api-key={APP_KEY}"),
        AOAI_HOST,
        &[("authorization", &valid), ("api-key", APP_KEY)],
        CHAT_BODY,
    )
    .await;
    assert_eq!(kept.status, 200, "{}", kept.body);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let mut replaced = Vec::new();
    for (what, authorization) in [
        ("expired", expiring.as_str()),
        ("another audience", foreign.as_str()),
        ("a key as a bearer", key_as_bearer),
    ] {
        let reply = send(
            &client,
            &url,
            AOAI_HOST,
            &[("authorization", authorization), ("api-key", APP_KEY)],
            CHAT_BODY,
        )
        .await;
        assert_eq!(reply.status, 200, "{what}: {}", reply.body);
        replaced.push((what, authorization));
    }

    let seen = emulator.upstream_requests();
    assert_eq!(seen.len(), 1 + replaced.len());
    for request in &seen {
        assert_eq!(request.verdict, Verdict::Ok, "{request:?}");
        assert!(request.header_values("api-key").is_empty());
        assert_eq!(request.query, "api-version=2024-10-21");
        assert_eq!(request.header_values("authorization").len(), 1);
    }
    assert_eq!(seen[0].header_values("authorization"), [valid.as_str()]);
    assert_eq!(
        seen[0].token_oid.as_ref(),
        Some(&app.object_id),
        "the app's identity"
    );
    for (request, (what, sent)) in seen[1..].iter().zip(&replaced) {
        let authorization = request.header_values("authorization")[0];
        assert_ne!(authorization, *sent, "{what}");
        assert!(authorization.starts_with("Bearer eyJ"), "{what}");
        assert_eq!(
            request.token_oid.as_ref(),
            Some(&proxy.object_id),
            "{what}: the proxy's identity"
        );
        assert_eq!(request.token_aud.as_deref(), Some(RESOURCE), "{what}");
    }
    let metrics = prometheus(&envoy);
    println!("{metrics}");
    assert_eq!(
        metric_labeled(
            &metrics,
            "aoai_msi_client_tokens_kept_total",
            &[("target", "chat")]
        ),
        Some(1.0)
    );
    let log = envoy.log();
    for token in [&valid, &expiring, &foreign] {
        let jwt = token.trim_start_matches("Bearer ");
        assert!(!log.contains(jwt), "an application's token is in the log");
    }
    assert!(
        !log.contains("sk-proj-"),
        "an application's key is in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_retired_before_the_next_poll_is_fetched_again_on_the_first_refusal() {
    const TARGET: &str = "legacy-keys";
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("aoai-key");
    let (old, new) = (azure_like_key(0), azure_like_key(1));
    replace_file_atomically(&key_file, &old);
    let emulator = Emulator::start(Settings {
        local_auth_disabled: false,
        api_key: old.clone(),
        key_file: Some(key_file.clone()),
        ..Settings::default()
    })
    .unwrap();
    // Polled every five minutes (the default): the refusal, not the poll,
    // must bring the new key.
    let config = format!(
        r#"{{"targets": [{{"name": "{TARGET}", "hosts": ["*"], "clusters": ["azure_openai"],
            "token_source": {{"type": "http", "cluster": "key_service", "path": "/keyservice/key",
                              "credential": "api_key"}}}}]}}"#
    );
    let envoy = sidecar(&config, &emulator, emulator.port(), 2);
    let client = client();
    let url = envoy.url(CHAT_PATH);
    let with_key = [("api-key", APP_KEY)];
    let before = send(&client, &url, AOAI_HOST, &with_key, CHAT_BODY).await;
    assert_eq!(before.status, 200, "{}", before.body);
    let polls_before = emulator.key_requests();

    // Regenerated without an overlap: the old key stops working at once.
    replace_file_atomically(&key_file, &new);
    emulator.configure(|s| s.api_key = new.clone());
    let refused = send(&client, &url, AOAI_HOST, &with_key, CHAT_BODY).await;
    println!(
        "refused: {} {:?} {}",
        refused.status,
        refused.header("x-aoai-msi-diagnosis"),
        refused.body
    );
    assert_eq!(refused.status, 401);
    assert_eq!(
        refused.json()["error"]["diagnosis"],
        "KeyRejected",
        "{}",
        refused.body
    );
    assert!(!refused.body.contains(&old) && !refused.body.contains(&new));
    let after = wait_for(Duration::from_secs(5), || {
        (emulator.key_requests() > polls_before).then_some(())
    })
    .await;
    assert!(after.is_some(), "the refusal did not bring a new poll");
    let mut recovered = None;
    for _ in 0..20 {
        let reply = send(&client, &url, AOAI_HOST, &with_key, CHAT_BODY).await;
        if reply.status == 200 {
            recovered = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered.is_some(), "the new key never served");
    let last = emulator.upstream_requests().pop().unwrap();
    assert_eq!(last.header_values("api-key"), [new.as_str()]);
    assert_eq!(
        emulator.key_requests() - polls_before,
        1,
        "one poll for the refusal"
    );
    let metrics = prometheus(&envoy);
    assert_eq!(
        metric_labeled(
            &metrics,
            "aoai_msi_credential_rotations_total",
            &[("target", TARGET)]
        ),
        Some(1.0),
        "{metrics}"
    );
    let line = format!(
        "target {TARGET}: credential rotated: sha256 {}… → {}…",
        credential_fingerprint(&old),
        credential_fingerprint(&new)
    );
    assert_eq!(
        envoy
            .filter_log()
            .iter()
            .filter(|l| l.contains(&line))
            .count(),
        1
    );
    let log = envoy.log();
    assert!(
        !log.contains(&old) && !log.contains(&new),
        "a key is in the log"
    );
}
