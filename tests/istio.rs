//! The Istio manifests in envoy/istio/ say what the filter and Istio expect:
//! every pluginConfig passes the filter's own parser, the clusters it names
//! are the ones Istio generates from the ServiceEntries, and every host it
//! gives a token to is one the mesh routes with TLS, never PassthroughCluster.
//! Sidecar recipes select pods (`selector`, mode CLIENT, clusters
//! `outbound|<port>||<host>`); the ambient recipe attaches to a waypoint
//! (`targetRefs`, clusters `inbound-vip|<port>|http|<host>` of the services
//! bound to it: istio/istio pilot/pkg/networking/core/cluster_waypoint.go,
//! buildWaypointInboundVIP, named by model.BuildSubsetKey).
#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use aoai_msi_filter::config::Config;
use serde::Deserialize;
use serde_yaml::Value;

fn manifests() -> Vec<(PathBuf, Value)> {
    // The recipes, and the example workloads kept apart from them.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("envoy/istio");
    let mut docs = Vec::new();
    let files = std::fs::read_dir(&dir)
        .unwrap()
        .chain(std::fs::read_dir(dir.join("examples")).unwrap());
    for entry in files {
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
    docs.sort_by(|a, b| a.0.cmp(&b.0));
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

/// The cluster a waypoint generates for the HTTP port of a service bound to
/// it: `inbound-vip|<port>|http|<host>` (cluster_waypoint.go,
/// buildWaypointInboundVIPCluster; listener_waypoint.go routes to the same name).
fn waypoint_cluster(host: &str, port: u64) -> String {
    format!("inbound-vip|{port}|http|{host}")
}

/// The waypoint (a Gateway of class istio-waypoint) a WasmPlugin or
/// EnvoyFilter attaches to with `targetRefs`; None for a sidecar recipe.
fn waypoint_of(policy: &Value) -> Option<String> {
    policy["spec"]["targetRefs"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|r| r["kind"] == "Gateway" && r["group"] == "gateway.networking.k8s.io")
        .map(|r| text(&r["name"]).to_owned())
}

/// The waypoint Gateway `name` in `namespace`.
fn waypoint_gateway(docs: &[(PathBuf, Value)], namespace: &Value, name: &str) -> Value {
    of_kind(docs, "Gateway")
        .into_iter()
        .find(|g| g["metadata"]["namespace"] == *namespace && g["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no Gateway {name} in {namespace:?}"))
}

/// The clusters of TLS-originated services bound to waypoint `waypoint` in
/// `namespace` (label istio.io/use-waypoint): only these reach a waypoint.
fn waypoint_tls_clusters(
    docs: &[(PathBuf, Value)],
    namespace: &Value,
    waypoint: &str,
) -> Vec<String> {
    let safe = tls_originated_hosts(docs);
    let mut clusters = Vec::new();
    for entry in of_kind(docs, "ServiceEntry") {
        if entry["metadata"]["namespace"] != *namespace
            || entry["metadata"]["labels"]["istio.io/use-waypoint"] != waypoint
        {
            continue;
        }
        for host in entry["spec"]["hosts"].as_sequence().into_iter().flatten() {
            let host = text(host);
            if !safe.iter().any(|h| h == host) {
                continue;
            }
            for port in entry["spec"]["ports"].as_sequence().into_iter().flatten() {
                if port["protocol"] == "HTTP" {
                    clusters.push(waypoint_cluster(host, port["number"].as_u64().unwrap()));
                }
            }
        }
    }
    clusters
}

/// The clusters EnvoyFilters add to the proxies a plugin runs in: the pods it
/// selects, or its waypoint. A waypoint takes a CLUSTER ADD only with context
/// SIDECAR_INBOUND (pilot/pkg/networking/core/envoyfilter/cluster_patch.go,
/// InsertedClusters: without a context, only sidecar outbound and gateways).
fn clusters_added_for(docs: &[(PathBuf, Value)], plugin: &Value) -> Vec<String> {
    let namespace = &plugin["metadata"]["namespace"];
    let waypoint = waypoint_of(plugin);
    let mut added = Vec::new();
    for filter in of_kind(docs, "EnvoyFilter") {
        if filter["metadata"]["namespace"] != *namespace {
            continue;
        }
        let applies = match &waypoint {
            Some(w) => waypoint_of(&filter).as_deref() == Some(w.as_str()),
            None => {
                filter["spec"]["targetRefs"].is_null()
                    && (filter["spec"]["workloadSelector"].is_null()
                        || filter["spec"]["workloadSelector"]["labels"]
                            == plugin["spec"]["selector"]["matchLabels"])
            }
        };
        if !applies {
            continue;
        }
        for patch in filter["spec"]["configPatches"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            if patch["applyTo"] != "CLUSTER" || patch["patch"]["operation"] != "ADD" {
                continue;
            }
            if waypoint.is_some() && patch["match"]["context"] != "SIDECAR_INBOUND" {
                continue;
            }
            added.push(text(&patch["patch"]["value"]["name"]).to_owned());
        }
    }
    added
}

#[test]
fn every_plugin_config_is_accepted_by_the_filters_parser() {
    let docs = manifests();
    let plugins = of_kind(&docs, "WasmPlugin");
    assert!(!plugins.is_empty());
    for plugin in plugins {
        let config = plugin_config(&plugin);
        assert_eq!(text(&plugin["spec"]["type"]), "HTTP");
        if waypoint_of(&plugin).is_some() {
            // A waypoint builds its HTTP filters as listener class
            // SidecarInbound (mode SERVER): a CLIENT match never attaches there
            // (listener_waypoint.go, buildWaypointHTTPFilters).
            for m in plugin["spec"]["match"].as_sequence().into_iter().flatten() {
                assert_ne!(m["mode"], "CLIENT", "a waypoint plugin is never CLIENT");
            }
        } else {
            assert_eq!(
                text(&plugin["spec"]["match"][0]["mode"]),
                "CLIENT",
                "outbound side"
            );
        }
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
    let mut checked = 0;
    for plugin in of_kind(&docs, "WasmPlugin") {
        let namespace = &plugin["metadata"]["namespace"];
        let config = plugin_config(&plugin);
        let added = clusters_added_for(&docs, &plugin);
        let waypoint = waypoint_of(&plugin);
        for token in &config.tokens {
            let mut clusters = vec![token.source.cluster().to_owned()];
            if let aoai_msi_filter::source::Source::WorkloadIdentity(s) = &token.source {
                clusters.push(s.assertion_cluster.clone());
            }
            for cluster in clusters {
                let by_filter = added.contains(&cluster);
                let by_mesh = match &waypoint {
                    // A sidecar: IMDS, or Entra and friends with TLS the sidecar originates.
                    None => {
                        cluster == istio_cluster(imds, imds_port)
                            || cluster
                                .strip_prefix("outbound|80||")
                                .is_some_and(|host| safe.iter().any(|h| h == host))
                    }
                    // A waypoint has clusters only for services bound to it.
                    Some(w) => waypoint_tls_clusters(&docs, namespace, w).contains(&cluster),
                };
                assert!(
                    by_filter || by_mesh,
                    "{namespace:?}: token calls go to {cluster}, which no ServiceEntry with TLS (or EnvoyFilter) gives that proxy"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 5, "every recipe's token clusters were checked");
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
        let waypoint = waypoint_of(&plugin);
        for target in &config.targets {
            assert!(
                !target.clusters.is_empty(),
                "{}: the token follows Istio's routing, never the Host header alone",
                target.name
            );
            if let Some(w) = &waypoint {
                let bound = waypoint_tls_clusters(&docs, &plugin["metadata"]["namespace"], w);
                for cluster in &target.clusters {
                    assert!(
                        bound.contains(cluster),
                        "{cluster} is not a TLS service bound to waypoint {w} (its clusters: {bound:?})"
                    );
                }
                continue;
            }
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
    // Ambient pods have no sidecar (the Sidecar resource does not apply to
    // them); a waypoint only ever sees services bound to it.
    for plugin in of_kind(&docs, "WasmPlugin")
        .into_iter()
        .filter(|p| waypoint_of(p).is_none())
    {
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
            if let Some(waypoint) = waypoint_of(&filter) {
                // The webhook mounts the token into the waypoint pod itself, at
                // its TokenFileMountPath/TokenFilePathName.
                assert_eq!(
                    patch["match"]["context"], "SIDECAR_INBOUND",
                    "a waypoint patches its listeners in context SIDECAR_INBOUND"
                );
                assert_eq!(file, "/var/run/secrets/azure/tokens/azure-identity-token");
                let gateway = waypoint_gateway(&docs, namespace, &waypoint);
                assert_eq!(
                    gateway["spec"]["infrastructure"]["labels"]["azure.workload.identity/use"],
                    "true",
                    "the webhook mutates the waypoint pod"
                );
                continue;
            }
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
        let ambient = of_kind(&docs, "Namespace").iter().any(|n| {
            n["metadata"]["name"] == *namespace
                && n["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"
        });
        let selected = of_kind(&docs, "WasmPlugin").iter().any(|p| {
            p["metadata"]["namespace"] == *namespace
                && match waypoint_of(p) {
                    // Ambient: the endpoint's ServiceEntry uses the plugin's waypoint.
                    Some(w) => {
                        ambient
                            && of_kind(&docs, "ServiceEntry").iter().any(|e| {
                                e["metadata"]["namespace"] == *namespace
                                    && text(&e["spec"]["hosts"][0]) == endpoint
                                    && e["metadata"]["labels"]["istio.io/use-waypoint"] == w
                            })
                    }
                    None => p["spec"]["selector"]["matchLabels"]["app"] == *label,
                }
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

/// Ports Istio's proxies and ztunnel listen on themselves.
const ISTIO_RESERVED_PORTS: [u64; 10] = [
    15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090,
];

/// Every port number in a document: keys that hold one in Kubernetes, Istio
/// and Envoy config (`port_value`, `number`, `port`, `targetPort`,
/// `containerPort`), at any depth, with the path that leads to it.
fn port_numbers(value: &Value, path: &str, out: &mut Vec<(String, u64)>) {
    match value {
        Value::Mapping(map) => {
            for (key, child) in map {
                let key = key.as_str().unwrap_or_default();
                let here = format!("{path}/{key}");
                if matches!(
                    key,
                    "port_value" | "number" | "port" | "targetPort" | "containerPort"
                ) {
                    if let Some(n) = child.as_u64() {
                        out.push((here.clone(), n));
                    }
                }
                port_numbers(child, &here, out);
            }
        }
        Value::Sequence(items) => {
            for (i, child) in items.iter().enumerate() {
                port_numbers(child, &format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn no_manifest_puts_a_listener_or_port_on_one_istio_reserves() {
    let docs = manifests();
    let mut offenders = Vec::new();
    let mut seen = 0;
    for (path, doc) in &docs {
        let mut ports = Vec::new();
        port_numbers(doc, "", &mut ports);
        for (at, port) in ports {
            seen += 1;
            // The waypoint's own HBONE listener is Istio's port, declared as
            // Istio requires it (class istio-waypoint, protocol HBONE, 15008).
            let waypoint_hbone = doc["kind"] == "Gateway"
                && doc["spec"]["gatewayClassName"] == "istio-waypoint"
                && at.starts_with("/spec/listeners/")
                && port == 15008
                && doc["spec"]["listeners"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .any(|l| l["port"].as_u64() == Some(15008) && l["protocol"] == "HBONE");
            if ISTIO_RESERVED_PORTS.contains(&port) && !waypoint_hbone {
                offenders.push(format!(
                    "{} {} {}{at} = {port}",
                    path.file_name().unwrap().to_string_lossy(),
                    text(&doc["kind"]),
                    text(&doc["metadata"]["name"]),
                ));
            }
        }
    }
    assert!(seen > 20, "the walk finds the manifests' ports");
    assert!(
        offenders.is_empty(),
        "ports Istio reserves for itself ({ISTIO_RESERVED_PORTS:?}): {offenders:#?}"
    );
}

#[test]
fn the_waypoint_runs_the_filter_as_its_own_workload_identity() {
    let docs = manifests();
    let plugins: Vec<Value> = of_kind(&docs, "WasmPlugin")
        .into_iter()
        .filter(|p| waypoint_of(p).is_some())
        .collect();
    assert!(
        !plugins.is_empty(),
        "the ambient recipe ships a waypoint plugin"
    );
    for plugin in plugins {
        let namespace = &plugin["metadata"]["namespace"];
        let name = waypoint_of(&plugin).unwrap();
        assert!(
            plugin["spec"]["selector"].is_null(),
            "waypoints never use a selector: only targetRefs attach"
        );
        let gateway = waypoint_gateway(&docs, namespace, &name);
        assert_eq!(gateway["spec"]["gatewayClassName"], "istio-waypoint");
        let listener = &gateway["spec"]["listeners"][0];
        assert_eq!(listener["port"].as_u64(), Some(15008));
        assert_eq!(listener["protocol"], "HBONE");
        // The labels reach the waypoint pod and its ServiceAccount, the
        // annotations the ServiceAccount (Istio's waypoint template).
        let infrastructure = &gateway["spec"]["infrastructure"];
        assert_eq!(
            infrastructure["labels"]["azure.workload.identity/use"],
            "true"
        );
        assert!(infrastructure["annotations"]["azure.workload.identity/client-id"].is_string());
        // The webhook's variables reach the VM from the proxy's environment.
        let config = plugin_config(&plugin);
        for token in &config.tokens {
            assert!(
                matches!(
                    token.source,
                    aoai_msi_filter::source::Source::WorkloadIdentity(_)
                ),
                "the waypoint's identity is its workload identity"
            );
        }
        let passed: Vec<&str> = plugin["spec"]["vmConfig"]["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|e| {
                assert_eq!(e["valueFrom"], "HOST");
                text(&e["name"])
            })
            .collect();
        for variable in ["AZURE_CLIENT_ID", "AZURE_TENANT_ID"] {
            assert!(passed.contains(&variable), "{variable} reaches the VM");
        }
        // Every service bound to the waypoint is in the plugin's namespace.
        assert!(!waypoint_tls_clusters(&docs, namespace, &name).is_empty());
    }
}

#[test]
fn every_secret_comes_from_a_kubernetes_secret_never_from_a_manifest() {
    let docs = manifests();
    for (path, doc) in &docs {
        assert_ne!(
            doc["kind"],
            "Secret",
            "{}: no Secret is shipped with its value",
            path.display()
        );
        let containers = doc["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .cloned()
            .unwrap_or_default();
        for container in containers {
            for entry in container["env"].as_sequence().into_iter().flatten() {
                let name = text(&entry["name"]);
                if name.contains("SECRET") || name.contains("CERTIFICATE") {
                    assert!(
                        entry["valueFrom"]["secretKeyRef"].is_mapping(),
                        "{}: {name} comes from a Kubernetes Secret",
                        path.display()
                    );
                    assert!(entry["value"].is_null());
                }
            }
        }
        // A waypoint's pod template is Istio's: what it carries comes from the
        // Gateway, which holds ids (client id), never a credential.
        for (key, _) in doc["spec"]["infrastructure"]["annotations"]
            .as_mapping()
            .into_iter()
            .flatten()
        {
            let key = key.as_str().unwrap();
            assert!(
                !key.contains("secret") && !key.contains("key"),
                "{key}: no credential in a Gateway's annotations"
            );
        }
    }
}

#[test]
fn imds_is_reachable_only_from_the_namespaces_whose_plugin_uses_it() {
    let docs = manifests();
    let imds_entries: Vec<Value> = of_kind(&docs, "ServiceEntry")
        .into_iter()
        .filter(|e| {
            e["spec"]["endpoints"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|ep| ep["address"] == "169.254.169.254")
        })
        .collect();
    assert!(!imds_entries.is_empty(), "the IMDS recipe is shipped");
    for entry in &imds_entries {
        let namespace = text(&entry["metadata"]["namespace"]);
        assert_ne!(
            namespace, "istio-system",
            "an IMDS entry in the root namespace is visible to every namespace"
        );
        let export: Vec<&str> = entry["spec"]["exportTo"]
            .as_sequence()
            .map(|s| s.iter().map(text).collect())
            .unwrap_or_default();
        assert_eq!(export, ["."], "IMDS is exported to its own namespace only");
    }
    // Every plugin that calls IMDS has the entry in its own namespace.
    for plugin in of_kind(&docs, "WasmPlugin") {
        let config = plugin_config(&plugin);
        let calls_imds = config.tokens.iter().any(|t| t.imds().is_some());
        if calls_imds {
            let namespace = &plugin["metadata"]["namespace"];
            assert!(
                imds_entries
                    .iter()
                    .any(|e| &e["metadata"]["namespace"] == namespace),
                "{:?} calls IMDS without an entry in its namespace",
                plugin["metadata"]["name"]
            );
        }
    }
}

#[test]
fn applying_the_recipe_directory_installs_no_application() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("envoy/istio");
    let mut workloads = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let value = Value::deserialize(doc).unwrap();
                if ["Job", "Deployment", "Pod", "StatefulSet"]
                    .contains(&value["kind"].as_str().unwrap_or(""))
                {
                    workloads.push(path.display().to_string());
                }
            }
        }
    }
    assert!(
        workloads.is_empty(),
        "`kubectl apply -f envoy/istio/` would start these workloads: {workloads:?}; keep them in envoy/istio/examples/"
    );
}
