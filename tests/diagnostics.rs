//! End to end: every authorization failure explains itself, the metrics count
//! what happened, and the filter's log never holds a secret.
#![cfg(not(target_arch = "wasm32"))]
// Test helpers: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

struct Answer {
    status: u16,
    header: Option<String>,
    content_length: Option<u64>,
    raw: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.raw).unwrap()
    }

    fn error(&self) -> Value {
        self.json()["error"].clone()
    }
}

async fn ask(envoy: &Envoy, host: &str) -> Answer {
    let response = chat(&client(), envoy, host, "hi").send().await.unwrap();
    let status = response.status().as_u16();
    let header = response
        .headers()
        .get("x-aoai-msi-diagnosis")
        .map(|v| v.to_str().unwrap().to_owned());
    let content_length = response
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let raw = response.bytes().await.unwrap().to_vec();
    if let Some(length) = content_length {
        assert_eq!(length, raw.len() as u64, "content-length matches the body");
    }
    Answer {
        status,
        header,
        content_length,
        raw,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_role_is_explained_with_the_identity_and_the_command_to_fix_it() {
    let emulator = Emulator::start(Settings {
        role_holders: Default::default(),
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start("{}", &emulator, 1);
    let answer = ask(&envoy, AOAI_HOST).await;
    assert_eq!(answer.status, 401, "the upstream status is kept");
    assert_eq!(answer.header.as_deref(), Some("UpstreamUnauthorized"));
    let error = answer.error();
    let identity = aoai_emulator::Identity::system();
    assert_eq!(
        error["code"], "PermissionDenied",
        "the upstream code is kept"
    );
    assert_eq!(error["diagnosis"], "RoleMissing");
    assert_eq!(error["principal_id"], identity.object_id.as_str());
    assert_eq!(error["client_id"], identity.client_id.as_str());
    assert_eq!(error["identity_resource_id"], identity.resource_id.as_str());
    assert_eq!(
        error["data_action"],
        "Microsoft.CognitiveServices/accounts/OpenAI/deployments/chat/completions/action"
    );
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with("The principal `"),
        "Azure's message comes first: {message}"
    );
    assert!(message.contains("--name myres"), "{message}");
    println!("RoleMissing body: {}", String::from_utf8_lossy(&answer.raw));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_the_wrong_audience_is_explained_from_the_audience_azure_names() {
    // The resource accepts the US Gov audience and says so in its 401; the
    // filter asks for the public one (its default).
    let emulator = Emulator::start(Settings {
        accepted_audience: "https://cognitiveservices.azure.us".into(),
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start("{}", &emulator, 1);
    let answer = ask(&envoy, AOAI_HOST).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.header.as_deref(), Some("UpstreamUnauthorized"));
    let body = answer.json();
    assert_eq!(body["statusCode"], 401, "the gateway's shape stays");
    let error = &body["error"];
    assert_eq!(error["code"], "401");
    assert_eq!(error["diagnosis"], "TokenRejected");
    assert_eq!(
        error["token_audience"],
        "https://cognitiveservices.azure.com"
    );
    assert_eq!(
        error["expected_audience"], "https://cognitiveservices.azure.us",
        "read from Azure's own message, not from the configuration"
    );
    assert_eq!(error["token_replacement"], "requested");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("set resource to \"https://cognitiveservices.azure.us\""),
        "{message}"
    );
    println!(
        "TokenRejected body: {}",
        String::from_utf8_lossy(&answer.raw)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_on_an_unlisted_host_reaches_the_app_exactly_as_azure_sent_it() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start(r#"{"hosts":["myres.openai.azure.com"]}"#, &emulator, 1);
    let answer = ask(&envoy, "other.openai.azure.com").await;
    assert_eq!(answer.status, 403);
    // Not the filter's request: its body and length stay Azure's; only the
    // header says why the filter did not step in (issue 18, item 6).
    assert_eq!(answer.header.as_deref(), Some("HostNotInTargets"));
    assert!(answer.content_length.is_some(), "content-length kept");
    assert_eq!(
        answer.json(),
        serde_json::json!({"error": {"code": "AuthenticationTypeDisabled", "message": "Key based authentication is disabled for this resource."}})
    );
    let seen = emulator.upstream_requests();
    assert_eq!(seen[0].header_values("api-key"), vec!["app-key-123"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_rules_and_regional_endpoints_are_not_called_identity_problems() {
    let emulator = Emulator::start(Settings {
        network_rule_denies: true,
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start("{}", &emulator, 1);
    let answer = ask(&envoy, AOAI_HOST).await;
    assert_eq!(
        (answer.status, answer.header.as_deref()),
        (403, Some("UpstreamForbidden"))
    );
    assert_eq!(answer.error()["diagnosis"], "NetworkRule");
    assert!(answer.error()["message"]
        .as_str()
        .unwrap()
        .contains("not an identity problem"));
    println!("NetworkRule body: {}", String::from_utf8_lossy(&answer.raw));

    let emulator = Emulator::start(Settings::default()).unwrap();
    let regional = "eastus.api.cognitive.microsoft.com";
    let envoy = Envoy::start(&format!(r#"{{"hosts":["{regional}"]}}"#), &emulator, 1);
    let answer = ask(&envoy, regional).await;
    assert_eq!(
        (answer.status, answer.header.as_deref()),
        (400, Some("UpstreamBadRequest"))
    );
    assert_eq!(answer.error()["diagnosis"], "CustomSubdomainRequired");
    assert!(answer.error()["message"]
        .as_str()
        .unwrap()
        .contains("custom subdomain"));
    println!(
        "CustomSubdomainRequired body: {}",
        String::from_utf8_lossy(&answer.raw)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_error_body_is_left_alone_but_still_flagged() {
    let emulator = Emulator::start(Settings {
        role_holders: Default::default(),
        compress_errors: true,
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start("{}", &emulator, 1);
    let answer = ask(&envoy, AOAI_HOST).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.header.as_deref(), Some("UpstreamUnauthorized"));
    let body = String::from_utf8_lossy(&answer.raw);
    assert!(!body.contains("aoai-msi-filter"), "not rewritten: {body}");
    assert!(
        answer.content_length.is_some(),
        "content-length kept for an untouched body"
    );
    let log = envoy.filter_log().join("\n");
    assert!(
        log.contains("diagnosis=RoleMissing"),
        "still logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_failures_logs_one_line_per_diagnosis() {
    let emulator = Emulator::start(Settings {
        role_holders: Default::default(),
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start("{}", &emulator, 1);
    for _ in 0..25 {
        assert_eq!(ask(&envoy, AOAI_HOST).await.status, 401);
    }
    let lines = envoy
        .filter_log()
        .iter()
        .filter(|l| l.contains("diagnosis=RoleMissing"))
        .count();
    assert_eq!(lines, 1, "25 identical failures, one log line");
    let metrics = prometheus(&envoy);
    assert_eq!(
        metric(
            &metrics,
            "aoai_msi_upstream_auth_failures_total{target=\"default\",diagnosis=\"RoleMissing\"}"
        ),
        25.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_fetches_requests_replies_and_rejections() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start("{}", &emulator, 2);
    for _ in 0..5 {
        assert_eq!(ask(&envoy, AOAI_HOST).await.status, 200);
    }
    for _ in 0..3 {
        let passed = client()
            .get(envoy.url("/echo"))
            .header("host", "api.example.com")
            .send()
            .await
            .unwrap();
        assert_eq!(passed.status(), 200);
    }
    emulator.rotate_signing_key().unwrap();
    assert_eq!(ask(&envoy, AOAI_HOST).await.status, 401);
    // The rejected token keeps serving until its one replacement lands.
    let mut rejected = 1;
    loop {
        match ask(&envoy, AOAI_HOST).await.status {
            200 => break,
            401 if rejected < 100 => rejected += 1,
            other => panic!("answered {other} after {rejected} rejections"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = prometheus(&envoy);
    println!("{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "aoai_msi_token_fetches_total{target=\"default\",source=\"imds\",outcome=\"ok\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            "aoai_msi_requests_authorized_total{target=\"default\"}"
        ),
        f64::from(5 + rejected + 1)
    );
    assert_eq!(
        metric(&metrics, "aoai_msi_requests_passed_through_total{}"),
        3.0
    );
    assert_eq!(
        metric(
            &metrics,
            "aoai_msi_token_invalidations_total{target=\"default\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "aoai_msi_upstream_auth_failures_total{target=\"default\",diagnosis=\"TokenRejected\"}"
        ),
        f64::from(rejected)
    );
    assert!(
        metric(
            &metrics,
            "aoai_msi_token_expires_in_seconds{target=\"default\"}"
        ) > 86_000.0
    );

    // Local replies and the waiting gauge: a machine without identity.
    let emulator = Emulator::start(Settings {
        system_identity: None,
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start("{}", &emulator, 2);
    for _ in 0..4 {
        assert_eq!(ask(&envoy, AOAI_HOST).await.status, 401);
    }
    let metrics = prometheus(&envoy);
    assert_eq!(
        metric(
            &metrics,
            "aoai_msi_local_replies_total{target=\"default\",code=\"ManagedIdentityNotFound\"}"
        ),
        4.0
    );
    assert_eq!(
        metric(
            &metrics,
            "aoai_msi_token_fetches_total{target=\"default\",source=\"imds\",outcome=\"status_400\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&metrics, "aoai_msi_requests_waiting{target=\"default\"}"),
        0.0,
        "nobody is left waiting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_key_appears_in_the_filters_log_at_trace_level() {
    let mut logs = Vec::new();
    let mut tokens = Vec::new();
    // Success, refresh, every upstream diagnosis, and local replies.
    let scenarios: Vec<(Settings, &str, &str)> = vec![
        (
            Settings {
                token_lifetime_s: 4,
                ..Settings::default()
            },
            "{}",
            AOAI_HOST,
        ),
        (
            Settings {
                role_holders: Default::default(),
                ..Settings::default()
            },
            "{}",
            AOAI_HOST,
        ),
        (
            Settings::default(),
            r#"{"resource":"https://cognitiveservices.azure.us"}"#,
            AOAI_HOST,
        ),
        (
            Settings::default(),
            r#"{"hosts":["myres.openai.azure.com"]}"#,
            "other.openai.azure.com",
        ),
        (
            Settings {
                network_rule_denies: true,
                ..Settings::default()
            },
            "{}",
            AOAI_HOST,
        ),
        (
            Settings {
                system_identity: None,
                ..Settings::default()
            },
            "{}",
            AOAI_HOST,
        ),
    ];
    for (settings, config, host) in scenarios {
        let emulator = Emulator::start(settings).unwrap();
        let envoy = Envoy::start(config, &emulator, 2);
        for _ in 0..3 {
            let _ = ask(&envoy, host).await;
        }
        if config == "{}" {
            // Let a 4 s token be refreshed at least once.
            tokio::time::sleep(Duration::from_millis(2_500)).await;
            let _ = ask(&envoy, host).await;
        }
        emulator.rotate_signing_key().unwrap();
        let _ = ask(&envoy, host).await;
        tokens.extend(emulator.minted_tokens());
        logs.push(envoy.log());
    }
    assert!(tokens.len() >= 6, "tokens were issued: {}", tokens.len());
    let log = logs.join("\n");
    assert!(log.lines().any(is_filter_line), "the filter did log");
    assert!(
        log.contains("token acquired"),
        "token acquisition is logged at info"
    );
    for token in &tokens {
        // Any 24-character piece of the signature would be a leak.
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            !log.contains(&signature[..24]),
            "a token's signature is in the log"
        );
        let payload = token.split('.').nth(1).unwrap();
        assert!(
            !log.contains(&payload[..24]),
            "a token's payload is in the log"
        );
    }
    assert!(
        !log.contains("app-key-123"),
        "the application's api-key is in the log"
    );
}
