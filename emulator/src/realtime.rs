//! The Realtime API over WebSocket (AZURE_FACTS.md §3): `GET
//! /openai/realtime?api-version=…&deployment=…` (preview) and `GET
//! /openai/v1/realtime?model=…` (GA).
//!
//! The handshake is judged like any data-plane request, by the first of: a
//! bearer token in `Authorization`, an `api-key` header, an `api-key` query
//! parameter (browsers cannot set headers on a WebSocket). A refused
//! handshake gets the plain JSON refusal with its status and no upgrade. An
//! accepted request that is not a WebSocket upgrade gets 400
//! `{"statusCode":400,"message":"Invalid websocket upgrade request"}`, the
//! answer an Azure OpenAI realtime URL was reported giving a plain request
//! (pipecat-ai/pipecat#1167); Azure's order of the two checks is not known,
//! credentials are judged first here.
//!
//! An accepted upgrade completes the RFC 6455 handshake (choosing the
//! `realtime` subprotocol when the client offers it), then the server sends
//! `{"type":"session.created","session":{"model":…},"x_emulator_caller":…}`
//! and answers each text message with `{"type":"echo","data":<the text>}`
//! until the client closes.

use std::collections::HashMap;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, Request, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::incoming::{Incoming, Keep};
use crate::judge::{bearer, judge, Credential, Operation, Outcome, Verdict};
use crate::{json_response, App};

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/openai/realtime", get(preview))
        .route("/openai/v1/realtime", get(ga))
}

type Upgrade = Result<WebSocketUpgrade, WebSocketUpgradeRejection>;

async fn preview(State(app): State<App>, upgrade: Upgrade, request: Request) -> Response {
    handshake(app, upgrade, request, "deployment").await
}

async fn ga(State(app): State<App>, upgrade: Upgrade, request: Request) -> Response {
    handshake(app, upgrade, request, "model").await
}

/// The credential of a handshake: bearer token, else `api-key` header, else
/// `api-key` query parameter.
fn handshake_credential<'a>(
    incoming: &'a Incoming,
    query: &'a HashMap<String, String>,
) -> Credential<'a> {
    if let Some(token) = bearer(&incoming.headers) {
        return Credential::Bearer(Some(token));
    }
    let header_key = incoming
        .headers
        .get("api-key")
        .and_then(|v| v.to_str().ok());
    match header_key.or_else(|| query.get("api-key").map(String::as_str)) {
        Some(key) => Credential::Key(key),
        None => Credential::Bearer(None),
    }
}

/// Judge a handshake; upgrade it when accepted, with the model named by the
/// query parameter `model_parameter`.
async fn handshake(
    app: App,
    upgrade: Upgrade,
    request: Request,
    model_parameter: &str,
) -> Response {
    let incoming = match Incoming::read(request, Keep::Head(0)).await {
        Ok(incoming) => incoming,
        Err(refused) => return refused,
    };
    let query = Query::<HashMap<String, String>>::try_from_uri(&incoming.uri)
        .map(|Query(query)| query)
        .unwrap_or_default();
    let model = query.get(model_parameter).cloned().unwrap_or_default();
    let operation = Operation {
        action: "Microsoft.CognitiveServices/accounts/OpenAI/deployments/realtime/action",
        named: format!("GET {}", incoming.uri.path()),
    };
    let mut judged = judge(
        &app,
        &incoming,
        &operation,
        handshake_credential(&incoming, &query),
    );
    let not_an_upgrade =
        || json!({"statusCode": 400, "message": "Invalid websocket upgrade request"});
    let upgrade = upgrade.ok();
    if matches!(judged.outcome, Outcome::Let { .. }) && upgrade.is_none() {
        judged.refuse(Verdict::NotWebSocket, 400, not_an_upgrade());
    }
    judged.finish(&app, &incoming, |caller| match upgrade {
        Some(upgrade) => {
            let caller = caller.to_owned();
            upgrade
                .protocols(["realtime"])
                .on_upgrade(move |socket| session(socket, model, caller))
        }
        None => json_response(400, not_an_upgrade()),
    })
}

/// The emulated realtime session: `session.created`, then an echo of every
/// text message until the client closes.
async fn session(mut socket: WebSocket, model: String, caller: String) {
    let created = json!({
        "type": "session.created",
        "event_id": "event_emulator_0",
        "session": {"id": "sess_emulator", "object": "realtime.session", "model": model},
        "x_emulator_caller": caller,
    });
    if socket
        .send(Message::Text(created.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    // Read until the stream ends, so that the reply to the client's close
    // frame is flushed before the connection is dropped.
    while let Some(Ok(message)) = socket.recv().await {
        if let Message::Text(text) = message {
            let echo = json!({"type": "echo", "data": text.as_str()});
            if socket
                .send(Message::Text(echo.to_string().into()))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, Method, Uri};

    fn incoming(headers: &[(&'static str, &'static str)]) -> Incoming {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, value.parse().unwrap());
        }
        Incoming {
            method: Method::GET,
            uri: Uri::from_static("/openai/v1/realtime?model=m"),
            headers: map,
            body: Vec::new(),
            body_len: 0,
            body_sha256: String::new(),
        }
    }

    #[test]
    fn a_handshake_is_judged_by_bearer_then_key_header_then_key_query() {
        let query = HashMap::from([("api-key".to_owned(), "q".to_owned())]);
        let both = incoming(&[("authorization", "Bearer t"), ("api-key", "h")]);
        assert_eq!(
            handshake_credential(&both, &query),
            Credential::Bearer(Some("t"))
        );
        let header = incoming(&[("api-key", "h")]);
        assert_eq!(handshake_credential(&header, &query), Credential::Key("h"));
        let bare = incoming(&[]);
        assert_eq!(handshake_credential(&bare, &query), Credential::Key("q"));
        assert_eq!(
            handshake_credential(&bare, &HashMap::new()),
            Credential::Bearer(None)
        );
    }
}
