//! `client_credentials`: a service principal signs in to Entra with a client
//! secret or a certificate (a fresh RS256 assertion per exchange).

use std::fmt;

use jwt_simple::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::entra::{self, app_ids, entra_endpoint, token_url, EntraApp, Proof};
use super::{Configure, Endpoint, Refusal, Step, TokenSource, Verdict};
use crate::azure::Cloud;
use crate::fields::checks::timeout;
use crate::fields::env::{self, env_name, required_env, shown_env, Env};
use crate::fields::errors::{invalid, read, ConfigError};
use crate::token::{FetchFailure, Secret};

pub use super::entra::JWT_BEARER;
/// Lifetime of a certificate client assertion (MSAL uses 10 minutes).
pub const ASSERTION_LIFETIME_S: u64 = 600;

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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientCredentials {
    #[serde(rename = "type")]
    _kind: Option<String>,
    cluster: Option<String>,
    authority: Option<String>,
    tenant_id: Option<String>,
    client_id: Option<String>,
    client_secret_env: Option<String>,
    client_certificate_env: Option<String>,
    timeout_ms: Option<u64>,
    /// Refused with a message naming `client_secret_env`: a secret does not
    /// belong in a plugin configuration that Envoy's admin endpoint shows.
    client_secret: Option<serde::de::IgnoredAny>,
}

impl Configure for ClientCredentialsSource {
    const KIND: &'static str = "client_credentials";

    fn configure(value: Value, field: &str, env: Env<'_>) -> Result<Self, ConfigError> {
        check_client_credentials(read(value, &format!("{field}."))?, field, env)
    }
}

fn check_client_credentials(
    raw: RawClientCredentials,
    field: &str,
    env: Env<'_>,
) -> Result<ClientCredentialsSource, ConfigError> {
    let sub = |name: &str| format!("{field}.{name}");
    if raw.client_secret.is_some() {
        return Err(invalid(
            sub("client_secret"),
            "holds a secret in the plugin configuration, which Envoy's admin endpoint and config dumps show",
            format!(
                "put the secret in an environment variable of the proxy and name it in client_secret_env (default {}), listed in vm_config.environment_variables.host_env_keys (Istio: vmConfig.env)",
                env::AZURE_CLIENT_SECRET
            ),
        ));
    }
    let (cluster, authority) = entra_endpoint(raw.cluster, raw.authority, field, None)?;
    let (tenant_id, client_id) = app_ids(raw.tenant_id, raw.client_id, field, env)?;
    let credential = match (raw.client_secret_env, raw.client_certificate_env) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                format!(
                    "{} / {}",
                    sub("client_secret_env"),
                    sub("client_certificate_env")
                ),
                "are set together",
                "keep one: a client secret, or a certificate with its private key",
            ))
        }
        (None, Some(name)) => {
            let name = env_name(&name, &sub("client_certificate_env"))?;
            let pem = required_env(
                env,
                &name,
                field,
                "the certificate and its private key (PEM)",
            )?;
            let key = SigningKey::from_pem_bundle(&pem).map_err(|problem| {
                invalid(
                    sub("client_certificate_env"),
                    format!("names {}, which {problem}", shown_env(&name)),
                    "put the PEM certificate and its RSA private key (both blocks) in that variable",
                )
            })?;
            ClientCredential::Certificate {
                env: name,
                key: Box::new(key),
            }
        }
        (secret_env, None) => {
            let name = env_name(
                secret_env.as_deref().unwrap_or(env::AZURE_CLIENT_SECRET),
                &sub("client_secret_env"),
            )?;
            let value = required_env(env, &name, field, "the client secret")?;
            ClientCredential::Secret {
                env: name,
                value: Secret::new(value),
            }
        }
    };
    Ok(ClientCredentialsSource {
        cluster,
        authority,
        tenant_id,
        client_id,
        credential,
        timeout_ms: timeout(raw.timeout_ms, field)?,
    })
}

impl TokenSource for ClientCredentialsSource {
    fn cluster(&self) -> &str {
        &self.cluster
    }

    fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }

    fn identity_noun(&self) -> &'static str {
        "service principal"
    }

    fn application(&self) -> Option<(&str, &str)> {
        Some((&self.client_id, &self.tenant_id))
    }

    fn cloud(&self) -> Option<Cloud> {
        Cloud::of_authority(&self.authority)
    }

    fn describe(&self) -> String {
        format!(
            "Entra ({}, tenant {}) via cluster {} for application {} with a {}",
            self.authority,
            self.tenant_id,
            self.cluster,
            self.client_id,
            match &self.credential {
                ClientCredential::Secret { env, .. } => format!("client secret from {env}"),
                ClientCredential::Certificate { env, key } => {
                    format!("certificate from {env} (x5t#S256 {})", key.thumbprint)
                }
            }
        )
    }

    fn fingerprint(&self) -> String {
        let credential = match &self.credential {
            ClientCredential::Secret { env, .. } => format!("secret:{env}"),
            ClientCredential::Certificate { key, .. } => {
                format!("certificate:{}", key.thumbprint)
            }
        };
        format!(
            "client_credentials\n{}\n{}\n{}\n{}\n{credential}",
            self.cluster, self.authority, self.tenant_id, self.client_id
        )
    }

    fn token_request(&self, resource: &str, now_ms: u64, nonce: u64, _: Option<Secret>) -> Step {
        let app = self.app();
        match &self.credential {
            ClientCredential::Secret { value, .. } => {
                app.token_request(resource, Proof::Secret(value.expose()))
            }
            ClientCredential::Certificate { key, .. } => {
                let url = token_url(&self.authority, &self.tenant_id);
                match client_assertion(key, &self.client_id, &url, now_ms, nonce) {
                    Ok(assertion) => app.token_request(resource, Proof::Assertion(&assertion)),
                    Err(failure) => Step::Done(Err(failure)),
                }
            }
        }
    }

    fn endpoint(&self, _cluster: &str) -> Endpoint {
        entra::endpoint(&self.authority)
    }

    fn refused(&self, refusal: &Refusal<'_>, details: &mut Map<String, Value>) -> Verdict {
        entra::refused(&self.app(), refusal, details)
    }
}

impl ClientCredentialsSource {
    /// The application as its token requests and refusals name it.
    fn app(&self) -> EntraApp<'_> {
        let (secret_env, thumbprint) = match &self.credential {
            ClientCredential::Secret { env, .. } => (Some(env.as_str()), None),
            ClientCredential::Certificate { key, .. } => (None, Some(key.thumbprint.as_str())),
        };
        EntraApp {
            cluster: &self.cluster,
            authority: &self.authority,
            tenant: &self.tenant_id,
            client: &self.client_id,
            timeout_ms: self.timeout_ms,
            secret_env,
            thumbprint,
        }
    }
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
pub(crate) fn jti(nonce: u64, now_ms: u64) -> String {
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
