//! The IMDS managed-identity token endpoint of an Azure VM (AZURE_FACTS.md §1):
//! `GET /metadata/identity/oauth2/token`.
//!
//! It checks `Metadata: true`, refuses `X-Forwarded-For`, a missing
//! `api-version` or `resource` and a `/.default` scope, and selects the
//! identity as Azure does (system-assigned, the only user-assigned one, or by
//! `client_id` / `object_id` / `msi_res_id`). Tokens come from
//! [`crate::tokens`]; the answer has every field as a JSON string. Tests can
//! script failures, delays and exact bytes ([`ImdsReply`]), model an outage
//! (`Settings::imds_failure`) and IMDS's own token cache
//! (`Settings::imds_caches_tokens`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use serde_json::json;

use crate::tokens::mint;
use crate::{header_list, now_ms, App, Identity, RawReply, Shared};

/// What IMDS does with one token request.
#[derive(Debug, Clone)]
pub enum ImdsReply {
    /// Mint a token for the selected identity (the default when nothing is scripted).
    Token,
    /// Answer with this status and body.
    Raw { status: u16, body: String },
    /// Answer with exactly these bytes.
    Exact(RawReply),
    /// Wait, then answer as `then` does: longer than the caller's timeout is a timeout.
    Slow { delay_ms: u64, then: Box<ImdsReply> },
}

impl ImdsReply {
    pub fn error(status: u16, error: &str, description: &str) -> ImdsReply {
        ImdsReply::Raw {
            status,
            body: json!({"error": error, "error_description": description}).to_string(),
        }
    }
}

/// One request as IMDS received it.
#[derive(Debug, Clone, Serialize)]
pub struct ImdsRequest {
    /// When the request arrived and when it was answered.
    pub arrived_ms: u64,
    pub at_ms: u64,
    pub query: HashMap<String, String>,
    pub headers: Vec<(String, String)>,
    pub status: u16,
}

pub(crate) fn routes() -> Router<App> {
    Router::new().route("/metadata/identity/oauth2/token", get(token))
}

/// Counts a request in flight for as long as it lives, even when the client
/// hangs up and the server drops the handler halfway.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(shared: &Arc<Shared>) -> InFlight {
        let mut world = shared.world();
        world.imds_in_flight += 1;
        world.imds_arrived += 1;
        world.imds_max_in_flight = world.imds_max_in_flight.max(world.imds_in_flight);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.world().imds_in_flight -= 1;
    }
}

async fn token(
    State(app): State<App>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let _in_flight = InFlight::enter(&app.shared);
    let arrived_ms = now_ms();
    let (delay, mut reply) = {
        let mut world = app.shared.world();
        let reply = match &world.settings.imds_failure {
            Some(failure) => failure.clone(),
            None => world.script.pop_front().unwrap_or(ImdsReply::Token),
        };
        (world.settings.imds_delay_ms, reply)
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    while let ImdsReply::Slow { delay_ms, then } = reply {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        reply = *then;
    }
    if let ImdsReply::Exact(raw) = reply {
        let status = raw.status;
        app.shared.world().imds.push(ImdsRequest {
            arrived_ms,
            at_ms: now_ms(),
            query: query.clone(),
            headers: header_list(&headers),
            status,
        });
        return raw.into_response();
    }
    let (status, body) = answer(&app.shared, &query, &headers, reply);
    let mut world = app.shared.world();
    world.imds.push(ImdsRequest {
        arrived_ms,
        at_ms: now_ms(),
        query: query.clone(),
        headers: header_list(&headers),
        status,
    });
    if app.verbose {
        let selector = ["client_id", "object_id", "msi_res_id"]
            .iter()
            .find_map(|k| query.get(*k).map(|v| format!(" {k}={v}")))
            .unwrap_or_default();
        println!(
            "[emulator] IMDS  GET token resource={}{selector} -> {status}",
            query.get("resource").map_or("-", String::as_str)
        );
    }
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [("content-type", "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

fn invalid_request(description: &str) -> (u16, String) {
    let body = json!({"error": "invalid_request", "error_description": description});
    (400, body.to_string())
}

fn answer(
    shared: &Shared,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    reply: ImdsReply,
) -> (u16, String) {
    if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
        return invalid_request("Required metadata header not specified");
    }
    if headers.contains_key("x-forwarded-for") {
        return invalid_request(
            "Request contains X-Forwarded-For header, which is not allowed for IMDS",
        );
    }
    if query.get("api-version").is_none() {
        return invalid_request("Required queryparam 'api-version' is missing");
    }
    let Some(resource) = query.get("resource") else {
        return invalid_request("Required queryparam 'resource' is missing");
    };
    if resource.ends_with("/.default") {
        return (
            400,
            json!({"error": "invalid_resource", "error_description": format!("AADSTS500011: The resource principal named {resource} was not found in the tenant.")}).to_string(),
        );
    }
    if let ImdsReply::Raw { status, body } = reply {
        return (status, body);
    }
    let mut world = shared.world();
    let settings = &world.settings;
    let all: Vec<&Identity> = settings
        .system_identity
        .iter()
        .chain(settings.user_identities.iter())
        .collect();
    let by = |pick: fn(&Identity) -> &String, key: &str| {
        query.get(key).map(|wanted| {
            all.iter()
                .find(|i| pick(i).eq_ignore_ascii_case(wanted))
                .copied()
        })
    };
    let chosen = by(|i| &i.client_id, "client_id")
        .or_else(|| by(|i| &i.object_id, "object_id"))
        .or_else(|| by(|i| &i.resource_id, "msi_res_id"));
    let identity = match chosen {
        Some(Some(identity)) => identity.clone(),
        Some(None) => return invalid_request("Identity not found"),
        None => match (&settings.system_identity, settings.user_identities.as_slice()) {
            (Some(system), _) => system.clone(),
            (None, [only]) => only.clone(),
            (None, []) => return invalid_request("Identity not found"),
            (None, _) => {
                return invalid_request("Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request")
            }
        },
    };
    let lifetime = settings.token_lifetime_s;
    let now = now_ms() / 1000;
    let cache_key = (identity.client_id.clone(), resource.clone());
    let cached = world
        .imds_cache
        .get(&cache_key)
        .filter(|(_, expires_on)| settings.imds_caches_tokens && *expires_on > now)
        .cloned();
    let (token, expires_on) = match cached {
        Some(hit) => hit,
        None => {
            let token = mint(
                &world.key,
                &identity,
                resource,
                lifetime,
                settings.token_padding,
            );
            world.minted += 1;
            world.minted_tokens.push(token.clone());
            world
                .imds_cache
                .insert(cache_key, (token.clone(), now + lifetime));
            (token, now + lifetime)
        }
    };
    (
        200,
        json!({
            "access_token": token,
            "refresh_token": "",
            "expires_in": expires_on.saturating_sub(now).to_string(),
            "expires_on": expires_on.to_string(),
            "ext_expires_in": expires_on.saturating_sub(now).to_string(),
            "not_before": now.to_string(),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": identity.client_id,
        })
        .to_string(),
    )
}
