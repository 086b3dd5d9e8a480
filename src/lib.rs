//! aoai-msi-filter: a proxy-wasm HTTP filter that replaces the `api-key` of
//! requests to Azure OpenAI with a managed-identity token, and explains
//! authorization failures.
//!
//! Everything but `glue` is pure: decisions are functions of their inputs and
//! of the time, testable on the host and in wasm. `glue` is the only code that
//! calls proxy-wasm, and it is compiled only for wasm with the `glue` feature
//! (the native build's host is the `aoai-msi-native` crate, `native/`).

pub mod agent;
pub mod azure;
pub mod claims;
pub mod clock;
pub mod codes;
pub mod config;
pub mod diagnose;
pub mod fields;
pub mod lifecycle;
pub mod limiter;
pub mod metrics;
pub mod parked;
pub mod policy;
pub mod request;
pub mod rewrite;
pub mod route;
pub mod safe;
pub mod scope;
pub mod source;
pub mod store;
pub mod token;
pub mod wire;
pub mod worker;

#[cfg(all(feature = "glue", target_arch = "wasm32"))]
mod glue;
