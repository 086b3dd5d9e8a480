//! The JSON as written: serde types, every key optional, unknown keys refused.
//! The single-target shorthand is rewritten into `targets` before these are
//! read (`shorthand.rs`), so a target's keys are declared once, in
//! [`RawTarget`].

use serde::Deserialize;
use serde_json::{Map, Value};

use super::shorthand::Written;
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClientKey {
    pub(crate) name: String,
    pub(crate) sha256: String,
}
