//! The claims of a token, read **without verification**, to explain failures.
//!
//! Access is never decided from these: the token is opaque for authorization
//! (AZURE_FACTS.md §5). A diagnosis may say "the token is for audience X, the
//! resource wants Y" or "principal `oid` lacks the role", and that is all.

use serde::Deserialize;

/// The claims a diagnosis uses. Anything may be missing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Claims {
    pub aud: Option<String>,
    pub iss: Option<String>,
    pub tid: Option<String>,
    /// The principal (object) id: what a role assignment targets.
    pub oid: Option<String>,
    /// Client id of the identity (v1 tokens).
    pub appid: Option<String>,
    /// Client id of the identity (v2 tokens).
    pub azp: Option<String>,
    /// ARM resource id of a managed identity.
    pub xms_mirid: Option<String>,
    pub exp: Option<u64>,
    pub nbf: Option<u64>,
    pub iat: Option<u64>,
}

impl Claims {
    /// Read the payload of a JWT (`header.payload.signature`); `None` when the
    /// value is not a JWT with a JSON payload.
    pub fn read(token: &str) -> Option<Claims> {
        let (_header, payload, _signature) = jwt_segments(token)?;
        serde_json::from_slice(&base64url_decode(payload)?).ok()
    }

    pub fn client_id(&self) -> Option<&str> {
        self.appid.as_deref().or(self.azp.as_deref())
    }
}

/// The header, payload and signature of a value shaped like a JWT: three
/// base64url segments (a padded one forgiven), the header a JSON object
/// (`eyJ…`), the payload not empty. The one test of "is this a JWT?" — a
/// Bearer value is not proof of one (openai-python sends keys as Bearer).
pub fn jwt_segments(token: &str) -> Option<(&str, &str, &str)> {
    let mut parts = token.split('.');
    let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
    let base64url = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'='))
    };
    let shaped = parts.next().is_none()
        && header.starts_with("eyJ")
        && !payload.is_empty()
        && [header, payload, signature].iter().all(|s| base64url(s));
    shaped.then_some((header, payload, signature))
}

/// Decode base64url (RFC 4648 §5) as JWT segments are written: unpadded,
/// though a padded segment is forgiven.
pub fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// base64url without padding, for building test tokens.
    fn encode(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn jwt(payload: &str) -> String {
        format!(
            "{}.{}.c2lnbmF0dXJl",
            encode(br#"{"alg":"RS256","typ":"JWT"}"#),
            encode(payload.as_bytes())
        )
    }

    #[test]
    fn managed_identity_claims_are_read_from_the_payload() {
        let token = jwt(
            r#"{"aud":"https://cognitiveservices.azure.com","tid":"t","oid":"o","appid":"c",
                "xms_mirid":"/subscriptions/s/x","exp":1763839000,"nbf":1763752300,"iat":1763752300}"#,
        );
        let claims = Claims::read(&token).unwrap();
        assert_eq!(
            claims.aud.as_deref(),
            Some("https://cognitiveservices.azure.com")
        );
        assert_eq!(claims.oid.as_deref(), Some("o"));
        assert_eq!(claims.client_id(), Some("c"));
        assert_eq!(claims.xms_mirid.as_deref(), Some("/subscriptions/s/x"));
        assert_eq!(
            (claims.exp, claims.nbf),
            (Some(1763839000), Some(1763752300))
        );
    }

    #[test]
    fn v2_tokens_name_the_client_in_azp() {
        let claims = Claims::read(&jwt(r#"{"azp":"client-2"}"#)).unwrap();
        assert_eq!(claims.client_id(), Some("client-2"));
    }

    #[test]
    fn what_is_not_a_jwt_has_no_claims() {
        for value in [
            "",
            "app-key-123",
            "a.b",
            "a.b.c.d",
            "eyJ.!!!.sig",
            &format!("x.{}.y", encode(b"[1,2]")),
        ] {
            assert_eq!(Claims::read(value), None, "{value}");
        }
    }

    #[test]
    fn jwt_segments_decode_padded_or_not_and_garbage_does_not() {
        assert_eq!(
            base64url_decode("eyJhbGciOiJSUzI1NiJ9").unwrap(),
            br#"{"alg":"RS256"}"#
        );
        assert_eq!(base64url_decode("YQ").unwrap(), b"a");
        assert_eq!(base64url_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64url_decode("_-8").unwrap(), [0xff, 0xef]);
        assert_eq!(base64url_decode("a"), None);
        assert_eq!(base64url_decode("ab+/"), None);
    }
}
