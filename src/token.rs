//! Token requests and responses, and the token as a secret.
//!
//! Facts come from AZURE_FACTS.md §1: IMDS takes `api-version=2018-02-01`, the
//! bare resource, at most one identity selector and `Metadata: true`; it answers
//! with every field as a JSON string, times included.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::Config;

pub const IMDS_PATH: &str = "/metadata/identity/oauth2/token";
pub const IMDS_API_VERSION: &str = "2018-02-01";
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
}

/// Everything the glue needs to dispatch a token call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub cluster: String,
    pub timeout_ms: u64,
    /// Pseudo-headers and headers, in order.
    pub headers: Vec<(&'static str, String)>,
}

impl TokenRequest {
    /// The IMDS request for this configuration (built once, at configure time).
    pub fn imds(config: &Config) -> TokenRequest {
        let imds = config.imds();
        let mut path = format!(
            "{IMDS_PATH}?api-version={IMDS_API_VERSION}&resource={}",
            percent_encode(&config.resource)
        );
        if let Some((name, value)) = imds.identity.query_param() {
            path.push('&');
            path.push_str(name);
            path.push('=');
            path.push_str(&percent_encode(value));
        }
        TokenRequest {
            cluster: imds.cluster.clone(),
            timeout_ms: imds.timeout_ms,
            headers: vec![
                (":method", "GET".to_owned()),
                (":path", path),
                (":authority", imds.authority.clone()),
                ("metadata", "true".to_owned()),
            ],
        }
    }

    pub fn path(&self) -> &str {
        self.headers
            .iter()
            .find(|(name, _)| *name == ":path")
            .map_or("", |(_, v)| v.as_str())
    }
}

/// RFC 3986 unreserved characters pass; everything else is %XX.
fn percent_encode(value: &str) -> String {
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
    },
    /// A 200 whose body is not a usable token.
    InvalidBody { problem: String },
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
            FetchFailure::NoResponse | FetchFailure::InvalidBody { .. } => FailureClass::Transient,
            FetchFailure::Status { status, .. } => match status {
                404 | 408 | 410 | 429 | 500..=599 => FailureClass::Transient,
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
}

#[derive(Deserialize)]
struct RawError {
    error: Option<serde_json::Value>,
    error_description: Option<String>,
}

/// Turn a token-endpoint answer into a token or a named failure.
/// `status` is `None` when the call produced no HTTP answer at all.
pub fn parse_response(
    status: Option<u16>,
    body: &[u8],
    now_ms: u64,
) -> Result<Token, FetchFailure> {
    let status = status.ok_or(FetchFailure::NoResponse)?;
    if body.len() > MAX_RESPONSE_BYTES {
        return Err(invalid(format!(
            "the response body is larger than the {MAX_RESPONSE_BYTES} bytes a token response can need"
        )));
    }
    if status != 200 {
        return Err(error_status(status, body));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(invalid("the response body is empty".to_owned()));
    }
    let raw: RawToken = serde_json::from_slice(body).map_err(|e| {
        invalid(format!(
            "the response body is not a JSON token object ({e})"
        ))
    })?;
    let secret = raw
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| invalid("the response has no access_token".to_owned()))?;
    if secret.len() > MAX_TOKEN_BYTES {
        return Err(invalid(format!(
            "access_token has {} bytes, more than {MAX_TOKEN_BYTES}",
            secret.len()
        )));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "access_token contains characters that cannot be sent in an HTTP header".to_owned(),
        ));
    }
    if let Some(kind) = raw.token_type.as_deref() {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(invalid(format!(
                "token_type is \"{}\", not Bearer",
                sanitize(kind, 40)
            )));
        }
    }
    let now_s = now_ms / 1000;
    let expires_on_s = match (&raw.expires_on, &raw.expires_in) {
        (Some(on), _) => on
            .seconds()
            .ok_or_else(|| invalid("expires_on is not a number of seconds".to_owned()))?,
        (None, Some(within)) => now_s.saturating_add(
            within
                .seconds()
                .ok_or_else(|| invalid("expires_in is not a number of seconds".to_owned()))?,
        ),
        (None, None) => {
            return Err(invalid(
                "the response has neither expires_on nor expires_in".to_owned(),
            ))
        }
    };
    if expires_on_s <= now_s {
        return Err(invalid(format!(
            "the token expired {} s before it arrived (expires_on {expires_on_s}); check the clocks of this host and the token endpoint",
            now_s - expires_on_s
        )));
    }
    if expires_on_s - now_s > MAX_LIFETIME_SECS {
        return Err(invalid(format!(
            "the token claims a lifetime of {} s, more than the {MAX_LIFETIME_SECS} s any Entra token has",
            expires_on_s - now_s
        )));
    }
    Ok(Token {
        secret: Secret::new(secret),
        obtained_at_ms: now_ms,
        expires_at_ms: expires_on_s.saturating_mul(1000),
    })
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
    let (error, description) = match raw {
        Some(raw) => (
            raw.error.map(|e| match e {
                serde_json::Value::String(s) => sanitize(&s, 80),
                other => sanitize(&other.to_string(), 80),
            }),
            raw.error_description
                .map(|d| sanitize(&d, MAX_DESCRIPTION_CHARS)),
        ),
        None => (None, None),
    };
    FetchFailure::Status {
        status,
        error,
        description,
    }
}

/// Keep text from a remote party printable and bounded before it is logged
/// or written into a response.
pub fn sanitize(text: &str, max_chars: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max_chars)
        .collect();
    if text.chars().count() > max_chars {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 1_763_752_300_000;

    fn imds_body(expires_on: &str) -> String {
        format!(
            r#"{{"access_token":"eyJ0eXAi.eyJhdWQi.c2ln","refresh_token":"","expires_in":"86399",
               "expires_on":{expires_on},"not_before":"1763752300",
               "resource":"https://cognitiveservices.azure.com","token_type":"Bearer","client_id":"c"}}"#
        )
    }

    #[test]
    fn imds_request_carries_the_bare_resource_the_selector_and_the_metadata_header() {
        let config = Config::parse(br#"{"token_source":{"client_id":"11111111-2222"}}"#).unwrap();
        let request = TokenRequest::imds(&config);
        assert_eq!(request.cluster, "azure_imds");
        assert_eq!(
            request.path(),
            "/metadata/identity/oauth2/token?api-version=2018-02-01\
             &resource=https%3A%2F%2Fcognitiveservices.azure.com&client_id=11111111-2222"
        );
        assert!(request
            .headers
            .contains(&(":authority", "169.254.169.254".to_owned())));
        assert!(request.headers.contains(&("metadata", "true".to_owned())));
        assert!(!request
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-for")));
    }

    #[test]
    fn imds_request_without_selector_names_no_identity() {
        let request = TokenRequest::imds(&Config::default());
        assert!(!request.path().contains("client_id"));
        assert!(!request.path().contains("object_id"));
        assert!(!request.path().contains("msi_res_id"));
    }

    #[test]
    fn string_times_from_imds_are_parsed() {
        let token =
            parse_response(Some(200), imds_body("\"1763838699\"").as_bytes(), NOW_MS).unwrap();
        assert_eq!(token.expires_at_ms, 1_763_838_699_000);
        assert_eq!(token.obtained_at_ms, NOW_MS);
        assert_eq!(token.secret.expose(), "eyJ0eXAi.eyJhdWQi.c2ln");
    }

    #[test]
    fn numeric_times_are_parsed_too() {
        let token = parse_response(Some(200), imds_body("1763838699").as_bytes(), NOW_MS).unwrap();
        assert_eq!(token.expires_at_ms, 1_763_838_699_000);
    }

    #[test]
    fn expires_in_is_used_when_expires_on_is_absent() {
        let body = br#"{"token_type":"Bearer","expires_in":3599,"access_token":"a.b.c"}"#;
        let token = parse_response(Some(200), body, NOW_MS).unwrap();
        assert_eq!(token.expires_at_ms, NOW_MS + 3_599_000);
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let token =
            parse_response(Some(200), imds_body("\"1763838699\"").as_bytes(), NOW_MS).unwrap();
        let shown = format!("{token:?}");
        assert!(!shown.contains("eyJ0eXAi"), "{shown}");
        assert!(shown.contains("redacted"));
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
            match parse_response(Some(200), body, NOW_MS) {
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
            parse_response(Some(200), &body, NOW_MS),
            Err(FetchFailure::InvalidBody { .. })
        ));
    }

    #[test]
    fn imds_errors_keep_the_error_and_its_description() {
        let body = br#"{"error":"invalid_request","error_description":"Identity not found"}"#;
        let failure = parse_response(Some(400), body, NOW_MS).unwrap_err();
        assert_eq!(
            failure,
            FetchFailure::Status {
                status: 400,
                error: Some("invalid_request".into()),
                description: Some("Identity not found".into())
            }
        );
        assert_eq!(failure.class(), FailureClass::Refused);
    }

    #[test]
    fn transient_statuses_and_silence_are_classed_for_retry() {
        for status in [404, 410, 429, 500, 503] {
            let f = parse_response(Some(status), b"", NOW_MS).unwrap_err();
            assert_eq!(f.class(), FailureClass::Transient, "{status}");
        }
        assert_eq!(
            parse_response(None, b"", NOW_MS).unwrap_err(),
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
            assert_eq!(parse_response(Some(status), body, NOW_MS).unwrap_err(), FetchFailure::NoResponse);
        }
        let imds_503 =
            parse_response(Some(503), br#"{"error":"unavailable"}"#, NOW_MS).unwrap_err();
        assert!(matches!(imds_503, FetchFailure::Status { status: 503, .. }));
    }

    #[test]
    fn remote_text_is_sanitized_and_bounded() {
        assert_eq!(sanitize("a\r\nb", 10), "a  b");
        assert_eq!(sanitize("abcdef", 3), "abc…");
    }
}
