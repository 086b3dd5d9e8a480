//! What the managed-identity sources share: which identity to ask for (IMDS
//! and App Service take the same three selectors under different parameter
//! names), and the token GET both endpoints take.

use super::{percent_encode, Step, TokenRequest};
use crate::fields::checks::non_empty;
use crate::fields::errors::{invalid, ConfigError};

/// Which managed identity IMDS should issue a token for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySelector {
    /// No selector: the system-assigned identity, or the only user-assigned one.
    Default,
    ClientId(String),
    ObjectId(String),
    ResourceId(String),
}

impl IdentitySelector {
    /// The IMDS query parameter and its value, if any.
    pub fn query_param(&self) -> Option<(&'static str, &str)> {
        match self {
            IdentitySelector::Default => None,
            IdentitySelector::ClientId(v) => Some(("client_id", v)),
            IdentitySelector::ObjectId(v) => Some(("object_id", v)),
            IdentitySelector::ResourceId(v) => Some(("msi_res_id", v)),
        }
    }

    /// The App Service parameter: `principal_id` for an object id, and
    /// `mi_res_id` (not `msi_res_id`) for a resource id.
    pub fn app_service_param(&self) -> Option<(&'static str, &str)> {
        match self {
            IdentitySelector::Default => None,
            IdentitySelector::ClientId(v) => Some(("client_id", v)),
            IdentitySelector::ObjectId(v) => Some(("principal_id", v)),
            IdentitySelector::ResourceId(v) => Some(("mi_res_id", v)),
        }
    }

    /// The selector in words.
    pub fn describe(&self) -> String {
        match self {
            IdentitySelector::Default => "the only (or system-assigned) identity".to_owned(),
            IdentitySelector::ClientId(v) => format!("client id {v}"),
            IdentitySelector::ObjectId(v) => format!("object id {v}"),
            IdentitySelector::ResourceId(v) => format!("resource id {v}"),
        }
    }
}

/// A selector field: its name, its value if set, and what it selects.
type Candidate = (&'static str, Option<String>, fn(String) -> IdentitySelector);

/// The one identity selector a source may carry: `client_id`, `object_id`,
/// or a resource id under the name its endpoint gives it (`resource_key`).
pub(crate) fn check_selector(
    field: &str,
    [client_id, object_id, resource_id]: [Option<String>; 3],
    resource_key: &'static str,
) -> Result<IdentitySelector, ConfigError> {
    let candidates: [Candidate; 3] = [
        ("client_id", client_id, IdentitySelector::ClientId),
        ("object_id", object_id, IdentitySelector::ObjectId),
        (resource_key, resource_id, IdentitySelector::ResourceId),
    ];
    let sub = |name: &str| format!("{field}.{name}");
    let mut selectors = Vec::new();
    for (name, value, make) in candidates {
        if let Some(v) = value {
            let s = non_empty(
                &v,
                &sub(name),
                "remove the field to use the only identity, or give the identity's id",
            )?;
            if !s.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    sub(name),
                    "contains spaces or control characters",
                    "copy the id from `az identity show` without surrounding text",
                ));
            }
            selectors.push((name, make(s)));
        }
    }
    if selectors.len() > 1 {
        let names: Vec<String> = selectors.iter().map(|(n, _)| sub(n)).collect();
        let all: Vec<&str> = candidates_names(&selectors);
        return Err(invalid(
            names.join(" / "),
            "are set together, but the identity endpoint accepts only one identity selector",
            format!("keep exactly one of {}", all.join(", ")),
        ));
    }
    Ok(selectors
        .pop()
        .map_or(IdentitySelector::Default, |(_, s)| s))
}

fn candidates_names(selectors: &[(&'static str, IdentitySelector)]) -> Vec<&'static str> {
    selectors.iter().map(|(n, _)| *n).collect()
}

/// The token GET of a managed-identity endpoint (IMDS, App Service's).
pub(crate) struct IdentityGet<'a> {
    pub cluster: &'a str,
    pub authority: &'a str,
    pub timeout_ms: u64,
    /// The endpoint's path, which may carry a query of its own.
    pub path: &'a str,
    pub api_version: &'static str,
    /// The selector's parameter, as this endpoint names it.
    pub selector: Option<(&'static str, &'a str)>,
    /// The one header that proves the call comes from the machine itself
    /// (IMDS's `metadata`, App Service's `x-identity-header`).
    pub proof: (&'static str, String),
}

impl IdentityGet<'_> {
    /// The call for a token for `resource`: the path with the API version,
    /// the resource and the selector added to its query.
    pub(crate) fn call(self, resource: &str) -> Step {
        let separator = if self.path.contains('?') { '&' } else { '?' };
        let mut path = format!(
            "{}{separator}api-version={}&resource={}",
            self.path,
            self.api_version,
            percent_encode(resource)
        );
        if let Some((name, value)) = self.selector {
            path.push_str(&format!("&{name}={}", percent_encode(value)));
        }
        Step::Call(TokenRequest {
            cluster: self.cluster.to_owned(),
            timeout_ms: self.timeout_ms,
            headers: vec![
                (":method", "GET".to_owned()),
                (":path", path),
                (":authority", self.authority.to_owned()),
                self.proof,
            ],
            body: Vec::new(),
        })
    }
}
