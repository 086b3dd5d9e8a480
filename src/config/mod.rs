//! Plugin configuration: the JSON contract of DESIGN.md, parse → check → plan.
//!
//! 0. the single-target shorthand is rewritten into the `targets` it stands
//!    for, on the JSON value (`shorthand.rs`), so a target's keys are
//!    declared once;
//! 1. serde types describe the JSON exactly (`raw.rs`, `deny_unknown_fields`),
//!    read through `serde_path_to_error` so a wrong value is named by its full
//!    path (`targets[1].paths[0]`; `fields/errors.rs`);
//! 2. one checked step, `TryFrom<RawConfig> for Config`, compiles them into a
//!    plan (`targets.rs`): targets with dense ids, each pointing at one of the
//!    distinct tokens (source, identity, resource) the filter keeps.
//!
//! `token_source` is tagged by `type`; each source reads its own body (see
//! `source/`), with its path kept.

use serde_json::{Map, Value};

use crate::source::Source;

pub mod defaults;
mod raw;
mod shorthand;
mod targets;

pub use self::defaults::*;
pub use self::raw::RawConfig;
use crate::fields::errors::read;
pub use crate::fields::{no_env, ConfigError, Env, HostEnv, SdsRef, SdsSecret, SecretHost, Vars};
pub use crate::policy::{ClientKeys, ClientToken, OnTokenFailure, Policy};
use crate::rewrite::{client_chosen, host_without_port, HostPatterns};
use crate::route::{NearMiss, Routed};
use crate::scope;
pub use crate::source::app_service::DEFAULT_APP_SERVICE_CLUSTER;
pub use crate::source::entra::{DEFAULT_ENTRA_AUTHORITY, DEFAULT_ENTRA_CLUSTER, ENTRA_AUTHORITIES};
pub use crate::source::http::DEFAULT_REFRESH_INTERVAL_MS;
pub use crate::source::imds::{DEFAULT_AUTHORITY, DEFAULT_CLUSTER};
pub use crate::source::workload_identity::{
    DEFAULT_ASSERTION_AUTHORITY, DEFAULT_ASSERTION_CLUSTER, DEFAULT_ASSERTION_PATH,
};
pub use crate::source::{
    AppServiceSource, ClientCredential, ClientCredentialsSource, CredentialKind, HttpSource,
    IdentitySelector, ImdsSource, SigningKey, WorkloadIdentitySource,
};

/// A checked plugin configuration: the targets in order, and the distinct
/// tokens they use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub targets: Vec<Target>,
    pub tokens: Vec<TokenSpec>,
}

/// A set of requests that get one credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub hosts: HostPatterns,
    /// Path prefixes; empty means every path.
    pub paths: Vec<String>,
    /// Envoy clusters the request must be routed to; empty means any, and
    /// then only bare host names match (see [`HostPatterns::matches_bare`]).
    pub clusters: Vec<String>,
    /// Index into [`Config::tokens`].
    pub token: usize,
    pub policy: Policy,
}

/// Everything that decides one token and how long requests wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    pub source: Source,
    /// App ID URI of the audience, without `/.default` (IMDS wants it bare).
    pub resource: String,
    /// Longest time a request is held while no usable token exists.
    pub token_wait_timeout_ms: u64,
    /// Minimum time between two replacement requests for a rejected token.
    pub invalidation_interval_ms: u64,
    /// The first target that uses this token: the `target` label of the
    /// token's metrics and log lines.
    pub label: String,
    /// Fetch it at start-up, before any request needs it. True for every
    /// token a configured target uses; false only for the built-in
    /// Foundry-projects target of `{}`, fetched on first use.
    pub prefetch: bool,
}

impl TokenSpec {
    pub fn imds(&self) -> Option<&ImdsSource> {
        match &self.source {
            Source::Imds(imds) => Some(imds),
            _ => None,
        }
    }

    /// A stable name for everything that decides *which* token is fetched:
    /// the source, the identity and the resource (never a secret). Shared-data
    /// records are keyed by it, so workers running an old and a new
    /// configuration side by side share a token only when it is the same token.
    pub fn fingerprint(&self) -> String {
        let canonical = format!("{}\n{}", self.source.fingerprint(), self.resource);
        // SHA-256 is in the tree already (gateway keys, certificates); its
        // first 8 bytes name the record.
        use sha2::{Digest, Sha256};
        Sha256::digest(canonical.as_bytes())
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Where each target's counters start in one dense array, and its length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    /// `first[t]`: target `t`'s slot without a client; its clients follow.
    pub first: Vec<usize>,
    /// Slots in all.
    pub count: usize,
}

impl Default for Config {
    /// What `{}` means.
    fn default() -> Self {
        Config::from_value(&Value::Object(Map::new())).unwrap_or(Config {
            targets: Vec::new(),
            tokens: Vec::new(),
        })
    }
}
impl Config {
    /// Parse the bytes Envoy hands to `on_configure`, without an environment.
    /// Empty means `{}`.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        Config::parse_with_env(bytes, &no_env)
    }

    /// Parse with the VM's environment: the sources that read variables
    /// (App Service, service principals, workload identity) read them here.
    /// No SDS secrets: a `*_sds` credential is refused.
    pub fn parse_with_env(bytes: &[u8], vars: Vars<'_>) -> Result<Config, ConfigError> {
        Config::parse_with_host(bytes, &HostEnv::vars(vars))
    }

    /// Parse with what the host offers: its environment, and the SDS
    /// generic secrets it can subscribe to (the native build).
    pub fn parse_with_host(bytes: &[u8], env: Env<'_>) -> Result<Config, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Config::from_value_with_host(&Value::Object(Map::new()), env);
        }
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::NotJson(e.to_string()))?;
        Config::from_value_with_host(&value, env)
    }

    pub fn from_value(value: &Value) -> Result<Config, ConfigError> {
        Config::from_value_with_env(value, &no_env)
    }

    pub fn from_value_with_env(value: &Value, vars: Vars<'_>) -> Result<Config, ConfigError> {
        Config::from_value_with_host(value, &HostEnv::vars(vars))
    }

    pub fn from_value_with_host(value: &Value, env: Env<'_>) -> Result<Config, ConfigError> {
        let (value, written) = shorthand::rewrite(value.clone());
        let mut raw: RawConfig = read(value, "").map_err(|e| written.as_written(e))?;
        raw.written = written;
        Config::try_from((raw, env))
    }

    /// The token of target `target`.
    pub fn token_of(&self, target: usize) -> Option<&TokenSpec> {
        self.tokens.get(self.targets.get(target)?.token)
    }

    /// The targets (by index) that send the application's own key on when
    /// token `token` cannot be had (`on_token_failure: forward_key`).
    pub fn forward_key_targets(&self, token: usize) -> Vec<u32> {
        (0u32..)
            .zip(&self.targets)
            .filter(|(_, t)| {
                t.token == token && t.policy.on_token_failure == OnTokenFailure::ForwardKey
            })
            .map(|(index, _)| index)
            .collect()
    }

    /// The counter slots of authorized requests: per target, one without a
    /// client and then one per listed client key.
    pub fn slots(&self) -> Slots {
        let mut first = Vec::with_capacity(self.targets.len());
        let mut count = 0;
        for target in &self.targets {
            first.push(count);
            count += 1 + target.policy.client_keys.as_ref().map_or(0, |k| k.len());
        }
        Slots { first, count }
    }

    /// The index of the target `authority` (and, if asked, the path and the
    /// routed cluster) belongs to: the first whose hosts match, whose paths
    /// (if any) prefix its path, and whose clusters (if any) contain the
    /// cluster Envoy routed it to (see [`crate::route`]). `None`: the request
    /// is not ours.
    pub fn route(&self, authority: &str, request: &mut dyn Routed) -> Option<usize> {
        self.targets.iter().position(|target| {
            let host = if target.clusters.is_empty() {
                target.hosts.matches_bare(authority)
            } else {
                target.hosts.matches_spelled(authority)
            };
            host && (target.paths.is_empty()
                || request
                    .path()
                    .is_some_and(|path| scope::in_scope(path, &target.paths)))
                && if target.clusters.is_empty() {
                    !request.names_destination()
                        && request.cluster().is_some_and(|c| !client_chosen(c))
                } else {
                    request
                        .cluster()
                        .is_some_and(|cluster| target.clusters.iter().any(|c| c == cluster))
                }
        })
    }

    /// Why a request that no target took might have been meant for one
    /// (`request` answers from what [`Config::route`] already read).
    pub fn near_miss(&self, authority: &str, request: &mut dyn Routed) -> Option<NearMiss> {
        let unbound = self
            .targets
            .iter()
            .any(|t| t.clusters.is_empty() && t.hosts.matches_bare(authority));
        if unbound && (request.names_destination() || request.cluster().is_some_and(client_chosen))
        {
            return Some(NearMiss::ClientChosenDestination);
        }
        let spelled = self
            .targets
            .iter()
            .any(|t| t.clusters.is_empty() && t.hosts.matches_spelled(authority));
        if spelled {
            return Some(NearMiss::Spelling);
        }
        let host = host_without_port(authority);
        let host = host.strip_suffix('.').unwrap_or(host);
        crate::azure::host(host).map(|_| NearMiss::UnlistedAzureHost)
    }
}

#[cfg(test)]
mod tests;
