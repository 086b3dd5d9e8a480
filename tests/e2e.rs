//! End to end: the filter inside a real Envoy, against the local Azure emulator.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use std::time::{Duration, Instant};

use support::*;

fn aoai_requests(emulator: &Emulator) -> Vec<UpstreamRequest> {
    emulator
        .upstream_requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/openai/"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_replaced_by_exactly_one_managed_identity_token() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start("{}", &emulator, 2);
    // openai-python 1.x sends its key twice: as api-key and as a Bearer header.
    let response = chat(&client(), &envoy, AOAI_HOST, "hello")
        .header("authorization", "Bearer app-key-123")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("hello"));

    let seen = aoai_requests(&emulator);
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.verdict, Verdict::Ok);
    assert!(
        request.header_values("api-key").is_empty(),
        "api-key must not reach Azure"
    );
    let authorization = request.header_values("authorization");
    assert_eq!(
        authorization.len(),
        1,
        "exactly one authorization header: {authorization:?}"
    );
    assert!(
        authorization[0].starts_with("Bearer eyJ"),
        "an Entra JWT, not the app's key"
    );
    assert_eq!(request.host, AOAI_HOST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imds_receives_exactly_the_request_azure_documents() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start("{}", &emulator, 1);
    let response = chat(&client(), &envoy, AOAI_HOST, "hi")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let calls = emulator.imds_requests();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert_eq!(call.status, 200);
    assert_eq!(
        call.query.get("api-version").map(String::as_str),
        Some("2018-02-01")
    );
    assert_eq!(
        call.query.get("resource").map(String::as_str),
        Some("https://cognitiveservices.azure.com"),
        "the bare resource, without /.default"
    );
    for selector in ["client_id", "object_id", "msi_res_id"] {
        assert!(
            !call.query.contains_key(selector),
            "no selector configured, none sent"
        );
    }
    let header = |name: &str| {
        call.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(header("metadata"), vec!["true"]);
    assert_eq!(header("host"), vec!["169.254.169.254"]);
    assert!(
        header("x-forwarded-for").is_empty(),
        "IMDS rejects X-Forwarded-For"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_client_id_selects_one_of_several_user_assigned_identities() {
    let first = aoai_emulator::Identity::user("first", 1);
    let second = aoai_emulator::Identity::user("second", 2);
    let emulator = Emulator::start(Settings {
        system_identity: None,
        user_identities: vec![first.clone(), second.clone()],
        role_holders: [second.object_id.clone()].into(),
        ..Settings::default()
    })
    .unwrap();
    let config = format!(
        r#"{{"token_source":{{"client_id":"{}"}}}}"#,
        second.client_id
    );
    let envoy = Envoy::start(&config, &emulator, 2);
    let response = chat(&client(), &envoy, AOAI_HOST, "hi")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let calls = emulator.imds_requests();
    assert_eq!(calls[0].query.get("client_id"), Some(&second.client_id));
    assert_eq!(
        aoai_requests(&emulator)[0].token_oid.as_deref(),
        Some(second.object_id.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_burst_of_100_requests_on_4_workers_makes_one_imds_call() {
    const IMDS_DELAY_MS: u64 = 1_000;
    let emulator = Emulator::start(Settings {
        imds_delay_ms: IMDS_DELAY_MS,
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start("{}", &emulator, 4);
    let client = client();
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..100 {
        let request = chat(&client, &envoy, AOAI_HOST, &format!("request {i}"));
        burst.spawn(async move {
            let started = Instant::now();
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            (status, started.elapsed(), body, i)
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = burst.join_next().await {
        let (status, elapsed, body, i) = done.unwrap();
        assert_eq!(status, 200, "request {i}: {body}");
        assert!(
            body.contains(&format!("request {i}")),
            "the held body went through: {body}"
        );
        latencies.push(elapsed);
    }
    latencies.sort();
    let calls = emulator.imds_requests();
    let (p50, max) = (percentile(&latencies, 0.5), latencies[latencies.len() - 1]);
    println!(
        "cold burst: 100 requests, 4 workers, IMDS {IMDS_DELAY_MS} ms: IMDS calls {}, p50 {p50:?}, p99 {:?}, max {max:?}",
        calls.len(),
        percentile(&latencies, 0.99)
    );
    assert_eq!(calls.len(), 1, "one token request for the whole burst");
    assert_eq!(emulator.tokens_minted(), 1);
    let token_at = calls[0].at_ms;
    let upstream = aoai_requests(&emulator);
    assert_eq!(upstream.len(), 100);
    assert!(
        upstream
            .iter()
            .all(|r| r.verdict == Verdict::Ok && r.at_ms >= token_at),
        "every request waited for the token and went out with it"
    );
    // Parked requests are resumed by notification, not by a timeout or a poll:
    // nobody waits much longer than the IMDS call (the wait bound is 5 s).
    assert!(
        max < Duration::from_millis(IMDS_DELAY_MS + 1_500),
        "slowest request took {max:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_lived_tokens_are_refreshed_before_any_request_carries_an_expired_one() {
    const LIFETIME_S: u64 = 8;
    const RUN: Duration = Duration::from_secs(30);
    let emulator = Emulator::start(Settings {
        token_lifetime_s: LIFETIME_S,
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start("{}", &emulator, 4);
    let client = client();
    let started = Instant::now();
    let mut sent = 0u32;
    let mut failures = Vec::new();
    while started.elapsed() < RUN {
        let mut wave = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let request = chat(&client, &envoy, AOAI_HOST, "tick");
            wave.spawn(async move { request.send().await.map(|r| r.status().as_u16()) });
        }
        while let Some(done) = wave.join_next().await {
            sent += 1;
            match done.unwrap() {
                Ok(200) => {}
                other => failures.push(format!("{other:?}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let upstream = aoai_requests(&emulator);
    let expired = upstream
        .iter()
        .filter(|r| r.verdict == Verdict::ExpiredToken)
        .count();
    let least_left_ms = upstream
        .iter()
        .filter_map(|r| r.token_exp.map(|exp| exp as i64 * 1000 - r.at_ms as i64))
        .min()
        .unwrap();
    let calls = emulator.imds_requests().len();
    println!(
        "refresh: {sent} requests over {RUN:?} with {LIFETIME_S} s tokens: {} failed, {expired} expired at the upstream, \
         IMDS calls {calls}, least token life left on arrival {least_left_ms} ms",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(expired, 0);
    assert!(least_left_ms > 0, "no token reached the upstream expired");
    assert!(
        calls >= 4,
        "at least three refreshes after the first token: {calls}"
    );
    // Half-life refresh of an 8 s token over 30 s is ~8 calls; a storm is not.
    assert!(
        calls <= 12,
        "refresh is single-flight, not per worker: {calls}"
    );
    assert_eq!(upstream.len() as u32, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_hosts_are_untouched_and_never_receive_the_token() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start("{}", &emulator, 2);
    let client = client();
    // First make sure a token exists, so there is something that could leak.
    let ok = chat(&client, &envoy, AOAI_HOST, "hi").send().await.unwrap();
    assert_eq!(ok.status(), 200);
    for host in [
        "api.example.com",
        "openai.azure.com.evil.example",
        "xopenai.azure.com",
        "myres.openai.azure.com.evil.example:443",
    ] {
        let response = client
            .get(envoy.url("/echo"))
            .header("host", host)
            .header("api-key", "app-key-123")
            .header("authorization", "Bearer app-key-123")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{host}");
    }
    let echoed: Vec<UpstreamRequest> = emulator
        .upstream_requests()
        .into_iter()
        .filter(|r| r.path == "/echo")
        .collect();
    assert_eq!(echoed.len(), 4);
    for request in &echoed {
        assert_eq!(
            request.header_values("api-key"),
            vec!["app-key-123"],
            "{}",
            request.host
        );
        assert_eq!(
            request.header_values("authorization"),
            vec!["Bearer app-key-123"],
            "{} keeps its own authorization",
            request.host
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_without_identity_gets_a_401_that_says_how_to_fix_it() {
    let emulator = Emulator::start(Settings {
        system_identity: None,
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start("{}", &emulator, 2);
    let started = Instant::now();
    let response = chat(&client(), &envoy, AOAI_HOST, "hi")
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["x-aoai-msi-diagnosis"],
        "ManagedIdentityNotFound"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ManagedIdentityNotFound");
    assert_eq!(
        body["error"]["token_endpoint_error_description"],
        "Identity not found"
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Assign a managed identity"));
    assert!(
        aoai_requests(&emulator).is_empty(),
        "nothing reached Azure OpenAI"
    );
    println!("identity not found answered after {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_no_longer_than_the_configured_bound_for_a_slow_token_endpoint() {
    let emulator = Emulator::start(Settings {
        imds_delay_ms: 4_000,
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start(r#"{"token_wait_timeout_ms": 1000}"#, &emulator, 2);
    let started = Instant::now();
    let response = chat(&client(), &envoy, AOAI_HOST, "hi")
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers()["x-aoai-msi-diagnosis"],
        "TokenWaitTimeout"
    );
    assert!(response.headers().contains_key("retry-after"));
    println!("parked request answered after {elapsed:?} (bound 1000 ms)");
    assert!(elapsed >= Duration::from_millis(1_000), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(2_500), "{elapsed:?}");
}

#[test]
fn invalid_plugin_configurations_fail_envoy_validation_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = validate(&write_envoy_config(&dir, "empty.yaml", "{}"));
    assert!(ok, "{{}} is a valid configuration:\n{out}");
    let cases = [
        (
            r#"{"resorce":"https://cognitiveservices.azure.com"}"#,
            "unknown field `resorce`",
        ),
        (r#"{"hosts":["*openai.azure.com"]}"#, "`hosts[0]`"),
        (
            r#"{"resource":"https://cognitiveservices.azure.com/.default"}"#,
            "`resource`",
        ),
        (
            r#"{"token_source":{"cluster":7}}"#,
            "`token_source.cluster` must be a string",
        ),
        (
            r#"{"token_source":{"client_id":"a","msi_res_id":"b"}}"#,
            "token_source.client_id / token_source.msi_res_id",
        ),
        ("{not json", "not valid JSON"),
        (
            r#"{"targets":[{"name":"all","hosts":["*.openai.azure.com"]},{"name":"east","hosts":["east.openai.azure.com"]}]}"#,
            "`targets[1]` (\"east\") can never match",
        ),
        (
            r#"{"targets":[{"hosts":["east.openai.azure.com","*.openai.azure.us"]}]}"#,
            "`targets[0].hosts` mix hosts that take different audiences",
        ),
        (
            r#"{"targets":[{"hosts":["a.example"]},{"hosts":["b.example"],"paths":["x"]}]}"#,
            "`targets[1].paths[0]`",
        ),
        (
            r#"{"targets":[{"hosts":["*"]}]}"#,
            "`targets[0].hosts[0]` is \"*\"",
        ),
        // The wasm filter cannot read SDS secrets (its message names the
        // fix: client_secret_env, or libaoai_msi.so); the native build
        // refuses it too here, as no such static secret is declared.
        (
            r#"{"token_source":{"type":"client_credentials","tenant_id":"t","client_id":"c","client_secret_sds":"sp"}}"#,
            "`token_source.client_secret_sds`",
        ),
    ];
    for (i, (config, field)) in cases.iter().enumerate() {
        let (ok, out) = validate(&write_envoy_config(&dir, &format!("bad{i}.yaml"), config));
        assert!(!ok, "{config} must fail validation");
        let line = out
            .lines()
            .find(|l| l.contains("invalid plugin configuration"))
            .unwrap_or_else(|| panic!("{config}: no configuration error in:\n{out}"));
        assert!(line.contains(field), "{config}: {line}");
    }
}

/// Where AKS workload identity mounts the projected token; a shipped config
/// that serves it is validated against a stand-in token in a temp dir.
const TOKEN_MOUNTS: [&str; 2] = [
    "/var/run/secrets/azure/wi/token",
    "/var/run/secrets/azure/tokens",
];

#[test]
fn every_shipped_envoy_config_passes_validation() {
    let dir = tempfile::tempdir().unwrap();
    let token_dir = dir.path().join("token");
    std::fs::create_dir(&token_dir).unwrap();
    std::fs::write(token_dir.join("azure-identity-token"), "eyJ.eyJ.sig").unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("envoy")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let mut text = std::fs::read_to_string(&path).unwrap();
            for mount in TOKEN_MOUNTS {
                text = text.replace(mount, &token_dir.display().to_string());
            }
            let copy = dir.path().join(path.file_name().unwrap());
            std::fs::write(&copy, text).unwrap();
            let (ok, out) = validate(&copy);
            assert!(ok, "{} fails validation:\n{out}", path.display());
            assert!(
                !out.contains("invalid plugin configuration"),
                "{}:\n{out}",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 5,
        "every deployment's config is shipped: {checked}"
    );
}

/// Every end-to-end test runs this module, so they all cover the trimmed
/// exports; this test makes sure the module they run is the trimmed one.
#[test]
fn the_built_module_does_not_export_callbacks_the_filter_does_not_use() {
    let module = std::fs::read(wasm()).unwrap();
    let contains = |name: &str| module.windows(name.len()).any(|w| w == name.as_bytes());
    // Release modules carry no name section, so an export is the only place
    // these names can appear.
    for unused in ["proxy_on_log", "proxy_on_done"] {
        assert!(
            !contains(unused),
            "{unused} is still exported: build with `make build`"
        );
    }
    for used in [
        "proxy_on_request_headers",
        "proxy_on_request_body",
        "proxy_on_response_headers",
        "proxy_on_response_body",
        "proxy_on_delete",
    ] {
        assert!(contains(used), "{used} must stay exported");
    }
}

#[test]
fn every_shipped_envoy_config_binds_its_targets_to_clusters_it_defines() {
    let mut checked = 0;
    for (path, doc) in shipped_configs() {
        let clusters: Vec<&str> = doc["static_resources"]["clusters"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .collect();
        for json in plugin_configs(&doc) {
            let config =
                aoai_msi_filter::config::Config::parse_with_env(json.as_bytes(), &validation_env)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for target in &config.targets {
                assert!(
                    !target.clusters.is_empty(),
                    "{}: target {} is not bound to clusters",
                    path.display(),
                    target.name
                );
                for cluster in &target.clusters {
                    assert!(
                        clusters.contains(&cluster.as_str()),
                        "{}: target {} names cluster {cluster}, which the config does not define",
                        path.display(),
                        target.name
                    );
                }
                for token in &config.tokens {
                    assert!(
                        clusters.contains(&token.source.cluster()),
                        "{}",
                        path.display()
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "targets checked: {checked}");
}

#[test]
fn every_shipped_envoy_config_turns_every_metric_label_into_a_prometheus_label() {
    let mut checked = 0;
    for (path, doc) in shipped_configs() {
        let tags: Vec<(&str, &str)> = doc["stats_config"]["stats_tags"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|t| Some((t["tag_name"].as_str()?, t["regex"].as_str()?)))
            .collect();
        for (tag, regex) in aoai_msi_filter::metrics::STATS_TAGS {
            assert!(
                tags.contains(&(tag, regex)),
                "{}: stats_config.stats_tags lacks {{ tag_name: {tag}, regex: \"{regex}\" }}",
                path.display()
            );
        }
        checked += 1;
    }
    assert!(checked >= 5, "configs checked: {checked}");
}
