//! The JSON as written: serde types, every key optional, unknown keys refused.
//! The single-target shorthand is rewritten into `targets` before these are
//! read (`shorthand.rs`), so a target's keys are declared once, in
//! [`RawTarget`]; [`Written`] remembers how the targets were written, so
//! that errors name each field where the user wrote it.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::fields::ConfigError;
use crate::policy::{ClientToken, OnTokenFailure};

/// The JSON as read, the shorthand rewritten into `targets`. Every key is
/// optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub(crate) targets: Option<Vec<RawTarget>>,
    pub(crate) token_wait_timeout_ms: Option<u64>,
    pub(crate) invalidation_interval_ms: Option<u64>,
    /// How the targets were written (not a key: set by the rewrite).
    #[serde(skip)]
    pub(crate) written: Written,
}

/// One target. Its keys but `name`, `paths` and `clusters` may also stand at
/// the top level, as the shorthand: a new one is listed in [`SHORTHAND`] too.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTarget {
    pub(crate) name: Option<String>,
    pub(crate) hosts: Option<Vec<String>>,
    pub(crate) paths: Option<Vec<String>>,
    pub(crate) clusters: Option<Vec<String>>,
    pub(crate) resource: Option<String>,
    pub(crate) token_source: Option<Map<String, Value>>,
    pub(crate) on_token_failure: Option<OnTokenFailure>,
    pub(crate) client_token: Option<ClientToken>,
    pub(crate) client_keys: Option<Vec<RawClientKey>>,
}

/// The keys of [`RawTarget`] the shorthand writes at the top level, in the
/// order an unknown top-level key's error lists them (after `targets`).
pub(crate) const SHORTHAND: [&str; 6] = [
    "token_source",
    "hosts",
    "resource",
    "on_token_failure",
    "client_token",
    "client_keys",
];

/// How the targets were written: where their fields are named in errors,
/// and which of them is fetched at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// A `targets` list. `beside`: a shorthand key also set at the top
    /// level, refused once the rest has been read.
    Targets { beside: Option<&'static str> },
    /// The shorthand with `hosts` or `resource`: one target, `default`.
    Shorthand,
    /// The shorthand without either (`{}` too): the Foundry projects target
    /// first, fetched on first use, then `default`.
    Defaults,
}

impl Default for Written {
    fn default() -> Self {
        Written::Targets { beside: None }
    }
}

impl Written {
    /// Where target `index`'s fields are named: `targets[1].`, or nothing
    /// for the shorthand's, whose fields stand at the top level.
    pub(crate) fn prefix(self, index: usize) -> String {
        match self {
            Written::Targets { .. } => format!("targets[{index}]."),
            Written::Shorthand | Written::Defaults => String::new(),
        }
    }

    /// Is target `index` one the configuration names, fetched at start-up
    /// (not the Foundry one `{}` stands for speculatively)?
    pub(crate) fn prefetch(self, index: usize) -> bool {
        !(self == Written::Defaults && index == 0)
    }

    /// An error of the typed read, naming its field as written: a shorthand
    /// target's `targets[0].hosts[1]` is `hosts[1]`, and an unknown
    /// top-level key is told the shorthand's keys as well as `targets`.
    pub(crate) fn as_written(self, error: ConfigError) -> ConfigError {
        match error {
            ConfigError::UnknownField { field, expected } if !field.contains(['.', '[']) => {
                // serde lists RawConfig's own keys, `targets` first.
                let mut keys: Vec<&str> = expected.split(", ").collect();
                keys.splice(1..1, SHORTHAND);
                ConfigError::UnknownField {
                    field,
                    expected: keys.join(", "),
                }
            }
            error if self == Written::Shorthand || self == Written::Defaults => {
                error.with_field(top_level)
            }
            error => error,
        }
    }
}

/// `targets[0].hosts[1]` → `hosts[1]`.
fn top_level(field: String) -> String {
    match field
        .strip_prefix("targets[")
        .and_then(|rest| rest.split_once("]."))
    {
        Some((_, rest)) => rest.to_owned(),
        None => field,
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClientKey {
    pub(crate) name: String,
    pub(crate) sha256: String,
}
