use std::collections::HashMap;

use super::*;
use crate::config::{Config, HostEnv, SdsRef, SdsSecret, SecretHost, Vars};
use crate::token::FailureClass;

const NOW_MS: u64 = 1_763_752_300_000;
const RES: &str = "https://cognitiveservices.azure.com";
const TENANT: &str = "72f988bf-0000-4000-8000-00000000e1a0";
const CLIENT: &str = "c11e0000-0000-4000-8000-0000000000aa";

fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
    vars.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn source(json: &str, vars: &HashMap<String, String>) -> Source {
    let lookup = |name: &str| vars.get(name).cloned();
    let config = Config::parse_with_env(json.as_bytes(), &lookup as Vars)
        .unwrap_or_else(|e| panic!("{json}: {e}"));
    config.tokens[0].source.clone()
}

fn call(step: Step) -> TokenRequest {
    match step {
        Step::Call(request) => request,
        Step::Done(result) => panic!("expected a call, got {result:?}"),
    }
}

/// The form fields of a POST body.
fn form(body: &[u8]) -> HashMap<String, String> {
    let decode = |v: &str| {
        let mut out = Vec::new();
        let b = v.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&v[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    };
    std::str::from_utf8(body)
        .unwrap()
        .split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap();
            (k.to_owned(), decode(v))
        })
        .collect()
}

#[test]
fn imds_request_carries_the_bare_resource_the_selector_and_the_metadata_header() {
    let s = source(
        r#"{"hosts":["a.example"],"token_source":{"client_id":"11111111-2222"}}"#,
        &env(&[]),
    );
    let (exchange, step) = s.begin(RES, NOW_MS, 1);
    assert_eq!(exchange, Exchange::Token);
    let request = call(step);
    assert_eq!(request.cluster, "azure_imds");
    assert_eq!(
        request.path(),
        "/metadata/identity/oauth2/token?api-version=2018-02-01\
         &resource=https%3A%2F%2Fcognitiveservices.azure.com&client_id=11111111-2222"
    );
    assert_eq!(request.header(":authority"), "169.254.169.254");
    assert_eq!(request.header("metadata"), "true");
    assert!(!request
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-for")));
    assert!(request.body.is_empty());
}

#[test]
fn app_service_request_follows_identity_endpoint_with_its_header_and_api_version() {
    let vars = env(&[
        ("IDENTITY_ENDPOINT", "http://localhost:42356/msi/token"),
        ("IDENTITY_HEADER", "header-secret-value"),
    ]);
    let s = source(
        r#"{"hosts":["a.example"],"token_source":{"type":"app_service","mi_res_id":"/subscriptions/s/x"}}"#,
        &vars,
    );
    let request = call(s.begin(RES, NOW_MS, 1).1);
    assert_eq!(request.cluster, "azure_identity");
    assert_eq!(request.header(":authority"), "localhost:42356");
    assert_eq!(
        request.path(),
        "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fcognitiveservices.azure.com\
         &mi_res_id=%2Fsubscriptions%2Fs%2Fx"
    );
    assert_eq!(request.header("x-identity-header"), "header-secret-value");
    // principal_id is App Service's name for the object id.
    let s = source(
        r#"{"hosts":["a.example"],"token_source":{"type":"app_service","principal_id":"oid-1"}}"#,
        &vars,
    );
    assert!(call(s.begin(RES, NOW_MS, 1).1)
        .path()
        .ends_with("&principal_id=oid-1"));
    assert!(!format!("{s:?}").contains("header-secret-value"));
}

#[test]
fn client_secret_request_is_the_v2_form_with_the_default_scope() {
    let vars = env(&[("AZURE_CLIENT_SECRET", "s3cr3t~value/+=")]);
    let s = source(
        &format!(
            r#"{{"hosts":["a.example"],"token_source":{{"type":"client_credentials","tenant_id":"{TENANT}","client_id":"{CLIENT}","authority":"login.microsoftonline.us"}}}}"#
        ),
        &vars,
    );
    let request = call(s.begin("https://cognitiveservices.azure.us", NOW_MS, 1).1);
    assert_eq!(request.cluster, "entra");
    assert_eq!(request.header(":method"), "POST");
    assert_eq!(request.header(":authority"), "login.microsoftonline.us");
    assert_eq!(request.path(), format!("/{TENANT}/oauth2/v2.0/token"));
    assert_eq!(
        request.header("content-type"),
        "application/x-www-form-urlencoded"
    );
    let fields = form(&request.body);
    assert_eq!(fields["grant_type"], "client_credentials");
    assert_eq!(fields["client_id"], CLIENT);
    assert_eq!(
        fields["scope"],
        "https://cognitiveservices.azure.us/.default"
    );
    assert_eq!(
        fields["client_secret"], "s3cr3t~value/+=",
        "round-trips through the form encoding"
    );
    let shown = format!("{request:?} {s:?}");
    assert!(!shown.contains("s3cr3t"), "{shown}");
}

/// A PEM bundle with a real RSA key and a stand-in certificate: the filter
/// never parses the certificate, it only hashes its DER for `x5t#S256`.
fn bundle() -> (String, RS256PublicKey, String) {
    use base64::Engine;
    let key = RS256KeyPair::generate(2048).unwrap();
    let der = b"stand-in certificate DER".to_vec();
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n{}",
        base64::engine::general_purpose::STANDARD.encode(&der),
        key.to_pem().unwrap()
    );
    let thumbprint = {
        use sha2::Digest;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&der))
    };
    (pem, key.public_key(), thumbprint)
}

#[test]
fn certificate_assertions_are_fresh_signed_rs256_jwts_naming_the_certificate() {
    let (pem, public, thumbprint) = bundle();
    let vars = env(&[("SP_CERT", &pem)]);
    let s = source(
        &format!(
            r#"{{"hosts":["a.example"],"token_source":{{"type":"client_credentials","tenant_id":"{TENANT}","client_id":"{CLIENT}","client_certificate_env":"SP_CERT"}}}}"#
        ),
        &vars,
    );
    let first = form(&call(s.begin(RES, NOW_MS, 1).1).body);
    let second = form(&call(s.begin(RES, NOW_MS, 2).1).body);
    assert_eq!(first["client_assertion_type"], JWT_BEARER);
    assert!(!first.contains_key("client_secret"));
    let assertion = &first["client_assertion"];
    let metadata = Token::decode_metadata(assertion).unwrap();
    assert_eq!(metadata.algorithm(), "RS256");
    assert_eq!(
        metadata.certificate_sha256_thumbprint(),
        Some(thumbprint.as_str())
    );
    let url = format!("https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token");
    let options = VerificationOptions {
        allowed_audiences: Some(std::collections::HashSet::from([url])),
        allowed_issuers: Some(std::collections::HashSet::from([CLIENT.to_owned()])),
        artificial_time: Some(jwt_simple::prelude::Duration::from_secs(NOW_MS / 1000 + 1)),
        ..VerificationOptions::default()
    };
    let claims = public
        .verify_token::<NoCustomClaims>(assertion, Some(options))
        .expect("the signature verifies with the certificate's public key");
    assert_eq!(claims.subject.as_deref(), Some(CLIENT));
    let lifetime = claims.expires_at.unwrap().as_secs() - claims.issued_at.unwrap().as_secs();
    assert_eq!(lifetime, ASSERTION_LIFETIME_S);
    assert_ne!(
        first["client_assertion"], second["client_assertion"],
        "a new assertion (new jti) per exchange"
    );
    assert!(!format!("{s:?}").contains("PRIVATE KEY"));
}

#[test]
fn certificate_bundles_without_a_certificate_or_a_key_are_refused_by_name() {
    let (pem, _, _) = bundle();
    let key_only = pem[pem.find("-----BEGIN PRIVATE").unwrap()..].to_owned();
    let cert_only = pem[..pem.find("-----BEGIN PRIVATE").unwrap()].to_owned();
    for (value, expected) in [
        (key_only, "no -----BEGIN CERTIFICATE-----"),
        (cert_only, "no -----BEGIN PRIVATE KEY-----"),
    ] {
        let vars = env(&[("SP_CERT", &value)]);
        let lookup = |name: &str| vars.get(name).cloned();
        let e = Config::parse_with_env(
            format!(r#"{{"hosts":["a.example"],"token_source":{{"type":"client_credentials","tenant_id":"{TENANT}","client_id":"{CLIENT}","client_certificate_env":"SP_CERT"}}}}"#).as_bytes(),
            &lookup as Vars,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`token_source.client_certificate_env` names SP_CERT"),
            "{e}"
        );
        assert!(e.contains(expected), "{e}");
        assert!(!e.contains("MII"), "no key material in the message: {e}");
    }
}

#[test]
fn workload_identity_fetches_the_assertion_then_exchanges_it() {
    let vars = env(&[
        ("AZURE_TENANT_ID", TENANT),
        ("AZURE_CLIENT_ID", CLIENT),
        ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/"),
    ]);
    let s = source(
        r#"{"hosts":["a.example"],"token_source":{"type":"workload_identity"}}"#,
        &vars,
    );
    let (exchange, step) = s.begin(RES, NOW_MS, 1);
    assert_eq!(exchange, Exchange::Assertion);
    let first = call(step);
    assert_eq!(first.cluster, "federated_token");
    assert_eq!(first.header(":method"), "GET");
    let assertion = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJl";
    let (exchange, step) = s.answered(
        exchange,
        RES,
        Some(200),
        format!("{assertion}\n").as_bytes(),
        NOW_MS,
        2,
    );
    assert_eq!(exchange, Exchange::Token);
    let second = call(step);
    assert_eq!(second.cluster, "entra");
    assert_eq!(second.path(), format!("/{TENANT}/oauth2/v2.0/token"));
    let fields = form(&second.body);
    assert_eq!(fields["client_id"], CLIENT);
    assert_eq!(fields["client_assertion_type"], JWT_BEARER);
    assert_eq!(fields["client_assertion"], assertion);
    assert!(!format!("{second:?}").contains(assertion));
}

#[test]
fn a_missing_or_odd_service_account_token_is_a_named_transient_failure() {
    for (status, body, expected) in [
        (None, &b""[..], "did not answer"),
        (Some(404), b"", "answered 404"),
        (Some(200), b"  \n", "empty"),
        (Some(200), b"not a jwt", "does not hold a JWT"),
        (Some(200), b"a.b.c\xff", "empty or not text"),
    ] {
        match parse_assertion(status, body) {
            Err(failure @ FetchFailure::AssertionUnavailable { .. }) => {
                assert_eq!(failure.class(), FailureClass::Transient);
                let FetchFailure::AssertionUnavailable { problem } = failure else {
                    unreachable!()
                };
                assert!(problem.contains(expected), "{problem}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn sources_that_need_the_environment_name_the_missing_variable_and_the_setting() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let table: &[Case] = &[
        (
            r#"{"type":"app_service"}"#,
            &[("IDENTITY_HEADER", "h")],
            "environment variable IDENTITY_ENDPOINT",
        ),
        (
            r#"{"type":"app_service"}"#,
            &[("IDENTITY_ENDPOINT", "http://localhost:1/msi/token")],
            "environment variable IDENTITY_HEADER",
        ),
        (
            r#"{"type":"client_credentials","client_id":"c"}"#,
            &[("AZURE_CLIENT_SECRET", "s")],
            "`token_source.tenant_id` is not set, and the environment variable AZURE_TENANT_ID",
        ),
        (
            r#"{"type":"client_credentials","tenant_id":"t","client_id":"c","client_secret_env":"GOV_SECRET"}"#,
            &[],
            "environment variable GOV_SECRET",
        ),
        (
            r#"{"type":"client_credentials","tenant_id":"t","client_id":"c","client_secret":"oops"}"#,
            &[],
            "`token_source.client_secret` holds a secret in the plugin configuration",
        ),
        (
            r#"{"type":"client_credentials","tenant_id":"t","client_id":"c","client_secret_env":"a","client_certificate_env":"b"}"#,
            &[],
            "are set together",
        ),
        (
            r#"{"type":"workload_identity"}"#,
            &[("AZURE_TENANT_ID", "t")],
            "the environment variable AZURE_CLIENT_ID is not available",
        ),
        (
            r#"{"type":"app_service","msi_res_id":"x"}"#,
            &[
                ("IDENTITY_ENDPOINT", "http://localhost:1/m"),
                ("IDENTITY_HEADER", "h"),
            ],
            "unknown field `token_source.msi_res_id`",
        ),
    ];
    for (source, vars, expected) in table {
        let vars = env(vars);
        let lookup = |name: &str| vars.get(name).cloned();
        let json = format!(r#"{{"hosts":["a.example"],"token_source":{source}}}"#);
        let e = Config::parse_with_env(json.as_bytes(), &lookup as Vars)
            .unwrap_err()
            .to_string();
        assert!(e.contains(expected), "{source}: {e}");
        if json.contains("oops") {
            assert!(!e.contains("oops"), "the secret is not repeated: {e}");
            assert!(e.contains("client_secret_env"), "{e}");
        }
    }
}

#[test]
fn jtis_are_uuid_shaped_and_differ_by_nonce_and_time() {
    let a = jti(1, NOW_MS);
    assert_eq!(a.len(), 36);
    assert_eq!(a.matches('-').count(), 4);
    assert_ne!(a, jti(2, NOW_MS));
    assert_ne!(a, jti(1, NOW_MS + 1));
}

// ------------------------------------------------------------- SDS secrets

/// A host with SDS generic secrets, as the native build is: what it was
/// asked to subscribe to, and values a test sets and rotates.
#[derive(Default)]
struct FakeSecrets {
    values: std::sync::Arc<std::sync::Mutex<HashMap<String, Vec<u8>>>>,
    asked: std::sync::Mutex<Vec<SdsRef>>,
    refuse: bool,
}

impl FakeSecrets {
    fn set(&self, name: &str, value: &str) {
        self.values
            .lock()
            .unwrap()
            .insert(name.to_owned(), value.as_bytes().to_vec());
    }
}

impl SecretHost for FakeSecrets {
    fn subscribe(&self, secret: &SdsRef) -> Result<SdsSecret, String> {
        self.asked.lock().unwrap().push(secret.clone());
        if self.refuse {
            return Err("no such static secret".to_owned());
        }
        let values = std::sync::Arc::clone(&self.values);
        let name = secret.name.clone();
        Ok(SdsSecret::new(
            &secret.name,
            std::sync::Arc::new(move || values.lock().unwrap().get(&name).cloned()),
        ))
    }
}

fn sds_config(credential: &str) -> String {
    format!(
        r#"{{"hosts":["a.example"],"token_source":{{"type":"client_credentials","tenant_id":"{TENANT}","client_id":"{CLIENT}",{credential}}}}}"#
    )
}

fn sds_source(json: &str, secrets: &FakeSecrets) -> Result<Config, crate::config::ConfigError> {
    let env = HostEnv::with_secrets(&no_vars, secrets);
    Config::parse_with_host(json.as_bytes(), &env)
}

fn no_vars(_: &str) -> Option<String> {
    None
}

#[test]
fn a_client_secret_from_sds_is_read_at_every_exchange_so_a_rotation_needs_no_restart() {
    let secrets = FakeSecrets::default();
    secrets.set("sp-secret", "first-s3cr3t\n");
    let config = sds_source(&sds_config(r#""client_secret_sds":"sp-secret""#), &secrets).unwrap();
    let s = &config.tokens[0].source;
    assert_eq!(
        *secrets.asked.lock().unwrap(),
        vec![SdsRef {
            name: "sp-secret".into(),
            sds_config: None
        }],
        "subscribed once, at configuration"
    );
    let first = form(&call(s.begin(RES, NOW_MS, 1).1).body);
    assert_eq!(first["client_secret"], "first-s3cr3t", "trimmed");
    secrets.set("sp-secret", "second-s3cr3t");
    let second = form(&call(s.begin(RES, NOW_MS + 1, 2).1).body);
    assert_eq!(second["client_secret"], "second-s3cr3t");
    assert!(
        s.describe().contains("SDS secret \"sp-secret\""),
        "{}",
        s.describe()
    );
    let shown = format!("{config:?} {} {}", s.describe(), s.fingerprint());
    assert!(!shown.contains("s3cr3t"), "{shown}");
}

#[test]
fn an_sds_secret_with_a_config_source_hands_its_json_to_the_host() {
    let secrets = FakeSecrets::default();
    let config = sds_config(
        r#""client_secret_sds":{"name":"sp","sds_config":{"path_config_source":{"path":"/etc/sds/sp.yaml"}}}"#,
    );
    sds_source(&config, &secrets).unwrap();
    let asked = secrets.asked.lock().unwrap();
    assert_eq!(asked[0].name, "sp");
    let source: serde_json::Value =
        serde_json::from_str(asked[0].sds_config.as_deref().unwrap()).unwrap();
    assert_eq!(source["path_config_source"]["path"], "/etc/sds/sp.yaml");
}

#[test]
fn a_host_without_secrets_refuses_the_sds_fields_naming_the_field_and_the_fix() {
    for (credential, field) in [
        (
            r#""client_secret_sds":"sp""#,
            "`token_source.client_secret_sds`",
        ),
        (
            r#""client_certificate_sds":{"name":"sp-cert"}"#,
            "`token_source.client_certificate_sds`",
        ),
    ] {
        let e = Config::parse_with_env(sds_config(credential).as_bytes(), &no_vars as Vars)
            .unwrap_err()
            .to_string();
        for needle in [field, "proxy-wasm", "client_secret_env", "libaoai_msi.so"] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
    let targets = format!(
        r#"{{"targets":[{{"hosts":["a.example"]}},{{"hosts":["b.example"],"token_source":{{"type":"client_credentials","tenant_id":"{TENANT}","client_id":"{CLIENT}","client_secret_sds":"sp"}}}}]}}"#
    );
    let e = Config::parse_with_env(targets.as_bytes(), &no_vars as Vars)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`targets[1].token_source.client_secret_sds`"),
        "{e}"
    );
}

#[test]
fn a_secret_the_host_will_not_subscribe_to_is_refused_naming_it_and_where_to_declare_it() {
    let secrets = FakeSecrets {
        refuse: true,
        ..FakeSecrets::default()
    };
    let e = sds_source(&sds_config(r#""client_secret_sds":"nowhere""#), &secrets)
        .unwrap_err()
        .to_string();
    for needle in [
        "`token_source.client_secret_sds`",
        "\"nowhere\"",
        "no such static secret",
        "static_resources.secrets",
        "sds_config",
    ] {
        assert!(e.contains(needle), "{needle}: {e}");
    }
}

#[test]
fn the_four_credential_fields_are_exclusive_and_the_error_names_those_set() {
    let secrets = FakeSecrets::default();
    let e = sds_source(
        &sds_config(r#""client_secret_env":"SP","client_certificate_sds":"c""#),
        &secrets,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("token_source.client_secret_env / token_source.client_certificate_sds"),
        "{e}"
    );
    assert!(
        e.contains("are set together") && e.contains("keep one"),
        "{e}"
    );
    assert!(
        secrets.asked.lock().unwrap().is_empty(),
        "nothing subscribed"
    );
}

#[test]
fn sds_references_of_the_wrong_shape_are_refused_by_path() {
    let secrets = FakeSecrets::default();
    for (credential, needle) in [
        (
            r#""client_secret_sds":"""#,
            "`token_source.client_secret_sds` is not the name",
        ),
        (
            r#""client_secret_sds":7"#,
            "`token_source.client_secret_sds` must be",
        ),
        (
            r#""client_secret_sds":{"sds_config":{}}"#,
            "`token_source.client_secret_sds.name`",
        ),
        (
            r#""client_secret_sds":{"name":"a","sds_config":"x"}"#,
            "`token_source.client_secret_sds.sds_config` must be",
        ),
        (
            r#""client_secret_sds":{"name":"a","secret":"x"}"#,
            "`token_source.client_secret_sds.secret`",
        ),
    ] {
        let e = sds_source(&sds_config(credential), &secrets)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{credential}: {e}");
    }
}

#[test]
fn a_missing_or_empty_sds_secret_at_an_exchange_is_a_retried_failure_naming_the_secret() {
    let secrets = FakeSecrets::default();
    let config = sds_source(&sds_config(r#""client_secret_sds":"sp""#), &secrets).unwrap();
    let s = &config.tokens[0].source;
    for value in [None, Some("  \n")] {
        if let Some(v) = value {
            secrets.set("sp", v);
        }
        let Step::Done(Err(failure)) = s.begin(RES, NOW_MS, 1).1 else {
            panic!("no call without a secret");
        };
        assert_eq!(failure.class(), FailureClass::Transient);
        assert_eq!(failure.label(), "secret_unavailable");
        let FetchFailure::SecretUnavailable { secret, field, .. } = &failure else {
            panic!("{failure:?}");
        };
        assert_eq!(
            (secret.as_str(), field.as_str()),
            ("sp", "token_source.client_secret_sds")
        );
        let diagnosis = crate::diagnose::Diagnosis::for_failure(
            &crate::store::Failure {
                cause: failure.clone(),
                attempts: 1,
                retry_at_ms: NOW_MS + 1000,
                at_ms: NOW_MS,
            },
            &config.tokens[0],
            NOW_MS,
        );
        assert_eq!(diagnosis.status, 503);
        assert_eq!(diagnosis.code, crate::codes::code::SDS_SECRET_UNAVAILABLE);
        for needle in ["\"sp\"", "token_source.client_secret_sds", "no restart"] {
            assert!(
                diagnosis.message.contains(needle),
                "{needle}: {}",
                diagnosis.message
            );
        }
    }
}

#[test]
fn entra_refusing_an_sds_secret_names_the_secret_not_a_variable() {
    let secrets = FakeSecrets::default();
    let config = sds_source(&sds_config(r#""client_secret_sds":"sp""#), &secrets).unwrap();
    for code in [7000215, 7000222] {
        let (_, _, message) = config.tokens[0].source.inner().refused(
            &Refusal {
                status: 401,
                codes: &[code],
                said: "",
                class: FailureClass::Refused,
                resource: RES,
            },
            &mut Map::new(),
        );
        assert!(
            message.contains("the SDS generic secret \"sp\""),
            "{message}"
        );
        assert!(!message.contains("AZURE_CLIENT_SECRET"), "{message}");
        assert!(!message.contains("restart the proxy"), "{message}");
    }
}

#[test]
fn an_sds_certificate_signs_assertions_and_is_parsed_again_only_when_its_bytes_change() {
    let (pem, public, thumbprint) = bundle();
    let secrets = FakeSecrets::default();
    secrets.set("sp-cert", &pem);
    let config = sds_source(
        &sds_config(r#""client_certificate_sds":"sp-cert""#),
        &secrets,
    )
    .unwrap();
    let s = &config.tokens[0].source;
    let fields = form(&call(s.begin(RES, NOW_MS, 1).1).body);
    let metadata = Token::decode_metadata(&fields["client_assertion"]).unwrap();
    assert_eq!(
        metadata.certificate_sha256_thumbprint(),
        Some(thumbprint.as_str())
    );
    let options = VerificationOptions {
        artificial_time: Some(jwt_simple::prelude::Duration::from_secs(NOW_MS / 1000 + 1)),
        ..VerificationOptions::default()
    };
    public
        .verify_token::<NoCustomClaims>(&fields["client_assertion"], Some(options))
        .expect("signed with the SDS certificate's key");
    assert!(format!("{s:?}").contains(&thumbprint), "{s:?}");

    let parsed = client_credentials::ParsedCertificate::default();
    let a = parsed.key_for(&pem).unwrap();
    let b = parsed.key_for(&pem).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&a, &b),
        "same bytes: the key parsed before"
    );
    let (other, _, other_thumbprint) = bundle();
    let c = parsed.key_for(&other).unwrap();
    assert_eq!(c.thumbprint, other_thumbprint, "new bytes: parsed again");

    // A rotation to something that is not a bundle: a failure naming the
    // secret and what is missing, never the bytes.
    secrets.set("sp-cert", "MIIsecretbytes-not-a-pem");
    let Step::Done(Err(failure)) = s.begin(RES, NOW_MS, 2).1 else {
        panic!("no call with a broken certificate");
    };
    let shown = format!("{failure:?}");
    assert!(shown.contains("no -----BEGIN CERTIFICATE-----"), "{shown}");
    assert!(!shown.contains("MIIsecret"), "{shown}");
    assert!(!format!("{config:?}").contains("PRIVATE KEY"));
}
