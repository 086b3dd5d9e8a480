//! The Entra ID v2.0 token endpoint, `POST /{tenant}/oauth2/v2.0/token`, for
//! the client-credentials grant (AZURE_FACTS.md §2, "Entra client
//! credentials" and "AKS workload identity").
//!
//! The form body is decoded as `application/x-www-form-urlencoded` (percent
//! escapes and `+`). Scripted replies ([`Emulator::script_entra`]) are
//! applied first, to model outages; otherwise the request is checked in this
//! order, each refusal in Entra's shape
//! `{"error","error_description":"AADSTS<code>: <text> Trace ID: … Correlation ID: … Timestamp: …","error_codes":[<code>],"timestamp","trace_id","correlation_id","error_uri"}`
//! (`correlation_id` echoes a `client-request-id` header, as Entra does):
//!
//! | check | status | `error` | code |
//! |---|---|---|---|
//! | tenant path segment is not `Settings::entra_tenant` | 400 | `invalid_request` | 90002 ✓ |
//! | `grant_type`, `scope` or `client_id` missing | 400 | `invalid_request` | 900144 |
//! | `grant_type` is not `client_credentials` | 400 | `unsupported_grant_type` | 70003 |
//! | `scope` is not one `<resource>/.default` | 400 | `invalid_scope` | 1002012 ✓ |
//! | `client_id` names no app of `Settings::entra_apps` | 400 | `unauthorized_client` | 700016 ✓ |
//! | neither `client_secret` nor `client_assertion` | 401 | `invalid_client` | 7000218 ✓ |
//! | `client_secret` matches none of the app's secrets | 401 | `invalid_client` | 7000215 ✓ |
//! | `client_secret` matches an expired secret | 401 | `invalid_client` | 7000222 ✓ |
//! | `client_assertion_type` is not `…:jwt-bearer` | 401 | `invalid_client` | 70002 |
//! | `client_assertion` is not a JWS | 401 | `invalid_client` | 50027 |
//!
//! **Certificate assertions** (header `x5t#S256`, or a legacy `x5t`): `alg`
//! must be RS256 and the thumbprint one of the app's `certificates`, and the
//! signature must verify with that certificate's public key, else 401
//! `invalid_client` 700027 ✓; `aud` must be
//! `https://<Host without port>/<tenant>/oauth2/v2.0/token`, else 700023 ✓;
//! `iss` and `sub` the client id, else 700021; `exp` in the future and at
//! most an hour ahead, `nbf` (if any) not in the future, else 700024 ✓; a
//! `jti`, never seen before for that app, else 50013 (all 401
//! `invalid_client`). Entra's own code for a replayed assertion was not
//! found in any public source: 50013 is its generic "assertion is invalid"
//! code, chosen here.
//!
//! **Federated assertions** (no thumbprint in the header; a Kubernetes
//! service-account token): its `iss` must be the issuer of one of the app's
//! `federated` credentials, else 400 `invalid_client` 700211 ✓; `sub` and
//! `aud` must match that credential (case-sensitive), else 400
//! `invalid_request` 70021 ✓; the signature must verify with this emulator's
//! OIDC issuer key ([`crate::Emulator::oidc_issuer`]), else 400
//! `invalid_client` 50013; `exp` in the future and `nbf` not, else 400
//! `invalid_client` 700024 ✓. The same projected token is exchanged many
//! times, so its `jti` is not checked for replay.
//!
//! ✓ marks codes and texts confirmed in public error reports of the real
//! service (GitHub issue threads quoting Entra's responses); the others are
//! real AADSTS codes whose use here is the emulator's best reading.
//!
//! A granted token is minted like a managed identity's, but for the app:
//! `aud` is the scope without `/.default`, `oid` the app's `object_id`,
//! `appid` its client id, `tid` the tenant, and no `xms_mirid`. The answer is
//! `{"token_type":"Bearer","expires_in":<n>,"ext_expires_in":<n>,"access_token":…}`
//! with numbers, lasting `Settings::token_lifetime_s`. Secrets and assertions
//! are recorded for tests ([`EntraRequest`]) and never printed.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::Serialize;
use serde_json::{json, Value};

use crate::app_service::settle;
use crate::credentials::{fresh_id, names_certificate, registered_key, Jws};
use crate::tokens::{mint_for_app, AppPrincipal};
use crate::{now_ms, App, Emulator, ImdsReply, Shared};

/// `client_assertion_type` of a JWT client assertion (RFC 7523).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// An app registration (service principal) in the emulated tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntraApp {
    pub client_id: String,
    pub object_id: String,
    pub secrets: Vec<AppSecret>,
    /// `x5t#S256` thumbprints of its certificates ([`crate::Certificate`]),
    /// or whole PEM certificates.
    pub certificates: Vec<String>,
    pub federated: Vec<FederatedCredential>,
}

impl EntraApp {
    /// An app with no credential yet.
    pub fn new(client_id: &str, object_id: &str) -> EntraApp {
        EntraApp {
            client_id: client_id.to_owned(),
            object_id: object_id.to_owned(),
            ..EntraApp::default()
        }
    }
}

/// A client secret of an app; its value is never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct AppSecret {
    pub value: String,
    pub expired: bool,
}

impl AppSecret {
    pub fn new(value: &str) -> AppSecret {
        AppSecret {
            value: value.to_owned(),
            expired: false,
        }
    }

    pub fn expired(value: &str) -> AppSecret {
        AppSecret {
            value: value.to_owned(),
            expired: true,
        }
    }
}

impl std::fmt::Debug for AppSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppSecret")
            .field("value", &"<secret>")
            .field("expired", &self.expired)
            .finish()
    }
}

/// A federated identity credential: which external tokens the app trusts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FederatedCredential {
    pub issuer: String,
    pub subject: String,
    pub audience: String,
}

impl FederatedCredential {
    pub fn new(issuer: &str, subject: &str, audience: &str) -> FederatedCredential {
        FederatedCredential {
            issuer: issuer.to_owned(),
            subject: subject.to_owned(),
            audience: audience.to_owned(),
        }
    }
}

/// One token request as Entra received it, and how it was answered.
#[derive(Debug, Clone, Serialize)]
pub struct EntraRequest {
    pub tenant: String,
    /// The `Host` header, port included.
    pub host: String,
    /// The decoded form, in order, secrets and assertions included.
    pub form: Vec<(String, String)>,
    pub status: u16,
    /// Header and claims of a `client_assertion` that parsed as a JWS,
    /// whether or not it was accepted.
    pub assertion_header: Option<Value>,
    pub assertion_claims: Option<Value>,
    /// The AADSTS code of a refusal (also of a scripted Entra-shaped one).
    pub error_code: Option<u32>,
    /// When it was answered, in milliseconds since the epoch.
    pub at_ms: u64,
}

/// A scripted reply in Entra's error shape, e.g.
/// `entra_error(503, "temporarily_unavailable", 90033, "A transient error has occurred. Please try again.")`.
pub fn entra_error(status: u16, error: &str, code: u32, text: &str) -> ImdsReply {
    ImdsReply::Raw {
        status,
        body: error_body(error, code, text, &fresh_id(), &fresh_id(), now_s()).to_string(),
    }
}

fn error_body(
    error: &str,
    code: u32,
    text: &str,
    trace: &str,
    correlation: &str,
    at: u64,
) -> Value {
    let timestamp = timestamp(at);
    json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {text} Trace ID: {trace} Correlation ID: {correlation} Timestamp: {timestamp}"),
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    })
}

/// Why Entra refuses a request.
struct Refusal {
    status: u16,
    error: &'static str,
    code: u32,
    text: String,
}

fn refuse(status: u16, error: &'static str, code: u32, text: impl Into<String>) -> Refusal {
    Refusal {
        status,
        error,
        code,
        text: text.into(),
    }
}

fn invalid_client(status: u16, code: u32, text: impl Into<String>) -> Refusal {
    refuse(status, "invalid_client", code, text)
}

pub(crate) fn routes() -> Router<App> {
    Router::new().route("/{tenant}/oauth2/v2.0/token", post(token))
}

async fn token(
    State(app): State<App>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let reply = app
        .shared
        .world()
        .identity
        .entra_script
        .pop_front()
        .unwrap_or(ImdsReply::Token);
    let reply = settle(reply).await;
    let assertion = field(&form, "client_assertion").and_then(Jws::parse);
    let correlation = headers
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        .map_or_else(fresh_id, str::to_owned);
    let trace = fresh_id();
    let (status, error_code, response) = match reply {
        ImdsReply::Exact(raw) => (raw.status, None, raw.into_response()),
        ImdsReply::Raw { status, body } => {
            let code = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v.get("error_codes")?.get(0)?.as_u64())
                .and_then(|c| u32::try_from(c).ok());
            (status, code, json_reply(status, body, &trace, &correlation))
        }
        ImdsReply::Token | ImdsReply::Slow { .. } => {
            match grant(&app.shared, &tenant, &host, &form, assertion.as_ref()) {
                Ok(body) => (
                    200,
                    None,
                    json_reply(200, body.to_string(), &trace, &correlation),
                ),
                Err(refusal) => {
                    let body = error_body(
                        refusal.error,
                        refusal.code,
                        &refusal.text,
                        &trace,
                        &correlation,
                        now_s(),
                    );
                    let reply = json_reply(refusal.status, body.to_string(), &trace, &correlation);
                    (refusal.status, Some(refusal.code), reply)
                }
            }
        }
    };
    if app.verbose {
        let credential = if field(&form, "client_secret").is_some() {
            "secret".to_owned()
        } else if let Some(jws) = &assertion {
            match jws.header_str("x5t#S256").or_else(|| jws.header_str("x5t")) {
                Some(thumbprint) => format!("certificate x5t#S256={thumbprint}"),
                None => format!("federated sub={}", jws.claim_str("sub").unwrap_or("-")),
            }
        } else if field(&form, "client_assertion").is_some() {
            "assertion (unreadable)".to_owned()
        } else {
            "none".to_owned()
        };
        let outcome = error_code
            .map(|c| format!(" AADSTS{c}"))
            .unwrap_or_default();
        println!(
            "[emulator] ENTRA POST /{tenant}/oauth2/v2.0/token client_id={} {credential} scope={} -> {status}{outcome}",
            field(&form, "client_id").unwrap_or("-"),
            field(&form, "scope").unwrap_or("-"),
        );
    }
    app.shared
        .world()
        .identity
        .entra_requests
        .push(EntraRequest {
            tenant,
            host,
            form,
            status,
            assertion_header: assertion.as_ref().map(|a| a.header.clone()),
            assertion_claims: assertion.as_ref().map(|a| a.claims.clone()),
            error_code,
            at_ms: now_ms(),
        });
    response
}

fn json_reply(status: u16, body: String, trace: &str, correlation: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [
            ("content-type", "application/json; charset=utf-8"),
            ("cache-control", "no-store, no-cache"),
            ("x-ms-request-id", trace),
            ("client-request-id", correlation),
        ],
        body,
    )
        .into_response()
}

/// The first non-empty value of a form field.
fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, v)| k == name && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

fn missing(name: &str) -> Refusal {
    refuse(
        400,
        "invalid_request",
        900144,
        format!("The request body must contain the following parameter: '{name}'."),
    )
}

/// How the app proved who it is, for the token's `appidacr`.
enum Proof {
    Secret,
    Certificate { jti: String },
    Federated,
}

/// Every check of a client-credentials request; the token answer when all pass.
fn grant(
    shared: &Shared,
    tenant: &str,
    host: &str,
    form: &[(String, String)],
    assertion: Option<&Jws>,
) -> Result<Value, Refusal> {
    let settings = shared.world().settings.clone();
    if !tenant.eq_ignore_ascii_case(&settings.entra_tenant) {
        return Err(refuse(
            400,
            "invalid_request",
            90002,
            format!("Tenant '{tenant}' not found. This may happen if there are no active subscriptions for the tenant. Check to make sure you have the correct tenant ID. Check with your subscription administrator."),
        ));
    }
    let grant_type = field(form, "grant_type").ok_or_else(|| missing("grant_type"))?;
    if grant_type != "client_credentials" {
        return Err(refuse(
            400,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        ));
    }
    let scope = field(form, "scope").ok_or_else(|| missing("scope"))?;
    let resource = scope
        .strip_suffix("/.default")
        .filter(|r| !r.is_empty() && !r.contains(char::is_whitespace))
        .ok_or_else(|| {
            refuse(
                400,
                "invalid_scope",
                1002012,
                format!("The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."),
            )
        })?;
    let client_id = field(form, "client_id").ok_or_else(|| missing("client_id"))?;
    let app = settings
        .entra_apps
        .iter()
        .find(|a| a.client_id.eq_ignore_ascii_case(client_id))
        .ok_or_else(|| {
            refuse(
                400,
                "unauthorized_client",
                700016,
                format!("Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."),
            )
        })?;
    let proof = if let Some(secret) = field(form, "client_secret") {
        check_secret(app, secret)?
    } else if let Some(raw) = field(form, "client_assertion") {
        if field(form, "client_assertion_type") != Some(JWT_BEARER) {
            return Err(invalid_client(
                401,
                70002,
                format!("Error validating credentials. The client_assertion_type must be '{JWT_BEARER}'."),
            ));
        }
        let jws = assertion
            .filter(|_| !raw.is_empty())
            .ok_or_else(|| invalid_client(401, 50027, "JWT token is invalid or malformed."))?;
        if jws.header.get("x5t#S256").is_some() || jws.header.get("x5t").is_some() {
            check_certificate(app, tenant, host, jws, now_s())?
        } else {
            check_federated(shared, app, jws, now_s())?
        }
    } else {
        return Err(invalid_client(
            401,
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        ));
    };
    let mut world = shared.world();
    if let Proof::Certificate { jti } = &proof {
        let first_use = world
            .identity
            .seen_jtis
            .insert((app.client_id.clone(), jti.clone()));
        if !first_use {
            return Err(invalid_client(
                401,
                50013,
                format!("Assertion is invalid: the client assertion with jti '{jti}' was already used. A client assertion is good for one token request."),
            ));
        }
    }
    let principal = AppPrincipal {
        client_id: &app.client_id,
        object_id: &app.object_id,
        tenant: &settings.entra_tenant,
        appidacr: match proof {
            Proof::Secret => "1",
            Proof::Certificate { .. } | Proof::Federated => "2",
        },
    };
    let token = mint_for_app(
        &world.key,
        &principal,
        resource,
        settings.token_lifetime_s,
        settings.token_padding,
    );
    world.minted += 1;
    world.minted_tokens.push(token.clone());
    let lifetime = settings.token_lifetime_s;
    Ok(
        json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token}),
    )
}

fn check_secret(app: &EntraApp, secret: &str) -> Result<Proof, Refusal> {
    match app.secrets.iter().find(|s| s.value == secret) {
        Some(found) if !found.expired => Ok(Proof::Secret),
        Some(_) => Err(invalid_client(
            401,
            7000222,
            format!("The provided client secret keys for app '{}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds.", app.client_id),
        )),
        None => Err(invalid_client(
            401,
            7000215,
            format!("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{}'.", app.client_id),
        )),
    }
}

fn check_certificate(
    app: &EntraApp,
    tenant: &str,
    host: &str,
    jws: &Jws,
    now: u64,
) -> Result<Proof, Refusal> {
    let thumbprint = jws
        .header_str("x5t#S256")
        .or_else(|| jws.header_str("x5t"))
        .unwrap_or("");
    let not_registered = || {
        invalid_client(
            401,
            700027,
            format!("Client assertion contains an invalid signature. [Reason - The key was not found., Thumbprint of key used by client: '{thumbprint}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{}'.]", app.client_id),
        )
    };
    if !app
        .certificates
        .iter()
        .any(|c| names_certificate(c, thumbprint))
    {
        return Err(not_registered());
    }
    let key = app
        .certificates
        .iter()
        .find_map(|c| registered_key(c, thumbprint))
        .ok_or_else(not_registered)?;
    if jws.header_str("alg") != Some("RS256") || !jws.verifies_with(&key) {
        return Err(invalid_client(
            401,
            700027,
            format!("Client assertion contains an invalid signature. [Reason - Key was found, but use of the key to verify the signature failed., Thumbprint of key used by client: '{thumbprint}']"),
        ));
    }
    let host = host_without_port(host);
    let expected = format!("https://{host}/{tenant}/oauth2/v2.0/token");
    if !jws.audiences().contains(&expected.as_str()) {
        return Err(invalid_client(
            401,
            700023,
            "Client assertion audience claim does not match Realm issuer. Review the documentation at https://docs.microsoft.com/azure/active-directory/develop/active-directory-certificate-credentials .",
        ));
    }
    if jws.claim_str("iss") != Some(app.client_id.as_str())
        || jws.claim_str("sub") != Some(app.client_id.as_str())
    {
        return Err(invalid_client(
            401,
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter. Review the documentation at https://docs.microsoft.com/azure/active-directory/develop/active-directory-certificate-credentials .",
        ));
    }
    let exp = jws.claim_time("exp");
    let nbf = jws.claim_time("nbf");
    let in_range =
        exp.is_some_and(|exp| exp > now && exp <= now + 3600) && nbf.is_none_or(|nbf| nbf <= now);
    if !in_range {
        return Err(invalid_client(
            401,
            700024,
            out_of_time_range(now, nbf, exp),
        ));
    }
    let jti = jws
        .claim_str("jti")
        .filter(|j| !j.is_empty())
        .ok_or_else(|| {
            invalid_client(
                401,
                50013,
                "Assertion is invalid: the client assertion has no 'jti' claim.",
            )
        })?;
    Ok(Proof::Certificate {
        jti: jti.to_owned(),
    })
}

fn check_federated(shared: &Shared, app: &EntraApp, jws: &Jws, now: u64) -> Result<Proof, Refusal> {
    let issuer = jws.claim_str("iss").unwrap_or("");
    let subject = jws.claim_str("sub").unwrap_or("");
    let audiences = jws.audiences();
    let trusted: Vec<_> = app
        .federated
        .iter()
        .filter(|f| f.issuer == issuer)
        .collect();
    if trusted.is_empty() {
        return Err(invalid_client(
            400,
            700211,
            format!("No matching federated identity record found for presented assertion issuer '{issuer}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion. https://learn.microsoft.com/entra/workload-id/workload-identity-federation"),
        ));
    }
    if !trusted
        .iter()
        .any(|f| f.subject == subject && audiences.contains(&f.audience.as_str()))
    {
        return Err(refuse(
            400,
            "invalid_request",
            70021,
            format!("No matching federated identity record found for presented assertion. Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: '{}'. https://learn.microsoft.com/entra/workload-id/workload-identity-federation", audiences.join(",")),
        ));
    }
    let key = {
        let world = shared.world();
        let ours = &world.identity.issuer;
        ours.key
            .as_ref()
            .filter(|_| ours.url == issuer)
            .map(|(_, public)| public.clone())
    };
    if jws.header_str("alg") != Some("RS256") || !key.is_some_and(|k| jws.verifies_with(&k)) {
        return Err(invalid_client(
            400,
            50013,
            format!("Assertion failed signature validation. [Reason - The key was not found among the signing keys of issuer '{issuer}'.]"),
        ));
    }
    let exp = jws.claim_time("exp");
    let nbf = jws.claim_time("nbf");
    if !(exp.is_some_and(|exp| exp > now) && nbf.is_none_or(|nbf| nbf <= now)) {
        return Err(invalid_client(
            400,
            700024,
            out_of_time_range(now, nbf, exp),
        ));
    }
    Ok(Proof::Federated)
}

fn out_of_time_range(now: u64, nbf: Option<u64>, exp: Option<u64>) -> String {
    format!(
        "Client assertion is not within its valid time range. Current time: {}, assertion valid from {}, expiry time of assertion {}. Review the documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials .",
        iso_time(now),
        iso_time(nbf.unwrap_or(0)),
        exp.map_or_else(|| "(none)".to_owned(), iso_time),
    )
}

/// `login.example:443` → `login.example`; `[::1]:8080` → `[::1]`.
fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(name, _)| name)
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Year, month, day, hour, minute, second (UTC) of epoch seconds.
fn civil(secs: u64) -> (u64, u64, u64, u64, u64, u64) {
    let days = secs / 86_400;
    let rest = secs % 86_400;
    // Days since 1970-01-01 to a date, counting in 400-year eras from 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day, rest / 3600, rest % 3600 / 60, rest % 60)
}

/// `2024-07-15 11:14:02Z`, as in Entra's `timestamp`.
fn timestamp(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}Z")
}

/// `2024-10-02T22:05:03.0000000Z`, as in Entra's time-range messages.
fn iso_time(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.0000000Z")
}

/// Scripting and recording of the Entra token endpoint.
impl Emulator {
    /// Queue replies for the next Entra token requests, in order. They are
    /// applied before any check (an outage answers whatever was asked):
    /// [`entra_error`] for Entra-shaped refusals, `ImdsReply::Slow` for
    /// delays, `ImdsReply::Exact` for any bytes, `ImdsReply::Token` to run
    /// the checks as usual.
    pub fn script_entra(&self, replies: impl IntoIterator<Item = ImdsReply>) {
        self.shared.world().identity.entra_script.extend(replies);
    }

    /// Every request the Entra token endpoint received.
    pub fn entra_requests(&self) -> Vec<EntraRequest> {
        self.shared.world().identity.entra_requests.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_seconds_become_entra_timestamps() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00Z");
        assert_eq!(timestamp(1_720_941_242), "2024-07-14 07:14:02Z");
        assert_eq!(iso_time(951_782_400), "2000-02-29T00:00:00.0000000Z");
        assert_eq!(timestamp(4_102_444_799), "2099-12-31 23:59:59Z");
    }

    #[test]
    fn the_port_is_dropped_from_the_host_but_not_from_an_ipv6_address() {
        assert_eq!(
            host_without_port("login.microsoftonline.com"),
            "login.microsoftonline.com"
        );
        assert_eq!(host_without_port("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(host_without_port("[::1]:8080"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
    }

    #[test]
    fn entra_errors_carry_the_code_in_the_description_and_the_list() {
        let ImdsReply::Raw { status, body } =
            entra_error(503, "temporarily_unavailable", 90033, "Try again.")
        else {
            panic!("not a raw reply");
        };
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status, 503);
        assert_eq!(body["error"], "temporarily_unavailable");
        assert_eq!(body["error_codes"], json!([90033]));
        let description = body["error_description"].as_str().unwrap();
        assert!(description.starts_with("AADSTS90033: Try again. Trace ID: "));
        assert!(description.contains(" Correlation ID: "));
        assert!(description.ends_with(&format!(
            "Timestamp: {}",
            body["timestamp"].as_str().unwrap()
        )));
    }

    #[test]
    fn secrets_are_not_shown_by_debug() {
        let app = EntraApp {
            secrets: vec![AppSecret::new("s3cr3t-value")],
            ..EntraApp::new("c", "o")
        };
        assert!(!format!("{app:?}").contains("s3cr3t"));
    }
}
