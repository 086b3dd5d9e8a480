//! The VM's environment: the variables the sources read (AZURE_FACTS §2),
//! read once, at configuration time, and named in errors without ever
//! repeating a value.

use super::errors::{invalid, ConfigError};

pub const IDENTITY_ENDPOINT: &str = "IDENTITY_ENDPOINT";
pub const IDENTITY_HEADER: &str = "IDENTITY_HEADER";
pub const AZURE_TENANT_ID: &str = "AZURE_TENANT_ID";
pub const AZURE_CLIENT_ID: &str = "AZURE_CLIENT_ID";
pub const AZURE_CLIENT_SECRET: &str = "AZURE_CLIENT_SECRET";
pub const AZURE_AUTHORITY_HOST: &str = "AZURE_AUTHORITY_HOST";

/// The VM's environment, as Envoy hands it to the module
/// (`vm_config.environment_variables`): read once, at configuration time.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// No environment at all.
pub fn no_env(_: &str) -> Option<String> {
    None
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
