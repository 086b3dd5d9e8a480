//! The Envoy Gateway manifests in envoy/envoy-gateway/ say what the filter and
//! Envoy Gateway expect: both EnvoyExtensionPolicy variants (wasm and the
//! native dynamic module) carry the same configuration, which passes the
//! filter's own parser; every cluster it names is one Envoy Gateway generates
//! for an HTTPRoute rule, `httproute/<namespace>/<route>/rule/<index>`
//! (envoyproxy/gateway internal/gatewayapi/helpers.go, irRouteDestinationName,
//! used as the cluster name by internal/xds/translator/translator.go); the
//! token endpoint is not open to clients; digests are sha256; no secret inline.
#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use aoai_msi_filter::config::Config;
use serde::Deserialize;
use serde_yaml::Value;

fn manifests() -> Vec<(PathBuf, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("envoy/envoy-gateway");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let value =
                    Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                docs.push((path.clone(), value));
            }
        }
    }
    assert!(docs.len() >= 10, "the Envoy Gateway manifests are shipped");
    docs
}

fn of_kind(docs: &[(PathBuf, Value)], kind: &str) -> Vec<Value> {
    docs.iter()
        .filter(|(_, d)| d["kind"] == kind)
        .map(|(_, d)| d.clone())
        .collect()
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn named(docs: &[(PathBuf, Value)], kind: &str, name: &str) -> Value {
    of_kind(docs, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The filter configurations of every EnvoyExtensionPolicy: (variant, JSON).
fn filter_configs(docs: &[(PathBuf, Value)]) -> Vec<(&'static str, serde_json::Value)> {
    let mut configs = Vec::new();
    for policy in of_kind(docs, "EnvoyExtensionPolicy") {
        for wasm in policy["spec"]["wasm"].as_sequence().into_iter().flatten() {
            configs.push(("wasm", serde_json::to_value(&wasm["config"]).unwrap()));
        }
        for module in policy["spec"]["dynamicModule"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            configs.push((
                "dynamicModule",
                serde_json::to_value(&module["config"]).unwrap(),
            ));
        }
    }
    configs
}

/// The configuration parsed by the filter, with the environment the wasm
/// variant passes (`env.hostKeys`); none of this recipe's sources reads any.
fn parse(config: &serde_json::Value) -> Config {
    let lookup = |_: &str| -> Option<String> { None };
    Config::from_value_with_env(config, &lookup)
        .unwrap_or_else(|e| panic!("filter configuration refused: {e}"))
}

/// The cluster Envoy Gateway generates for rule `index` of HTTPRoute `route`.
fn route_cluster(route: &Value, index: usize) -> String {
    format!(
        "httproute/{}/{}/rule/{index}",
        text(&route["metadata"]["namespace"]),
        text(&route["metadata"]["name"])
    )
}

/// Every route-rule cluster with the Backend its single backendRef names:
/// (cluster, route, Backend). A rule with several backendRefs or with
/// backendRef-level filters gets per-backend clusters instead, so the filter
/// must not name it (translator.go, NeedsClusterPerSetting).
fn route_clusters(docs: &[(PathBuf, Value)]) -> Vec<(String, Value, Value)> {
    let mut clusters = Vec::new();
    for route in of_kind(docs, "HTTPRoute") {
        for (index, rule) in route["spec"]["rules"]
            .as_sequence()
            .unwrap()
            .iter()
            .enumerate()
        {
            let refs = rule["backendRefs"].as_sequence().unwrap();
            if refs.len() != 1 || !refs[0]["filters"].is_null() {
                continue;
            }
            let backend_ref = &refs[0];
            assert_eq!(backend_ref["group"], "gateway.envoyproxy.io");
            assert_eq!(backend_ref["kind"], "Backend");
            let backend = named(docs, "Backend", text(&backend_ref["name"]));
            assert_eq!(
                backend["spec"]["endpoints"][0]
                    .as_mapping()
                    .unwrap()
                    .values()
                    .next()
                    .unwrap()["port"],
                backend_ref["port"],
                "the backendRef's port is the Backend's"
            );
            clusters.push((route_cluster(&route, index), route.clone(), backend));
        }
    }
    clusters
}

#[test]
fn the_wasm_and_native_variants_carry_the_same_configuration_the_filter_accepts() {
    let docs = manifests();
    let configs = filter_configs(&docs);
    let wasm: Vec<_> = configs.iter().filter(|(v, _)| *v == "wasm").collect();
    let native: Vec<_> = configs
        .iter()
        .filter(|(v, _)| *v == "dynamicModule")
        .collect();
    assert_eq!(wasm.len(), 1, "one wasm variant");
    assert_eq!(native.len(), 1, "one dynamic module variant");
    assert_eq!(
        wasm[0].1, native[0].1,
        "the native module's filter_config is exactly the wasm plugin's JSON"
    );
    let config = parse(&wasm[0].1);
    assert_eq!(config.targets.len(), 2, "one target per Azure resource");
}

#[test]
fn every_target_is_bound_to_the_cluster_of_its_resources_route() {
    let docs = manifests();
    let clusters = route_clusters(&docs);
    for (variant, json) in filter_configs(&docs) {
        let config = parse(&json);
        for target in &config.targets {
            assert_eq!(
                target.clusters.len(),
                1,
                "{variant} {}: the token follows Envoy Gateway's routing, never the Host header alone",
                target.name
            );
            let cluster = &target.clusters[0];
            let (_, route, backend) = clusters
                .iter()
                .find(|(name, _, _)| name == cluster)
                .unwrap_or_else(|| panic!("{variant}: {cluster} is no route-rule cluster"));
            // The route's Backend is an Azure OpenAI FQDN on 443 with TLS that
            // checks that name.
            let fqdn = &backend["spec"]["endpoints"][0]["fqdn"];
            let host = text(&fqdn["hostname"]);
            assert!(host.ends_with(".openai.azure.com"), "{host}");
            assert_eq!(fqdn["port"].as_u64(), Some(443));
            let tls = of_kind(&docs, "BackendTLSPolicy")
                .into_iter()
                .find(|p| {
                    p["spec"]["targetRefs"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .any(|r| r["kind"] == "Backend" && r["name"] == backend["metadata"]["name"])
                })
                .unwrap_or_else(|| panic!("a BackendTLSPolicy for {host}"));
            assert_eq!(tls["spec"]["validation"]["hostname"], host);
            assert_eq!(
                tls["spec"]["validation"]["wellKnownCACertificates"],
                "System"
            );
            // Azure gets its own name as Host, whatever the app sent.
            let rewrite = route["spec"]["rules"][0]["filters"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|f| f["type"] == "URLRewrite")
                .expect("a Host rewrite");
            assert_eq!(rewrite["urlRewrite"]["hostname"], host);
            // The policy runs the filter on that route.
            let attached = of_kind(&docs, "EnvoyExtensionPolicy").iter().all(|p| {
                p["spec"]["targetRefs"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .any(|r| r["kind"] == "HTTPRoute" && r["name"] == route["metadata"]["name"])
            });
            assert!(attached, "both variants attach to {cluster}'s route");
        }
    }
}

#[test]
fn every_token_call_goes_to_a_backend_cluster_no_client_can_use() {
    let docs = manifests();
    let clusters = route_clusters(&docs);
    let mut checked = 0;
    for (variant, json) in filter_configs(&docs) {
        let config = parse(&json);
        for token in &config.tokens {
            let cluster = token.source.cluster();
            let (_, route, backend) = clusters
                .iter()
                .find(|(name, _, _)| name == cluster)
                .unwrap_or_else(|| {
                    panic!("{variant}: token calls go to {cluster}, no route-rule cluster")
                });
            assert_eq!(
                backend["spec"]["endpoints"][0]["ip"]["address"],
                "169.254.169.254"
            );
            assert_eq!(
                backend["spec"]["endpoints"][0]["ip"]["port"].as_u64(),
                Some(80)
            );
            // Clients are denied on the route, and IMDS would refuse them anyway:
            // the route removes the Metadata header it requires.
            let route_name = &route["metadata"]["name"];
            let denied = of_kind(&docs, "SecurityPolicy").iter().any(|p| {
                p["spec"]["authorization"]["defaultAction"] == "Deny"
                    && p["spec"]["authorization"]["rules"].is_null()
                    && p["spec"]["targetRefs"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .any(|r| r["kind"] == "HTTPRoute" && r["name"] == *route_name)
            });
            assert!(
                denied,
                "a SecurityPolicy denies every client on {cluster}'s route"
            );
            let strips = route["spec"]["rules"][0]["filters"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|f| {
                    f["requestHeaderModifier"]["remove"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .any(|h| h == "Metadata")
                });
            assert!(strips, "the IMDS route strips the Metadata header");
            // And the filter never runs on it.
            for policy in of_kind(&docs, "EnvoyExtensionPolicy") {
                for r in policy["spec"]["targetRefs"].as_sequence().unwrap() {
                    assert_ne!(r["name"], *route_name);
                    assert_ne!(
                        r["kind"], "Gateway",
                        "the filter targets routes, not the Gateway"
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 2);
}

#[test]
fn route_cluster_names_are_not_renamed_by_merged_backends() {
    let docs = manifests();
    for proxy in of_kind(&docs, "EnvoyProxy") {
        // v1.9: with mergeBackends, clusters are "<kind>/<ns>/<name>/<port>…"
        // (internal/gatewayapi/helpers.go, irBackendClusterName).
        assert!(proxy["spec"]["mergeBackends"].is_null());
    }
    let gateway = named(&docs, "Gateway", "aoai-gateway");
    let parameters = &gateway["spec"]["infrastructure"]["parametersRef"];
    assert_eq!(parameters["kind"], "EnvoyProxy");
    named(&docs, "EnvoyProxy", text(&parameters["name"]));
    assert!(route_clusters(&docs).len() >= 3);
}

#[test]
fn the_gateway_is_reachable_only_inside_the_cluster() {
    let docs = manifests();
    let proxy = named(&docs, "EnvoyProxy", "aoai-gateway");
    assert_eq!(
        proxy["spec"]["provider"]["kubernetes"]["envoyService"]["type"], "ClusterIP",
        "a LoadBalancer would hand the identity's tokens to anyone who reaches it"
    );
}

#[test]
fn the_native_module_is_registered_under_the_name_the_policy_uses() {
    let docs = manifests();
    let proxy = named(&docs, "EnvoyProxy", "aoai-gateway");
    // The module's ABI is Envoy 1.40.0's.
    let image =
        text(&proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]["image"]);
    assert!(image.ends_with(":distroless-v1.40.0"), "{image}");
    let registered: Vec<&str> = proxy["spec"]["dynamicModules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| text(&m["name"]))
        .collect();
    let mut modules = 0;
    for policy in of_kind(&docs, "EnvoyExtensionPolicy") {
        for module in policy["spec"]["dynamicModule"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            assert!(registered.contains(&text(&module["name"])));
            assert_eq!(module["filterName"], "aoai-msi", "Envoy's filter_name");
            modules += 1;
        }
    }
    assert_eq!(modules, 1);
}

fn is_sha256_hex(value: &Value) -> bool {
    value.as_str().is_some_and(|s| {
        s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[test]
fn every_artifact_is_pinned_by_a_sha256_digest() {
    let docs = manifests();
    let mut digests = 0;
    for policy in of_kind(&docs, "EnvoyExtensionPolicy") {
        for wasm in policy["spec"]["wasm"].as_sequence().into_iter().flatten() {
            let code = &wasm["code"];
            let source = match text(&code["type"]) {
                "HTTP" => &code["http"],
                "Image" => &code["image"],
                other => panic!("code type {other}"),
            };
            assert!(is_sha256_hex(&source["sha256"]), "{:?}", source["sha256"]);
            assert_eq!(
                wasm["failOpen"].as_bool(),
                Some(false),
                "never on without the filter"
            );
            digests += 1;
        }
    }
    for proxy in of_kind(&docs, "EnvoyProxy") {
        for module in proxy["spec"]["dynamicModules"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            if module["source"]["type"] == "Remote" {
                assert!(is_sha256_hex(&module["source"]["remote"]["sha256"]));
                digests += 1;
            }
        }
    }
    assert!(is_sha256_hex(&Value::from("a".repeat(64))));
    assert!(!is_sha256_hex(&Value::from("A".repeat(64))));
    assert_eq!(digests, 2);
}

#[test]
fn no_secret_is_written_into_a_manifest() {
    let docs = manifests();
    for (path, doc) in &docs {
        assert_ne!(doc["kind"], "Secret", "{}", path.display());
    }
    for (variant, json) in filter_configs(&docs) {
        let text = json.to_string();
        assert!(
            !text.contains("client_secret\""),
            "{variant}: a secret in the filter configuration"
        );
        assert!(
            !text.contains("eyJ"),
            "{variant}: a token in the filter configuration"
        );
    }
    for policy in of_kind(&docs, "EnvoyExtensionPolicy") {
        for wasm in policy["spec"]["wasm"].as_sequence().into_iter().flatten() {
            // Only names of the proxy's environment variables, never values.
            for key in wasm["env"]["hostKeys"].as_sequence().into_iter().flatten() {
                assert!(key.is_string());
            }
        }
    }
}
