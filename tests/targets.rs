//! End to end: many targets behind one filter, each credential bound to
//! where Envoy really routes the request — in a real Envoy, against the
//! emulator (whose data plane checks the audience each host and path takes).
#![cfg(not(target_arch = "wasm32"))]
// Test helpers: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;

use aoai_emulator::{
    Identity, AI_RESOURCE, CHINA_RESOURCE, ML_RESOURCE, RESOURCE, US_GOV_RESOURCE,
};
use support::*;

const CHAT: &str = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21";

/// Requests the emulator received for `host`.
fn seen_by_host(emulator: &Emulator, host: &str) -> Vec<UpstreamRequest> {
    emulator
        .upstream_requests()
        .into_iter()
        .filter(|r| r.host == host)
        .collect()
}

/// Does any bearer token (a JWT) appear on these requests?
fn any_bearer_jwt(requests: &[UpstreamRequest]) -> bool {
    requests.iter().any(|r| {
        r.header_values("authorization")
            .iter()
            .any(|v| v.starts_with("Bearer eyJ"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_targets_with_their_own_identities_and_audiences_never_see_each_others_token() {
    let (a, b) = (Identity::user("chat", 1), Identity::user("scoring", 2));
    let emulator = Emulator::start(Settings {
        system_identity: None,
        user_identities: vec![a.clone(), b.clone()],
        role_holders: [a.object_id.clone(), b.object_id.clone()].into(),
        imds_delay_ms: 300,
        ..Settings::default()
    })
    .unwrap();
    let (chat_host, score_host) = ("east.openai.azure.com", "ep.eastus.inference.ml.azure.com");
    let config = format!(
        r#"{{"targets":[
            {{"name":"chat","hosts":["{chat_host}"],"clusters":["east"],
              "token_source":{{"client_id":"{}"}}}},
            {{"name":"scoring","hosts":["*.inference.ml.azure.com"],"clusters":["ml"],
              "token_source":{{"client_id":"{}"}}}}]}}"#,
        a.client_id, b.client_id
    );
    let yaml = routed_envoy_yaml(
        &config,
        "",
        &[
            VirtualHost {
                name: "east",
                domains: &[chat_host],
                routes: &[("/", "east")],
            },
            VirtualHost {
                name: "ml",
                domains: &[score_host],
                routes: &[("/", "ml")],
            },
        ],
        &[
            ("east", emulator.port()),
            ("ml", emulator.port()),
            ("azure_imds", emulator.port()),
        ],
    );
    let envoy = Envoy::start_yaml(&yaml, 4);
    // A cold burst on both targets at once, over 4 workers.
    let client = client();
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..60 {
        let (host, path) = if i % 2 == 0 {
            (chat_host, CHAT)
        } else {
            (score_host, "/score")
        };
        let request = post_to(&client, &envoy, host, path);
        burst.spawn(async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        });
    }
    while let Some(done) = burst.join_next().await {
        let (status, body) = done.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let calls: Vec<(Option<String>, Option<String>)> = emulator
        .imds_requests()
        .iter()
        .map(|r| {
            (
                r.query.get("client_id").cloned(),
                r.query.get("resource").cloned(),
            )
        })
        .collect();
    println!("cold burst of 60 over two targets and 4 workers: token calls {calls:?}");
    assert_eq!(calls.len(), 2, "one token call per target: {calls:?}");
    assert!(calls.contains(&(Some(a.client_id.clone()), Some(RESOURCE.to_owned()))));
    assert!(calls.contains(&(Some(b.client_id.clone()), Some(ML_RESOURCE.to_owned()))));
    for (host, oid, audience) in [
        (chat_host, &a.object_id, RESOURCE),
        (score_host, &b.object_id, ML_RESOURCE),
    ] {
        let seen = seen_by_host(&emulator, host);
        assert_eq!(seen.len(), 30, "{host}");
        for request in &seen {
            assert_eq!(request.verdict, Verdict::Ok, "{host}");
            assert_eq!(
                request.token_oid.as_ref(),
                Some(oid),
                "{host} sees only its own identity"
            );
            assert_eq!(request.token_aud.as_deref(), Some(audience), "{host}");
            assert!(request.header_values("api-key").is_empty());
        }
    }
    let metrics = prometheus(&envoy);
    for target in ["chat", "scoring"] {
        assert_eq!(
            metric(
                &metrics,
                &format!("aoai_msi_requests_authorized_total{{target=\"{target}\"}}")
            ),
            30.0
        );
        assert_eq!(
            metric(
                &metrics,
                &format!("aoai_msi_token_fetches_total{{target=\"{target}\",source=\"imds\",outcome=\"ok\"}}")
            ),
            1.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audiences_default_by_cloud_and_service_and_foundry_project_paths_get_theirs() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let config = r#"{"targets":[
        {"name":"gov","hosts":["*.openai.azure.us"]},
        {"name":"china","hosts":["*.openai.azure.cn"]},
        {"name":"scoring","hosts":["*.inference.ml.azure.com"]},
        {"name":"projects","hosts":["*.services.ai.azure.com"],"paths":["/api/projects/"]},
        {"name":"default"}]}"#;
    let envoy = Envoy::start(config, &emulator, 2);
    let cases = [
        ("myres.openai.azure.us", CHAT, US_GOV_RESOURCE),
        ("myres.openai.azure.cn", CHAT, CHINA_RESOURCE),
        (
            "ep.westeurope.inference.ml.azure.com",
            "/score",
            ML_RESOURCE,
        ),
        (
            "acct.services.ai.azure.com",
            "/api/projects/p1/threads",
            AI_RESOURCE,
        ),
        ("acct.services.ai.azure.com", CHAT, RESOURCE),
        ("myres.openai.azure.com", CHAT, RESOURCE),
    ];
    for (host, path, audience) in cases {
        let (status, body) = send_to(&envoy, host, path).await;
        assert_eq!(status, 200, "{host}{path}: {body}");
        let last = emulator.upstream_requests().pop().unwrap();
        assert_eq!(last.token_aud.as_deref(), Some(audience), "{host}{path}");
        assert_eq!(last.verdict, Verdict::Ok);
    }
    let asked: BTreeMap<String, usize> =
        emulator
            .imds_requests()
            .iter()
            .fold(BTreeMap::new(), |mut m, r| {
                *m.entry(r.query.get("resource").cloned().unwrap_or_default())
                    .or_default() += 1;
                m
            });
    println!("token calls by resource: {asked:?}");
    assert_eq!(asked.len(), 5, "five audiences, one token each: {asked:?}");
    assert!(asked.values().all(|n| *n == 1), "{asked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_config_gives_foundry_projects_their_own_token() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let envoy = Envoy::start("{}", &emulator, 2);
    let (status, body) = send_to(
        &envoy,
        "acct.services.ai.azure.com",
        "/api/projects/p1/agents",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        emulator.upstream_requests()[0].token_aud.as_deref(),
        Some(AI_RESOURCE)
    );
    let (status, _) = send_to(&envoy, "acct.services.ai.azure.com", CHAT).await;
    assert_eq!(status, 200);
    assert_eq!(
        emulator.upstream_requests()[1].token_aud.as_deref(),
        Some(RESOURCE)
    );
}

/// An Envoy whose virtual host for `myres.openai.azure.com` goes to the Azure
/// cluster, with a catch-all virtual host that goes somewhere else.
fn with_catch_all(
    filter_config: &str,
    hcm_extra: &str,
    azure: &Emulator,
    elsewhere: &Emulator,
) -> Envoy {
    let yaml = routed_envoy_yaml(
        filter_config,
        hcm_extra,
        &[
            VirtualHost {
                name: "azure",
                domains: &["myres.openai.azure.com"],
                routes: &[("/other/", "elsewhere"), ("/", "aoai")],
            },
            VirtualHost {
                name: "catch_all",
                domains: &["*"],
                routes: &[("/", "elsewhere")],
            },
        ],
        &[
            ("aoai", azure.port()),
            ("elsewhere", elsewhere.port()),
            ("azure_imds", azure.port()),
        ],
    );
    Envoy::start_yaml(&yaml, 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_spelling_that_envoy_routes_to_a_catch_all_never_carries_a_token() {
    for config in [
        "{}",
        r#"{"targets":[{"hosts":["*.openai.azure.com"],"clusters":["aoai"]}]}"#,
    ] {
        let azure = Emulator::start(Settings::default()).unwrap();
        let elsewhere = Emulator::start(Settings::default()).unwrap();
        let envoy = with_catch_all(config, "", &azure, &elsewhere);
        // The bare name is routed to Azure and gets the token.
        assert_eq!(send_to(&envoy, "myres.openai.azure.com", CHAT).await.0, 200);
        // With a port, Envoy's default matching sends it to the catch-all
        // (another emulator, which refuses the key it got: 403).
        let (status, _) = send_to(&envoy, "myres.openai.azure.com:443", CHAT).await;
        assert_eq!(status, 403);
        let leaked = elsewhere.upstream_requests();
        assert_eq!(leaked.len(), 1, "{config}: routed elsewhere");
        assert!(
            !any_bearer_jwt(&leaked),
            "{config}: the token went elsewhere: {:?}",
            leaked[0].headers
        );
        assert_eq!(
            leaked[0].header_values("api-key"),
            vec!["app-key-123"],
            "untouched"
        );
        if config == "{}" {
            let log = envoy.filter_log().join("\n");
            assert!(
                log.contains("request to myres.openai.azure.com:443 matched no target"),
                "the near miss is explained:\n{log}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailing_dot_spelling_never_carries_a_token_even_where_ports_are_ignored() {
    let azure = Emulator::start(Settings::default()).unwrap();
    let elsewhere = Emulator::start(Settings::default()).unwrap();
    // Envoy strips ports before routing (and in the header the filter sees).
    let envoy = with_catch_all("{}", "strip_any_host_port: true", &azure, &elsewhere);
    let (status, _) = send_to(&envoy, "myres.openai.azure.com.", CHAT).await;
    assert_eq!(status, 403, "the catch-all refused the key it got");
    assert_eq!(
        elsewhere.upstream_requests().len(),
        1,
        "the dot spelling went to the catch-all"
    );
    assert!(
        !any_bearer_jwt(&elsewhere.upstream_requests()),
        "no token went with it"
    );
    // With ports ignored, Envoy and the filter agree: the port spelling is Azure's.
    let (status, body) = send_to(&envoy, "myres.openai.azure.com:443", CHAT).await;
    assert_eq!(status, 200, "{body}");
    let azure_seen = azure.upstream_requests();
    assert_eq!(azure_seen.last().map(|r| r.verdict), Some(Verdict::Ok));
    assert_eq!(elsewhere.upstream_requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_bind_a_target_to_where_envoy_routes_whatever_the_host() {
    let azure = Emulator::start(Settings::default()).unwrap();
    let elsewhere = Emulator::start(Settings::default()).unwrap();
    let envoy = with_catch_all(
        r#"{"targets":[{"name":"myres","hosts":["*.openai.azure.com"],"clusters":["aoai"]}]}"#,
        "",
        &azure,
        &elsewhere,
    );
    // Same host, a path Envoy routes to another cluster: no token.
    let (status, _) = send_to(&envoy, "myres.openai.azure.com", "/other/x").await;
    assert_eq!(status, 200);
    let other = elsewhere.upstream_requests();
    assert_eq!(other.len(), 1);
    assert!(!any_bearer_jwt(&other));
    assert_eq!(other[0].header_values("api-key"), vec!["app-key-123"]);
    // And the Azure route does get it.
    assert_eq!(send_to(&envoy, "myres.openai.azure.com", CHAT).await.0, 200);
    assert_eq!(azure.upstream_requests()[0].verdict, Verdict::Ok);
    let metrics = prometheus(&envoy);
    assert_eq!(
        metric(
            &metrics,
            "aoai_msi_requests_authorized_total{target=\"myres\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&metrics, "aoai_msi_requests_passed_through_total{}"),
        1.0
    );
}
