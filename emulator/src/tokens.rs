//! Tokens as Entra issues them and as the data planes check them: RS256 JWTs
//! with the claims of AZURE_FACTS.md §5 (`aud`, `iss`, `tid`, `oid`, `appid`,
//! `xms_mirid`, `iat`, `nbf`, `exp`), signed with the world's key, which a test
//! may rotate.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use jwt_simple::prelude::*;
use jwt_simple::JWTError;
use serde_json::Value;

use crate::{Identity, Verdict};

/// The world's signing key and the tenant its tokens are issued in
/// (`Settings::token_tenant`, kept in step by the emulator).
pub(crate) struct Signer {
    key: RS256KeyPair,
    pub(crate) tenant: String,
}

impl Signer {
    pub(crate) fn new(key: RS256KeyPair, tenant: &str) -> Signer {
        Signer {
            key,
            tenant: tenant.to_owned(),
        }
    }
}

impl std::ops::Deref for Signer {
    type Target = RS256KeyPair;

    fn deref(&self) -> &RS256KeyPair {
        &self.key
    }
}

/// The claims Entra adds to the registered ones.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct AzureClaims {
    pub(crate) oid: String,
    pub(crate) tid: String,
    appid: String,
    appidacr: String,
    idtyp: String,
    ver: String,
    /// Only managed identities carry it; app registrations do not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    xms_mirid: Option<String>,
    aio: String,
}

/// A fresh 2048-bit signing key with a key id of its own.
pub(crate) fn new_signing_key() -> std::io::Result<RS256KeyPair> {
    static KEYS: AtomicU64 = AtomicU64::new(0);
    let n = KEYS.fetch_add(1, Ordering::Relaxed);
    RS256KeyPair::generate(2048)
        .map(|key| key.with_key_id(&format!("emulator-key-{n}")))
        .map_err(|e| std::io::Error::other(format!("cannot generate an RSA key: {e}")))
}

/// A token for `identity` and `audience`, valid for `lifetime_s` from now;
/// `padding` bytes in `aio` model the size of real tokens.
pub(crate) fn mint(
    key: &Signer,
    identity: &Identity,
    audience: &str,
    lifetime_s: u64,
    padding: usize,
) -> String {
    let custom = AzureClaims {
        oid: identity.object_id.clone(),
        tid: key.tenant.clone(),
        appid: identity.client_id.clone(),
        appidacr: "2".into(),
        idtyp: "app".into(),
        ver: "1.0".into(),
        xms_mirid: Some(identity.resource_id.clone()),
        aio: format!("k2BgYJi8emulator{}", "A".repeat(padding)),
    };
    let claims =
        Claims::with_custom_claims(custom, jwt_simple::prelude::Duration::from_secs(lifetime_s))
            .with_audience(audience)
            .with_issuer(format!("https://sts.windows.net/{}/", key.tenant))
            .with_subject(&identity.object_id);
    key.sign(claims).unwrap_or_default()
}

/// An app registration as Entra names it in its tokens.
pub(crate) struct AppPrincipal<'a> {
    pub(crate) client_id: &'a str,
    pub(crate) object_id: &'a str,
    pub(crate) tenant: &'a str,
    /// `1` when the app proved itself with a secret, `2` with a certificate
    /// or a federated assertion.
    pub(crate) appidacr: &'a str,
}

/// A token Entra issues to an app registration by client credentials: like
/// a managed identity's ([`mint`]) but with the app's ids, the tenant it
/// asked, and no `xms_mirid`.
pub(crate) fn mint_for_app(
    key: &RS256KeyPair,
    app: &AppPrincipal<'_>,
    audience: &str,
    lifetime_s: u64,
    padding: usize,
) -> String {
    let custom = AzureClaims {
        oid: app.object_id.to_owned(),
        tid: app.tenant.to_owned(),
        appid: app.client_id.to_owned(),
        appidacr: app.appidacr.to_owned(),
        idtyp: "app".into(),
        ver: "1.0".into(),
        xms_mirid: None,
        aio: format!("k2BgYJi8emulator{}", "A".repeat(padding)),
    };
    let claims =
        Claims::with_custom_claims(custom, jwt_simple::prelude::Duration::from_secs(lifetime_s))
            .with_audience(audience)
            .with_issuer(format!("https://sts.windows.net/{}/", app.tenant))
            .with_subject(app.object_id);
    key.sign(claims).unwrap_or_default()
}

/// Why a bearer token is refused for `audience`, or whose it is.
pub(crate) fn check_token(
    key: &RS256PublicKey,
    audience: &str,
    token: &str,
) -> Result<JWTClaims<AzureClaims>, Verdict> {
    let options = VerificationOptions {
        allowed_audiences: Some(HashSet::from([audience.to_owned()])),
        time_tolerance: Some(jwt_simple::prelude::Duration::from_secs(0)),
        ..VerificationOptions::default()
    };
    key.verify_token::<AzureClaims>(token, Some(options))
        .map_err(|e| match e.downcast_ref::<JWTError>() {
            Some(JWTError::TokenHasExpired) => Verdict::ExpiredToken,
            Some(JWTError::RequiredAudienceMismatch) => Verdict::WrongAudience,
            _ => Verdict::InvalidToken,
        })
}

/// The claims of a token, read without checking anything: only to record
/// what arrived (the `exp` of an expired token, the `aud` of a wrong one).
fn unverified_claims(token: &str) -> Option<Value> {
    use jwt_simple::reexports::ct_codecs::{Base64UrlSafeNoPadding, Decoder};
    let payload = token.split('.').nth(1)?;
    let bytes = Base64UrlSafeNoPadding::decode_to_vec(payload, None).ok()?;
    serde_json::from_slice::<Value>(&bytes).ok()
}

/// `exp` of a token, unverified.
pub(crate) fn unverified_exp(token: &str) -> Option<u64> {
    unverified_claims(token)?.get("exp")?.as_u64()
}

/// `aud` of a token, unverified; a list of audiences gives its first.
pub(crate) fn unverified_aud(token: &str) -> Option<String> {
    let claims = unverified_claims(token)?;
    let aud = claims.get("aud")?;
    aud.as_str()
        .or_else(|| aud.get(0).and_then(Value::as_str))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RESOURCE, TENANT_ID};

    fn key() -> Signer {
        Signer::new(new_signing_key().unwrap(), TENANT_ID)
    }

    #[test]
    fn minted_tokens_verify_and_carry_the_identity() {
        let identity = Identity::system();
        let key = key();
        let token = mint(&key, &identity, RESOURCE, 60, 0);
        let claims = check_token(&key.public_key(), RESOURCE, &token).unwrap();
        assert_eq!(claims.custom.oid, identity.object_id);
        assert_eq!(claims.custom.tid, TENANT_ID);
        assert!(token.starts_with("eyJ"));
    }

    #[test]
    fn a_signer_issues_tokens_in_its_tenant() {
        let other = "0b0e0000-0000-4000-8000-00000000bad0";
        let key = Signer::new(new_signing_key().unwrap(), other);
        let token = mint(&key, &Identity::system(), RESOURCE, 60, 0);
        let claims = check_token(&key.public_key(), RESOURCE, &token).unwrap();
        assert_eq!(claims.custom.tid, other);
        assert_eq!(
            claims.issuer.as_deref(),
            Some("https://sts.windows.net/0b0e0000-0000-4000-8000-00000000bad0/")
        );
    }

    #[test]
    fn tokens_for_another_audience_are_refused() {
        let key = key();
        let token = mint(
            &key,
            &Identity::system(),
            "https://management.azure.com",
            60,
            0,
        );
        assert_eq!(
            check_token(&key.public_key(), RESOURCE, &token).unwrap_err(),
            Verdict::WrongAudience
        );
    }

    #[test]
    fn garbage_is_an_invalid_token() {
        assert_eq!(
            check_token(&key().public_key(), RESOURCE, "not-a-jwt").unwrap_err(),
            Verdict::InvalidToken
        );
    }

    #[test]
    fn tokens_signed_by_a_rotated_key_are_invalid() {
        let (old, new) = (key(), key());
        let token = mint(&old, &Identity::system(), RESOURCE, 60, 0);
        assert_eq!(
            check_token(&new.public_key(), RESOURCE, &token).unwrap_err(),
            Verdict::InvalidToken
        );
    }

    #[test]
    fn the_audience_and_expiry_of_any_token_can_be_read_without_its_key() {
        let token = mint(&key(), &Identity::system(), "https://ml.azure.com", 60, 0);
        assert_eq!(
            unverified_aud(&token).as_deref(),
            Some("https://ml.azure.com")
        );
        assert!(unverified_exp(&token).is_some());
        assert_eq!(unverified_aud("emulator-key-0000"), None);
    }
}
