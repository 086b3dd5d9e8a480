//! The Istio manifests in envoy/istio/ say what the filter and Istio expect:
//! every pluginConfig passes the filter's own parser, the clusters it names
//! are the ones Istio generates from the ServiceEntries, and every host it
//! gives a token to is one the mesh routes with TLS, never PassthroughCluster.
#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use aoai_msi_filter::config::Config;
use serde::Deserialize;
use serde_yaml::Value;

fn manifests() -> Vec<(PathBuf, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("envoy/istio");
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
    assert!(docs.len() >= 6, "the Istio manifests are shipped");
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

/// The cluster Istio generates for a ServiceEntry port.
fn istio_cluster(entry: &Value, port: u64) -> String {
    format!("outbound|{port}||{}", text(&entry["spec"]["hosts"][0]))
}

#[test]
fn every_plugin_config_is_accepted_by_the_filters_parser() {
    let docs = manifests();
    let plugins = of_kind(&docs, "WasmPlugin");
    assert!(!plugins.is_empty());
    for plugin in plugins {
        let json: serde_json::Value =
            serde_json::to_value(&plugin["spec"]["pluginConfig"]).unwrap();
        let config =
            Config::from_value(&json).unwrap_or_else(|e| panic!("pluginConfig refused: {e}"));
        assert_eq!(text(&plugin["spec"]["type"]), "HTTP");
        assert_eq!(
            text(&plugin["spec"]["match"][0]["mode"]),
            "CLIENT",
            "outbound side"
        );
        assert!(!config.targets.is_empty());
    }
}

#[test]
fn the_token_cluster_is_the_one_istio_generates_for_the_imds_service_entry() {
    let docs = manifests();
    let imds = of_kind(&docs, "ServiceEntry")
        .into_iter()
        .find(|e| e["spec"]["endpoints"][0]["address"] == "169.254.169.254")
        .expect("a ServiceEntry for IMDS");
    assert_eq!(
        text(&imds["spec"]["resolution"]),
        "STATIC",
        "IMDS has a static endpoint, not DNS"
    );
    let port = imds["spec"]["ports"][0]["number"].as_u64().unwrap();
    assert_eq!(port, 80);
    for plugin in of_kind(&docs, "WasmPlugin") {
        let json: serde_json::Value =
            serde_json::to_value(&plugin["spec"]["pluginConfig"]).unwrap();
        let config = Config::from_value(&json).unwrap();
        for token in &config.tokens {
            assert_eq!(token.imds().cluster, istio_cluster(&imds, port));
        }
    }
}

/// The hosts of ServiceEntries whose HTTP port the sidecar sends on to 443
/// with TLS it originates itself (SNI = the host).
fn tls_originated_hosts(docs: &[(PathBuf, Value)]) -> Vec<String> {
    let rules = of_kind(docs, "DestinationRule");
    let mut hosts = Vec::new();
    for entry in of_kind(docs, "ServiceEntry") {
        let Some(port) = entry["spec"]["ports"].as_sequence().and_then(|p| p.first()) else {
            continue;
        };
        if port["protocol"] != "HTTP" || port["targetPort"].as_u64() != Some(443) {
            continue;
        }
        for host in entry["spec"]["hosts"].as_sequence().into_iter().flatten() {
            let host = text(host);
            let originates_tls = rules.iter().any(|r| {
                r["spec"]["host"] == host
                    && r["spec"]["trafficPolicy"]["portLevelSettings"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .any(|p| {
                            p["port"]["number"].as_u64() == port["number"].as_u64()
                                && p["tls"]["mode"] == "SIMPLE"
                                && p["tls"]["sni"] == host
                        })
            });
            if originates_tls {
                hosts.push(host.to_owned());
            }
        }
    }
    hosts
}

#[test]
fn every_host_the_filter_serves_is_one_the_mesh_routes_with_tls() {
    let docs = manifests();
    let safe = tls_originated_hosts(&docs);
    assert!(
        !safe.is_empty(),
        "an Azure OpenAI ServiceEntry with TLS origination"
    );
    for plugin in of_kind(&docs, "WasmPlugin") {
        let json: serde_json::Value =
            serde_json::to_value(&plugin["spec"]["pluginConfig"]).unwrap();
        let config = Config::from_value(&json).unwrap();
        for pattern in config.targets.iter().flat_map(|t| t.hosts.patterns()) {
            // A wildcard also matches hosts no ServiceEntry covers: under the
            // mesh's ALLOW_ANY those leave in plain HTTP through PassthroughCluster.
            let pattern = pattern.to_string();
            assert!(
                safe.contains(&pattern),
                "the filter serves {pattern}, which no TLS-originating ServiceEntry routes: \
                 its token could leave in cleartext (safe hosts: {safe:?})"
            );
        }
    }
}

#[test]
fn every_target_is_bound_to_the_cluster_istio_generates_for_its_tls_host() {
    let docs = manifests();
    let entries = of_kind(&docs, "ServiceEntry");
    let safe = tls_originated_hosts(&docs);
    for plugin in of_kind(&docs, "WasmPlugin") {
        let json: serde_json::Value =
            serde_json::to_value(&plugin["spec"]["pluginConfig"]).unwrap();
        let config = Config::from_value(&json).unwrap();
        for target in &config.targets {
            assert!(
                !target.clusters.is_empty(),
                "{}: the token follows Istio's routing, never the Host header alone",
                target.name
            );
            for cluster in &target.clusters {
                // outbound|<port>||<host>
                let (port, host) = cluster
                    .strip_prefix("outbound|")
                    .and_then(|rest| rest.split_once("||"))
                    .unwrap_or_else(|| panic!("{cluster} is not an Istio outbound cluster"));
                assert!(
                    safe.iter().any(|h| h == host),
                    "{cluster}: {host} is not routed with TLS"
                );
                let entry = entries
                    .iter()
                    .find(|e| e["spec"]["hosts"][0] == host)
                    .unwrap_or_else(|| panic!("no ServiceEntry for {host}"));
                assert_eq!(istio_cluster(entry, port.parse().unwrap()), *cluster);
            }
        }
    }
}

#[test]
fn the_plugins_namespace_refuses_hosts_without_a_service_entry() {
    let docs = manifests();
    let sidecars = of_kind(&docs, "Sidecar");
    for plugin in of_kind(&docs, "WasmPlugin") {
        let namespace = &plugin["metadata"]["namespace"];
        assert!(
            sidecars
                .iter()
                .any(|s| s["metadata"]["namespace"] == *namespace
                    && s["spec"]["workloadSelector"].is_null()
                    && s["spec"]["outboundTrafficPolicy"]["mode"] == "REGISTRY_ONLY"),
            "a namespace-wide Sidecar with outboundTrafficPolicy REGISTRY_ONLY in {namespace:?}"
        );
    }
}

#[test]
fn a_vm_that_fails_is_replaced_not_left_failing() {
    for plugin in of_kind(&manifests(), "WasmPlugin") {
        assert_eq!(text(&plugin["spec"]["failStrategy"]), "FAIL_RELOAD");
    }
}

#[test]
fn the_example_app_calls_a_host_the_mesh_and_the_filter_both_know() {
    let docs = manifests();
    let app = of_kind(&docs, "Job").pop().expect("an example workload");
    let script = text(&app["spec"]["template"]["spec"]["containers"][0]["args"][0]);
    let endpoint = script
        .split("azure_endpoint=\"http://")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the example's azure_endpoint");
    let hosts: Vec<String> = of_kind(&docs, "ServiceEntry")
        .iter()
        .map(|e| text(&e["spec"]["hosts"][0]).to_owned())
        .collect();
    assert!(
        hosts.iter().any(|h| h == endpoint),
        "{endpoint} has a ServiceEntry"
    );
    assert_eq!(
        app["spec"]["template"]["metadata"]["labels"]["app"],
        "my-app"
    );
}

#[test]
fn the_oci_recipe_follows_istios_wasm_image_convention() {
    let dockerfile =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
            .unwrap();
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        instructions,
        ["FROM scratch", "COPY dist/plugin.wasm ./plugin.wasm"]
    );
}
