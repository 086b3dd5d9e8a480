//! A local Azure for aoai-msi-filter: the IMDS managed-identity token endpoint
//! and the Azure OpenAI data plane, behaving as `shared/AZURE_FACTS.md` says.
//!
//! * IMDS (`GET /metadata/identity/oauth2/token`) checks `Metadata: true`,
//!   refuses `X-Forwarded-For`, a missing `api-version` or `resource`, a
//!   `/.default` scope, and selects the identity as Azure does (system-assigned,
//!   the only user-assigned one, or by `client_id` / `object_id` /
//!   `msi_res_id`). It mints RS256 JWTs with `aud`, `iss`, `oid`, `tid`,
//!   `appid`, `xms_mirid`, `iat`, `nbf`, `exp`, and answers with every field as
//!   a JSON string.
//! * Azure OpenAI (`POST /openai/deployments/{d}/chat/completions`,
//!   `POST /openai/v1/chat/completions`) refuses keys with 403
//!   `AuthenticationTypeDisabled` while local auth is off (the default),
//!   verifies bearer tokens by signature, audience and expiry (401
//!   `statusCode` body), checks the role (401 `PermissionDenied`) and answers
//!   with a valid chat-completion body.
//! * Everything else is echoed back with the headers that arrived.
//!
//! Every request is recorded. Tests script it through [`Emulator`]; the
//! standalone binary exposes the same through `/_emulator/*`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jwt_simple::prelude::*;
use jwt_simple::JWTError;
use serde::Serialize;
use serde_json::{json, Value};

pub const RESOURCE: &str = "https://cognitiveservices.azure.com";
pub const TENANT_ID: &str = "72f988bf-0000-4000-8000-00000000e1a0";
/// Role that grants `.../chat/completions/action` (Cognitive Services OpenAI User).
pub const OPENAI_USER_ROLE: &str = "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd";

/// A managed identity the emulated VM may have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub client_id: String,
    pub object_id: String,
    pub resource_id: String,
}

impl Identity {
    pub fn system() -> Identity {
        Identity {
            client_id: "a1b2c3d4-0000-4000-8000-000000000001".into(),
            object_id: "0b5e7c4a-0000-4000-8000-0000000000a1".into(),
            resource_id: "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1".into(),
        }
    }

    pub fn user(name: &str, n: u8) -> Identity {
        Identity {
            client_id: format!("c11e0000-0000-4000-8000-0000000000{n:02x}"),
            object_id: format!("0b1e0000-0000-4000-8000-0000000000{n:02x}"),
            resource_id: format!("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"),
        }
    }
}

/// An answer exactly as scripted: status, header bytes (which may be
/// anything a server can put on the wire), body bytes.
#[derive(Debug, Clone, Default)]
pub struct RawReply {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn json(status: u16, body: &str) -> RawReply {
        RawReply {
            status,
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            body: body.as_bytes().to_vec(),
        }
    }

    pub fn header(mut self, name: &str, value: &[u8]) -> RawReply {
        self.headers.push((name.to_owned(), value.to_vec()));
        self
    }

    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, self.body).into_response();
        let headers = response.headers_mut();
        headers.remove("content-type");
        for (name, value) in self.headers {
            if let (Ok(name), Ok(value)) = (
                axum::http::HeaderName::from_bytes(name.as_bytes()),
                axum::http::HeaderValue::from_bytes(&value),
            ) {
                headers.append(name, value);
            }
        }
        response
    }
}

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

/// How the Azure OpenAI endpoint judged one request.
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

/// One request as the upstream received it.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamRequest {
    pub at_ms: u64,
    pub method: String,
    pub host: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub verdict: Verdict,
    /// `exp` of a token that verified by signature, in seconds.
    pub token_exp: Option<u64>,
    pub token_oid: Option<String>,
}

impl UpstreamRequest {
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The emulated world, settable at any time.
#[derive(Debug, Clone)]
pub struct Settings {
    pub token_lifetime_s: u64,
    pub imds_delay_ms: u64,
    pub local_auth_disabled: bool,
    pub api_key: String,
    pub system_identity: Option<Identity>,
    pub user_identities: Vec<Identity>,
    /// Object ids holding a role that grants chat completions.
    pub role_holders: HashSet<String>,
    /// Extra bytes in each token's `aio` claim, to model larger real tokens.
    pub token_padding: usize,
    /// While set, every IMDS request gets this reply (an outage), before any script.
    pub imds_failure: Option<ImdsReply>,
    /// The audience Azure OpenAI accepts.
    pub accepted_audience: String,
    /// Refuse every data-plane request with the firewall's 403.
    pub network_rule_denies: bool,
    /// Send error bodies with `content-encoding: gzip` (as a gateway that
    /// compresses would); the bytes stay JSON, which is all the tests need.
    pub compress_errors: bool,
    /// While set, every request that is not IMDS, Entra or the emulator's own
    /// control gets exactly this answer (after it is recorded): a misbehaving
    /// upstream, or a service that is not Azure at all.
    pub upstream_reply: Option<RawReply>,
    /// IMDS hands out the same token for the same identity and resource until
    /// it expires, as the real one does (it caches tokens for about 24 h).
    pub imds_caches_tokens: bool,
}

impl Default for Settings {
    fn default() -> Self {
        let system = Identity::system();
        Settings {
            token_lifetime_s: 86_399,
            imds_delay_ms: 0,
            local_auth_disabled: true,
            api_key: "emulator-key-0000".into(),
            role_holders: HashSet::from([system.object_id.clone()]),
            system_identity: Some(system),
            user_identities: Vec::new(),
            token_padding: 0,
            imds_failure: None,
            accepted_audience: RESOURCE.to_owned(),
            network_rule_denies: false,
            compress_errors: false,
            upstream_reply: None,
            imds_caches_tokens: false,
        }
    }
}

struct World {
    settings: Settings,
    key: RS256KeyPair,
    script: VecDeque<ImdsReply>,
    imds: Vec<ImdsRequest>,
    upstream: Vec<UpstreamRequest>,
    imds_in_flight: usize,
    imds_max_in_flight: usize,
    minted: u64,
    /// Every token IMDS issued, so tests can look for them where they must not be.
    minted_tokens: Vec<String>,
    /// IMDS's token cache: (client id, resource) → (token, expires_on seconds).
    imds_cache: HashMap<(String, String), (String, u64)>,
}

struct Shared {
    world: Mutex<World>,
}

impl Shared {
    fn world(&self) -> MutexGuard<'_, World> {
        // A test thread that panicked while holding the lock must not hide
        // what the emulator recorded from the others.
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn new_signing_key() -> std::io::Result<RS256KeyPair> {
    static KEYS: AtomicU64 = AtomicU64::new(0);
    let n = KEYS.fetch_add(1, Ordering::Relaxed);
    RS256KeyPair::generate(2048)
        .map(|key| key.with_key_id(&format!("emulator-key-{n}")))
        .map_err(|e| std::io::Error::other(format!("cannot generate an RSA key: {e}")))
}

/// Counts a request in flight for as long as it lives, even when the client
/// hangs up and the server drops the handler halfway.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(shared: &Arc<Shared>) -> InFlight {
        let mut world = shared.world();
        world.imds_in_flight += 1;
        world.imds_max_in_flight = world.imds_max_in_flight.max(world.imds_in_flight);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.world().imds_in_flight -= 1;
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A running emulator on 127.0.0.1. Stops when dropped.
pub struct Emulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Emulator {
    /// Start on an ephemeral port of 127.0.0.1 with these settings.
    pub fn start(settings: Settings) -> std::io::Result<Emulator> {
        Emulator::start_on(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            settings,
            false,
        )
    }

    /// Start on `addr`. With `verbose`, print one line per request (the demo).
    pub fn start_on(
        addr: SocketAddr,
        settings: Settings,
        verbose: bool,
    ) -> std::io::Result<Emulator> {
        let key = new_signing_key()?;
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            world: Mutex::new(World {
                settings,
                key,
                script: VecDeque::new(),
                imds: Vec::new(),
                upstream: Vec::new(),
                imds_in_flight: 0,
                imds_max_in_flight: 0,
                minted: 0,
                minted_tokens: Vec::new(),
                imds_cache: HashMap::new(),
            }),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(shared.clone(), verbose);
        let thread = std::thread::Builder::new()
            .name("aoai-emulator".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("aoai-emulator: cannot start a runtime: {e}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("aoai-emulator: cannot listen: {e}");
                            return;
                        }
                    };
                    let served = axum::serve(listener, app).with_graceful_shutdown(async {
                        let _ = stopped.await;
                    });
                    if let Err(e) = served.await {
                        eprintln!("aoai-emulator: server stopped: {e}");
                    }
                });
            })?;
        Ok(Emulator {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Change the world; takes effect for the next request.
    pub fn configure(&self, change: impl FnOnce(&mut Settings)) {
        change(&mut self.shared.world().settings);
    }

    /// Queue replies for the next IMDS requests, in order.
    pub fn script_imds(&self, replies: impl IntoIterator<Item = ImdsReply>) {
        self.shared.world().script.extend(replies);
    }

    pub fn imds_requests(&self) -> Vec<ImdsRequest> {
        self.shared.world().imds.clone()
    }

    /// Token requests IMDS answered with a token.
    pub fn tokens_minted(&self) -> u64 {
        self.shared.world().minted
    }

    pub fn imds_max_concurrency(&self) -> usize {
        self.shared.world().imds_max_in_flight
    }

    pub fn upstream_requests(&self) -> Vec<UpstreamRequest> {
        self.shared.world().upstream.clone()
    }

    /// Mint a token now, as IMDS would for the system identity.
    pub fn mint(&self, audience: &str, lifetime_s: u64) -> String {
        let world = self.shared.world();
        let identity = world
            .settings
            .system_identity
            .clone()
            .unwrap_or_else(Identity::system);
        mint(
            &world.key,
            &identity,
            audience,
            lifetime_s,
            world.settings.token_padding,
        )
    }

    /// Sign with a new key from now on: every token issued so far stops
    /// verifying, as after a key rollover that a cached token missed.
    pub fn rotate_signing_key(&self) -> std::io::Result<()> {
        let key = new_signing_key()?;
        self.shared.world().key = key;
        Ok(())
    }

    /// Every token IMDS has issued.
    pub fn minted_tokens(&self) -> Vec<String> {
        self.shared.world().minted_tokens.clone()
    }

    /// Requests IMDS is handling right now.
    pub fn imds_in_flight(&self) -> usize {
        self.shared.world().imds_in_flight
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    verbose: bool,
}

fn router(shared: Arc<Shared>, verbose: bool) -> Router {
    Router::new()
        .route("/metadata/identity/oauth2/token", get(imds))
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(chat),
        )
        .route("/openai/v1/chat/completions", post(chat_v1))
        .route("/{tenant}/oauth2/v2.0/token", post(entra_token))
        .route("/_emulator/requests", get(recorded))
        .route("/_emulator/imds/script", post(script))
        .fallback(echo)
        .with_state(App { shared, verbose })
}

fn header_list(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn json_response(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

/// Show a secret the way the demo may print it: the first characters only.
pub fn redact(value: &str) -> String {
    let shown: String = value.chars().take(16).collect();
    if value.chars().count() > 16 {
        format!("{shown}…")
    } else {
        shown
    }
}

async fn imds(
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
    let (status, body) = imds_answer(&app.shared, &query, &headers, reply);
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

fn imds_error(description: &str) -> (u16, String) {
    let body = json!({"error": "invalid_request", "error_description": description});
    (400, body.to_string())
}

fn imds_answer(
    shared: &Shared,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    reply: ImdsReply,
) -> (u16, String) {
    if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
        return imds_error("Required metadata header not specified");
    }
    if headers.contains_key("x-forwarded-for") {
        return imds_error(
            "Request contains X-Forwarded-For header, which is not allowed for IMDS",
        );
    }
    if query.get("api-version").is_none() {
        return imds_error("Required queryparam 'api-version' is missing");
    }
    let Some(resource) = query.get("resource") else {
        return imds_error("Required queryparam 'resource' is missing");
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
        Some(None) => return imds_error("Identity not found"),
        None => match (&settings.system_identity, settings.user_identities.as_slice()) {
            (Some(system), _) => system.clone(),
            (None, [only]) => only.clone(),
            (None, []) => return imds_error("Identity not found"),
            (None, _) => {
                return imds_error("Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request")
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

#[derive(Debug, Serialize, Deserialize)]
struct AzureClaims {
    oid: String,
    tid: String,
    appid: String,
    appidacr: String,
    idtyp: String,
    ver: String,
    xms_mirid: String,
    aio: String,
}

fn mint(
    key: &RS256KeyPair,
    identity: &Identity,
    audience: &str,
    lifetime_s: u64,
    padding: usize,
) -> String {
    let custom = AzureClaims {
        oid: identity.object_id.clone(),
        tid: TENANT_ID.into(),
        appid: identity.client_id.clone(),
        appidacr: "2".into(),
        idtyp: "app".into(),
        ver: "1.0".into(),
        xms_mirid: identity.resource_id.clone(),
        aio: format!("k2BgYJi8emulator{}", "A".repeat(padding)),
    };
    let claims =
        Claims::with_custom_claims(custom, jwt_simple::prelude::Duration::from_secs(lifetime_s))
            .with_audience(audience)
            .with_issuer(format!("https://sts.windows.net/{TENANT_ID}/"))
            .with_subject(&identity.object_id);
    key.sign(claims).unwrap_or_default()
}

/// Why a bearer token is refused, or whose it is.
fn check_token(
    key: &RS256PublicKey,
    audience: &str,
    token: &str,
) -> Result<JWTClaims<AzureClaims>, Verdict> {
    let options = VerificationOptions {
        allowed_audiences: Some(HashSet::from([audience.to_owned()])),
        time_tolerance: Some(jwt_simple::prelude::Duration::from_secs(0)),
        ..VerificationOptions::default()
    };
    key.verify_token::<AzureClaims>(token, Some(options))
        .map_err(|e| match e.downcast_ref::<JWTError>() {
            Some(JWTError::TokenHasExpired) => Verdict::ExpiredToken,
            Some(JWTError::RequiredAudienceMismatch) => Verdict::WrongAudience,
            _ => Verdict::InvalidToken,
        })
}

/// The claims of a token without checking it (to record `exp` of expired ones).
fn unverified_exp(token: &str) -> Option<u64> {
    use jwt_simple::reexports::ct_codecs::{Base64UrlSafeNoPadding, Decoder};
    let payload = token.split('.').nth(1)?;
    let bytes = Base64UrlSafeNoPadding::decode_to_vec(payload, None).ok()?;
    serde_json::from_slice::<Value>(&bytes)
        .ok()?
        .get("exp")?
        .as_u64()
}

/// Entra's client-credentials grant (AZURE_FACTS.md §2): a form POST, a JSON
/// answer whose `expires_in` is a number. Any client id and secret are
/// accepted; the token is the system identity's.
async fn entra_token(State(app): State<App>, body: String) -> Response {
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

async fn chat(
    State(app): State<App>,
    Path(deployment): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    data_plane(&app, &deployment, method, uri, headers, &body)
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
    data_plane(&app, &model, method, uri, headers, &body)
}

fn data_plane(
    app: &App,
    deployment: &str,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: &str,
) -> Response {
    let (settings, public_key) = {
        let world = app.shared.world();
        (world.settings.clone(), world.key.public_key())
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = header("authorization").and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    });
    let mut token_exp = None;
    let mut token_oid = None;
    let host = header("host").unwrap_or_default();
    // A regional endpoint, not the resource's custom subdomain.
    let regional = host.contains(".api.cognitive.microsoft.com");
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
    } else if let Some(key) = header("api-key") {
        if settings.local_auth_disabled {
            (
                Verdict::KeyAuthDisabled,
                403,
                json!({"error": {"code": "AuthenticationTypeDisabled", "message": "Key based authentication is disabled for this resource."}}),
            )
        } else if key == settings.api_key {
            (Verdict::Ok, 200, completion(deployment, "api-key", body))
        } else {
            (
                Verdict::InvalidKey,
                401,
                json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}),
            )
        }
    } else {
        let unauthorized = json!({"statusCode": 401, "message": format!("Unauthorized. Access token is missing, invalid, audience is incorrect ({}), or have expired.", settings.accepted_audience)});
        match bearer.map(|t| check_token(&public_key, &settings.accepted_audience, t)) {
            None => (Verdict::MissingToken, 401, unauthorized),
            Some(Err(verdict)) => {
                token_exp = bearer.and_then(unverified_exp);
                (verdict, 401, unauthorized)
            }
            Some(Ok(claims)) => {
                token_exp = claims.expires_at.map(|t| t.as_secs());
                let oid = claims.custom.oid.clone();
                token_oid = Some(oid.clone());
                if settings.role_holders.contains(&oid) {
                    (Verdict::Ok, 200, completion(deployment, &oid, body))
                } else {
                    (
                        Verdict::PermissionDenied,
                        401,
                        json!({"error": {"code": "PermissionDenied", "message": format!("The principal `{oid}` lacks the required data action `Microsoft.CognitiveServices/accounts/OpenAI/deployments/chat/completions/action` to perform `POST /openai/deployments/{{deployment-id}}/chat/completions` operation.")}}),
                    )
                }
            }
        }
    };
    record(
        app, method, &uri, &headers, verdict, token_exp, token_oid, status,
    );
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

async fn echo(State(app): State<App>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let scripted = app.shared.world().settings.upstream_reply.clone();
    record(
        &app,
        method.clone(),
        &uri,
        &headers,
        Verdict::Echoed,
        None,
        None,
        200,
    );
    if let Some(raw) = scripted {
        return raw.into_response();
    }
    json_response(
        200,
        json!({"echo": {"method": method.as_str(), "path": uri.path(), "headers": header_list(&headers)}}),
    )
}

#[allow(clippy::too_many_arguments)]
fn record(
    app: &App,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    verdict: Verdict,
    token_exp: Option<u64>,
    token_oid: Option<String>,
    status: u16,
) {
    let request = UpstreamRequest {
        at_ms: now_ms(),
        method: method.as_str().to_owned(),
        host: headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        path: uri.path().to_owned(),
        headers: header_list(headers),
        verdict,
        token_exp,
        token_oid,
    };
    if app.verbose {
        let shown = |name: &str| {
            let values = request.header_values(name);
            if values.is_empty() {
                "(none)".to_owned()
            } else {
                values
                    .iter()
                    .map(|v| redact(v))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        println!(
            "[emulator] AOAI  {} {} host={} authorization={} api-key={} -> {status} {verdict:?}",
            request.method,
            request.path,
            request.host,
            shown("authorization"),
            shown("api-key"),
        );
    }
    app.shared.world().upstream.push(request);
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
        .map(|r| json!({"method": r.method, "host": r.host, "path": r.path, "verdict": r.verdict, "headers": shorten(&r.headers)}))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RS256KeyPair {
        new_signing_key().unwrap()
    }

    #[test]
    fn minted_tokens_verify_and_carry_the_identity() {
        let identity = Identity::system();
        let key = key();
        let token = mint(&key, &identity, RESOURCE, 60, 0);
        let claims = check_token(&key.public_key(), RESOURCE, &token).unwrap();
        assert_eq!(claims.custom.oid, identity.object_id);
        assert_eq!(claims.custom.tid, TENANT_ID);
        assert!(token.starts_with("eyJ"));
    }

    #[test]
    fn tokens_for_another_audience_are_refused() {
        let key = key();
        let token = mint(
            &key,
            &Identity::system(),
            "https://management.azure.com",
            60,
            0,
        );
        assert_eq!(
            check_token(&key.public_key(), RESOURCE, &token).unwrap_err(),
            Verdict::WrongAudience
        );
    }

    #[test]
    fn garbage_is_an_invalid_token() {
        assert_eq!(
            check_token(&key().public_key(), RESOURCE, "not-a-jwt").unwrap_err(),
            Verdict::InvalidToken
        );
    }

    #[test]
    fn tokens_signed_by_a_rotated_key_are_invalid() {
        let (old, new) = (key(), key());
        let token = mint(&old, &Identity::system(), RESOURCE, 60, 0);
        assert_eq!(
            check_token(&new.public_key(), RESOURCE, &token).unwrap_err(),
            Verdict::InvalidToken
        );
    }

    #[test]
    fn redaction_keeps_only_a_prefix() {
        assert_eq!(
            redact("Bearer eyJ0eXAiOiJKV1QiLCJhbGciOi"),
            "Bearer eyJ0eXAiO…"
        );
    }
}
