//! The Entra token endpoint over HTTP: client secrets, certificate
//! assertions and federated (workload identity) assertions.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;

use aoai_emulator::{
    entra_error, new_certificate, AppSecret, Certificate, Emulator, EntraApp, FederatedCredential,
    Settings, RESOURCE, TENANT_ID,
};
use common::{call, claims, Answer};
use jwt_simple::prelude::*;

const LOGIN: &str = "login.microsoftonline.com";
const CLIENT: &str = "5ca1ab1e-0000-4000-8000-00000000c0de";
const OBJECT: &str = "0b1ec700-0000-4000-8000-00000000c0de";
const SECRET: &str = "s3cr3t~with+plus/slash=and&amp";
const SCOPE: &str = "https://cognitiveservices.azure.com/.default";
const EXCHANGE: &str = "api://AzureADTokenExchange";
const SA: &str = "system:serviceaccount:my-app:my-sa";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn app() -> EntraApp {
    EntraApp {
        secrets: vec![AppSecret::new(SECRET), AppSecret::expired("old-secret")],
        ..EntraApp::new(CLIENT, OBJECT)
    }
}

fn emulator_with(app: EntraApp) -> Emulator {
    Emulator::start(Settings {
        entra_apps: vec![app],
        token_lifetime_s: 3599,
        ..Settings::default()
    })
    .unwrap()
}

fn post(emulator: &Emulator, host: &str, tenant: &str, form: &[(&str, &str)]) -> Answer {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    call(
        emulator,
        "POST",
        host,
        &format!("/{tenant}/oauth2/v2.0/token"),
        &[("content-type", "application/x-www-form-urlencoded")],
        &body,
    )
}

fn with_secret(emulator: &Emulator, client_id: &str, secret: &str) -> Answer {
    post(
        emulator,
        LOGIN,
        TENANT_ID,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("scope", SCOPE),
            ("client_secret", secret),
        ],
    )
}

fn with_assertion(emulator: &Emulator, assertion: &str) -> Answer {
    post(
        emulator,
        LOGIN,
        TENANT_ID,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("scope", SCOPE),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion),
        ],
    )
}

/// Entra's error shape, and the one code it names.
fn assert_refused(answer: &Answer, status: u16, error: &str, code: u64) {
    assert_eq!(answer.status, status, "{}", answer.body);
    let body = &answer.body;
    assert_eq!(body["error"], error, "{body}");
    assert_eq!(body["error_codes"], serde_json::json!([code]), "{body}");
    let description = body["error_description"].as_str().unwrap();
    assert!(
        description.starts_with(&format!("AADSTS{code}: ")),
        "{description}"
    );
    assert!(description.contains(" Trace ID: "), "{description}");
    assert!(description.contains(" Correlation ID: "), "{description}");
    for field in ["timestamp", "trace_id", "correlation_id", "error_uri"] {
        assert!(body[field].is_string(), "{field} in {body}");
    }
    assert_eq!(
        body["error_uri"],
        format!("https://login.microsoftonline.com/error?code={code}")
    );
}

/// A certificate client assertion as MSAL builds one, with these claims.
fn assertion(cert: &Certificate, aud: &str, jti: &str) -> String {
    let key = RS256KeyPair::from_pem(&cert.key_pem).unwrap();
    sign_with(key, cert, aud, jti)
}

fn sign_with(mut key: RS256KeyPair, cert: &Certificate, aud: &str, jti: &str) -> String {
    key.attach_metadata(
        KeyMetadata::default()
            .with_certificate_sha256_thumbprint(&cert.thumbprint_sha256)
            .unwrap(),
    )
    .unwrap();
    let claims = Claims::create(Duration::from_mins(10))
        .with_audience(aud)
        .with_issuer(CLIENT)
        .with_subject(CLIENT)
        .with_jwt_id(jti);
    key.sign(claims).unwrap()
}

fn token_url() -> String {
    format!("https://{LOGIN}/{TENANT_ID}/oauth2/v2.0/token")
}

fn with_certificate(cert: &Certificate) -> Emulator {
    emulator_with(EntraApp {
        certificates: vec![cert.thumbprint_sha256.clone()],
        ..EntraApp::new(CLIENT, OBJECT)
    })
}

#[test]
fn the_right_secret_gets_a_token_for_the_app_with_numeric_lifetimes() {
    let emulator = emulator_with(app());
    let answer = with_secret(&emulator, CLIENT, SECRET);
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["token_type"], "Bearer");
    assert_eq!(answer.body["expires_in"], 3599);
    assert_eq!(answer.body["ext_expires_in"], 3599);
    let token = answer.body["access_token"].as_str().unwrap();
    let claims = claims(token);
    assert_eq!(claims["aud"], RESOURCE);
    assert_eq!(claims["oid"], OBJECT);
    assert_eq!(claims["appid"], CLIENT);
    assert_eq!(claims["tid"], TENANT_ID);
    assert_eq!(claims["appidacr"], "1");
    assert!(claims.get("xms_mirid").is_none(), "{claims}");
    assert_eq!(emulator.minted_tokens(), [token.to_owned()]);
    let recorded = &emulator.entra_requests()[0];
    assert_eq!(recorded.status, 200);
    assert_eq!(recorded.tenant, TENANT_ID);
    assert_eq!(recorded.host, LOGIN);
    assert!(recorded
        .form
        .contains(&("client_secret".to_owned(), SECRET.to_owned())));
    assert_eq!(recorded.error_code, None);
}

#[test]
fn an_app_token_is_accepted_by_the_data_plane_when_the_app_holds_the_role() {
    let emulator = Emulator::start(Settings {
        entra_apps: vec![app()],
        role_holders: HashSet::from([OBJECT.to_owned()]),
        ..Settings::default()
    })
    .unwrap();
    let answer = with_secret(&emulator, CLIENT, SECRET);
    let bearer = format!("Bearer {}", answer.body["access_token"].as_str().unwrap());
    let chat = call(
        &emulator,
        "POST",
        "east.openai.azure.com",
        "/openai/v1/chat/completions",
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
    );
    assert_eq!(chat.status, 200, "{}", chat.body);
    assert_eq!(
        emulator.upstream_requests()[0].token_oid.as_deref(),
        Some(OBJECT)
    );
}

#[test]
fn a_wrong_secret_is_invalid_client_7000215_with_401() {
    let emulator = emulator_with(app());
    let answer = with_secret(&emulator, CLIENT, "not-it");
    assert_refused(&answer, 401, "invalid_client", 7000215);
    assert_eq!(emulator.entra_requests()[0].error_code, Some(7000215));
    assert_eq!(emulator.tokens_minted(), 0);
}

#[test]
fn an_expired_secret_is_invalid_client_7000222() {
    let emulator = emulator_with(app());
    assert_refused(
        &with_secret(&emulator, CLIENT, "old-secret"),
        401,
        "invalid_client",
        7000222,
    );
}

#[test]
fn an_unknown_app_is_unauthorized_client_700016() {
    let emulator = emulator_with(app());
    let answer = with_secret(&emulator, "00000000-0000-0000-0000-0000000000aa", SECRET);
    assert_refused(&answer, 400, "unauthorized_client", 700016);
}

#[test]
fn an_unknown_tenant_is_invalid_request_90002_before_anything_else() {
    let emulator = emulator_with(app());
    let answer = post(
        &emulator,
        LOGIN,
        "contoso.onmicrosoft.com",
        &[("grant_type", "password")],
    );
    assert_refused(&answer, 400, "invalid_request", 90002);
    assert!(answer.body["error_description"]
        .as_str()
        .unwrap()
        .contains("'contoso.onmicrosoft.com'"));
}

#[test]
fn another_grant_type_is_unsupported_70003() {
    let emulator = emulator_with(app());
    let answer = post(
        &emulator,
        LOGIN,
        TENANT_ID,
        &[
            ("grant_type", "password"),
            ("client_id", CLIENT),
            ("scope", SCOPE),
        ],
    );
    assert_refused(&answer, 400, "unsupported_grant_type", 70003);
}

#[test]
fn a_scope_without_default_or_with_two_resources_is_invalid_scope_1002012() {
    let emulator = emulator_with(app());
    for scope in [
        "https://cognitiveservices.azure.com",
        "https://cognitiveservices.azure.com/user_impersonation",
        "https://cognitiveservices.azure.com/.default https://ai.azure.com/.default",
    ] {
        let answer = post(
            &emulator,
            LOGIN,
            TENANT_ID,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT),
                ("scope", scope),
                ("client_secret", SECRET),
            ],
        );
        assert_refused(&answer, 400, "invalid_scope", 1002012);
    }
}

#[test]
fn no_credential_at_all_is_invalid_client_7000218() {
    let emulator = emulator_with(app());
    let answer = post(
        &emulator,
        LOGIN,
        TENANT_ID,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("scope", SCOPE),
        ],
    );
    assert_refused(&answer, 401, "invalid_client", 7000218);
}

#[test]
fn a_correlation_id_sent_as_client_request_id_comes_back() {
    let emulator = emulator_with(app());
    let answer = call(
        &emulator,
        "POST",
        LOGIN,
        &format!("/{TENANT_ID}/oauth2/v2.0/token"),
        &[("client-request-id", "0f0f0f0f-1111-4222-8333-444444444444")],
        "grant_type=client_credentials&client_id=nobody&scope=https%3A%2F%2Fcognitiveservices.azure.com%2F.default&client_secret=x",
    );
    assert_refused(&answer, 400, "unauthorized_client", 700016);
    assert_eq!(
        answer.body["correlation_id"],
        "0f0f0f0f-1111-4222-8333-444444444444"
    );
}

#[test]
fn a_signed_certificate_assertion_gets_a_token_and_is_recorded_with_its_header() {
    let cert = new_certificate().unwrap();
    let emulator = with_certificate(&cert);
    let answer = with_assertion(&emulator, &assertion(&cert, &token_url(), "jti-1"));
    assert_eq!(answer.status, 200, "{}", answer.body);
    let token = answer.body["access_token"].as_str().unwrap();
    assert_eq!(claims(token)["appidacr"], "2");
    assert_eq!(claims(token)["oid"], OBJECT);
    let recorded = &emulator.entra_requests()[0];
    let header = recorded.assertion_header.as_ref().unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["x5t#S256"], cert.thumbprint_sha256.as_str());
    let assertion_claims = recorded.assertion_claims.as_ref().unwrap();
    assert_eq!(assertion_claims["aud"], token_url());
    assert_eq!(assertion_claims["jti"], "jti-1");
}

#[test]
fn the_audience_is_the_token_url_of_the_host_asked_without_its_port() {
    let cert = new_certificate().unwrap();
    let emulator = with_certificate(&cert);
    let answer = post(
        &emulator,
        "login.microsoftonline.com:443",
        TENANT_ID,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("scope", SCOPE),
            ("client_assertion_type", JWT_BEARER),
            (
                "client_assertion",
                &assertion(&cert, &token_url(), "jti-port"),
            ),
        ],
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
}

#[test]
fn a_certificate_registered_as_pem_works_like_its_thumbprint() {
    let cert = new_certificate().unwrap();
    let emulator = emulator_with(EntraApp {
        certificates: vec![cert.cert_pem.clone()],
        ..EntraApp::new(CLIENT, OBJECT)
    });
    let answer = with_assertion(&emulator, &assertion(&cert, &token_url(), "jti-pem"));
    assert_eq!(answer.status, 200, "{}", answer.body);
}

#[test]
fn a_tampered_signature_is_refused_700027() {
    let cert = new_certificate().unwrap();
    let emulator = with_certificate(&cert);
    let genuine = assertion(&cert, &token_url(), "jti-a");
    let other = assertion(&cert, &token_url(), "jti-b");
    let (signed_part, _) = genuine.rsplit_once('.').unwrap();
    let (_, other_signature) = other.rsplit_once('.').unwrap();
    let tampered = format!("{signed_part}.{other_signature}");
    assert_refused(
        &with_assertion(&emulator, &tampered),
        401,
        "invalid_client",
        700027,
    );
    assert_eq!(emulator.tokens_minted(), 0);
}

#[test]
fn an_assertion_signed_by_another_key_with_a_registered_thumbprint_is_refused_700027() {
    let cert = new_certificate().unwrap();
    let emulator = with_certificate(&cert);
    let impostor = sign_with(
        RS256KeyPair::generate(2048).unwrap(),
        &cert,
        &token_url(),
        "jti-impostor",
    );
    assert_refused(
        &with_assertion(&emulator, &impostor),
        401,
        "invalid_client",
        700027,
    );
}

#[test]
fn an_unregistered_certificate_is_refused_700027() {
    let registered = new_certificate().unwrap();
    let stranger = new_certificate().unwrap();
    let emulator = with_certificate(&registered);
    let answer = with_assertion(&emulator, &assertion(&stranger, &token_url(), "jti-x"));
    assert_refused(&answer, 401, "invalid_client", 700027);
    assert!(answer.body["error_description"]
        .as_str()
        .unwrap()
        .contains("The key was not found"));
}

#[test]
fn an_assertion_for_another_audience_is_refused_700023() {
    let cert = new_certificate().unwrap();
    let emulator = with_certificate(&cert);
    for aud in [
        format!("https://login.microsoftonline.us/{TENANT_ID}/oauth2/v2.0/token"),
        format!("https://{LOGIN}/common/oauth2/v2.0/token"),
    ] {
        let answer = with_assertion(&emulator, &assertion(&cert, &aud, &aud));
        assert_refused(&answer, 401, "invalid_client", 700023);
    }
}

#[test]
fn a_replayed_jti_is_refused_50013_and_a_fresh_one_is_not() {
    let cert = new_certificate().unwrap();
    let emulator = with_certificate(&cert);
    let once = assertion(&cert, &token_url(), "jti-once");
    assert_eq!(with_assertion(&emulator, &once).status, 200);
    assert_refused(
        &with_assertion(&emulator, &once),
        401,
        "invalid_client",
        50013,
    );
    let fresh = assertion(&cert, &token_url(), "jti-twice");
    assert_eq!(with_assertion(&emulator, &fresh).status, 200);
    assert_eq!(emulator.tokens_minted(), 2);
}

#[test]
fn an_assertion_valid_for_more_than_an_hour_is_refused_700024() {
    let cert = new_certificate().unwrap();
    let emulator = with_certificate(&cert);
    let mut key = RS256KeyPair::from_pem(&cert.key_pem).unwrap();
    key.attach_metadata(
        KeyMetadata::default()
            .with_certificate_sha256_thumbprint(&cert.thumbprint_sha256)
            .unwrap(),
    )
    .unwrap();
    let claims = Claims::create(Duration::from_hours(2))
        .with_audience(token_url())
        .with_issuer(CLIENT)
        .with_subject(CLIENT)
        .with_jwt_id("jti-long");
    let long = key.sign(claims).unwrap();
    assert_refused(
        &with_assertion(&emulator, &long),
        401,
        "invalid_client",
        700024,
    );
}

fn federated_app(emulator_issuer: &str) -> EntraApp {
    EntraApp {
        federated: vec![FederatedCredential::new(emulator_issuer, SA, EXCHANGE)],
        ..EntraApp::new(CLIENT, OBJECT)
    }
}

/// An emulator whose app trusts the emulator's own service-account issuer.
fn workload_identity() -> Emulator {
    let emulator = Emulator::start(Settings::default()).unwrap();
    let issuer = emulator.oidc_issuer();
    emulator.configure(|s| s.entra_apps = vec![federated_app(&issuer)]);
    emulator
}

#[test]
fn a_service_account_token_from_the_trusted_issuer_gets_a_token() {
    let emulator = workload_identity();
    assert!(emulator
        .oidc_issuer()
        .starts_with("https://oidc.emulator.local/"));
    let sa_token = emulator.mint_service_account_token(SA, EXCHANGE, 3600);
    let sa_claims = claims(&sa_token);
    assert_eq!(sa_claims["iss"], emulator.oidc_issuer());
    assert_eq!(sa_claims["sub"], SA);
    assert_eq!(sa_claims["aud"], EXCHANGE);
    assert!(sa_claims["nbf"].is_u64() && sa_claims["iat"].is_u64());
    // The projected token is exchanged again and again while it lives.
    for _ in 0..2 {
        let answer = with_assertion(&emulator, &sa_token);
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(
            claims(answer.body["access_token"].as_str().unwrap())["appid"],
            CLIENT
        );
    }
    let header = emulator.entra_requests()[0]
        .assertion_header
        .clone()
        .unwrap();
    assert!(header.get("x5t#S256").is_none());
}

#[test]
fn another_service_account_is_refused_70021() {
    let emulator = workload_identity();
    let token =
        emulator.mint_service_account_token("system:serviceaccount:other:sa", EXCHANGE, 3600);
    let answer = with_assertion(&emulator, &token);
    assert_refused(&answer, 400, "invalid_request", 70021);
    assert!(answer.body["error_description"]
        .as_str()
        .unwrap()
        .contains("system:serviceaccount:other:sa"));
}

#[test]
fn another_audience_is_refused_70021() {
    let emulator = workload_identity();
    let token = emulator.mint_service_account_token(SA, "https://kubernetes.default.svc", 3600);
    assert_refused(
        &with_assertion(&emulator, &token),
        400,
        "invalid_request",
        70021,
    );
}

#[test]
fn a_token_from_an_untrusted_issuer_is_refused_700211() {
    let emulator = workload_identity();
    let stranger = RS256KeyPair::generate(2048).unwrap();
    let claims = Claims::create(Duration::from_hours(1))
        .with_issuer("https://oidc.other.example/cluster-2")
        .with_subject(SA)
        .with_audience(EXCHANGE);
    let token = stranger.sign(claims).unwrap();
    let answer = with_assertion(&emulator, &token);
    assert_refused(&answer, 400, "invalid_client", 700211);
    assert!(answer.body["error_description"]
        .as_str()
        .unwrap()
        .contains("'https://oidc.other.example/cluster-2'"));
}

#[test]
fn a_token_naming_the_trusted_issuer_but_signed_by_another_key_is_refused_50013() {
    let emulator = workload_identity();
    let forger = RS256KeyPair::generate(2048).unwrap();
    let claims = Claims::create(Duration::from_hours(1))
        .with_issuer(emulator.oidc_issuer())
        .with_subject(SA)
        .with_audience(EXCHANGE);
    let forged = forger.sign(claims).unwrap();
    assert_refused(
        &with_assertion(&emulator, &forged),
        400,
        "invalid_client",
        50013,
    );
}

#[test]
fn an_expired_service_account_token_is_refused_700024() {
    let emulator = workload_identity();
    let expired = emulator.mint_service_account_token(SA, EXCHANGE, 0);
    let answer = with_assertion(&emulator, &expired);
    assert_refused(&answer, 400, "invalid_client", 700024);
    assert!(answer.body["error_description"]
        .as_str()
        .unwrap()
        .contains("Client assertion is not within its valid time range."));
}

#[test]
fn scripted_outages_answer_before_any_check_and_are_recorded_with_their_code() {
    let emulator = emulator_with(app());
    emulator.script_entra([entra_error(
        503,
        "temporarily_unavailable",
        90033,
        "A transient error has occurred. Please try again.",
    )]);
    let outage = with_secret(&emulator, "nobody", "nothing");
    assert_refused(&outage, 503, "temporarily_unavailable", 90033);
    assert_eq!(with_secret(&emulator, CLIENT, SECRET).status, 200);
    let codes: Vec<_> = emulator
        .entra_requests()
        .iter()
        .map(|r| (r.status, r.error_code))
        .collect();
    assert_eq!(codes, [(503, Some(90033)), (200, None)]);
}
