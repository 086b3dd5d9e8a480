//! `imds`: the managed identity of the VM, scale set or node pool, from the
//! Instance Metadata Service (AZURE_FACTS §1).

use serde::Deserialize;
use serde_json::{Map, Value};

use super::identity::{check_selector, IdentityGet, IdentitySelector};
use super::{unavailable, Configure, Endpoint, Refusal, Step, TokenSource, Verdict};
use crate::codes::code;
use crate::fields::checks::{check_authority, non_empty, timeout};
use crate::fields::env::Env;
use crate::fields::errors::{read, ConfigError};
use crate::token::{FailureClass, Secret};

pub const IMDS_PATH: &str = "/metadata/identity/oauth2/token";
pub const IMDS_API_VERSION: &str = "2018-02-01";
/// The cluster `{}` expects: Envoy's route to IMDS.
pub const DEFAULT_CLUSTER: &str = "azure_imds";
pub const DEFAULT_AUTHORITY: &str = "169.254.169.254";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsSource {
    /// Envoy cluster the token call is dispatched to.
    pub cluster: String,
    /// `:authority` of the token call.
    pub authority: String,
    pub identity: IdentitySelector,
    /// Timeout of one token call.
    pub timeout_ms: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImds {
    #[serde(rename = "type")]
    _kind: Option<String>,
    cluster: Option<String>,
    authority: Option<String>,
    client_id: Option<String>,
    object_id: Option<String>,
    msi_res_id: Option<String>,
    timeout_ms: Option<u64>,
}

impl Configure for ImdsSource {
    const KIND: &'static str = "imds";

    fn configure(value: Value, field: &str, _env: Env<'_>) -> Result<Self, ConfigError> {
        check_imds(read(value, &format!("{field}."))?, field)
    }
}

fn check_imds(raw: RawImds, field: &str) -> Result<ImdsSource, ConfigError> {
    let sub = |name: &str| format!("{field}.{name}");
    let cluster = match raw.cluster {
        Some(c) => non_empty(
            &c,
            &sub("cluster"),
            "name the Envoy cluster that reaches IMDS, e.g. \"azure_imds\"",
        )?,
        None => DEFAULT_CLUSTER.to_owned(),
    };
    let authority = match raw.authority {
        Some(a) => check_authority(
            &a,
            &sub("authority"),
            "use the IMDS host, \"169.254.169.254\"",
        )?,
        None => DEFAULT_AUTHORITY.to_owned(),
    };
    let selectors = [raw.client_id, raw.object_id, raw.msi_res_id];
    let identity = check_selector(field, selectors, "msi_res_id")?;
    Ok(ImdsSource {
        cluster,
        authority,
        identity,
        timeout_ms: timeout(raw.timeout_ms, field)?,
    })
}

impl TokenSource for ImdsSource {
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
            "IMDS via cluster {} for {}",
            self.cluster,
            self.identity.describe()
        )
    }

    fn fingerprint(&self) -> String {
        let (selector, value) = self.identity.query_param().unwrap_or(("system", ""));
        format!(
            "imds\n{}\n{}\n{selector}={value}",
            self.cluster, self.authority
        )
    }

    fn token_request(&self, resource: &str, _now_ms: u64, _nonce: u64, _: Option<Secret>) -> Step {
        IdentityGet {
            cluster: &self.cluster,
            authority: &self.authority,
            timeout_ms: self.timeout_ms,
            path: IMDS_PATH,
            api_version: IMDS_API_VERSION,
            selector: self.identity.query_param(),
            proof: ("metadata", "true".to_owned()),
        }
        .call(resource)
    }

    fn endpoint(&self, _cluster: &str) -> Endpoint {
        Endpoint {
            name: "The managed identity endpoint (IMDS)",
            reach: "pointing at 169.254.169.254:80 (Istio: the outbound|80||<host> cluster of the IMDS ServiceEntry)".to_owned(),
            unreachable: "On Azure, the proxy must reach 169.254.169.254:80 directly, bypassing any egress proxy".to_owned(),
        }
    }

    fn refused(&self, r: &Refusal<'_>, _details: &mut Map<String, Value>) -> Verdict {
        let (status, said, class, resource) = (r.status, r.said, r.class, r.resource);
        let selector = match &self.identity {
            IdentitySelector::Default => "no identity selector is configured".to_owned(),
            IdentitySelector::ClientId(v) => format!("token_source.client_id is \"{v}\""),
            IdentitySelector::ObjectId(v) => format!("token_source.object_id is \"{v}\""),
            IdentitySelector::ResourceId(v) => format!("token_source.msi_res_id is \"{v}\""),
        };
        let lower = said.to_ascii_lowercase();
        if class == FailureClass::Transient {
            let why = match status {
                410 => "IMDS is being upgraded, which can take up to 70 s",
                429 => "IMDS throttled this proxy (20 requests/s and 5 at once per VM, shared by every pod on the node)",
                404 => "IMDS is updating",
                _ => "the managed identity endpoint failed",
            };
            return unavailable(why, said);
        }
        if lower.contains("identity not found") {
            return (
                401,
                code::MANAGED_IDENTITY_NOT_FOUND,
                format!(
                    "No managed identity could be found for this proxy{said}; {selector}. Assign a \
                     managed identity to this VM, scale set or node pool, or set \
                     token_source.client_id to an identity that is assigned to it."
                ),
            );
        }
        if lower.contains("multiple user assigned identities") {
            return (
                401,
                code::MANAGED_IDENTITY_AMBIGUOUS,
                format!(
                    "Several user-assigned identities are attached and none was chosen{said}. Set \
                     token_source.client_id (or object_id / msi_res_id) to the identity that holds \
                     the Cognitive Services OpenAI User role on the resource."
                ),
            );
        }
        if lower.contains("metadata header") {
            return (
                401,
                code::TOKEN_REQUEST_REJECTED,
                format!(
                    "The token request reached IMDS without its `Metadata: true` header{said}. \
                     Something between the filter and IMDS removed it; send IMDS traffic directly."
                ),
            );
        }
        (
            401,
            code::TOKEN_REQUEST_REJECTED,
            format!(
                "The managed identity endpoint refused the token request{said}; {selector} and \
                 resource is \"{}\". Check both against the identity assigned to this machine.",
                resource
            ),
        )
    }
}
