//! The Entra ID v2.0 token endpoint, `POST /{tenant}/oauth2/v2.0/token`
//! (AZURE_FACTS.md §2, "Entra client credentials").
//!
//! Today it grants `client_credentials` only: a form POST, answered with JSON
//! whose `expires_in` is a **number** (unlike IMDS). Any tenant, client id and
//! secret are accepted and the token is the system identity's, for the
//! resource named by `scope` without its `/.default`.

use std::collections::HashMap;

use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use serde_json::json;

use crate::tokens::mint;
use crate::{json_response, App, Identity, RESOURCE};

pub(crate) fn routes() -> Router<App> {
    Router::new().route("/{tenant}/oauth2/v2.0/token", post(token))
}

async fn token(State(app): State<App>, body: String) -> Response {
    let form: HashMap<String, String> = body
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%3A", ":").replace("%2F", "/")))
        .collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return json_response(
            400,
            json!({"error": "unsupported_grant_type", "error_description": "AADSTS70003: The app requested an unsupported grant type."}),
        );
    }
    let audience = form
        .get("scope")
        .map(|s| s.trim_end_matches("/.default").to_owned())
        .unwrap_or_else(|| RESOURCE.to_owned());
    let mut world = app.shared.world();
    let lifetime = world.settings.token_lifetime_s;
    let identity = world
        .settings
        .system_identity
        .clone()
        .unwrap_or_else(Identity::system);
    let token = mint(
        &world.key,
        &identity,
        &audience,
        lifetime,
        world.settings.token_padding,
    );
    world.minted += 1;
    json_response(
        200,
        json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token}),
    )
}
