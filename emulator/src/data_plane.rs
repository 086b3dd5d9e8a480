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
use axum::response::Response;
use axum::routing::{any, get, post};
use axum::Router;
use serde_json::{json, Value};

use crate::answers;
use crate::control::echo;
use crate::incoming::{Incoming, Keep};
use crate::judge::{header_credential, judge, Operation};
use crate::{json_response, App, BODY_LIMIT};

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
    use crate::judge::audience_for;
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
