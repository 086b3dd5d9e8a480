//! What Azure OpenAI's authorization failures mean (AZURE_FACTS.md §3).
//!
//! Two different 401s come back from the data plane: the gateway's
//! `{"statusCode":401,…}` when the token itself is missing, invalid, for the
//! wrong audience or expired, and `{"error":{"code":"PermissionDenied",…}}`
//! when the token is fine but its principal lacks the role. Only the first
//! says anything about the cached token.

use serde_json::Value;

/// Longest upstream error body worth reading; real ones are a few hundred bytes.
pub const MAX_ERROR_BODY: usize = 16 * 1024;

/// `error.code` of a token from another tenant (AZURE_FACTS.md §3): a sentence.
const TENANT_MISMATCH_CODE: &str = "Tenant provided in token does not match resource token";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// 401 `statusCode` body: the token was not accepted as a token. The
    /// message names the audience the resource accepts.
    TokenRejected { expected_audience: Option<String> },
    /// 401 `PermissionDenied`: the identity lacks the data action.
    PermissionDenied {
        principal: Option<String>,
        data_action: Option<String>,
    },
    /// 403 `AuthenticationTypeDisabled`: a key reached a keyless resource.
    KeyAuthDisabled,
    /// 403 firewall / virtual-network rule.
    NetworkRule,
    /// 400: tokens need the resource's custom subdomain endpoint.
    SubdomainRequired,
    /// 400 "Tenant provided in token does not match resource token": the
    /// token comes from another tenant than the resource's. The message names
    /// the token's tenant.
    TenantMismatch { token_tenant: Option<String> },
    /// 401 "invalid subscription key": a key the resource does not take.
    /// Only the filter's own `api-key` credential (an `http` source) is
    /// explained; an application's own key is the application's business.
    KeyRejected,
}

/// Classify an upstream answer by status and body; `None` when it is not an
/// authorization failure this filter understands.
pub fn classify(status: u16, body: &[u8]) -> Option<UpstreamFailure> {
    if !matches!(status, 400 | 401 | 403) || body.len() > MAX_ERROR_BODY {
        return None;
    }
    let json: Value = serde_json::from_slice(body).ok()?;
    if status == 401 && json.get("statusCode").is_some() {
        let message = json
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default();
        return Some(UpstreamFailure::TokenRejected {
            expected_audience: audience_in(message),
        });
    }
    let error = json.get("error")?;
    let code = error
        .get("code")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match (status, code) {
        (401, "PermissionDenied") => Some(UpstreamFailure::PermissionDenied {
            principal: between_backticks(message, 0),
            data_action: between_backticks(message, 1),
        }),
        (403, "AuthenticationTypeDisabled") => Some(UpstreamFailure::KeyAuthDisabled),
        (401, _) if message.contains("invalid subscription key") => {
            Some(UpstreamFailure::KeyRejected)
        }
        (403, _) if message.contains("Virtual Network/Firewall") => {
            Some(UpstreamFailure::NetworkRule)
        }
        (400, _) if message.to_ascii_lowercase().contains("custom subdomain") => {
            Some(UpstreamFailure::SubdomainRequired)
        }
        (400, _)
            if code.eq_ignore_ascii_case(TENANT_MISMATCH_CODE)
                || message.contains("does not match resource tenant") =>
        {
            Some(UpstreamFailure::TenantMismatch {
                token_tenant: tenant_in(message),
            })
        }
        _ => None,
    }
}

/// "… audience is incorrect (https://cognitiveservices.azure.com) …" → the URI.
fn audience_in(message: &str) -> Option<String> {
    let (_, rest) = message.split_once("audience is incorrect (")?;
    let (audience, _) = rest.split_once(')')?;
    Some(audience.to_owned())
}

/// "Token tenant <tid> does not match resource tenant." → `<tid>`.
fn tenant_in(message: &str) -> Option<String> {
    let (_, rest) = message.split_once("Token tenant ")?;
    let tenant = rest.split_whitespace().next()?;
    Some(tenant.to_owned())
}

/// The `n`-th `quoted` span of a message such as
/// "The principal `oid` lacks the required data action `…` to perform …".
fn between_backticks(message: &str, n: usize) -> Option<String> {
    message
        .split('`')
        .skip(1)
        .step_by(2)
        .nth(n)
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_401_means_the_token_itself_was_rejected() {
        let body = br#"{"statusCode": 401, "message": "Unauthorized. Access token is missing, invalid, audience is incorrect (https://cognitiveservices.azure.com), or have expired."}"#;
        assert_eq!(
            classify(401, body),
            Some(UpstreamFailure::TokenRejected {
                expected_audience: Some("https://cognitiveservices.azure.com".into())
            })
        );
    }

    #[test]
    fn permission_denied_names_the_principal_and_the_data_action() {
        let body = br#"{"error":{"code":"PermissionDenied","message":"The principal `0b5e7c4a` lacks the required data action `Microsoft.CognitiveServices/accounts/OpenAI/deployments/chat/completions/action` to perform `POST /openai/deployments/{deployment-id}/chat/completions` operation."}}"#;
        assert_eq!(
            classify(401, body),
            Some(UpstreamFailure::PermissionDenied {
                principal: Some("0b5e7c4a".into()),
                data_action: Some(
                    "Microsoft.CognitiveServices/accounts/OpenAI/deployments/chat/completions/action"
                        .into()
                ),
            })
        );
    }

    #[test]
    fn key_and_network_refusals_are_told_apart() {
        let key = br#"{"error":{"code":"AuthenticationTypeDisabled","message":"Key based authentication is disabled for this resource."}}"#;
        assert_eq!(classify(403, key), Some(UpstreamFailure::KeyAuthDisabled));
        let net = br#"{"error":{"code":"403","message":"Access denied due to Virtual Network/Firewall rules."}}"#;
        assert_eq!(classify(403, net), Some(UpstreamFailure::NetworkRule));
        let subdomain = br#"{"error":{"code":"BadRequest","message":"Please provide a custom subdomain for token authentication, otherwise API key is required."}}"#;
        assert_eq!(
            classify(400, subdomain),
            Some(UpstreamFailure::SubdomainRequired)
        );
    }

    #[test]
    fn a_token_from_another_tenant_names_its_tenant() {
        let body = br#"{"error":{"code":"Tenant provided in token does not match resource token","message":"Token tenant 11111111-2222-4333-8444-555555555555 does not match resource tenant."}}"#;
        assert_eq!(
            classify(400, body),
            Some(UpstreamFailure::TenantMismatch {
                token_tenant: Some("11111111-2222-4333-8444-555555555555".into())
            })
        );
        let terse = br#"{"error":{"code":"Tenant provided in token does not match resource token","message":""}}"#;
        assert_eq!(
            classify(400, terse),
            Some(UpstreamFailure::TenantMismatch { token_tenant: None })
        );
    }

    #[test]
    fn permission_denied_without_a_principal_is_still_permission_denied() {
        let body = br#"{"error":{"code":"PermissionDenied","message":"Principal does not have access to API/Operation."}}"#;
        assert_eq!(
            classify(401, body),
            Some(UpstreamFailure::PermissionDenied {
                principal: None,
                data_action: None,
            })
        );
    }

    #[test]
    fn a_wrong_key_is_told_from_a_wrong_token() {
        let body = br#"{"error":{"code":"401","message":"Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}"#;
        assert_eq!(classify(401, body), Some(UpstreamFailure::KeyRejected));
    }

    #[test]
    fn other_answers_are_not_authorization_failures() {
        assert_eq!(classify(200, b"{}"), None);
        assert_eq!(classify(401, b"not json"), None);
        assert_eq!(classify(429, br#"{"error":{"code":"429"}}"#), None);
        assert_eq!(
            classify(
                401,
                br#"{"error":{"code":"401","message":"Access denied"}}"#
            ),
            None
        );
        assert_eq!(classify(401, &vec![b' '; MAX_ERROR_BODY + 1]), None);
    }
}
