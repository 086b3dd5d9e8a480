//! Turning failures into answers a person can act on.
//!
//! Every reply the filter writes has the shape OpenAI SDKs already print:
//! `{"error":{"code":…,"message":…,…}}`, plus the header
//! `x-aoai-msi-diagnosis: <code>`. Messages name the cause, the identity and
//! the fix; nothing here ever sees a token, a secret or an assertion (the
//! sources keep those; only names of variables, ids and thumbprints appear).

use serde_json::{json, Map, Value};

use crate::config::{TokenSpec, ENTRA_AUTHORITIES};
use crate::source::{ClientCredential, Source};
use crate::store::Failure;
use crate::token::{FailureClass, FetchFailure};

pub const DIAGNOSIS_HEADER: &str = "x-aoai-msi-diagnosis";

/// Declares codes as constants and lists them once, in [`ALL`]-named slices
/// that the README check reads: a new code cannot be left out of the list.
macro_rules! codes {
    ($($(#[$doc:meta])* $name:ident = $value:literal;)*) => {
        $($(#[$doc])* pub const $name: &str = $value;)*
        /// Every code above, for the checks that each one is documented.
        pub const ALL: &[&str] = &[$($name),*];
    };
}
pub(crate) use codes;

/// Codes of the filter's own answers (README, "Diagnostics").
pub mod code {
    super::codes! {
        MANAGED_IDENTITY_NOT_FOUND = "ManagedIdentityNotFound";
        MANAGED_IDENTITY_AMBIGUOUS = "ManagedIdentityAmbiguous";
        TOKEN_REQUEST_REJECTED = "TokenRequestRejected";
        TOKEN_ENDPOINT_UNAVAILABLE = "TokenEndpointUnavailable";
        TOKEN_ENDPOINT_UNREACHABLE = "TokenEndpointUnreachable";
        TOKEN_ENDPOINT_CLUSTER_MISSING = "TokenEndpointClusterMissing";
        TOKEN_RESPONSE_INVALID = "TokenResponseInvalid";
        TOKEN_AUDIENCE_MISMATCH = "TokenAudienceMismatch";
        TOKEN_WAIT_TIMEOUT = "TokenWaitTimeout";
        CLIENT_SECRET_INVALID = "ClientSecretInvalid";
        CLIENT_SECRET_EXPIRED = "ClientSecretExpired";
        APPLICATION_NOT_FOUND = "ApplicationNotFound";
        TENANT_NOT_FOUND = "TenantNotFound";
        CERTIFICATE_NOT_REGISTERED = "CertificateNotRegistered";
        FEDERATED_CREDENTIAL_MISMATCH = "FederatedCredentialMismatch";
        FEDERATED_TOKEN_EXPIRED = "FederatedTokenExpired";
        FEDERATED_TOKEN_UNAVAILABLE = "FederatedTokenUnavailable";
        CLIENT_KEY_REQUIRED = "ClientKeyRequired";
        CLIENT_KEY_UNKNOWN = "ClientKeyUnknown";
        /// The filter could not write the credential into the request.
        CREDENTIAL_NOT_WRITTEN = "CredentialNotWritten";
        /// Envoy matched the route again after the filter's writes and sent
        /// the request to a cluster the filter had not checked.
        ROUTE_CHANGED_AFTER_REWRITE = "RouteChangedAfterRewrite";
        /// An Azure 403 to a request no target took: a host no target lists.
        HOST_NOT_IN_TARGETS = "HostNotInTargets";
        /// … a host spelled with a port or trailing dot, for a target
        /// without `clusters`.
        HOST_SPELLING_NOT_ROUTED = "HostSpellingNotRouted";
        /// … a request routed to a cluster whose destination the client picks.
        CLIENT_CHOSEN_DESTINATION = "ClientChosenDestination";
    }
}

/// Entra's AADSTS numbers the filter explains (AZURE_FACTS §2).
pub mod aadsts {
    pub const INVALID_SECRET: u32 = 7_000_215;
    pub const EXPIRED_SECRET: u32 = 7_000_222;
    pub const APPLICATION_NOT_FOUND: u32 = 700_016;
    pub const TENANT_NOT_FOUND: u32 = 90_002;
    pub const CERTIFICATE_NOT_REGISTERED: u32 = 700_027;
    pub const FEDERATION_SUBJECT_MISMATCH: u32 = 70_021;
    pub const FEDERATION_ISSUER_MISMATCH: u32 = 700_211;
    pub const ASSERTION_EXPIRED: u32 = 700_024;
}

#[derive(Debug, Clone, PartialEq)]
pub struct Diagnosis {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for `retry-after` on transient causes.
    pub retry_after_s: Option<u64>,
    /// Further fields of the `error` object.
    pub details: Map<String, Value>,
}

/// The token endpoint of a source, in words.
struct Endpoint {
    /// "IMDS", "the App Service identity endpoint", "Entra".
    name: &'static str,
    /// Where the cluster must point, for a missing cluster.
    reach: String,
    /// What usually stops the endpoint answering.
    unreachable: String,
}

fn endpoint(source: &Source, cluster: &str) -> Endpoint {
    match source {
        Source::Imds(_) => Endpoint {
            name: "The managed identity endpoint (IMDS)",
            reach: "pointing at 169.254.169.254:80 (Istio: the outbound|80||<host> cluster of the IMDS ServiceEntry)".to_owned(),
            unreachable: "On Azure, the proxy must reach 169.254.169.254:80 directly, bypassing any egress proxy".to_owned(),
        },
        Source::AppService(s) => Endpoint {
            name: "The App Service identity endpoint",
            reach: format!("pointing at {} (the host and port of IDENTITY_ENDPOINT)", s.authority),
            unreachable: format!(
                "The endpoint listens on the app's own host ({}); check that the cluster's port is the one in IDENTITY_ENDPOINT",
                s.authority
            ),
        },
        Source::WorkloadIdentity(s) if cluster == s.assertion_cluster => Endpoint {
            name: "The service-account token listener",
            reach: "serving the projected service-account token file with direct_response (see envoy/aks-workload-identity.yaml)".to_owned(),
            unreachable: "It is the Envoy listener that serves AZURE_FEDERATED_TOKEN_FILE; check its port and that it is loaded".to_owned(),
        },
        Source::ClientCredentials(ClientCredentialsLike { authority, .. })
        | Source::WorkloadIdentity(WorkloadLike { authority, .. }) => Endpoint {
            name: "Entra",
            reach: format!("pointing at {authority}:443 with TLS (SNI {authority})"),
            unreachable: format!(
                "Check the proxy's outbound access to {authority}:443 (firewall, egress proxy, DNS)"
            ),
        },
        Source::Http(s) => Endpoint {
            name: "The credential service",
            reach: format!(
                "pointing at the service that answers GET {}{}",
                s.authority,
                crate::safe::path_shown(&s.path)
            ),
            unreachable: format!(
                "Check that the credential service behind cluster \"{}\" is running and answers GET {}",
                s.cluster, crate::safe::path_shown(&s.path)
            ),
        },
    }
}

use crate::source::ClientCredentialsSource as ClientCredentialsLike;
use crate::source::WorkloadIdentitySource as WorkloadLike;

/// The `x-aoai-msi-diagnosis` code of an Azure 403 to a request no target
/// took although it looked like one a target meant: key authentication is
/// off, and the filter did not authorize it.
pub fn near_miss_code(miss: crate::route::NearMiss) -> &'static str {
    use crate::route::NearMiss;
    match miss {
        NearMiss::Spelling => code::HOST_SPELLING_NOT_ROUTED,
        NearMiss::UnlistedAzureHost => code::HOST_NOT_IN_TARGETS,
        NearMiss::ClientChosenDestination => code::CLIENT_CHOSEN_DESTINATION,
    }
}

impl Diagnosis {
    /// Why a request that waited for a token gets none: the last failure.
    pub fn for_failure(failure: &Failure, spec: &TokenSpec, now_ms: u64) -> Diagnosis {
        // Requests are only answered this way when no usable token exists.
        let retry_after_s = Some(
            failure
                .next_attempt_ms(now_ms, true)
                .saturating_sub(now_ms)
                .div_ceil(1000)
                .max(1),
        );
        let mut details = Map::new();
        details.insert("token_source".into(), json!(spec.source.kind()));
        details.insert(
            "token_endpoint_cluster".into(),
            json!(spec.source.cluster()),
        );
        details.insert("failed_attempts".into(), json!(failure.attempts));
        let (status, code, message) = match &failure.cause {
            FetchFailure::Dispatch { cluster } => {
                let e = endpoint(&spec.source, cluster);
                details.insert("token_endpoint_cluster".into(), json!(cluster));
                (
                    500,
                    code::TOKEN_ENDPOINT_CLUSTER_MISSING,
                    format!(
                        "Envoy refused to call {} through cluster \"{cluster}\". Add a cluster of that name {}, \
                         or point the token source at the cluster that does.",
                        e.name.to_lowercase(),
                        e.reach
                    ),
                )
            }
            FetchFailure::NoResponse => {
                let e = endpoint(&spec.source, spec.source.cluster());
                (
                    503,
                    code::TOKEN_ENDPOINT_UNREACHABLE,
                    format!(
                        "{} did not answer (cluster \"{}\"): connection failed or timed out. {}; the filter keeps retrying.",
                        e.name,
                        spec.source.cluster(),
                        e.unreachable
                    ),
                )
            }
            FetchFailure::InvalidBody { problem } => (
                503,
                code::TOKEN_RESPONSE_INVALID,
                format!(
                    "{} answered 200, but {problem}. The filter keeps retrying; if this persists, check what serves cluster \"{}\".",
                    endpoint(&spec.source, spec.source.cluster()).name,
                    spec.source.cluster()
                ),
            ),
            FetchFailure::WrongAudience { asked, got } => {
                details.insert("requested_audience".into(), json!(asked));
                details.insert("token_audience".into(), json!(got));
                (
                    502,
                    code::TOKEN_AUDIENCE_MISMATCH,
                    format!(
                        "The token endpoint behind cluster \"{}\" answered with a token for \"{got}\", \
                         but the filter asked for \"{asked}\"; such a token is never sent. Something other \
                         than the token endpoint may be answering on that cluster: check what serves it. \
                         The filter asks again every 15-30 s.",
                        spec.source.cluster()
                    ),
                )
            }
            FetchFailure::AssertionUnavailable { problem } => {
                let cluster = match &spec.source {
                    Source::WorkloadIdentity(s) => s.assertion_cluster.as_str(),
                    other => other.cluster(),
                };
                (
                    503,
                    code::FEDERATED_TOKEN_UNAVAILABLE,
                    format!(
                        "No service-account token to exchange: {problem}. The token-file listener (cluster \"{cluster}\") \
                         serves the token that the workload-identity webhook projects into the pod \
                         (AZURE_FEDERATED_TOKEN_FILE): check that the pod is labelled azure.workload.identity/use: \"true\", \
                         that its service account is annotated with azure.workload.identity/client-id, and that the \
                         listener's filename is the mounted file. The filter keeps retrying."
                    ),
                )
            }
            FetchFailure::Status {
                status,
                error,
                description,
                codes,
            } => {
                if let Some(e) = error {
                    details.insert("token_endpoint_error".into(), json!(e));
                }
                if let Some(d) = description {
                    details.insert("token_endpoint_error_description".into(), json!(d));
                }
                if let Some(code) = codes.first() {
                    details.insert("aadsts".into(), json!(code));
                }
                details.insert("token_endpoint_status".into(), json!(status));
                let said = description
                    .as_deref()
                    .or(error.as_deref())
                    .map(|d| format!(" ({status}: \"{d}\")"))
                    .unwrap_or_else(|| format!(" ({status})"));
                let class = failure.cause.class();
                match &spec.source {
                    Source::Imds(_) => imds_status(*status, &said, class, spec),
                    Source::AppService(_) => app_service_status(*status, &said, class, spec),
                    Source::ClientCredentials(_) | Source::WorkloadIdentity(_) => {
                        entra_status(*status, codes, &said, class, spec, &mut details)
                    }
                    Source::Http(s) => http_status(*status, &said, class, s),
                }
            }
        };
        let transient = failure.cause.class() == FailureClass::Transient;
        Diagnosis {
            status,
            code,
            message,
            retry_after_s: if transient { retry_after_s } else { None },
            details,
        }
    }

    /// A request waited as long as allowed while a token call was still under way.
    pub fn waited(spec: &TokenSpec) -> Diagnosis {
        let mut details = Map::new();
        details.insert("token_source".into(), json!(spec.source.kind()));
        details.insert(
            "token_endpoint_cluster".into(),
            json!(spec.source.cluster()),
        );
        Diagnosis {
            status: 503,
            code: code::TOKEN_WAIT_TIMEOUT,
            message: format!(
                "No token arrived within {} ms; {} behind cluster \"{}\" is slow. Retry the request; raise \
                 token_wait_timeout_ms if the endpoint is known to be slow.",
                spec.token_wait_timeout_ms,
                endpoint(&spec.source, spec.source.cluster()).name.to_lowercase(),
                spec.source.cluster()
            ),
            retry_after_s: Some(1),
            details,
        }
    }

    /// A target with `client_keys` lends its identity only to listed callers:
    /// this request sent no `api-key` (`missing`) or one that is not listed.
    /// The key is never echoed, nor any hash.
    pub fn client_key(missing: bool) -> Diagnosis {
        let (code, message) = if missing {
            (
                code::CLIENT_KEY_REQUIRED,
                "This gateway lends its Azure identity only to known callers, and this request carries no \
                 gateway key. Send your team's gateway key as the api-key header (or the api-key query \
                 parameter), as you would an Azure OpenAI key; the gateway's operators issue them.",
            )
        } else {
            (
                code::CLIENT_KEY_UNKNOWN,
                "The api-key this request carries is not a gateway key this gateway knows (it is not shown \
                 here). Send your team's gateway key; if it was rotated, ask the gateway's operators for the \
                 current one.",
            )
        };
        Diagnosis {
            status: 401,
            code,
            message: message.to_owned(),
            retry_after_s: None,
            details: Map::new(),
        }
    }

    /// The filter could not write the credential (or remove the key) on a
    /// request it had decided to authorize: it fails closed rather than
    /// send the request on half rewritten.
    pub fn credential_not_written(status: u32) -> Diagnosis {
        let mut details = Map::new();
        details.insert("host_status".into(), Value::from(status));
        Diagnosis {
            status: 500,
            code: code::CREDENTIAL_NOT_WRITTEN,
            message: "The proxy could not rewrite this request's credential headers, so it was not sent \
                      (it would have left with its api-key and without a token). This is a fault of the \
                      proxy, not of the request: retry, and report it with the proxy's log if it persists."
                .to_owned(),
            retry_after_s: Some(1),
            details,
        }
    }

    /// Envoy sent an earlier request of this target, after the filter's
    /// header writes, to a cluster the filter had not checked: every later
    /// request of the target is refused until the routes are fixed.
    pub fn route_changed(checked: &str, taken: &str) -> Diagnosis {
        let mut details = Map::new();
        details.insert("checked_cluster".into(), Value::from(checked));
        details.insert("routed_cluster".into(), Value::from(taken));
        Diagnosis {
            status: 500,
            code: code::ROUTE_CHANGED_AFTER_REWRITE,
            message: format!(
                "Envoy matched the route again after this proxy replaced the api-key with a token, and sent \
                 a request to cluster \"{taken}\" instead of \"{checked}\", which the filter had checked. \
                 A route that matches on the api-key or authorization header, or on the api-key query \
                 parameter, does that. Requests of this target are refused until the routes match on host \
                 and path only; then restart or reload the proxy."
            ),
            retry_after_s: None,
            details,
        }
    }

    /// The JSON body for a request of `target`, in the error shape OpenAI
    /// SDKs print.
    pub fn body_for(&self, target: &str) -> String {
        let mut error = Map::new();
        error.insert("code".into(), json!(self.code));
        error.insert("message".into(), json!(self.message));
        error.insert("source".into(), json!("aoai-msi-filter"));
        error.insert("target".into(), json!(target));
        for (k, v) in &self.details {
            error.insert(k.clone(), v.clone());
        }
        json!({ "error": error }).to_string()
    }

    /// Response headers of the local reply.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (DIAGNOSIS_HEADER, self.code.to_owned()),
            ("content-type", "application/json".to_owned()),
        ];
        if let Some(s) = self.retry_after_s {
            headers.push(("retry-after", s.to_string()));
        }
        headers
    }
}

fn unavailable(status: u16, why: &str, said: &str) -> (u16, &'static str, String) {
    let _ = status;
    (
        503,
        code::TOKEN_ENDPOINT_UNAVAILABLE,
        format!("No token yet: {why}{said}. The filter retries with backoff; retry the request."),
    )
}

fn imds_status(
    status: u16,
    said: &str,
    class: FailureClass,
    spec: &TokenSpec,
) -> (u16, &'static str, String) {
    let selector = match spec.imds().map(|i| &i.identity) {
        None | Some(crate::source::IdentitySelector::Default) => {
            "no identity selector is configured".to_owned()
        }
        Some(crate::source::IdentitySelector::ClientId(v)) => {
            format!("token_source.client_id is \"{v}\"")
        }
        Some(crate::source::IdentitySelector::ObjectId(v)) => {
            format!("token_source.object_id is \"{v}\"")
        }
        Some(crate::source::IdentitySelector::ResourceId(v)) => {
            format!("token_source.msi_res_id is \"{v}\"")
        }
    };
    let lower = said.to_ascii_lowercase();
    if class == FailureClass::Transient {
        let why = match status {
            410 => "IMDS is being upgraded, which can take up to 70 s",
            429 => "IMDS throttled this proxy (20 requests/s and 5 at once per VM, shared by every pod on the node)",
            404 => "IMDS is updating",
            _ => "the managed identity endpoint failed",
        };
        return unavailable(status, why, said);
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
            spec.resource
        ),
    )
}

fn app_service_status(
    status: u16,
    said: &str,
    class: FailureClass,
    spec: &TokenSpec,
) -> (u16, &'static str, String) {
    if class == FailureClass::Transient {
        return unavailable(status, "the App Service identity endpoint failed", said);
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
            spec.resource
        ),
    )
}

fn http_status(
    status: u16,
    said: &str,
    class: FailureClass,
    source: &crate::source::HttpSource,
) -> (u16, &'static str, String) {
    if class == FailureClass::Transient {
        return unavailable(status, "the credential service failed", said);
    }
    (
        401,
        code::TOKEN_REQUEST_REJECTED,
        format!(
            "The credential service refused GET {}{} (cluster \"{}\"){said}. Check its path and what it needs \
             to hand out the credential.",
            source.authority, crate::safe::path_shown(&source.path), source.cluster
        ),
    )
}

fn entra_status(
    status: u16,
    codes: &[u32],
    said: &str,
    class: FailureClass,
    spec: &TokenSpec,
    details: &mut Map<String, Value>,
) -> (u16, &'static str, String) {
    let (tenant, client, authority) = match &spec.source {
        Source::ClientCredentials(s) => (&s.tenant_id, &s.client_id, &s.authority),
        Source::WorkloadIdentity(s) => (&s.tenant_id, &s.client_id, &s.authority),
        _ => return unavailable(status, "the token endpoint failed", said),
    };
    details.insert("application_id".into(), json!(client));
    details.insert("tenant_id".into(), json!(tenant));
    if class == FailureClass::Transient {
        return unavailable(status, "Entra is temporarily unavailable", said);
    }
    let secret_env = match &spec.source {
        Source::ClientCredentials(ClientCredentialsLike {
            credential: ClientCredential::Secret { env, .. },
            ..
        }) => env.as_str(),
        _ => "the client secret's variable",
    };
    let has = |code: u32| codes.contains(&code);
    if has(aadsts::INVALID_SECRET) {
        return (
            401,
            code::CLIENT_SECRET_INVALID,
            format!(
                "Entra refused the client secret of application {client} in tenant {tenant} (AADSTS7000215){said}. \
                 The value in {secret_env} is not a current secret of this application (a secret's ID pasted \
                 instead of its value is a common cause): create one with `az ad app credential reset --id {client} \
                 --append` and put its value in {secret_env}."
            ),
        );
    }
    if has(aadsts::EXPIRED_SECRET) {
        return (
            401,
            code::CLIENT_SECRET_EXPIRED,
            format!(
                "The client secret of application {client} in tenant {tenant} has expired (AADSTS7000222){said}. \
                 Create a new one with `az ad app credential reset --id {client} --append`, put its value in \
                 {secret_env}, and restart the proxy."
            ),
        );
    }
    if has(aadsts::APPLICATION_NOT_FOUND) {
        return (
            401,
            code::APPLICATION_NOT_FOUND,
            format!(
                "Entra has no application {client} in tenant {tenant} (AADSTS700016){said}. Check client_id \
                 (or AZURE_CLIENT_ID) and tenant_id: the application may be registered in another tenant, or \
                 have no service principal there."
            ),
        );
    }
    if has(aadsts::TENANT_NOT_FOUND) {
        return (
            401,
            code::TENANT_NOT_FOUND,
            format!(
                "Entra at {authority} has no tenant {tenant}, where application {client} was to sign in \
                 (AADSTS90002){said}. Check tenant_id (or AZURE_TENANT_ID), and that authority is the \
                 tenant's cloud ({}).",
                ENTRA_AUTHORITIES.join(", ")
            ),
        );
    }
    if has(aadsts::CERTIFICATE_NOT_REGISTERED) {
        let thumbprint = match &spec.source {
            Source::ClientCredentials(ClientCredentialsLike {
                credential: ClientCredential::Certificate { key, .. },
                ..
            }) => {
                details.insert(
                    "certificate_thumbprint_sha256".into(),
                    json!(key.thumbprint),
                );
                format!(" (x5t#S256 {})", key.thumbprint)
            }
            _ => String::new(),
        };
        return (
            401,
            code::CERTIFICATE_NOT_REGISTERED,
            format!(
                "Entra does not accept the certificate{thumbprint} for application {client} in tenant {tenant} \
                 (AADSTS700027){said}. Upload the certificate to the app registration (`az ad app credential \
                 reset --id {client} --cert @cert.pem --append`), or use the one that is registered."
            ),
        );
    }
    let federation = [
        aadsts::FEDERATION_SUBJECT_MISMATCH,
        aadsts::FEDERATION_ISSUER_MISMATCH,
    ]
    .into_iter()
    .find(|c| has(*c));
    if let Some(found) = federation {
        return (
            401,
            code::FEDERATED_CREDENTIAL_MISMATCH,
            format!(
                "No federated credential of application {client} matches the service-account token \
                 (AADSTS{found}){said}. Add one whose issuer is the cluster's OIDC issuer URL (`az aks show \
                 --query oidcIssuerProfile.issuerUrl`) and whose subject is \
                 system:serviceaccount:<namespace>:<service account>, audience api://AzureADTokenExchange \
                 (`az identity federated-credential create` for a managed identity)."
            ),
        );
    }
    if has(aadsts::ASSERTION_EXPIRED) {
        return (
            401,
            code::FEDERATED_TOKEN_EXPIRED,
            format!(
                "Entra says the service-account token has expired (AADSTS700024){said}. Kubelet rotates the \
                 projected token well before it expires: check that the token-file listener watches the token's \
                 directory (watched_directory) so Envoy serves the current file."
            ),
        );
    }
    (
        401,
        code::TOKEN_REQUEST_REJECTED,
        format!(
            "Entra refused the token request of application {client} in tenant {tenant}{said}; resource is \
             \"{}\". The AADSTS code names the cause.",
            spec.resource
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_that_could_not_be_written_fails_closed_and_says_so() {
        let d = Diagnosis::credential_not_written(2);
        assert_eq!((d.status, d.code), (500, code::CREDENTIAL_NOT_WRITTEN));
        assert!(d.message.contains("was not sent"), "{}", d.message);
        assert_eq!(d.details["host_status"], 2);
        assert_eq!(d.retry_after_s, Some(1));
    }

    #[test]
    fn a_re_routed_target_names_both_clusters_and_the_fix() {
        let d = Diagnosis::route_changed("aoai", "other");
        assert_eq!(d.code, code::ROUTE_CHANGED_AFTER_REWRITE);
        assert!(d.message.contains("\"other\"") && d.message.contains("\"aoai\""));
        assert!(d.message.contains("host and path only"));
    }

    /// The default configuration's Azure OpenAI token.
    fn spec() -> TokenSpec {
        let config = crate::config::Config::default();
        config.tokens[config.targets[1].token].clone()
    }

    fn failure(cause: FetchFailure) -> Failure {
        Failure {
            cause,
            attempts: 1,
            retry_at_ms: 12_500,
            at_ms: 10_000,
        }
    }

    fn imds_status(status: u16, description: &str) -> FetchFailure {
        FetchFailure::Status {
            status,
            error: Some("invalid_request".into()),
            description: Some(description.into()),
            codes: Vec::new(),
        }
    }

    #[test]
    fn missing_identity_is_a_401_that_says_to_assign_one() {
        let d = Diagnosis::for_failure(
            &failure(imds_status(400, "Identity not found")),
            &spec(),
            10_000,
        );
        assert_eq!((d.status, d.code), (401, code::MANAGED_IDENTITY_NOT_FOUND));
        assert!(
            d.message.contains("Assign a managed identity"),
            "{}",
            d.message
        );
        assert!(d.message.contains("Identity not found"));
        assert_eq!(d.retry_after_s, None);
        let body: Value = serde_json::from_str(&d.body_for("default")).unwrap();
        assert_eq!(body["error"]["code"], "ManagedIdentityNotFound");
        assert_eq!(body["error"]["token_endpoint_status"], 400);
        assert_eq!(
            body["error"]["token_endpoint_error_description"],
            "Identity not found"
        );
    }

    #[test]
    fn several_identities_ask_for_a_client_id() {
        let d = Diagnosis::for_failure(
            &failure(imds_status(
                400,
                "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request",
            )),
            &spec(),
            10_000,
        );
        assert_eq!((d.status, d.code), (401, code::MANAGED_IDENTITY_AMBIGUOUS));
        assert!(d.message.contains("token_source.client_id"));
    }

    #[test]
    fn transient_causes_are_503_with_retry_after() {
        for (status, words) in [(410, "upgraded"), (429, "throttled"), (500, "failed")] {
            let d = Diagnosis::for_failure(&failure(imds_status(status, "x")), &spec(), 10_000);
            assert_eq!((d.status, d.code), (503, code::TOKEN_ENDPOINT_UNAVAILABLE));
            assert!(d.message.contains(words), "{}", d.message);
            assert_eq!(d.retry_after_s, Some(3));
            assert!(d.headers().contains(&("retry-after", "3".to_owned())));
        }
    }

    #[test]
    fn unreachable_endpoint_names_the_cluster() {
        let d = Diagnosis::for_failure(&failure(FetchFailure::NoResponse), &spec(), 10_000);
        assert_eq!((d.status, d.code), (503, code::TOKEN_ENDPOINT_UNREACHABLE));
        assert!(d.message.contains("\"azure_imds\""));
    }

    #[test]
    fn unknown_cluster_is_the_proxy_configuration() {
        let d = Diagnosis::for_failure(
            &failure(FetchFailure::Dispatch {
                cluster: "azure_imds".into(),
            }),
            &spec(),
            10_000,
        );
        assert_eq!(
            (d.status, d.code),
            (500, code::TOKEN_ENDPOINT_CLUSTER_MISSING)
        );
        assert!(d.message.contains("169.254.169.254:80"));
    }

    #[test]
    fn a_token_for_another_audience_is_a_502_naming_both_audiences() {
        let d = Diagnosis::for_failure(
            &failure(FetchFailure::WrongAudience {
                asked: "https://cognitiveservices.azure.com".into(),
                got: "https://management.azure.com".into(),
            }),
            &spec(),
            10_000,
        );
        assert_eq!((d.status, d.code), (502, code::TOKEN_AUDIENCE_MISMATCH));
        assert!(
            d.message.contains("\"https://management.azure.com\""),
            "{}",
            d.message
        );
        assert!(d.message.contains("never sent"), "{}", d.message);
        assert_eq!(d.retry_after_s, None);
    }

    #[test]
    fn every_reply_carries_the_diagnosis_header_and_a_json_content_type() {
        let d = Diagnosis::waited(&spec());
        let headers = d.headers();
        assert!(headers.contains(&(DIAGNOSIS_HEADER, "TokenWaitTimeout".to_owned())));
        assert!(headers.contains(&("content-type", "application/json".to_owned())));
        let body: Value = serde_json::from_str(&d.body_for("default")).unwrap();
        assert_eq!(body["error"]["source"], "aoai-msi-filter");
        assert_eq!(body["error"]["target"], "default");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("5000 ms"));
    }
}
