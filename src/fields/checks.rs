//! Checks every part of the configuration shares: numbers in a range,
//! names of hosts, endpoints and clusters, a call's timeout. Each names its
//! field and never repeats what may be a secret.

use serde_json::Value;

use super::errors::{invalid, ConfigError};

/// Timeout of one token call.
pub const DEFAULT_FETCH_TIMEOUT_MS: u64 = 10_000;
pub const MAX_FETCH_TIMEOUT_MS: u64 = 60_000;

pub(crate) fn milliseconds(
    value: Option<u64>,
    field: &str,
    min: u64,
    max: u64,
    default: u64,
) -> Result<u64, ConfigError> {
    let Some(ms) = value else {
        return Ok(default);
    };
    if !(min..=max).contains(&ms) {
        return Err(invalid(
            field,
            format!("is {ms}"),
            format!("use a value from {min} to {max} (default {default})"),
        ));
    }
    Ok(ms)
}

pub(crate) fn check_authority(a: &str, field: &str, fix: &str) -> Result<String, ConfigError> {
    let a = non_empty(a, field, fix)?;
    let ok = a
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !ok {
        return Err(invalid(field, "is not a host[:port]", fix));
    }
    Ok(a)
}

/// `http://localhost:42356/msi/token` → (`localhost:42356`, `/msi/token`).
pub(crate) fn split_endpoint(url: &str) -> Option<(String, String)> {
    let rest = url
        .trim()
        .strip_prefix("http://")
        .or_else(|| url.trim().strip_prefix("https://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let ok = !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
        && path.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| (authority.to_owned(), path.to_owned()))
}

/// The kind of a JSON value, never the value.
pub(crate) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "true or false",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn timeout(value: Option<u64>, field: &str) -> Result<u64, ConfigError> {
    milliseconds(
        value,
        &format!("{field}.timeout_ms"),
        100,
        MAX_FETCH_TIMEOUT_MS,
        DEFAULT_FETCH_TIMEOUT_MS,
    )
}

pub(crate) fn non_empty(value: &str, field: &str, fix: &str) -> Result<String, ConfigError> {
    let s = value.trim();
    if s.is_empty() {
        return Err(invalid(field, "is empty", fix));
    }
    Ok(s.to_owned())
}
