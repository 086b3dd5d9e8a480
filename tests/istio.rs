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

/// A stand-in value for each variable a token source may read.
fn stand_in(name: &str) -> String {
    match name {
        "IDENTITY_ENDPOINT" => "http://localhost:42356/msi/token".to_owned(),
        "AZURE_TENANT_ID" => "72f988bf-0000-4000-8000-00000000e1a0".to_owned(),
        "AZURE_CLIENT_ID" => "c11e0000-0000-4000-8000-0000000000aa".to_owned(),
        "AZURE_AUTHORITY_HOST" => "https://login.microsoftonline.com/".to_owned(),
        _ => format!("stand-in value of {name}"),
    }
}

/// A WasmPlugin's configuration, parsed by the filter with exactly the
/// environment its `vmConfig.env` gives the VM: a variable the token source
/// needs but the recipe does not pass fails here, as it would in the mesh.
fn plugin_config(plugin: &Value) -> Config {
    let mut env = std::collections::HashMap::new();
    for entry in plugin["spec"]["vmConfig"]["env"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        let name = text(&entry["name"]).to_owned();
        let value = match entry["valueFrom"].as_str() {
            Some("HOST") => stand_in(&name),
            _ => text(&entry["value"]).to_owned(),
        };
        env.insert(name, value);
    }
    let lookup = |name: &str| env.get(name).cloned();
    let json: serde_json::Value = serde_json::to_value(&plugin["spec"]["pluginConfig"]).unwrap();
    Config::from_value_with_env(&json, &lookup).unwrap_or_else(|e| {
        panic!(
            "pluginConfig of {} refused: {e}",
            text(&plugin["metadata"]["name"])
        )
    })
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
        let config = plugin_config(&plugin);
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
fn every_token_call_goes_to_a_cluster_the_mesh_defines() {
    let docs = manifests();
    let entries = of_kind(&docs, "ServiceEntry");
    let imds = entries
        .iter()
        .find(|e| e["spec"]["endpoints"][0]["address"] == "169.254.169.254")
        .expect("a ServiceEntry for IMDS");
    assert_eq!(
        text(&imds["spec"]["resolution"]),
        "STATIC",
        "IMDS has a static endpoint, not DNS"
    );
    let imds_port = imds["spec"]["ports"][0]["number"].as_u64().unwrap();
    assert_eq!(imds_port, 80);
    let safe = tls_originated_hosts(&docs);
    // Clusters EnvoyFilters add, by namespace.
    let added: Vec<(String, String)> = of_kind(&docs, "EnvoyFilter")
        .iter()
        .flat_map(|f| {
            let namespace = text(&f["metadata"]["namespace"]).to_owned();
            f["spec"]["configPatches"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter(|p| p["applyTo"] == "CLUSTER" && p["patch"]["operation"] == "ADD")
                .map(move |p| {
                    (
                        namespace.clone(),
                        text(&p["patch"]["value"]["name"]).to_owned(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    for plugin in of_kind(&docs, "WasmPlugin") {
        let namespace = text(&plugin["metadata"]["namespace"]);
        let config = plugin_config(&plugin);
        for token in &config.tokens {
            let mut clusters = vec![token.source.cluster().to_owned()];
            if let aoai_msi_filter::source::Source::WorkloadIdentity(s) = &token.source {
                clusters.push(s.assertion_cluster.clone());
            }
            for cluster in clusters {
                let by_filter = added
                    .iter()
                    .any(|(ns, name)| ns == namespace && *name == cluster);
                let imds_cluster = cluster == istio_cluster(imds, imds_port);
                // Entra and friends: only with TLS the sidecar originates.
                let tls = cluster
                    .strip_prefix("outbound|80||")
                    .is_some_and(|host| safe.iter().any(|h| h == host));
                assert!(
                    by_filter || imds_cluster || tls,
                    "{namespace}: token calls go to {cluster}, which no ServiceEntry with TLS (or EnvoyFilter) defines"
                );
            }
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
        let config = plugin_config(&plugin);
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
        let config = plugin_config(&plugin);
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
fn secrets_reach_the_filter_from_the_proxys_environment_never_from_plugin_config() {
    for plugin in of_kind(&manifests(), "WasmPlugin") {
        let config =
            serde_json::to_string(&serde_json::to_value(&plugin["spec"]["pluginConfig"]).unwrap())
                .unwrap();
        assert!(
            !config.contains("client_secret\""),
            "no secret in pluginConfig: {config}"
        );
        for entry in plugin["spec"]["vmConfig"]["env"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            if text(&entry["name"]).contains("SECRET") {
                assert_eq!(
                    entry["valueFrom"], "HOST",
                    "a secret comes from the proxy's environment"
                );
            }
        }
    }
}

#[test]
fn the_token_file_listener_serves_the_file_the_pod_mounts_into_the_proxy() {
    let docs = manifests();
    for filter in of_kind(&docs, "EnvoyFilter") {
        let namespace = &filter["metadata"]["namespace"];
        for patch in filter["spec"]["configPatches"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            if patch["applyTo"] != "LISTENER" {
                continue;
            }
            let route = &patch["patch"]["value"]["filter_chains"][0]["filters"][0]["typed_config"]
                ["route_config"]["virtual_hosts"][0]["routes"][0];
            let file = text(&route["direct_response"]["body"]["filename"]);
            let watched = text(&route["direct_response"]["body"]["watched_directory"]["path"]);
            assert!(
                file.starts_with(watched),
                "{file} is in {watched}: rotation is seen"
            );
            let job = of_kind(&docs, "Job")
                .into_iter()
                .find(|j| j["metadata"]["namespace"] == *namespace)
                .expect("the recipe's workload");
            let proxy = job["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "istio-proxy")
                .expect("an istio-proxy container merged into the sidecar");
            let mounted = proxy["volumeMounts"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|m| m["mountPath"] == watched && m["name"] == "azure-identity-token");
            assert!(
                mounted,
                "istio-proxy mounts the projected token at {watched}"
            );
            assert_eq!(
                job["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"],
                "true"
            );
        }
    }
}

#[test]
fn every_example_app_calls_a_host_its_namespace_routes_and_its_plugin_selects() {
    let docs = manifests();
    let jobs = of_kind(&docs, "Job");
    assert!(jobs.len() >= 3, "one example per recipe");
    for app in jobs {
        let namespace = &app["metadata"]["namespace"];
        let script = text(&app["spec"]["template"]["spec"]["containers"][0]["args"][0]);
        let endpoint = script
            .split("azure_endpoint=\"http://")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("the example's azure_endpoint");
        let routed = of_kind(&docs, "ServiceEntry").iter().any(|e| {
            e["metadata"]["namespace"] == *namespace && text(&e["spec"]["hosts"][0]) == endpoint
        });
        assert!(routed, "{endpoint} has a ServiceEntry in {namespace:?}");
        let label = &app["spec"]["template"]["metadata"]["labels"]["app"];
        let selected = of_kind(&docs, "WasmPlugin").iter().any(|p| {
            p["metadata"]["namespace"] == *namespace
                && p["spec"]["selector"]["matchLabels"]["app"] == *label
        });
        assert!(
            selected,
            "a WasmPlugin selects app {label:?} in {namespace:?}"
        );
    }
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
