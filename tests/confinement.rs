//! End to end: the credential goes only where Envoy routes it, nothing secret
//! is echoed, and what a user needs to hear reaches them — in a real Envoy
//! 1.40, with listeners the test controls standing where a token must never
//! arrive (each is an emulator that records every request it receives).
#![cfg(not(target_arch = "wasm32"))]
// Test helpers: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use aoai_emulator::Identity;
use support::*;

const CHAT: &str = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21";

/// Bearer JWTs (the filter's tokens) among these requests.
fn bearer_jwts(requests: &[UpstreamRequest]) -> usize {
    requests
        .iter()
        .filter(|r| {
            r.header_values("authorization")
                .iter()
                .any(|v| v.starts_with("Bearer eyJ"))
        })
        .count()
}

/// An Envoy with the filter (`config`, plus `plugin_extra` YAML fields), one
/// virtual host for every domain with `routes` (YAML list items), and
/// `clusters` (YAML list items) besides `azure_imds` on the emulator.
fn envoy_yaml(
    config: &str,
    plugin_extra: &str,
    routes: &str,
    clusters: &str,
    imds_port: u16,
) -> String {
    envoy_yaml_with(&wasm(), config, plugin_extra, routes, clusters, imds_port)
}

/// As [`envoy_yaml`], with `module` in place of the filter under test (the
/// filter's build under test when `module` is [`wasm()`]).
fn envoy_yaml_with(
    module: &std::path::Path,
    config: &str,
    plugin_extra: &str,
    routes: &str,
    clusters: &str,
    imds_port: u16,
) -> String {
    let indent = |text: &str, by: usize| {
        text.lines()
            .map(|l| format!("{}{l}\n", " ".repeat(by)))
            .collect::<String>()
    };
    let imds_extra = if native() {
        strip_xff_yaml()
    } else {
        String::new()
    };
    format!(
        r#"{stats}{runtime}admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: app
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: e2e
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes}          http_filters:
{filter}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{clusters}  - name: azure_imds
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: azure_imds
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {imds_port} }} }} }}
{imds_extra}"#,
        stats = stats_tags_yaml(),
        runtime = runtime_yaml(),
        routes = indent(routes, 14),
        filter = filter_yaml(module, plugin_extra.trim_end(), config, &[]),
        clusters = indent(clusters, 2),
    )
}

/// A STATIC cluster named `name` on 127.0.0.1:`port`.
fn cluster(name: &str, port: u16) -> String {
    format!(
        "- name: {name}\n  type: STATIC\n  connect_timeout: 1s\n  load_assignment:\n    cluster_name: {name}\n    endpoints:\n    - lb_endpoints:\n      - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}\n"
    )
}

/// One HTTP/1.1 request written byte for byte (no client library resolves
/// its dot segments): (status, headers and body as text).
fn raw_request(envoy: &Envoy, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(envoy.listener).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response)
}

// ------------------------------------------------------ where the token goes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_without_clusters_never_lends_a_token_to_a_destination_the_client_picks() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    // Where the client steers the request: it must never see a token.
    let elsewhere = Emulator::start(Settings::default()).unwrap();
    // Istio's PassthroughCluster, with the header steering Envoy allows.
    let passthrough = "- name: PassthroughCluster\n  type: ORIGINAL_DST\n  connect_timeout: 1s\n  lb_policy: CLUSTER_PROVIDED\n  original_dst_lb_config: { use_http_header: true }\n";
    let yaml = envoy_yaml(
        "{}",
        "",
        "- match: { prefix: \"/\" }\n  route: { cluster: PassthroughCluster, timeout: 30s }\n",
        passthrough,
        emulator.port(),
    );
    let envoy = Envoy::start_yaml(&yaml, 1);
    let client = client();
    let response = post_to(&client, &envoy, AOAI_HOST, CHAT)
        .header("x-envoy-original-dst-host", elsewhere.addr().to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let diagnosis = response
        .headers()
        .get("x-aoai-msi-diagnosis")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.text().await.unwrap();
    let seen = elsewhere.upstream_requests();
    println!(
        "steered to {}: status {status}, diagnosis {diagnosis:?}, {} request(s) arrived there",
        elsewhere.addr(),
        seen.len()
    );
    assert_eq!(
        seen.len(),
        1,
        "the request went where the client steered it"
    );
    assert_eq!(
        bearer_jwts(&seen),
        0,
        "no token at a destination the client picked"
    );
    assert_eq!(
        seen[0].header_values("api-key"),
        ["app-key-123"],
        "untouched: its own key, as without the filter"
    );
    // Azure (here the steered-to emulator) refuses the key; the answer says why.
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("AuthenticationTypeDisabled"), "{body}");
    assert_eq!(diagnosis.as_deref(), Some("ClientChosenDestination"));
    assert!(
        envoy
            .filter_log()
            .iter()
            .any(|l| l.contains("client picks")),
        "the near miss is logged:\n{}",
        envoy.filter_log().join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_resolves_outside_its_scope_gets_no_credential() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let config = format!(r#"{{"targets":[{{"hosts":["{AOAI_HOST}"],"paths":["/openai/"]}}]}}"#);
    let yaml = envoy_yaml(
        &config,
        "",
        "- match: { prefix: \"/\" }\n  route: { cluster: upstream, timeout: 30s }\n",
        &cluster("upstream", emulator.port()),
        emulator.port(),
    );
    let envoy = Envoy::start_yaml(&yaml, 1);
    // A request inside the scope gets the token (the control).
    let (status, _) = raw_request(
        &envoy,
        &format!("GET /openai/v1/models HTTP/1.1\r\nHost: {AOAI_HOST}\r\napi-key: app-key-123\r\nConnection: close\r\n\r\n"),
    );
    assert_ne!(status, 0);
    let escapes = [
        "/openai/../internal/admin",
        "/openai/./../internal/admin",
        "/openai/%2e%2e/internal/admin",
        "/openai/%2E./internal/admin",
    ];
    for path in escapes {
        raw_request(
            &envoy,
            &format!("GET {path} HTTP/1.1\r\nHost: {AOAI_HOST}\r\napi-key: app-key-123\r\nConnection: close\r\n\r\n"),
        );
    }
    let seen = emulator.upstream_requests();
    for r in &seen {
        println!(
            "upstream saw {} {}, bearer: {}",
            r.method,
            r.path,
            bearer_jwts(std::slice::from_ref(r))
        );
    }
    let inside: Vec<&UpstreamRequest> = seen
        .iter()
        .filter(|r| r.path == "/openai/v1/models")
        .collect();
    assert_eq!(inside.len(), 1);
    assert_eq!(bearer_jwts(&[inside[0].clone()]), 1, "in scope: the token");
    for path in escapes {
        let arrived: Vec<UpstreamRequest> =
            seen.iter().filter(|r| r.path == path).cloned().collect();
        assert_eq!(arrived.len(), 1, "{path} went upstream as sent");
        assert_eq!(bearer_jwts(&arrived), 0, "{path} left the scope: no token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_re_routes_after_the_filters_writes_and_a_proxy_wasm_filter_cannot_see_it_before() {
    // Evidence for what the filter can and cannot do in Envoy 1.40: the
    // probe reads the routed cluster, removes api-key (a proxy-wasm 0.2.1
    // write clears the route cache), reads it again, and passes both on.
    let aoai = Emulator::start(Settings::default()).unwrap();
    let other = Emulator::start(Settings::default()).unwrap();
    let yaml = envoy_yaml_with(
        &probe_wasm(),
        "remove cluster",
        "",
        "- match: { prefix: \"/\", headers: [{ name: api-key, present_match: true }] }\n  route: { cluster: aoai, timeout: 30s }\n- match: { prefix: \"/\" }\n  route: { cluster: other, timeout: 30s }\n",
        &format!("{}{}", cluster("aoai", aoai.port()), cluster("other", other.port())),
        aoai.port(),
    );
    let envoy = Envoy::start_yaml(&yaml, 1);
    let _ = send_to(&envoy, AOAI_HOST, CHAT).await;
    let seen = other.upstream_requests();
    assert_eq!(aoai.upstream_requests().len(), 0);
    assert_eq!(
        seen.len(),
        1,
        "the re-match sent it to the route without api-key"
    );
    assert_eq!(seen[0].header_values("x-probe-cluster-before"), ["aoai"]);
    assert_eq!(
        seen[0].header_values("x-probe-cluster-after"),
        ["aoai"],
        "after the write the filter still reads the cluster it checked: the re-match is invisible until the router runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_whose_requests_are_re_routed_after_the_rewrite_is_refused_from_then_on() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let other = Emulator::start(Settings::default()).unwrap();
    let config = format!(r#"{{"targets":[{{"hosts":["{AOAI_HOST}"],"clusters":["aoai"]}}]}}"#);
    let yaml = envoy_yaml(
        &config,
        "",
        "- match: { prefix: \"/\", headers: [{ name: api-key, present_match: true }] }\n  route: { cluster: aoai, timeout: 30s }\n- match: { prefix: \"/\" }\n  route: { cluster: other, timeout: 30s }\n",
        &format!("{}{}", cluster("aoai", emulator.port()), cluster("other", other.port())),
        emulator.port(),
    );
    let envoy = Envoy::start_yaml(&yaml, 1);
    let client = client();
    let mut answers = Vec::new();
    for _ in 0..5 {
        let response = chat(&client, &envoy, AOAI_HOST, "hi").send().await.unwrap();
        let diagnosis = response
            .headers()
            .get("x-aoai-msi-diagnosis")
            .map(|v| v.to_str().unwrap().to_owned());
        answers.push((
            response.status().as_u16(),
            diagnosis,
            response.text().await.unwrap(),
        ));
    }
    let leaked = bearer_jwts(&other.upstream_requests());
    println!(
        "answers: {:?}",
        answers.iter().map(|(s, d, _)| (s, d)).collect::<Vec<_>>()
    );
    println!("requests that reached the unchecked cluster with a token: {leaked}");
    if native() {
        // The native module never clears Envoy's route cache: the route the
        // filter checked (it read the routed cluster before writing) stays,
        // so every request goes where it was checked and nothing is re-routed.
        assert_eq!(leaked, 0, "nothing reached the unchecked cluster");
        assert!(other.upstream_requests().is_empty());
        for (status, diagnosis, body) in &answers {
            assert_eq!(*status, 200, "{body}");
            assert_eq!(diagnosis.as_deref(), None, "{body}");
        }
        let seen = emulator.upstream_requests();
        assert_eq!(seen.len(), 5);
        assert!(seen.iter().all(|r| r.verdict == Verdict::Ok));
        assert!(!prometheus(&envoy).contains("aoai_msi_route_changes_total"));
        return;
    }
    // The first is already on its way when Envoy's router picks the other
    // cluster (proxy-wasm sees no re-match before it, see the test above);
    // it is detected on its answer, and nothing of that target leaves again.
    assert_eq!(leaked, 1, "only the request that revealed the re-route");
    assert_eq!(answers[0].1.as_deref(), Some("RouteChangedAfterRewrite"));
    for (status, diagnosis, body) in &answers[1..] {
        assert_eq!(*status, 500, "{body}");
        assert_eq!(diagnosis.as_deref(), Some("RouteChangedAfterRewrite"));
        assert!(
            body.contains("\"other\"") && body.contains("\"aoai\""),
            "{body}"
        );
    }
    assert_eq!(emulator.upstream_requests().len(), 0);
    let metrics = prometheus(&envoy);
    assert_eq!(
        metric(
            &metrics,
            "aoai_msi_route_changes_total{target=\"target-0\"}"
        ),
        1.0
    );
    assert!(envoy
        .filter_log()
        .iter()
        .any(|l| l.contains("error") && l.contains("\"other\"")));
}

// ------------------------------------------------------------ what is echoed

#[test]
fn a_secret_pasted_into_a_name_field_never_reaches_envoys_output() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "Xy8Q~Zq3.abcDEF_ghiJKL-mnoPQRstuVWXyz0123";
    let pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----";
    let cases = [
        format!(
            r#"{{"token_source":{{"type":"client_credentials","tenant_id":"t1","client_id":"c1","client_secret_env":{}}}}}"#,
            serde_json::to_string(secret).unwrap()
        ),
        format!(
            r#"{{"token_source":{{"type":"client_credentials","tenant_id":"t1","client_id":"c1","client_certificate_env":{}}}}}"#,
            serde_json::to_string(pem).unwrap()
        ),
        format!(
            r#"{{"resource":{}}}"#,
            serde_json::to_string(secret).unwrap()
        ),
        format!(
            r#"{{"targets":[{{"name":{},"hosts":["a.openai.azure.com"]}}]}}"#,
            serde_json::to_string(secret).unwrap()
        ),
    ];
    for (i, config) in cases.iter().enumerate() {
        let path = write_envoy_config(&dir, &format!("case{i}.yaml"), config);
        let (passed, output) = validate(&path);
        assert!(!passed, "case {i} must be refused");
        assert!(output.contains("invalid plugin configuration"), "{output}");
        for tell in ["abcDEF_ghiJKL", "MIIEvQIBADAN"] {
            assert!(
                !output.contains(tell),
                "case {i} repeated the pasted value:\n{output}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_of_a_token_service_path_is_never_shown() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    // An Azure Function's access code in the query; the emulator has no such
    // path, so the service refuses and the diagnosis names the path.
    let config = format!(
        r#"{{"hosts":["{AOAI_HOST}"],"token_source":{{"type":"http","cluster":"keys","path":"/keyservice/key?code=FUNCTIONCODE0123456789"}}}}"#
    );
    let yaml = envoy_yaml(
        &config,
        "",
        "- match: { prefix: \"/\" }\n  route: { cluster: upstream, timeout: 30s }\n",
        &format!(
            "{}{}",
            cluster("upstream", emulator.port()),
            cluster("keys", emulator.port())
        ),
        emulator.port(),
    );
    let envoy = Envoy::start_yaml(&yaml, 1);
    let (status, body) = send_to(&envoy, AOAI_HOST, CHAT).await;
    println!("{status} {body}");
    assert!(status >= 400, "{body}");
    assert!(!body.contains("FUNCTIONCODE"), "{body}");
    let log = envoy.log();
    assert!(log.contains("/keyservice/key?…"), "the log names the path");
    assert!(!log.contains("FUNCTIONCODE"), "the code is in no log line");
    let metrics = prometheus(&envoy);
    assert!(!metrics.contains("FUNCTIONCODE"));
}

// ------------------------------------------------- the hint users need most

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_for_an_azure_host_no_target_lists_says_why_and_keeps_azures_body() {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let yaml = envoy_yaml(
        r#"{"hosts":["east.openai.azure.com"]}"#,
        "",
        "- match: { prefix: \"/\" }\n  route: { cluster: upstream, timeout: 30s }\n",
        &cluster("upstream", emulator.port()),
        emulator.port(),
    );
    let envoy = Envoy::start_yaml(&yaml, 1);
    let client = client();
    let response = post_to(&client, &envoy, "west.openai.azure.com", CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    assert_eq!(
        response.headers().get("x-aoai-msi-diagnosis").unwrap(),
        "HostNotInTargets"
    );
    let body = response.text().await.unwrap();
    assert_eq!(
        body,
        r#"{"error":{"code":"AuthenticationTypeDisabled","message":"Key based authentication is disabled for this resource."}}"#,
        "Azure's body, untouched"
    );
    // A host that is not Azure's: not ours, no header.
    let response = post_to(&client, &envoy, "api.example.com", CHAT)
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("x-aoai-msi-diagnosis").is_none());
    let seen = emulator.upstream_requests();
    assert_eq!(bearer_jwts(&seen), 0);
}

// ----------------------------------------------------- under load and odd protocols

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_thousand_requests_parked_on_one_worker_leave_others_unaffected() {
    let emulator = Emulator::start(Settings {
        imds_delay_ms: 12_000,
        ..Settings::default()
    })
    .unwrap();
    let yaml = envoy_yaml(
        r#"{"token_wait_timeout_ms": 60000, "token_source": {"timeout_ms": 30000}}"#,
        "",
        "- match: { prefix: \"/\" }\n  route: { cluster: upstream, timeout: 60s }\n",
        // The emulator takes a few dozen connections at a time: Envoy
        // queues the 5000 released requests for it.
        &format!(
            "{}  circuit_breakers: {{ thresholds: [{{ max_connections: 32, max_pending_requests: 10000, max_requests: 10000 }}] }}\n",
            cluster("upstream", emulator.port())
        ),
        emulator.port(),
    );
    let envoy = Envoy::start_yaml(&yaml, 1);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(6000)
        .build()
        .unwrap();
    let unrelated = |client: reqwest::Client, url: String| async move {
        let started = Instant::now();
        let response = client
            .get(url)
            .header("host", "api.example.com")
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), started.elapsed())
    };
    let (_, idle) = unrelated(client.clone(), envoy.url("/other")).await;
    let mut parked = tokio::task::JoinSet::new();
    // Enough that resuming them all in one VM entry overflowed V8's stack
    // (from about 2 500) and that per-request bookkeeping linear in the
    // number held would show.
    let n: usize = 5000;
    for _ in 0..n {
        let request = chat(&client, &envoy, AOAI_HOST, "hi");
        parked.spawn(async move {
            match request.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let body = r.text().await.unwrap_or_default();
                    match status {
                        200 => "200".to_owned(),
                        _ => format!("{status} {}", body.chars().take(100).collect::<String>()),
                    }
                }
                Err(e) => format!("{e:?}").chars().take(120).collect(),
            }
        });
    }
    // Wait until the worker holds them all.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut waiting = 0.0;
    while Instant::now() < deadline {
        let text = prometheus(&envoy);
        waiting = metric(&text, "aoai_msi_requests_waiting{target=\"default\"}");
        if waiting >= n as f64 {
            break;
        }
    }
    let (status, busy) = unrelated(client.clone(), envoy.url("/other")).await;
    println!(
        "{waiting} parked: an unrelated request took {:.1} ms (with none parked {:.1} ms)",
        busy.as_secs_f64() * 1000.0,
        idle.as_secs_f64() * 1000.0
    );
    assert_eq!(waiting, n as f64, "every request is held on the one worker");
    assert_ne!(
        status, 0,
        "the unrelated request was answered while they waited"
    );
    let mut outcomes = std::collections::BTreeMap::new();
    while let Some(done) = parked.join_next().await {
        *outcomes.entry(done.unwrap()).or_insert(0) += 1;
    }
    println!("outcomes of the parked requests: {outcomes:?}");
    assert_eq!(
        outcomes.get("200"),
        Some(&n),
        "every parked request got the token"
    );
    assert_eq!(emulator.imds_requests().len(), 1, "one token call for all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_do_not_release_a_request_that_waits_for_its_token() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    let emulator = Emulator::start(Settings {
        imds_delay_ms: 1_500,
        ..Settings::default()
    })
    .unwrap();
    let yaml = envoy_yaml(
        "{}",
        "allow_on_headers_stop_iteration: true\n",
        "- match: { prefix: \"/\" }\n  route: { cluster: upstream, timeout: 30s }\n",
        &format!(
            "{}  typed_extension_protocol_options:\n    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n      \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n      explicit_http_config: {{ http_protocol_options: {{ enable_trailers: true }} }}\n",
            cluster("upstream", emulator.port())
        ),
        emulator.port(),
    );
    let envoy = Envoy::start_yaml(&yaml, 1);
    let stream = tokio::net::TcpStream::connect(envoy.listener)
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("x-checksum", "abc".parse().unwrap());
    let body = Full::new(Bytes::from_static(
        br#"{"messages":[{"role":"user","content":"hi"}]}"#,
    ))
    .with_trailers(Box::pin(async move {
        Some(Ok::<_, std::convert::Infallible>(trailers))
    }));
    let request = hyper::Request::post(format!("http://{AOAI_HOST}{CHAT}"))
        .header("api-key", "app-key-123")
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let started = Instant::now();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    println!(
        "{status} after {:.2} s: {}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&body)
    );
    let seen = emulator.upstream_requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        bearer_jwts(&seen),
        1,
        "it left with the token, after the wait"
    );
    assert!(
        seen[0].header_values("api-key").is_empty(),
        "and without its key"
    );
    assert_eq!(status, 200);
}

// ------------------------------------------------------------ shipped recipes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_egress_gateway_lends_its_identities_only_to_known_callers() {
    let identity = Identity {
        client_id: "00000000-0000-0000-0000-00000000000a".into(),
        ..Identity::user("gateway-a", 10)
    };
    let emulator = Emulator::start(Settings {
        user_identities: vec![identity.clone()],
        role_holders: [identity.object_id.clone()].into(),
        ..Settings::default()
    })
    .unwrap();
    let envoy = Envoy::start_full(
        &shipped_config_on("egress-gateway.yaml", &emulator),
        1,
        &[],
        &[("GOV_SP_SECRET", "stand-in-gov-secret")],
    );
    let host = "myres-eastus.openai.azure.com";
    let client = client();
    let send = |key: Option<&str>| {
        let mut request = client
            .post(envoy.url(CHAT))
            .header("host", host)
            .header("content-type", "application/json")
            .body(r#"{"messages":[{"role":"user","content":"hi"}]}"#);
        if let Some(key) = key {
            request = request.header("api-key", key);
        }
        request.send()
    };
    for (key, code) in [
        (None, "ClientKeyRequired"),
        (Some("a-key-nobody-was-given"), "ClientKeyUnknown"),
        (Some("app-key-123"), "ClientKeyUnknown"),
    ] {
        let response = send(key).await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "{key:?}");
        assert_eq!(response.headers()["x-aoai-msi-diagnosis"], code, "{key:?}");
    }
    assert!(
        emulator.upstream_requests().is_empty(),
        "nothing of an unknown caller reaches Azure"
    );
    // The example key the shipped hash belongs to gets through, with the
    // gateway's identity and no key.
    let response = send(Some("gateway-key-team-a-EXAMPLE-replace-me"))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let seen = emulator.upstream_requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].token_oid.as_deref(),
        Some(identity.object_id.as_str())
    );
    assert!(seen[0].header_values("api-key").is_empty());
}
