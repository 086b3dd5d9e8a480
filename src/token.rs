//! Token requests and responses, and the token as a secret.
//!
//! Facts come from AZURE_FACTS.md §1: IMDS takes `api-version=2018-02-01`, the
//! bare resource, at most one identity selector and `Metadata: true`; it answers
//! with every field as a JSON string, times included.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::claims::Claims;
use crate::safe;

/// Bodies larger than this are refused unread: a token response is ~2-5 KB.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Real Entra tokens are well under 8 KB; anything near this bound is not a token.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Managed-identity tokens live about 24 h; a week is not a lifetime, it is a bug.
pub const MAX_LIFETIME_SECS: u64 = 7 * 24 * 3600;
/// Longest `error_description` kept for diagnoses.
const MAX_DESCRIPTION_CHARS: usize = 400;

/// A bearer token. Its `Debug` never shows the value, so a token cannot leak
/// through a `{:?}` in a log line or a panic message.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The value, for the one place that needs it: the `authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The first 6 hex digits of the value's SHA-256: enough to tell two
    /// values apart in a log line, far too little to learn anything of one.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        Sha256::digest(self.0.as_bytes())
            .iter()
            .take(3)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<redacted, {} bytes>)", self.0.len())
    }
}

/// A token with the two instants its lifecycle is computed from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub secret: Secret,
    /// When this proxy received it (ms since the Unix epoch).
    pub obtained_at_ms: u64,
    /// When Entra says it expires (ms since the Unix epoch).
    pub expires_at_ms: u64,
    /// For a credential that names no expiry (an `http` source's key): when
    /// to poll for a new value. Tokens refresh at half-life instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_after_ms: Option<u64>,
}

/// Why a token call did not produce a usable token. Kept in shared data so
/// every worker can explain the same failure, hence serializable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FetchFailure {
    /// Envoy refused to dispatch the call: almost always an unknown cluster.
    Dispatch { cluster: String },
    /// No HTTP answer: connection refused or reset, or the call timed out.
    NoResponse,
    /// The token endpoint answered with an error status.
    Status {
        status: u16,
        error: Option<String>,
        description: Option<String>,
        /// Entra's `error_codes` (the AADSTS numbers), if any.
        #[serde(default)]
        codes: Vec<u32>,
    },
    /// A 200 whose body is not a usable token.
    InvalidBody { problem: String },
    /// A token for another audience than the one asked for: never sent.
    WrongAudience { asked: String, got: String },
    /// Workload identity: no usable service-account token to exchange.
    AssertionUnavailable { problem: String },
    /// Workload identity, read from the projected file itself (a host that
    /// can read files: the native build): the file could not be read.
    /// `variable` names the environment variable that gave `path`.
    AssertionFileUnreadable {
        variable: String,
        path: String,
        error: String,
    },
    /// A service principal's SDS generic secret (`client_secret_sds`,
    /// `client_certificate_sds`) could not be used at this exchange: `field`
    /// names the setting, `problem` says what is wrong (never the value).
    SecretUnavailable {
        secret: String,
        field: String,
        problem: String,
    },
}

/// How a failure is retried and what parked requests are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Worth retrying soon (IMDS busy, upgrading, throttled, unreachable).
    Transient,
    /// The request itself is wrong for this machine (no identity, several
    /// identities, bad resource): retried only slowly, requests fail at once.
    Refused,
    /// The proxy's own configuration is wrong (no such cluster).
    Misconfigured,
}

impl FetchFailure {
    pub fn class(&self) -> FailureClass {
        match self {
            FetchFailure::Dispatch { .. } => FailureClass::Misconfigured,
            FetchFailure::NoResponse
            | FetchFailure::InvalidBody { .. }
            | FetchFailure::AssertionUnavailable { .. }
            | FetchFailure::AssertionFileUnreadable { .. }
            | FetchFailure::SecretUnavailable { .. } => FailureClass::Transient,
            FetchFailure::WrongAudience { .. } => FailureClass::Refused,
            FetchFailure::Status { status, error, .. } => match status {
                404 | 408 | 410 | 429 | 500..=599 => FailureClass::Transient,
                // Entra says so itself when it is overloaded.
                _ if error.as_deref() == Some("temporarily_unavailable") => FailureClass::Transient,
                _ => FailureClass::Refused,
            },
        }
    }

    /// A short label for logs and metrics: no secrets, no free text.
    pub fn label(&self) -> String {
        match self {
            FetchFailure::Dispatch { .. } => "dispatch_failed".to_owned(),
            FetchFailure::NoResponse => "no_response".to_owned(),
            FetchFailure::Status { status, .. } => format!("status_{status}"),
            FetchFailure::InvalidBody { .. } => "invalid_body".to_owned(),
            FetchFailure::WrongAudience { .. } => "wrong_audience".to_owned(),
            FetchFailure::AssertionUnavailable { .. }
            | FetchFailure::AssertionFileUnreadable { .. } => "assertion_unavailable".to_owned(),
            FetchFailure::SecretUnavailable { .. } => "secret_unavailable".to_owned(),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StringOrNumber {
    String(String),
    Number(u64),
}

impl StringOrNumber {
    fn seconds(&self) -> Option<u64> {
        match self {
            StringOrNumber::Number(n) => Some(*n),
            StringOrNumber::String(s) => s.trim().parse().ok(),
        }
    }
}

#[derive(Deserialize)]
struct RawToken {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_on: Option<StringOrNumber>,
    expires_in: Option<StringOrNumber>,
    resource: Option<String>,
}

/// Error bodies: IMDS and Entra say `error` / `error_description` (Entra
/// adds `error_codes`); App Service says `statusCode` / `message`.
#[derive(Deserialize)]
struct RawError {
    error: Option<serde_json::Value>,
    error_description: Option<String>,
    error_codes: Option<Vec<u64>>,
    message: Option<String>,
}

/// A token the endpoint issued, checked, with what the filter noticed on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub token: Token,
    /// Something odd but harmless about the answer, for the log.
    pub warning: Option<String>,
}

/// `expires_on` and `now + expires_in` may differ by this much (clock skew
/// between this host and the endpoint, or rounding) before it is worth a line.
pub const EXPIRY_DISAGREEMENT_S: u64 = 300;

/// Turn a token-endpoint answer into a token or a named failure.
/// `status` is `None` when the call produced no HTTP answer at all;
/// `resource` is what was asked for: a token for anything else is refused.
pub fn parse_response(
    status: Option<u16>,
    body: &[u8],
    now_ms: u64,
    resource: &str,
) -> Result<Issued, FetchFailure> {
    answered_ok(status, body, "token")?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(invalid("the response body is empty".to_owned()));
    }
    let raw: RawToken = read_json(body, "a JSON token object")?;
    let secret = raw
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| invalid("the response has no access_token".to_owned()))?;
    header_safe(&secret, "access_token")?;
    if let Some(kind) = raw.token_type.as_deref() {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(invalid(format!(
                "token_type is \"{}\", not Bearer",
                safe::free_text(kind, 40)
            )));
        }
    }
    // The answer's `resource` and the token's own `aud` must both be what was asked.
    let claims = Claims::read(&secret);
    for answered in [
        raw.resource.as_deref(),
        claims.as_ref().and_then(|c| c.aud.as_deref()),
    ] {
        same_audience_or_refuse(answered, resource)?;
    }
    let now_s = now_ms / 1000;
    let expiry = Expiry::read(&raw.expires_on, &raw.expires_in, claims.as_ref(), now_s)?;
    let expires_on_s = expiry
        .earliest
        .ok_or_else(|| invalid("the response has neither expires_on nor expires_in".to_owned()))?;
    check_lifetime(expires_on_s, now_s, "token")?;
    let warning = match (expiry.on, expiry.within) {
        (Some(on), Some(within)) if on.abs_diff(within) > EXPIRY_DISAGREEMENT_S => Some(format!(
            "the token endpoint's expires_on and expires_in disagree by {} s: the clocks of this \
             host and the endpoint differ; the token is used until the earlier of the two",
            on.abs_diff(within)
        )),
        _ => None,
    };
    Ok(Issued {
        token: Token {
            secret: Secret::new(secret),
            obtained_at_ms: now_ms,
            expires_at_ms: expires_on_s.saturating_mul(1000),
            refresh_after_ms: None,
        },
        warning,
    })
}

/// A credential that names no expiry stays usable this long without a
/// successful poll: the key service being down must not take the key away.
pub const UNDATED_CREDENTIAL_LIFETIME_MS: u64 = MAX_LIFETIME_SECS * 1000;

#[derive(Deserialize)]
struct RawCredential {
    key: Option<String>,
    token: Option<String>,
    access_token: Option<String>,
    expires_on: Option<StringOrNumber>,
    expires_in: Option<StringOrNumber>,
}

/// Turn an `http` source's answer (`{"key"|"token"|"access_token": …,
/// "expires_in"|"expires_on": …}`) into a credential. Without an expiry it is
/// polled again after `refresh_interval_ms` and stays usable meanwhile.
/// `audience`, for a bearer credential, is checked against the token's own
/// `aud` when the value is a JWT.
pub fn parse_credential(
    status: Option<u16>,
    body: &[u8],
    now_ms: u64,
    refresh_interval_ms: u64,
    audience: Option<&str>,
) -> Result<Issued, FetchFailure> {
    answered_ok(status, body, "credential")?;
    let raw: RawCredential = read_json(
        body,
        "a JSON object with \"key\", \"token\" or \"access_token\"",
    )?;
    let value = [raw.key, raw.token, raw.access_token]
        .into_iter()
        .flatten()
        .find(|v| !v.is_empty())
        .ok_or_else(|| {
            invalid(
                "the response has no non-empty \"key\", \"token\" or \"access_token\"".to_owned(),
            )
        })?;
    header_safe(&value, "the credential")?;
    let claims = Claims::read(&value);
    if let Some(asked) = audience {
        same_audience_or_refuse(claims.as_ref().and_then(|c| c.aud.as_deref()), asked)?;
    }
    let now_s = now_ms / 1000;
    let expiry = Expiry::read(&raw.expires_on, &raw.expires_in, claims.as_ref(), now_s)?;
    let token = match expiry.earliest {
        None => Token {
            secret: Secret::new(value),
            obtained_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(UNDATED_CREDENTIAL_LIFETIME_MS),
            refresh_after_ms: Some(now_ms.saturating_add(refresh_interval_ms)),
        },
        Some(expires_on_s) => {
            check_lifetime(expires_on_s, now_s, "credential")?;
            Token {
                secret: Secret::new(value),
                obtained_at_ms: now_ms,
                expires_at_ms: expires_on_s.saturating_mul(1000),
                refresh_after_ms: None,
            }
        }
    };
    Ok(Issued {
        token,
        warning: None,
    })
}

/// An HTTP answer of 200 with a body no larger than any `what` response needs.
fn answered_ok(status: Option<u16>, body: &[u8], what: &str) -> Result<(), FetchFailure> {
    let status = status.ok_or(FetchFailure::NoResponse)?;
    if body.len() > MAX_RESPONSE_BYTES {
        return Err(invalid(format!(
            "the response body is larger than the {MAX_RESPONSE_BYTES} bytes a {what} response can need"
        )));
    }
    if status != 200 {
        return Err(error_status(status, body));
    }
    Ok(())
}

/// Read `body` as `T`. serde's messages can quote the input (a secret): say
/// only where it went wrong.
fn read_json<T: for<'de> Deserialize<'de>>(body: &[u8], shape: &str) -> Result<T, FetchFailure> {
    serde_json::from_slice(body).map_err(|e| {
        invalid(format!(
            "the response body is not {shape} ({} at line {}, column {})",
            match e.classify() {
                serde_json::error::Category::Data => "a field has the wrong type",
                _ => "malformed JSON",
            },
            e.line(),
            e.column()
        ))
    })
}

/// A value that goes into a header: bounded, and visible ASCII only.
fn header_safe(value: &str, name: &str) -> Result<(), FetchFailure> {
    if value.len() > MAX_TOKEN_BYTES {
        return Err(invalid(format!(
            "{name} has {} bytes, more than {MAX_TOKEN_BYTES}",
            value.len()
        )));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(format!(
            "{name} contains characters that cannot be sent in an HTTP header"
        )));
    }
    Ok(())
}

/// An audience an answer names, if any, must be the one asked for.
fn same_audience_or_refuse(answered: Option<&str>, asked: &str) -> Result<(), FetchFailure> {
    match answered {
        Some(got) if !same_audience(got, asked) => Err(FetchFailure::WrongAudience {
            asked: asked.to_owned(),
            got: safe::or(Some(got), safe::audience, "<not an audience URI>").to_owned(),
        }),
        _ => Ok(()),
    }
}

/// The expiry an answer names, as instants in seconds.
struct Expiry {
    /// `expires_on`.
    on: Option<u64>,
    /// now + `expires_in`.
    within: Option<u64>,
    /// The earliest of the two and the token's own `exp`.
    earliest: Option<u64>,
}

impl Expiry {
    fn read(
        on: &Option<StringOrNumber>,
        within: &Option<StringOrNumber>,
        claims: Option<&Claims>,
        now_s: u64,
    ) -> Result<Expiry, FetchFailure> {
        let seconds = |value: &Option<StringOrNumber>, name: &str| match value {
            Some(v) => v
                .seconds()
                .map(Some)
                .ok_or_else(|| invalid(format!("{name} is not a number of seconds"))),
            None => Ok(None),
        };
        let on = seconds(on, "expires_on")?;
        let within = seconds(within, "expires_in")?.map(|s| now_s.saturating_add(s));
        let earliest = [on, within, claims.and_then(|c| c.exp)]
            .into_iter()
            .flatten()
            .min();
        Ok(Expiry {
            on,
            within,
            earliest,
        })
    }
}

/// A `what` (token or credential) that expires at `expires_on_s` must still
/// be valid and must not claim more than any Entra token lives.
fn check_lifetime(expires_on_s: u64, now_s: u64, what: &str) -> Result<(), FetchFailure> {
    if expires_on_s <= now_s {
        return Err(invalid(format!(
            "the {what} expired {} s before it arrived (expires_on {expires_on_s}); check the clocks of this host and the {what} endpoint",
            now_s - expires_on_s
        )));
    }
    if expires_on_s - now_s > MAX_LIFETIME_SECS {
        return Err(invalid(format!(
            "the {what} claims a lifetime of {} s, more than the {MAX_LIFETIME_SECS} s any Entra token has",
            expires_on_s - now_s
        )));
    }
    Ok(())
}

/// Audiences compare without case and without a trailing slash.
pub fn same_audience(a: &str, b: &str) -> bool {
    a.trim_end_matches('/')
        .eq_ignore_ascii_case(b.trim_end_matches('/'))
}

fn invalid(problem: String) -> FetchFailure {
    FetchFailure::InvalidBody { problem }
}

/// Envoy answers a call it could not complete (connection refused or reset,
/// no healthy endpoint, upstream timeout) with a local reply of its own
/// rather than a failure: recognise those by their text.
const ENVOY_LOCAL_REPLIES: [&str; 3] = [
    "upstream connect error or disconnect/reset before headers",
    "no healthy upstream",
    "upstream request timeout",
];

fn error_status(status: u16, body: &[u8]) -> FetchFailure {
    if matches!(status, 503 | 504)
        && ENVOY_LOCAL_REPLIES
            .iter()
            .any(|phrase| body.starts_with(phrase.as_bytes()))
    {
        return FetchFailure::NoResponse;
    }
    let raw: Option<RawError> = serde_json::from_slice(body).ok();
    let (error, description, codes) = match raw {
        Some(raw) => (
            raw.error.map(|e| match e {
                serde_json::Value::String(s) => safe::free_text(&s, 80),
                other => safe::free_text(&other.to_string(), 80),
            }),
            raw.error_description
                .or(raw.message)
                .map(|d| safe::free_text(&d, MAX_DESCRIPTION_CHARS)),
            raw.error_codes
                .unwrap_or_default()
                .into_iter()
                .filter_map(|c| u32::try_from(c).ok())
                .take(8)
                .collect(),
        ),
        None => (None, None, Vec::new()),
    };
    FetchFailure::Status {
        status,
        error,
        description,
        codes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 1_763_752_300_000;
    const RES: &str = "https://cognitiveservices.azure.com";

    fn imds_body(expires_on: &str) -> String {
        format!(
            r#"{{"access_token":"eyJ0eXAi.eyJhdWQi.c2ln","refresh_token":"","expires_in":"86399",
               "expires_on":{expires_on},"not_before":"1763752300",
               "resource":"https://cognitiveservices.azure.com","token_type":"Bearer","client_id":"c"}}"#
        )
    }

    #[test]
    fn string_times_from_imds_are_parsed() {
        let token = parse_response(
            Some(200),
            imds_body("\"1763838699\"").as_bytes(),
            NOW_MS,
            RES,
        )
        .unwrap()
        .token;
        assert_eq!(token.expires_at_ms, 1_763_838_699_000);
        assert_eq!(token.obtained_at_ms, NOW_MS);
        assert_eq!(token.secret.expose(), "eyJ0eXAi.eyJhdWQi.c2ln");
    }

    #[test]
    fn numeric_times_are_parsed_too() {
        let token = parse_response(Some(200), imds_body("1763838699").as_bytes(), NOW_MS, RES)
            .unwrap()
            .token;
        assert_eq!(token.expires_at_ms, 1_763_838_699_000);
    }

    #[test]
    fn expires_in_is_used_when_expires_on_is_absent() {
        let body = br#"{"token_type":"Bearer","expires_in":3599,"access_token":"a.b.c"}"#;
        let token = parse_response(Some(200), body, NOW_MS, RES).unwrap().token;
        assert_eq!(token.expires_at_ms, NOW_MS + 3_599_000);
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let token = parse_response(
            Some(200),
            imds_body("\"1763838699\"").as_bytes(),
            NOW_MS,
            RES,
        )
        .unwrap()
        .token;
        let shown = format!("{token:?}");
        assert!(!shown.contains("eyJ0eXAi"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn a_key_without_expiry_is_polled_again_after_the_interval_and_stays_usable() {
        let issued =
            parse_credential(Some(200), br#"{"key":"k-1"}"#, NOW_MS, 300_000, None).unwrap();
        let token = issued.token;
        assert_eq!(token.secret.expose(), "k-1");
        assert_eq!(token.refresh_after_ms, Some(NOW_MS + 300_000));
        assert!(token.refresh_due(NOW_MS + 300_000));
        assert!(!token.refresh_due(NOW_MS + 299_999));
        assert!(
            token.usable(NOW_MS + 24 * 3600 * 1000),
            "a key service outage does not take the key away"
        );
    }

    #[test]
    fn a_dated_credential_follows_the_token_lifecycle() {
        for body in [
            &br#"{"token":"t-1","expires_in":3600}"#[..],
            br#"{"access_token":"t-1","expires_in":"3600"}"#,
            br#"{"key":"t-1","expires_on":1763755900}"#,
        ] {
            let token = parse_credential(Some(200), body, NOW_MS, 300_000, None)
                .unwrap()
                .token;
            assert_eq!(token.secret.expose(), "t-1");
            assert_eq!(
                token.expires_at_ms,
                NOW_MS + 3_600_000,
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(token.refresh_after_ms, None);
            assert!(token.refresh_due(NOW_MS + 1_800_000));
        }
    }

    #[test]
    fn bad_credential_answers_become_named_failures_that_never_quote_the_value() {
        let cases: &[(Option<u16>, &[u8], &str)] = &[
            (None, b"", "NoResponse"),
            (Some(200), b"{}", "no non-empty"),
            (Some(200), br#"{"key":""}"#, "no non-empty"),
            (Some(200), br#"{"key":"sec ret"}"#, "cannot be sent"),
            (
                Some(200),
                br#"{"key":"secret","expires_in":"soon"}"#,
                "not a number",
            ),
            (Some(200), br#"{"key":"secret","expires_on":1}"#, "expired"),
            (Some(200), b"secret", "not a JSON object"),
            (Some(503), br#"{"error":"unavailable"}"#, "503"),
        ];
        for (status, body, needle) in cases {
            let failure = parse_credential(*status, body, NOW_MS, 1000, None).unwrap_err();
            let shown = format!("{failure:?}");
            assert!(shown.contains(needle), "{needle}: {shown}");
            assert!(!shown.contains("secret"), "{shown}");
        }
    }

    #[test]
    fn a_bearer_credential_for_another_audience_is_refused() {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256"}"#),
            b64(r#"{"aud":"https://management.azure.com","exp":1763755900}"#)
        );
        let body = format!(r#"{{"token":"{jwt}"}}"#);
        assert!(matches!(
            parse_credential(Some(200), body.as_bytes(), NOW_MS, 1000, Some(RES)),
            Err(FetchFailure::WrongAudience { .. })
        ));
        // A JWT's own exp dates an answer that names no expiry.
        let ok = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256"}"#),
            b64(r#"{"aud":"https://cognitiveservices.azure.com","exp":1763755900}"#)
        );
        let token = parse_credential(
            Some(200),
            format!(r#"{{"token":"{ok}"}}"#).as_bytes(),
            NOW_MS,
            1000,
            Some(RES),
        )
        .unwrap()
        .token;
        assert_eq!(token.expires_at_ms, 1_763_755_900_000);
    }

    #[test]
    fn bad_answers_become_named_failures() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"   ", "empty"),
            (b"<html>", "not a JSON token object"),
            (
                br#"{"token_type":"Bearer","expires_in":"60"}"#,
                "no access_token",
            ),
            (
                br#"{"access_token":"","expires_in":"60"}"#,
                "no access_token",
            ),
            (
                br#"{"access_token":"a.b.c","token_type":"pop","expires_in":"60"}"#,
                "not Bearer",
            ),
            (
                br#"{"access_token":"a.b.c","expires_on":"1000"}"#,
                "expired",
            ),
            (
                br#"{"access_token":"a.b.c","expires_in":"99999999"}"#,
                "lifetime",
            ),
            (
                br#"{"access_token":"a.b.c"}"#,
                "neither expires_on nor expires_in",
            ),
            (
                br#"{"access_token":"a.b.c","expires_on":"soon"}"#,
                "not a number",
            ),
            (
                b"{\"access_token\":\"a.b\\r\\nx-evil: 1\",\"expires_in\":\"60\"}",
                "cannot be sent in an HTTP header",
            ),
            (
                br#"{"access_token":"a b","expires_in":"60"}"#,
                "cannot be sent",
            ),
        ];
        for (body, expected) in cases {
            match parse_response(Some(200), body, NOW_MS, RES) {
                Err(FetchFailure::InvalidBody { problem }) => {
                    assert!(problem.contains(expected), "{problem}")
                }
                other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
    }

    #[test]
    fn oversized_bodies_are_refused_unparsed() {
        let body = vec![b' '; MAX_RESPONSE_BYTES + 1];
        assert!(matches!(
            parse_response(Some(200), &body, NOW_MS, RES),
            Err(FetchFailure::InvalidBody { .. })
        ));
    }

    #[test]
    fn imds_errors_keep_the_error_and_its_description() {
        let body = br#"{"error":"invalid_request","error_description":"Identity not found"}"#;
        let failure = parse_response(Some(400), body, NOW_MS, RES).unwrap_err();
        assert_eq!(
            failure,
            FetchFailure::Status {
                status: 400,
                error: Some("invalid_request".into()),
                description: Some("Identity not found".into()),
                codes: Vec::new(),
            }
        );
        assert_eq!(failure.class(), FailureClass::Refused);
    }

    #[test]
    fn entra_errors_keep_their_codes_and_app_service_errors_their_message() {
        let entra = br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215],"timestamp":"t","trace_id":"x","correlation_id":"y"}"#;
        match parse_response(Some(401), entra, NOW_MS, RES).unwrap_err() {
            FetchFailure::Status {
                codes,
                error,
                description,
                ..
            } => {
                assert_eq!(codes, vec![7000215]);
                assert_eq!(error.as_deref(), Some("invalid_client"));
                assert!(description.unwrap().starts_with("AADSTS7000215"));
            }
            other => panic!("{other:?}"),
        }
        let app_service = br#"{"statusCode":400,"message":"Unable to load the proper Managed Identity.","correlationId":"c"}"#;
        match parse_response(Some(400), app_service, NOW_MS, RES).unwrap_err() {
            FetchFailure::Status { description, .. } => {
                assert_eq!(
                    description.as_deref(),
                    Some("Unable to load the proper Managed Identity.")
                );
            }
            other => panic!("{other:?}"),
        }
        let busy = br#"{"error":"temporarily_unavailable","error_description":"AADSTS50196: try later","error_codes":[50196]}"#;
        assert_eq!(
            parse_response(Some(400), busy, NOW_MS, RES)
                .unwrap_err()
                .class(),
            FailureClass::Transient
        );
    }

    #[test]
    fn transient_statuses_and_silence_are_classed_for_retry() {
        for status in [404, 410, 429, 500, 503] {
            let f = parse_response(Some(status), b"", NOW_MS, RES).unwrap_err();
            assert_eq!(f.class(), FailureClass::Transient, "{status}");
        }
        assert_eq!(
            parse_response(None, b"", NOW_MS, RES).unwrap_err(),
            FetchFailure::NoResponse
        );
        assert_eq!(
            FetchFailure::Dispatch {
                cluster: "x".into()
            }
            .class(),
            FailureClass::Misconfigured
        );
    }

    #[test]
    fn envoys_own_replies_mean_the_endpoint_was_not_reached() {
        for (status, body) in [
            (503, &b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"[..]),
            (503, b"no healthy upstream"),
            (504, b"upstream request timeout"),
        ] {
            assert_eq!(parse_response(Some(status), body, NOW_MS, RES).unwrap_err(), FetchFailure::NoResponse);
        }
        let imds_503 =
            parse_response(Some(503), br#"{"error":"unavailable"}"#, NOW_MS, RES).unwrap_err();
        assert!(matches!(imds_503, FetchFailure::Status { status: 503, .. }));
    }

    #[test]
    fn remote_text_in_errors_is_printable_and_bounded() {
        let body = "{\"error\":\"bad\\r\\nx-evil: 1\",\"error_description\":\"\\u001b[31mred\"}";
        match parse_response(Some(400), body.as_bytes(), NOW_MS, RES).unwrap_err() {
            FetchFailure::Status {
                error, description, ..
            } => {
                assert_eq!(error.as_deref(), Some("bad??x-evil: 1"));
                assert_eq!(description.as_deref(), Some("?[31mred"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// An unsigned JWT with this payload, as claims are read from tokens.
    fn jwt(payload: &str) -> String {
        use base64::Engine;
        let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.c2ln",
            enc.encode(br#"{"alg":"RS256"}"#),
            enc.encode(payload)
        )
    }

    #[test]
    fn a_token_for_another_audience_is_never_accepted() {
        let by_field = r#"{"access_token":"a.b.c","expires_in":"3600","resource":"https://management.azure.com"}"#;
        let by_claim = format!(
            r#"{{"access_token":"{}","expires_in":"3600","resource":"{RES}"}}"#,
            jwt(r#"{"aud":"https://ai.azure.com"}"#)
        );
        for body in [by_field.to_owned(), by_claim] {
            match parse_response(Some(200), body.as_bytes(), NOW_MS, RES) {
                Err(FetchFailure::WrongAudience { asked, got }) => {
                    assert_eq!(asked, RES);
                    assert!(
                        got == "https://management.azure.com" || got == "https://ai.azure.com",
                        "{got}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        let f = FetchFailure::WrongAudience {
            asked: RES.into(),
            got: "x".into(),
        };
        assert_eq!(f.class(), FailureClass::Refused);
    }

    #[test]
    fn the_same_audience_with_a_trailing_slash_or_other_case_is_accepted() {
        let body = format!(
            r#"{{"access_token":"{}","expires_in":"3600","resource":"https://CognitiveServices.azure.com/"}}"#,
            jwt(r#"{"aud":"https://cognitiveservices.azure.com/"}"#)
        );
        assert!(parse_response(Some(200), body.as_bytes(), NOW_MS, RES).is_ok());
    }

    #[test]
    fn a_garbled_audience_is_shown_as_a_placeholder() {
        let body = r#"{"access_token":"a.b.c","expires_in":"3600","resource":"https://x\" && id"}"#;
        match parse_response(Some(200), body.as_bytes(), NOW_MS, RES) {
            Err(FetchFailure::WrongAudience { got, .. }) => {
                assert_eq!(got, "<not an audience URI>")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn expiry_is_the_earliest_of_expires_on_expires_in_and_the_claim() {
        let now_s = NOW_MS / 1000;
        // expires_on says a day, expires_in an hour: an hour, and a warning.
        let body = format!(
            r#"{{"access_token":"a.b.c","expires_on":"{}","expires_in":"3600"}}"#,
            now_s + 86_400
        );
        let issued = parse_response(Some(200), body.as_bytes(), NOW_MS, RES).unwrap();
        assert_eq!(issued.token.expires_at_ms, (now_s + 3600) * 1000);
        assert!(issued.warning.unwrap().contains("disagree by 82800 s"));
        // Agreeing to the second: no warning.
        let body = format!(
            r#"{{"access_token":"a.b.c","expires_on":"{}","expires_in":"3600"}}"#,
            now_s + 3600
        );
        assert_eq!(
            parse_response(Some(200), body.as_bytes(), NOW_MS, RES)
                .unwrap()
                .warning,
            None
        );
        // The token's own exp is earlier still.
        let body = format!(
            r#"{{"access_token":"{}","expires_in":"3600"}}"#,
            jwt(&format!(r#"{{"aud":"{RES}","exp":{}}}"#, now_s + 600))
        );
        let issued = parse_response(Some(200), body.as_bytes(), NOW_MS, RES).unwrap();
        assert_eq!(issued.token.expires_at_ms, (now_s + 600) * 1000);
    }

    #[test]
    fn parse_errors_never_quote_the_body() {
        for body in [
            r#"{"access_token":{"secret":"SECRET-VALUE"}}"#,
            r#"{"access_token":"x","token_type":["SECRET-VALUE"]}"#,
            r#"SECRET-VALUE"#,
        ] {
            let shown = format!(
                "{:?}",
                parse_response(Some(200), body.as_bytes(), NOW_MS, RES)
            );
            assert!(!shown.contains("SECRET"), "{shown}");
        }
    }
}
