//! Per-target policies for migrations that do not happen on one day
//! (DESIGN.md, "Per-target policies"): what happens when no token can be had,
//! whether an application's own Entra token is kept, and which callers may
//! borrow the proxy's identity at all.
//!
//! Every decision here is pure: the glue reads the request's headers and the
//! clock and asks.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::claims::Claims;
use crate::token::same_audience;

/// What a request gets when its target has no usable token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTokenFailure {
    /// The diagnosis, as a local reply.
    #[default]
    Reject,
    /// A request that carries an `api-key` goes upstream with it, untouched,
    /// and its answer says so (`x-aoai-msi-fallback`).
    ForwardKey,
}

/// What happens to an application's own `Authorization: Bearer <JWT>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientToken {
    /// The filter's credential replaces it.
    #[default]
    Replace,
    /// A valid Entra token for the target's audience is kept.
    Keep,
}

/// The policies of one target.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    pub on_token_failure: OnTokenFailure,
    pub client_token: ClientToken,
    pub client_keys: Option<ClientKeys>,
}

/// Response header on an answer to a request that went upstream with its own
/// key because no token could be had; its value is the diagnosis code.
pub const FALLBACK_HEADER: &str = "x-aoai-msi-fallback";

/// Gateway keys: who may borrow the proxy's identity, by the SHA-256 of the
/// `api-key` they send. Only hashes are kept; a key is never stored or shown.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientKeys {
    entries: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.names().collect();
        write!(f, "ClientKeys({names:?}, hashes not shown)")
    }
}

/// What a request's key says about its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// The `index`-th listed client.
    Known(usize),
    /// No `api-key` at all.
    Missing,
    /// An `api-key` whose hash is not listed.
    Unknown,
}

impl ClientKeys {
    /// `entries` are (name, SHA-256) pairs, already checked by the configuration.
    pub fn new(entries: Vec<(String, [u8; 32])>) -> ClientKeys {
        ClientKeys { entries }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(name, _)| name.as_str())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Which client sent `key`. Every listed hash is compared, in constant
    /// time, whatever matches: the time taken says nothing about which
    /// entry, or how much of a hash, a guess got right.
    pub fn check(&self, key: Option<&[u8]>) -> KeyCheck {
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return KeyCheck::Missing;
        };
        let digest: [u8; 32] = Sha256::digest(key).into();
        let mut found = None;
        for (index, (_, listed)) in self.entries.iter().enumerate() {
            let hit: bool = listed.ct_eq(&digest).into();
            if hit && found.is_none() {
                found = Some(index);
            }
        }
        found.map_or(KeyCheck::Unknown, KeyCheck::Known)
    }
}

/// Parse 64 hex digits (either case) into a SHA-256 digest.
pub fn sha256_hex(value: &str) -> Option<[u8; 32]> {
    let bytes = value.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = char::from(pair[0]).to_digit(16)?;
        let lo = char::from(pair[1]).to_digit(16)?;
        out[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// Does a request bring its own key, so that `forward_key` can send it on
/// with it: a non-empty `api-key` header or an `api-key` query parameter?
pub fn carries_key(api_key_header: Option<&[u8]>, path: Option<&str>) -> bool {
    api_key_header.is_some_and(|v| !v.is_empty())
        || path.and_then(crate::rewrite::api_key_param).is_some()
}

/// May a request keep the `authorization` it came with? Only a JWT (three
/// base64url segments) whose `aud` is the target's audience and whose `exp`
/// lies ahead: an `sk-…` or an `api-key` sent as Bearer (openai-python does
/// that), an expired token, or one for another audience is replaced. The
/// token is not verified — Azure does that; this only decides whose
/// credential the request carries.
pub fn keeps_client_token(authorization: Option<&[u8]>, resource: &str, now_s: u64) -> bool {
    let Some(value) = authorization.and_then(|v| std::str::from_utf8(v).ok()) else {
        return false;
    };
    let Some(token) = strip_bearer(value) else {
        return false;
    };
    let Some(claims) = Claims::read(token) else {
        return false;
    };
    let audience_ok = claims
        .aud
        .as_deref()
        .is_some_and(|aud| same_audience(aud, resource));
    let fresh = claims.exp.is_some_and(|exp| exp > now_s);
    audience_ok && fresh
}

/// `Bearer <token>`, the scheme in any case, one or more spaces.
fn strip_bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    const RES: &str = "https://cognitiveservices.azure.com";
    const NOW_S: u64 = 1_763_752_300;

    #[test]
    fn a_key_in_the_header_or_the_query_can_be_forwarded_an_empty_one_cannot() {
        assert!(carries_key(Some(b"k"), Some("/openai/x")));
        assert!(carries_key(
            None,
            Some("/openai/realtime?api-key=k&deployment=d")
        ));
        assert!(!carries_key(Some(b""), Some("/openai/x?api-version=1")));
        assert!(!carries_key(None, None));
    }

    fn digest(key: &str) -> [u8; 32] {
        Sha256::digest(key.as_bytes()).into()
    }

    fn keys() -> ClientKeys {
        ClientKeys::new(vec![
            ("team-a".into(), digest("key-of-team-a")),
            ("team-b".into(), digest("key-of-team-b")),
        ])
    }

    fn jwt(payload: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"RS256","typ":"JWT"}"#),
            b64(payload)
        )
    }

    #[test]
    fn each_listed_key_names_its_client_and_others_are_told_apart() {
        let keys = keys();
        assert_eq!(keys.check(Some(b"key-of-team-a")), KeyCheck::Known(0));
        assert_eq!(keys.check(Some(b"key-of-team-b")), KeyCheck::Known(1));
        assert_eq!(keys.check(Some(b"key-of-team-c")), KeyCheck::Unknown);
        assert_eq!(keys.check(Some(b"")), KeyCheck::Missing);
        assert_eq!(keys.check(None), KeyCheck::Missing);
    }

    #[test]
    fn client_keys_never_show_a_hash() {
        let shown = format!("{:?}", keys());
        assert!(shown.contains("team-a"), "{shown}");
        let hex: String = digest("key-of-team-a")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!shown.contains(&hex[..8]), "{shown}");
    }

    #[test]
    fn hashes_are_read_in_either_case_and_nothing_else_is() {
        let hex: String = digest("k").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(sha256_hex(&hex), Some(digest("k")));
        assert_eq!(sha256_hex(&hex.to_uppercase()), Some(digest("k")));
        assert_eq!(sha256_hex(&hex[..62]), None);
        assert_eq!(sha256_hex(&format!("{}zz", &hex[..62])), None);
        assert_eq!(sha256_hex("é".repeat(32).as_str()), None);
    }

    #[test]
    fn an_apps_own_valid_token_for_the_audience_is_kept() {
        let token = jwt(&format!(r#"{{"aud":"{RES}","exp":{}}}"#, NOW_S + 600));
        let header = format!("Bearer {token}");
        assert!(keeps_client_token(Some(header.as_bytes()), RES, NOW_S));
        let lower = format!("bearer  {token}");
        assert!(keeps_client_token(Some(lower.as_bytes()), RES, NOW_S));
        let slash = jwt(&format!(r#"{{"aud":"{RES}/","exp":{}}}"#, NOW_S + 600));
        assert!(keeps_client_token(
            Some(format!("Bearer {slash}").as_bytes()),
            RES,
            NOW_S
        ));
    }

    #[test]
    fn keys_sent_as_bearer_expired_tokens_and_other_audiences_are_replaced() {
        let expired = jwt(&format!(r#"{{"aud":"{RES}","exp":{}}}"#, NOW_S - 1));
        let other = jwt(&format!(
            r#"{{"aud":"https://management.azure.com","exp":{}}}"#,
            NOW_S + 600
        ));
        let undated = jwt(&format!(r#"{{"aud":"{RES}"}}"#));
        for value in [
            "Bearer sk-proj-0123456789abcdef".to_owned(),
            "Bearer 0123456789abcdef0123456789abcdef".to_owned(),
            format!("Bearer {expired}"),
            format!("Bearer {other}"),
            format!("Bearer {undated}"),
            format!("Basic {}", jwt("{}")),
            "Bearer eyJ.notbase64!.x".to_owned(),
            "Bearer".to_owned(),
            String::new(),
        ] {
            assert!(
                !keeps_client_token(Some(value.as_bytes()), RES, NOW_S),
                "{value}"
            );
        }
        assert!(!keeps_client_token(None, RES, NOW_S));
        assert!(!keeps_client_token(Some(&[0xff, 0xfe]), RES, NOW_S));
    }
}
