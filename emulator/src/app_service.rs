//! The managed-identity endpoint of App Service, Functions and Container
//! Apps (AZURE_FACTS.md §2): what the platform serves at
//! `IDENTITY_ENDPOINT`, here `GET /msi/token`.
//!
//! A request needs `api-version=2019-08-01`, `resource` (the bare App ID
//! URI) and the header `X-IDENTITY-HEADER` equal to
//! `Settings::identity_header` (the platform's `IDENTITY_HEADER`). At most
//! one selector names the identity: `client_id`, `principal_id` (alias
//! `object_id`) or `mi_res_id`; `msi_res_id` is IMDS's name and is ignored
//! here as an unknown parameter. The identities are IMDS's table
//! (`Settings::system_identity`, `Settings::user_identities`). Without a
//! selector the system-assigned identity answers; unlike IMDS, a lone
//! user-assigned identity is **not** picked by default (App Service answers
//! 400 then, as reported in azure-functions-host#8037 and
//! azure-sdk-for-net#11400).
//!
//! The answer is `{"access_token","expires_on","resource","token_type","client_id"}`
//! with `expires_on` in epoch seconds as a **string** and no `expires_in`;
//! tokens are minted like IMDS's and counted with them. Errors have the
//! platform's shape `{"statusCode":<n>,"message":"…","correlationId":"<uuid>"}`
//! with `content-type: application/json; charset=utf-8` and an
//! `X-CORRELATION-ID` header (both as the real service, a Kestrel server,
//! sends them):
//!
//! | case | status | message |
//! |---|---|---|
//! | no identity chosen among user-assigned ones, or the chosen one unknown | 400 | `Unable to load the proper Managed Identity.` (confirmed, azure-sdk-for-net#43691) |
//! | `resource` ending in `/.default` (a resource Entra does not know) | 500 | `An unexpected error occured while fetching the AAD Token.` (sic; confirmed, azure-sdk-for-net#44685) |
//! | `X-IDENTITY-HEADER` missing or wrong | 401 | written here |
//! | `api-version` missing or not `2019-08-01`, `resource` missing, several selectors, no identity at all | 400 | written here |
//!
//! The messages marked "written here" are the emulator's own: no public
//! source quotes the platform's text for them (App Service was seen answering
//! a wrong header with 401, Container Apps with an empty 403).
//!
//! Tests script replies as for IMDS ([`Emulator::script_app_service`]):
//! `ImdsReply::Exact` and `Slow` apply before any check, `ImdsReply::Raw`
//! (e.g. [`app_service_error`]) after the header and parameter checks.
//! `X-IDENTITY-HEADER` is a secret: it is recorded for tests, never printed.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::credentials::fresh_id;
use crate::tokens::mint;
use crate::{header_list, now_ms, App, Emulator, Identity, ImdsReply, ImdsRequest, Shared};

/// The one api-version this endpoint serves.
pub const APP_SERVICE_API_VERSION: &str = "2019-08-01";

/// The selectors App Service knows, in the order they are looked at.
const SELECTORS: [&str; 4] = ["client_id", "principal_id", "object_id", "mi_res_id"];

pub(crate) fn routes() -> Router<App> {
    Router::new().route("/msi/token", get(token))
}

/// A scripted reply in App Service's error shape.
pub fn app_service_error(status: u16, message: &str) -> ImdsReply {
    ImdsReply::Raw {
        status,
        body: json!({"statusCode": status, "message": message, "correlationId": fresh_id()})
            .to_string(),
    }
}

/// Wait out `Slow` replies; what is left is the reply to give.
pub(crate) async fn settle(mut reply: ImdsReply) -> ImdsReply {
    while let ImdsReply::Slow { delay_ms, then } = reply {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        reply = *then;
    }
    reply
}

async fn token(
    State(app): State<App>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let arrived_ms = now_ms();
    let reply = app
        .shared
        .world()
        .identity
        .app_service_script
        .pop_front()
        .unwrap_or(ImdsReply::Token);
    let reply = settle(reply).await;
    let correlation = fresh_id();
    let (status, response) = match reply {
        ImdsReply::Exact(raw) => (raw.status, raw.into_response()),
        reply => {
            let (status, body) = answer(&app.shared, &query, &headers, reply, &correlation);
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let response = (
                code,
                [
                    ("content-type", "application/json; charset=utf-8"),
                    ("x-correlation-id", correlation.as_str()),
                ],
                body,
            )
                .into_response();
            (status, response)
        }
    };
    if app.verbose {
        let selector = SELECTORS
            .iter()
            .find_map(|k| query.get(*k).map(|v| format!(" {k}={v}")))
            .unwrap_or_default();
        println!(
            "[emulator] APPSVC GET /msi/token resource={}{selector} -> {status}",
            query.get("resource").map_or("-", String::as_str)
        );
    }
    app.shared
        .world()
        .identity
        .app_service_requests
        .push(ImdsRequest {
            arrived_ms,
            at_ms: now_ms(),
            query,
            headers: header_list(&headers),
            status,
        });
    response
}

fn failure(status: u16, message: &str, correlation: &str) -> (u16, String) {
    let body = json!({"statusCode": status, "message": message, "correlationId": correlation});
    (status, body.to_string())
}

fn answer(
    shared: &Shared,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    reply: ImdsReply,
    correlation: &str,
) -> (u16, String) {
    let expected = shared.world().settings.identity_header.clone();
    let presented = headers
        .get("x-identity-header")
        .map(|v| v.as_bytes() == expected.as_bytes());
    if presented != Some(true) {
        return failure(
            401,
            "Unauthorized. The X-IDENTITY-HEADER header is missing or does not match IDENTITY_HEADER.",
            correlation,
        );
    }
    match query.get("api-version").map(String::as_str) {
        Some(APP_SERVICE_API_VERSION) => {}
        Some(other) => {
            return failure(
                400,
                &format!("The api-version '{other}' is not supported. Use api-version={APP_SERVICE_API_VERSION}."),
                correlation,
            )
        }
        None => {
            return failure(
                400,
                &format!("The api-version query parameter is missing. Use api-version={APP_SERVICE_API_VERSION}."),
                correlation,
            )
        }
    }
    let Some(resource) = query.get("resource").filter(|r| !r.is_empty()) else {
        return failure(400, "The resource query parameter is missing.", correlation);
    };
    if resource.ends_with("/.default") {
        return failure(
            500,
            "An unexpected error occured while fetching the AAD Token.",
            correlation,
        );
    }
    if let ImdsReply::Raw { status, body } = reply {
        return (status, body);
    }
    let selectors: Vec<(&str, &String)> = SELECTORS
        .iter()
        .filter_map(|k| query.get(*k).filter(|v| !v.is_empty()).map(|v| (*k, v)))
        .collect();
    let mut world = shared.world();
    let settings = &world.settings;
    let all: Vec<&Identity> = settings
        .system_identity
        .iter()
        .chain(settings.user_identities.iter())
        .collect();
    let identity = match selectors.as_slice() {
        [] => match (&settings.system_identity, all.is_empty()) {
            (Some(system), _) => system.clone(),
            (None, true) => {
                return failure(
                    400,
                    "No managed identity is enabled for this app.",
                    correlation,
                )
            }
            (None, false) => {
                return failure(
                    400,
                    "Unable to load the proper Managed Identity.",
                    correlation,
                )
            }
        },
        [(selector, wanted)] => {
            let found = all.iter().find(|i| {
                let value = match *selector {
                    "client_id" => &i.client_id,
                    "mi_res_id" => &i.resource_id,
                    _ => &i.object_id,
                };
                value.eq_ignore_ascii_case(wanted)
            });
            match found {
                Some(identity) => (*identity).clone(),
                None => {
                    return failure(
                        400,
                        "Unable to load the proper Managed Identity.",
                        correlation,
                    )
                }
            }
        }
        _ => {
            return failure(
                400,
                "Only one of client_id, principal_id (object_id) and mi_res_id may be given.",
                correlation,
            )
        }
    };
    let lifetime = settings.token_lifetime_s;
    let token = mint(
        &world.key,
        &identity,
        resource,
        lifetime,
        settings.token_padding,
    );
    world.minted += 1;
    world.minted_tokens.push(token.clone());
    let expires_on = now_ms() / 1000 + lifetime;
    (
        200,
        json!({
            "access_token": token,
            "expires_on": expires_on.to_string(),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": identity.client_id,
        })
        .to_string(),
    )
}

/// Scripting and recording of the App Service identity endpoint.
impl Emulator {
    /// Queue replies for the next App Service token requests, in order
    /// (`ImdsReply::Token` mints as usual; see the module for when each
    /// kind applies).
    pub fn script_app_service(&self, replies: impl IntoIterator<Item = ImdsReply>) {
        self.shared
            .world()
            .identity
            .app_service_script
            .extend(replies);
    }

    /// Every request the App Service identity endpoint received.
    pub fn app_service_requests(&self) -> Vec<ImdsRequest> {
        self.shared.world().identity.app_service_requests.clone()
    }
}
