//! The credentials a client presents to Entra instead of a secret, and what
//! the emulator needs to check them:
//!
//! * [`new_certificate`]: a fresh RSA 2048 key with a self-signed X.509
//!   certificate, as an app registration's certificate credential. Its
//!   `thumbprint_sha256` is what a client assertion carries in the JWT
//!   header `x5t#S256` (base64url, no padding, of SHA-256 over the
//!   certificate's DER). Every certificate made here is remembered for the
//!   life of the process, so an [`crate::EntraApp`] can name it by thumbprint
//!   alone and Entra can still verify signatures with its public key.
//! * The OIDC issuer of an emulated AKS cluster (workload identity): a second
//!   RS256 key per emulator that signs Kubernetes service-account tokens
//!   ([`Emulator::mint_service_account_token`]), which Entra accepts as
//!   federated client assertions.
//! * Compact JWS parsing and RS256 verification with the `rsa` crate, so a
//!   refusal can say exactly which check failed.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jwt_simple::prelude::*;
use jwt_simple::reexports::ct_codecs::{Base64UrlSafeNoPadding, Decoder, Encoder};
use rsa::pkcs1v15::{Signature as Rs256Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, LineEnding};
use rsa::sha2::{Digest, Sha256};
use rsa::signature::Verifier;
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde_json::Value;
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::der::{DecodePem, Encode, EncodePem};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::Validity;

use crate::{Emulator, Shared};

/// A certificate credential: the PEM certificate to register, its PKCS#8
/// private key, and the `x5t#S256` thumbprint that names it.
#[derive(Clone)]
pub struct Certificate {
    /// `-----BEGIN CERTIFICATE-----`, self-signed, valid for a year.
    pub cert_pem: String,
    /// `-----BEGIN PRIVATE KEY-----` (PKCS#8), RSA 2048.
    pub key_pem: String,
    /// base64url (no padding) of SHA-256 over the certificate's DER.
    pub thumbprint_sha256: String,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("thumbprint_sha256", &self.thumbprint_sha256)
            .field("key_pem", &"<private key>")
            .finish_non_exhaustive()
    }
}

fn io(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

/// Public keys of every certificate [`new_certificate`] made, by thumbprint.
fn known_certificates() -> &'static Mutex<HashMap<String, RsaPublicKey>> {
    static KNOWN: OnceLock<Mutex<HashMap<String, RsaPublicKey>>> = OnceLock::new();
    KNOWN.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A fresh RSA 2048 key and a self-signed X.509 certificate for it.
pub fn new_certificate() -> std::io::Result<Certificate> {
    let pair = RS256KeyPair::generate(2048).map_err(|e| io("RSA key", e))?;
    let pkcs8 = pair.to_der().map_err(|e| io("RSA key", e))?;
    let private = RsaPrivateKey::from_pkcs8_der(&pkcs8).map_err(|e| io("RSA key", e))?;
    let public = private.to_public_key();
    let id = fresh_id();
    let subject =
        Name::from_str(&format!("CN=aoai-emulator-{id}")).map_err(|e| io("certificate name", e))?;
    // A positive serial number of 16 bytes.
    let mut serial = Sha256::digest(id.as_bytes())[..16].to_vec();
    serial[0] = (serial[0] & 0x7f) | 0x01;
    let serial = SerialNumber::new(&serial).map_err(|e| io("certificate serial", e))?;
    let validity = Validity::from_now(Duration::from_secs(365 * 24 * 3600))
        .map_err(|e| io("certificate validity", e))?;
    let spki = SubjectPublicKeyInfoOwned::from_key(public.clone())
        .map_err(|e| io("certificate key", e))?;
    let signer = SigningKey::<Sha256>::new(private.clone());
    let profile = Profile::Leaf {
        issuer: subject.clone(),
        enable_key_agreement: false,
        enable_key_encipherment: false,
    };
    let certificate = CertificateBuilder::new(profile, serial, validity, subject, spki, &signer)
        .and_then(|builder| builder.build::<Rs256Signature>())
        .map_err(|e| io("certificate", e))?;
    let der = certificate.to_der().map_err(|e| io("certificate", e))?;
    let cert_pem = certificate
        .to_pem(LineEnding::LF)
        .map_err(|e| io("certificate", e))?;
    let key_pem = private
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| io("private key", e))?
        .to_string();
    let thumbprint_sha256 = thumbprint(&der)?;
    known_certificates()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(thumbprint_sha256.clone(), public);
    Ok(Certificate {
        cert_pem,
        key_pem,
        thumbprint_sha256,
    })
}

/// The `x5t#S256` of a PEM certificate.
pub fn certificate_thumbprint(cert_pem: &str) -> std::io::Result<String> {
    let certificate =
        x509_cert::Certificate::from_pem(cert_pem.trim()).map_err(|e| io("certificate", e))?;
    let der = certificate.to_der().map_err(|e| io("certificate", e))?;
    thumbprint(&der)
}

fn thumbprint(der: &[u8]) -> std::io::Result<String> {
    Base64UrlSafeNoPadding::encode_to_string(Sha256::digest(der)).map_err(|e| io("thumbprint", e))
}

/// The public key of a registered certificate `entry` (a thumbprint of a
/// certificate [`new_certificate`] made, or a PEM certificate) when it is
/// the one `thumbprint` names.
pub(crate) fn registered_key(entry: &str, thumbprint: &str) -> Option<RsaPublicKey> {
    let entry = entry.trim();
    if entry.starts_with("-----BEGIN") {
        let certificate = x509_cert::Certificate::from_pem(entry).ok()?;
        let der = certificate.to_der().ok()?;
        if self::thumbprint(&der).ok()? != thumbprint {
            return None;
        }
        let spki = certificate
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .ok()?;
        return RsaPublicKey::from_public_key_der(&spki).ok();
    }
    if entry != thumbprint {
        return None;
    }
    known_certificates()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(thumbprint)
        .cloned()
}

/// Whether `entry` (thumbprint or PEM certificate) is the certificate `thumbprint` names.
pub(crate) fn names_certificate(entry: &str, thumbprint: &str) -> bool {
    let entry = entry.trim();
    if entry.starts_with("-----BEGIN") {
        certificate_thumbprint(entry).is_ok_and(|t| t == thumbprint)
    } else {
        entry == thumbprint
    }
}

/// A compact JWS taken apart, nothing verified yet.
pub(crate) struct Jws {
    pub(crate) header: Value,
    pub(crate) claims: Value,
    signing_input: String,
    signature: Vec<u8>,
}

impl Jws {
    pub(crate) fn parse(token: &str) -> Option<Jws> {
        let mut parts = token.trim().split('.');
        let (header, claims, signature) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let json = |segment: &str| -> Option<Value> {
            let bytes = Base64UrlSafeNoPadding::decode_to_vec(segment, None).ok()?;
            serde_json::from_slice::<Value>(&bytes)
                .ok()
                .filter(Value::is_object)
        };
        Some(Jws {
            header: json(header)?,
            claims: json(claims)?,
            signing_input: format!("{header}.{claims}"),
            signature: Base64UrlSafeNoPadding::decode_to_vec(signature, None).ok()?,
        })
    }

    pub(crate) fn header_str(&self, name: &str) -> Option<&str> {
        self.header.get(name).and_then(Value::as_str)
    }

    pub(crate) fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// A time claim in seconds (a JSON number; fractions are dropped).
    pub(crate) fn claim_time(&self, name: &str) -> Option<u64> {
        let value = self.claims.get(name)?;
        value
            .as_u64()
            .or_else(|| value.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
    }

    /// `aud` as a list, whether the token carries a string or an array.
    pub(crate) fn audiences(&self) -> Vec<&str> {
        match self.claims.get("aud") {
            Some(Value::String(one)) => vec![one.as_str()],
            Some(Value::Array(many)) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }

    /// RS256 (RSASSA-PKCS1-v1_5 with SHA-256) over `header.claims` with `key`.
    pub(crate) fn verifies_with(&self, key: &RsaPublicKey) -> bool {
        let Ok(signature) = Rs256Signature::try_from(self.signature.as_slice()) else {
            return false;
        };
        VerifyingKey::<Sha256>::new(key.clone())
            .verify(self.signing_input.as_bytes(), &signature)
            .is_ok()
    }
}

/// A fresh identifier shaped like a version-4 UUID (correlation ids, trace
/// ids, issuer ids). Unique within the process; not a secret.
pub(crate) fn fresh_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut hash = Sha256::new();
    hash.update(n.to_le_bytes());
    hash.update(nanos.to_le_bytes());
    hash.update(std::process::id().to_le_bytes());
    let mut b = hash.finalize();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b[..16].iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The issuer's key pair and public key, made on first use.
pub(crate) fn issuer_key(shared: &Shared) -> Option<(RS256KeyPair, RsaPublicKey, String)> {
    {
        let world = shared.world();
        let issuer = &world.identity.issuer;
        if let Some((pair, public)) = &issuer.key {
            return Some((pair.clone(), public.clone(), issuer.url.clone()));
        }
    }
    // Made outside the lock: other requests go on meanwhile.
    let pair = RS256KeyPair::generate(2048)
        .ok()?
        .with_key_id(&format!("sa-{}", fresh_id()));
    let public = RsaPublicKey::from_public_key_der(&pair.public_key().to_der().ok()?).ok()?;
    let mut world = shared.world();
    let issuer = &mut world.identity.issuer;
    let (pair, public) = issuer.key.get_or_insert((pair, public));
    Some((pair.clone(), public.clone(), issuer.url.clone()))
}

/// The service-account issuer of an emulated AKS cluster (workload identity).
impl Emulator {
    /// The `iss` of this emulator's service-account tokens, e.g.
    /// `https://oidc.emulator.local/<instance id>`: what a federated identity
    /// credential names as its issuer.
    pub fn oidc_issuer(&self) -> String {
        self.shared.world().identity.issuer.url.clone()
    }

    /// A Kubernetes service-account token as kubelet projects it for workload
    /// identity: RS256, signed by this emulator's issuer key, with `iss`,
    /// `sub` (e.g. `system:serviceaccount:my-app:my-sa`), `aud` (normally
    /// `api://AzureADTokenExchange`), `iat`, `nbf`, `exp` = now + `lifetime_s`
    /// and a `jti`. Empty if no key could be made.
    pub fn mint_service_account_token(
        &self,
        subject: &str,
        audience: &str,
        lifetime_s: u64,
    ) -> String {
        let Some((key, _, issuer)) = issuer_key(&self.shared) else {
            return String::new();
        };
        let claims = Claims::create(jwt_simple::prelude::Duration::from_secs(lifetime_s))
            .with_issuer(issuer)
            .with_subject(subject)
            .with_audience(audience)
            .with_jwt_id(fresh_id());
        key.sign(claims).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_certificate_is_pem_with_a_pkcs8_key_and_its_thumbprint_names_it() {
        let cert = new_certificate().unwrap();
        assert!(cert.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(cert.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(cert.thumbprint_sha256.len(), 43);
        assert_eq!(
            certificate_thumbprint(&cert.cert_pem).unwrap(),
            cert.thumbprint_sha256
        );
        assert!(registered_key(&cert.thumbprint_sha256, &cert.thumbprint_sha256).is_some());
        assert!(registered_key(&cert.cert_pem, &cert.thumbprint_sha256).is_some());
        assert!(registered_key("another", &cert.thumbprint_sha256).is_none());
        assert!(!format!("{cert:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_token_signed_with_the_certificate_key_verifies_with_the_certificate() {
        let cert = new_certificate().unwrap();
        let key = RS256KeyPair::from_pem(&cert.key_pem).unwrap();
        let token = key
            .sign(Claims::create(jwt_simple::prelude::Duration::from_secs(60)).with_subject("s"))
            .unwrap();
        let public = registered_key(&cert.cert_pem, &cert.thumbprint_sha256).unwrap();
        let jws = Jws::parse(&token).unwrap();
        assert!(jws.verifies_with(&public));
        assert_eq!(jws.claim_str("sub"), Some("s"));
        let other = new_certificate().unwrap();
        let other = registered_key(&other.thumbprint_sha256, &other.thumbprint_sha256).unwrap();
        assert!(!jws.verifies_with(&other));
    }

    #[test]
    fn fresh_ids_look_like_uuids_and_differ() {
        let (a, b) = (fresh_id(), fresh_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.chars().filter(|c| *c == '-').count(), 4);
    }

    #[test]
    fn garbage_is_not_a_jws() {
        assert!(Jws::parse("not-a-jwt").is_none());
        assert!(Jws::parse("a.b.c").is_none());
    }
}
