//! proxy-wasm glue: callbacks in, decisions of the pure modules, host calls out.
//!
//! One root context per VM (per Envoy worker, plus two on the main thread)
//! owns the compiled configuration, one [`Agent`] per distinct token, and a
//! notification queue; request contexts find their target, then borrow that
//! target's agent only to ask whether a token is ready. Token calls are always
//! dispatched by the root, so a client hanging up cannot cancel them; each
//! call's answer is routed to the agent that made it (an unknown call id is
//! dropped), and each notification names the record it is about.
//!
//! Every value read from the host is bytes, decoded by [`crate::wire`]; a
//! value that does not decode is absent. Nothing here can panic on input.

mod abi;
mod host;
mod metrics;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::agent::{Agent, Command, Event, Level, Replacement, Waiter};
use crate::annotate::{self, BodyMode, BodyStep, Facts, Inspection};
use crate::config::Config;
use crate::diagnose::{Diagnosis, DIAGNOSIS_HEADER};
use crate::limiter::LogLimiter;
use crate::metrics as m;
use crate::policy::{OnTokenFailure, FALLBACK_HEADER};
use crate::request::{self, Arrival, Decision, Refusal};
use crate::rewrite::{API_KEY_HEADER, AUTHORIZATION_HEADER};
use crate::route::{NearMiss, Routed, ORIGINAL_DST_HEADER};
use crate::safe;
use crate::source::{CredentialKind, TokenRequest};
use crate::store;
use crate::token::MAX_RESPONSE_BYTES;
use crate::upstream::{self, UpstreamFailure};
use crate::wire;
use host::HostStore;
use metrics::Metrics;

/// How often each VM checks for refresh, lapsed leases and waiting requests.
const TICK: Duration = Duration::from_millis(250);
/// Process-wide counter naming each VM's lease and queue.
const SEQUENCE_KEY: &str = "aoai-msi-filter/v2/vm-sequence";
/// Process-wide list of live VMs' notification queues.
const QUEUES_KEY: &str = "aoai-msi-filter/v2/queues";
/// Messages drained from a queue per wake-up; each names a token record.
const DRAIN_LIMIT: usize = 64;
/// The log limiter's key for requests no target took.
const NEAR_MISS: &str = "near-miss";
/// Waiting requests resumed or answered per VM entry. Each resumption runs
/// Envoy's filter chain for that request inside the same VM call, and V8's
/// stack does not survive thousands in one (measured: 1 000 fine, 2 500 a
/// RangeError); the rest follow on the next entries, through this VM's queue.
const BATCH: usize = 200;
/// The queue message that says: carry on with the deferred batches.
const DEFERRED: &[u8] = b"aoai-msi-filter/deferred";

proxy_wasm::main! {{
    host::install_logger();
    std::panic::set_hook(Box::new(|info| host::log_critical(&format!("aoai-msi-filter: {info}"))));
    proxy_wasm::set_root_context(|id| Box::new(Root { id, vm: None }));
}}

/// What the root context and the requests of one VM share.
struct Vm {
    root: u32,
    queue: u32,
    config: Config,
    /// One per token, in the order of `config.tokens`.
    agents: RefCell<Vec<Agent>>,
    /// Token calls in flight: call id → token.
    calls: RefCell<HashMap<u32, usize>>,
    /// Every request that waited for a token, from the moment it parked
    /// until its context goes away (dropped in one place: `Drop for Request`).
    held: RefCell<HashMap<u32, Held>>,
    metrics: RefCell<Metrics>,
    /// Per-request counts by target and gateway client, kept here and
    /// flushed on tick: no host call per request. Target `t`'s counts start
    /// at `slots[t]`: one without a client, then one per listed client.
    authorized: Vec<Cell<u64>>,
    slots: Vec<usize>,
    /// Requests that kept the application's own token, by target.
    kept: Vec<Cell<u64>>,
    passed_through: Cell<u64>,
    /// This VM's share of the waiting-requests gauge, by target, as last reported.
    waiting_reported: Vec<Cell<i64>>,
    /// When this VM last renewed its queue in the registry.
    heartbeat_ms: Cell<u64>,
    /// Targets whose requests Envoy was seen to send, after the filter's
    /// writes, to a cluster other than the one checked: refused from then on.
    refused: RefCell<Vec<Option<Refusal>>>,
    log_limiter: RefCell<LogLimiter>,
    /// Batches of waiting requests still to resume or answer (see [`BATCH`]).
    deferred: RefCell<VecDeque<(usize, Command)>>,
    /// Token clusters Envoy refused a call to, already reported.
    undispatchable: RefCell<HashSet<String>>,
}

/// What the root knows of a request that waited for a token.
#[derive(Debug, Default)]
struct Held {
    /// The gateway client its key named, for its count when it goes on.
    client: Option<usize>,
    /// In a deferred batch: still held, whatever its body or trailers do.
    deferred: bool,
    /// How the root let it go, until its response headers take it.
    released: Option<Released>,
    /// The `:path` it leaves with (its query without the api-key), if it
    /// changes: decided when it parked, so the wake-up reads nothing again.
    path: Option<String>,
    /// It brought an api-key of its own (header or query).
    carries_key: bool,
}

#[derive(Debug, Clone, Copy)]
enum Released {
    /// With the token of this generation.
    Authorized(u64),
    /// With its own key, for want of a token (the diagnosis code).
    FellBack(&'static str),
}

impl Vm {
    fn target_name(&self, target: u32) -> &str {
        self.config
            .targets
            .get(target as usize)
            .map_or("", |t| t.name.as_str())
    }

    fn token_label(&self, token: usize) -> &str {
        self.config
            .tokens
            .get(token)
            .map_or("", |t| t.label.as_str())
    }

    fn count_authorized(&self, target: u32, client: Option<usize>) {
        let slot = self
            .slots
            .get(target as usize)
            .map(|base| base + client.map_or(0, |c| c + 1));
        if let Some(count) = slot.and_then(|slot| self.authorized.get(slot)) {
            count.set(count.get() + 1);
        }
    }

    fn forwards_key(&self, target: u32) -> bool {
        self.config
            .targets
            .get(target as usize)
            .is_some_and(|t| t.policy.on_token_failure == OnTokenFailure::ForwardKey)
    }

    fn credential_kind(&self, token: usize) -> CredentialKind {
        self.config
            .tokens
            .get(token)
            .map_or(CredentialKind::Bearer, |t| t.source.credential())
    }

    /// A request of `target` went on with its own key because no token
    /// could be had: count it, and say so in the log (rate-limited).
    fn note_fallback(&self, target: u32, code: &'static str) {
        let name = self.target_name(target);
        if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
            metrics.add(m::KEY_FALLBACKS, &[name, code], 1);
        }
        let now = host::now_ms();
        if self
            .log_limiter
            .try_borrow_mut()
            .is_ok_and(|mut l| l.allow(FALLBACK_HEADER, now))
        {
            log::warn!(
                "target {name}: no token ({code}): requests go on with their own api-key \
                 (on_token_failure: forward_key) until a token is back"
            );
        }
    }

    /// Answer the current request with `diagnosis` for `target`, counted.
    fn reply(&self, target: u32, diagnosis: &Diagnosis) {
        let owned = diagnosis.headers();
        let headers: Vec<(&str, &str)> = owned.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let name = self.target_name(target);
        let _ = host::send_local_reply(diagnosis.status, &headers, &diagnosis.body_for(name));
        if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
            metrics.add(m::LOCAL_REPLIES, &[name, diagnosis.code], 1);
        }
    }

    /// Let token `token`'s agent decide, then carry out what it decided.
    fn drive(&self, token: usize, decide: impl FnOnce(&mut Agent, u64) -> Vec<Command>) {
        let commands = match self.agents.try_borrow_mut() {
            Ok(mut agents) => match agents.get_mut(token) {
                Some(agent) => decide(agent, host::now_ms()),
                None => return,
            },
            Err(_) => return,
        };
        self.execute(token, commands);
        self.report_waiting();
    }

    /// Bring this VM's share of each target's waiting gauge to what the
    /// agents hold: called after everything that can park or release a
    /// request, so the gauge cannot drift whatever path released them.
    fn report_waiting(&self) {
        let Ok(agents) = self.agents.try_borrow() else {
            return;
        };
        for (target, reported) in self.waiting_reported.iter().enumerate() {
            let Some(agent) = self
                .config
                .targets
                .get(target)
                .and_then(|t| agents.get(t.token))
            else {
                continue;
            };
            let now = i64::try_from(agent.parked_for(target as u32)).unwrap_or(i64::MAX);
            let delta = now - reported.replace(now);
            if delta != 0 {
                if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
                    metrics.add(
                        m::REQUESTS_WAITING,
                        &[self.target_name(target as u32)],
                        delta,
                    );
                }
            }
        }
    }

    fn execute(&self, token: usize, commands: Vec<Command>) {
        let mut pending = VecDeque::from(commands);
        while let Some(command) = pending.pop_front() {
            match command {
                Command::Dispatch(request) => {
                    if let Err(more) = self.dispatch_token_call(token, &request) {
                        pending.extend(more);
                    }
                }
                Command::NotifyOthers => {
                    let now = host::now_ms();
                    let queues = store::queues(&HostStore, QUEUES_KEY, now).unwrap_or_default();
                    let key = self.record_key(token);
                    for queue in queues.into_iter().filter(|q| *q != self.queue) {
                        let _ = host::enqueue(queue, key.as_bytes());
                    }
                }
                Command::Kick => {
                    let _ = host::enqueue(self.queue, self.record_key(token).as_bytes());
                }
                Command::Resume(mut waiters) => {
                    if let Some(rest) = self.batch(&mut waiters) {
                        self.defer(token, Command::Resume(rest));
                    }
                    self.resume(token, waiters)
                }
                Command::Reject(mut waiters, diagnosis) => {
                    if let Some(rest) = self.batch(&mut waiters) {
                        self.defer(token, Command::Reject(rest, diagnosis.clone()));
                    }
                    let mut forwarded = 0;
                    for waiter in &waiters {
                        if host::enter(waiter.request).is_err() {
                            continue;
                        }
                        // The way back to keys: the request goes on as it came.
                        if self.forwards_key(waiter.target) && self.carries_key(waiter.request) {
                            let code = diagnosis.code;
                            self.with_held(waiter.request, |h| {
                                h.released = Some(Released::FellBack(code))
                            });
                            let _ = host::resume_request();
                            self.note_fallback(waiter.target, diagnosis.code);
                            forwarded += 1;
                            continue;
                        }
                        self.reply(waiter.target, &diagnosis);
                    }
                    let _ = host::enter(self.root);
                    if forwarded == waiters.len() {
                        continue;
                    }
                    // One line per diagnosis per interval, however many requests.
                    let now = host::now_ms();
                    if self
                        .log_limiter
                        .try_borrow_mut()
                        .is_ok_and(|mut l| l.allow(diagnosis.code, now))
                    {
                        log::warn!(
                            "target {}: answered {} waiting request(s) with {} {}: {}",
                            self.token_label(token),
                            waiters.len(),
                            diagnosis.status,
                            diagnosis.code,
                            diagnosis.message
                        );
                    }
                }
                Command::OfferFallback(mut waiters, code) => {
                    if let Some(rest) = self.batch(&mut waiters) {
                        self.defer(token, Command::OfferFallback(rest, code));
                    }
                    let mut sent = Vec::new();
                    for waiter in &waiters {
                        if self.carries_key(waiter.request) && host::enter(waiter.request).is_ok() {
                            self.with_held(waiter.request, |h| {
                                h.released = Some(Released::FellBack(code))
                            });
                            let _ = host::resume_request();
                            self.note_fallback(waiter.target, code);
                            sent.push(waiter.request);
                        }
                    }
                    let _ = host::enter(self.root);
                    if let Ok(mut agents) = self.agents.try_borrow_mut() {
                        if let Some(agent) = agents.get_mut(token) {
                            for request in &sent {
                                agent.forget(*request);
                            }
                        }
                    }
                }
                Command::Log(level, line) => {
                    let label = self.token_label(token);
                    match level {
                        Level::Debug => log::debug!("target {label}: {line}"),
                        Level::Info => log::info!("target {label}: {line}"),
                        Level::Warn => log::warn!("target {label}: {line}"),
                    }
                }
                Command::Record(event) => self.record(token, event),
            }
        }
    }

    /// Did this held request bring a key of its own?
    fn carries_key(&self, request: u32) -> bool {
        self.held
            .try_borrow()
            .is_ok_and(|held| held.get(&request).is_some_and(|h| h.carries_key))
    }

    /// Change what the root knows of a held request (if it is still held).
    fn with_held(&self, request: u32, change: impl FnOnce(&mut Held)) {
        if let Ok(mut held) = self.held.try_borrow_mut() {
            if let Some(entry) = held.get_mut(&request) {
                change(entry);
            }
        }
    }

    /// Keep the first [`BATCH`] waiters for now (no longer deferred, if
    /// they were); the rest, if any, for later.
    fn batch(&self, waiters: &mut Vec<Waiter>) -> Option<Vec<Waiter>> {
        let rest = (waiters.len() > BATCH).then(|| waiters.split_off(BATCH));
        for waiter in waiters.iter() {
            self.with_held(waiter.request, |h| h.deferred = false);
        }
        rest
    }

    /// Carry `command` out on a later entry into this VM.
    fn defer(&self, token: usize, command: Command) {
        if let Command::Resume(w) | Command::Reject(w, _) | Command::OfferFallback(w, _) = &command
        {
            for waiter in w {
                self.with_held(waiter.request, |h| h.deferred = true);
            }
        }
        let first = match self.deferred.try_borrow_mut() {
            Ok(mut deferred) => {
                deferred.push_back((token, command));
                deferred.len() == 1
            }
            Err(_) => false,
        };
        if first {
            let _ = host::enqueue(self.queue, DEFERRED);
        }
    }

    /// The next deferred batch, from a fresh VM entry; a reminder for the
    /// one after it.
    fn run_deferred(&self) {
        let next = self
            .deferred
            .try_borrow_mut()
            .ok()
            .and_then(|mut d| d.pop_front());
        if let Some((token, command)) = next {
            self.execute(token, vec![command]);
            self.report_waiting();
        }
        if self.deferred.try_borrow().is_ok_and(|d| !d.is_empty()) {
            let _ = host::enqueue(self.queue, DEFERRED);
        }
    }

    /// Is this request still held: parked, or in a deferred batch?
    fn holds(&self, request: u32) -> bool {
        self.agents
            .try_borrow()
            .map_or(true, |agents| agents.iter().any(|a| a.is_parked(request)))
            || self
                .held
                .try_borrow()
                .map_or(true, |held| held.get(&request).is_some_and(|h| h.deferred))
    }

    fn record_key(&self, token: usize) -> String {
        self.agents
            .try_borrow()
            .ok()
            .and_then(|agents| agents.get(token).map(|a| a.key().to_owned()))
            .unwrap_or_default()
    }

    fn dispatch_token_call(
        &self,
        token: usize,
        request: &TokenRequest,
    ) -> Result<(), Vec<Command>> {
        let headers: Vec<(&str, &str)> = request
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        let timeout = Duration::from_millis(request.timeout_ms);
        match host::dispatch(&request.cluster, &headers, &request.body, timeout) {
            Ok(call) => {
                if let Ok(mut calls) = self.calls.try_borrow_mut() {
                    calls.insert(call, token);
                }
                Ok(())
            }
            Err(status) => {
                let first = self
                    .undispatchable
                    .try_borrow_mut()
                    .is_ok_and(|mut seen| seen.insert(request.cluster.clone()));
                let line = format!(
                    "target {}: cannot dispatch the token call to cluster \"{}\" (host status {}): \
                     no such cluster in this Envoy? `envoy --mode validate` does not check it; \
                     add the cluster or fix token_source.cluster",
                    self.token_label(token),
                    safe::free_text(&request.cluster, 200),
                    status.0
                );
                // Once at critical level, so it stands out at start-up.
                if first {
                    host::log_critical(&line);
                } else {
                    log::warn!("{line}");
                }
                match self.agents.try_borrow_mut() {
                    Ok(mut agents) => match agents.get_mut(token) {
                        Some(agent) => Err(agent.dispatch_failed(
                            host::now_ms(),
                            &mut HostStore,
                            &request.cluster,
                        )),
                        None => Ok(()),
                    },
                    Err(_) => Ok(()),
                }
            }
        }
    }

    fn resume(&self, token: usize, waiters: Vec<Waiter>) {
        let credential = self.agents.try_borrow().ok().and_then(|agents| {
            let agent = agents.get(token)?;
            Some((agent.bearer()?.to_owned(), agent.generation()?))
        });
        let Some((bearer, generation)) = credential else {
            return;
        };
        let kind = self.credential_kind(token);
        for waiter in &waiters {
            let (client, path) = self
                .held
                .try_borrow_mut()
                .ok()
                .and_then(|mut held| {
                    held.get_mut(&waiter.request)
                        .map(|h| (h.client, h.path.take()))
                })
                .unwrap_or_default();
            if host::enter(waiter.request).is_err() {
                continue;
            }
            let written =
                host::send_credential(kind, &bearer).and_then(|()| rewrite_path(path.as_deref()));
            match written {
                Ok(()) => {
                    self.with_held(waiter.request, |h| {
                        h.released = Some(Released::Authorized(generation))
                    });
                    let _ = host::resume_request();
                    self.count_authorized(waiter.target, client);
                }
                // Never sent half rewritten: closed, with the reason.
                Err(status) => {
                    self.reply(waiter.target, &Diagnosis::credential_not_written(status.0))
                }
            }
        }
        let _ = host::enter(self.root);
    }

    fn record(&self, token: usize, event: Event) {
        let Ok(mut metrics) = self.metrics.try_borrow_mut() else {
            return;
        };
        let label = self.token_label(token);
        let kind = self
            .config
            .tokens
            .get(token)
            .map_or("", |t| t.source.kind());
        match event {
            Event::Fetched {
                outcome,
                duration_ms,
            } => {
                metrics.add(m::TOKEN_FETCHES, &[label, kind, &outcome], 1);
                if let Some(ms) = duration_ms {
                    metrics.set(m::TOKEN_FETCH_DURATION, &[label], ms);
                }
            }
            Event::RefreshStarted => metrics.add(m::TOKEN_REFRESHES, &[label], 1),
            Event::Invalidated => metrics.add(m::TOKEN_INVALIDATIONS, &[label], 1),
            Event::Rotated => metrics.add(m::CREDENTIAL_ROTATIONS, &[label], 1),
        }
    }

    /// Renew this VM's queue in the registry every heartbeat, so notifiers
    /// skip (and drop) the queues of VMs that went away.
    fn heartbeat(&self, now_ms: u64) {
        if now_ms.saturating_sub(self.heartbeat_ms.get()) < store::HEARTBEAT_MS
            && self.heartbeat_ms.get() <= now_ms
        {
            return;
        }
        self.heartbeat_ms.set(now_ms);
        match store::register_queue(&mut HostStore, QUEUES_KEY, self.queue, now_ms) {
            Ok(live) => {
                if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
                    metrics.set(m::NOTIFICATION_QUEUES, &[], live as u64);
                }
            }
            Err(e) => log::debug!("cannot renew the notification queue: {e}"),
        }
    }

    /// Per-tick bookkeeping: flush request counters, refresh the expiry gauges.
    fn flush_metrics(&self, now_ms: u64) {
        let expiries: Vec<u64> = match self.agents.try_borrow() {
            Ok(agents) => agents
                .iter()
                .map(|a| {
                    a.expires_at_ms()
                        .map_or(0, |at| at.saturating_sub(now_ms) / 1000)
                })
                .collect(),
            Err(_) => return,
        };
        let Ok(mut metrics) = self.metrics.try_borrow_mut() else {
            return;
        };
        for (target, base) in self.slots.iter().enumerate() {
            let name = self.target_name(target as u32);
            let clients = self
                .config
                .targets
                .get(target)
                .and_then(|t| t.policy.client_keys.as_ref());
            let labels = std::iter::once("").chain(clients.into_iter().flat_map(|k| k.names()));
            for (offset, client) in labels.enumerate() {
                let n = self
                    .authorized
                    .get(base + offset)
                    .map_or(0, |c| c.replace(0));
                if n > 0 {
                    metrics.add(m::REQUESTS_AUTHORIZED, &[name, client], n as i64);
                }
            }
            let kept = self.kept.get(target).map_or(0, |c| c.replace(0));
            if kept > 0 {
                metrics.add(m::CLIENT_TOKENS_KEPT, &[name], kept as i64);
            }
        }
        let passed = self.passed_through.replace(0);
        if passed > 0 {
            metrics.add(m::REQUESTS_PASSED_THROUGH, &[], passed as i64);
        }
        for (token, seconds) in expiries.into_iter().enumerate() {
            metrics.set(m::TOKEN_EXPIRES_IN, &[self.token_label(token)], seconds);
        }
    }

    /// A request no target took, though it looks like one a target meant: say why.
    fn note_near_miss(&self, authority: &str, miss: NearMiss) {
        let now = host::now_ms();
        if self
            .log_limiter
            .try_borrow_mut()
            .is_ok_and(|mut l| l.allow(NEAR_MISS, now))
        {
            let host = safe::or(Some(authority), safe::host, annotate::placeholder::HOST);
            log::info!("request to {host} {}", miss.explain());
        }
    }
}

impl Drop for Vm {
    /// The VM's configuration went away (a reload), and Envoy cancels its
    /// token calls: give up their leases so that another VM fetches at once,
    /// stop being notified, and take this VM's share out of the waiting
    /// gauges.
    fn drop(&mut self) {
        let abandoned: Vec<(usize, Vec<Command>)> = match self.agents.try_borrow_mut() {
            Ok(mut agents) => agents
                .iter_mut()
                .enumerate()
                .map(|(token, agent)| (token, agent.abandon(&mut HostStore)))
                .collect(),
            Err(_) => Vec::new(),
        };
        for (token, commands) in abandoned {
            self.execute(token, commands);
        }
        let _ = store::unregister_queue(&mut HostStore, QUEUES_KEY, self.queue);
        for (target, reported) in self.waiting_reported.iter().enumerate() {
            let waiting = reported.replace(0);
            if waiting != 0 {
                if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
                    metrics.add(
                        m::REQUESTS_WAITING,
                        &[self.target_name(target as u32)],
                        -waiting,
                    );
                }
            }
        }
    }
}

struct Root {
    id: u32,
    vm: Option<Rc<Vm>>,
}

impl Root {
    fn configure(&self, config: Config) -> Result<Vm, String> {
        let mut store = HostStore;
        let sequence = store::next_sequence(&mut store, SEQUENCE_KEY).unwrap_or(self.id);
        let mut agents = Vec::with_capacity(config.tokens.len());
        for (token, spec) in config.tokens.iter().enumerate() {
            let mut agent = Agent::new(spec.clone(), sequence, host::random_seed());
            agent.forward_keys_for(
                (0u32..)
                    .zip(&config.targets)
                    .filter(|(_, t)| {
                        t.token == token && t.policy.on_token_failure == OnTokenFailure::ForwardKey
                    })
                    .map(|(index, _)| index)
                    .collect(),
            );
            store::ensure_record(&mut store, agent.key()).map_err(|e| e.to_string())?;
            agents.push(agent);
        }
        let queue = host::register_queue(&format!("aoai-msi-filter/v2/queue/{sequence}"))
            .map_err(|s| format!("cannot register a shared queue (host status {})", s.0))?;
        let now = host::now_ms();
        store::register_queue(&mut store, QUEUES_KEY, queue, now).map_err(|e| e.to_string())?;
        host::set_tick(TICK)
            .map_err(|s| format!("cannot set a tick period (host status {})", s.0))?;
        for target in &config.targets {
            let hosts: Vec<String> = target
                .hosts
                .patterns()
                .iter()
                .map(|p| p.to_string())
                .collect();
            let token = &config.tokens[target.token];
            log::debug!(
                "vm {sequence}: target {} hosts [{}] paths [{}] clusters [{}]: resource {}, {}",
                target.name,
                hosts.join(", "),
                target.paths.join(", "),
                target.clusters.join(", "),
                token.resource,
                token.source.describe()
            );
        }
        let targets = config.targets.len();
        // Counter slots: per target, one without a client and one per client.
        let mut slots = Vec::with_capacity(targets + 1);
        let mut next = 0;
        for target in &config.targets {
            slots.push(next);
            next += 1 + target.policy.client_keys.as_ref().map_or(0, |k| k.len());
        }
        slots.push(next);
        Ok(Vm {
            root: self.id,
            queue,
            agents: RefCell::new(agents),
            calls: RefCell::new(HashMap::new()),
            held: RefCell::new(HashMap::new()),
            metrics: RefCell::new(Metrics::default()),
            authorized: (0..slots.last().copied().unwrap_or(0))
                .map(|_| Cell::new(0))
                .collect(),
            slots: slots[..targets].to_vec(),
            kept: (0..targets).map(|_| Cell::new(0)).collect(),
            passed_through: Cell::new(0),
            waiting_reported: (0..targets).map(|_| Cell::new(0)).collect(),
            heartbeat_ms: Cell::new(now),
            refused: RefCell::new(vec![None; targets]),
            log_limiter: RefCell::new(LogLimiter::default()),
            deferred: RefCell::new(VecDeque::new()),
            undispatchable: RefCell::new(HashSet::new()),
            config,
        })
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        call: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some(vm) = &self.vm else { return };
        // The agent that made this call; an unknown call id is dropped.
        let token = vm
            .calls
            .try_borrow_mut()
            .ok()
            .and_then(|mut calls| calls.remove(&call));
        let Some(token) = token else { return };
        let status = host::call_status();
        // Read one byte past the bound so an oversized body is recognised unread.
        let body = host::call_body(body_size.min(MAX_RESPONSE_BYTES + 1));
        vm.drive(token, |agent, now| {
            agent.answered(now, &mut HostStore, status, &body)
        });
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = match Config::parse_with_env(&host::plugin_configuration(), &host::env_var) {
            Ok(config) => config,
            Err(e) => {
                log::error!("invalid plugin configuration: {e}");
                return false;
            }
        };
        match self.configure(config) {
            Ok(vm) => {
                self.vm = Some(Rc::new(vm));
                true
            }
            Err(e) => {
                log::error!("cannot start: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(vm) = &self.vm else { return };
        for token in 0..vm.config.tokens.len() {
            vm.drive(token, |agent, now| agent.tick(now, &mut HostStore));
        }
        let now = host::now_ms();
        vm.heartbeat(now);
        vm.flush_metrics(now);
    }

    fn on_queue_ready(&mut self, queue: u32) {
        let messages = host::drain(queue, DRAIN_LIMIT);
        let Some(vm) = &self.vm else { return };
        // Each message names a record; records of other configurations are not ours.
        let tokens: Vec<usize> = match vm.agents.try_borrow() {
            Ok(agents) => agents
                .iter()
                .enumerate()
                .filter(|(_, a)| messages.iter().any(|m| m == a.key().as_bytes()))
                .map(|(token, _)| token)
                .collect(),
            Err(_) => return,
        };
        for token in tokens {
            vm.drive(token, |agent, now| agent.sync(now, &mut HostStore));
        }
        // One deferred batch per entry, however many reminders came.
        if messages.iter().any(|m| m == DEFERRED) {
            vm.run_deferred();
        }
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            id,
            vm: self.vm.clone(),
            host: String::new(),
            target: None,
            parked: false,
            authorized: None,
            client: None,
            fallback: None,
            inspection: None,
            checked: None,
            near_miss: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// What routing may ask beyond the host: the path, and the routed cluster
/// (read from the host at most once, and only if a target asks).
struct Lookups<'a> {
    /// `:path`, read with the other request headers.
    path: Option<&'a str>,
    /// The routed cluster, read from the host at most once.
    cluster: Option<Option<String>>,
    /// The request carries `x-envoy-original-dst-host`.
    names_destination: bool,
}

impl Routed for Lookups<'_> {
    fn path(&mut self) -> Option<&str> {
        self.path
    }

    fn cluster(&mut self) -> Option<&str> {
        self.cluster
            .get_or_insert_with(|| {
                host::routed_cluster().and_then(|bytes| String::from_utf8(bytes).ok())
            })
            .as_deref()
    }

    fn names_destination(&self) -> bool {
        self.names_destination
    }
}

struct Request {
    id: u32,
    vm: Option<Rc<Vm>>,
    /// `:authority` as the application sent it (kept for matched requests).
    host: String,
    /// The target the request matched, if any: only then is it ours.
    target: Option<u32>,
    parked: bool,
    /// Generation of the token this request left with, if it got one.
    authorized: Option<u64>,
    /// The gateway client its key named (`client_keys`), if any.
    client: Option<usize>,
    /// It went on with its own key, for want of a token: the diagnosis code.
    fallback: Option<&'static str>,
    inspection: Option<Inspection>,
    /// The cluster Envoy routed it to when the filter decided.
    checked: Option<String>,
    /// No target took it, though it looked like one a target meant, and it
    /// carried a key: an Azure 403 gets this reason as its diagnosis.
    near_miss: Option<NearMiss>,
}

impl Request {
    /// The upstream rejected the token this request carried: ask for a
    /// replacement (the root fetches it), and learn what became of it.
    fn token_rejected(&self, vm: &Vm, token: usize, generation: u64) -> Option<Replacement> {
        let (replacement, commands) = match vm.agents.try_borrow_mut() {
            Ok(mut agents) => {
                agents
                    .get_mut(token)?
                    .invalidate(host::now_ms(), &mut HostStore, generation)
            }
            Err(_) => return None,
        };
        // Only a kick, metrics and log lines: safe from a request.
        vm.execute(token, commands);
        Some(replacement)
    }

    /// Explain an upstream authorization failure: metric, log line, and, when
    /// the body is held for it, the annotated body.
    fn explain(&self, vm: &Vm, target: u32, inspection: &Inspection, rewrite: bool, size: usize) {
        let body = inspection.collected();
        let Some(failure) = upstream::classify(inspection.status, body) else {
            return;
        };
        let Some(token) = vm.config.targets.get(target as usize).map(|t| t.token) else {
            return;
        };
        // Read the token's claims before a rejection changes the record.
        let (claims, resource, source) = match vm.agents.try_borrow() {
            Ok(agents) => match agents.get(token) {
                Some(agent) => (
                    agent.claims().cloned(),
                    agent.spec().resource.clone(),
                    agent.spec().source.clone(),
                ),
                None => return,
            },
            Err(_) => return,
        };
        let replacement = match (&failure, self.authorized) {
            (
                UpstreamFailure::TokenRejected { .. } | UpstreamFailure::KeyRejected,
                Some(generation),
            ) => self.token_rejected(vm, token, generation),
            _ => None,
        };
        let facts = Facts {
            host: &self.host,
            token: self.authorized.and(claims.as_ref()),
            source: Some(&source),
        };
        let now = host::now_ms();
        let annotation = annotate::explain(&failure, &facts, &resource, now, replacement);
        let name = vm.target_name(target);
        if let Ok(mut metrics) = vm.metrics.try_borrow_mut() {
            metrics.add(m::UPSTREAM_AUTH_FAILURES, &[name, annotation.diagnosis], 1);
        }
        if vm
            .log_limiter
            .try_borrow_mut()
            .is_ok_and(|mut l| l.allow(annotation.diagnosis, now))
        {
            log::warn!(
                "target {name}: {}",
                annotation.log_line(inspection.status, &self.host)
            );
        }
        if rewrite {
            if let Some(annotated) = annotate::annotated_body(body, &annotation, name) {
                if let Err(status) = host::replace_response_body(size, annotated.as_bytes()) {
                    log::warn!(
                        "cannot annotate the response body (host status {})",
                        status.0
                    );
                }
            }
        }
    }
}

impl Request {
    /// A body chunk or the trailers must not release a request whose headers
    /// still wait for a token: Envoy would continue the headers unrewritten.
    /// (Envoy holds them itself while headers pause, unless the plugin sets
    /// allow_on_headers_stop_iteration; this is the safety net.)
    fn hold_while_parked(&self) -> Action {
        let still_parked = self.parked && self.vm.as_ref().is_some_and(|vm| vm.holds(self.id));
        if still_parked {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    /// Envoy matched the route again after the filter's writes: did the
    /// request go where the filter checked? If not, the target is refused
    /// from now on, and this answer says why.
    fn check_route(&self, vm: &Vm, target: u32) -> bool {
        let taken = host::routed_cluster().and_then(|bytes| String::from_utf8(bytes).ok());
        if request::went_where_checked(self.checked.as_deref(), taken.as_deref()) {
            return true;
        }
        let refusal = Refusal {
            checked: safe::free_text(self.checked.as_deref().unwrap_or("(none)"), 200),
            taken: safe::free_text(taken.as_deref().unwrap_or("(none)"), 200),
        };
        let name = vm.target_name(target);
        log::error!(
            "target {name}: Envoy sent a request to cluster \"{}\" after the filter had checked \"{}\" and \
             replaced its api-key with the token (a route matches on the api-key or authorization header, \
             or on the api-key query parameter). Every further request of this target is refused \
             ({}) until the routes match on host and path only and the configuration is reloaded",
            refusal.taken,
            refusal.checked,
            crate::diagnose::code::ROUTE_CHANGED_AFTER_REWRITE
        );
        if let Ok(mut metrics) = vm.metrics.try_borrow_mut() {
            metrics.add(m::ROUTE_CHANGES, &[name], 1);
        }
        if let Ok(mut refused) = vm.refused.try_borrow_mut() {
            if let Some(slot) = refused.get_mut(target as usize) {
                slot.get_or_insert(refusal);
            }
        }
        false
    }
}

impl Context for Request {}

/// `make build` removes the module's `proxy_on_log` and `proxy_on_done`
/// exports (`tools/trim-exports`), so Envoy does not enter the VM for them:
/// overriding `on_log` or `on_done` here would have no effect.
impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(vm) = self.vm.clone() else {
            return Action::Continue;
        };
        // Every request header in one host call: each separate read costs
        // another copy into the VM (measured by `make bench`: reading
        // `:authority` and `:path` apart cost 8 000 instructions more).
        let map = host::request_headers();
        let headers = wire::deserialize_pairs(&map).unwrap_or_default();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name.as_bytes())
                .map(|(_, v)| *v)
        };
        // An authority that is not plain text matches nothing.
        let arrival = Arrival {
            authority: header(":authority")
                .and_then(wire::text)
                .unwrap_or_default(),
            api_key: header(API_KEY_HEADER),
            authorization: header(AUTHORIZATION_HEADER),
        };
        let mut lookups = Lookups {
            path: header(":path").and_then(wire::text),
            cluster: None,
            names_destination: header(ORIGINAL_DST_HEADER).is_some(),
        };
        let now = host::now_ms();
        let Ok(mut agents) = vm.agents.try_borrow_mut() else {
            return Action::Continue;
        };
        let refused = vm.refused.try_borrow();
        let decision = request::decide(
            &vm.config,
            &mut agents,
            refused.as_ref().map_or(&[][..], |r| r.as_slice()),
            &arrival,
            &mut lookups,
            self.id,
            now,
        );
        drop(refused);
        // What the filter checked: the response tells where Envoy really sent it.
        self.checked = lookups.cluster.take().flatten();
        match decision {
            Decision::Pass { miss, explain_403 } => {
                drop(agents);
                vm.passed_through.set(vm.passed_through.get() + 1);
                if let Some(miss) = miss {
                    vm.note_near_miss(arrival.authority, miss);
                }
                self.near_miss = miss.filter(|_| explain_403);
                Action::Continue
            }
            Decision::Reply { target, diagnosis } => {
                drop(agents);
                self.target = Some(target);
                vm.reply(target, &diagnosis);
                Action::Pause
            }
            Decision::KeepClientToken { target, path } => {
                drop(agents);
                self.target = Some(target);
                self.host = arrival.authority.to_owned();
                if let Err(status) = host::remove_request_header(API_KEY_HEADER)
                    .and_then(|()| rewrite_path(path.as_deref()))
                {
                    vm.reply(target, &Diagnosis::credential_not_written(status.0));
                    return Action::Pause;
                }
                if let Some(kept) = vm.kept.get(target as usize) {
                    kept.set(kept.get() + 1);
                }
                Action::Continue
            }
            Decision::ForwardKey { target, code } => {
                drop(agents);
                self.target = Some(target);
                self.host = arrival.authority.to_owned();
                self.fallback = Some(code);
                vm.note_fallback(target, code);
                Action::Continue
            }
            Decision::Authorize {
                target,
                kind,
                credential,
                generation,
                client,
                path,
            } => {
                let written = host::send_credential(kind, credential)
                    .and_then(|()| rewrite_path(path.as_deref()));
                drop(agents);
                self.target = Some(target);
                self.host = arrival.authority.to_owned();
                if let Err(status) = written {
                    vm.reply(target, &Diagnosis::credential_not_written(status.0));
                    return Action::Pause;
                }
                self.authorized = Some(generation);
                self.client = client;
                vm.count_authorized(target, client);
                Action::Continue
            }
            Decision::Park {
                target,
                client,
                kick,
                path,
                carries_key,
            } => {
                let key = vm
                    .config
                    .targets
                    .get(target as usize)
                    .and_then(|t| agents.get(t.token))
                    .map(|a| a.key().as_bytes().to_vec());
                drop(agents);
                self.target = Some(target);
                self.host = arrival.authority.to_owned();
                self.parked = true;
                self.client = client;
                if let Ok(mut held) = vm.held.try_borrow_mut() {
                    held.insert(
                        self.id,
                        Held {
                            client,
                            path,
                            carries_key,
                            ..Held::default()
                        },
                    );
                }
                vm.report_waiting();
                if let (true, Some(key)) = (kick, key) {
                    let _ = host::enqueue(vm.queue, &key);
                }
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, _size: usize, _end_of_stream: bool) -> Action {
        self.hold_while_parked()
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        self.hold_while_parked()
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(target) = self.target else {
            // Answers to requests no target matched are not ours: untouched,
            // but for the one hint users need most. A 403 to a key sent to an
            // Azure AI host that no target took is Azure refusing the key
            // (AuthenticationTypeDisabled): say why the filter did not step in.
            if let Some(miss) = self.near_miss {
                if host::response_status() == Some(403) {
                    let _ = host::set_response_header(
                        DIAGNOSIS_HEADER,
                        Some(crate::diagnose::near_miss_code(miss)),
                    );
                }
            }
            return Action::Continue;
        };
        let Some(vm) = self.vm.clone() else {
            return Action::Continue;
        };
        if self.parked {
            // Let go by the root: learn how (the token it left with, or its
            // own key).
            let released = vm
                .held
                .try_borrow_mut()
                .ok()
                .and_then(|mut held| held.get_mut(&self.id).and_then(|h| h.released.take()));
            match released {
                Some(Released::Authorized(generation)) => self.authorized = Some(generation),
                Some(Released::FellBack(code)) => self.fallback = Some(code),
                None => {}
            }
        }
        if let Some(code) = self.fallback {
            // Sent with the application's own key: the answer is its own,
            // marked so the fallback is visible where the app looks.
            let _ = host::set_response_header(FALLBACK_HEADER, Some(code));
            return Action::Continue;
        }
        if self.authorized.is_some() && !self.check_route(&vm, target) {
            let code = crate::diagnose::code::ROUTE_CHANGED_AFTER_REWRITE;
            let _ = host::set_response_header(DIAGNOSIS_HEADER, Some(code));
            return Action::Continue;
        }
        let Some(status) = host::response_status() else {
            return Action::Continue;
        };
        let Some(code) = annotate::header_code(status, self.authorized.is_some()) else {
            return Action::Continue;
        };
        // Local replies of the filter itself carry their diagnosis already.
        if host::response_header(DIAGNOSIS_HEADER).is_some() {
            return Action::Continue;
        }
        let _ = host::set_response_header(DIAGNOSIS_HEADER, Some(code));
        let mode = BodyMode::choose(
            host::response_header("content-type").as_deref(),
            host::response_header("content-encoding").as_deref(),
            host::response_header("content-length").as_deref(),
        );
        if mode == BodyMode::Rewrite {
            // The body may change length; Envoy then sends it chunked.
            let _ = host::set_response_header("content-length", None);
        }
        self.inspection = Some(Inspection::new(status, mode));
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let Some(inspection) = self.inspection.as_mut() else {
            return Action::Continue;
        };
        let wanted = inspection.wants(size, end_of_stream);
        let chunk = if wanted > 0 {
            host::response_body(wanted)
        } else {
            Vec::new()
        };
        match inspection.body(&chunk, size, end_of_stream) {
            BodyStep::Hold => Action::Pause,
            BodyStep::Pass => Action::Continue,
            BodyStep::Explain { rewrite } => {
                if let (Some(inspection), Some(vm), Some(target)) =
                    (self.inspection.take(), self.vm.clone(), self.target)
                {
                    self.explain(&vm, target, &inspection, rewrite, size);
                }
                Action::Continue
            }
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let (true, Some(vm)) = (self.parked, &self.vm) {
            if let Ok(mut agents) = vm.agents.try_borrow_mut() {
                for agent in agents.iter_mut() {
                    agent.forget(self.id);
                }
            }
            vm.report_waiting();
            if let Ok(mut held) = vm.held.try_borrow_mut() {
                held.remove(&self.id);
            }
        }
    }
}

/// Give the current request this `:path` (its query without the api-key),
/// if there is one to give.
fn rewrite_path(path: Option<&str>) -> Result<(), host::Status> {
    match path {
        Some(path) => host::set_request_header(":path", path),
        None => Ok(()),
    }
}
