//! `workload_identity`: AKS workload identity. The projected service-account
//! token is fetched anew for every exchange from an Envoy listener that serves
//! the file, then exchanged at Entra (AZURE_FACTS §2).

use serde::Deserialize;
use serde_json::{Map, Value};

use super::entra::{self, app_ids, entra_endpoint, EntraApp, Proof};
use super::{Configure, Endpoint, Exchange, Refusal, Step, TokenRequest, TokenSource, Verdict};
use crate::azure::Cloud;
use crate::fields::checks::{check_authority, non_empty, split_endpoint, timeout};
use crate::fields::env::{self, Env};
use crate::fields::errors::{invalid, read, ConfigError};
use crate::token::{FetchFailure, Secret};

pub const DEFAULT_ASSERTION_CLUSTER: &str = "federated_token";
pub const DEFAULT_ASSERTION_AUTHORITY: &str = "federated-token";
pub const DEFAULT_ASSERTION_PATH: &str = "/";
/// A projected service-account token is ~1 KB; anything near this is not one.
pub const MAX_ASSERTION_BYTES: usize = 16 * 1024;

/// AKS workload identity: the projected service-account token, fetched anew
/// for every exchange from an Envoy listener that serves the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIdentitySource {
    pub cluster: String,
    pub authority: String,
    pub tenant_id: String,
    pub client_id: String,
    pub assertion_cluster: String,
    pub assertion_authority: String,
    pub assertion_path: String,
    pub timeout_ms: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkloadIdentity {
    #[serde(rename = "type")]
    _kind: Option<String>,
    cluster: Option<String>,
    authority: Option<String>,
    tenant_id: Option<String>,
    client_id: Option<String>,
    assertion_cluster: Option<String>,
    assertion_authority: Option<String>,
    assertion_path: Option<String>,
    timeout_ms: Option<u64>,
}

impl Configure for WorkloadIdentitySource {
    const KIND: &'static str = "workload_identity";

    fn configure(value: Value, field: &str, env: Env<'_>) -> Result<Self, ConfigError> {
        check_workload_identity(read(value, &format!("{field}."))?, field, env)
    }
}

fn check_workload_identity(
    raw: RawWorkloadIdentity,
    field: &str,
    env: Env<'_>,
) -> Result<WorkloadIdentitySource, ConfigError> {
    let sub = |name: &str| format!("{field}.{name}");
    // The workload-identity webhook sets AZURE_AUTHORITY_HOST (https://login.microsoftonline.com/).
    let injected = env
        .var(env::AZURE_AUTHORITY_HOST)
        .and_then(|url| split_endpoint(&url).map(|(host, _)| host));
    let (cluster, authority) = entra_endpoint(raw.cluster, raw.authority, field, injected)?;
    let (tenant_id, client_id) = app_ids(raw.tenant_id, raw.client_id, field, env)?;
    let assertion_cluster = match raw.assertion_cluster {
        Some(c) => non_empty(
            &c,
            &sub("assertion_cluster"),
            "name the cluster of the token-file listener, e.g. \"federated_token\"",
        )?,
        None => DEFAULT_ASSERTION_CLUSTER.to_owned(),
    };
    let assertion_authority = match raw.assertion_authority {
        Some(a) => check_authority(
            &a,
            &sub("assertion_authority"),
            "write a host name such as \"federated-token\"",
        )?,
        None => DEFAULT_ASSERTION_AUTHORITY.to_owned(),
    };
    let assertion_path = match raw.assertion_path {
        Some(p) if p.starts_with('/') && p.bytes().all(|b| b.is_ascii_graphic()) => p,
        Some(_) => {
            return Err(invalid(
                sub("assertion_path"),
                "is not a path",
                "start it with '/', such as \"/\"",
            ))
        }
        None => DEFAULT_ASSERTION_PATH.to_owned(),
    };
    Ok(WorkloadIdentitySource {
        cluster,
        authority,
        tenant_id,
        client_id,
        assertion_cluster,
        assertion_authority,
        assertion_path,
        timeout_ms: timeout(raw.timeout_ms, field)?,
    })
}

impl TokenSource for WorkloadIdentitySource {
    fn cluster(&self) -> &str {
        &self.cluster
    }

    fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }

    fn identity_noun(&self) -> &'static str {
        "workload identity"
    }

    fn application(&self) -> Option<(&str, &str)> {
        Some((&self.client_id, &self.tenant_id))
    }

    fn calls(&self) -> u64 {
        2
    }

    fn cloud(&self) -> Option<Cloud> {
        Cloud::of_authority(&self.authority)
    }

    fn describe(&self) -> String {
        format!(
            "Entra ({}, tenant {}) via cluster {} for application {} with the service-account token from cluster {}",
            self.authority, self.tenant_id, self.cluster, self.client_id, self.assertion_cluster
        )
    }

    fn fingerprint(&self) -> String {
        format!(
            "workload_identity\n{}\n{}\n{}\n{}\n{}{}",
            self.cluster,
            self.authority,
            self.tenant_id,
            self.client_id,
            self.assertion_cluster,
            self.assertion_path
        )
    }

    /// The service-account token first.
    fn begin(&self, _resource: &str, _now_ms: u64, _nonce: u64) -> (Exchange, Step) {
        (
            Exchange::Assertion,
            Step::Call(TokenRequest {
                cluster: self.assertion_cluster.clone(),
                timeout_ms: self.timeout_ms,
                headers: vec![
                    (":method", "GET".to_owned()),
                    (":path", self.assertion_path.clone()),
                    (":authority", self.assertion_authority.clone()),
                ],
                body: Vec::new(),
            }),
        )
    }

    fn token_request(
        &self,
        resource: &str,
        _now_ms: u64,
        _nonce: u64,
        assertion: Option<Secret>,
    ) -> Step {
        match assertion {
            Some(assertion) => self
                .app()
                .token_request(resource, Proof::Assertion(assertion.expose())),
            None => Step::Done(Err(FetchFailure::AssertionUnavailable {
                problem: "no service-account token was fetched first".to_owned(),
            })),
        }
    }

    fn assertion_cluster(&self) -> Option<&str> {
        Some(&self.assertion_cluster)
    }

    fn endpoint(&self, cluster: &str) -> Endpoint {
        if cluster == self.assertion_cluster {
            return Endpoint {
                name: "The service-account token listener",
                reach: "serving the projected service-account token file with direct_response (see envoy/aks-workload-identity.yaml)".to_owned(),
                unreachable: "It is the Envoy listener that serves AZURE_FEDERATED_TOKEN_FILE; check its port and that it is loaded".to_owned(),
            };
        }
        entra::endpoint(&self.authority)
    }

    fn refused(&self, refusal: &Refusal<'_>, details: &mut Map<String, Value>) -> Verdict {
        entra::refused(&self.app(), refusal, details)
    }
}

impl WorkloadIdentitySource {
    /// The application as its token requests and refusals name it.
    fn app(&self) -> EntraApp<'_> {
        EntraApp {
            cluster: &self.cluster,
            authority: &self.authority,
            tenant: &self.tenant_id,
            client: &self.client_id,
            timeout_ms: self.timeout_ms,
            secret: None,
            thumbprint: None,
        }
    }
}

/// The projected service-account token, as the token-file listener serves it.
pub fn parse_assertion(status: Option<u16>, body: &[u8]) -> Result<Secret, FetchFailure> {
    let unavailable = |problem: String| FetchFailure::AssertionUnavailable { problem };
    let status = status.ok_or_else(|| {
        unavailable("the service-account token listener did not answer".to_owned())
    })?;
    if status != 200 {
        return Err(unavailable(format!(
            "the service-account token listener answered {status}"
        )));
    }
    if body.len() > MAX_ASSERTION_BYTES {
        return Err(unavailable(format!(
            "the service-account token is larger than {MAX_ASSERTION_BYTES} bytes"
        )));
    }
    let token = std::str::from_utf8(body)
        .ok()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            unavailable("the service-account token file is empty or not text".to_owned())
        })?;
    if crate::claims::jwt_segments(token).is_none() {
        return Err(unavailable(
            "the service-account token file does not hold a JWT".to_owned(),
        ));
    }
    Ok(Secret::new(token.to_owned()))
}
