//! The data planes a token is for: Azure OpenAI / Cognitive Services, Azure
//! AI Foundry projects and Azure ML managed online endpoints.
//!
//! **Audience by host and path** (AZURE_FACTS.md §2 "Audiences"; DESIGN.md
//! "`resource` defaults"), decided by [`audience_for`] from the `Host` header
//! (port and trailing dot ignored, case-insensitive):
//!
//! | host | path | audience |
//! |---|---|---|
//! | `*.services.ai.azure.com` | `/api/projects/…` | `https://ai.azure.com` |
//! | `*.openai.azure.us`, `*.cognitiveservices.azure.us` | any | `https://cognitiveservices.azure.us` |
//! | `*.openai.azure.cn`, `*.cognitiveservices.azure.cn` | any | `https://cognitiveservices.azure.cn` |
//! | `*.inference.ml.azure.com` | any | `https://ml.azure.com` |
//! | `*.openai.azure.com`, `*.cognitiveservices.azure.com`, other `*.services.ai.azure.com` paths, and every other host (`127.0.0.1`, test hosts) | any | `Settings::accepted_audience` |
//!
//! The path decides the operation, the host the audience:
//!
//! * chat completions (`POST /openai/deployments/{d}/chat/completions`,
//!   `POST /openai/v1/chat/completions`) answer a chat-completion body;
//! * Foundry project endpoints (any method on `/api/projects/{project}/…`)
//!   answer `{"object":"list","data":[],…}`;
//! * Azure ML scoring (`POST /score`) answers `{"result":[…],…}`.
//!
//! Every operation is judged alike, as Azure OpenAI does (AZURE_FACTS.md §3):
//! the firewall's 403 when `network_rule_denies`; a 400 for a bearer token
//! sent to a regional endpoint (`*.api.cognitive.microsoft.com`); an `api-key`
//! refused with 403 `AuthenticationTypeDisabled` while local auth is off (else
//! checked against `Settings::api_key`); a bearer token verified by signature,
//! expiry and the audience above (401 `statusCode` body naming that audience);
//! and the caller's `oid` looked up in `Settings::role_holders`, the one RBAC
//! table of every data plane (401 `PermissionDenied` naming the action).
//!
//! Not verified against the real services: the refusals of Foundry project
//! endpoints and of Azure ML scoring use the Azure OpenAI shapes of §3. For
//! Azure ML no primary source for the exact body of a denied `aad_token`
//! call was found (its RBAC names
//! `Microsoft.MachineLearningServices/workspaces/onlineEndpoints/score/action`
//! as the required action); the emulator keeps the `PermissionDenied` shape
//! so the filter's diagnosis of it can be tested. The Foundry action named is
//! the agents data action, read for `GET`/`HEAD`, write otherwise.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use axum::routing::{any, post};
use axum::Router;
use serde::Serialize;
use serde_json::{json, Value};

use crate::control::echo;
use crate::tokens::{check_token, unverified_aud, unverified_exp};
use crate::{
    json_response, now_ms, App, Seen, AI_RESOURCE, CHINA_RESOURCE, ML_RESOURCE, US_GOV_RESOURCE,
};

/// How a data plane judged one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    Ok,
    KeyAuthDisabled,
    InvalidKey,
    MissingToken,
    InvalidToken,
    ExpiredToken,
    WrongAudience,
    PermissionDenied,
    NetworkRule,
    SubdomainRequired,
    Echoed,
}

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(chat),
        )
        .route("/openai/v1/chat/completions", post(chat_v1))
        .route("/api/projects/{project}", any(project))
        .route("/api/projects/{project}/{*rest}", any(project))
        .route("/score", post(score).fallback(echo))
}

/// `Host` as a name: without a port or a trailing dot, lower case.
pub(crate) fn bare_host(host: &str) -> String {
    let host = host.trim();
    if let Some(literal) = host.strip_prefix('[') {
        return literal
            .split(']')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The audience a request to `host` and `path` must carry; `configured` is
/// what `*.openai.azure.com`-like and non-Azure hosts take
/// (`Settings::accepted_audience`).
pub fn audience_for(host: &str, path: &str, configured: &str) -> String {
    let host = bare_host(host);
    let under = |suffixes: &[&str]| {
        suffixes
            .iter()
            .any(|suffix| host.len() > suffix.len() && host.ends_with(suffix))
    };
    if under(&[".services.ai.azure.com"]) && path.starts_with("/api/projects/") {
        AI_RESOURCE.to_owned()
    } else if under(&[".openai.azure.us", ".cognitiveservices.azure.us"]) {
        US_GOV_RESOURCE.to_owned()
    } else if under(&[".openai.azure.cn", ".cognitiveservices.azure.cn"]) {
        CHINA_RESOURCE.to_owned()
    } else if under(&[".inference.ml.azure.com"]) {
        ML_RESOURCE.to_owned()
    } else {
        configured.to_owned()
    }
}

/// What an operation needs, as a `PermissionDenied` names it.
struct Operation {
    /// The RBAC action the caller's role must grant.
    action: &'static str,
    /// The operation, e.g. `POST /score`.
    named: String,
}

/// The bearer token of a request, if any.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
}

async fn chat(
    State(app): State<App>,
    Path(deployment): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    judge(&app, &method, &uri, &headers, chat_operation(), |caller| {
        completion(&deployment, caller, &body)
    })
}

async fn chat_v1(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    let model = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "gpt-4o-mini".into());
    judge(&app, &method, &uri, &headers, chat_operation(), |caller| {
        completion(&model, caller, &body)
    })
}

fn chat_operation() -> Operation {
    Operation {
        action: "Microsoft.CognitiveServices/accounts/OpenAI/deployments/chat/completions/action",
        named: "POST /openai/deployments/{deployment-id}/chat/completions".into(),
    }
}

/// A Foundry project endpoint (`https://<account>.services.ai.azure.com/api/projects/<project>/…`).
async fn project(State(app): State<App>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let action = if method == Method::GET || method == Method::HEAD {
        "Microsoft.CognitiveServices/accounts/AIServices/agents/read"
    } else {
        "Microsoft.CognitiveServices/accounts/AIServices/agents/write"
    };
    let operation = Operation {
        action,
        named: format!("{method} {}", uri.path()),
    };
    judge(
        &app,
        &method,
        &uri,
        &headers,
        operation,
        |caller| json!({"object": "list", "data": [], "x_emulator_caller": caller}),
    )
}

/// An Azure ML managed online endpoint with `auth_mode: aad_token`
/// (`https://<endpoint>.<region>.inference.ml.azure.com/score`).
async fn score(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    let operation = Operation {
        action: "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/score/action",
        named: "POST /score".into(),
    };
    judge(&app, &method, &uri, &headers, operation, |caller| {
        scoring(caller, &body)
    })
}

/// Judge one data-plane request, record it, and answer with `answer(caller)`
/// when it is let through (`caller` is the token's `oid`, or `api-key`).
fn judge(
    app: &App,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    operation: Operation,
    answer: impl FnOnce(&str) -> Value,
) -> Response {
    let (settings, public_key) = {
        let world = app.shared.world();
        (world.settings.clone(), world.key.public_key())
    };
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let audience = audience_for(host, uri.path(), &settings.accepted_audience);
    let bearer = bearer(headers);
    let mut seen = Seen {
        verdict: Verdict::Ok,
        token_exp: None,
        token_oid: None,
        token_aud: bearer.and_then(unverified_aud),
        expected_audience: Some(audience.clone()),
    };
    // A regional endpoint, not the resource's custom subdomain.
    let regional = bare_host(host).contains(".api.cognitive.microsoft.com");
    let (verdict, status, response) = if settings.network_rule_denies {
        (
            Verdict::NetworkRule,
            403,
            json!({"error": {"code": "403", "message": "Access denied due to Virtual Network/Firewall rules."}}),
        )
    } else if bearer.is_some() && regional {
        (
            Verdict::SubdomainRequired,
            400,
            json!({"error": {"code": "BadRequest", "message": "Please provide a custom subdomain for token authentication, otherwise API key is required."}}),
        )
    } else if let Some(key) = headers.get("api-key").and_then(|v| v.to_str().ok()) {
        if settings.local_auth_disabled {
            (
                Verdict::KeyAuthDisabled,
                403,
                json!({"error": {"code": "AuthenticationTypeDisabled", "message": "Key based authentication is disabled for this resource."}}),
            )
        } else if key == settings.api_key {
            (Verdict::Ok, 200, answer("api-key"))
        } else {
            (
                Verdict::InvalidKey,
                401,
                json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}),
            )
        }
    } else {
        let unauthorized = json!({"statusCode": 401, "message": format!("Unauthorized. Access token is missing, invalid, audience is incorrect ({audience}), or have expired.")});
        match bearer.map(|t| check_token(&public_key, &audience, t)) {
            None => (Verdict::MissingToken, 401, unauthorized),
            Some(Err(verdict)) => {
                seen.token_exp = bearer.and_then(unverified_exp);
                (verdict, 401, unauthorized)
            }
            Some(Ok(claims)) => {
                seen.token_exp = claims.expires_at.map(|t| t.as_secs());
                let oid = claims.custom.oid;
                seen.token_oid = Some(oid.clone());
                if settings.role_holders.contains(&oid) {
                    (Verdict::Ok, 200, answer(&oid))
                } else {
                    (
                        Verdict::PermissionDenied,
                        401,
                        json!({"error": {"code": "PermissionDenied", "message": format!("The principal `{oid}` lacks the required data action `{}` to perform `{}` operation.", operation.action, operation.named)}}),
                    )
                }
            }
        }
    };
    seen.verdict = verdict;
    app.record(method, uri, headers, status, seen);
    if let Some(raw) = settings.upstream_reply {
        return raw.into_response();
    }
    let mut response = json_response(status, response);
    if status != 200 && settings.compress_errors {
        response.headers_mut().insert(
            "content-encoding",
            axum::http::HeaderValue::from_static("gzip"),
        );
    }
    response
}

fn completion(deployment: &str, caller: &str, request: &str) -> Value {
    let prompt = serde_json::from_str::<Value>(request)
        .ok()
        .and_then(|v| {
            v.pointer("/messages/0/content")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let content = format!("Hello from the Azure OpenAI emulator. You said: {prompt}");
    let created = now_ms() / 1000;
    json!({
        "id": format!("chatcmpl-emulator-{created}"),
        "object": "chat.completion",
        "created": created,
        "model": deployment,
        "system_fingerprint": "fp_emulator",
        "prompt_filter_results": [],
        "choices": [{
            "index": 0,
            "finish_reason": "stop",
            "logprobs": null,
            "message": {"role": "assistant", "content": content, "refusal": null},
            "content_filter_results": {}
        }],
        "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
        "x_emulator_caller": caller
    })
}

/// One score per input row (`input_data.data` or `data`), or one for a body
/// without rows.
fn scoring(caller: &str, request: &str) -> Value {
    let rows = serde_json::from_str::<Value>(request)
        .ok()
        .and_then(|v| {
            v.pointer("/input_data/data")
                .or_else(|| v.get("data"))
                .and_then(Value::as_array)
                .map(Vec::len)
        })
        .unwrap_or(1);
    json!({"result": vec![0.5; rows], "x_emulator_caller": caller})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RESOURCE;

    const CONFIGURED: &str = "https://configured.example";

    fn audience(host: &str, path: &str) -> String {
        audience_for(host, path, CONFIGURED)
    }

    #[test]
    fn public_cloud_openai_hosts_take_the_configured_audience() {
        for host in [
            "east.openai.azure.com",
            "east.cognitiveservices.azure.com",
            "acct.services.ai.azure.com",
        ] {
            assert_eq!(
                audience(host, "/openai/v1/chat/completions"),
                CONFIGURED,
                "{host}"
            );
        }
    }

    #[test]
    fn foundry_project_paths_take_ai_azure_com_and_other_services_ai_paths_do_not() {
        let host = "acct.services.ai.azure.com";
        assert_eq!(
            audience(host, "/api/projects/p1/assistants"),
            "https://ai.azure.com"
        );
        assert_eq!(audience(host, "/models/chat/completions"), CONFIGURED);
        assert_eq!(audience(host, "/openai/v1/responses"), CONFIGURED);
        assert_eq!(
            audience("east.openai.azure.com", "/api/projects/p1/assistants"),
            CONFIGURED,
            "only services.ai hosts have project endpoints"
        );
    }

    #[test]
    fn us_government_hosts_take_the_azure_us_audience() {
        for host in ["gov.openai.azure.us", "gov.cognitiveservices.azure.us"] {
            assert_eq!(
                audience(host, "/openai/v1/chat/completions"),
                "https://cognitiveservices.azure.us",
                "{host}"
            );
        }
    }

    #[test]
    fn china_hosts_take_the_azure_cn_audience() {
        for host in ["cn.openai.azure.cn", "cn.cognitiveservices.azure.cn"] {
            assert_eq!(
                audience(host, "/openai/v1/chat/completions"),
                "https://cognitiveservices.azure.cn",
                "{host}"
            );
        }
    }

    #[test]
    fn azure_ml_online_endpoints_take_the_ml_audience() {
        assert_eq!(
            audience("ep1.eastus2.inference.ml.azure.com", "/score"),
            "https://ml.azure.com"
        );
    }

    #[test]
    fn hosts_that_are_not_azure_take_the_configured_audience() {
        for host in [
            "127.0.0.1:8080",
            "localhost",
            "[::1]:80",
            "upstream.test",
            "",
        ] {
            assert_eq!(audience(host, "/api/projects/p/x"), CONFIGURED, "{host}");
        }
        assert_eq!(
            audience_for("localhost", "/score", RESOURCE),
            RESOURCE,
            "the default configured audience is Azure OpenAI's"
        );
    }

    #[test]
    fn ports_trailing_dots_and_case_do_not_change_the_audience() {
        for host in [
            "EP1.EastUS2.Inference.ML.Azure.com",
            "ep1.eastus2.inference.ml.azure.com:443",
            "ep1.eastus2.inference.ml.azure.com.",
            "ep1.eastus2.inference.ml.azure.com.:443",
        ] {
            assert_eq!(audience(host, "/score"), "https://ml.azure.com", "{host}");
        }
    }

    #[test]
    fn a_bare_suffix_is_not_a_host_of_that_family() {
        assert_eq!(audience("inference.ml.azure.com", "/score"), CONFIGURED);
        assert_eq!(audience("evilopenai.azure.us", "/"), CONFIGURED);
    }

    #[test]
    fn scoring_answers_one_result_per_input_row() {
        let answer = scoring("oid", r#"{"input_data":{"data":[[1],[2],[3]]}}"#);
        assert_eq!(answer["result"].as_array().map(Vec::len), Some(3));
        assert_eq!(scoring("oid", "")["result"], json!([0.5]));
    }
}
