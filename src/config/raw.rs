//! The JSON as written: serde types, every key optional, unknown keys refused.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::policy::{ClientToken, OnTokenFailure};

/// The JSON as written. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub(crate) targets: Option<Vec<RawTarget>>,
    pub(crate) token_source: Option<Map<String, Value>>,
    pub(crate) hosts: Option<Vec<String>>,
    pub(crate) resource: Option<String>,
    pub(crate) on_token_failure: Option<OnTokenFailure>,
    pub(crate) client_token: Option<ClientToken>,
    pub(crate) client_keys: Option<Vec<RawClientKey>>,
    pub(crate) token_wait_timeout_ms: Option<u64>,
    pub(crate) invalidation_interval_ms: Option<u64>,
}

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClientKey {
    pub(crate) name: String,
    pub(crate) sha256: String,
}
