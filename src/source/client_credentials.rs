//! `client_credentials`: a service principal signs in to Entra with a client
//! secret or a certificate (a fresh RS256 assertion per exchange).

use std::fmt;
use std::sync::{Arc, Mutex};

use jwt_simple::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::entra::{self, app_ids, entra_endpoint, token_url, EntraApp, Proof, SecretPlace};
use super::{Configure, Endpoint, Refusal, Step, TokenSource, Verdict};
use crate::azure::Cloud;
use crate::fields::checks::json_kind;
use crate::fields::checks::timeout;
use crate::fields::env::{self, env_name, required_env, shown_env, Env, SdsRef, SdsSecret};
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
    /// A client secret in an SDS generic secret (`client_secret_sds`), read
    /// from the host at every exchange: a rotated value is used from the
    /// next exchange on, without a restart.
    SdsSecret { secret: SdsSecret, field: String },
    /// A certificate and its private key (PEM) in an SDS generic secret
    /// (`client_certificate_sds`), read at every exchange and parsed again
    /// only when its bytes change.
    SdsCertificate {
        secret: SdsSecret,
        field: String,
        parsed: ParsedCertificate,
    },
}

/// The key last parsed from an SDS certificate, with the SHA-256 of the
/// bytes it came from. Shared by the clones of a configuration (every
/// thread's worker): the lock is held to compare and parse, never across a
/// host call. `Debug` shows the thumbprint only; equality ignores it.
#[derive(Clone, Default)]
pub struct ParsedCertificate(Arc<Mutex<Option<LastParsed>>>);

/// The SHA-256 of the PEM bytes last parsed, and the key they held.
type LastParsed = ([u8; 32], Arc<SigningKey>);

impl ParsedCertificate {
    /// The key of `pem`: the one parsed before if the bytes are the same.
    pub(crate) fn key_for(&self, pem: &str) -> Result<Arc<SigningKey>, String> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(pem.as_bytes()).into();
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, key)) = last.as_ref() {
            if *seen == digest {
                return Ok(Arc::clone(key));
            }
        }
        let key = Arc::new(SigningKey::from_pem_bundle(pem)?);
        *last = Some((digest, Arc::clone(&key)));
        Ok(key)
    }

    /// The thumbprint of the certificate last read, for a refusal's words.
    fn thumbprint(&self) -> Option<String> {
        let last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref().map(|(_, key)| key.thumbprint.clone())
    }
}

impl fmt::Debug for ParsedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.thumbprint() {
            Some(thumbprint) => write!(f, "ParsedCertificate(x5t#S256 {thumbprint})"),
            None => write!(f, "ParsedCertificate(none yet)"),
        }
    }
}

impl PartialEq for ParsedCertificate {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ParsedCertificate {}

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
    /// An SDS generic secret: its name, or `{"name", "sds_config"}`.
    client_secret_sds: Option<Value>,
    client_certificate_sds: Option<Value>,
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
    let given: Vec<String> = [
        ("client_secret_env", raw.client_secret_env.is_some()),
        (
            "client_certificate_env",
            raw.client_certificate_env.is_some(),
        ),
        ("client_secret_sds", raw.client_secret_sds.is_some()),
        (
            "client_certificate_sds",
            raw.client_certificate_sds.is_some(),
        ),
    ]
    .iter()
    .filter(|(_, set)| *set)
    .map(|(name, _)| sub(name))
    .collect();
    if given.len() > 1 {
        return Err(invalid(
            given.join(" / "),
            "are set together",
            "keep one: a client secret (client_secret_env or client_secret_sds), or a certificate with its private key (client_certificate_env or client_certificate_sds)",
        ));
    }
    let credential = if let Some(value) = raw.client_secret_sds {
        let field_name = sub("client_secret_sds");
        let secret = subscribe(value, &field_name, env, "the client secret")?;
        ClientCredential::SdsSecret {
            secret,
            field: field_name,
        }
    } else if let Some(value) = raw.client_certificate_sds {
        let field_name = sub("client_certificate_sds");
        let secret = subscribe(
            value,
            &field_name,
            env,
            "the certificate and its private key (PEM)",
        )?;
        ClientCredential::SdsCertificate {
            secret,
            field: field_name,
            parsed: ParsedCertificate::default(),
        }
    } else if let Some(name) = raw.client_certificate_env {
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
    } else {
        let name = env_name(
            raw.client_secret_env
                .as_deref()
                .unwrap_or(env::AZURE_CLIENT_SECRET),
            &sub("client_secret_env"),
        )?;
        let value = required_env(env, &name, field, "the client secret")?;
        ClientCredential::Secret {
            env: name,
            value: Secret::new(value),
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

/// Read `client_secret_sds` / `client_certificate_sds` (a secret's name, or
/// `{"name": …, "sds_config": {…}}` as Envoy's own `SdsSecretConfig`) and
/// subscribe to it through the host, which may not be able to.
fn subscribe(
    value: Value,
    field: &str,
    env: Env<'_>,
    what: &str,
) -> Result<SdsSecret, ConfigError> {
    let sds = sds_ref(value, field)?;
    env.subscribe(&sds).map_err(|refused| match refused {
        None => invalid(
            field,
            format!(
                "names the SDS generic secret \"{}\" for {what}, which the proxy-wasm filter cannot read (Envoy gives wasm filters no secrets)",
                sds.name
            ),
            "use client_secret_env or client_certificate_env (an environment variable of the proxy), or load the native dynamic module libaoai_msi.so instead of the wasm filter: it reads SDS secrets and follows their rotation",
        ),
        Some(why) => invalid(
            field,
            format!("names the SDS generic secret \"{}\", to which Envoy would not subscribe ({why})", sds.name),
            match sds.sds_config {
                None => "declare it in the bootstrap's static_resources.secrets (a generic_secret of that name), or give {\"name\": …, \"sds_config\": {…}} with an SDS config source such as {\"path_config_source\": {\"path\": …, \"watched_directory\": {\"path\": …}}} or {\"ads\": {}}",
                Some(_) => "check sds_config (an Envoy ConfigSource, such as {\"path_config_source\": {\"path\": …, \"watched_directory\": {\"path\": …}}} or {\"ads\": {}}); SDS also needs the bootstrap's node id and cluster (node: {id, cluster}, or --service-node and --service-cluster)",
            },
        ),
    })
}

/// An SDS secret's name, and its config source as JSON if it has one.
fn sds_ref(value: Value, field: &str) -> Result<SdsRef, ConfigError> {
    let check_name = |name: &str| {
        let ok = (1..=256).contains(&name.len()) && !name.chars().any(char::is_control);
        if ok {
            Ok(name.to_owned())
        } else {
            Err(invalid(
                field,
                "is not the name of an SDS secret",
                "write the secret's name as Envoy knows it (its `name` in static_resources.secrets or in the SDS resource)",
            ))
        }
    };
    match value {
        Value::String(name) => Ok(SdsRef {
            name: check_name(&name)?,
            sds_config: None,
        }),
        Value::Object(mut map) => {
            let name = match map.remove("name") {
                Some(Value::String(name)) => check_name(&name)?,
                _ => {
                    return Err(invalid(
                        format!("{field}.name"),
                        "is missing or not a string",
                        "name the SDS secret: {\"name\": \"…\", \"sds_config\": {…}}",
                    ))
                }
            };
            let sds_config = match map.remove("sds_config") {
                None => None,
                Some(config @ Value::Object(_)) => Some(config.to_string()),
                Some(other) => {
                    return Err(ConfigError::WrongType {
                        field: format!("{field}.sds_config"),
                        expected: "an Envoy ConfigSource object".to_owned(),
                        found: json_kind(&other).to_owned(),
                    })
                }
            };
            if let Some(key) = map.keys().next() {
                return Err(invalid(
                    format!("{field}.{key}"),
                    "is not a field of an SDS secret reference",
                    "use name and sds_config only",
                ));
            }
            Ok(SdsRef { name, sds_config })
        }
        other => Err(ConfigError::WrongType {
            field: field.to_owned(),
            expected: "an SDS secret's name, or {\"name\", \"sds_config\"}".to_owned(),
            found: json_kind(&other).to_owned(),
        }),
    }
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
                ClientCredential::SdsSecret { secret, .. } => {
                    format!("client secret from the SDS secret {:?}", secret.name())
                }
                ClientCredential::SdsCertificate { secret, .. } => {
                    format!("certificate from the SDS secret {:?}", secret.name())
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
            // Rotates: the secret's name, never a value or a thumbprint.
            ClientCredential::SdsSecret { secret, .. } => format!("secret_sds:{}", secret.name()),
            ClientCredential::SdsCertificate { secret, .. } => {
                format!("certificate_sds:{}", secret.name())
            }
        };
        format!(
            "client_credentials\n{}\n{}\n{}\n{}\n{credential}",
            self.cluster, self.authority, self.tenant_id, self.client_id
        )
    }

    fn token_request(&self, resource: &str, now_ms: u64, nonce: u64, _: Option<Secret>) -> Step {
        let app = self.app();
        let unavailable = |secret: &SdsSecret, field: &str, problem: String| {
            Step::Done(Err(FetchFailure::SecretUnavailable {
                secret: secret.name().to_owned(),
                field: field.to_owned(),
                problem,
            }))
        };
        match &self.credential {
            ClientCredential::Secret { value, .. } => {
                app.token_request(resource, Proof::Secret(value.expose()))
            }
            ClientCredential::Certificate { key, .. } => {
                self.signed(&app, key, resource, now_ms, nonce)
            }
            ClientCredential::SdsSecret { secret, field } => match secret.read() {
                Ok(value) => app.token_request(resource, Proof::Secret(&value)),
                Err(problem) => unavailable(secret, field, problem.to_owned()),
            },
            ClientCredential::SdsCertificate {
                secret,
                field,
                parsed,
            } => match secret.read() {
                Ok(pem) => match parsed.key_for(&pem) {
                    Ok(key) => self.signed(&app, &key, resource, now_ms, nonce),
                    Err(problem) => unavailable(secret, field, problem),
                },
                Err(problem) => unavailable(secret, field, problem.to_owned()),
            },
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
    /// The token request with a fresh assertion signed with `key`.
    fn signed(
        &self,
        app: &EntraApp<'_>,
        key: &SigningKey,
        resource: &str,
        now_ms: u64,
        nonce: u64,
    ) -> Step {
        let url = token_url(&self.authority, &self.tenant_id);
        match client_assertion(key, &self.client_id, &url, now_ms, nonce) {
            Ok(assertion) => app.token_request(resource, Proof::Assertion(&assertion)),
            Err(failure) => Step::Done(Err(failure)),
        }
    }

    /// The application as its token requests and refusals name it.
    fn app(&self) -> EntraApp<'_> {
        let (secret, thumbprint) = match &self.credential {
            ClientCredential::Secret { env, .. } => (Some(SecretPlace::Env(env.as_str())), None),
            ClientCredential::Certificate { key, .. } => (None, Some(key.thumbprint.clone())),
            ClientCredential::SdsSecret { secret, .. } => {
                (Some(SecretPlace::Sds(secret.name())), None)
            }
            ClientCredential::SdsCertificate { parsed, .. } => (None, parsed.thumbprint()),
        };
        EntraApp {
            cluster: &self.cluster,
            authority: &self.authority,
            tenant: &self.tenant_id,
            client: &self.client_id,
            timeout_ms: self.timeout_ms,
            secret,
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
