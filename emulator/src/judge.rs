//! How every data plane judges a request, as Azure OpenAI does
//! (AZURE_FACTS.md §3), and which audience a host and path take: shared by
//! the HTTP data planes (`data_plane.rs`), the Realtime handshake
//! (`realtime.rs`) and the echo of everything else (`control.rs`), none of
//! which imports another for it.

use axum::http::HeaderMap;
use axum::response::Response;
use serde::Serialize;
use serde_json::{json, Value};

use crate::incoming::Incoming;
use crate::tokens::{check_token, unverified_aud, unverified_exp};
use crate::{
    json_response, App, Seen, Settings, AI_RESOURCE, CHINA_RESOURCE, ML_RESOURCE, US_GOV_RESOURCE,
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
    pub(crate) fn new(action: &'static str, named: &str) -> Operation {
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
