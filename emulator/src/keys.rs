//! A reference key service, for the filter's `http` token source: a local
//! service that hands out a rotating key or token. `GET /keyservice/key`
//! reads `Settings::key_file` anew on every request (as an ops-rotated file,
//! or a Kubernetes secret swapped in through a `..data` symlink) and answers
//! `{"key":"<contents, surrounding whitespace trimmed>"}`, plus
//! `"expires_in": <n>` when `Settings::key_expires_in_s` is set.
//!
//! * no file configured: 404 `{"error":"not_found"}`;
//! * the file cannot be read, is not UTF-8, or holds only whitespace (a
//!   rotation caught halfway): 503 `{"error":"unavailable"}`.
//!
//! The key is never printed.

use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::{json_response, App, Emulator};

pub(crate) fn routes() -> Router<App> {
    Router::new().route("/keyservice/key", get(key))
}

async fn key(State(app): State<App>) -> Response {
    let (file, expires_in) = {
        let mut world = app.shared.world();
        world.identity.key_requests += 1;
        (
            world.settings.key_file.clone(),
            world.settings.key_expires_in_s,
        )
    };
    let (status, body) = match file {
        None => (404, json!({"error": "not_found"})),
        Some(path) => match std::fs::read_to_string(&path) {
            Ok(contents) if !contents.trim().is_empty() => {
                let mut body = json!({"key": contents.trim()});
                if let Some(n) = expires_in {
                    body["expires_in"] = json!(n);
                }
                (200, body)
            }
            _ => (503, json!({"error": "unavailable"})),
        },
    };
    if app.verbose {
        println!("[emulator] KEYS  GET /keyservice/key -> {status}");
    }
    json_response(status, body)
}

/// Recording of the key service.
impl Emulator {
    /// How many requests the key service has answered.
    pub fn key_requests(&self) -> usize {
        self.shared.world().identity.key_requests
    }
}
