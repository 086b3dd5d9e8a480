//! The token agent: one per token (a distinct source, identity and resource)
//! per Wasm VM (one VM per Envoy worker), deciding from the time, the shared
//! record and its own state what the glue must do. Requests carry the target
//! they belong to, so what the glue does for them is labelled by target.
//!
//! ```text
//!            request, token usable ──────────────► authorize (VM-local copy)
//!            request, no usable token ──► park ──► kick own root
//! root: sync (kick, notification, tick)
//!     record has a fresh token ─────────────────► adopt it, resume parked
//!     no lease, no backoff, token missing/due ──► take the lease, Fetch
//!     or a replacement was asked for
//!     lease held elsewhere / backing off ───────► wait (parked stay parked)
//!     failure that retrying cannot fix ─────────► reject parked with a diagnosis
//! root: fetched(result)
//!     ok ──► write token, drop lease, notify every VM, resume parked
//!     err ─► write failure + retry time, drop lease, notify, settle parked
//! root: tick ──► time out parked requests; sync when a refresh is due
//! request: the upstream rejected the token ──► ask for one replacement;
//!                                             the token keeps serving meanwhile
//! ```
//!
//! The lease in shared data makes fetches single-flight across workers; the
//! failure's `retry_at` makes backoff shared too. Requests never read shared
//! data: they use the VM-local copy, which notifications keep current.
//!
//! Time: the wall clock, passed in, is what token expiry and the shared record
//! are measured in. A wall clock can step backwards (NTP, a VM resumed from a
//! snapshot), so VM-local waits (parked requests, the call in flight) run on a
//! monotonic clock derived from it ([`Monotonic`]), and a time in the shared
//! record that lies in the future was written before a backward step: the
//! wait it implies is void ([`crate::clock::stepped_back`]).

use crate::claims::Claims;
use crate::clock::{stepped_back, Monotonic};
use crate::config::TokenSpec;
use crate::diagnose::Diagnosis;
use crate::lifecycle::retry_delay_ms;
pub use crate::lifecycle::Replacement;
use crate::parked::Parked;
pub use crate::parked::Waiter;
use crate::rewrite::bearer_header;
use crate::source::{CredentialKind, Exchange, Step, TokenRequest};
use crate::store::{self, Decision, Failure, Lease, Record, SharedStore};
use crate::token::{FailureClass, FetchFailure, Issued, Secret, Token};

/// A lease outlives the call it covers (`token_source.timeout_ms`) by this
/// much, then others may take over: the holder's VM may have gone away with
/// the call.
pub const LEASE_GRACE_MS: u64 = 2_000;

/// What happens to a request to a matching host.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<'a> {
    /// Send it with this `authorization` value, from token `generation`.
    Authorize { bearer: &'a str, generation: u64 },
    /// Hold it. When `kick` is set, the glue must wake this VM's root, which
    /// will start or join a token fetch.
    Park { kick: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
}

/// Work for the glue, in order.
#[derive(Debug, PartialEq)]
pub enum Command {
    /// Dispatch this call of a token exchange (this VM holds the lease) and
    /// hand its answer to [`Agent::answered`], or its dispatch failure to
    /// [`Agent::dispatch_failed`].
    Dispatch(TokenRequest),
    /// Wake every other VM so it adopts the record.
    NotifyOthers,
    /// Wake this VM's root: it has something to sync (a replacement to fetch).
    Kick,
    /// Rewrite these requests with [`Agent::bearer`] and resume them.
    Resume(Vec<Waiter>),
    /// Answer these requests locally with the diagnosis.
    Reject(Vec<Waiter>, Diagnosis),
    /// No token for now (a transient failure, `code`): these requests of
    /// `on_token_failure: forward_key` targets may go on with their own key.
    /// They stay parked: the glue [`Agent::forget`]s those it sent on, and
    /// the rest wait for a token as before. Offered once per request.
    OfferFallback(Vec<Waiter>, &'static str),
    /// A line for the log; never contains a secret.
    Log(Level, String),
    /// Something to count.
    Record(Event),
}

/// Lifecycle events the metrics count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A token call ended: `ok` or the failure's label, and how long it took.
    Fetched {
        outcome: String,
        duration_ms: Option<u64>,
    },
    /// A background refresh started while a usable token served requests.
    RefreshStarted,
    /// The upstream rejected the token and a replacement was asked for.
    Invalidated,
    /// An `http` source handed out a different value than the one serving.
    Rotated,
}

#[derive(Debug)]
struct Local {
    token: Token,
    /// The credential header's value, formatted once per token:
    /// `Bearer <token>`, or the key itself for an `api-key` credential.
    bearer: Secret,
    generation: u64,
    /// Read once per token, for diagnoses only.
    claims: Option<Claims>,
}

#[derive(Debug)]
pub struct Agent {
    spec: TokenSpec,
    key: String,
    vm: u32,
    local: Option<Local>,
    failure: Option<Failure>,
    /// The shared record wants a replacement of its current token.
    replacement_wanted: bool,
    /// Kept fresh: from start-up for a prefetched token, else from the first
    /// request that needs it (or the first time another VM has fetched it).
    active: bool,
    /// Starts refreshes ahead of expiry (see [`Agent::refresh_ahead`]).
    refreshes_ahead: bool,
    parked: Parked,
    kicked: bool,
    /// Monotonic time this VM started the exchange in flight, and its step.
    fetch_started_ms: Option<u64>,
    exchange: Option<Exchange>,
    clock: Monotonic,
    /// Random per VM: with `nonces`, makes every client assertion's `jti` unique.
    seed: u64,
    nonces: u64,
    /// Targets with `on_token_failure: forward_key`: their waiting requests
    /// are offered their own key as soon as a fetch fails.
    fallback_targets: Vec<u32>,
}

impl Agent {
    /// `vm` must be distinct per VM: it is the lease holder's name. `seed`
    /// is random (the glue reads the host's randomness once).
    pub fn new(spec: TokenSpec, vm: u32, seed: u64) -> Agent {
        let key = Agent::record_key(&spec);
        Agent {
            active: spec.prefetch,
            refreshes_ahead: true,
            spec,
            key,
            vm,
            local: None,
            failure: None,
            replacement_wanted: false,
            parked: Parked::default(),
            kicked: false,
            fetch_started_ms: None,
            exchange: None,
            clock: Monotonic::default(),
            seed,
            nonces: 0,
            fallback_targets: Vec::new(),
        }
    }

    /// Name the targets whose requests may fall back to their own key.
    pub fn forward_keys_for(&mut self, targets: Vec<u32>) {
        self.fallback_targets = targets;
    }

    fn nonce(&mut self) -> u64 {
        self.nonces += 1;
        self.seed ^ self.nonces.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// `false`: leave refreshing ahead of expiry, and replacing a token the
    /// upstream rejected, to other VMs; this one fetches only when no usable
    /// token exists (a request of its own then waits for the answer). For a host that
    /// cannot run a VM holding no request to take in its call's answer: a
    /// refresh that VM led could wait there, lease held, while the token
    /// runs out for everyone.
    pub fn refresh_ahead(&mut self, refreshes: bool) {
        self.refreshes_ahead = refreshes;
    }

    /// Shared-data key of the record for this token.
    pub fn record_key(spec: &TokenSpec) -> String {
        format!("aoai-msi-filter/v2/{}/token", spec.fingerprint())
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn spec(&self) -> &TokenSpec {
        &self.spec
    }

    /// The `authorization` value of the VM-local token, if any.
    pub fn bearer(&self) -> Option<&str> {
        self.local.as_ref().map(|l| l.bearer.expose())
    }

    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Requests of `target` held right now.
    pub fn parked_for(&self, target: u32) -> usize {
        self.parked.count_for(target)
    }

    /// Unverified claims of the VM-local token, to explain failures.
    pub fn claims(&self) -> Option<&Claims> {
        self.local.as_ref().and_then(|l| l.claims.as_ref())
    }

    /// When the VM-local token expires (ms since the epoch).
    pub fn expires_at_ms(&self) -> Option<u64> {
        self.local.as_ref().map(|l| l.token.expires_at_ms)
    }

    /// Generation of the VM-local token, if any.
    pub fn generation(&self) -> Option<u64> {
        self.local.as_ref().map(|l| l.generation)
    }

    /// How long a lease protects a token exchange (each call's timeout).
    pub fn lease_ms(&self) -> u64 {
        self.spec.source.timeout_ms() * self.spec.source.calls() + LEASE_GRACE_MS
    }

    pub fn is_parked(&self, request: u32) -> bool {
        self.parked.contains(request)
    }

    /// The hot path: no shared data, no allocation when a token is usable.
    /// `target` labels the request should it have to wait.
    pub fn admit(&mut self, now_ms: u64, request: u32, target: u32) -> Admission<'_> {
        let mono = self.clock.observe(now_ms);
        self.active = true;
        let usable = self.local.as_ref().is_some_and(|l| l.token.usable(now_ms));
        if usable {
            if let Some(local) = &self.local {
                return Admission::Authorize {
                    bearer: local.bearer.expose(),
                    generation: local.generation,
                };
            }
        }
        self.parked.insert(Waiter { request, target }, mono);
        let kick = !self.kicked;
        self.kicked = true;
        Admission::Park { kick }
    }

    /// Why a request of a target with `on_token_failure: forward_key` may go
    /// on with its own key right now: no usable token, and the last attempt
    /// failed (the diagnosis code it would otherwise get). `None` while a
    /// token serves, or before the first attempt has ended — then the
    /// request waits like any other.
    pub fn unavailable(&mut self, now_ms: u64) -> Option<&'static str> {
        self.clock.observe(now_ms);
        self.active = true;
        if self.local.as_ref().is_some_and(|l| l.token.usable(now_ms)) {
            return None;
        }
        let failure = self.failure.as_ref()?;
        Some(Diagnosis::for_failure(failure, &self.spec, now_ms).code)
    }

    /// This VM is going away (its configuration was reloaded or removed) and
    /// its token call with it: give up the lease now, so another VM fetches
    /// at once instead of waiting for the lease to lapse. The others must be
    /// told ([`Command::NotifyOthers`]) when a lease was given up.
    pub fn abandon(&mut self, store: &mut dyn SharedStore) -> Vec<Command> {
        self.fetch_started_ms = None;
        self.exchange = None;
        let vm = self.vm;
        let released = store::update(store, &self.key, |record| match record {
            Some(mut record) if record.lease.is_some_and(|l| l.holder == vm) => {
                record.lease = None;
                Decision::Write(record, true)
            }
            _ => Decision::Keep(false),
        });
        match released {
            Ok(true) => vec![Command::NotifyOthers],
            Ok(false) => Vec::new(),
            Err(e) => vec![Command::Log(Level::Warn, format!("token record: {e}"))],
        }
    }

    /// A parked request went away (client disconnect): forget it.
    pub fn forget(&mut self, request: u32) {
        self.parked.remove(request);
    }

    /// Look at the shared record: adopt a newer token, lead a fetch if one is
    /// needed and nobody else is on it, settle parked requests.
    pub fn sync(&mut self, now_ms: u64, store: &mut dyn SharedStore) -> Vec<Command> {
        self.clock.observe(now_ms);
        self.kicked = false;
        let mut commands = Vec::new();
        let busy = self.fetch_started_ms.is_some();
        let vm = self.vm;
        let lease_ms = self.lease_ms();
        let refreshes_ahead = self.refreshes_ahead;
        let outcome = store::update(store, &self.key, |record| {
            let mut record = record.unwrap_or_default();
            let usable = record.token.as_ref().is_some_and(|t| t.usable(now_ms));
            // A VM that cannot wake when idle leaves both refreshing ahead
            // and replacing a rejected token to one that can, while the
            // token is usable: a fetch it led could wait, lease held, for a
            // request that never comes.
            let fresh = usable
                && (!refreshes_ahead
                    || (record
                        .token
                        .as_ref()
                        .is_some_and(|t| !t.refresh_due(now_ms))
                        && !record.wants_replacement()));
            let backing_off = record
                .failure
                .as_ref()
                .is_some_and(|f| now_ms < f.next_attempt_ms(now_ms, !usable));
            if fresh || busy || record.lease_active(now_ms) || backing_off {
                return Decision::Keep((record, false));
            }
            record.lease = Some(Lease {
                holder: vm,
                since_ms: now_ms,
                until_ms: now_ms + lease_ms,
            });
            Decision::Write(record.clone(), (record, true))
        });
        match outcome {
            Ok((record, lead)) => {
                let refreshing = record.token.as_ref().is_some_and(|t| t.usable(now_ms));
                self.adopt(record);
                if lead {
                    self.fetch_started_ms = Some(self.clock.observe(now_ms));
                    if refreshing {
                        commands.push(Command::Record(Event::RefreshStarted));
                    }
                    let nonce = self.nonce();
                    let (exchange, step) =
                        self.spec.source.begin(&self.spec.resource, now_ms, nonce);
                    commands.extend(self.step(now_ms, store, exchange, step));
                }
            }
            Err(e) => commands.push(Command::Log(Level::Warn, format!("token record: {e}"))),
        }
        self.settle(now_ms, &mut commands);
        commands
    }

    /// The periodic check: time out parked requests, and sync when requests
    /// wait, a replacement is wanted, or (once the token is in use) this VM's
    /// copy is missing or due for refresh.
    pub fn tick(&mut self, now_ms: u64, store: &mut dyn SharedStore) -> Vec<Command> {
        let mono = self.clock.observe(now_ms);
        let lease_ms = self.lease_ms();
        if self
            .fetch_started_ms
            .is_some_and(|started| mono >= started + lease_ms)
        {
            // The host never answered the call; the lease has lapsed too.
            self.fetch_started_ms = None;
            self.exchange = None;
        }
        let needs_sync = !self.parked.is_empty()
            || (self.replacement_wanted && self.refreshes_ahead)
            || (self.active
                && self
                    .local
                    .as_ref()
                    .is_none_or(|l| l.token.refresh_due(now_ms)));
        let mut commands = if needs_sync && self.fetch_started_ms.is_none() {
            self.sync(now_ms, store)
        } else {
            Vec::new()
        };
        self.expire_parked(mono, now_ms, &mut commands);
        commands
    }

    /// A call this VM dispatched was answered (`status` is `None` when no
    /// HTTP answer came at all): the exchange's next call, or its result.
    pub fn answered(
        &mut self,
        now_ms: u64,
        store: &mut dyn SharedStore,
        status: Option<u16>,
        body: &[u8],
    ) -> Vec<Command> {
        let exchange = self.exchange.take().unwrap_or(Exchange::Token);
        let nonce = self.nonce();
        let (next, step) =
            self.spec
                .source
                .answered(exchange, &self.spec.resource, status, body, now_ms, nonce);
        self.step(now_ms, store, next, step)
    }

    /// The host answered a call of the exchange itself, with a failure (the
    /// native build reading the workload-identity token file it could not
    /// read): the exchange ends there.
    pub fn failed(
        &mut self,
        now_ms: u64,
        store: &mut dyn SharedStore,
        failure: FetchFailure,
    ) -> Vec<Command> {
        self.exchange = None;
        self.fetched(now_ms, store, Err(failure))
    }

    /// Envoy refused to dispatch a call of the exchange to `cluster`.
    pub fn dispatch_failed(
        &mut self,
        now_ms: u64,
        store: &mut dyn SharedStore,
        cluster: &str,
    ) -> Vec<Command> {
        self.exchange = None;
        let failure = FetchFailure::Dispatch {
            cluster: cluster.to_owned(),
        };
        self.fetched(now_ms, store, Err(failure))
    }

    /// Carry an exchange one step on: dispatch its next call, or finish it.
    fn step(
        &mut self,
        now_ms: u64,
        store: &mut dyn SharedStore,
        exchange: Exchange,
        step: Step,
    ) -> Vec<Command> {
        match step {
            Step::Call(request) => {
                self.exchange = Some(exchange);
                vec![Command::Dispatch(request)]
            }
            Step::Done(result) => self.completed(now_ms, store, result),
        }
    }

    /// An exchange ended with a token (and perhaps a warning) or a failure.
    fn completed(
        &mut self,
        now_ms: u64,
        store: &mut dyn SharedStore,
        result: Result<Issued, FetchFailure>,
    ) -> Vec<Command> {
        self.exchange = None;
        match result {
            Ok(issued) => {
                let mut commands = self.fetched(now_ms, store, Ok(issued.token));
                if let Some(warning) = issued.warning {
                    commands.push(Command::Log(Level::Warn, warning));
                }
                commands
            }
            Err(failure) => self.fetched(now_ms, store, Err(failure)),
        }
    }

    /// The token call this VM dispatched has ended.
    pub fn fetched(
        &mut self,
        now_ms: u64,
        store: &mut dyn SharedStore,
        result: Result<Token, FetchFailure>,
    ) -> Vec<Command> {
        let mono = self.clock.observe(now_ms);
        let duration_ms = self
            .fetch_started_ms
            .take()
            .map(|started| mono.saturating_sub(started));
        let vm = self.vm;
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(cause) => cause.label(),
        };
        let mut commands = vec![Command::Record(Event::Fetched {
            outcome,
            duration_ms,
        })];
        let release = |record: &mut Record| {
            if record.lease.is_some_and(|l| l.holder == vm) {
                record.lease = None;
            }
        };
        match result {
            Ok(token) => {
                let interval_s = self.spec.invalidation_interval_ms / 1000;
                let written = store::update(store, &self.key, |record| {
                    let mut record = record.unwrap_or_default();
                    let previous = record.token.as_ref().map(|t| t.secret.fingerprint());
                    let same = record.wants_replacement()
                        && record
                            .token
                            .as_ref()
                            .is_some_and(|t| t.secret == token.secret);
                    if same {
                        // Asked for a replacement, handed the rejected token again.
                        record.same_token_at_ms = Some(now_ms);
                    } else {
                        record.token = Some(token.clone());
                        record.generation += 1;
                        record.same_token_at_ms = None;
                    }
                    record.replace = None;
                    record.failure = None;
                    release(&mut record);
                    Decision::Write(record.clone(), (record, same, previous))
                });
                match written {
                    Ok((record, same, previous))
                        if !same && self.spec.source.reports_rotation() =>
                    {
                        commands.extend(credential_news(&token, previous, now_ms));
                        self.adopt(record);
                    }
                    Ok((record, same, _)) => {
                        commands.push(Command::Log(
                            if same { Level::Warn } else { Level::Info },
                            if same {
                                format!(
                                    "asked for a new token after the upstream rejected this one, and the \
                                     token endpoint returned the same token (it caches tokens); keeping it, \
                                     and not asking again for {interval_s} s"
                                )
                            } else {
                                format!(
                                    "token acquired: expires in {} s, refresh in {} s, usable for {} s",
                                    token.expires_at_ms.saturating_sub(now_ms) / 1000,
                                    token.refresh_at_ms().saturating_sub(now_ms) / 1000,
                                    token.unusable_at_ms().saturating_sub(now_ms) / 1000,
                                )
                            },
                        ));
                        self.adopt(record);
                    }
                    Err(e) => {
                        commands.push(Command::Log(
                            Level::Warn,
                            format!("token kept on this worker only: {e}"),
                        ));
                        self.install(token, u64::MAX);
                    }
                }
            }
            Err(cause) => {
                let seed = u64::from(vm) ^ now_ms;
                let written = store::update(store, &self.key, |record| {
                    let mut record = record.unwrap_or_default();
                    let attempts = record.failure.as_ref().map_or(0, |f| f.attempts) + 1;
                    let delay = retry_delay_ms(cause.class(), attempts, seed);
                    record.failure = Some(Failure {
                        cause: cause.clone(),
                        attempts,
                        retry_at_ms: now_ms + delay,
                        at_ms: now_ms,
                    });
                    release(&mut record);
                    Decision::Write(record.clone(), record)
                });
                match written {
                    Ok(record) => self.adopt(record),
                    Err(e) => {
                        commands.push(Command::Log(Level::Warn, format!("token record: {e}")))
                    }
                }
                let urgent = !self.local.as_ref().is_some_and(|l| l.token.usable(now_ms));
                if let Some(f) = &self.failure {
                    commands.push(Command::Log(
                        Level::Warn,
                        format!(
                            "token fetch failed ({}), attempt {}, next try in {} ms: {}",
                            f.cause.label(),
                            f.attempts,
                            f.next_attempt_ms(now_ms, urgent).saturating_sub(now_ms),
                            Diagnosis::for_failure(f, &self.spec, now_ms).message
                        ),
                    ));
                }
            }
        }
        commands.push(Command::NotifyOthers);
        self.settle(now_ms, &mut commands);
        commands
    }

    /// The upstream rejected token `generation` as a token (401 missing /
    /// invalid / audience / expired). Ask for exactly one replacement — at most
    /// once per `invalidation_interval_ms`, so a misconfigured audience cannot
    /// become a token-endpoint storm — while the token keeps serving: requests
    /// never wait because of a rejection. The caller learns what became of it.
    pub fn invalidate(
        &mut self,
        now_ms: u64,
        store: &mut dyn SharedStore,
        generation: u64,
    ) -> (Replacement, Vec<Command>) {
        self.clock.observe(now_ms);
        let interval = self.spec.invalidation_interval_ms;
        let outcome = store::update(store, &self.key, |record| {
            let mut record = record.unwrap_or_default();
            if record.generation != generation || record.token.is_none() {
                return Decision::Keep((record, Replacement::AlreadyReplaced));
            }
            if record.wants_replacement() {
                return Decision::Keep((record, Replacement::Pending));
            }
            if let Some(last) = record.invalidated_at_ms {
                let allowed_at = last.saturating_add(interval);
                if now_ms < allowed_at && !stepped_back(last, now_ms) {
                    let again_in_ms = allowed_at - now_ms;
                    let replacement = if record.same_token_at_ms.is_some() {
                        Replacement::SameTokenReturned { again_in_ms }
                    } else {
                        Replacement::RateLimited { again_in_ms }
                    };
                    return Decision::Keep((record, replacement));
                }
            }
            record.replace = Some(generation);
            record.invalidated_at_ms = Some(now_ms);
            Decision::Write(record.clone(), (record, Replacement::Requested))
        });
        match outcome {
            Ok((record, replacement)) => {
                self.adopt(record);
                let commands = match replacement {
                    Replacement::Requested => vec![
                        Command::Record(Event::Invalidated),
                        Command::Log(
                            Level::Warn,
                            format!(
                                "the upstream rejected the token (401: missing, invalid, wrong audience or expired): \
                                 fetching one replacement while it keeps serving; the next request for one is \
                                 allowed in {} s",
                                interval / 1000
                            ),
                        ),
                        // Fetched here, or by a VM that wakes when idle.
                        if self.refreshes_ahead {
                            Command::Kick
                        } else {
                            Command::NotifyOthers
                        },
                    ],
                    Replacement::RateLimited { again_in_ms }
                    | Replacement::SameTokenReturned { again_in_ms } => vec![Command::Log(
                        Level::Debug,
                        format!("the upstream rejected the token again; next replacement allowed in {again_in_ms} ms"),
                    )],
                    Replacement::Pending | Replacement::AlreadyReplaced => Vec::new(),
                };
                (replacement, commands)
            }
            Err(e) => (
                Replacement::AlreadyReplaced,
                vec![Command::Log(Level::Warn, format!("token record: {e}"))],
            ),
        }
    }

    fn adopt(&mut self, record: Record) {
        self.active |= record.token.is_some();
        self.failure = record.failure.clone();
        self.replacement_wanted = record.wants_replacement();
        let current = self.local.as_ref().map(|l| l.generation);
        if current == Some(record.generation) {
            return;
        }
        match record.token {
            Some(token) => self.install(token, record.generation),
            None if current.is_some() => self.local = None,
            None => {}
        }
    }

    fn install(&mut self, token: Token, generation: u64) {
        let bearer = Secret::new(match self.spec.source.credential() {
            CredentialKind::Bearer => bearer_header(token.secret.expose()),
            CredentialKind::ApiKey => token.secret.expose().to_owned(),
        });
        let claims = Claims::read(token.secret.expose());
        self.local = Some(Local {
            token,
            bearer,
            generation,
            claims,
        });
    }

    /// Resume parked requests when a token is usable; fail them at once when
    /// the last failure is one that waiting will not fix.
    fn settle(&mut self, now_ms: u64, commands: &mut Vec<Command>) {
        if self.parked.is_empty() {
            return;
        }
        if self.local.as_ref().is_some_and(|l| l.token.usable(now_ms)) {
            commands.push(Command::Resume(self.parked.take_all()));
            return;
        }
        if let Some(failure) = &self.failure {
            if failure.cause.class() != FailureClass::Transient {
                let diagnosis = Diagnosis::for_failure(failure, &self.spec, now_ms);
                commands.push(Command::Reject(self.parked.take_all(), diagnosis));
            } else if !self.fallback_targets.is_empty() {
                let offered = self.parked.offer(&self.fallback_targets);
                if !offered.is_empty() {
                    let code = Diagnosis::for_failure(failure, &self.spec, now_ms).code;
                    commands.push(Command::OfferFallback(offered, code));
                }
            }
        }
    }

    /// Answer requests that have waited `token_wait_timeout_ms` (monotonic).
    fn expire_parked(&mut self, mono_ms: u64, now_ms: u64, commands: &mut Vec<Command>) {
        let limit = self.spec.token_wait_timeout_ms;
        let Some(cutoff) = mono_ms.checked_sub(limit) else {
            return;
        };
        let expired = self.parked.take_arrived_by(cutoff);
        if expired.is_empty() {
            return;
        }
        let diagnosis = match &self.failure {
            Some(f) => Diagnosis::for_failure(f, &self.spec, now_ms),
            None => Diagnosis::waited(&self.spec),
        };
        commands.push(Command::Reject(expired, diagnosis));
    }
}

/// What an `http` source's new value means, for the log and the metrics:
/// a rotation (a different value than the one serving) is logged and
/// counted once, by fingerprint; the same value again only at debug level.
fn credential_news(token: &Token, previous: Option<String>, now_ms: u64) -> Vec<Command> {
    let now = token.secret.fingerprint();
    let next = token.refresh_at_ms().saturating_sub(now_ms) / 1000;
    let expiry = match token.refresh_after_ms {
        Some(_) => "names no expiry".to_owned(),
        None => format!(
            "expires in {} s",
            token.expires_at_ms.saturating_sub(now_ms) / 1000
        ),
    };
    match previous {
        Some(before) if before == now => vec![Command::Log(
            Level::Debug,
            format!("credential unchanged (sha256 {now}…); {expiry}, next poll in {next} s"),
        )],
        Some(before) => vec![
            Command::Record(Event::Rotated),
            Command::Log(
                Level::Info,
                format!(
                    "credential rotated: sha256 {before}… → {now}…; {expiry}, next poll in {next} s"
                ),
            ),
        ],
        None => vec![Command::Log(
            Level::Info,
            format!("credential acquired (sha256 {now}…); {expiry}, next poll in {next} s"),
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::code;
    use crate::store::memory::MemoryStore;

    const T0: u64 = 1_763_752_300_000;

    fn token(now_ms: u64, lifetime_s: u64, value: &str) -> Token {
        Token {
            secret: Secret::new(value.into()),
            obtained_at_ms: now_ms,
            expires_at_ms: now_ms + lifetime_s * 1000,
            refresh_after_ms: None,
        }
    }

    /// The token of the default configuration's Azure OpenAI target.
    fn spec() -> TokenSpec {
        let config = crate::config::Config::default();
        config.tokens[config.targets[1].token].clone()
    }

    /// `n` VMs sharing one store, as Envoy's workers do.
    fn vms(n: u32) -> (Vec<Agent>, MemoryStore) {
        let mut store = MemoryStore::default();
        let spec = spec();
        store::ensure_record(&mut store, &Agent::record_key(&spec)).unwrap();
        (
            (0..n)
                .map(|vm| Agent::new(spec.clone(), vm, u64::from(vm)))
                .collect(),
            store,
        )
    }

    /// What `admit` answers for a usable token, whatever its generation.
    fn authorized(bearer: &str) -> AuthorizedAs<'_> {
        AuthorizedAs(bearer)
    }

    struct AuthorizedAs<'a>(&'a str);

    impl PartialEq<AuthorizedAs<'_>> for Admission<'_> {
        fn eq(&self, other: &AuthorizedAs<'_>) -> bool {
            matches!(self, Admission::Authorize { bearer, .. } if *bearer == other.0)
        }
    }

    impl std::fmt::Debug for AuthorizedAs<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Authorize({})", self.0)
        }
    }

    fn fetches(commands: &[Command]) -> usize {
        commands
            .iter()
            .filter(|c| matches!(c, Command::Dispatch(_)))
            .count()
    }

    fn resumed(commands: &[Command]) -> Vec<u32> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Resume(waiters) => {
                    Some(waiters.iter().map(|w| w.request).collect::<Vec<_>>())
                }
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn rejected(commands: &[Command]) -> Option<(Vec<u32>, Diagnosis)> {
        commands.iter().find_map(|c| match c {
            Command::Reject(waiters, d) => {
                Some((waiters.iter().map(|w| w.request).collect(), d.clone()))
            }
            _ => None,
        })
    }

    #[test]
    fn cold_burst_on_four_workers_makes_exactly_one_fetch_and_resumes_everyone() {
        let (mut agents, mut store) = vms(4);
        let mut total_fetches = 0;
        let mut kicks = 0;
        for (i, agent) in agents.iter_mut().enumerate() {
            for r in 0..25 {
                match agent.admit(T0, (i * 100 + r) as u32, 0) {
                    Admission::Park { kick } => kicks += usize::from(kick),
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(kicks, 4, "one kick per VM, not per request");
        for agent in agents.iter_mut() {
            total_fetches += fetches(&agent.sync(T0 + 1, &mut store));
        }
        assert_eq!(total_fetches, 1);
        let leader = 0;
        let commands =
            agents[leader].fetched(T0 + 300, &mut store, Ok(token(T0 + 300, 86_400, "tok")));
        assert!(commands.contains(&Command::NotifyOthers));
        let mut woken = resumed(&commands).len();
        for agent in agents.iter_mut().skip(1) {
            let commands = agent.sync(T0 + 301, &mut store);
            assert_eq!(fetches(&commands), 0);
            woken += resumed(&commands).len();
            assert_eq!(agent.bearer(), Some("Bearer tok"));
        }
        assert_eq!(woken, 100);
    }

    #[test]
    fn a_configured_token_is_fetched_at_start_up_before_any_request() {
        let (mut agents, mut store) = vms(1);
        assert_eq!(fetches(&agents[0].tick(T0, &mut store)), 1);
    }

    #[test]
    fn a_token_nobody_asked_for_is_not_fetched_until_a_request_needs_it() {
        let mut store = MemoryStore::default();
        let spec = TokenSpec {
            prefetch: false,
            ..spec()
        };
        store::ensure_record(&mut store, &Agent::record_key(&spec)).unwrap();
        let mut agents: Vec<Agent> = (0..2)
            .map(|vm| Agent::new(spec.clone(), vm, u64::from(vm)))
            .collect();
        assert_eq!(fetches(&agents[0].tick(T0, &mut store)), 0);
        assert_eq!(fetches(&agents[0].tick(T0 + 60_000, &mut store)), 0);
        agents[1].admit(T0 + 60_001, 1, 0);
        assert_eq!(fetches(&agents[1].sync(T0 + 60_002, &mut store)), 1);
        agents[1].fetched(T0 + 60_010, &mut store, Ok(token(T0 + 60_010, 60, "t")));
        // The other VM learns of it by notification and keeps it fresh from then on.
        agents[0].sync(T0 + 60_011, &mut store);
        assert_eq!(agents[0].bearer(), Some("Bearer t"));
        assert_eq!(
            fetches(&agents[0].tick(T0 + 60_010 + 30_000, &mut store)),
            1
        );
    }

    #[test]
    fn usable_token_is_served_from_the_local_copy_without_touching_shared_data() {
        let (mut agents, mut store) = vms(1);
        agents[0].admit(T0, 1, 0);
        agents[0].sync(T0, &mut store);
        agents[0].fetched(T0, &mut store, Ok(token(T0, 3600, "tok")));
        let writes = store.writes;
        for i in 0..1000 {
            assert_eq!(
                agents[0].admit(T0 + i, 10 + i as u32, 0),
                authorized("Bearer tok")
            );
        }
        assert_eq!(store.writes, writes);
    }

    #[test]
    fn token_within_the_skew_margin_is_never_used() {
        let (mut agents, mut store) = vms(1);
        agents[0].sync(T0, &mut store);
        agents[0].fetched(T0, &mut store, Ok(token(T0, 8, "short")));
        // 8 s token: margin 2 s, so usable until T0 + 6 s exactly.
        assert_eq!(
            agents[0].admit(T0 + 5_999, 1, 0),
            authorized("Bearer short")
        );
        assert!(matches!(
            agents[0].admit(T0 + 6_000, 2, 0),
            Admission::Park { .. }
        ));
    }

    #[test]
    fn refresh_starts_at_half_life_on_one_worker_while_others_keep_serving() {
        let (mut agents, mut store) = vms(3);
        agents[0].sync(T0, &mut store);
        agents[0].fetched(T0, &mut store, Ok(token(T0, 60, "old")));
        for agent in agents.iter_mut().skip(1) {
            agent.sync(T0 + 1, &mut store);
        }
        let half = T0 + 30_000;
        assert_eq!(
            agents
                .iter_mut()
                .map(|a| fetches(&a.tick(half - 1, &mut store)))
                .sum::<usize>(),
            0
        );
        let started: usize = agents
            .iter_mut()
            .map(|a| fetches(&a.tick(half, &mut store)))
            .sum();
        assert_eq!(started, 1, "single flight across workers");
        for (i, agent) in agents.iter_mut().enumerate() {
            assert_eq!(
                agent.admit(half + 10, i as u32, 0),
                authorized("Bearer old")
            );
        }
        let leader = agents
            .iter()
            .position(|a| a.fetch_started_ms.is_some())
            .unwrap();
        agents[leader].fetched(half + 200, &mut store, Ok(token(half + 200, 60, "new")));
        for agent in agents.iter_mut() {
            agent.sync(half + 201, &mut store);
            assert_eq!(agent.bearer(), Some("Bearer new"));
        }
    }

    #[test]
    fn a_refresh_failure_never_reaches_requests_while_the_old_token_is_usable() {
        let (mut agents, mut store) = vms(1);
        agents[0].sync(T0, &mut store);
        agents[0].fetched(T0, &mut store, Ok(token(T0, 60, "old")));
        let half = T0 + 30_000;
        assert_eq!(fetches(&agents[0].tick(half, &mut store)), 1);
        let failed = agents[0].fetched(half + 10, &mut store, Err(FetchFailure::NoResponse));
        assert!(rejected(&failed).is_none());
        assert_eq!(agents[0].admit(half + 20, 1, 0), authorized("Bearer old"));
        // Backoff is respected, then the refresh is tried again.
        assert_eq!(fetches(&agents[0].tick(half + 11, &mut store)), 0);
        assert_eq!(fetches(&agents[0].tick(half + 10 + 501, &mut store)), 1);
    }

    #[test]
    fn once_the_token_is_unusable_a_long_backoff_is_cut_to_the_urgent_cap() {
        let (mut agents, mut store) = vms(1);
        let a = &mut agents[0];
        a.sync(T0, &mut store);
        a.fetched(T0, &mut store, Ok(token(T0, 8, "short")));
        // The refresh has failed nine times; the next try is scheduled 30 s out.
        let failed_at = T0 + 5_000;
        store::update(&mut store, a.key(), |r| {
            let mut r = r.unwrap();
            r.failure = Some(Failure {
                cause: FetchFailure::NoResponse,
                attempts: 9,
                retry_at_ms: failed_at + 30_000,
                at_ms: failed_at,
            });
            Decision::Write(r, ())
        })
        .unwrap();
        // While the token is usable, the schedule stands.
        assert_eq!(fetches(&a.sync(T0 + 5_900, &mut store)), 0);
        // Past its margin (6 s), requests wait: the retry comes within the urgent cap.
        assert!(matches!(a.admit(T0 + 6_500, 1, 0), Admission::Park { .. }));
        let urgent = failed_at + crate::lifecycle::URGENT_CAP_MS;
        assert_eq!(fetches(&a.sync(urgent - 1, &mut store)), 0);
        assert_eq!(fetches(&a.sync(urgent, &mut store)), 1);
    }

    #[test]
    fn identity_not_found_rejects_parked_requests_on_every_worker_at_once() {
        let (mut agents, mut store) = vms(2);
        agents[0].admit(T0, 1, 0);
        agents[1].admit(T0, 2, 0);
        assert_eq!(fetches(&agents[0].sync(T0, &mut store)), 1);
        assert_eq!(fetches(&agents[1].sync(T0, &mut store)), 0);
        let failure = FetchFailure::Status {
            status: 400,
            error: Some("invalid_request".into()),
            description: Some("Identity not found".into()),
            codes: Vec::new(),
        };
        let commands = agents[0].fetched(T0 + 5, &mut store, Err(failure));
        let (ids, d) = rejected(&commands).unwrap();
        assert_eq!(
            (ids, d.status, d.code),
            (vec![1], 401, code::MANAGED_IDENTITY_NOT_FOUND)
        );
        let (ids, d) = rejected(&agents[1].sync(T0 + 6, &mut store)).unwrap();
        assert_eq!((ids, d.code), (vec![2], code::MANAGED_IDENTITY_NOT_FOUND));
        // A request arriving later fails at once too, without a new fetch.
        agents[1].admit(T0 + 10, 3, 0);
        let commands = agents[1].sync(T0 + 10, &mut store);
        assert_eq!(fetches(&commands), 0);
        assert_eq!(rejected(&commands).unwrap().0, vec![3]);
    }

    #[test]
    fn a_failed_fetch_tells_forward_key_targets_the_code_and_a_token_or_a_first_attempt_does_not() {
        let (mut agents, mut store) = vms(1);
        let agent = &mut agents[0];
        assert_eq!(
            agent.unavailable(T0),
            None,
            "no attempt has ended yet: wait"
        );
        agent.admit(T0, 1, 0);
        assert_eq!(fetches(&agent.sync(T0, &mut store)), 1);
        agent.fetched(T0 + 5, &mut store, Err(FetchFailure::NoResponse));
        assert_eq!(
            agent.unavailable(T0 + 6),
            Some(code::TOKEN_ENDPOINT_UNREACHABLE)
        );
        agent.sync(T0 + 10_000, &mut store);
        agent.fetched(T0 + 10_005, &mut store, Ok(token(T0 + 10_005, 3600, "tok")));
        assert_eq!(agent.unavailable(T0 + 10_006), None, "a token serves again");
    }

    #[test]
    fn a_transient_failure_offers_forward_key_waiters_their_key_once_and_keeps_the_rest_waiting() {
        let (mut agents, mut store) = vms(1);
        let agent = &mut agents[0];
        agent.forward_keys_for(vec![1]);
        agent.admit(T0, 10, 0);
        agent.admit(T0, 11, 1);
        assert_eq!(fetches(&agent.sync(T0, &mut store)), 1);
        let commands = agent.fetched(T0 + 5, &mut store, Err(FetchFailure::NoResponse));
        let offers: Vec<_> = commands
            .iter()
            .filter_map(|c| match c {
                Command::OfferFallback(waiters, code) => Some((waiters.clone(), *code)),
                _ => None,
            })
            .collect();
        assert_eq!(
            offers,
            [(
                vec![Waiter {
                    request: 11,
                    target: 1
                }],
                code::TOKEN_ENDPOINT_UNREACHABLE
            )]
        );
        assert!(
            rejected(&commands).is_none(),
            "the other target's request waits"
        );
        assert_eq!(
            agent.parked(),
            2,
            "offered requests stay until the glue forgets them"
        );
        let again = agent.sync(T0 + 6, &mut store);
        assert!(
            !again
                .iter()
                .any(|c| matches!(c, Command::OfferFallback(..))),
            "offered once"
        );
    }

    fn http_spec(credential: &str) -> TokenSpec {
        let config = crate::config::Config::parse(
            format!(
                r#"{{"hosts":["myres.openai.azure.com"],"token_source":{{"type":"http","cluster":"keys",
                    "path":"/key","credential":"{credential}","refresh_interval_ms":60000}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        config.tokens[0].clone()
    }

    fn issued(value: &str, now_ms: u64, refresh_ms: u64) -> Token {
        crate::token::parse_credential(
            Some(200),
            format!(r#"{{"key":"{value}"}}"#).as_bytes(),
            now_ms,
            refresh_ms,
            None,
        )
        .unwrap()
        .token
    }

    #[test]
    fn an_api_key_credential_is_sent_as_is_and_a_bearer_one_with_its_scheme() {
        for (kind, expected) in [("api_key", "key-1"), ("bearer", "Bearer key-1")] {
            let spec = http_spec(kind);
            let mut store = MemoryStore::default();
            store::ensure_record(&mut store, &Agent::record_key(&spec)).unwrap();
            let mut agent = Agent::new(spec, 0, 0);
            agent.admit(T0, 1, 0);
            agent.sync(T0, &mut store);
            agent.fetched(T0 + 1, &mut store, Ok(issued("key-1", T0 + 1, 60_000)));
            assert_eq!(agent.admit(T0 + 2, 2, 0), authorized(expected), "{kind}");
        }
    }

    #[test]
    fn a_rotated_credential_is_logged_by_fingerprint_and_counted_once() {
        let spec = http_spec("api_key");
        let mut store = MemoryStore::default();
        store::ensure_record(&mut store, &Agent::record_key(&spec)).unwrap();
        let mut agent = Agent::new(spec, 0, 0);
        agent.admit(T0, 1, 0);
        agent.sync(T0, &mut store);
        let first = agent.fetched(T0 + 1, &mut store, Ok(issued("key-1", T0 + 1, 60_000)));
        let rotations = |commands: &[Command]| {
            commands
                .iter()
                .filter(|c| matches!(c, Command::Record(Event::Rotated)))
                .count()
        };
        let line = |commands: &[Command], level: Level| {
            commands.iter().find_map(|c| match c {
                Command::Log(l, line) if *l == level && line.contains("credential") => {
                    Some(line.clone())
                }
                _ => None,
            })
        };
        assert_eq!(rotations(&first), 0);
        let acquired = line(&first, Level::Info).unwrap();
        let fp1 = Secret::new("key-1".into()).fingerprint();
        assert!(
            acquired.contains(&fp1) && acquired.contains("names no expiry"),
            "{acquired}"
        );
        // The poll interval passes: the same value again is no rotation.
        assert_eq!(fetches(&agent.tick(T0 + 60_001, &mut store)), 1);
        let same = agent.fetched(
            T0 + 60_002,
            &mut store,
            Ok(issued("key-1", T0 + 60_002, 60_000)),
        );
        assert_eq!(rotations(&same), 0);
        assert!(line(&same, Level::Info).is_none());
        assert!(line(&same, Level::Debug).unwrap().contains("unchanged"));
        // A new value is one rotation, named by both fingerprints.
        assert_eq!(fetches(&agent.tick(T0 + 120_003, &mut store)), 1);
        let rotated = agent.fetched(
            T0 + 120_004,
            &mut store,
            Ok(issued("key-2", T0 + 120_004, 60_000)),
        );
        assert_eq!(rotations(&rotated), 1);
        let fp2 = Secret::new("key-2".into()).fingerprint();
        let news = line(&rotated, Level::Info).unwrap();
        assert!(news.contains(&format!("{fp1}… → {fp2}…")), "{news}");
        for command in first.iter().chain(&same).chain(&rotated) {
            assert!(!format!("{command:?}").contains("key-"), "{command:?}");
        }
        assert_eq!(agent.admit(T0 + 120_005, 9, 0), authorized("key-2"));
    }

    #[test]
    fn parked_request_gets_a_diagnosis_exactly_at_the_wait_bound() {
        let (mut agents, mut store) = vms(1);
        agents[0].admit(T0, 7, 0);
        agents[0].sync(T0, &mut store);
        assert!(rejected(&agents[0].tick(T0 + 4_999, &mut store)).is_none());
        let (ids, d) = rejected(&agents[0].tick(T0 + 5_000, &mut store)).unwrap();
        assert_eq!(
            (ids, d.status, d.code),
            (vec![7], 503, code::TOKEN_WAIT_TIMEOUT)
        );
    }

    #[test]
    fn parked_request_that_timed_out_after_a_transient_failure_is_told_the_cause() {
        let (mut agents, mut store) = vms(1);
        agents[0].admit(T0, 7, 0);
        agents[0].sync(T0, &mut store);
        let f = FetchFailure::Status {
            status: 503,
            error: None,
            description: None,
            codes: Vec::new(),
        };
        assert!(rejected(&agents[0].fetched(T0 + 10, &mut store, Err(f))).is_none());
        let (_, d) = rejected(&agents[0].tick(T0 + 5_000, &mut store)).unwrap();
        assert_eq!((d.status, d.code), (503, code::TOKEN_ENDPOINT_UNAVAILABLE));
        assert!(d.retry_after_s.is_some());
    }

    #[test]
    fn a_vm_that_leaves_refreshing_ahead_fetches_only_when_no_usable_token_is_left() {
        let (mut agents, mut store) = vms(2);
        agents[1].refresh_ahead(false);
        assert_eq!(fetches(&agents[0].sync(T0, &mut store)), 1);
        agents[0].fetched(T0 + 5, &mut store, Ok(token(T0 + 5, 3600, "t")));
        let first = token(T0 + 5, 3600, "t");
        let (due, unusable) = (first.refresh_at_ms(), first.unusable_at_ms());
        assert!(due < unusable);
        // Refresh due: the follower leaves it to the other VM, and adopts
        // what that one fetched.
        assert_eq!(fetches(&agents[1].tick(due, &mut store)), 0);
        assert_eq!(fetches(&agents[1].sync(due, &mut store)), 0);
        assert_eq!(fetches(&agents[0].tick(due, &mut store)), 1);
        agents[0].fetched(due + 5, &mut store, Ok(token(due + 5, 3600, "u")));
        assert_eq!(fetches(&agents[1].sync(due + 6, &mut store)), 0);
        assert_eq!(agents[1].admit(due + 6, 1, 0), authorized("Bearer u"));
        // Nobody refreshed in time: the follower fetches for its own waiters.
        let (mut agents, mut store) = vms(1);
        agents[0].refresh_ahead(false);
        assert_eq!(fetches(&agents[0].sync(T0, &mut store)), 1, "no token yet");
        agents[0].fetched(T0 + 5, &mut store, Ok(token(T0 + 5, 3600, "t")));
        assert_eq!(fetches(&agents[0].sync(due, &mut store)), 0);
        assert!(matches!(
            agents[0].admit(unusable, 2, 0),
            Admission::Park { .. }
        ));
        assert_eq!(fetches(&agents[0].sync(unusable, &mut store)), 1);
    }

    #[test]
    fn a_lease_whose_holder_vanished_is_taken_over_after_it_lapses() {
        let (mut agents, mut store) = vms(2);
        assert_eq!(fetches(&agents[0].sync(T0, &mut store)), 1);
        // VM 0 disappears with its call. VM 1 waits for the lease to lapse.
        let lease = agents[1].lease_ms();
        assert_eq!(lease, 12_000);
        assert_eq!(fetches(&agents[1].sync(T0 + lease - 1, &mut store)), 0);
        assert_eq!(fetches(&agents[1].sync(T0 + lease, &mut store)), 1);
    }

    #[test]
    fn a_vm_going_away_gives_up_its_lease_and_another_fetches_at_once() {
        let (mut agents, mut store) = vms(3);
        assert_eq!(fetches(&agents[0].sync(T0, &mut store)), 1);
        // A VM without the lease has nothing to give up and says nothing.
        assert_eq!(agents[2].abandon(&mut store), Vec::new());
        assert_eq!(fetches(&agents[1].sync(T0 + 1, &mut store)), 0);
        // VM 0's configuration is reloaded away with its call in flight.
        assert_eq!(agents[0].abandon(&mut store), vec![Command::NotifyOthers]);
        assert_eq!(fetches(&agents[1].sync(T0 + 2, &mut store)), 1);
        assert_eq!(agents[0].abandon(&mut store), Vec::new(), "only once");
    }

    #[test]
    fn a_disconnected_parked_request_is_forgotten() {
        let (mut agents, mut store) = vms(1);
        agents[0].admit(T0, 1, 0);
        agents[0].admit(T0, 2, 0);
        agents[0].forget(1);
        agents[0].sync(T0, &mut store);
        let commands = agents[0].fetched(T0 + 5, &mut store, Ok(token(T0 + 5, 3600, "t")));
        assert_eq!(resumed(&commands), vec![2]);
    }

    #[test]
    fn only_the_first_parked_request_kicks_until_the_root_has_synced() {
        let (mut agents, mut store) = vms(1);
        assert_eq!(agents[0].admit(T0, 1, 0), Admission::Park { kick: true });
        assert_eq!(agents[0].admit(T0, 2, 0), Admission::Park { kick: false });
        agents[0].sync(T0, &mut store);
        assert_eq!(agents[0].admit(T0, 3, 0), Admission::Park { kick: true });
    }

    fn generation(admission: Admission<'_>) -> u64 {
        match admission {
            Admission::Authorize { generation, .. } => generation,
            other => panic!("{other:?}"),
        }
    }

    /// VM 0 fetches the token "bad"; VM 1 authorizes a request with it,
    /// which the upstream rejects: its generation, and what `invalidate` said.
    fn second_vm_sees_rejected(
        agents: &mut [Agent],
        store: &mut MemoryStore,
    ) -> (u64, Replacement, Vec<Command>) {
        agents[0].sync(T0, store);
        agents[0].fetched(T0, store, Ok(token(T0, 3600, "bad")));
        agents[1].sync(T0, store);
        let rejected = generation(agents[1].admit(T0 + 10, 1, 0));
        let (replacement, commands) = agents[1].invalidate(T0 + 20, store, rejected);
        (rejected, replacement, commands)
    }

    #[test]
    fn a_rejected_token_keeps_serving_while_exactly_one_replacement_is_fetched() {
        let (mut agents, mut store) = vms(2);
        let (rejected, replacement, commands) = second_vm_sees_rejected(&mut agents, &mut store);
        assert_eq!(replacement, Replacement::Requested);
        assert!(
            commands.contains(&Command::Kick),
            "the root is woken to fetch"
        );
        assert!(commands.contains(&Command::Record(Event::Invalidated)));
        // Nobody parks: the token still serves on both workers.
        assert_eq!(agents[1].admit(T0 + 21, 2, 0), authorized("Bearer bad"));
        assert_eq!(agents[0].admit(T0 + 21, 3, 0), authorized("Bearer bad"));
        // A second rejection of the same token asks for nothing more.
        assert_eq!(
            agents[0].invalidate(T0 + 22, &mut store, rejected).0,
            Replacement::Pending
        );
        // Exactly one worker fetches, even when both sync (notification, tick).
        let started = fetches(&agents[1].sync(T0 + 23, &mut store))
            + fetches(&agents[0].tick(T0 + 24, &mut store))
            + fetches(&agents[1].tick(T0 + 25, &mut store));
        assert_eq!(started, 1);
        agents[1].fetched(T0 + 30, &mut store, Ok(token(T0 + 30, 3600, "good")));
        agents[0].sync(T0 + 31, &mut store);
        for agent in agents.iter_mut() {
            assert_eq!(agent.admit(T0 + 32, 9, 0), authorized("Bearer good"));
        }
    }

    #[test]
    fn a_vm_that_cannot_wake_when_idle_leaves_the_replacement_to_one_that_can() {
        let (mut agents, mut store) = vms(2);
        agents[1].refresh_ahead(false);
        let (_, replacement, commands) = second_vm_sees_rejected(&mut agents, &mut store);
        assert_eq!(replacement, Replacement::Requested);
        assert!(
            commands.contains(&Command::NotifyOthers) && !commands.contains(&Command::Kick),
            "the VMs that wake when idle are told; this one is not kicked: {commands:?}"
        );
        // It keeps serving the token and never leads the fetch itself.
        assert_eq!(fetches(&agents[1].sync(T0 + 21, &mut store)), 0);
        assert_eq!(fetches(&agents[1].tick(T0 + 22, &mut store)), 0);
        assert_eq!(agents[1].admit(T0 + 23, 2, 0), authorized("Bearer bad"));
        assert_eq!(fetches(&agents[0].sync(T0 + 24, &mut store)), 1);
        agents[0].fetched(T0 + 30, &mut store, Ok(token(T0 + 30, 3600, "good")));
        agents[1].sync(T0 + 31, &mut store);
        assert_eq!(agents[1].admit(T0 + 32, 3, 0), authorized("Bearer good"));
    }

    #[test]
    fn rejections_ask_for_a_replacement_at_most_once_per_interval() {
        let (mut agents, mut store) = vms(1);
        let a = &mut agents[0];
        a.sync(T0, &mut store);
        a.fetched(T0, &mut store, Ok(token(T0, 3600, "t1")));
        let first = generation(a.admit(T0, 1, 0));
        assert_eq!(
            a.invalidate(T0 + 1, &mut store, first).0,
            Replacement::Requested
        );
        assert_eq!(fetches(&a.sync(T0 + 2, &mut store)), 1);
        a.fetched(T0 + 3, &mut store, Ok(token(T0 + 3, 3600, "t2")));
        let second = generation(a.admit(T0 + 4, 2, 0));
        // Still rejected (say, a wrong audience): no new fetch until the interval has passed.
        assert_eq!(
            a.invalidate(T0 + 5, &mut store, second).0,
            Replacement::RateLimited {
                again_in_ms: 59_996
            }
        );
        assert_eq!(fetches(&a.tick(T0 + 6, &mut store)), 0);
        assert_eq!(a.admit(T0 + 6, 3, 0), authorized("Bearer t2"));
        assert_eq!(
            a.invalidate(T0 + 1 + 60_000, &mut store, second).0,
            Replacement::Requested
        );
        assert_eq!(a.admit(T0 + 1 + 60_000, 4, 0), authorized("Bearer t2"));
    }

    #[test]
    fn the_endpoint_returning_the_same_token_stops_invalidation_for_the_interval() {
        let (mut agents, mut store) = vms(1);
        let a = &mut agents[0];
        a.sync(T0, &mut store);
        a.fetched(T0, &mut store, Ok(token(T0, 3600, "cached")));
        let g = generation(a.admit(T0, 1, 0));
        a.invalidate(T0 + 1, &mut store, g);
        assert_eq!(fetches(&a.sync(T0 + 2, &mut store)), 1);
        // IMDS caches tokens: it answers with the same one.
        let commands = a.fetched(T0 + 3, &mut store, Ok(token(T0 + 3, 3600, "cached")));
        assert!(commands.iter().any(
            |c| matches!(c, Command::Log(Level::Warn, l) if l.contains("returned the same token"))
        ));
        assert_eq!(
            a.generation(),
            Some(g),
            "the same token keeps its generation"
        );
        assert_eq!(
            a.invalidate(T0 + 10, &mut store, g).0,
            Replacement::SameTokenReturned {
                again_in_ms: 59_991
            }
        );
        assert_eq!(fetches(&a.tick(T0 + 11, &mut store)), 0, "no new fetch");
        assert_eq!(a.admit(T0 + 12, 2, 0), authorized("Bearer cached"));
    }

    #[test]
    fn a_rejection_of_an_already_replaced_token_changes_nothing() {
        let (mut agents, mut store) = vms(1);
        let a = &mut agents[0];
        a.sync(T0, &mut store);
        a.fetched(T0, &mut store, Ok(token(T0, 60, "old")));
        let old = generation(a.admit(T0, 1, 0));
        a.tick(T0 + 30_000, &mut store);
        a.fetched(T0 + 30_001, &mut store, Ok(token(T0 + 30_001, 60, "new")));
        let (replacement, commands) = a.invalidate(T0 + 30_002, &mut store, old);
        assert_eq!(replacement, Replacement::AlreadyReplaced);
        assert!(commands.is_empty());
        assert_eq!(a.admit(T0 + 30_003, 2, 0), authorized("Bearer new"));
    }

    const HOUR_MS: u64 = 3_600_000;

    #[test]
    fn a_backward_clock_step_cannot_keep_a_lease_alive() {
        let (mut agents, mut store) = vms(2);
        agents[0].admit(T0, 1, 0);
        assert_eq!(fetches(&agents[0].sync(T0, &mut store)), 1);
        // VM 0 went away with its call; then the clock steps back an hour.
        agents[1].admit(T0 + 100, 2, 0);
        assert_eq!(fetches(&agents[1].sync(T0 - HOUR_MS, &mut store)), 1);
    }

    #[test]
    fn parked_requests_get_their_answer_at_the_bound_across_a_backward_clock_step() {
        let (mut agents, mut store) = vms(1);
        let a = &mut agents[0];
        a.admit(T0, 7, 0);
        a.sync(T0, &mut store);
        // One second later the wall clock jumps an hour back (the next tick sees
        // it); four more seconds pass.
        assert!(rejected(&a.tick(T0 + 1_000, &mut store)).is_none());
        let back = T0 + 1_000 - HOUR_MS;
        assert!(rejected(&a.tick(back, &mut store)).is_none());
        assert!(rejected(&a.tick(back + 3_999, &mut store)).is_none());
        let (ids, d) = rejected(&a.tick(back + 4_000, &mut store)).unwrap();
        assert_eq!((ids, d.code), (vec![7], code::TOKEN_WAIT_TIMEOUT));
    }

    #[test]
    fn a_call_in_flight_across_a_backward_clock_step_lapses_on_time() {
        let (mut agents, mut store) = vms(1);
        let a = &mut agents[0];
        a.admit(T0, 1, 0);
        assert_eq!(fetches(&a.sync(T0, &mut store)), 1);
        // The host never answers; the clock steps back an hour meanwhile.
        let back = T0 - HOUR_MS;
        a.tick(back, &mut store);
        a.admit(back + 12_000, 2, 0);
        assert_eq!(
            fetches(&a.tick(back + 12_000, &mut store)),
            1,
            "fetched again after the lease time"
        );
    }

    #[test]
    fn backoff_written_before_a_backward_clock_step_does_not_hold_the_next_fetch() {
        let (mut agents, mut store) = vms(1);
        let a = &mut agents[0];
        a.admit(T0, 1, 0);
        a.sync(T0, &mut store);
        a.fetched(T0 + 5, &mut store, Err(FetchFailure::NoResponse));
        assert_eq!(fetches(&a.sync(T0 + 6, &mut store)), 0, "backing off");
        assert_eq!(fetches(&a.sync(T0 + 6 - HOUR_MS, &mut store)), 1);
    }

    #[test]
    fn an_answer_for_another_audience_is_never_installed() {
        let (mut agents, mut store) = vms(1);
        let a = &mut agents[0];
        a.admit(T0, 1, 0);
        a.sync(T0, &mut store);
        let body = br#"{"access_token":"a.b.c","expires_in":"3600","resource":"https://management.azure.com"}"#;
        let commands = a.answered(T0 + 5, &mut store, Some(200), body);
        assert_eq!(a.bearer(), None);
        let (ids, d) = rejected(&commands).unwrap();
        assert_eq!((ids, d.code), (vec![1], code::TOKEN_AUDIENCE_MISMATCH));
    }

    #[test]
    fn log_lines_never_contain_the_token() {
        let (mut agents, mut store) = vms(1);
        agents[0].sync(T0, &mut store);
        let commands = agents[0].fetched(T0, &mut store, Ok(token(T0, 3600, "SECRET-TOKEN-VALUE")));
        for c in &commands {
            if let Command::Log(_, line) = c {
                assert!(!line.contains("SECRET-TOKEN-VALUE"), "{line}");
            }
        }
        assert!(!format!("{:?}", agents[0]).contains("SECRET-TOKEN-VALUE"));
    }
}
