//! Checks every part of the configuration shares: numbers in a range, names
//! of hosts and variables, values read from the VM's environment. Each
//! names its field and never repeats what may be a secret.

use serde_json::Value;

use super::defaults::{DEFAULT_FETCH_TIMEOUT_MS, MAX_FETCH_TIMEOUT_MS};
use super::errors::{invalid, ConfigError};

/// The VM's environment, as Envoy hands it to the module
/// (`vm_config.environment_variables`): read once, at configuration time.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// No environment at all.
pub fn no_env(_: &str) -> Option<String> {
    None
}

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

pub(crate) fn env_name(name: &str, field: &str) -> Result<String, ConfigError> {
    let ok = (1..=128).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(name.to_owned())
    } else {
        // Not repeated: a value pasted where its variable's name belongs.
        Err(invalid(
            field,
            "is not an environment variable name",
            "write the variable's name, such as \"AZURE_CLIENT_SECRET\", not its value",
        ))
    }
}

/// A variable of the VM's environment that a source cannot do without.
pub(crate) fn required_env(
    env: Env<'_>,
    var: &str,
    field: &str,
    what: &str,
) -> Result<String, ConfigError> {
    match env(var) {
        Some(v) if !v.trim().is_empty() => Ok(v.trim().to_owned()),
        _ => {
            let var = shown_env(var);
            Err(invalid(
                field,
                format!("reads {what} from the environment variable {var}, which the VM does not have (or is empty)"),
                format!("add {var} to vm_config.environment_variables.host_env_keys (Istio: vmConfig.env) and set it in the proxy's environment"),
            ))
        }
    }
}

/// A variable's name as a message may repeat it: conventional names
/// (`AZURE_CLIENT_SECRET`) as they are; anything else may be a value pasted
/// where its name belongs, and is not repeated.
pub(crate) fn shown_env(name: &str) -> &str {
    let conventional = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_uppercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if conventional {
        name
    } else {
        "it names (not repeated here: it is not an UPPER_CASE name)"
    }
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
