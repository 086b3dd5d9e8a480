//! `app_service`: the managed identity of an App Service or Container Apps
//! app, from the platform's local endpoint (`IDENTITY_ENDPOINT`, with
//! `IDENTITY_HEADER`; AZURE_FACTS §2).

use serde::Deserialize;
use serde_json::{Map, Value};

use super::identity::{check_selector, IdentityGet, IdentitySelector};
use super::{unavailable, Configure, Endpoint, Refusal, Step, TokenSource, Verdict};
use crate::codes::code;
use crate::fields::checks::{non_empty, split_endpoint, timeout};
use crate::fields::env::{self, required_env, Env};
use crate::fields::errors::{invalid, read, ConfigError};
use crate::token::{FailureClass, Secret};

pub const APP_SERVICE_API_VERSION: &str = "2019-08-01";
pub const DEFAULT_APP_SERVICE_CLUSTER: &str = "azure_identity";

/// App Service and Container Apps: the platform's local identity endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppServiceSource {
    pub cluster: String,
    /// `host:port` of `IDENTITY_ENDPOINT`.
    pub authority: String,
    /// Path of `IDENTITY_ENDPOINT`.
    pub path: String,
    pub identity: IdentitySelector,
    /// `IDENTITY_HEADER`, sent as `X-IDENTITY-HEADER`.
    pub header: Secret,
    pub timeout_ms: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAppService {
    #[serde(rename = "type")]
    _kind: Option<String>,
    cluster: Option<String>,
    client_id: Option<String>,
    /// App Service calls it `principal_id`; `object_id` is accepted as well.
    #[serde(alias = "principal_id")]
    object_id: Option<String>,
    mi_res_id: Option<String>,
    timeout_ms: Option<u64>,
}

impl Configure for AppServiceSource {
    const KIND: &'static str = "app_service";

    fn configure(value: Value, field: &str, env: Env<'_>) -> Result<Self, ConfigError> {
        check_app_service(read(value, &format!("{field}."))?, field, env)
    }
}

fn check_app_service(
    raw: RawAppService,
    field: &str,
    env: Env<'_>,
) -> Result<AppServiceSource, ConfigError> {
    let sub = |name: &str| format!("{field}.{name}");
    let endpoint = required_env(
        env,
        env::IDENTITY_ENDPOINT,
        field,
        "the App Service identity endpoint",
    )?;
    let (authority, path) = split_endpoint(&endpoint).ok_or_else(|| {
        invalid(
            field,
            format!(
                "reads {} from the environment, and it is not an http:// URL with a host",
                env::IDENTITY_ENDPOINT,
            ),
            "pass the variable App Service or Container Apps sets, unchanged",
        )
    })?;
    let header = required_env(
        env,
        env::IDENTITY_HEADER,
        field,
        "the identity endpoint's secret",
    )?;
    let selectors = [raw.client_id, raw.object_id, raw.mi_res_id];
    let identity = check_selector(field, selectors, "mi_res_id")?;
    let cluster = match raw.cluster {
        Some(c) => non_empty(
            &c,
            &sub("cluster"),
            "name the Envoy cluster that reaches the IDENTITY_ENDPOINT host and port, e.g. \"azure_identity\"",
        )?,
        None => DEFAULT_APP_SERVICE_CLUSTER.to_owned(),
    };
    Ok(AppServiceSource {
        cluster,
        authority,
        path,
        identity,
        header: Secret::new(header),
        timeout_ms: timeout(raw.timeout_ms, field)?,
    })
}

impl TokenSource for AppServiceSource {
    fn cluster(&self) -> &str {
        &self.cluster
    }

    fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }

    fn identity_noun(&self) -> &'static str {
        "managed identity"
    }

    fn describe(&self) -> String {
        format!(
            "the App Service identity endpoint {}{} via cluster {} for {}",
            self.authority,
            crate::safe::path_shown(&self.path),
            self.cluster,
            self.identity.describe()
        )
    }

    fn fingerprint(&self) -> String {
        let (selector, value) = self.identity.app_service_param().unwrap_or(("system", ""));
        format!(
            "app_service\n{}\n{}{}\n{selector}={value}",
            self.cluster, self.authority, self.path
        )
    }

    fn token_request(&self, resource: &str, _now_ms: u64, _nonce: u64, _: Option<Secret>) -> Step {
        IdentityGet {
            cluster: &self.cluster,
            authority: &self.authority,
            timeout_ms: self.timeout_ms,
            path: &self.path,
            api_version: APP_SERVICE_API_VERSION,
            selector: self.identity.app_service_param(),
            proof: ("x-identity-header", self.header.expose().to_owned()),
        }
        .call(resource)
    }

    fn endpoint(&self, _cluster: &str) -> Endpoint {
        Endpoint {
            name: "The App Service identity endpoint",
            reach: format!("pointing at {} (the host and port of IDENTITY_ENDPOINT)", self.authority),
            unreachable: format!(
                "The endpoint listens on the app's own host ({}); check that the cluster's port is the one in IDENTITY_ENDPOINT",
                self.authority
            ),
        }
    }

    fn refused(&self, r: &Refusal<'_>, _details: &mut Map<String, Value>) -> Verdict {
        let (status, said, class, resource) = (r.status, r.said, r.class, r.resource);
        if class == FailureClass::Transient {
            return unavailable("the App Service identity endpoint failed", said);
        }
        let lower = said.to_ascii_lowercase();
        if lower.contains("unable to load the proper managed identity") {
            return (
                401,
                code::MANAGED_IDENTITY_AMBIGUOUS,
                format!(
                    "The app has several user-assigned identities and none was chosen, or the chosen one is not \
                     assigned{said}. Set token_source.client_id (or object_id / mi_res_id) to an identity assigned \
                     to this app that holds the Cognitive Services OpenAI User role on the resource."
                ),
            );
        }
        if lower.contains("no managed identity") || lower.contains("identity not found") {
            return (
                401,
                code::MANAGED_IDENTITY_NOT_FOUND,
                format!(
                    "This app has no managed identity{said}. Turn on the system-assigned identity (Identity blade, \
                     or `az webapp identity assign` / `az containerapp identity assign`), or assign a user-assigned one."
                ),
            );
        }
        if status == 401 || status == 403 {
            return (
                401,
                code::TOKEN_REQUEST_REJECTED,
                format!(
                    "The App Service identity endpoint refused X-IDENTITY-HEADER{said}. IDENTITY_HEADER changes when \
                     the platform restarts the app; restart the proxy so it reads the variable again."
                ),
            );
        }
        (
            401,
            code::TOKEN_REQUEST_REJECTED,
            format!(
                "The App Service identity endpoint refused the token request{said}; resource is \"{}\". Check the \
                 resource and the identity selector.",
                resource
            ),
        )
    }
}
