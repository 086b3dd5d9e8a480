//! End to end: a service principal whose client secret is an Envoy SDS
//! generic secret (`client_secret_sds`), in a real Envoy against the
//! emulator's Entra.
//!
//! Only the native build (`libaoai_msi.so`, `AOAI_MSI_BUILD=native`) can read
//! SDS secrets: Envoy gives wasm filters none. Under the wasm build each test
//! asserts the refusal instead (`envoy --mode validate` fails naming the
//! field and the fix), so no test passes without checking something.
#![cfg(not(target_arch = "wasm32"))]
// Test helpers: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use aoai_emulator::{new_certificate, AppSecret, EntraApp, Identity, TENANT_ID};
use support::*;

const APP_CLIENT: &str = "5ce7a1d0-0000-4000-8000-0000000000c1";
const APP_OBJECT: &str = "5ce7a1d0-0000-4000-8000-0000000000d1";
const FIRST: &str = "sds-secret-one-Q1w2E3~r4T5y6";
const SECOND: &str = "sds-secret-two-Z9x8C7~v6B5n4";
const SECRET_NAME: &str = "sp-secret";

fn secret(value: &str) -> AppSecret {
    AppSecret {
        value: value.into(),
        expired: false,
    }
}

/// Settings where the application (with these valid secrets) holds the role.
fn settings(secrets: Vec<AppSecret>, token_lifetime_s: u64) -> Settings {
    with_certificates(secrets, vec![], token_lifetime_s)
}

/// As [`settings`], with certificates (`x5t#S256`) registered too.
fn with_certificates(
    secrets: Vec<AppSecret>,
    certificates: Vec<String>,
    token_lifetime_s: u64,
) -> Settings {
    Settings {
        role_holders: [Identity::system().object_id, APP_OBJECT.to_owned()].into(),
        entra_apps: vec![EntraApp {
            client_id: APP_CLIENT.to_owned(),
            object_id: APP_OBJECT.to_owned(),
            secrets,
            certificates,
            federated: vec![],
        }],
        token_lifetime_s,
        ..Settings::default()
    }
}

/// The plugin configuration: a service principal whose secret is `sds` (a
/// name, or `{"name", "sds_config"}`).
fn config(sds: &str) -> String {
    format!(
        r#"{{"token_source":{{"type":"client_credentials","tenant_id":"{TENANT_ID}","client_id":"{APP_CLIENT}","cluster":"entra","client_secret_sds":{sds}}}}}"#
    )
}

/// An SDS source that reads `file` and reloads it when `dir` changes.
fn file_source(file: &Path, dir: &Path) -> String {
    named_file_source(SECRET_NAME, file, dir)
}

fn named_file_source(name: &str, file: &Path, dir: &Path) -> String {
    serde_json::json!({
        "name": name,
        "sds_config": {
            "path_config_source": {
                "path": file.display().to_string(),
                "watched_directory": {"path": dir.display().to_string()},
            }
        }
    })
    .to_string()
}

/// The file an SDS `path_config_source` reads: one generic secret.
fn sds_file(value: &str) -> String {
    format!(
        "resources:\n- \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n  name: {SECRET_NAME}\n  generic_secret:\n    secret:\n      inline_string: \"{value}\"\n"
    )
}

/// An SDS file holding a multi-line generic secret `name` (a PEM bundle).
fn sds_file_block(name: &str, value: &str) -> String {
    let indented: String = value
        .lines()
        .map(|line| format!("        {line}\n"))
        .collect();
    format!(
        "resources:\n- \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n  name: {name}\n  generic_secret:\n    secret:\n      inline_string: |\n{indented}"
    )
}

/// The Envoy config: the filter with `config`, its clusters on the
/// emulator, and `static_secrets` (YAML items) in `static_resources.secrets`.
fn envoy_yaml(emulator_port: u16, config: &str, static_secrets: &str) -> String {
    let yaml = Plugin {
        wasm: &wasm(),
        extra: "",
        config,
        env_keys: &[],
    }
    .envoy_yaml_all_to_upstream(&[("upstream", emulator_port), ("entra", emulator_port)]);
    // SDS subscriptions need the node's id and cluster.
    let yaml = format!("node: {{ id: e2e, cluster: e2e }}\n{yaml}");
    if static_secrets.is_empty() {
        return yaml;
    }
    yaml.replacen(
        "static_resources:\n",
        &format!("static_resources:\n  secrets:\n{static_secrets}"),
        1,
    )
}

/// The native build: an Envoy whose filter takes its client secret from the
/// SDS file `file` (written with `value`, watched in its directory). The
/// wasm build: `None`, once the refusal is asserted.
fn envoy_reading_sds_file(emulator: &Emulator, file: &Path, value: &str) -> Option<Envoy> {
    std::fs::write(file, sds_file(value)).unwrap();
    let dir = file.parent().unwrap();
    let yaml = envoy_yaml(emulator.port(), &config(&file_source(file, dir)), "");
    if !native() {
        // Native build only: the wasm filter cannot read SDS secrets.
        assert_wasm_refuses(&yaml, "client_secret_sds", "client_secret_env");
        return None;
    }
    Some(Envoy::start_yaml(&yaml, 2))
}

/// Under the wasm build: the configuration is refused, naming `field` and
/// the way out (`fix`, and the native build).
fn assert_wasm_refuses(yaml: &str, field: &str, fix: &str) {
    assert!(!native());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wasm-sds.yaml");
    std::fs::write(&path, yaml).unwrap();
    let (ok, out) = validate(&path);
    assert!(!ok, "the wasm filter must refuse {field}:\n{out}");
    let line = out
        .lines()
        .find(|l| l.contains("invalid plugin configuration"))
        .unwrap_or_else(|| panic!("no configuration error in:\n{out}"));
    for needle in [&format!("token_source.{field}`"), fix, "libaoai_msi.so"] {
        assert!(line.contains(needle), "{needle}: {line}");
    }
}

/// Wait until Envoy has reloaded an SDS file: its `update_success` counter
/// has moved past `before`.
async fn await_reload(envoy: &Envoy, updates: &str, before: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(envoy, updates) <= before {
        assert!(
            Instant::now() < deadline,
            "Envoy did not reload the SDS file in 10 s:\n{}",
            get(envoy.admin, "/stats?filter=sds").unwrap().1
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `client_secret` of each token request Entra received.
fn secrets_sent(emulator: &Emulator) -> Vec<String> {
    emulator
        .entra_requests()
        .iter()
        .map(|call| {
            call.form
                .iter()
                .find(|(k, _)| k == "client_secret")
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        })
        .collect()
}

/// Envoy's counter `name` (0 if it has none yet).
fn counter(envoy: &Envoy, name: &str) -> u64 {
    let (_, body) = get(envoy.admin, &format!("/stats?filter=^{name}$")).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_bootstrap_secrets_named_by_client_secret_sds_sign_the_service_principal_in() {
    let emulator = Emulator::start(settings(vec![secret(FIRST)], 3600)).unwrap();
    // Two targets, two static secrets: Envoy numbers its subscriptions from 1.
    let statics = format!(
        "  - name: {SECRET_NAME}\n    generic_secret: {{ secret: {{ inline_string: \"{FIRST}\" }} }}\n\
         \x20 - name: other-secret\n    generic_secret: {{ secret: {{ inline_string: \"{SECOND}\" }} }}\n"
    );
    let source = |name: &str| {
        format!(
            r#"{{"type":"client_credentials","tenant_id":"{TENANT_ID}","client_id":"{APP_CLIENT}","cluster":"entra","client_secret_sds":"{name}"}}"#
        )
    };
    let config = format!(
        r#"{{"targets":[{{"name":"main","hosts":["{AOAI_HOST}"],"token_source":{}}},{{"name":"other","hosts":["other.openai.azure.com"],"token_source":{}}}]}}"#,
        source(SECRET_NAME),
        source("other-secret")
    );
    let yaml = envoy_yaml(emulator.port(), &config, &statics);
    if !native() {
        // Native build only: the wasm filter cannot read SDS secrets.
        return assert_wasm_refuses(&yaml, "client_secret_sds", "client_secret_env");
    }
    let envoy = Envoy::start_yaml(&yaml, 2);
    let (status, _, body) = send_chat(&envoy).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(secrets_sent(&emulator), vec![FIRST.to_owned()]);
    assert_eq!(
        emulator.upstream_requests()[0].token_oid.as_deref(),
        Some(APP_OBJECT),
        "the application's own token reached Azure"
    );
    let filter_log = envoy.filter_log().join("\n");
    for line in [
        "subscribed to the SDS generic secret \"sp-secret\" (static; id 1)",
        "subscribed to the SDS generic secret \"other-secret\" (static; id 2)",
    ] {
        assert!(filter_log.contains(line), "{line}:\n{filter_log}");
    }
    let log = envoy.log();
    assert!(
        !log.contains(FIRST) && !log.contains(SECOND),
        "a secret is in Envoy's log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_rotated_in_its_sds_file_is_used_from_the_next_exchange_without_a_restart() {
    // 4 s tokens: refreshed at half-life, so exchanges keep coming.
    let emulator = Emulator::start(settings(vec![secret(FIRST), secret(SECOND)], 4)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sp-secret.yaml");
    let Some(envoy) = envoy_reading_sds_file(&emulator, &file, FIRST) else {
        return;
    };
    let updates = format!("sds.{SECRET_NAME}.update_success");
    assert!(counter(&envoy, &updates) >= 1, "Envoy read the SDS file");
    let (status, _, body) = send_chat(&envoy).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(secrets_sent(&emulator), vec![FIRST.to_owned()]);

    // Rotate: the new value replaces the file whole, and the old one is revoked.
    let before = counter(&envoy, &updates);
    replace_file_atomically(&file, &sds_file(SECOND));
    await_reload(&envoy, &updates, before).await;
    emulator.configure(|s| s.entra_apps[0].secrets = vec![secret(SECOND)]);
    let reloaded = secrets_sent(&emulator).len();

    // The next exchange (the 4 s token's refresh) carries the new secret.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _, body) = send_chat(&envoy).await;
        assert_eq!(status, 200, "{body}");
        if secrets_sent(&emulator).len() > reloaded {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no exchange after the rotation in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sent = secrets_sent(&emulator);
    println!(
        "sds rotation: {} exchanges before the reload, {} after",
        reloaded,
        sent.len() - reloaded
    );
    assert!(
        sent[reloaded..].iter().all(|s| s == SECOND),
        "every exchange after the reload uses the new secret: {} of {} did",
        sent[reloaded..].iter().filter(|s| *s == SECOND).count(),
        sent.len() - reloaded
    );
    assert_eq!(last_token_oid(&emulator).as_deref(), Some(APP_OBJECT));
    let log = envoy.log();
    for value in [FIRST, SECOND] {
        assert!(!log.contains(value), "a secret is in Envoy's log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sds_secret_envoy_has_not_got_is_a_diagnosis_naming_it() {
    let emulator = Emulator::start(settings(vec![secret(FIRST)], 3600)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sp-secret.yaml");
    // The secret's resource is there, its value empty.
    let Some(envoy) = envoy_reading_sds_file(&emulator, &file, "") else {
        return;
    };
    let (status, headers, body) = send_chat(&envoy).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        headers.get("x-aoai-msi-diagnosis").unwrap(),
        "SdsSecretUnavailable"
    );
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    for needle in [
        "\"sp-secret\"",
        "token_source.client_secret_sds",
        "is empty",
    ] {
        assert!(message.contains(needle), "{needle}: {message}");
    }
    assert_eq!(body["error"]["sds_secret"], SECRET_NAME);
    assert!(secrets_sent(&emulator).is_empty(), "Entra was not asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_rotated_in_its_sds_file_signs_the_next_assertion_without_a_restart() {
    let first = new_certificate().unwrap();
    let second = new_certificate().unwrap();
    let emulator = Emulator::start(with_certificates(
        vec![],
        vec![
            first.thumbprint_sha256.clone(),
            second.thumbprint_sha256.clone(),
        ],
        4,
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sp-cert.yaml");
    let bundle = |c: &aoai_emulator::Certificate| format!("{}\n{}", c.cert_pem, c.key_pem);
    std::fs::write(&file, sds_file_block("sp-cert", &bundle(&first))).unwrap();
    let config = format!(
        r#"{{"token_source":{{"type":"client_credentials","tenant_id":"{TENANT_ID}","client_id":"{APP_CLIENT}","cluster":"entra","client_certificate_sds":{}}}}}"#,
        named_file_source("sp-cert", &file, dir.path())
    );
    let yaml = envoy_yaml(emulator.port(), &config, "");
    if !native() {
        // Native build only: the wasm filter cannot read SDS secrets.
        return assert_wasm_refuses(&yaml, "client_certificate_sds", "client_certificate_env");
    }
    let envoy = Envoy::start_yaml(&yaml, 2);
    let thumbprints = |emulator: &Emulator| -> Vec<(u16, String)> {
        emulator
            .entra_requests()
            .iter()
            .map(|call| {
                let header = call.assertion_header.as_ref().expect("an assertion");
                (call.status, header["x5t#S256"].as_str().unwrap().to_owned())
            })
            .collect()
    };
    let (status, _, body) = send_chat(&envoy).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        thumbprints(&emulator),
        vec![(200, first.thumbprint_sha256.clone())]
    );

    let updates = "sds.sp-cert.update_success";
    let before = counter(&envoy, updates);
    replace_file_atomically(&file, &sds_file_block("sp-cert", &bundle(&second)));
    await_reload(&envoy, updates, before).await;
    let reloaded = thumbprints(&emulator).len();
    let deadline = Instant::now() + Duration::from_secs(15);
    while thumbprints(&emulator).len() <= reloaded {
        let (status, _, body) = send_chat(&envoy).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            Instant::now() < deadline,
            "no exchange after the rotation in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = &thumbprints(&emulator)[reloaded..];
    assert!(
        after
            .iter()
            .all(|(status, t)| *status == 200 && *t == second.thumbprint_sha256),
        "every assertion after the reload is signed with the new certificate: {after:?}"
    );
    let log = envoy.log();
    for c in [&first, &second] {
        let key_body = c.key_pem.lines().nth(1).unwrap();
        assert!(!log.contains(key_body), "key material in the log");
    }
}
