//! End to end: the token lifecycle under failure, in a real Envoy, against a
//! scripted emulator. No request that could have succeeded may fail.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use std::time::{Duration, Instant};

use support::*;

fn token_status(emulator: &Emulator) -> Vec<u16> {
    emulator.imds_requests().iter().map(|r| r.status).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_imds_failures_at_cold_start_are_retried_until_a_token_arrives() {
    let cases = [
        (
            "500",
            ImdsReply::error(500, "server_error", "internal error"),
        ),
        (
            "503",
            ImdsReply::error(503, "service_unavailable", "try later"),
        ),
        (
            "429",
            ImdsReply::error(429, "too_many_requests", "throttled"),
        ),
        ("410", ImdsReply::error(410, "gone", "IMDS is upgrading")),
        (
            "404",
            ImdsReply::error(404, "not_found", "IMDS is updating"),
        ),
        (
            "timeout",
            ImdsReply::Slow {
                delay_ms: 1_500,
                then: Box::new(ImdsReply::error(500, "late", "too late")),
            },
        ),
    ];
    for (name, failure) in cases {
        let emulator = Emulator::start(Settings::default()).unwrap();
        emulator.script_imds([failure.clone(), failure, ImdsReply::Token]);
        let envoy = Envoy::start(r#"{"token_source":{"timeout_ms":400}}"#, &emulator, 2);
        let started = Instant::now();
        let (status, _, body) = send_chat(&envoy).await;
        println!(
            "{name}: answered {status} after {:?}, IMDS saw {:?}",
            started.elapsed(),
            token_status(&emulator)
        );
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(emulator.tokens_minted(), 1, "{name}");
        let log = envoy.filter_log().join("\n");
        assert!(
            log.contains("token fetch failed"),
            "{name}: the failure is logged:\n{log}"
        );
        if name != "timeout" {
            assert_eq!(
                emulator.imds_max_concurrency(),
                1,
                "{name}: one call at a time"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_token_endpoint_is_a_503_naming_the_cause_within_the_wait_bound() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let closed = closed_port();
    let yaml = envoy_yaml(
        r#"{"token_wait_timeout_ms": 1000}"#,
        closed.port,
        emulator.port(),
    );
    let envoy = Envoy::start_yaml(&yaml, 2);
    let started = Instant::now();
    let (status, headers, body) = send_chat(&envoy).await;
    let elapsed = started.elapsed();
    println!("unreachable IMDS: {status} after {elapsed:?}: {body}");
    assert_eq!(status, 503);
    assert_eq!(headers["x-aoai-msi-diagnosis"], "TokenEndpointUnreachable");
    assert!(headers.contains_key("retry-after"));
    assert!(body.contains("169.254.169.254"), "{body}");
    assert!(elapsed < Duration::from_millis(2_500), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_answers_are_named_retried_and_never_injected() {
    let cases: [(&str, &str); 9] = [
        ("", "empty"),
        ("<html>oops</html>", "not a JSON token object"),
        (r#"{"token_type":"Bearer","expires_in":"3600"}"#, "no access_token"),
        (r#"{"access_token":"eyJ.a.b","token_type":"pop","expires_in":"3600"}"#, "not Bearer"),
        (r#"{"access_token":"eyJ.a.b","token_type":"Bearer","expires_on":"1000"}"#, "expired"),
        (r#"{"access_token":"eyJ.a.b","token_type":"Bearer","expires_in":"99999999"}"#, "lifetime"),
        (
            "{\"access_token\":\"eyJ.a.b\\r\\nx-evil: injected\",\"token_type\":\"Bearer\",\"expires_in\":\"3600\"}",
            "cannot be sent in an HTTP header",
        ),
        (r#"{"access_token":"eyJ.a.b","token_type":"Bearer"}"#, "neither expires_on nor expires_in"),
        ("LARGE", "larger than"),
    ];
    for (body, named) in cases {
        let body = if body == "LARGE" {
            format!(
                r#"{{"access_token":"{}","expires_in":"3600"}}"#,
                "A".repeat(70_000)
            )
        } else {
            body.to_owned()
        };
        let emulator = Emulator::start(Settings::default()).unwrap();
        emulator.script_imds([ImdsReply::Raw { status: 200, body }, ImdsReply::Token]);
        let envoy = Envoy::start("{}", &emulator, 1);
        let (status, _, answer) = send_chat(&envoy).await;
        assert_eq!(status, 200, "{named}: retried to success: {answer}");
        let log = envoy.filter_log().join("\n");
        assert!(log.contains(named), "{named} is named in the log:\n{log}");
        for request in emulator.upstream_requests() {
            assert!(
                request.header_values("x-evil").is_empty(),
                "no header injection"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_failures_never_reach_requests_while_the_token_is_valid() {
    let emulator = std::sync::Arc::new(
        Emulator::start(Settings {
            token_lifetime_s: 8,
            ..Settings::default()
        })
        .unwrap(),
    );
    let envoy = Envoy::start(r#"{"token_source":{"timeout_ms":500}}"#, &emulator, 4);
    let client = client();
    let first = chat(&client, &envoy, AOAI_HOST, "first")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    // Timed from the token's issue: the refresh is due at 4 s, the margin at 6 s.
    // Around the refresh and until just before the margin, every attempt fails,
    // with each failure class in turn; the schedule runs on its own.
    let issued = emulator.imds_requests()[0].at_ms;
    let schedule = {
        let emulator = emulator.clone();
        tokio::spawn(async move {
            let phases = [
                (3_500, Some(ImdsReply::error(500, "server_error", ""))),
                (4_300, Some(ImdsReply::error(429, "too_many_requests", ""))),
                (4_800, Some(ImdsReply::error(410, "gone", ""))),
                (
                    5_200,
                    Some(ImdsReply::Slow {
                        delay_ms: 2_000,
                        then: Box::new(ImdsReply::Token),
                    }),
                ),
                (5_700, None),
            ];
            for (at, reply) in phases {
                let wait = (issued + at).saturating_sub(epoch_ms());
                tokio::time::sleep(Duration::from_millis(wait)).await;
                emulator.configure(|s| s.imds_failure = reply);
            }
        })
    };
    let mut statuses = Vec::new();
    while epoch_ms() < issued + 11_000 {
        let sent = epoch_ms() - issued;
        let response = chat(&client, &envoy, AOAI_HOST, "during refresh")
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        if status != 200 {
            let body = response.text().await.unwrap_or_default();
            println!(
                "sent at {sent} ms, answered {status} at {} ms: {body}",
                epoch_ms() - issued
            );
        }
        statuses.push(status);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    schedule.await.unwrap();
    let failed: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    let attempts = token_status(&emulator);
    println!(
        "refresh under failure: {} requests, {} failed, IMDS answers {attempts:?}",
        statuses.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(
        attempts.iter().filter(|s| **s != 200).count() >= 2,
        "refresh failed and was retried: {attempts:?}"
    );
    assert!(
        attempts.iter().filter(|s| **s == 200).count() >= 2,
        "and eventually succeeded: {attempts:?}"
    );
    let upstream = emulator.upstream_requests();
    assert!(
        upstream.iter().all(|r| r.verdict == Verdict::Ok),
        "no expired or invalid token went out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_errors_fail_fast_and_are_not_retried_in_a_loop() {
    let emulator = Emulator::start(Settings {
        system_identity: None,
        user_identities: vec![
            aoai_emulator::Identity::user("a", 1),
            aoai_emulator::Identity::user("b", 2),
        ],
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start("{}", &emulator, 2);
    let started = Instant::now();
    for _ in 0..20 {
        let (status, headers, body) = send_chat(&envoy).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(headers["x-aoai-msi-diagnosis"], "ManagedIdentityAmbiguous");
        assert!(body.contains("token_source.client_id"), "{body}");
        assert!(body.contains("Multiple user assigned identities"), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = emulator.imds_requests().len();
    println!(
        "20 requests over {:?}: IMDS calls {calls}",
        started.elapsed()
    );
    let lines = envoy
        .filter_log()
        .iter()
        .filter(|l| l.contains("ManagedIdentityAmbiguous"))
        .count();
    assert!(
        lines <= 2,
        "one log line per worker, not per request: {lines}"
    );
    assert_eq!(
        calls, 1,
        "an identity error is retried slowly, not per request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_upstream_rejects_is_replaced_once_and_the_next_requests_carry_the_new_one() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start("{}", &emulator, 2);
    assert_eq!(send_chat(&envoy).await.0, 200);
    // Azure stops accepting the cached token (say, a signing-key rollover).
    emulator.rotate_signing_key().unwrap();
    let (status, _, body) = send_chat(&envoy).await;
    assert_eq!(status, 401, "the request that discovers it fails: {body}");
    assert!(body.contains("statusCode"));
    let mut recovered = None;
    for i in 0..40 {
        match send_chat(&envoy).await.0 {
            200 => {
                recovered = Some(i);
                break;
            }
            401 => {}
            other => panic!("a request waited or failed otherwise: {other}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let calls = emulator.imds_requests().len();
    println!("rejected token: recovered after {recovered:?} more requests, IMDS calls {calls}");
    assert!(recovered.is_some(), "a replacement token arrived");
    assert_eq!(calls, 2, "one replacement");
    for _ in 0..5 {
        assert_eq!(send_chat(&envoy).await.0, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_for_a_rejected_token_arrives_while_no_request_comes() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start("{}", &emulator, 2);
    assert_eq!(send_chat(&envoy).await.0, 200);
    emulator.rotate_signing_key().unwrap();
    assert_eq!(send_chat(&envoy).await.0, 401);
    // Nothing else comes: the replacement must not wait for the next request
    // on the thread that saw the rejection (the native build's worker threads
    // run only inside a request; its main thread fetches instead).
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let metrics = prometheus(&envoy);
    let fetched = metric(
        &metrics,
        "aoai_msi_token_fetches_total{target=\"default\",source=\"imds\",outcome=\"ok\"}",
    );
    println!(
        "idle after a rejection: {fetched} fetches, IMDS calls {}",
        emulator.imds_requests().len()
    );
    assert_eq!(
        fetched, 2.0,
        "the replacement was taken in while idle:\n{metrics}"
    );
    assert_eq!(emulator.imds_requests().len(), 2);
    for _ in 0..8 {
        assert_eq!(
            send_chat(&envoy).await.0,
            200,
            "every worker carries the new token"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_audience_cannot_turn_into_an_imds_storm() {
    let emulator = Emulator::start(Settings {
        accepted_audience: "https://cognitiveservices.azure.us".into(),
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start("{}", &emulator, 2);
    for _ in 0..30 {
        assert_eq!(send_chat(&envoy).await.0, 401);
    }
    let calls = emulator.imds_requests().len();
    println!("30 requests rejected for audience: IMDS calls {calls}");
    assert!(
        calls <= 2,
        "one drop per invalidation interval, not per 401: {calls}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_while_waiting_leaves_nothing_behind() {
    let emulator = Emulator::start(Settings {
        imds_delay_ms: 2_000,
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start("{}", &emulator, 1);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut impatient_ones = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let request = chat(&impatient, &envoy, AOAI_HOST, "bye");
        impatient_ones.spawn(async move { request.send().await.is_err() });
    }
    while let Some(gave_up) = impatient_ones.join_next().await {
        assert!(gave_up.unwrap(), "the client gave up first");
    }
    // The token call was the root's, so it completes; the next request uses it.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let (status, _, _) = send_chat(&envoy).await;
    assert_eq!(status, 200);
    assert_eq!(emulator.imds_requests().len(), 1);
    let upstream = emulator.upstream_requests();
    assert_eq!(
        upstream.len(),
        1,
        "abandoned requests were never sent upstream"
    );
    let metrics = prometheus(&envoy);
    assert_eq!(
        metric(&metrics, "aoai_msi_requests_waiting{target=\"default\"}"),
        0.0,
        "no waiting request is left behind: {metrics}"
    );
    let log = envoy.log();
    assert!(
        !log.contains("critical"),
        "no panic or critical error:\n{}",
        envoy.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_configuration_never_serves_a_token_fetched_for_the_old_one() {
    let (a, b) = (
        aoai_emulator::Identity::user("a", 1),
        aoai_emulator::Identity::user("b", 2),
    );
    let emulator = Emulator::start(Settings {
        system_identity: None,
        user_identities: vec![a.clone(), b.clone()],
        role_holders: [a.object_id.clone(), b.object_id.clone()].into(),
        ..Settings::default()
    })
    .unwrap();
    let config = |id: &aoai_emulator::Identity| {
        format!(r#"{{"token_source":{{"client_id":"{}"}}}}"#, id.client_id)
    };
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let lds = dir.path().join("lds.json");
    let replace_lds = |content: String| {
        let next = dir.path().join("lds.next");
        std::fs::write(&next, content).unwrap();
        std::fs::rename(&next, &lds).unwrap();
    };
    replace_lds(lds_listener(&config(&a), port));
    let bootstrap = envoy_yaml("{}", emulator.port(), emulator.port());
    let static_clusters = bootstrap.split_once("  clusters:").unwrap().1;
    let yaml = format!(
        "node: {{ id: e2e, cluster: e2e }}\nadmin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}\n\
         dynamic_resources:\n  lds_config:\n    path_config_source: {{ path: \"{}\" }}\n    resource_api_version: V3\n\
         static_resources:\n  clusters:{static_clusters}",
        lds.display()
    );
    let _envoy = Envoy::start_yaml(&yaml, 2);
    // A new connection per request, so each one meets the current listener.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}{CHAT_PATH}");
    let send = || {
        fresh
            .post(&url)
            .header("host", AOAI_HOST)
            .header("api-key", "k")
            .body(r#"{"messages":[{"role":"user","content":"hi"}]}"#)
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 200);
    let seen = last_token_oid;
    assert_eq!(seen(&emulator).as_deref(), Some(a.object_id.as_str()));

    replace_lds(lds_listener(&config(&b), port));
    let switched = Instant::now();
    let mut switched_after = None;
    for _ in 0..100 {
        assert_eq!(send().await.unwrap().status(), 200);
        if seen(&emulator).as_deref() == Some(b.object_id.as_str()) {
            switched_after = Some(switched.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let switched_after = switched_after.expect("the new configuration took effect");
    for _ in 0..20 {
        assert_eq!(send().await.unwrap().status(), 200);
        assert_eq!(
            seen(&emulator).as_deref(),
            Some(b.object_id.as_str()),
            "once the new configuration serves, no request carries the old identity's token"
        );
    }
    let asked: Vec<Option<String>> = emulator
        .imds_requests()
        .iter()
        .map(|r| r.query.get("client_id").cloned())
        .collect();
    println!("reconfigured in {switched_after:?}; IMDS was asked for {asked:?}");
    assert_eq!(
        asked,
        vec![Some(a.client_id.clone()), Some(b.client_id.clone())]
    );
}
