//! End to end: every way an Azure workload gets an identity — App Service,
//! a service principal with a secret or a certificate, AKS workload identity —
//! in a real Envoy, against the emulator's identity rooms, with what each
//! token endpoint received asserted field by field.
#![cfg(not(target_arch = "wasm32"))]
// Test helpers: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aoai_emulator::{
    entra_error, new_certificate, AppSecret, EntraApp, FederatedCredential, Identity, RESOURCE,
    TENANT_ID,
};
use serde_json::Value;
use support::*;

const APP_CLIENT: &str = "5ce7a1d0-0000-4000-8000-0000000000c1";
const APP_OBJECT: &str = "5ce7a1d0-0000-4000-8000-0000000000d1";
const SECRET: &str = "sp-secret-value-Q1w2E3~r4T5y6";
const AUTHORITY: &str = "login.microsoftonline.com";
const EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
const SUBJECT: &str = "system:serviceaccount:my-app:my-sa";

fn app(
    secrets: Vec<AppSecret>,
    certificates: Vec<String>,
    federated: Vec<FederatedCredential>,
) -> EntraApp {
    EntraApp {
        client_id: APP_CLIENT.to_owned(),
        object_id: APP_OBJECT.to_owned(),
        secrets,
        certificates,
        federated,
    }
}

/// Settings where the application's service principal holds the role.
fn with_app(app: EntraApp) -> Settings {
    Settings {
        role_holders: [Identity::system().object_id, APP_OBJECT.to_owned()].into(),
        entra_apps: vec![app],
        ..Settings::default()
    }
}

/// The filter in an Envoy whose token clusters all reach the emulator.
fn envoy_with(
    emulator: &Emulator,
    config: &str,
    env_keys: &[&str],
    env: &[(&str, &str)],
    listener: Option<(String, u16)>,
) -> Envoy {
    let token_port = listener.as_ref().map_or(1, |(_, port)| *port);
    let yaml = Plugin {
        wasm: &wasm(),
        extra: "",
        config,
        env_keys,
    }
    .envoy_yaml_all_to_upstream(&[
        ("upstream", emulator.port()),
        ("azure_identity", emulator.port()),
        ("entra", emulator.port()),
        ("federated_token", token_port),
    ]);
    let yaml = match &listener {
        Some((text, _)) => with_listener(&yaml, text),
        None => yaml,
    };
    Envoy::start_full(&yaml, 2, &[], env)
}

fn form_field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn diagnosis(envoy: &Envoy) -> (u16, String, Value) {
    let (status, headers, body) = send_chat(envoy).await;
    let code = headers
        .get("x-aoai-msi-diagnosis")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    (status, code, body)
}

// ------------------------------------------------------------- App Service

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_service_asks_the_identity_endpoint_exactly_as_documented() {
    let user = Identity::user("api", 7);
    let emulator = Emulator::start(Settings {
        user_identities: vec![user.clone()],
        role_holders: [Identity::system().object_id, user.object_id.clone()].into(),
        ..Settings::default()
    })
    .unwrap();
    let endpoint = format!("http://127.0.0.1:{}/msi/token", emulator.port());
    let header = Settings::default().identity_header;
    let env = [
        ("IDENTITY_ENDPOINT", endpoint.as_str()),
        ("IDENTITY_HEADER", header.as_str()),
    ];
    for (selector, expected_oid) in [
        ("", Identity::system().object_id),
        (
            &format!(r#","principal_id":"{}""#, user.object_id)[..],
            user.object_id.clone(),
        ),
    ] {
        let config = format!(r#"{{"token_source":{{"type":"app_service"{selector}}}}}"#);
        let envoy = envoy_with(
            &emulator,
            &config,
            &["IDENTITY_ENDPOINT", "IDENTITY_HEADER"],
            &env,
            None,
        );
        let (status, _, body) = send_chat(&envoy).await;
        assert_eq!(status, 200, "{selector}: {body}");
        let call = emulator.app_service_requests().pop().unwrap();
        assert_eq!(
            call.query.get("api-version").map(String::as_str),
            Some("2019-08-01")
        );
        assert_eq!(
            call.query.get("resource").map(String::as_str),
            Some(RESOURCE)
        );
        let sent: Vec<&str> = call
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("x-identity-header"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(sent, vec![header.as_str()]);
        assert!(!call.query.contains_key("msi_res_id"));
        assert_eq!(last_token_oid(&emulator), Some(expected_oid.clone()));
        let log = envoy.filter_log().join("\n");
        assert!(
            log.contains("token acquired"),
            "expires_on-only answer accepted:\n{log}"
        );
        assert!(
            !log.contains(&header),
            "the identity header is never logged"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_service_errors_become_diagnoses() {
    let several = Settings {
        system_identity: None,
        user_identities: vec![Identity::user("a", 1), Identity::user("b", 2)],
        ..Settings::default()
    };
    let none = Settings {
        system_identity: None,
        ..Settings::default()
    };
    for (settings, header, expected) in [
        (several, None, "ManagedIdentityAmbiguous"),
        (none, None, "ManagedIdentityNotFound"),
        (
            Settings::default(),
            Some("stale-header"),
            "TokenRequestRejected",
        ),
    ] {
        let emulator = Emulator::start(settings).unwrap();
        let endpoint = format!("http://127.0.0.1:{}/msi/token", emulator.port());
        let real = Settings::default().identity_header;
        let header = header.unwrap_or(&real);
        let env = [
            ("IDENTITY_ENDPOINT", endpoint.as_str()),
            ("IDENTITY_HEADER", header),
        ];
        let envoy = envoy_with(
            &emulator,
            r#"{"token_source":{"type":"app_service"}}"#,
            &["IDENTITY_ENDPOINT", "IDENTITY_HEADER"],
            &env,
            None,
        );
        let (status, code, body) = diagnosis(&envoy).await;
        println!(
            "App Service {expected}: {status} {}",
            body["error"]["message"]
        );
        assert_eq!((status, code.as_str()), (401, expected), "{body}");
        assert_eq!(body["error"]["token_source"], "app_service");
        assert!(emulator.upstream_requests().is_empty());
    }
}

// ------------------------------------------------------------ client secret

fn secret_config() -> String {
    format!(
        r#"{{"token_source":{{"type":"client_credentials","tenant_id":"{TENANT_ID}","client_id":"{APP_CLIENT}","cluster":"entra","authority":"{AUTHORITY}"}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_principal_with_a_secret_posts_the_v2_form_and_its_token_reaches_azure() {
    let emulator = Emulator::start(with_app(app(
        vec![AppSecret {
            value: SECRET.into(),
            expired: false,
        }],
        vec![],
        vec![],
    )))
    .unwrap();
    let envoy = envoy_with(
        &emulator,
        &secret_config(),
        &["AZURE_CLIENT_SECRET"],
        &[("AZURE_CLIENT_SECRET", SECRET)],
        None,
    );
    let (status, _, body) = send_chat(&envoy).await;
    assert_eq!(status, 200, "{body}");
    let calls = emulator.entra_requests();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.tenant, TENANT_ID);
    assert_eq!(call.host, AUTHORITY);
    assert_eq!(
        form_field(&call.form, "grant_type"),
        Some("client_credentials")
    );
    assert_eq!(form_field(&call.form, "client_id"), Some(APP_CLIENT));
    assert_eq!(
        form_field(&call.form, "scope"),
        Some(&format!("{RESOURCE}/.default")[..])
    );
    assert_eq!(form_field(&call.form, "client_secret"), Some(SECRET));
    assert_eq!(form_field(&call.form, "client_assertion"), None);
    let upstream = emulator.upstream_requests();
    assert_eq!(
        upstream[0].token_oid.as_deref(),
        Some(APP_OBJECT),
        "the app's own token"
    );
    let metrics = prometheus(&envoy);
    assert_eq!(
        metric(
            &metrics,
            "aoai_msi_token_fetches_total{target=\"default\",source=\"client_credentials\",outcome=\"ok\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_refusals_name_the_code_the_application_and_the_fix() {
    let good = AppSecret {
        value: SECRET.into(),
        expired: false,
    };
    let cases: Vec<(Settings, String, &str, &str)> = vec![
        (
            with_app(app(vec![good.clone()], vec![], vec![])),
            secret_config(),
            "wrong-secret",
            "ClientSecretInvalid",
        ),
        (
            with_app(app(
                vec![AppSecret {
                    value: SECRET.into(),
                    expired: true,
                }],
                vec![],
                vec![],
            )),
            secret_config(),
            SECRET,
            "ClientSecretExpired",
        ),
        (
            Settings::default(),
            secret_config(),
            SECRET,
            "ApplicationNotFound",
        ),
        (
            with_app(app(vec![good], vec![], vec![])),
            secret_config().replace(TENANT_ID, "00000000-0000-0000-0000-00000000dead"),
            SECRET,
            "TenantNotFound",
        ),
    ];
    for (settings, config, secret, expected) in cases {
        let emulator = Emulator::start(settings).unwrap();
        let envoy = envoy_with(
            &emulator,
            &config,
            &["AZURE_CLIENT_SECRET"],
            &[("AZURE_CLIENT_SECRET", secret)],
            None,
        );
        let (status, code, body) = diagnosis(&envoy).await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        println!("{expected}: {status} {message}");
        assert_eq!((status, code.as_str()), (401, expected), "{body}");
        assert_eq!(body["error"]["application_id"], APP_CLIENT);
        assert!(message.contains("AADSTS"), "{message}");
        assert!(message.contains(APP_CLIENT), "{message}");
        assert!(
            !body.to_string().contains(secret),
            "the secret is not echoed"
        );
        assert!(!envoy.log().contains(secret), "a secret in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_being_temporarily_unavailable_is_retried_to_success() {
    let emulator = Emulator::start(with_app(app(
        vec![AppSecret {
            value: SECRET.into(),
            expired: false,
        }],
        vec![],
        vec![],
    )))
    .unwrap();
    emulator.script_entra([
        entra_error(503, "temporarily_unavailable", 50196, "The server is busy."),
        entra_error(500, "server_error", 50000, "Internal error."),
    ]);
    let envoy = envoy_with(
        &emulator,
        &secret_config(),
        &["AZURE_CLIENT_SECRET"],
        &[("AZURE_CLIENT_SECRET", SECRET)],
        None,
    );
    let started = Instant::now();
    let (status, _, body) = send_chat(&envoy).await;
    let statuses: Vec<u16> = emulator.entra_requests().iter().map(|r| r.status).collect();
    println!(
        "Entra {statuses:?}, answered {status} after {:?}",
        started.elapsed()
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses, vec![503, 500, 200]);
}

// -------------------------------------------------------------- certificate

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_signs_a_fresh_assertion_that_entra_verifies() {
    let certificate = new_certificate().unwrap();
    let emulator = Emulator::start(Settings {
        token_lifetime_s: 4,
        ..with_app(app(
            vec![],
            vec![certificate.thumbprint_sha256.clone()],
            vec![],
        ))
    })
    .unwrap();
    let bundle = format!("{}\n{}", certificate.cert_pem, certificate.key_pem);
    let config = format!(
        r#"{{"token_source":{{"type":"client_credentials","tenant_id":"{TENANT_ID}","client_id":"{APP_CLIENT}","client_certificate_env":"SP_CERT"}}}}"#
    );
    let envoy = envoy_with(
        &emulator,
        &config,
        &["SP_CERT"],
        &[("SP_CERT", &bundle)],
        None,
    );
    assert_eq!(send_chat(&envoy).await.0, 200);
    // A 4 s token is refreshed at half-life: a second exchange.
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    assert_eq!(send_chat(&envoy).await.0, 200);
    let calls = emulator.entra_requests();
    assert!(calls.len() >= 2, "{}", calls.len());
    let mut jtis = Vec::new();
    for call in &calls {
        assert_eq!(
            call.status, 200,
            "the emulator verified the signature cryptographically"
        );
        assert_eq!(
            form_field(&call.form, "client_assertion_type"),
            Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        );
        assert_eq!(form_field(&call.form, "client_secret"), None);
        let header = call.assertion_header.as_ref().unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["x5t#S256"], certificate.thumbprint_sha256.as_str());
        let claims = call.assertion_claims.as_ref().unwrap();
        assert_eq!(
            claims["aud"],
            format!("https://{AUTHORITY}/{TENANT_ID}/oauth2/v2.0/token")
        );
        assert_eq!(claims["iss"], APP_CLIENT);
        assert_eq!(claims["sub"], APP_CLIENT);
        let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
        assert!(lifetime <= 600, "a short-lived assertion: {lifetime}");
        jtis.push(claims["jti"].as_str().unwrap().to_owned());
    }
    jtis.dedup();
    assert_eq!(
        jtis.len(),
        calls.len(),
        "a new assertion (jti) per exchange"
    );
    println!(
        "certificate: {} exchanges, each with its own signed assertion",
        calls.len()
    );
    let log = envoy.log();
    let key_body = certificate.key_pem.lines().nth(1).unwrap();
    assert!(!log.contains(key_body), "no key material in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_entra_does_not_know_is_explained_with_its_thumbprint() {
    let registered = new_certificate().unwrap();
    let other = new_certificate().unwrap();
    let emulator = Emulator::start(with_app(app(
        vec![],
        vec![registered.thumbprint_sha256.clone()],
        vec![],
    )))
    .unwrap();
    let bundle = format!("{}\n{}", other.cert_pem, other.key_pem);
    let config = format!(
        r#"{{"token_source":{{"type":"client_credentials","tenant_id":"{TENANT_ID}","client_id":"{APP_CLIENT}","client_certificate_env":"SP_CERT"}}}}"#
    );
    let envoy = envoy_with(
        &emulator,
        &config,
        &["SP_CERT"],
        &[("SP_CERT", &bundle)],
        None,
    );
    let (status, code, body) = diagnosis(&envoy).await;
    println!("CertificateNotRegistered: {}", body["error"]["message"]);
    assert_eq!(
        (status, code.as_str()),
        (401, "CertificateNotRegistered"),
        "{body}"
    );
    assert_eq!(
        body["error"]["certificate_thumbprint_sha256"],
        other.thumbprint_sha256.as_str()
    );
}

// -------------------------------------------------------- workload identity

/// A directory laid out as kubelet writes a projected volume: the file is a
/// symlink into `..data`, itself a symlink to a timestamped directory, and a
/// rotation swaps `..data` atomically.
struct ProjectedVolume {
    dir: tempfile::TempDir,
    generation: u32,
}

impl ProjectedVolume {
    const FILE: &'static str = "azure-identity-token";

    fn new(token: &str) -> ProjectedVolume {
        let volume = ProjectedVolume {
            dir: tempfile::tempdir().unwrap(),
            generation: 0,
        };
        volume.write(1, token);
        std::os::unix::fs::symlink("..2026_01", volume.dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink(
            format!("..data/{}", Self::FILE),
            volume.dir.path().join(Self::FILE),
        )
        .unwrap();
        ProjectedVolume {
            generation: 1,
            ..volume
        }
    }

    fn write(&self, generation: u32, token: &str) {
        let timestamped = self.dir.path().join(format!("..2026_{generation:02}"));
        std::fs::create_dir(&timestamped).unwrap();
        std::fs::write(timestamped.join(Self::FILE), token).unwrap();
    }

    /// kubelet's AtomicWriter: new directory, new `..data` link, renamed over.
    fn rotate(&mut self, token: &str) {
        self.generation += 1;
        self.write(self.generation, token);
        let staged = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(format!("..2026_{:02}", self.generation), &staged).unwrap();
        std::fs::rename(&staged, self.dir.path().join("..data")).unwrap();
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join(Self::FILE)
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn workload_config() -> &'static str {
    r#"{"token_source":{"type":"workload_identity","cluster":"entra","assertion_cluster":"federated_token"}}"#
}

const WORKLOAD_ENV_KEYS: [&str; 3] = ["AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_AUTHORITY_HOST"];

fn workload_env() -> [(&'static str, &'static str); 3] {
    [
        ("AZURE_CLIENT_ID", APP_CLIENT),
        ("AZURE_TENANT_ID", TENANT_ID),
        ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/"),
    ]
}

/// An emulator whose application trusts the pod's service account (a
/// federated credential of its OIDC issuer), handing out 4-second tokens so
/// that a refresh comes within a test.
fn emulator_trusting_the_service_account() -> Emulator {
    let emulator = Emulator::start(Settings {
        token_lifetime_s: 4,
        ..with_app(app(vec![], vec![], vec![]))
    })
    .unwrap();
    let issuer = emulator.oidc_issuer();
    emulator.configure(|s| {
        s.entra_apps[0].federated = vec![FederatedCredential {
            issuer: issuer.clone(),
            subject: SUBJECT.into(),
            audience: EXCHANGE_AUDIENCE.into(),
        }]
    });
    emulator
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_exchanges_the_projected_token_and_follows_its_rotation() {
    let emulator = emulator_trusting_the_service_account();
    let first = emulator.mint_service_account_token(SUBJECT, EXCHANGE_AUDIENCE, 3600);
    let mut volume = ProjectedVolume::new(&first);
    let port = free_port();
    let listener = token_file_listener(port, &volume.file(), volume.dir());
    let envoy = envoy_with(
        &emulator,
        workload_config(),
        &WORKLOAD_ENV_KEYS,
        &workload_env(),
        Some((listener, port)),
    );
    let (status, _, body) = send_chat(&envoy).await;
    assert_eq!(status, 200, "{body}");
    let calls = emulator.entra_requests();
    assert_eq!(form_field(&calls[0].form, "client_id"), Some(APP_CLIENT));
    assert_eq!(
        form_field(&calls[0].form, "client_assertion"),
        Some(first.as_str())
    );
    assert_eq!(
        form_field(&calls[0].form, "client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert_eq!(
        emulator.upstream_requests()[0].token_oid.as_deref(),
        Some(APP_OBJECT)
    );

    // kubelet rotates the token: how soon does Envoy serve the new file?
    let second = emulator.mint_service_account_token(SUBJECT, EXCHANGE_AUDIENCE, 3600);
    let rotated = Instant::now();
    volume.rotate(&second);
    let token_url = format!("http://127.0.0.1:{port}/");
    let mut served_after = None;
    while rotated.elapsed() < Duration::from_secs(10) {
        let body = client()
            .get(&token_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if body == second {
            served_after = Some(rotated.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let served_after = served_after.expect("Envoy serves the rotated token");
    // The 4 s token is refreshed at half-life with the rotated assertion.
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    assert_eq!(send_chat(&envoy).await.0, 200);
    let calls = emulator.entra_requests();
    let last = form_field(&calls.last().unwrap().form, "client_assertion")
        .unwrap()
        .to_owned();
    println!(
        "workload identity: Envoy served the rotated token {served_after:?} after the ..data swap; \
         {} exchanges, the last one with the rotated token: {}",
        calls.len(),
        last == second
    );
    assert_eq!(
        last, second,
        "the next exchange carries the rotated token, no restart"
    );
    let log = envoy.log();
    for token in [&first, &second] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!log.contains(&signature[..24]), "an assertion in the log");
    }
}

/// The native module, in Envoy's own process, reads the file that
/// `AZURE_FEDERATED_TOKEN_FILE` names itself, at every exchange, with no
/// token-file listener; a file it cannot read is named in the diagnosis. The
/// wasm filter reads no file and no variable it is not given: the same Envoy,
/// without the listener, tells its user that the listener did not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_module_reads_the_projected_token_file_itself_and_names_one_it_cannot_read() {
    let emulator = emulator_trusting_the_service_account();
    let first = emulator.mint_service_account_token(SUBJECT, EXCHANGE_AUDIENCE, 3600);
    let mut volume = ProjectedVolume::new(&first);
    let file = volume.file().display().to_string();
    let mut env = workload_env().to_vec();
    env.push(("AZURE_FEDERATED_TOKEN_FILE", &file));
    // No listener: the assertion cluster refuses every connection.
    let envoy = envoy_with(&emulator, workload_config(), &WORKLOAD_ENV_KEYS, &env, None);

    if !native() {
        let (status, code, body) = diagnosis(&envoy).await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(
            (status, code.as_str()),
            (503, "FederatedTokenUnavailable"),
            "{body}"
        );
        // Envoy answers the call to the refusing cluster itself, with a 503.
        assert!(message.contains("token listener answered 503"), "{message}");
        assert!(message.contains("The token-file listener"), "{message}");
        assert!(emulator.entra_requests().is_empty());
        return;
    }

    let (status, _, body) = send_chat(&envoy).await;
    assert_eq!(status, 200, "{body}");
    let calls = emulator.entra_requests();
    assert_eq!(
        form_field(&calls[0].form, "client_assertion"),
        Some(first.as_str())
    );
    // kubelet rotates the token; the 4 s token is refreshed at half-life
    // with the file as it is then.
    let second = emulator.mint_service_account_token(SUBJECT, EXCHANGE_AUDIENCE, 3600);
    volume.rotate(&second);
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    assert_eq!(send_chat(&envoy).await.0, 200);
    let calls = emulator.entra_requests();
    assert_eq!(
        form_field(&calls.last().unwrap().form, "client_assertion"),
        Some(second.as_str()),
        "the next exchange reads the rotated file, no restart"
    );
    let log = envoy.log();
    for token in [&first, &second] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!log.contains(&signature[..24]), "an assertion in the log");
    }

    // A path where no file is: the diagnosis names the variable, the path
    // and why, and what to check; nothing about a listener.
    let missing = volume.dir().join("no-such-token").display().to_string();
    let mut env = workload_env().to_vec();
    env.push(("AZURE_FEDERATED_TOKEN_FILE", &missing));
    let envoy = envoy_with(&emulator, workload_config(), &WORKLOAD_ENV_KEYS, &env, None);
    let (status, code, body) = diagnosis(&envoy).await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    println!("FederatedTokenUnavailable (file): {message}");
    assert_eq!(
        (status, code.as_str()),
        (503, "FederatedTokenUnavailable"),
        "{body}"
    );
    for part in [
        "AZURE_FEDERATED_TOKEN_FILE",
        missing.as_str(),
        "No such file or directory",
        "mounts the projected volume",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
    assert!(!message.contains("listener"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_credential_that_does_not_match_is_explained() {
    let emulator = Emulator::start(with_app(app(vec![], vec![], vec![]))).unwrap();
    let issuer = emulator.oidc_issuer();
    emulator.configure(|s| {
        s.entra_apps[0].federated = vec![FederatedCredential {
            issuer,
            subject: "system:serviceaccount:other:other".into(),
            audience: EXCHANGE_AUDIENCE.into(),
        }]
    });
    let token = emulator.mint_service_account_token(SUBJECT, EXCHANGE_AUDIENCE, 3600);
    let volume = ProjectedVolume::new(&token);
    let port = free_port();
    let listener = token_file_listener(port, &volume.file(), volume.dir());
    let envoy = envoy_with(
        &emulator,
        workload_config(),
        &WORKLOAD_ENV_KEYS,
        &workload_env(),
        Some((listener, port)),
    );
    let (status, code, body) = diagnosis(&envoy).await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    println!("FederatedCredentialMismatch: {message}");
    assert_eq!(
        (status, code.as_str()),
        (401, "FederatedCredentialMismatch"),
        "{body}"
    );
    assert!(message.contains("AADSTS70021"), "{message}");
    assert!(message.contains("system:serviceaccount:<namespace>:<service account>"));
    assert!(
        !body.to_string().contains(&token[..40]),
        "the assertion is not echoed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_variable_fails_configuration_naming_it_and_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = Plugin {
        wasm: &wasm(),
        extra: "",
        config: workload_config(),
        env_keys: &WORKLOAD_ENV_KEYS,
    }
    .envoy_yaml_all_to_upstream(&[("upstream", 9), ("entra", 9), ("federated_token", 9)]);
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = std::process::Command::new(envoy_bin())
        .envs(envoy_env())
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .args([
            "-l",
            "info",
            "--component-log-level",
            "wasm:trace",
            "--use-dynamic-base-id",
        ])
        .env_remove("AZURE_CLIENT_ID")
        .env("AZURE_TENANT_ID", TENANT_ID)
        .current_dir(repo())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    let line = text
        .lines()
        .find(|l| l.contains("invalid plugin configuration"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("token_source.client_id"), "{line}");
    assert!(line.contains("AZURE_CLIENT_ID"), "{line}");
    println!("{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_assertion_key_or_token_appears_in_the_log_at_trace_level() {
    let certificate = new_certificate().unwrap();
    let mut logs = Vec::new();
    let mut secrets: Vec<String> = vec![SECRET.into(), "wrong-secret-Z9".into()];
    secrets.extend(
        certificate
            .key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::to_owned),
    );
    // Service principal: a good secret, a wrong one, a certificate.
    for (secret, certificate_env) in [
        (SECRET, None),
        ("wrong-secret-Z9", None),
        ("", Some(&certificate)),
    ] {
        let emulator = Emulator::start(Settings {
            token_lifetime_s: 4,
            ..with_app(app(
                vec![AppSecret {
                    value: SECRET.into(),
                    expired: false,
                }],
                vec![certificate.thumbprint_sha256.clone()],
                vec![],
            ))
        })
        .unwrap();
        let envoy = match certificate_env {
            None => envoy_with(
                &emulator,
                &secret_config(),
                &["AZURE_CLIENT_SECRET"],
                &[("AZURE_CLIENT_SECRET", secret)],
                None,
            ),
            Some(c) => {
                let bundle = format!("{}\n{}", c.cert_pem, c.key_pem);
                let config = format!(
                    r#"{{"token_source":{{"type":"client_credentials","tenant_id":"{TENANT_ID}","client_id":"{APP_CLIENT}","client_certificate_env":"SP_CERT"}}}}"#
                );
                envoy_with(
                    &emulator,
                    &config,
                    &["SP_CERT"],
                    &[("SP_CERT", &bundle)],
                    None,
                )
            }
        };
        let _ = send_chat(&envoy).await;
        tokio::time::sleep(Duration::from_millis(2_600)).await;
        let _ = send_chat(&envoy).await;
        for call in emulator.entra_requests() {
            if let Some(assertion) = form_field(&call.form, "client_assertion") {
                secrets.push(assertion.rsplit('.').next().unwrap().to_owned());
            }
        }
        secrets.extend(
            emulator
                .minted_tokens()
                .iter()
                .map(|t| t.rsplit('.').next().unwrap().to_owned()),
        );
        logs.push(envoy.log());
    }
    // App Service, with the right header and a stale one.
    for header in [
        Settings::default().identity_header,
        "stale-header-K8".to_owned(),
    ] {
        let emulator = Emulator::start(Settings::default()).unwrap();
        let endpoint = format!("http://127.0.0.1:{}/msi/token", emulator.port());
        let env = [
            ("IDENTITY_ENDPOINT", endpoint.as_str()),
            ("IDENTITY_HEADER", header.as_str()),
        ];
        let envoy = envoy_with(
            &emulator,
            r#"{"token_source":{"type":"app_service"}}"#,
            &["IDENTITY_ENDPOINT", "IDENTITY_HEADER"],
            &env,
            None,
        );
        let _ = send_chat(&envoy).await;
        secrets.push(header);
        secrets.extend(
            emulator
                .minted_tokens()
                .iter()
                .map(|t| t.rsplit('.').next().unwrap().to_owned()),
        );
        logs.push(envoy.log());
    }
    // Workload identity, with a matching and a mismatching federated credential.
    for subject in [SUBJECT, "system:serviceaccount:x:y"] {
        let emulator = Emulator::start(with_app(app(vec![], vec![], vec![]))).unwrap();
        let issuer = emulator.oidc_issuer();
        emulator.configure(|s| {
            s.entra_apps[0].federated = vec![FederatedCredential {
                issuer,
                subject: subject.into(),
                audience: EXCHANGE_AUDIENCE.into(),
            }]
        });
        let token = emulator.mint_service_account_token(SUBJECT, EXCHANGE_AUDIENCE, 3600);
        let volume = ProjectedVolume::new(&token);
        let port = free_port();
        let listener = token_file_listener(port, &volume.file(), volume.dir());
        let envoy = envoy_with(
            &emulator,
            workload_config(),
            &WORKLOAD_ENV_KEYS,
            &workload_env(),
            Some((listener, port)),
        );
        let _ = send_chat(&envoy).await;
        secrets.push(token.rsplit('.').next().unwrap().to_owned());
        secrets.extend(
            emulator
                .minted_tokens()
                .iter()
                .map(|t| t.rsplit('.').next().unwrap().to_owned()),
        );
        logs.push(envoy.log());
    }
    let log = logs.join("\n");
    assert!(log.lines().any(is_filter_line), "the filter did log");
    let mut checked = 0;
    for secret in secrets.iter().filter(|s| s.len() >= 12) {
        // Any 24 characters of a signature, or the whole of a short secret.
        let needle = &secret[..secret.len().min(24)];
        assert!(
            !log.contains(needle),
            "a secret, key, assertion or token is in the log: {}…",
            &needle[..6]
        );
        checked += 1;
    }
    println!(
        "trace-level log sweep: {} lines, {checked} secrets looked for, none found",
        log.lines().count()
    );
    assert!(checked >= 20, "{checked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_us_gov_service_principal_bound_to_a_cluster_asks_entra_for_the_us_gov_audience() {
    let emulator = Emulator::start(Settings {
        accepted_audience: aoai_emulator::US_GOV_RESOURCE.to_owned(),
        ..with_app(app(
            vec![AppSecret {
                value: SECRET.into(),
                expired: false,
            }],
            vec![],
            vec![],
        ))
    })
    .unwrap();
    // The README's gov target: every host routed to its cluster, a service
    // principal of the US Gov cloud, no `resource`.
    let config = format!(
        r#"{{"targets":[{{"name":"gov","hosts":["*"],"clusters":["upstream"],
            "token_source":{{"type":"client_credentials","cluster":"entra",
              "authority":"login.microsoftonline.us","tenant_id":"{TENANT_ID}",
              "client_id":"{APP_CLIENT}","client_secret_env":"GOV_SP_SECRET"}}}}]}}"#
    );
    let envoy = envoy_with(
        &emulator,
        &config,
        &["GOV_SP_SECRET"],
        &[("GOV_SP_SECRET", SECRET)],
        None,
    );
    let (status, _, body) = send_chat(&envoy).await;
    assert_eq!(status, 200, "{body}");
    let calls = emulator.entra_requests();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].host, "login.microsoftonline.us");
    assert_eq!(
        form_field(&calls[0].form, "scope"),
        Some("https://cognitiveservices.azure.us/.default")
    );
    let upstream = emulator.upstream_requests();
    assert_eq!(
        upstream[0].token_aud.as_deref(),
        Some(aoai_emulator::US_GOV_RESOURCE)
    );
}
