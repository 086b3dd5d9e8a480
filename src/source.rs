//! Where tokens come from. Every source is a request builder and an answer
//! parser around the one lifecycle the agent runs (single flight, refresh
//! ahead, backoff, bounded waits): sources differ here and nowhere else.
//!
//! | source | calls | AZURE_FACTS |
//! |---|---|---|
//! | `imds` | `GET` IMDS | §1 |
//! | `app_service` | `GET $IDENTITY_ENDPOINT` with `X-IDENTITY-HEADER` | §2 |
//! | `client_credentials` | `POST` Entra's v2.0 token endpoint, secret or certificate assertion | §2 |
//! | `workload_identity` | `GET` the projected service-account token, then `POST` it to Entra | §2 |
//! | `http` | `GET` a local key or token service; the value is sent as a bearer token or an `api-key` | DESIGN |
//!
//! A fetch is an [`Exchange`]: one call, or two for workload identity (the
//! assertion first). Each step is pure: the time and a nonce come in, a
//! request or a result goes out. Secrets (the identity header, the client
//! secret, the signing key, assertions) live in [`Secret`]s or types whose
//! `Debug` says nothing about them.

use std::fmt;

use jwt_simple::prelude::*;
use serde::Serialize;

use crate::token::{parse_credential, parse_response, FetchFailure, Issued, Secret};

pub const IMDS_PATH: &str = "/metadata/identity/oauth2/token";
pub const IMDS_API_VERSION: &str = "2018-02-01";
pub const APP_SERVICE_API_VERSION: &str = "2019-08-01";
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Lifetime of a certificate client assertion (MSAL uses 10 minutes).
pub const ASSERTION_LIFETIME_S: u64 = 600;
/// A projected service-account token is ~1 KB; anything near this is not one.
pub const MAX_ASSERTION_BYTES: usize = 16 * 1024;

/// Where one token comes from, with everything needed to ask for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Imds(ImdsSource),
    AppService(AppServiceSource),
    ClientCredentials(ClientCredentialsSource),
    WorkloadIdentity(WorkloadIdentitySource),
    Http(HttpSource),
}

/// How a request carries its credential upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CredentialKind {
    /// `authorization: Bearer <value>`.
    #[default]
    Bearer,
    /// `api-key: <value>`: for resources that still take keys.
    ApiKey,
}

/// A local service that hands out a key or a token (a vault agent, a
/// rotated key file behind a small server, a token proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSource {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub credential: CredentialKind,
    /// Poll interval for a value that names no expiry.
    pub refresh_interval_ms: u64,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsSource {
    /// Envoy cluster the token call is dispatched to.
    pub cluster: String,
    /// `:authority` of the token call.
    pub authority: String,
    pub identity: IdentitySelector,
    /// Timeout of one token call.
    pub timeout_ms: u64,
}

/// Which managed identity IMDS should issue a token for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySelector {
    /// No selector: the system-assigned identity, or the only user-assigned one.
    Default,
    ClientId(String),
    ObjectId(String),
    ResourceId(String),
}

impl IdentitySelector {
    /// The IMDS query parameter and its value, if any.
    pub fn query_param(&self) -> Option<(&'static str, &str)> {
        match self {
            IdentitySelector::Default => None,
            IdentitySelector::ClientId(v) => Some(("client_id", v)),
            IdentitySelector::ObjectId(v) => Some(("object_id", v)),
            IdentitySelector::ResourceId(v) => Some(("msi_res_id", v)),
        }
    }

    /// The App Service parameter: `principal_id` for an object id, and
    /// `mi_res_id` (not `msi_res_id`) for a resource id.
    pub fn app_service_param(&self) -> Option<(&'static str, &str)> {
        match self {
            IdentitySelector::Default => None,
            IdentitySelector::ClientId(v) => Some(("client_id", v)),
            IdentitySelector::ObjectId(v) => Some(("principal_id", v)),
            IdentitySelector::ResourceId(v) => Some(("mi_res_id", v)),
        }
    }

    /// The selector in words.
    pub fn describe(&self) -> String {
        match self {
            IdentitySelector::Default => "the only (or system-assigned) identity".to_owned(),
            IdentitySelector::ClientId(v) => format!("client id {v}"),
            IdentitySelector::ObjectId(v) => format!("object id {v}"),
            IdentitySelector::ResourceId(v) => format!("resource id {v}"),
        }
    }
}

/// App Service and Container Apps: the platform's local identity endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppServiceSource {
    pub cluster: String,
    /// `host:port` of `IDENTITY_ENDPOINT`.
    pub authority: String,
    /// Path of `IDENTITY_ENDPOINT`.
    pub path: String,
    pub identity: IdentitySelector,
    /// `IDENTITY_HEADER`, sent as `X-IDENTITY-HEADER`.
    pub header: Secret,
    pub timeout_ms: u64,
}

/// A service principal: Entra's client-credentials grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCredentialsSource {
    pub cluster: String,
    /// The Entra host: `login.microsoftonline.com`, `.us`, `login.chinacloudapi.cn`.
    pub authority: String,
    pub tenant_id: String,
    pub client_id: String,
    pub credential: ClientCredential,
    pub timeout_ms: u64,
}

/// How a service principal proves itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCredential {
    /// A client secret, read from the environment variable `env`.
    Secret { env: String, value: Secret },
    /// A certificate and its private key (PEM), read from `env`: each
    /// exchange carries a new RS256 assertion naming the certificate.
    Certificate { env: String, key: Box<SigningKey> },
}

/// AKS workload identity: the projected service-account token, fetched anew
/// for every exchange from an Envoy listener that serves the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIdentitySource {
    pub cluster: String,
    pub authority: String,
    pub tenant_id: String,
    pub client_id: String,
    pub assertion_cluster: String,
    pub assertion_authority: String,
    pub assertion_path: String,
    pub timeout_ms: u64,
}

/// An RS256 signing key with the SHA-256 thumbprint of its certificate.
/// `Debug` shows the thumbprint only.
#[derive(Clone)]
pub struct SigningKey {
    key: RS256KeyPair,
    /// `x5t#S256`: base64url of the SHA-256 of the certificate's DER.
    pub thumbprint: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SigningKey(<private key redacted>, x5t#S256 {})",
            self.thumbprint
        )
    }
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.thumbprint == other.thumbprint
    }
}

impl Eq for SigningKey {}

impl SigningKey {
    /// Read a PEM bundle holding a certificate and its private key (in any
    /// order). The error says what is missing, never what is there.
    pub fn from_pem_bundle(pem: &str) -> Result<SigningKey, String> {
        // A variable set in one line may carry `\n` escapes instead of newlines.
        let pem = if pem.contains('\n') {
            pem.to_owned()
        } else {
            pem.replace("\\n", "\n")
        };
        let certificate =
            pem_block(&pem, "CERTIFICATE").ok_or("holds no -----BEGIN CERTIFICATE----- block")?;
        let key = ["PRIVATE KEY", "RSA PRIVATE KEY"]
            .iter()
            .find_map(|label| pem_block(&pem, label))
            .ok_or("holds no -----BEGIN PRIVATE KEY----- (or RSA PRIVATE KEY) block")?;
        let mut key = RS256KeyPair::from_der(&key).map_err(|_| {
            "holds a private key that is not an RSA key this filter can read (PKCS#8 or PKCS#1)"
        })?;
        let thumbprint = {
            use base64::Engine;
            use sha2::Digest;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sha2::Sha256::digest(&certificate))
        };
        let metadata = KeyMetadata::default()
            .with_certificate_sha256_thumbprint(&thumbprint)
            .map_err(|_| "holds a certificate whose thumbprint cannot be set")?;
        key.attach_metadata(metadata)
            .map_err(|_| "holds a key that cannot carry the certificate's thumbprint")?;
        Ok(SigningKey { key, thumbprint })
    }
}

/// The DER bytes of the first PEM block with this label.
fn pem_block(pem: &str, label: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let body: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Imds(_) => "imds",
            Source::AppService(_) => "app_service",
            Source::ClientCredentials(_) => "client_credentials",
            Source::WorkloadIdentity(_) => "workload_identity",
            Source::Http(_) => "http",
        }
    }

    /// How the credential is sent.
    pub fn credential(&self) -> CredentialKind {
        match self {
            Source::Http(s) => s.credential,
            _ => CredentialKind::Bearer,
        }
    }

    /// The identity this source signs in as, in words for a message.
    pub fn identity_noun(&self) -> &'static str {
        match self {
            Source::Imds(_) | Source::AppService(_) => "managed identity",
            Source::ClientCredentials(_) => "service principal",
            Source::WorkloadIdentity(_) => "workload identity",
            Source::Http(_) => "credential service",
        }
    }

    /// The application (client) id and tenant an Entra source signs in with.
    pub fn application(&self) -> Option<(&str, &str)> {
        match self {
            Source::ClientCredentials(s) => Some((&s.client_id, &s.tenant_id)),
            Source::WorkloadIdentity(s) => Some((&s.client_id, &s.tenant_id)),
            Source::Imds(_) | Source::AppService(_) | Source::Http(_) => None,
        }
    }

    /// The Envoy cluster of the token call.
    pub fn cluster(&self) -> &str {
        match self {
            Source::Imds(s) => &s.cluster,
            Source::AppService(s) => &s.cluster,
            Source::ClientCredentials(s) => &s.cluster,
            Source::WorkloadIdentity(s) => &s.cluster,
            Source::Http(s) => &s.cluster,
        }
    }

    pub fn timeout_ms(&self) -> u64 {
        match self {
            Source::Imds(s) => s.timeout_ms,
            Source::AppService(s) => s.timeout_ms,
            Source::ClientCredentials(s) => s.timeout_ms,
            Source::WorkloadIdentity(s) => s.timeout_ms,
            Source::Http(s) => s.timeout_ms,
        }
    }

    /// How many calls one exchange makes (each within `timeout_ms`).
    pub fn calls(&self) -> u64 {
        match self {
            Source::WorkloadIdentity(_) => 2,
            _ => 1,
        }
    }

    /// Who the token is for, in words, for log lines: no secrets.
    pub fn describe(&self) -> String {
        match self {
            Source::Imds(s) => format!("IMDS via cluster {} for {}", s.cluster, s.identity.describe()),
            Source::AppService(s) => format!(
                "the App Service identity endpoint {}{} via cluster {} for {}",
                s.authority,
                crate::safe::path_shown(&s.path),
                s.cluster,
                s.identity.describe()
            ),
            Source::ClientCredentials(s) => format!(
                "Entra ({}, tenant {}) via cluster {} for application {} with a {}",
                s.authority,
                s.tenant_id,
                s.cluster,
                s.client_id,
                match &s.credential {
                    ClientCredential::Secret { env, .. } => format!("client secret from {env}"),
                    ClientCredential::Certificate { env, key } => {
                        format!("certificate from {env} (x5t#S256 {})", key.thumbprint)
                    }
                }
            ),
            Source::WorkloadIdentity(s) => format!(
                "Entra ({}, tenant {}) via cluster {} for application {} with the service-account token from cluster {}",
                s.authority, s.tenant_id, s.cluster, s.client_id, s.assertion_cluster
            ),
            Source::Http(s) => format!(
                "the credential service {}{} via cluster {}, sent as {}",
                s.authority,
                crate::safe::path_shown(&s.path),
                s.cluster,
                match s.credential {
                    CredentialKind::Bearer => "a bearer token",
                    CredentialKind::ApiKey => "an api-key",
                }
            ),
        }
    }

    /// Start a fetch of a token for `resource`.
    pub fn begin(&self, resource: &str, now_ms: u64, nonce: u64) -> (Exchange, Step) {
        match self {
            Source::WorkloadIdentity(s) => (
                Exchange::Assertion,
                Step::Call(TokenRequest {
                    cluster: s.assertion_cluster.clone(),
                    timeout_ms: s.timeout_ms,
                    headers: vec![
                        (":method", "GET".to_owned()),
                        (":path", s.assertion_path.clone()),
                        (":authority", s.assertion_authority.clone()),
                    ],
                    body: Vec::new(),
                }),
            ),
            _ => (
                Exchange::Token,
                self.token_request(resource, now_ms, nonce, None),
            ),
        }
    }

    /// A call of `exchange` was answered (`status` is `None` without an
    /// HTTP answer): the next call, or the result.
    pub fn answered(
        &self,
        exchange: Exchange,
        resource: &str,
        status: Option<u16>,
        body: &[u8],
        now_ms: u64,
        nonce: u64,
    ) -> (Exchange, Step) {
        match exchange {
            Exchange::Token => (
                Exchange::Token,
                Step::Done(match self {
                    Source::Http(s) => parse_credential(
                        status,
                        body,
                        now_ms,
                        s.refresh_interval_ms,
                        (s.credential == CredentialKind::Bearer).then_some(resource),
                    ),
                    _ => parse_response(status, body, now_ms, resource),
                }),
            ),
            Exchange::Assertion => match parse_assertion(status, body) {
                Ok(assertion) => (
                    Exchange::Token,
                    self.token_request(resource, now_ms, nonce, Some(assertion)),
                ),
                Err(failure) => (Exchange::Token, Step::Done(Err(failure))),
            },
        }
    }

    /// The call that returns the token itself.
    fn token_request(
        &self,
        resource: &str,
        now_ms: u64,
        nonce: u64,
        assertion: Option<Secret>,
    ) -> Step {
        match self {
            Source::Imds(s) => {
                let mut path = format!(
                    "{IMDS_PATH}?api-version={IMDS_API_VERSION}&resource={}",
                    percent_encode(resource)
                );
                if let Some((name, value)) = s.identity.query_param() {
                    path.push_str(&format!("&{name}={}", percent_encode(value)));
                }
                Step::Call(TokenRequest::get(
                    &s.cluster,
                    s.timeout_ms,
                    path,
                    &s.authority,
                    ("metadata", "true".to_owned()),
                ))
            }
            Source::AppService(s) => {
                let separator = if s.path.contains('?') { '&' } else { '?' };
                let mut path = format!(
                    "{}{separator}api-version={APP_SERVICE_API_VERSION}&resource={}",
                    s.path,
                    percent_encode(resource)
                );
                if let Some((name, value)) = s.identity.app_service_param() {
                    path.push_str(&format!("&{name}={}", percent_encode(value)));
                }
                Step::Call(TokenRequest::get(
                    &s.cluster,
                    s.timeout_ms,
                    path,
                    &s.authority,
                    ("x-identity-header", s.header.expose().to_owned()),
                ))
            }
            Source::ClientCredentials(s) => {
                let proof = match &s.credential {
                    ClientCredential::Secret { value, .. } => {
                        vec![("client_secret", value.expose().to_owned())]
                    }
                    ClientCredential::Certificate { key, .. } => {
                        let url = token_url(&s.authority, &s.tenant_id);
                        match client_assertion(key, &s.client_id, &url, now_ms, nonce) {
                            Ok(assertion) => vec![
                                ("client_assertion_type", JWT_BEARER.to_owned()),
                                ("client_assertion", assertion),
                            ],
                            Err(failure) => return Step::Done(Err(failure)),
                        }
                    }
                };
                entra_request(
                    &s.cluster,
                    &s.authority,
                    &s.tenant_id,
                    &s.client_id,
                    s.timeout_ms,
                    resource,
                    proof,
                )
            }
            Source::Http(s) => Step::Call(TokenRequest {
                cluster: s.cluster.clone(),
                timeout_ms: s.timeout_ms,
                headers: vec![
                    (":method", "GET".to_owned()),
                    (":path", s.path.clone()),
                    (":authority", s.authority.clone()),
                    ("accept", "application/json".to_owned()),
                ],
                body: Vec::new(),
            }),
            Source::WorkloadIdentity(s) => match assertion {
                Some(assertion) => entra_request(
                    &s.cluster,
                    &s.authority,
                    &s.tenant_id,
                    &s.client_id,
                    s.timeout_ms,
                    resource,
                    vec![
                        ("client_assertion_type", JWT_BEARER.to_owned()),
                        ("client_assertion", assertion.expose().to_owned()),
                    ],
                ),
                None => Step::Done(Err(FetchFailure::AssertionUnavailable {
                    problem: "no service-account token was fetched first".to_owned(),
                })),
            },
        }
    }
}

/// `https://<authority>/<tenant>/oauth2/v2.0/token`: the client assertion's `aud`.
pub fn token_url(authority: &str, tenant: &str) -> String {
    format!("https://{authority}/{tenant}/oauth2/v2.0/token")
}

fn entra_request(
    cluster: &str,
    authority: &str,
    tenant: &str,
    client_id: &str,
    timeout_ms: u64,
    resource: &str,
    proof: Vec<(&str, String)>,
) -> Step {
    let scope = format!("{}/.default", resource.trim_end_matches('/'));
    let mut form = vec![
        ("grant_type", "client_credentials".to_owned()),
        ("client_id", client_id.to_owned()),
        ("scope", scope),
    ];
    form.extend(proof);
    let body = form
        .iter()
        .map(|(k, v)| format!("{k}={}", percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
        .into_bytes();
    Step::Call(TokenRequest {
        cluster: cluster.to_owned(),
        timeout_ms,
        headers: vec![
            (":method", "POST".to_owned()),
            (
                ":path",
                format!("/{}/oauth2/v2.0/token", percent_encode(tenant)),
            ),
            (":authority", authority.to_owned()),
            (
                "content-type",
                "application/x-www-form-urlencoded".to_owned(),
            ),
        ],
        body,
    })
}

#[derive(Serialize)]
struct NoClaims {}

/// A fresh RS256 client assertion (AZURE_FACTS §2): `aud` the token URL,
/// `iss` = `sub` = the client id, a unique `jti`, valid for ten minutes.
fn client_assertion(
    key: &SigningKey,
    client_id: &str,
    token_url: &str,
    now_ms: u64,
    nonce: u64,
) -> Result<String, FetchFailure> {
    let now = jwt_simple::prelude::Duration::from_secs(now_ms / 1000);
    let claims = JWTClaims {
        issued_at: Some(now),
        expires_at: Some(now + jwt_simple::prelude::Duration::from_secs(ASSERTION_LIFETIME_S)),
        invalid_before: Some(now),
        issuer: Some(client_id.to_owned()),
        subject: Some(client_id.to_owned()),
        audiences: Some(Audiences::AsString(token_url.to_owned())),
        jwt_id: Some(jti(nonce, now_ms)),
        nonce: None,
        custom: NoClaims {},
    };
    key.key
        .sign(claims)
        .map_err(|_| FetchFailure::AssertionUnavailable {
            problem: "the client assertion could not be signed with the certificate's key"
                .to_owned(),
        })
}

/// A UUID-shaped `jti` from a random per-VM seed, a counter and the time.
fn jti(nonce: u64, now_ms: u64) -> String {
    let a = crate::clock::splitmix64(nonce);
    let b = crate::clock::splitmix64(nonce ^ now_ms.rotate_left(17));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

/// The projected service-account token, as the token-file listener serves it.
pub fn parse_assertion(status: Option<u16>, body: &[u8]) -> Result<Secret, FetchFailure> {
    let unavailable = |problem: String| FetchFailure::AssertionUnavailable { problem };
    let status = status.ok_or_else(|| {
        unavailable("the service-account token listener did not answer".to_owned())
    })?;
    if status != 200 {
        return Err(unavailable(format!(
            "the service-account token listener answered {status}"
        )));
    }
    if body.len() > MAX_ASSERTION_BYTES {
        return Err(unavailable(format!(
            "the service-account token is larger than {MAX_ASSERTION_BYTES} bytes"
        )));
    }
    let token = std::str::from_utf8(body)
        .ok()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            unavailable("the service-account token file is empty or not text".to_owned())
        })?;
    if crate::claims::jwt_segments(token).is_none() {
        return Err(unavailable(
            "the service-account token file does not hold a JWT".to_owned(),
        ));
    }
    Ok(Secret::new(token.to_owned()))
}

/// RFC 3986 unreserved characters pass; everything else is %XX.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Which call of a fetch is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// Workload identity: the service-account token.
    Assertion,
    /// The token endpoint.
    Token,
}

/// What a fetch needs next.
#[derive(Debug)]
pub enum Step {
    Call(TokenRequest),
    Done(Result<Issued, FetchFailure>),
}

/// A call for the glue to dispatch. `Debug` names the call but shows no
/// header value beyond the method, path and authority, and no body.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub cluster: String,
    pub timeout_ms: u64,
    /// Pseudo-headers and headers, in order.
    pub headers: Vec<(&'static str, String)>,
    /// Empty for a GET.
    pub body: Vec<u8>,
}

impl TokenRequest {
    /// A GET of `path` on `cluster`, with the one header that proves where
    /// it comes from (IMDS's `metadata`, App Service's `x-identity-header`).
    fn get(
        cluster: &str,
        timeout_ms: u64,
        path: String,
        authority: &str,
        proof: (&'static str, String),
    ) -> TokenRequest {
        TokenRequest {
            cluster: cluster.to_owned(),
            timeout_ms,
            headers: vec![
                (":method", "GET".to_owned()),
                (":path", path),
                (":authority", authority.to_owned()),
                proof,
            ],
            body: Vec::new(),
        }
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.header(":path")
    }
}

impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| *n).collect();
        write!(
            f,
            "TokenRequest({} {}{} via {}, headers {names:?}, body {} bytes)",
            self.header(":method"),
            self.header(":authority"),
            crate::safe::path_shown(self.path()),
            self.cluster,
            self.body.len()
        )
    }
}

#[cfg(test)]
mod tests;
