//! The Istio manifests in envoy/istio/ say what the filter and Istio expect:
//! every pluginConfig passes the filter's own parser, and the clusters it
//! names are the ones Istio generates from the ServiceEntries.
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
    assert!(docs.len() >= 5, "the Istio manifests are shipped");
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
        assert!(!config.hosts.patterns().is_empty());
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
        assert_eq!(config.imds().cluster, istio_cluster(&imds, port));
    }
}

#[test]
fn the_sidecar_originates_tls_for_every_azure_openai_host_the_filter_serves() {
    let docs = manifests();
    let plugin = &of_kind(&docs, "WasmPlugin")[0];
    let json: serde_json::Value = serde_json::to_value(&plugin["spec"]["pluginConfig"]).unwrap();
    let config = Config::from_value(&json).unwrap();
    let rules = of_kind(&docs, "DestinationRule");
    let entries: Vec<Value> = of_kind(&docs, "ServiceEntry")
        .into_iter()
        .filter(|e| config.hosts.matches(text(&e["spec"]["hosts"][0])))
        .collect();
    assert!(!entries.is_empty(), "an Azure OpenAI ServiceEntry");
    for entry in entries {
        let host = text(&entry["spec"]["hosts"][0]);
        let port = &entry["spec"]["ports"][0];
        assert_eq!(
            text(&port["protocol"]),
            "HTTP",
            "{host}: the app speaks HTTP so the filter sees headers"
        );
        assert_eq!(
            port["targetPort"].as_u64(),
            Some(443),
            "{host}: sent on to 443"
        );
        let rule = rules
            .iter()
            .find(|r| r["spec"]["host"] == host)
            .unwrap_or_else(|| panic!("a DestinationRule for {host}"));
        let tls = &rule["spec"]["trafficPolicy"]["portLevelSettings"][0];
        assert_eq!(tls["port"]["number"].as_u64(), port["number"].as_u64());
        assert_eq!(
            text(&tls["tls"]["mode"]),
            "SIMPLE",
            "{host}: TLS originated by the sidecar"
        );
        assert_eq!(text(&tls["tls"]["sni"]), host);
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
