//! proxy-wasm glue: callbacks in, decisions of the pure modules, host calls out.
//!
//! One root context per VM (per Envoy worker, plus two on the main thread)
//! owns the VM's [`Agent`] and a notification queue; request contexts borrow
//! the agent only to ask whether a token is ready. Token calls are always
//! dispatched by the root, so a client hanging up cannot cancel them.

mod host;
mod metrics;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::agent::{Admission, Agent, Command, Event, Level};
use crate::annotate::{self, Facts, LogLimiter};
use crate::config::{Config, IdentitySelector};
use crate::diagnose::DIAGNOSIS_HEADER;
use crate::metrics as m;
use crate::rewrite::HostPatterns;
use crate::store;
use crate::token::{parse_response, FetchFailure, TokenRequest, MAX_RESPONSE_BYTES};
use crate::upstream::{self, UpstreamFailure};
use host::HostStore;
use metrics::Metrics;

/// How often each VM checks for refresh, lapsed leases and waiting requests.
const TICK: Duration = Duration::from_millis(250);
/// Process-wide counter naming each VM's lease and queue.
const SEQUENCE_KEY: &str = "aoai-msi-filter/v1/vm-sequence";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    std::panic::set_hook(Box::new(|info| host::log_critical(&format!("aoai-msi-filter: {info}"))));
    proxy_wasm::set_root_context(|id| Box::new(Root { id, vm: None }));
}}

/// What the root context and the requests of one VM share.
struct Vm {
    root: u32,
    queue: u32,
    queues_key: String,
    hosts: HostPatterns,
    request: TokenRequest,
    agent: RefCell<Agent>,
    /// Token generation each resumed request left with, until it takes it.
    resumed: RefCell<HashMap<u32, u64>>,
    metrics: RefCell<Metrics>,
    /// Per-request counts, kept here and flushed on tick: no host call per request.
    authorized: Cell<u64>,
    passed_through: Cell<u64>,
    log_limiter: RefCell<LogLimiter>,
}

impl Vm {
    /// Let the agent decide, then carry out what it decided. Keeps the
    /// waiting-requests gauge in step with the agent's parked list.
    fn drive(&self, decide: impl FnOnce(&mut Agent, u64) -> Vec<Command>) {
        let commands = match self.agent.try_borrow_mut() {
            Ok(mut agent) => {
                let before = agent.parked();
                let commands = decide(&mut agent, host::now_ms());
                self.count_waiting(before, agent.parked());
                commands
            }
            Err(_) => return,
        };
        self.execute(commands);
    }

    fn count_waiting(&self, before: usize, after: usize) {
        if before != after {
            if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
                metrics.add(m::REQUESTS_WAITING, &[], after as i64 - before as i64);
            }
        }
    }

    fn execute(&self, commands: Vec<Command>) {
        let mut pending = VecDeque::from(commands);
        while let Some(command) = pending.pop_front() {
            match command {
                Command::Fetch => {
                    if let Err(more) = self.dispatch_token_call() {
                        pending.extend(more);
                    }
                }
                Command::NotifyOthers => {
                    let queues = store::queues(&HostStore, &self.queues_key).unwrap_or_default();
                    for queue in queues.into_iter().filter(|q| *q != self.queue) {
                        // A queue of a VM that went away is simply not there.
                        let _ = host::enqueue(queue, b"sync");
                    }
                }
                Command::Resume(requests) => self.resume(requests),
                Command::Reject(requests, diagnosis) => {
                    let body = diagnosis.body();
                    let owned = diagnosis.headers();
                    let headers: Vec<(&str, &str)> =
                        owned.iter().map(|(n, v)| (*n, v.as_str())).collect();
                    for request in &requests {
                        if host::enter(*request).is_ok() {
                            let _ = host::send_local_reply(diagnosis.status, &headers, &body);
                        }
                    }
                    let _ = host::enter(self.root);
                    if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
                        metrics.add(m::LOCAL_REPLIES, &[diagnosis.code], requests.len() as i64);
                    }
                    // One line per diagnosis per interval, however many requests.
                    let now = host::now_ms();
                    if self
                        .log_limiter
                        .try_borrow_mut()
                        .is_ok_and(|mut l| l.allow(diagnosis.code, now))
                    {
                        log::warn!(
                            "answered {} waiting request(s) with {} {}: {}",
                            requests.len(),
                            diagnosis.status,
                            diagnosis.code,
                            diagnosis.message
                        );
                    }
                }
                Command::Log(level, line) => match level {
                    Level::Debug => log::debug!("{line}"),
                    Level::Info => log::info!("{line}"),
                    Level::Warn => log::warn!("{line}"),
                },
                Command::Record(event) => self.record(event),
            }
        }
    }

    fn dispatch_token_call(&self) -> Result<(), Vec<Command>> {
        let headers: Vec<(&str, &str)> = self
            .request
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        let timeout = Duration::from_millis(self.request.timeout_ms);
        match host::dispatch(&self.request.cluster, &headers, timeout) {
            Ok(_) => Ok(()),
            Err(status) => {
                log::warn!(
                    "cannot dispatch the token call to cluster {} ({status:?})",
                    self.request.cluster
                );
                let failure = FetchFailure::Dispatch {
                    cluster: self.request.cluster.clone(),
                };
                match self.agent.try_borrow_mut() {
                    Ok(mut agent) => {
                        Err(agent.fetched(host::now_ms(), &mut HostStore, Err(failure)))
                    }
                    Err(_) => Ok(()),
                }
            }
        }
    }

    fn resume(&self, requests: Vec<u32>) {
        let token = self
            .agent
            .try_borrow()
            .ok()
            .and_then(|a| Some((a.bearer()?.to_owned(), a.generation()?)));
        let Some((bearer, generation)) = token else {
            return;
        };
        for request in &requests {
            if host::enter(*request).is_ok() && host::authorize_request(&bearer).is_ok() {
                if let Ok(mut resumed) = self.resumed.try_borrow_mut() {
                    resumed.insert(*request, generation);
                }
                let _ = host::resume_request();
            }
        }
        let _ = host::enter(self.root);
        self.authorized
            .set(self.authorized.get() + requests.len() as u64);
    }

    fn record(&self, event: Event) {
        let Ok(mut metrics) = self.metrics.try_borrow_mut() else {
            return;
        };
        match event {
            Event::Fetched {
                outcome,
                duration_ms,
            } => {
                metrics.add(m::TOKEN_FETCHES, &["imds", &outcome], 1);
                if let Some(ms) = duration_ms {
                    metrics.record(m::TOKEN_FETCH_DURATION, ms);
                }
            }
            Event::RefreshStarted => metrics.add(m::TOKEN_REFRESHES, &[], 1),
            Event::Invalidated => metrics.add(m::TOKEN_INVALIDATIONS, &[], 1),
        }
    }

    /// Per-tick bookkeeping: flush request counters, refresh the expiry gauge.
    fn flush_metrics(&self, now_ms: u64) {
        let expires_in = self
            .agent
            .try_borrow()
            .ok()
            .and_then(|a| a.expires_at_ms())
            .map_or(0, |at| at.saturating_sub(now_ms) / 1000);
        let Ok(mut metrics) = self.metrics.try_borrow_mut() else {
            return;
        };
        for (counter, metric) in [
            (&self.authorized, m::REQUESTS_AUTHORIZED),
            (&self.passed_through, m::REQUESTS_PASSED_THROUGH),
        ] {
            let n = counter.replace(0);
            if n > 0 {
                metrics.add(metric, &[], n as i64);
            }
        }
        metrics.set(m::TOKEN_EXPIRES_IN, expires_in);
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
        let agent = Agent::new(config, sequence);
        store::ensure_record(&mut store, agent.key()).map_err(|e| e.to_string())?;
        let queue = host::register_queue(&format!("aoai-msi-filter/v1/queue/{sequence}"))
            .map_err(|s| format!("cannot register a shared queue: {s:?}"))?;
        let queues_key = format!("{}/queues", agent.key());
        store::register_queue(&mut store, &queues_key, queue).map_err(|e| e.to_string())?;
        host::set_tick(TICK).map_err(|s| format!("cannot set a tick period: {s:?}"))?;
        let config = agent.config();
        let imds = config.imds();
        let identity = match &imds.identity {
            IdentitySelector::Default => "the VM's identity".to_owned(),
            IdentitySelector::ClientId(v) => format!("client_id {v}"),
            IdentitySelector::ObjectId(v) => format!("object_id {v}"),
            IdentitySelector::ResourceId(v) => format!("msi_res_id {v}"),
        };
        let hosts: Vec<String> = config
            .hosts
            .patterns()
            .iter()
            .map(|p| p.to_string())
            .collect();
        log::debug!(
            "vm {sequence} configured: hosts [{}], resource {}, IMDS via cluster {} for {identity}",
            hosts.join(", "),
            config.resource,
            imds.cluster
        );
        Ok(Vm {
            root: self.id,
            queue,
            queues_key,
            hosts: config.hosts.clone(),
            request: TokenRequest::imds(config),
            agent: RefCell::new(agent),
            resumed: RefCell::new(HashMap::new()),
            metrics: RefCell::new(Metrics::default()),
            authorized: Cell::new(0),
            passed_through: Cell::new(0),
            log_limiter: RefCell::new(LogLimiter::default()),
        })
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some(vm) = &self.vm else { return };
        let status = host::call_status();
        // Read one byte past the bound so an oversized body is recognised unread.
        let body = host::call_body(body_size.min(MAX_RESPONSE_BYTES + 1));
        vm.drive(|agent, now| {
            let result = parse_response(status, &body, now);
            agent.fetched(now, &mut HostStore, result)
        });
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = match Config::parse(&host::plugin_configuration()) {
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
        vm.drive(|agent, now| agent.tick(now, &mut HostStore));
        vm.flush_metrics(host::now_ms());
    }

    fn on_queue_ready(&mut self, queue: u32) {
        host::drain(queue);
        if let Some(vm) = &self.vm {
            vm.drive(|agent, now| agent.sync(now, &mut HostStore));
        }
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            id,
            vm: self.vm.clone(),
            host: String::new(),
            matched: false,
            parked: false,
            authorized: None,
            inspect: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// An upstream error answer being read to explain it.
#[derive(Debug, Clone, Copy)]
struct Inspect {
    status: u16,
    /// JSON and not compressed: the body may be annotated.
    rewrite: bool,
}

struct Request {
    id: u32,
    vm: Option<Rc<Vm>>,
    /// `:authority` as the application sent it.
    host: String,
    matched: bool,
    parked: bool,
    /// Generation of the token this request left with, if it got one.
    authorized: Option<u64>,
    inspect: Option<Inspect>,
}

impl Request {
    /// The upstream rejected the token this request carried. Returns whether
    /// the token was dropped.
    fn token_rejected(&self, vm: &Vm, generation: u64) -> bool {
        let commands = match vm.agent.try_borrow_mut() {
            Ok(mut agent) => agent.invalidate(host::now_ms(), &mut HostStore, generation),
            Err(_) => return false,
        };
        let dropped = commands.contains(&Command::Record(Event::Invalidated));
        // Only notifications, metrics and log lines: safe from a request.
        vm.execute(commands);
        if dropped {
            // The root, not this request, dispatches the new token call.
            let _ = host::enqueue(vm.queue, b"kick");
        }
        dropped
    }

    /// Explain an upstream authorization failure: metric, log line, and, when
    /// the body is JSON, the annotated body.
    fn explain(&self, vm: &Vm, inspect: Inspect, size: usize) {
        let body = host::response_body(size.min(upstream::MAX_ERROR_BODY + 1));
        let Some(failure) = upstream::classify(inspect.status, &body) else {
            return;
        };
        // Read the token's claims before a rejection drops the token.
        let (claims, config) = match vm.agent.try_borrow() {
            Ok(agent) => (agent.claims().cloned(), agent.config().clone()),
            Err(_) => return,
        };
        let dropped = match (&failure, self.authorized) {
            (UpstreamFailure::TokenRejected { .. }, Some(generation)) => {
                self.token_rejected(vm, generation)
            }
            _ => false,
        };
        let facts = Facts {
            host: &self.host,
            matched: self.matched,
            token: self.authorized.and(claims.as_ref()),
        };
        let now = host::now_ms();
        let annotation = annotate::explain(&failure, &facts, &config, now, dropped);
        if let Ok(mut metrics) = vm.metrics.try_borrow_mut() {
            metrics.add(m::UPSTREAM_AUTH_FAILURES, &[annotation.diagnosis], 1);
        }
        if vm
            .log_limiter
            .try_borrow_mut()
            .is_ok_and(|mut l| l.allow(annotation.diagnosis, now))
        {
            log::warn!("{}", annotation.log_line(inspect.status, &self.host));
        }
        if inspect.rewrite {
            if let Some(annotated) = annotate::annotated_body(&body, &annotation) {
                if let Err(status) = host::replace_response_body(size, annotated.as_bytes()) {
                    log::warn!("cannot annotate the response body ({status:?})");
                }
            }
        }
    }
}

impl Context for Request {}

/// `make build` removes the module's `proxy_on_log` and `proxy_on_done`
/// exports (`tools/trim-exports`), so Envoy does not enter the VM for them:
/// overriding `on_log` or `on_done` here would have no effect.
impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(vm) = &self.vm else {
            return Action::Continue;
        };
        self.host = host::request_header(":authority").unwrap_or_default();
        self.matched = vm.hosts.matches(&self.host);
        if !self.matched {
            vm.passed_through.set(vm.passed_through.get() + 1);
            return Action::Continue;
        }
        let Ok(mut agent) = vm.agent.try_borrow_mut() else {
            return Action::Continue;
        };
        match agent.admit(host::now_ms(), self.id) {
            Admission::Authorize { bearer, generation } => {
                match host::authorize_request(bearer) {
                    Ok(()) => {
                        self.authorized = Some(generation);
                        vm.authorized.set(vm.authorized.get() + 1);
                    }
                    Err(status) => log::warn!("cannot rewrite request headers ({status:?})"),
                }
                Action::Continue
            }
            Admission::Park { kick } => {
                drop(agent);
                self.parked = true;
                vm.count_waiting(0, 1);
                if kick {
                    let _ = host::enqueue(vm.queue, b"kick");
                }
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, _size: usize, _end_of_stream: bool) -> Action {
        // A body chunk must not release a request whose headers are still
        // waiting for a token: Envoy would continue the headers unrewritten.
        let still_parked = self.parked
            && self
                .vm
                .as_ref()
                .is_some_and(|vm| vm.agent.try_borrow().map_or(true, |a| a.is_parked(self.id)));
        if still_parked {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(vm) = &self.vm else {
            return Action::Continue;
        };
        if self.parked {
            // Resumed by the root: learn which token this request carried.
            let taken = vm
                .resumed
                .try_borrow_mut()
                .ok()
                .and_then(|mut r| r.remove(&self.id));
            if taken.is_some() {
                self.authorized = taken;
            }
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
        let rewrite = annotate::body_rewritable(
            host::response_header("content-type").as_deref(),
            host::response_header("content-encoding").as_deref(),
        );
        if rewrite {
            // The body may change length; Envoy then sends it chunked.
            let _ = host::set_response_header("content-length", None);
        }
        self.inspect = Some(Inspect { status, rewrite });
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let Some(inspect) = self.inspect else {
            return Action::Continue;
        };
        if !end_of_stream {
            // Hold the (small) error body until it is complete.
            return Action::Pause;
        }
        self.inspect = None;
        if let Some(vm) = self.vm.clone() {
            self.explain(&vm, inspect, size);
        }
        Action::Continue
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let (true, Some(vm)) = (self.parked, &self.vm) {
            let forgotten = vm.agent.try_borrow_mut().ok().map(|mut agent| {
                let before = agent.parked();
                agent.forget(self.id);
                (before, agent.parked())
            });
            if let Some((before, after)) = forgotten {
                vm.count_waiting(before, after);
            }
            if let Ok(mut resumed) = vm.resumed.try_borrow_mut() {
                resumed.remove(&self.id);
            }
        }
    }
}
