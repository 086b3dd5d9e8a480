//! Turning failures into answers a person can act on.
//!
//! Every reply the filter writes has the shape OpenAI SDKs already print:
//! `{"error":{"code":…,"message":…,…}}`, plus the header
//! `x-aoai-msi-diagnosis: <code>`. Messages name the cause, the identity and
//! the fix; nothing here ever sees a token, a secret or an assertion (the
//! sources keep those; only names of variables, ids and thumbprints appear).

use serde_json::{json, Map, Value};

use crate::config::TokenSpec;
use crate::safe;
use crate::source::Refusal;
use crate::store::Failure;
use crate::token::{FailureClass, FetchFailure};

pub const DIAGNOSIS_HEADER: &str = "x-aoai-msi-diagnosis";

pub mod annotate;
pub mod upstream;

pub use crate::codes::{aadsts, code, diagnosis, header, EVERY};

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
                let e = spec.source.inner().endpoint(cluster);
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
                let e = spec.source.inner().endpoint(spec.source.cluster());
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
                    spec.source.inner().endpoint(spec.source.cluster()).name,
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
                let cluster = spec
                    .source
                    .inner()
                    .assertion_cluster()
                    .unwrap_or(spec.source.cluster());
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
            FetchFailure::AssertionFileUnreadable {
                variable,
                path,
                error,
            } => (
                503,
                code::FEDERATED_TOKEN_UNAVAILABLE,
                format!(
                    "No service-account token to exchange: the file that {} names ({}) cannot be read: {}. \
                     The workload-identity webhook projects that token into the pod and sets the variable: \
                     check that the pod is labelled azure.workload.identity/use: \"true\", that its service \
                     account is annotated with azure.workload.identity/client-id, and that the proxy's container \
                     mounts the projected volume. The filter reads the file again at every exchange and keeps retrying.",
                    safe::free_text(variable, 64),
                    safe::free_text(path, 200),
                    safe::free_text(error, 200)
                ),
            ),
            FetchFailure::SecretUnavailable {
                secret,
                field,
                problem,
            } => {
                details.insert("sds_secret".into(), json!(secret));
                (
                    503,
                    code::SDS_SECRET_UNAVAILABLE,
                    format!(
                        "No credential to sign in with: the SDS generic secret \"{secret}\" ({field}) {problem}. \
                         Check that Envoy has it: `/config_dump?resource=dynamic_active_secrets` (or \
                         static_secrets) lists it, the stat sds.{secret}.update_success grows when its source \
                         changes, and its file or SDS server holds the value. The filter reads it again at the \
                         next attempt; no restart is needed."
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
                spec.source.inner().refused(
                    &Refusal {
                        status: *status,
                        codes,
                        said: &said,
                        class,
                        resource: &spec.resource,
                    },
                    &mut details,
                )
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
                spec.source.inner().endpoint(spec.source.cluster()).name.to_lowercase(),
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
    fn an_unreadable_token_file_is_named_with_its_variable_and_the_webhook_checks() {
        let d = Diagnosis::for_failure(
            &failure(FetchFailure::AssertionFileUnreadable {
                variable: "AZURE_FEDERATED_TOKEN_FILE".into(),
                path: "/var/run/secrets/azure/tokens/azure-identity-token\n".into(),
                error: "No such file or directory (os error 2)".into(),
            }),
            &spec(),
            10_000,
        );
        assert_eq!((d.status, d.code), (503, code::FEDERATED_TOKEN_UNAVAILABLE));
        for part in [
            "AZURE_FEDERATED_TOKEN_FILE names (/var/run/secrets/azure/tokens/azure-identity-token?)",
            "No such file or directory",
            "azure.workload.identity/use",
            "mounts the projected volume",
        ] {
            assert!(d.message.contains(part), "{part}: {}", d.message);
        }
        assert!(!d.message.contains("listener"), "{}", d.message);
        assert!(d.retry_after_s.is_some());
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
