//! A local Azure for aoai-msi-filter, behaving as `shared/AZURE_FACTS.md`
//! says. One room per Azure service, all on one port and one shared world:
//!
//! * `imds`: the IMDS managed-identity token endpoint of a VM (§1);
//! * `entra`: the Entra ID v2.0 token endpoint (§2, client credentials);
//! * `data_plane`: Azure OpenAI / Cognitive Services, Foundry project and
//!   Azure ML scoring data planes, each host and path with the audience it
//!   accepts (§2 "Audiences", §3), with `answers` (the OpenAI-shaped
//!   bodies), `streaming` (server-sent events) and `realtime` (WebSocket);
//! * `incoming`: each request read once, its body counted and hashed;
//! * `control`: the emulator's own `/_emulator/*` endpoints and the echo
//!   that answers every other path;
//! * `tokens`: minting and verifying the RS256 tokens they trade (§5).
//!
//! This file holds what the rooms share: the [`Settings`] of the emulated
//! world, what was recorded, and [`Emulator`], which serves the rooms on
//! 127.0.0.1 until dropped. Tests script it through [`Emulator`]; the
//! standalone binary exposes the same through `/_emulator/*`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;

mod answers;
mod control;
mod data_plane;
mod entra;
mod imds;
mod incoming;
mod judge;
mod realtime;
mod streaming;
mod tokens;

pub use imds::{ImdsReply, ImdsRequest};
pub use incoming::BODY_LIMIT;
pub use judge::{audience_for, Verdict};

use incoming::Incoming;
use tokens::{mint, new_signing_key, Signer};

/// The audience Azure OpenAI in the public cloud accepts.
pub const RESOURCE: &str = "https://cognitiveservices.azure.com";
/// The audience of Foundry project endpoints (`/api/projects/` on `*.services.ai.azure.com`).
pub const AI_RESOURCE: &str = "https://ai.azure.com";
/// The audience of Azure ML managed online endpoints (`*.inference.ml.azure.com`).
pub const ML_RESOURCE: &str = "https://ml.azure.com";
/// The audience of Azure OpenAI in Azure Government (`*.openai.azure.us`).
pub const US_GOV_RESOURCE: &str = "https://cognitiveservices.azure.us";
/// The audience of Azure OpenAI in Azure China (`*.openai.azure.cn`).
pub const CHINA_RESOURCE: &str = "https://cognitiveservices.azure.cn";
pub const TENANT_ID: &str = "72f988bf-0000-4000-8000-00000000e1a0";
/// Role that grants `.../chat/completions/action` (Cognitive Services OpenAI User).
pub const OPENAI_USER_ROLE: &str = "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd";

// --- Identity rooms: App Service managed identity, Entra client
// credentials (secret, certificate, federated), the workload-identity OIDC
// issuer and a reference key service. Each room's `impl Emulator` block
// lives in its own module.
mod app_service;
mod credentials;
mod identity;
mod keys;

pub use app_service::{app_service_error, APP_SERVICE_API_VERSION};
pub use credentials::{certificate_thumbprint, new_certificate, Certificate};
pub use entra::{entra_error, AppSecret, EntraApp, EntraRequest, FederatedCredential, JWT_BEARER};
// --- end of identity rooms

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

    pub(crate) fn into_response(self) -> Response {
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

/// One request as the upstream received it.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamRequest {
    pub at_ms: u64,
    pub method: String,
    pub host: String,
    pub path: String,
    /// The raw query string, empty if none.
    pub query: String,
    pub headers: Vec<(String, String)>,
    /// Length of the request body as received.
    pub body_len: usize,
    /// Lower-case hex SHA-256 of the request body as received.
    pub body_sha256: String,
    /// The request asked to switch to the WebSocket protocol.
    pub websocket: bool,
    pub verdict: Verdict,
    /// `exp` of a token that verified by signature, in seconds.
    pub token_exp: Option<u64>,
    /// `oid` of a token that verified.
    pub token_oid: Option<String>,
    /// `aud` of the bearer token, read without verifying it, whenever a
    /// bearer JWT arrived (so a wrong audience can be seen).
    pub token_aud: Option<String>,
    /// The audience this host and path accept ([`audience_for`]); `None`
    /// for echoed paths.
    pub expected_audience: Option<String>,
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
    /// A second key the resource accepts beside `api_key`, as Azure keeps
    /// key1 and key2 valid together so a rotation needs no downtime.
    pub secondary_api_key: Option<String>,
    pub system_identity: Option<Identity>,
    pub user_identities: Vec<Identity>,
    /// Object ids holding a role that grants the data actions of every data
    /// plane (chat completions, Foundry projects, Azure ML scoring).
    pub role_holders: HashSet<String>,
    /// Extra bytes in each token's `aio` claim, to model larger real tokens.
    pub token_padding: usize,
    /// While set, every IMDS request gets this reply (an outage), before any script.
    pub imds_failure: Option<ImdsReply>,
    /// The audience Azure OpenAI accepts on `*.openai.azure.com`,
    /// `*.cognitiveservices.azure.com`, `*.services.ai.azure.com` outside
    /// project paths, and on every host that is not an Azure name.
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
    /// The tenant the Azure OpenAI resource lives in: a verified token whose
    /// `tid` differs is refused with 400 ([`Verdict::TenantMismatch`]).
    pub resource_tenant: String,
    /// The tenant (`tid`, and the issuer's tenant) of every token minted
    /// from the next one on, IMDS's and Entra's included.
    pub token_tenant: String,
    /// `PermissionDenied` names the principal and the data action it lacks;
    /// when false it says only `Principal does not have access to
    /// API/Operation.`, as Azure also does.
    pub permission_denied_names_principal: bool,
    // --- Identity rooms (see `app_service`, `entra`, `keys`).
    /// The secret the App Service / Container Apps identity endpoint expects
    /// in `X-IDENTITY-HEADER` (the platform's `IDENTITY_HEADER`).
    pub identity_header: String,
    /// App registrations the Entra token endpoint knows.
    pub entra_apps: Vec<EntraApp>,
    /// The one tenant the Entra token endpoint serves (path `/{tenant}/…`).
    pub entra_tenant: String,
    /// The file the key service answers from, read anew on every request.
    pub key_file: Option<std::path::PathBuf>,
    /// `expires_in` of the key service's answers; none when unset.
    pub key_expires_in_s: Option<u64>,
    // --- end of identity rooms
}

impl Default for Settings {
    fn default() -> Self {
        let system = Identity::system();
        Settings {
            token_lifetime_s: 86_399,
            imds_delay_ms: 0,
            local_auth_disabled: true,
            api_key: "emulator-key-0000".into(),
            secondary_api_key: None,
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
            resource_tenant: TENANT_ID.to_owned(),
            token_tenant: TENANT_ID.to_owned(),
            permission_denied_names_principal: true,
            // --- Identity rooms.
            identity_header: "emulator-identity-header-0000".into(),
            entra_apps: Vec::new(),
            entra_tenant: TENANT_ID.to_owned(),
            key_file: None,
            key_expires_in_s: None,
            // --- end of identity rooms
        }
    }
}

pub(crate) struct World {
    pub(crate) settings: Settings,
    /// Signs tokens in the name of `Settings::token_tenant`.
    pub(crate) key: Signer,
    pub(crate) script: VecDeque<ImdsReply>,
    pub(crate) imds: Vec<ImdsRequest>,
    pub(crate) upstream: Vec<UpstreamRequest>,
    pub(crate) imds_in_flight: usize,
    pub(crate) imds_max_in_flight: usize,
    /// Token requests that reached IMDS, answered or not.
    pub(crate) imds_arrived: usize,
    pub(crate) minted: u64,
    /// Every token IMDS issued, so tests can look for them where they must not be.
    pub(crate) minted_tokens: Vec<String>,
    /// IMDS's token cache: (client id, resource) → (token, expires_on seconds).
    pub(crate) imds_cache: HashMap<(String, String), (String, u64)>,
    /// What the identity rooms remember (`identity`).
    pub(crate) identity: identity::IdentityState,
}

pub(crate) struct Shared {
    world: Mutex<World>,
}

impl Shared {
    pub(crate) fn world(&self) -> MutexGuard<'_, World> {
        // A test thread that panicked while holding the lock must not hide
        // what the emulator recorded from the others.
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }
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
        let key = Signer::new(new_signing_key()?, &settings.token_tenant);
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
                imds_arrived: 0,
                minted: 0,
                minted_tokens: Vec::new(),
                imds_cache: HashMap::new(),
                identity: identity::IdentityState::new(),
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
        let mut world = self.shared.world();
        change(&mut world.settings);
        world.key.tenant = world.settings.token_tenant.clone();
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
        let mut world = self.shared.world();
        world.key = Signer::new(key, &world.settings.token_tenant);
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

    /// Token requests that reached IMDS, including those whose caller went
    /// away before the answer ([`Emulator::imds_requests`] has the answered).
    pub fn imds_arrived(&self) -> usize {
        self.shared.world().imds_arrived
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
pub(crate) struct App {
    pub(crate) shared: Arc<Shared>,
    pub(crate) verbose: bool,
}

/// What a room found out about one upstream request, for the record.
pub(crate) struct Seen {
    pub(crate) verdict: Verdict,
    pub(crate) token_exp: Option<u64>,
    pub(crate) token_oid: Option<String>,
    pub(crate) token_aud: Option<String>,
    pub(crate) expected_audience: Option<String>,
}

impl App {
    /// Remember one request that reached a data plane or the echo.
    fn record(&self, incoming: &Incoming, status: u16, seen: Seen) {
        let verdict = seen.verdict;
        let request = UpstreamRequest {
            at_ms: now_ms(),
            method: incoming.method.as_str().to_owned(),
            host: incoming.host().to_owned(),
            path: incoming.uri.path().to_owned(),
            query: incoming.uri.query().unwrap_or_default().to_owned(),
            headers: header_list(&incoming.headers),
            body_len: incoming.body_len,
            body_sha256: incoming.body_sha256.clone(),
            websocket: incoming.asks_websocket(),
            verdict,
            token_exp: seen.token_exp,
            token_oid: seen.token_oid,
            token_aud: seen.token_aud,
            expected_audience: seen.expected_audience,
        };
        if self.verbose {
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
        self.shared.world().upstream.push(request);
    }
}

fn router(shared: Arc<Shared>, verbose: bool) -> Router {
    Router::new()
        .merge(imds::routes())
        .merge(entra::routes())
        .merge(data_plane::routes())
        .merge(control::routes())
        // --- Identity rooms (entra is merged above).
        .merge(app_service::routes())
        .merge(keys::routes())
        // --- end of identity rooms
        .fallback(control::echo)
        .with_state(App { shared, verbose })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn header_list(headers: &HeaderMap) -> Vec<(String, String)> {
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

pub(crate) fn json_response(status: u16, body: Value) -> Response {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_keeps_only_a_prefix() {
        assert_eq!(
            redact("Bearer eyJ0eXAiOiJKV1QiLCJhbGciOi"),
            "Bearer eyJ0eXAiO…"
        );
    }
}
