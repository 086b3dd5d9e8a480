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
//! * Azure ML scoring (`POST /score`) answers `{"result":[…],…}`;
//! * the rest of the Azure OpenAI surface answers OpenAI-shaped bodies:
//!   `POST /openai/v1/responses`, embeddings (`/openai/v1/embeddings`,
//!   `/openai/deployments/{d}/embeddings`), audio transcriptions and image
//!   generations under `/openai/deployments/{d}/`, file uploads
//!   (`/openai/files`, `/openai/v1/files`) and `GET /openai/v1/models`; the
//!   v1 paths take no `api-version`. Chat completions and responses stream
//!   server-sent events when the body says `"stream": true` (`streaming.rs`);
//!   realtime WebSocket handshakes are judged alike (`realtime.rs`).
//!
//! Every request is recorded with its query and the length and SHA-256 of
//! its body (`incoming.rs`); bodies up to [`crate::BODY_LIMIT`] are taken.
//!
//! Every operation is judged alike, as Azure OpenAI does (AZURE_FACTS.md §3):
//! the firewall's 403 when `network_rule_denies`; a 400 for a bearer token
//! sent to a regional endpoint (`*.api.cognitive.microsoft.com`); an `api-key`
//! refused with 403 `AuthenticationTypeDisabled` while local auth is off (else
//! checked against `Settings::api_key` and `Settings::secondary_api_key`, the
//! resource's key1 and key2); a bearer token verified by signature,
//! expiry and the audience above (401 `statusCode` body naming that audience);
//! then its `tid` against `Settings::resource_tenant` (400 "Tenant provided in
//! token does not match resource token"); and the caller's `oid` looked up in
//! `Settings::role_holders`, the one RBAC table of every data plane (401
//! `PermissionDenied` naming the action, or without names when
//! `Settings::permission_denied_names_principal` is false).
//!
//! Not verified against the real services: the refusals of Foundry project
//! endpoints and of Azure ML scoring use the Azure OpenAI shapes of §3. For
//! Azure ML no primary source for the exact body of a denied `aad_token`
//! call was found (its RBAC names
//! `Microsoft.MachineLearningServices/workspaces/onlineEndpoints/score/action`
//! as the required action); the emulator keeps the `PermissionDenied` shape
//! so the filter's diagnosis of it can be tested. The Foundry action named is
//! the agents data action, read for `GET`/`HEAD`, write otherwise.

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{any, get, post};
use axum::Router;
use serde::Serialize;
use serde_json::{json, Value};

use crate::answers;
use crate::control::echo;
use crate::incoming::{Incoming, Keep};
use crate::tokens::{check_token, unverified_aud, unverified_exp};
use crate::{
    json_response, App, Seen, Settings, AI_RESOURCE, BODY_LIMIT, CHINA_RESOURCE, ML_RESOURCE,
    US_GOV_RESOURCE,
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
    /// A verified token issued in another tenant than the resource's.
    TenantMismatch,
    /// A realtime path asked for by a plain request, not a WebSocket
    /// upgrade (400 `Invalid websocket upgrade request`), after its
    /// credentials were accepted.
    NotWebSocket,
}

/// How much of an upload's body is kept to read its form fields (`purpose`
/// precedes the file in the multipart bodies SDKs send).
const UPLOAD_HEAD: usize = 64 * 1024;

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(chat),
        )
        .route("/openai/v1/chat/completions", post(chat_v1))
        .route("/openai/v1/responses", post(responses).fallback(echo))
        .route("/openai/v1/embeddings", post(embeddings_v1).fallback(echo))
        .route(
            "/openai/deployments/{deployment}/embeddings",
            post(embeddings).fallback(echo),
        )
        .route(
            "/openai/deployments/{deployment}/audio/transcriptions",
            post(transcriptions).fallback(echo),
        )
        .route(
            "/openai/deployments/{deployment}/images/generations",
            post(images).fallback(echo),
        )
        .route("/openai/files", post(files).fallback(echo))
        .route("/openai/v1/files", post(files).fallback(echo))
        .route("/openai/v1/models", get(models).fallback(echo))
        .route("/api/projects/{project}", any(project))
        .route("/api/projects/{project}/{*rest}", any(project))
        .route("/score", post(score).fallback(echo))
        .merge(crate::realtime::routes())
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
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
pub(crate) struct Operation {
    /// The RBAC action the caller's role must grant.
    pub(crate) action: &'static str,
    /// The operation, e.g. `POST /score`.
    pub(crate) named: String,
}

impl Operation {
    fn new(action: &'static str, named: &str) -> Operation {
        Operation {
            action,
            named: named.to_owned(),
        }
    }
}

/// The credential a request is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Credential<'a> {
    /// An API key (the `api-key` header, or the realtime query parameter).
    Key(&'a str),
    /// The bearer token of `Authorization`, if any.
    Bearer(Option<&'a str>),
}

/// The credential of an HTTP request: the `api-key` header wins over
/// `Authorization` (openai-python 1.x sends a key in both, and Azure takes it).
pub(crate) fn header_credential(headers: &HeaderMap) -> Credential<'_> {
    match headers.get("api-key").and_then(|v| v.to_str().ok()) {
        Some(key) => Credential::Key(key),
        None => Credential::Bearer(bearer(headers)),
    }
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

/// Read a request (keeping what `keep` says of its body), judge it as
/// `operation(&incoming)` with its header credential, record it, and answer
/// with `answer(&incoming, caller)` when it is let through.
async fn serve(
    app: App,
    request: Request,
    keep: Keep,
    operation: impl FnOnce(&Incoming) -> Operation,
    answer: impl FnOnce(&Incoming, &str) -> Response,
) -> Response {
    let incoming = match Incoming::read(request, keep).await {
        Ok(incoming) => incoming,
        Err(refused) => return refused,
    };
    let operation = operation(&incoming);
    let judged = judge(
        &app,
        &incoming,
        &operation,
        header_credential(&incoming.headers),
    );
    judged.finish(&app, &incoming, |caller| answer(&incoming, caller))
}

/// The model a v1 request names in its body.
fn model_of(request: &Value, default: &str) -> String {
    request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(default)
        .to_owned()
}

fn chat_operation(_: &Incoming) -> Operation {
    Operation::new(
        "Microsoft.CognitiveServices/accounts/OpenAI/deployments/chat/completions/action",
        "POST /openai/deployments/{deployment-id}/chat/completions",
    )
}

fn embeddings_operation(_: &Incoming) -> Operation {
    Operation::new(
        "Microsoft.CognitiveServices/accounts/OpenAI/deployments/embeddings/action",
        "POST /openai/deployments/{deployment-id}/embeddings",
    )
}

async fn chat(
    State(app): State<App>,
    Path(deployment): Path<String>,
    request: Request,
) -> Response {
    serve(
        app,
        request,
        Keep::All,
        chat_operation,
        |incoming, caller| answers::chat(&deployment, caller, &incoming.json()),
    )
    .await
}

async fn chat_v1(State(app): State<App>, request: Request) -> Response {
    serve(
        app,
        request,
        Keep::All,
        chat_operation,
        |incoming, caller| {
            let body = incoming.json();
            answers::chat(&model_of(&body, "gpt-4o-mini"), caller, &body)
        },
    )
    .await
}

async fn responses(State(app): State<App>, request: Request) -> Response {
    let operation = |_: &Incoming| {
        Operation::new(
            "Microsoft.CognitiveServices/accounts/OpenAI/responses/write",
            "POST /openai/v1/responses",
        )
    };
    serve(app, request, Keep::All, operation, |incoming, caller| {
        let body = incoming.json();
        answers::response(&model_of(&body, "gpt-4o-mini"), caller, &body)
    })
    .await
}

async fn embeddings(
    State(app): State<App>,
    Path(deployment): Path<String>,
    request: Request,
) -> Response {
    serve(
        app,
        request,
        Keep::All,
        embeddings_operation,
        |incoming, caller| {
            json_response(
                200,
                answers::embeddings(&deployment, caller, &incoming.json()),
            )
        },
    )
    .await
}

async fn embeddings_v1(State(app): State<App>, request: Request) -> Response {
    serve(
        app,
        request,
        Keep::All,
        embeddings_operation,
        |incoming, caller| {
            let body = incoming.json();
            let model = model_of(&body, "text-embedding-3-small");
            json_response(200, answers::embeddings(&model, caller, &body))
        },
    )
    .await
}

async fn transcriptions(State(app): State<App>, request: Request) -> Response {
    let operation = |_: &Incoming| {
        Operation::new(
            "Microsoft.CognitiveServices/accounts/OpenAI/deployments/audio/action",
            "POST /openai/deployments/{deployment-id}/audio/transcriptions",
        )
    };
    serve(
        app,
        request,
        Keep::Head(0),
        operation,
        |incoming, caller| json_response(200, answers::transcription(caller, incoming)),
    )
    .await
}

async fn images(
    State(app): State<App>,
    Path(deployment): Path<String>,
    request: Request,
) -> Response {
    let operation = |_: &Incoming| {
        Operation::new(
            "Microsoft.CognitiveServices/accounts/OpenAI/images/generations/action",
            "POST /openai/deployments/{deployment-id}/images/generations",
        )
    };
    serve(app, request, Keep::All, operation, |incoming, caller| {
        json_response(200, answers::images(&deployment, caller, &incoming.json()))
    })
    .await
}

async fn files(State(app): State<App>, request: Request) -> Response {
    let operation = |incoming: &Incoming| {
        Operation::new(
            "Microsoft.CognitiveServices/accounts/OpenAI/files/write",
            &format!("POST {}", incoming.uri.path()),
        )
    };
    serve(
        app,
        request,
        Keep::Head(UPLOAD_HEAD),
        operation,
        |incoming, caller| json_response(200, answers::file(caller, incoming)),
    )
    .await
}

async fn models(State(app): State<App>, request: Request) -> Response {
    let operation = |_: &Incoming| {
        Operation::new(
            "Microsoft.CognitiveServices/accounts/OpenAI/models/read",
            "GET /openai/v1/models",
        )
    };
    serve(app, request, Keep::Head(0), operation, |_, caller| {
        json_response(200, answers::models(caller))
    })
    .await
}

/// A Foundry project endpoint (`https://<account>.services.ai.azure.com/api/projects/<project>/…`).
async fn project(State(app): State<App>, request: Request) -> Response {
    let operation = |incoming: &Incoming| {
        let read = matches!(incoming.method.as_str(), "GET" | "HEAD");
        Operation {
            action: if read {
                "Microsoft.CognitiveServices/accounts/AIServices/agents/read"
            } else {
                "Microsoft.CognitiveServices/accounts/AIServices/agents/write"
            },
            named: format!("{} {}", incoming.method, incoming.uri.path()),
        }
    };
    serve(app, request, Keep::Head(0), operation, |_, caller| {
        json_response(
            200,
            json!({"object": "list", "data": [], "x_emulator_caller": caller}),
        )
    })
    .await
}

/// An Azure ML managed online endpoint with `auth_mode: aad_token`
/// (`https://<endpoint>.<region>.inference.ml.azure.com/score`).
async fn score(State(app): State<App>, request: Request) -> Response {
    let operation = |_: &Incoming| {
        Operation::new(
            "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/score/action",
            "POST /score",
        )
    };
    serve(app, request, Keep::All, operation, |incoming, caller| {
        json_response(
            200,
            scoring(caller, &String::from_utf8_lossy(&incoming.body)),
        )
    })
    .await
}

/// What a data plane decided about one request.
pub(crate) enum Outcome {
    /// Let through; the caller is the token's `oid`, or `api-key`.
    Let {
        caller: String,
    },
    Refused {
        status: u16,
        body: Value,
    },
}

/// One request judged, not yet recorded nor answered.
pub(crate) struct Judged {
    pub(crate) seen: Seen,
    pub(crate) outcome: Outcome,
    settings: Settings,
}

impl Judged {
    /// Refuse a request that was let through, for a reason the room found.
    pub(crate) fn refuse(&mut self, verdict: Verdict, status: u16, body: Value) {
        self.seen.verdict = verdict;
        self.outcome = Outcome::Refused { status, body };
    }

    /// Record the request and answer it: `answer(caller)` when it was let
    /// through, the refusal's JSON otherwise, `Settings::upstream_reply`
    /// whenever that is set.
    pub(crate) fn finish(
        self,
        app: &App,
        incoming: &Incoming,
        answer: impl FnOnce(&str) -> Response,
    ) -> Response {
        let Judged {
            seen,
            outcome,
            settings,
        } = self;
        if let Some(raw) = settings.upstream_reply {
            let status = match outcome {
                Outcome::Let { .. } => 200,
                Outcome::Refused { status, .. } => status,
            };
            app.record(incoming, status, seen);
            return raw.into_response();
        }
        let response = match outcome {
            Outcome::Let { caller } => answer(&caller),
            Outcome::Refused { status, body } => {
                let mut response = json_response(status, body);
                if settings.compress_errors {
                    response.headers_mut().insert(
                        "content-encoding",
                        axum::http::HeaderValue::from_static("gzip"),
                    );
                }
                response
            }
        };
        app.record(incoming, response.status().as_u16(), seen);
        response
    }
}

/// Judge one data-plane request by `credential`, as Azure OpenAI does
/// (AZURE_FACTS.md §3): firewall, regional endpoint, key or token, tenant,
/// role.
pub(crate) fn judge(
    app: &App,
    incoming: &Incoming,
    operation: &Operation,
    credential: Credential<'_>,
) -> Judged {
    let (settings, public_key) = {
        let world = app.shared.world();
        (world.settings.clone(), world.key.public_key())
    };
    let host = incoming.host();
    let audience = audience_for(host, incoming.uri.path(), &settings.accepted_audience);
    let bearer = bearer(&incoming.headers);
    let mut seen = Seen {
        verdict: Verdict::Ok,
        token_exp: None,
        token_oid: None,
        token_aud: bearer.and_then(unverified_aud),
        expected_audience: Some(audience.clone()),
    };
    let refused =
        |verdict: Verdict, status: u16, body: Value| (verdict, Outcome::Refused { status, body });
    let let_through = |caller: &str| {
        (
            Verdict::Ok,
            Outcome::Let {
                caller: caller.to_owned(),
            },
        )
    };
    // A regional endpoint, not the resource's custom subdomain.
    let regional = bare_host(host).contains(".api.cognitive.microsoft.com");
    let (verdict, outcome) = if settings.network_rule_denies {
        refused(
            Verdict::NetworkRule,
            403,
            json!({"error": {"code": "403", "message": "Access denied due to Virtual Network/Firewall rules."}}),
        )
    } else if bearer.is_some() && regional {
        refused(
            Verdict::SubdomainRequired,
            400,
            json!({"error": {"code": "BadRequest", "message": "Please provide a custom subdomain for token authentication, otherwise API key is required."}}),
        )
    } else {
        match credential {
            Credential::Key(_) if settings.local_auth_disabled => refused(
                Verdict::KeyAuthDisabled,
                403,
                json!({"error": {"code": "AuthenticationTypeDisabled", "message": "Key based authentication is disabled for this resource."}}),
            ),
            Credential::Key(key)
                if key == settings.api_key
                    || settings.secondary_api_key.as_deref() == Some(key) =>
            {
                let_through("api-key")
            }
            Credential::Key(_) => refused(
                Verdict::InvalidKey,
                401,
                json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}),
            ),
            Credential::Bearer(token) => {
                let unauthorized = json!({"statusCode": 401, "message": format!("Unauthorized. Access token is missing, invalid, audience is incorrect ({audience}), or have expired.")});
                match token.map(|t| (t, check_token(&public_key, &audience, t))) {
                    None => refused(Verdict::MissingToken, 401, unauthorized),
                    Some((token, Err(verdict))) => {
                        seen.token_exp = unverified_exp(token);
                        refused(verdict, 401, unauthorized)
                    }
                    Some((_, Ok(claims))) => {
                        seen.token_exp = claims.expires_at.map(|t| t.as_secs());
                        let oid = claims.custom.oid;
                        let tid = claims.custom.tid;
                        seen.token_oid = Some(oid.clone());
                        if !tid.eq_ignore_ascii_case(&settings.resource_tenant) {
                            refused(
                                Verdict::TenantMismatch,
                                400,
                                json!({"error": {"code": "Tenant provided in token does not match resource token", "message": format!("Token tenant {tid} does not match resource tenant.")}}),
                            )
                        } else if settings.role_holders.contains(&oid) {
                            let_through(&oid)
                        } else {
                            let message = if settings.permission_denied_names_principal {
                                format!("The principal `{oid}` lacks the required data action `{}` to perform `{}` operation.", operation.action, operation.named)
                            } else {
                                "Principal does not have access to API/Operation.".to_owned()
                            };
                            refused(
                                Verdict::PermissionDenied,
                                401,
                                json!({"error": {"code": "PermissionDenied", "message": message}}),
                            )
                        }
                    }
                }
            }
        }
    };
    seen.verdict = verdict;
    Judged {
        seen,
        outcome,
        settings,
    }
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
