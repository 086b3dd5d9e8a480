//! The emulator's own surface, which no Azure service has: the `/_emulator/*`
//! control and recording endpoints of the standalone binary, and the echo
//! that answers every path no room claims.
//!
//! * `GET /_emulator/requests`: what IMDS and the data planes received, with
//!   secrets shortened by [`crate::redact`].
//! * `POST /_emulator/imds/script`: queue IMDS replies,
//!   `[{"status":500,"error":"…","error_description":"…"}, {"token":true}]`.
//! * anything else: recorded with the verdict `Echoed` and answered with the
//!   method, path and headers that arrived (or `Settings::upstream_reply`).

use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::incoming::{Incoming, Keep};
use crate::judge::{bearer, Verdict};
use crate::tokens::unverified_aud;
use crate::{header_list, json_response, redact, App, ImdsReply, Seen};

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/_emulator/requests", get(recorded))
        .route("/_emulator/imds/script", post(script))
}

/// Any request no room claims: recorded (its body hashed, not kept), then
/// echoed back.
pub(crate) async fn echo(State(app): State<App>, request: Request) -> Response {
    let incoming = match Incoming::read(request, Keep::Head(0)).await {
        Ok(incoming) => incoming,
        Err(refused) => return refused,
    };
    let (method, uri, headers) = (&incoming.method, &incoming.uri, &incoming.headers);
    let scripted = app.shared.world().settings.upstream_reply.clone();
    let seen = Seen {
        verdict: Verdict::Echoed,
        token_exp: None,
        token_oid: None,
        token_aud: bearer(headers).and_then(unverified_aud),
        expected_audience: None,
    };
    app.record(&incoming, 200, seen);
    if let Some(raw) = scripted {
        return raw.into_response();
    }
    json_response(
        200,
        json!({"echo": {"method": method.as_str(), "path": uri.path(), "headers": header_list(headers)}}),
    )
}

/// What the upstream received, with secrets shortened (for the demo).
async fn recorded(State(app): State<App>) -> Response {
    let world = app.shared.world();
    let shorten = |headers: &[(String, String)]| -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(n, v)| match n.as_str() {
                "authorization" | "api-key" => (n.clone(), redact(v)),
                _ => (n.clone(), v.clone()),
            })
            .collect()
    };
    let upstream: Vec<Value> = world
        .upstream
        .iter()
        .map(|r| {
            json!({
                "method": r.method,
                "host": r.host,
                "path": r.path,
                "query": r.query,
                "body_len": r.body_len,
                "body_sha256": r.body_sha256,
                "websocket": r.websocket,
                "verdict": r.verdict,
                "token_aud": r.token_aud,
                "expected_audience": r.expected_audience,
                "headers": shorten(&r.headers),
            })
        })
        .collect();
    let imds: Vec<Value> = world
        .imds
        .iter()
        .map(|r| json!({"query": r.query, "headers": r.headers, "status": r.status}))
        .collect();
    json_response(
        200,
        json!({"imds": imds, "upstream": upstream, "tokens_minted": world.minted, "imds_max_concurrency": world.imds_max_in_flight}),
    )
}

/// `[{"status":500,"error":"…","error_description":"…"}, {"token":true}]`
async fn script(State(app): State<App>, Json(steps): Json<Vec<Value>>) -> Response {
    let replies = steps
        .iter()
        .map(|step| match step.get("status").and_then(Value::as_u64) {
            Some(status) => ImdsReply::error(
                status as u16,
                step.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("server_error"),
                step.get("error_description")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
            ),
            None => ImdsReply::Token,
        });
    app.shared.world().script.extend(replies);
    json_response(200, json!({"queued": steps.len()}))
}
