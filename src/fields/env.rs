//! What the host offers a configuration: the VM's environment (the
//! variables the sources read, AZURE_FACTS §2, read once, at configuration
//! time, and named in errors without ever repeating a value), and, where the
//! host can, Envoy SDS generic secrets (subscribed to at configuration time,
//! read at every token exchange).
//!
//! The core never asks which host runs it: it asks the [`HostEnv`] whether
//! it can subscribe to a secret, and the host says yes (a [`SdsSecret`] to
//! read later) or why not.

use std::fmt;
use std::sync::Arc;

use super::errors::{invalid, ConfigError};

pub const IDENTITY_ENDPOINT: &str = "IDENTITY_ENDPOINT";
pub const IDENTITY_HEADER: &str = "IDENTITY_HEADER";
pub const AZURE_TENANT_ID: &str = "AZURE_TENANT_ID";
pub const AZURE_CLIENT_ID: &str = "AZURE_CLIENT_ID";
pub const AZURE_CLIENT_SECRET: &str = "AZURE_CLIENT_SECRET";
pub const AZURE_AUTHORITY_HOST: &str = "AZURE_AUTHORITY_HOST";

/// The VM's environment variables, as Envoy hands them to the module
/// (`vm_config.environment_variables`): read once, at configuration time.
pub type Vars<'a> = &'a dyn Fn(&str) -> Option<String>;

/// What the sources read their configuration with: see [`HostEnv`].
pub type Env<'a> = &'a HostEnv<'a>;

/// No environment at all.
pub fn no_env(_: &str) -> Option<String> {
    None
}

/// The host's side of configuration: its environment variables, and its
/// SDS generic secrets if it has any to give.
#[derive(Clone, Copy)]
pub struct HostEnv<'a> {
    vars: Vars<'a>,
    secrets: Option<&'a dyn SecretHost>,
}

impl<'a> HostEnv<'a> {
    /// A host with environment variables and no secrets (proxy-wasm: Envoy
    /// gives a wasm filter no SDS secrets).
    pub fn vars(vars: Vars<'a>) -> HostEnv<'a> {
        HostEnv {
            vars,
            secrets: None,
        }
    }

    /// A host that can also subscribe to SDS generic secrets (the native
    /// dynamic module).
    pub fn with_secrets(vars: Vars<'a>, secrets: &'a dyn SecretHost) -> HostEnv<'a> {
        HostEnv {
            vars,
            secrets: Some(secrets),
        }
    }

    /// The variable `name`, if the VM has it.
    pub fn var(&self, name: &str) -> Option<String> {
        (self.vars)(name)
    }

    /// Subscribe to the SDS generic secret `secret`, or say why not: this
    /// host reads no secrets (`None`), or it refused (`Some(why)`).
    pub fn subscribe(&self, secret: &SdsRef) -> Result<SdsSecret, Option<String>> {
        match self.secrets {
            None => Err(None),
            Some(host) => host.subscribe(secret).map_err(Some),
        }
    }
}

/// Where an SDS generic secret comes from: its name, and the SDS config
/// source as JSON (`None`: a static secret of the bootstrap's
/// `static_resources.secrets`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsRef {
    pub name: String,
    pub sds_config: Option<String>,
}

/// A host that can hand SDS generic secrets to a configuration.
pub trait SecretHost {
    /// Subscribe now (configuration time) to `secret`; the error says why
    /// the host refused, in words for a configuration error.
    fn subscribe(&self, secret: &SdsRef) -> Result<SdsSecret, String>;
}

/// The current bytes of a subscribed secret (`None`: the host has none yet).
pub type ReadSecret = dyn Fn() -> Option<Vec<u8>> + Send + Sync;

/// A subscribed SDS generic secret: its name, and how to read its current
/// value from the host, at each token exchange (so a rotated value is used
/// from the next one on). `Debug` and equality go by the name only.
#[derive(Clone)]
pub struct SdsSecret {
    name: String,
    read: Arc<ReadSecret>,
}

impl SdsSecret {
    pub fn new(name: &str, read: Arc<ReadSecret>) -> SdsSecret {
        SdsSecret {
            name: name.to_owned(),
            read,
        }
    }

    /// The secret's name (never its value).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value now, trimmed; why not, in words naming no value.
    pub fn read(&self) -> Result<String, &'static str> {
        let bytes =
            (self.read)().ok_or("is not there (Envoy has not received it, or no longer has it)")?;
        let text = String::from_utf8(bytes).map_err(|_| "is not UTF-8 text")?;
        let text = text.trim();
        if text.is_empty() {
            return Err("is empty");
        }
        Ok(text.to_owned())
    }
}

impl fmt::Debug for SdsSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SdsSecret({:?}, <value read from the host>)", self.name)
    }
}

impl PartialEq for SdsSecret {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for SdsSecret {}

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
    match env.var(var) {
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
