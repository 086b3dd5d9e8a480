//! Reading one part of the plugin configuration: the error that names a
//! field by its full path (`targets[1].token_source.tenant_id`) and says
//! what to write instead, serde's messages reworded into it, the checks
//! every part shares, and the VM's environment.
//!
//! `config/` (the targets and the plan) and `source/` (each token source's
//! own `token_source` body) both read their fields with these.

pub mod checks;
pub mod env;
pub mod errors;

pub use self::env::{no_env, Env, HostEnv, SdsRef, SdsSecret, SecretHost, Vars};
pub use self::errors::ConfigError;
