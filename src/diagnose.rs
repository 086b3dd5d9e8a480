//! Turning failures into answers a person can act on.
//!
//! Every reply the filter writes has the shape OpenAI SDKs already print:
//! `{"error":{"code":…,"message":…,…}}`, plus the header
//! `x-aoai-msi-diagnosis: <code>`. Messages name the cause and the fix;
//! nothing here ever sees a token.

use serde_json::{json, Map, Value};

use crate::config::{IdentitySelector, TokenSpec};
use crate::store::Failure;
use crate::token::{FailureClass, FetchFailure};

pub const DIAGNOSIS_HEADER: &str = "x-aoai-msi-diagnosis";

/// Codes of the filter's own local replies (README, "Diagnostics").
pub mod code {
    pub const MANAGED_IDENTITY_NOT_FOUND: &str = "ManagedIdentityNotFound";
    pub const MANAGED_IDENTITY_AMBIGUOUS: &str = "ManagedIdentityAmbiguous";
    pub const TOKEN_REQUEST_REJECTED: &str = "TokenRequestRejected";
    pub const TOKEN_ENDPOINT_UNAVAILABLE: &str = "TokenEndpointUnavailable";
    pub const TOKEN_ENDPOINT_UNREACHABLE: &str = "TokenEndpointUnreachable";
    pub const TOKEN_ENDPOINT_CLUSTER_MISSING: &str = "TokenEndpointClusterMissing";
    pub const TOKEN_RESPONSE_INVALID: &str = "TokenResponseInvalid";
    pub const TOKEN_AUDIENCE_MISMATCH: &str = "TokenAudienceMismatch";
    pub const TOKEN_WAIT_TIMEOUT: &str = "TokenWaitTimeout";
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

impl Diagnosis {
    /// Why a request that waited for a token gets none: the last failure.
    pub fn for_failure(failure: &Failure, spec: &TokenSpec, now_ms: u64) -> Diagnosis {
        let imds = spec.imds();
        // Requests are only answered this way when no usable token exists.
        let retry_after_s = Some(
            failure
                .next_attempt_ms(now_ms, true)
                .saturating_sub(now_ms)
                .div_ceil(1000)
                .max(1),
        );
        let mut details = Map::new();
        details.insert("token_endpoint_cluster".into(), json!(imds.cluster));
        details.insert("failed_attempts".into(), json!(failure.attempts));
        let (status, code, message) = match &failure.cause {
            FetchFailure::Dispatch { cluster } => (
                500,
                code::TOKEN_ENDPOINT_CLUSTER_MISSING,
                format!(
                    "Envoy refused to call the token endpoint through cluster \"{cluster}\". \
                     Add a cluster of that name pointing at 169.254.169.254:80 (Istio: the \
                     outbound|80||<host> cluster of the IMDS ServiceEntry), or set \
                     token_source.cluster to the cluster that does."
                ),
            ),
            FetchFailure::NoResponse => (
                503,
                code::TOKEN_ENDPOINT_UNREACHABLE,
                format!(
                    "The managed identity endpoint did not answer (cluster \"{}\", authority \
                     \"{}\"): connection failed or timed out. On Azure, the proxy must reach \
                     169.254.169.254:80 directly, bypassing any egress proxy; the filter keeps \
                     retrying.",
                    imds.cluster, imds.authority
                ),
            ),
            FetchFailure::InvalidBody { problem } => (
                503,
                code::TOKEN_RESPONSE_INVALID,
                format!(
                    "The managed identity endpoint answered 200, but {problem}. The filter keeps \
                     retrying; if this persists, check what serves cluster \"{}\".",
                    imds.cluster
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
                         than the managed identity endpoint may be answering on that cluster: check what \
                         serves it. The filter asks again every 15-30 s.",
                        imds.cluster
                    ),
                )
            }
            FetchFailure::Status {
                status,
                error,
                description,
            } => {
                if let Some(e) = error {
                    details.insert("token_endpoint_error".into(), json!(e));
                }
                if let Some(d) = description {
                    details.insert("token_endpoint_error_description".into(), json!(d));
                }
                details.insert("token_endpoint_status".into(), json!(status));
                let said = description
                    .as_deref()
                    .or(error.as_deref())
                    .map(|d| format!(" (IMDS {status}: \"{d}\")"))
                    .unwrap_or_else(|| format!(" (IMDS {status})"));
                status_diagnosis(*status, &said, failure.cause.class(), spec)
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
        let imds = spec.imds();
        let mut details = Map::new();
        details.insert("token_endpoint_cluster".into(), json!(imds.cluster));
        Diagnosis {
            status: 503,
            code: code::TOKEN_WAIT_TIMEOUT,
            message: format!(
                "No managed identity token arrived within {} ms; the token endpoint behind \
                 cluster \"{}\" is slow. Retry the request; raise token_wait_timeout_ms if the \
                 endpoint is known to be slow.",
                spec.token_wait_timeout_ms, imds.cluster
            ),
            retry_after_s: Some(1),
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

fn status_diagnosis(
    status: u16,
    said: &str,
    class: FailureClass,
    spec: &TokenSpec,
) -> (u16, &'static str, String) {
    let selector = match &spec.imds().identity {
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
        return (
            503,
            code::TOKEN_ENDPOINT_UNAVAILABLE,
            format!(
                "No token yet: {why}{said}. The filter retries with backoff; retry the request."
            ),
        );
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

#[cfg(test)]
mod tests {
    use super::*;

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
