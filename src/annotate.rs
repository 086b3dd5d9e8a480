//! Azure OpenAI's authorization failures, made to explain themselves.
//!
//! The upstream status and error code are kept, so SDKs behave as before; the
//! message gains the cause and the fix, and `error` gains structured fields.
//! The response header is chosen when the headers pass, from what the filter
//! knows then (status, whether the host matched, whether it sent a token); the
//! precise diagnosis needs the body and goes into `error.diagnosis`.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::claims::Claims;
use crate::config::Config;
use crate::rewrite::host_without_port as strip_port;
use crate::upstream::UpstreamFailure;

/// Header codes, chosen from the status and what the filter knows.
pub mod header {
    /// 401 to a request that carried the filter's token.
    pub const UPSTREAM_UNAUTHORIZED: &str = "UpstreamUnauthorized";
    /// 403 from the resource.
    pub const UPSTREAM_FORBIDDEN: &str = "UpstreamForbidden";
    /// 400 to a request that carried the filter's token.
    pub const UPSTREAM_BAD_REQUEST: &str = "UpstreamBadRequest";
}

/// Precise diagnoses, read from the upstream body (`error.diagnosis`).
pub mod diagnosis {
    pub const ROLE_MISSING: &str = "RoleMissing";
    pub const TOKEN_REJECTED: &str = "TokenRejected";
    pub const KEY_AUTH_DISABLED: &str = "KeyAuthDisabled";
    pub const NETWORK_RULE: &str = "NetworkRule";
    pub const CUSTOM_SUBDOMAIN_REQUIRED: &str = "CustomSubdomainRequired";
}

/// Roles that grant chat completions with a token (AZURE_FACTS.md §3).
pub const GRANTING_ROLES: [&str; 3] = [
    "Cognitive Services OpenAI User",
    "Cognitive Services OpenAI Contributor",
    "Cognitive Services User",
];

/// What the filter knows about a request when its answer comes back.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// `:authority` as the application sent it.
    pub host: &'a str,
    /// The host matched `hosts`, so the key was removed and a token sent.
    pub matched: bool,
    /// Claims of the token the request carried, if it carried the filter's token.
    pub token: Option<&'a Claims>,
}

/// The header code for an answer with this status to a request that did or
/// did not carry the filter's token, or `None` when the filter does not
/// explain such an answer.
pub fn header_code(status: u16, with_token: bool) -> Option<&'static str> {
    match status {
        401 if with_token => Some(header::UPSTREAM_UNAUTHORIZED),
        403 => Some(header::UPSTREAM_FORBIDDEN),
        400 if with_token => Some(header::UPSTREAM_BAD_REQUEST),
        _ => None,
    }
}

/// May an upstream error body be rewritten? Only JSON that is not compressed:
/// anything else keeps its bytes and gets the header and a log line only.
pub fn body_rewritable(content_type: Option<&str>, content_encoding: Option<&str>) -> bool {
    let json = content_type.is_some_and(|t| t.to_ascii_lowercase().contains("json"));
    let encoded = content_encoding.is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"));
    json && !encoded
}

/// The explanation of one upstream failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    pub diagnosis: &'static str,
    pub explanation: String,
    pub fields: Map<String, Value>,
}

impl Annotation {
    /// `key=value` pairs for the log line: identities and the fix, no secrets.
    pub fn log_line(&self, status: u16, host: &str) -> String {
        let mut line = format!(
            "upstream {status} from {host}: diagnosis={} ",
            self.diagnosis
        );
        for key in [
            "principal_id",
            "client_id",
            "token_audience",
            "expected_audience",
        ] {
            if let Some(Value::String(v)) = self.fields.get(key) {
                line.push_str(&format!("{key}={v} "));
            }
        }
        line.push_str(&format!("fix: {}", self.explanation));
        line
    }
}

/// Explain `failure`. `token_dropped` says whether this answer made the
/// filter drop its cached token (see `Agent::invalidate`).
pub fn explain(
    failure: &UpstreamFailure,
    facts: &Facts<'_>,
    config: &Config,
    now_ms: u64,
    token_dropped: bool,
) -> Annotation {
    let mut fields = Map::new();
    let claims = facts.token.cloned().unwrap_or_default();
    let identity = |fields: &mut Map<String, Value>| {
        for (key, value) in [
            ("principal_id", &claims.oid),
            ("client_id", &claims.appid.clone().or(claims.azp.clone())),
            ("identity_resource_id", &claims.xms_mirid),
            ("tenant_id", &claims.tid),
        ] {
            if let Some(v) = value {
                fields.insert(key.into(), json!(v));
            }
        }
    };
    match failure {
        UpstreamFailure::PermissionDenied {
            principal,
            data_action,
        } => {
            identity(&mut fields);
            let oid = principal.clone().or(claims.oid.clone());
            let who = describe_identity(oid.as_deref(), &claims);
            let action = data_action
                .clone()
                .unwrap_or_else(|| "the data action of this operation".into());
            let assignee = oid.clone().unwrap_or_else(|| "<principal id>".into());
            let resource = resource_name(facts.host);
            let command = format!(
                "az role assignment create --assignee-object-id {assignee} --assignee-principal-type ServicePrincipal \
                 --role \"Cognitive Services OpenAI User\" --scope $(az cognitiveservices account show --name {resource} \
                 --resource-group <resource group> --query id --output tsv)"
            );
            fields.insert("data_action".into(), json!(action));
            fields.insert("roles_that_grant_it".into(), json!(GRANTING_ROLES));
            fields.insert("fix_command".into(), json!(command));
            Annotation {
                diagnosis: diagnosis::ROLE_MISSING,
                explanation: format!(
                    "the managed identity ({who}) has no role on this resource that allows `{action}`. \
                     Grant it Cognitive Services OpenAI User (or OpenAI Contributor, or Cognitive Services \
                     User; Cognitive Services Contributor has no data actions and does not help): {command}. \
                     A new role assignment can take minutes to hours to reach a token."
                ),
                fields,
            }
        }
        UpstreamFailure::TokenRejected { expected_audience } => {
            identity(&mut fields);
            let now_s = now_ms / 1000;
            let mut wrong = Vec::new();
            // The resource says which audience it accepts; else trust the configuration.
            let expected = expected_audience.as_deref().unwrap_or(&config.resource);
            fields.insert("expected_audience".into(), json!(expected));
            if let Some(aud) = &claims.aud {
                fields.insert("token_audience".into(), json!(aud));
                if aud.trim_end_matches('/') != expected.trim_end_matches('/') {
                    wrong.push(format!(
                        "the token's audience is \"{aud}\" but this resource accepts \"{expected}\": \
                         set resource to \"{expected}\" (it is \"{}\")",
                        config.resource
                    ));
                }
            }
            if let Some(exp) = claims.exp {
                fields.insert("token_expires_at".into(), json!(exp));
                if exp <= now_s {
                    wrong.push(format!(
                        "the token expired {} s ago by this proxy's clock; check the clock",
                        now_s - exp
                    ));
                }
            }
            if let Some(nbf) = claims.nbf {
                fields.insert("token_not_before".into(), json!(nbf));
                if nbf > now_s + 300 {
                    wrong.push(format!(
                        "the token is not valid for another {} s by this proxy's clock; check the clock",
                        nbf - now_s
                    ));
                }
            }
            if wrong.is_empty() {
                wrong.push(format!(
                    "its audience and lifetime look right, so Azure refused its signature or tenant{}: \
                     a managed identity can only reach resources in its own tenant",
                    claims
                        .tid
                        .as_deref()
                        .map(|t| format!(" (token tenant {t})"))
                        .unwrap_or_default()
                ));
            }
            fields.insert("token_dropped".into(), json!(token_dropped));
            let action = if token_dropped {
                "The filter dropped its cached token and is fetching a new one."
            } else {
                "The filter keeps its token until the next refresh (it drops a rejected token at most once per invalidation_interval_ms)."
            };
            Annotation {
                diagnosis: diagnosis::TOKEN_REJECTED,
                explanation: format!("Azure OpenAI did not accept the token: {}. {action}", wrong.join("; ")),
                fields,
            }
        }
        UpstreamFailure::KeyAuthDisabled => {
            let host = strip_port(facts.host);
            fields.insert("host".into(), json!(host));
            let patterns: Vec<String> = config.hosts.patterns().iter().map(|p| p.to_string()).collect();
            fields.insert("hosts".into(), json!(patterns));
            let explanation = if facts.matched {
                "the request left with a key although its host matches `hosts`: another filter or the route \
                 adds the api-key after aoai-msi-filter. Place aoai-msi-filter after any filter that sets \
                 headers, right before the router."
                    .to_owned()
            } else {
                format!(
                    "the api-key went through because the host \"{host}\" is not in the filter's hosts [{}], so \
                     the filter did not replace it. Add \"{host}\"{} to hosts.",
                    patterns.join(", "),
                    suffix_pattern(host)
                        .map(|p| format!(" (or \"{p}\")"))
                        .unwrap_or_default()
                )
            };
            Annotation {
                diagnosis: diagnosis::KEY_AUTH_DISABLED,
                explanation,
                fields,
            }
        }
        UpstreamFailure::NetworkRule => Annotation {
            diagnosis: diagnosis::NETWORK_RULE,
            explanation: "this is not an identity problem: the resource's networking rules (firewall, virtual \
                          network, private endpoint) refuse this proxy's address. Allow it under the resource's \
                          Networking settings, or reach the resource through its private endpoint."
                .to_owned(),
            fields,
        },
        UpstreamFailure::SubdomainRequired => Annotation {
            diagnosis: diagnosis::CUSTOM_SUBDOMAIN_REQUIRED,
            explanation: format!(
                "this is not an identity problem: Entra ID tokens are accepted only on the resource's custom \
                 subdomain (https://<resource>.openai.azure.com), not on \"{}\". Point the application at the \
                 custom subdomain endpoint.",
                strip_port(facts.host)
            ),
            fields,
        },
    }
}

fn describe_identity(oid: Option<&str>, claims: &Claims) -> String {
    let mut parts = Vec::new();
    if let Some(oid) = oid {
        parts.push(format!("principal id {oid}"));
    }
    if let Some(client) = claims.client_id() {
        parts.push(format!("client id {client}"));
    }
    if let Some(mirid) = &claims.xms_mirid {
        parts.push(mirid.clone());
    }
    if parts.is_empty() {
        "identity unknown".to_owned()
    } else {
        parts.join(", ")
    }
}

/// Suffixes of Azure OpenAI resource hosts, public and sovereign clouds.
const RESOURCE_SUFFIXES: [&str; 5] = [
    ".openai.azure.com",
    ".cognitiveservices.azure.com",
    ".services.ai.azure.com",
    ".openai.azure.us",
    ".openai.azure.cn",
];

/// `myres.openai.azure.com` → `myres`; a host that is not a resource's own
/// name (an IP, `localhost` in a sidecar setup) names no resource.
fn resource_name(host: &str) -> &str {
    let host = strip_port(host);
    RESOURCE_SUFFIXES
        .iter()
        .find_map(|suffix| host.strip_suffix(suffix))
        .filter(|name| !name.is_empty() && !name.contains('.'))
        .unwrap_or("<resource name>")
}

/// `myres.openai.azure.com` → `*.openai.azure.com`; nothing for IP addresses
/// and short names.
fn suffix_pattern(host: &str) -> Option<String> {
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        return None;
    }
    let (_, rest) = host.split_once('.')?;
    rest.contains('.').then(|| format!("*.{rest}"))
}

/// Rewrite an upstream JSON error body: keep its code, extend its message,
/// add the diagnosis and fields. `None` when the body is not JSON.
pub fn annotated_body(original: &[u8], annotation: &Annotation) -> Option<String> {
    let mut body: Value = serde_json::from_slice(original).ok()?;
    let top = body.as_object_mut()?;
    let mut error = match top.remove("error") {
        Some(Value::Object(error)) => error,
        // The gateway's `{"statusCode":401,"message":…}` has no error object.
        _ => {
            let mut error = Map::new();
            let code = top.get("statusCode").map_or_else(String::new, |c| match c {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            });
            error.insert("code".into(), json!(code));
            if let Some(message) = top.get("message") {
                error.insert("message".into(), message.clone());
            }
            error
        }
    };
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    error.insert(
        "message".into(),
        json!(format!(
            "{message} [aoai-msi-filter] {}",
            annotation.explanation
        )),
    );
    error.insert("diagnosis".into(), json!(annotation.diagnosis));
    error.insert("source_annotation".into(), json!("aoai-msi-filter"));
    for (key, value) in &annotation.fields {
        error.insert(key.clone(), value.clone());
    }
    top.insert("error".into(), Value::Object(error));
    Some(body.to_string())
}

/// One log line per diagnosis per interval: a storm of 401s must not flood
/// the log. Per VM, time passed in.
#[derive(Debug, Default)]
pub struct LogLimiter {
    last: HashMap<&'static str, u64>,
}

impl LogLimiter {
    pub const INTERVAL_MS: u64 = 10_000;

    pub fn allow(&mut self, diagnosis: &'static str, now_ms: u64) -> bool {
        match self.last.get(diagnosis) {
            Some(last) if now_ms < last + Self::INTERVAL_MS => false,
            _ => {
                self.last.insert(diagnosis, now_ms);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 1_763_752_300_000;

    fn claims() -> Claims {
        Claims {
            aud: Some("https://cognitiveservices.azure.com".into()),
            tid: Some("tenant-1".into()),
            oid: Some("0b5e7c4a".into()),
            appid: Some("a1b2c3d4".into()),
            xms_mirid: Some("/subscriptions/s/rg/vm1".into()),
            exp: Some(NOW_MS / 1000 + 3600),
            nbf: Some(NOW_MS / 1000 - 10),
            ..Claims::default()
        }
    }

    fn matched(claims: &Claims) -> Facts<'_> {
        Facts {
            host: "myres.openai.azure.com",
            matched: true,
            token: Some(claims),
        }
    }

    #[test]
    fn header_codes_follow_status_and_what_the_filter_sent() {
        assert_eq!(header_code(401, true), Some(header::UPSTREAM_UNAUTHORIZED));
        assert_eq!(header_code(403, true), Some(header::UPSTREAM_FORBIDDEN));
        assert_eq!(header_code(400, true), Some(header::UPSTREAM_BAD_REQUEST));
        assert_eq!(header_code(403, false), Some(header::UPSTREAM_FORBIDDEN));
        assert_eq!(
            header_code(401, false),
            None,
            "a 401 to the app's own key is the app's"
        );
        assert_eq!(header_code(400, false), None);
        assert_eq!(header_code(200, true), None);
        assert_eq!(header_code(429, true), None);
    }

    #[test]
    fn role_missing_names_the_identity_the_roles_and_the_command() {
        let c = claims();
        let a = explain(
            &UpstreamFailure::PermissionDenied {
                principal: Some("0b5e7c4a".into()),
                data_action: Some("Microsoft.CognitiveServices/accounts/OpenAI/deployments/chat/completions/action".into()),
            },
            &matched(&c),
            &Config::default(),
            NOW_MS,
            false,
        );
        assert_eq!(a.diagnosis, diagnosis::ROLE_MISSING);
        for needle in [
            "principal id 0b5e7c4a",
            "client id a1b2c3d4",
            "/subscriptions/s/rg/vm1",
            "Cognitive Services OpenAI User",
            "Cognitive Services Contributor has no data actions",
            "az role assignment create --assignee-object-id 0b5e7c4a",
            "--name myres",
            "minutes to hours",
            "chat/completions/action",
        ] {
            assert!(
                a.explanation.contains(needle),
                "{needle}: {}",
                a.explanation
            );
        }
        assert_eq!(a.fields["principal_id"], "0b5e7c4a");
        assert_eq!(
            a.fields["roles_that_grant_it"][0],
            "Cognitive Services OpenAI User"
        );
    }

    #[test]
    fn rejected_token_says_which_claim_is_wrong() {
        let mut c = claims();
        c.aud = Some("https://management.azure.com".into());
        c.exp = Some(NOW_MS / 1000 - 30);
        let config = Config::parse(br#"{"resource":"https://management.azure.com"}"#).unwrap();
        let rejected = UpstreamFailure::TokenRejected {
            expected_audience: Some("https://cognitiveservices.azure.com".into()),
        };
        let a = explain(&rejected, &matched(&c), &config, NOW_MS, true);
        assert_eq!(a.diagnosis, diagnosis::TOKEN_REJECTED);
        assert!(
            a.explanation.contains(
                "audience is \"https://management.azure.com\" but this resource accepts \"https://cognitiveservices.azure.com\": set resource to \"https://cognitiveservices.azure.com\""
            ),
            "{}",
            a.explanation
        );
        assert!(
            a.explanation.contains("expired 30 s ago"),
            "{}",
            a.explanation
        );
        assert!(a.explanation.contains("dropped its cached token"));
        assert_eq!(a.fields["token_dropped"], true);
    }

    #[test]
    fn rejected_token_with_sound_claims_points_at_signature_or_tenant() {
        let c = claims();
        let a = explain(
            &UpstreamFailure::TokenRejected {
                expected_audience: None,
            },
            &matched(&c),
            &Config::default(),
            NOW_MS,
            false,
        );
        assert!(
            a.explanation.contains("signature or tenant"),
            "{}",
            a.explanation
        );
        assert!(a.explanation.contains("tenant-1"));
        assert!(a
            .explanation
            .contains("at most once per invalidation_interval_ms"));
    }

    #[test]
    fn a_key_on_an_unlisted_host_says_which_host_to_add() {
        let facts = Facts {
            host: "other.openai.azure.com:443",
            matched: false,
            token: None,
        };
        let config = Config::parse(br#"{"hosts":["myres.openai.azure.com"]}"#).unwrap();
        let a = explain(
            &UpstreamFailure::KeyAuthDisabled,
            &facts,
            &config,
            NOW_MS,
            false,
        );
        assert_eq!(a.diagnosis, diagnosis::KEY_AUTH_DISABLED);
        assert!(
            a.explanation.contains(
                "\"other.openai.azure.com\" is not in the filter's hosts [myres.openai.azure.com]"
            ),
            "{}",
            a.explanation
        );
        assert!(
            a.explanation.contains("(or \"*.openai.azure.com\")"),
            "{}",
            a.explanation
        );
    }

    #[test]
    fn ip_addresses_get_no_wildcard_and_name_no_resource() {
        assert_eq!(suffix_pattern("127.0.0.1"), None);
        assert_eq!(suffix_pattern("localhost"), None);
        assert_eq!(
            suffix_pattern("other.openai.azure.com").as_deref(),
            Some("*.openai.azure.com")
        );
        assert_eq!(resource_name("127.0.0.1:10000"), "<resource name>");
        assert_eq!(resource_name("myres.openai.azure.com:443"), "myres");
        assert_eq!(resource_name("proj.services.ai.azure.com"), "proj");
        assert_eq!(
            resource_name("openai.azure.com.evil.example"),
            "<resource name>"
        );
    }

    #[test]
    fn network_and_subdomain_refusals_are_not_identity_problems() {
        let c = claims();
        for failure in [
            UpstreamFailure::NetworkRule,
            UpstreamFailure::SubdomainRequired,
        ] {
            let a = explain(&failure, &matched(&c), &Config::default(), NOW_MS, false);
            assert!(
                a.explanation.starts_with("this is not an identity problem"),
                "{}",
                a.explanation
            );
        }
    }

    #[test]
    fn annotated_bodies_keep_the_upstream_code_and_message() {
        let c = claims();
        let a = explain(
            &UpstreamFailure::NetworkRule,
            &matched(&c),
            &Config::default(),
            NOW_MS,
            false,
        );
        let original = br#"{"error":{"code":"403","message":"Access denied due to Virtual Network/Firewall rules."}}"#;
        let body: Value = serde_json::from_str(&annotated_body(original, &a).unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "403");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(
            "Access denied due to Virtual Network/Firewall rules. [aoai-msi-filter] this is not"
        ));
        assert_eq!(body["error"]["diagnosis"], "NetworkRule");

        let gateway = br#"{"statusCode": 401, "message": "Unauthorized. Access token is missing, invalid, audience is incorrect (https://cognitiveservices.azure.com), or have expired."}"#;
        let a = explain(
            &UpstreamFailure::TokenRejected {
                expected_audience: None,
            },
            &matched(&c),
            &Config::default(),
            NOW_MS,
            false,
        );
        let body: Value = serde_json::from_str(&annotated_body(gateway, &a).unwrap()).unwrap();
        assert_eq!(body["statusCode"], 401, "the original shape stays");
        assert_eq!(body["error"]["code"], "401");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Unauthorized. Access token is missing"));
        assert_eq!(annotated_body(b"<html>", &a), None);
    }

    #[test]
    fn the_readme_documents_every_code() {
        let readme = include_str!("../README.md");
        let codes = [
            header::UPSTREAM_UNAUTHORIZED,
            header::UPSTREAM_FORBIDDEN,
            header::UPSTREAM_BAD_REQUEST,
            diagnosis::ROLE_MISSING,
            diagnosis::TOKEN_REJECTED,
            diagnosis::KEY_AUTH_DISABLED,
            diagnosis::NETWORK_RULE,
            diagnosis::CUSTOM_SUBDOMAIN_REQUIRED,
        ];
        use crate::diagnose::code;
        let local = [
            code::MANAGED_IDENTITY_NOT_FOUND,
            code::MANAGED_IDENTITY_AMBIGUOUS,
            code::TOKEN_REQUEST_REJECTED,
            code::TOKEN_ENDPOINT_UNAVAILABLE,
            code::TOKEN_ENDPOINT_UNREACHABLE,
            code::TOKEN_ENDPOINT_CLUSTER_MISSING,
            code::TOKEN_RESPONSE_INVALID,
            code::TOKEN_WAIT_TIMEOUT,
        ];
        for code in codes.iter().chain(local.iter()) {
            assert!(readme.contains(&format!("`{code}`")), "README lacks {code}");
        }
    }

    #[test]
    fn only_uncompressed_json_bodies_are_rewritten() {
        assert!(body_rewritable(Some("application/json"), None));
        assert!(body_rewritable(
            Some("application/json; charset=utf-8"),
            Some("identity")
        ));
        assert!(!body_rewritable(Some("application/json"), Some("gzip")));
        assert!(!body_rewritable(Some("text/plain"), None));
        assert!(!body_rewritable(None, None));
    }

    #[test]
    fn a_storm_of_one_diagnosis_logs_once_per_interval() {
        let mut limiter = LogLimiter::default();
        assert!(limiter.allow(diagnosis::ROLE_MISSING, 0));
        assert!(!limiter.allow(diagnosis::ROLE_MISSING, 9_999));
        assert!(
            limiter.allow(diagnosis::NETWORK_RULE, 5_000),
            "each diagnosis has its own budget"
        );
        assert!(limiter.allow(diagnosis::ROLE_MISSING, 10_000));
    }

    #[test]
    fn log_lines_carry_identity_and_fix_but_nothing_secret() {
        let c = claims();
        let a = explain(
            &UpstreamFailure::PermissionDenied {
                principal: Some("0b5e7c4a".into()),
                data_action: None,
            },
            &matched(&c),
            &Config::default(),
            NOW_MS,
            false,
        );
        let line = a.log_line(401, "myres.openai.azure.com");
        assert!(line.contains("diagnosis=RoleMissing"));
        assert!(line.contains("principal_id=0b5e7c4a"));
        assert!(line.contains("az role assignment create"));
    }
}
