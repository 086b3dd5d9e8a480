//! One worker of the proxy, whatever the host: the compiled configuration,
//! one [`Agent`] per distinct token, the requests waiting for a token, and
//! the per-request counts — everything a host adapter would otherwise decide.
//!
//! A host adapter (proxy-wasm in `glue`, Envoy's dynamic modules in the
//! native build) owns one [`Worker`] per worker thread and one [`Stream`] per
//! request, turns its callbacks into calls here, and implements [`Host`] for
//! the operations that reach the proxy. Token calls are always dispatched by
//! the worker, not by a request, so a client hanging up cannot cancel them;
//! each call's answer is routed to the agent that made it (an unknown call id
//! is dropped), and each notification names the record it is about.
//!
//! State is in cells, borrowed only between host calls: resuming a request
//! can run the rest of the proxy's filter chain, and with it this worker's
//! response callbacks, before the host call returns.

mod host;
mod metrics;
mod stream;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

pub(crate) use host::say;
pub use host::{Host, Level, Status};
pub use stream::{Flow, Stream};

use crate::agent::{self, Agent, Command, Event, Waiter};
use crate::config::Config;
use crate::diagnose::annotate;
use crate::diagnose::Diagnosis;
use crate::limiter::LogLimiter;
use crate::metrics as m;
use crate::policy::{OnTokenFailure, FALLBACK_HEADER};
use crate::request::Refusal;
use crate::rewrite::{API_KEY_HEADER, AUTHORIZATION_HEADER};
use crate::route::NearMiss;
use crate::safe;
use crate::source::{CredentialKind, TokenRequest};
use crate::store;
use crate::token::FetchFailure;
use metrics::Metrics;

/// How often each worker checks for refresh, lapsed leases and waiting requests.
pub const TICK: Duration = Duration::from_millis(250);
/// Process-wide counter naming each worker's lease and queue.
const SEQUENCE_KEY: &str = "aoai-msi-filter/v2/vm-sequence";
/// Process-wide list of live workers' notification queues.
const QUEUES_KEY: &str = "aoai-msi-filter/v2/queues";
/// Messages drained from a queue per wake-up; each names a token record.
pub const DRAIN_LIMIT: usize = 64;
/// The log limiter's key for requests no target took.
const NEAR_MISS: &str = "near-miss";
/// Waiting requests resumed or answered per entry into the worker. Each
/// resumption runs Envoy's filter chain for that request inside the same
/// call, and a wasm VM's stack does not survive thousands in one (measured:
/// 1 000 fine, 2 500 a RangeError); the rest follow on the next entries,
/// through this worker's queue.
const BATCH: usize = 200;
/// The queue message that says: carry on with the deferred batches.
const DEFERRED: &[u8] = b"aoai-msi-filter/deferred";

/// What the worker and its requests share.
pub struct Worker {
    /// The host's own context for this worker (requests are left for it).
    queue: u32,
    config: Config,
    /// One per token, in the order of `config.tokens`.
    agents: RefCell<Vec<Agent>>,
    /// Token calls in flight: call id → token.
    calls: RefCell<HashMap<u32, usize>>,
    /// Every request that waited for a token, from the moment it parked
    /// until its stream goes away (dropped in one place: [`Stream::finish`]).
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
    /// This worker's share of the waiting-requests gauge, by target, as last reported.
    waiting_reported: Vec<Cell<i64>>,
    /// When this worker last renewed its queue in the registry.
    heartbeat_ms: Cell<u64>,
    /// Targets whose requests Envoy was seen to send, after the filter's
    /// writes, to a cluster other than the one checked: refused from then on.
    refused: RefCell<Vec<Option<Refusal>>>,
    log_limiter: RefCell<LogLimiter>,
    /// Batches of waiting requests still to resume or answer (see [`BATCH`]).
    deferred: RefCell<VecDeque<(usize, Command)>>,
    /// Token clusters the host refused a call to, already reported.
    undispatchable: RefCell<HashSet<String>>,
}

/// What the worker knows of a request that waited for a token.
#[derive(Debug, Default)]
struct Held {
    /// The gateway client its key named, for its count when it goes on.
    client: Option<usize>,
    /// In a deferred batch: still held, whatever its body or trailers do.
    deferred: bool,
    /// How the worker let it go, until its response headers take it.
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

/// The line a host logs when it refuses a configuration that does not
/// parse: worded alike by every host (users and tests look for it).
pub fn invalid_configuration(e: impl std::fmt::Display) -> String {
    format!("invalid plugin configuration: {e}")
}

/// The line a host logs when a valid configuration cannot start a worker.
pub fn cannot_start(e: impl std::fmt::Display) -> String {
    format!("cannot start: {e}")
}

impl Worker {
    /// A worker for `config`: its agents, its queue in the process-wide
    /// registry, its tick.
    /// A worker from the plugin configuration as the host hands it over,
    /// or `None` after saying why (the host then refuses the configuration).
    /// `fallback_id` numbers the worker if the shared store cannot.
    pub fn configure<H: Host>(
        h: &H,
        configuration: &[u8],
        env: crate::config::Env<'_>,
        fallback_id: u32,
    ) -> Option<Worker> {
        let config = Config::parse_with_host(configuration, env)
            .map_err(|e| say!(h, Error, "{}", invalid_configuration(e)))
            .ok()?;
        Worker::start(h, config, fallback_id)
            .map_err(|e| say!(h, Error, "{}", cannot_start(e)))
            .ok()
    }

    pub fn start<H: Host>(h: &H, config: Config, fallback_id: u32) -> Result<Worker, String> {
        let mut store = h.store();
        let sequence = store::next_sequence(&mut store, SEQUENCE_KEY).unwrap_or(fallback_id);
        let mut agents = Vec::with_capacity(config.tokens.len());
        for (token, spec) in config.tokens.iter().enumerate() {
            let mut agent = Agent::new(spec.clone(), sequence, h.random_seed());
            agent.forward_keys_for(config.forward_key_targets(token));
            agent.refresh_ahead(h.wakes_when_idle());
            store::ensure_record(&mut store, agent.key()).map_err(|e| e.to_string())?;
            agents.push(agent);
        }
        let queue = h
            .register_queue(&format!("aoai-msi-filter/v2/queue/{sequence}"))
            .map_err(|s| format!("cannot register a shared queue (host status {})", s.0))?;
        let now = h.now_ms();
        store::register_queue(&mut store, QUEUES_KEY, queue, now).map_err(|e| e.to_string())?;
        h.set_tick(TICK)
            .map_err(|s| format!("cannot set a tick period (host status {})", s.0))?;
        for target in &config.targets {
            let Some(token) = config.tokens.get(target.token) else {
                continue;
            };
            let hosts: Vec<String> = target
                .hosts
                .patterns()
                .iter()
                .map(|p| p.to_string())
                .collect();
            say!(
                h,
                Debug,
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
        let plan = config.slots();
        Ok(Worker {
            queue,
            agents: RefCell::new(agents),
            calls: RefCell::new(HashMap::new()),
            held: RefCell::new(HashMap::new()),
            metrics: RefCell::new(Metrics::default()),
            authorized: (0..plan.count).map(|_| Cell::new(0)).collect(),
            slots: plan.first,
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

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The answer to token call `call` (status and body as received; the
    /// body read at most [`crate::token::MAX_RESPONSE_BYTES`] + 1 bytes).
    pub fn answered<H: Host>(&self, h: &H, call: u32, status: Option<u16>, body: &[u8]) {
        // The agent that made this call; an unknown call id is dropped.
        let Some(token) = self.take_call(call) else {
            return;
        };
        self.drive(h, token, |agent, now| {
            agent.answered(now, &mut h.store(), status, body)
        });
    }

    /// Every [`TICK`]: refresh, lapsed leases, waiting requests, metrics.
    pub fn tick<H: Host>(&self, h: &H) {
        for token in 0..self.config.tokens.len() {
            self.drive(h, token, |agent, now| agent.tick(now, &mut h.store()));
        }
        let now = h.now_ms();
        self.heartbeat(h, now);
        self.flush_counts(h);
        self.report_expiries(h, now);
    }

    /// Report the per-request counts now, not at the next tick: for a host
    /// whose idle workers are not ticked (the native build's, between
    /// requests). The expiry gauges are left to the ticks: every worker
    /// would write the same values.
    pub fn flush<H: Host>(&self, h: &H) {
        self.flush_counts(h);
    }

    /// Messages from this worker's queue: records to adopt, deferred batches.
    pub fn queue_ready<H: Host>(&self, h: &H, messages: &[Vec<u8>]) {
        // Each message names a record; records of other configurations are not ours.
        let tokens: Vec<usize> = match self.agents.try_borrow() {
            Ok(agents) => agents
                .iter()
                .enumerate()
                .filter(|(_, a)| messages.iter().any(|m| m == a.key().as_bytes()))
                .map(|(token, _)| token)
                .collect(),
            Err(_) => return,
        };
        for token in tokens {
            self.drive(h, token, |agent, now| agent.sync(now, &mut h.store()));
        }
        // One deferred batch per entry, however many reminders came.
        if messages.iter().any(|m| m == DEFERRED) {
            self.run_deferred(h);
        }
    }

    /// The configuration went away (a reload), and the host cancels its
    /// token calls: give up their leases so that another worker fetches at
    /// once, stop being notified, and take this worker's share out of the
    /// waiting gauges.
    pub fn stop<H: Host>(&self, h: &H) {
        let abandoned: Vec<(usize, Vec<Command>)> = match self.agents.try_borrow_mut() {
            Ok(mut agents) => agents
                .iter_mut()
                .enumerate()
                .map(|(token, agent)| (token, agent.abandon(&mut h.store())))
                .collect(),
            Err(_) => Vec::new(),
        };
        for (token, commands) in abandoned {
            self.execute(h, token, commands);
        }
        let _ = store::unregister_queue(&mut h.store(), QUEUES_KEY, self.queue);
        for (target, reported) in self.waiting_reported.iter().enumerate() {
            let waiting = reported.replace(0);
            if waiting != 0 {
                self.metric_add(
                    h,
                    m::REQUESTS_WAITING,
                    &[self.target_name(target as u32)],
                    -waiting,
                );
            }
        }
    }

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

    fn metric_add<H: Host>(&self, h: &H, metric: m::Metric, labels: &[&str], delta: i64) {
        if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
            metrics.add(h, metric, labels, delta);
        }
    }

    /// Log at most one line per `key` per interval.
    fn allow_log(&self, key: &'static str, now_ms: u64) -> bool {
        self.log_limiter
            .try_borrow_mut()
            .is_ok_and(|mut l| l.allow(key, now_ms))
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

    fn count_kept(&self, target: u32) {
        if let Some(kept) = self.kept.get(target as usize) {
            kept.set(kept.get() + 1);
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
    fn note_fallback<H: Host>(&self, h: &H, target: u32, code: &'static str) {
        let name = self.target_name(target);
        self.metric_add(h, m::KEY_FALLBACKS, &[name, code], 1);
        if self.allow_log(FALLBACK_HEADER, h.now_ms()) {
            say!(
                h,
                Warn,
                "target {name}: no token ({code}): requests go on with their own api-key \
                 (on_token_failure: forward_key) until a token is back"
            );
        }
    }

    /// Answer the request in hand with `diagnosis` for `target`, counted.
    fn reply<H: Host>(&self, h: &H, target: u32, diagnosis: &Diagnosis) {
        let owned = diagnosis.headers();
        let headers: Vec<(&str, &str)> = owned.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let name = self.target_name(target);
        let _ = h.send_local_reply(diagnosis.status, &headers, &diagnosis.body_for(name));
        self.metric_add(h, m::LOCAL_REPLIES, &[name, diagnosis.code], 1);
    }

    /// Let token `token`'s agent decide, then carry out what it decided.
    fn drive<H: Host>(
        &self,
        h: &H,
        token: usize,
        decide: impl FnOnce(&mut Agent, u64) -> Vec<Command>,
    ) {
        let commands = match self.agents.try_borrow_mut() {
            Ok(mut agents) => match agents.get_mut(token) {
                Some(agent) => decide(agent, h.now_ms()),
                None => return,
            },
            Err(_) => return,
        };
        self.execute(h, token, commands);
        self.report_waiting(h);
    }

    /// Bring this worker's share of each target's waiting gauge to what the
    /// agents hold: called after everything that can park or release a
    /// request, so the gauge cannot drift whatever path released them.
    fn report_waiting<H: Host>(&self, h: &H) {
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
                self.metric_add(
                    h,
                    m::REQUESTS_WAITING,
                    &[self.target_name(target as u32)],
                    delta,
                );
            }
        }
    }

    fn execute<H: Host>(&self, h: &H, token: usize, commands: Vec<Command>) {
        let mut pending = VecDeque::from(commands);
        while let Some(command) = pending.pop_front() {
            match command {
                Command::Dispatch(request) => {
                    if let Err(more) = self.dispatch_token_call(h, token, &request) {
                        pending.extend(more);
                    }
                }
                Command::NotifyOthers => {
                    let queues =
                        store::queues(&h.store(), QUEUES_KEY, h.now_ms()).unwrap_or_default();
                    let key = self.record_key(token);
                    for queue in queues.into_iter().filter(|q| *q != self.queue) {
                        let _ = h.enqueue(queue, key.as_bytes());
                    }
                }
                Command::Kick => {
                    let _ = h.enqueue(self.queue, self.record_key(token).as_bytes());
                }
                Command::Resume(mut waiters) => {
                    if let Some(rest) = self.batch(&mut waiters) {
                        self.defer(h, token, Command::Resume(rest));
                    }
                    self.resume(h, token, waiters)
                }
                Command::Reject(mut waiters, diagnosis) => {
                    if let Some(rest) = self.batch(&mut waiters) {
                        self.defer(h, token, Command::Reject(rest, diagnosis.clone()));
                    }
                    self.reject(h, token, &waiters, &diagnosis);
                }
                Command::OfferFallback(mut waiters, code) => {
                    if let Some(rest) = self.batch(&mut waiters) {
                        self.defer(h, token, Command::OfferFallback(rest, code));
                    }
                    let mut sent = Vec::new();
                    for waiter in &waiters {
                        if self.carries_key(waiter.request) && h.enter(waiter.request).is_ok() {
                            self.fall_back(h, waiter, code);
                            sent.push(waiter.request);
                        }
                    }
                    h.leave();
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
                        agent::Level::Debug => say!(h, Debug, "target {label}: {line}"),
                        agent::Level::Info => say!(h, Info, "target {label}: {line}"),
                        agent::Level::Warn => say!(h, Warn, "target {label}: {line}"),
                    }
                }
                Command::Record(event) => self.record(h, token, event),
            }
        }
    }

    /// The entered waiter goes on as it came, with its own key.
    fn fall_back<H: Host>(&self, h: &H, waiter: &Waiter, code: &'static str) {
        self.with_held(waiter.request, |held| {
            held.released = Some(Released::FellBack(code))
        });
        let _ = h.resume_request();
        self.note_fallback(h, waiter.target, code);
    }

    /// No token for these waiters: each goes on with its own key where its
    /// target allows it, or is answered with `diagnosis`.
    fn reject<H: Host>(&self, h: &H, token: usize, waiters: &[Waiter], diagnosis: &Diagnosis) {
        let mut forwarded = 0;
        for waiter in waiters {
            if h.enter(waiter.request).is_err() {
                continue;
            }
            // The way back to keys: the request goes on as it came.
            if self.forwards_key(waiter.target) && self.carries_key(waiter.request) {
                self.fall_back(h, waiter, diagnosis.code);
                forwarded += 1;
                continue;
            }
            self.reply(h, waiter.target, diagnosis);
        }
        h.leave();
        // One line per diagnosis per interval, however many requests.
        if forwarded < waiters.len() && self.allow_log(diagnosis.code, h.now_ms()) {
            say!(
                h,
                Warn,
                "target {}: answered {} waiting request(s) with {} {}: {}",
                self.token_label(token),
                waiters.len(),
                diagnosis.status,
                diagnosis.code,
                diagnosis.message
            );
        }
    }

    /// Did this held request bring a key of its own?
    fn carries_key(&self, request: u32) -> bool {
        self.held
            .try_borrow()
            .is_ok_and(|held| held.get(&request).is_some_and(|h| h.carries_key))
    }

    /// Change what the worker knows of a held request (if it is still held).
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

    /// Carry `command` out on a later entry into this worker.
    fn defer<H: Host>(&self, h: &H, token: usize, command: Command) {
        if let Command::Resume(w) | Command::Reject(w, _) | Command::OfferFallback(w, _) = &command
        {
            for waiter in w {
                self.with_held(waiter.request, |held| held.deferred = true);
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
            let _ = h.enqueue(self.queue, DEFERRED);
        }
    }

    /// The next deferred batch, from a fresh entry; a reminder for the one
    /// after it.
    fn run_deferred<H: Host>(&self, h: &H) {
        let next = self
            .deferred
            .try_borrow_mut()
            .ok()
            .and_then(|mut d| d.pop_front());
        if let Some((token, command)) = next {
            self.execute(h, token, vec![command]);
            self.report_waiting(h);
        }
        if self.deferred.try_borrow().is_ok_and(|d| !d.is_empty()) {
            let _ = h.enqueue(self.queue, DEFERRED);
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

    fn dispatch_token_call<H: Host>(
        &self,
        h: &H,
        token: usize,
        request: &TokenRequest,
    ) -> Result<(), Vec<Command>> {
        match h.dispatch(request) {
            Ok(call) => {
                if let Ok(mut calls) = self.calls.try_borrow_mut() {
                    calls.insert(call, token);
                }
                Ok(())
            }
            Err(status) => {
                let commands = self.dispatch_refused(h, token, &request.cluster, status);
                if commands.is_empty() {
                    Ok(())
                } else {
                    Err(commands)
                }
            }
        }
    }

    /// The token whose call this was, forgetting the call; `None` for an
    /// unknown (or already answered) call id.
    fn take_call(&self, call: u32) -> Option<usize> {
        self.calls
            .try_borrow_mut()
            .ok()
            .and_then(|mut calls| calls.remove(&call))
    }

    /// A token call the host answered itself with `failure`, without
    /// sending it (the native build reads the workload-identity token file
    /// instead of calling the listener that serves it).
    pub fn failed<H: Host>(&self, h: &H, call: u32, failure: FetchFailure) {
        let Some(token) = self.take_call(call) else {
            return;
        };
        self.drive(h, token, |agent, now| {
            agent.failed(now, &mut h.store(), failure)
        });
    }

    /// A token call the host took but could not send after all (a host that
    /// sends from another thread learns late that the cluster is unknown):
    /// the same as a refused dispatch.
    pub fn undispatched<H: Host>(&self, h: &H, call: u32, cluster: &str, status: Status) {
        let Some(token) = self.take_call(call) else {
            return;
        };
        let commands = self.dispatch_refused(h, token, cluster, status);
        self.execute(h, token, commands);
        self.report_waiting(h);
    }

    /// Say that the host refused a token call to `cluster`, and let the agent decide.
    fn dispatch_refused<H: Host>(
        &self,
        h: &H,
        token: usize,
        cluster: &str,
        status: Status,
    ) -> Vec<Command> {
        let first = self
            .undispatchable
            .try_borrow_mut()
            .is_ok_and(|mut seen| seen.insert(cluster.to_owned()));
        let line = format!(
            "target {}: cannot dispatch the token call to cluster \"{}\" (host status {}): \
             no such cluster in this Envoy? `envoy --mode validate` does not check it; \
             add the cluster or fix token_source.cluster",
            self.token_label(token),
            safe::free_text(cluster, 200),
            status.0
        );
        // Once at critical level, so it stands out at start-up.
        h.log(if first { Level::Critical } else { Level::Warn }, &line);
        match self.agents.try_borrow_mut() {
            Ok(mut agents) => match agents.get_mut(token) {
                Some(agent) => agent.dispatch_failed(h.now_ms(), &mut h.store(), cluster),
                None => Vec::new(),
            },
            Err(_) => Vec::new(),
        }
    }

    fn resume<H: Host>(&self, h: &H, token: usize, waiters: Vec<Waiter>) {
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
            if h.enter(waiter.request).is_err() {
                continue;
            }
            match write_credential(h, kind, Some(&bearer), path.as_deref()) {
                Ok(()) => {
                    self.with_held(waiter.request, |held| {
                        held.released = Some(Released::Authorized(generation))
                    });
                    let _ = h.resume_request();
                    self.count_authorized(waiter.target, client);
                }
                // Never sent half rewritten: closed, with the reason.
                Err(status) => self.reply(
                    h,
                    waiter.target,
                    &Diagnosis::credential_not_written(status.0),
                ),
            }
        }
        h.leave();
    }

    fn record<H: Host>(&self, h: &H, token: usize, event: Event) {
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
                metrics.add(h, m::TOKEN_FETCHES, &[label, kind, &outcome], 1);
                if let Some(ms) = duration_ms {
                    metrics.set(h, m::TOKEN_FETCH_DURATION, &[label], ms);
                }
            }
            Event::RefreshStarted => metrics.add(h, m::TOKEN_REFRESHES, &[label], 1),
            Event::Invalidated => metrics.add(h, m::TOKEN_INVALIDATIONS, &[label], 1),
            Event::Rotated => metrics.add(h, m::CREDENTIAL_ROTATIONS, &[label], 1),
        }
    }

    /// Renew this worker's queue in the registry every heartbeat, so
    /// notifiers skip (and drop) the queues of workers that went away.
    fn heartbeat<H: Host>(&self, h: &H, now_ms: u64) {
        if now_ms.saturating_sub(self.heartbeat_ms.get()) < store::HEARTBEAT_MS
            && self.heartbeat_ms.get() <= now_ms
        {
            return;
        }
        self.heartbeat_ms.set(now_ms);
        match store::register_queue(&mut h.store(), QUEUES_KEY, self.queue, now_ms) {
            Ok(live) => {
                if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
                    metrics.set(h, m::NOTIFICATION_QUEUES, &[], live as u64);
                }
            }
            Err(e) => say!(h, Debug, "cannot renew the notification queue: {e}"),
        }
    }

    /// Hand the request counters counted since the last flush to the host.
    fn flush_counts<H: Host>(&self, h: &H) {
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
                    metrics.add(h, m::REQUESTS_AUTHORIZED, &[name, client], n as i64);
                }
            }
            let kept = self.kept.get(target).map_or(0, |c| c.replace(0));
            if kept > 0 {
                metrics.add(h, m::CLIENT_TOKENS_KEPT, &[name], kept as i64);
            }
        }
        let passed = self.passed_through.replace(0);
        if passed > 0 {
            metrics.add(h, m::REQUESTS_PASSED_THROUGH, &[], passed as i64);
        }
    }

    /// Every tick: seconds until each token expires (0 without one).
    fn report_expiries<H: Host>(&self, h: &H, now_ms: u64) {
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
        for (token, seconds) in expiries.into_iter().enumerate() {
            metrics.set(h, m::TOKEN_EXPIRES_IN, &[self.token_label(token)], seconds);
        }
    }

    /// A request no target took, though it looks like one a target meant: say why.
    fn note_near_miss<H: Host>(&self, h: &H, authority: &str, miss: NearMiss) {
        if self.allow_log(NEAR_MISS, h.now_ms()) {
            let host = safe::or(Some(authority), safe::host, annotate::placeholder::HOST);
            say!(h, Info, "request to {host} {}", miss.explain());
        }
    }
}

/// Give the request in hand its credential (`None`: only take away the
/// api-key it brought) and, when it changes, its new `:path` (the query
/// without the api-key). A credential goes out as exactly one header:
/// `authorization` without `api-key`, or `api-key` without `authorization`.
/// Any failed write fails the whole.
fn write_credential<H: Host>(
    h: &H,
    kind: CredentialKind,
    credential: Option<&str>,
    path: Option<&str>,
) -> Result<(), Status> {
    match credential {
        Some(value) => {
            let (set, remove) = match kind {
                CredentialKind::Bearer => (AUTHORIZATION_HEADER, API_KEY_HEADER),
                CredentialKind::ApiKey => (API_KEY_HEADER, AUTHORIZATION_HEADER),
            };
            h.remove_request_header(remove)?;
            h.set_request_header(set, value)?;
        }
        None => h.remove_request_header(API_KEY_HEADER)?,
    }
    match path {
        Some(path) => h.set_request_header(":path", path),
        None => Ok(()),
    }
}
