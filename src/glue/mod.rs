//! proxy-wasm glue: callbacks in, decisions of the pure modules, host calls out.
//!
//! One root context per VM (per Envoy worker, plus two on the main thread)
//! owns the VM's [`Agent`] and a notification queue; request contexts borrow
//! the agent only to ask whether a token is ready. Token calls are always
//! dispatched by the root, so a client hanging up cannot cancel them.
//!
//! Every value read from the host is bytes, decoded by [`crate::wire`]; a
//! value that does not decode is absent. Nothing here can panic on input.

mod abi;
mod host;
mod metrics;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::agent::{Admission, Agent, Command, Event, Level, Replacement};
use crate::annotate::{self, BodyMode, BodyStep, Facts, Inspection, LogLimiter};
use crate::config::{Config, IdentitySelector};
use crate::diagnose::DIAGNOSIS_HEADER;
use crate::metrics as m;
use crate::rewrite::HostPatterns;
use crate::store;
use crate::token::{FetchFailure, TokenRequest, MAX_RESPONSE_BYTES};
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
/// Messages drained from a queue per wake-up; they only say "look at the record".
const DRAIN_LIMIT: usize = 64;

proxy_wasm::main! {{
    host::install_logger();
    std::panic::set_hook(Box::new(|info| host::log_critical(&format!("aoai-msi-filter: {info}"))));
    proxy_wasm::set_root_context(|id| Box::new(Root { id, vm: None }));
}}

/// What the root context and the requests of one VM share.
struct Vm {
    root: u32,
    queue: u32,
    hosts: HostPatterns,
    request: TokenRequest,
    agent: RefCell<Agent>,
    /// Token generation each resumed request left with, until it takes it.
    resumed: RefCell<HashMap<u32, u64>>,
    metrics: RefCell<Metrics>,
    /// Per-request counts, kept here and flushed on tick: no host call per request.
    authorized: Cell<u64>,
    passed_through: Cell<u64>,
    /// This VM's share of the waiting-requests gauge, as last reported.
    waiting_reported: Cell<i64>,
    /// When this VM last renewed its queue in the registry.
    heartbeat_ms: Cell<u64>,
    log_limiter: RefCell<LogLimiter>,
}

impl Vm {
    /// Let the agent decide, then carry out what it decided.
    fn drive(&self, decide: impl FnOnce(&mut Agent, u64) -> Vec<Command>) {
        let commands = match self.agent.try_borrow_mut() {
            Ok(mut agent) => decide(&mut agent, host::now_ms()),
            Err(_) => return,
        };
        self.execute(commands);
        self.report_waiting();
    }

    /// Bring this VM's share of the waiting gauge to what the agent holds:
    /// called after everything that can park or release a request, so the
    /// gauge cannot drift whatever path released them.
    fn report_waiting(&self) {
        let Ok(agent) = self.agent.try_borrow() else {
            return;
        };
        let now = i64::try_from(agent.parked()).unwrap_or(i64::MAX);
        let delta = now - self.waiting_reported.replace(now);
        if delta != 0 {
            if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
                metrics.add(m::REQUESTS_WAITING, &[], delta);
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
                    let now = host::now_ms();
                    let queues = store::queues(&HostStore, QUEUES_KEY, now).unwrap_or_default();
                    for queue in queues.into_iter().filter(|q| *q != self.queue) {
                        let _ = host::enqueue(queue, b"sync");
                    }
                }
                Command::Kick => {
                    let _ = host::enqueue(self.queue, b"kick");
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
                    "cannot dispatch the token call to cluster {} (host status {})",
                    self.request.cluster,
                    status.0
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
                    metrics.set(m::NOTIFICATION_QUEUES, live as u64);
                }
            }
            Err(e) => log::debug!("cannot renew the notification queue: {e}"),
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

impl Drop for Vm {
    /// The VM's configuration went away (a reload): stop being notified.
    fn drop(&mut self) {
        let _ = store::unregister_queue(&mut HostStore, QUEUES_KEY, self.queue);
        let waiting = self.waiting_reported.replace(0);
        if waiting != 0 {
            if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
                metrics.add(m::REQUESTS_WAITING, &[], -waiting);
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
        let agent = Agent::new(config, sequence);
        store::ensure_record(&mut store, agent.key()).map_err(|e| e.to_string())?;
        let queue = host::register_queue(&format!("aoai-msi-filter/v2/queue/{sequence}"))
            .map_err(|s| format!("cannot register a shared queue (host status {})", s.0))?;
        let now = host::now_ms();
        store::register_queue(&mut store, QUEUES_KEY, queue, now).map_err(|e| e.to_string())?;
        host::set_tick(TICK)
            .map_err(|s| format!("cannot set a tick period (host status {})", s.0))?;
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
            hosts: config.hosts.clone(),
            request: TokenRequest::imds(config),
            agent: RefCell::new(agent),
            resumed: RefCell::new(HashMap::new()),
            metrics: RefCell::new(Metrics::default()),
            authorized: Cell::new(0),
            passed_through: Cell::new(0),
            waiting_reported: Cell::new(0),
            heartbeat_ms: Cell::new(now),
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
        vm.drive(|agent, now| agent.answered(now, &mut HostStore, status, &body));
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
        let now = host::now_ms();
        vm.heartbeat(now);
        vm.flush_metrics(now);
    }

    fn on_queue_ready(&mut self, queue: u32) {
        host::drain(queue, DRAIN_LIMIT);
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
            inspection: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    id: u32,
    vm: Option<Rc<Vm>>,
    /// `:authority` as the application sent it (only kept for matched requests).
    host: String,
    matched: bool,
    parked: bool,
    /// Generation of the token this request left with, if it got one.
    authorized: Option<u64>,
    inspection: Option<Inspection>,
}

impl Request {
    /// The upstream rejected the token this request carried: ask for a
    /// replacement (the root fetches it), and learn what became of it.
    fn token_rejected(&self, vm: &Vm, generation: u64) -> Option<Replacement> {
        let (replacement, commands) = match vm.agent.try_borrow_mut() {
            Ok(mut agent) => agent.invalidate(host::now_ms(), &mut HostStore, generation),
            Err(_) => return None,
        };
        // Only a kick, metrics and log lines: safe from a request.
        vm.execute(commands);
        Some(replacement)
    }

    /// Explain an upstream authorization failure: metric, log line, and, when
    /// the body is held for it, the annotated body.
    fn explain(&self, vm: &Vm, inspection: &Inspection, rewrite: bool, size: usize) {
        let body = inspection.collected();
        let Some(failure) = upstream::classify(inspection.status, body) else {
            return;
        };
        // Read the token's claims before a rejection changes the record.
        let (claims, config) = match vm.agent.try_borrow() {
            Ok(agent) => (agent.claims().cloned(), agent.config().clone()),
            Err(_) => return,
        };
        let replacement = match (&failure, self.authorized) {
            (UpstreamFailure::TokenRejected { .. }, Some(generation)) => {
                self.token_rejected(vm, generation)
            }
            _ => None,
        };
        let facts = Facts {
            host: &self.host,
            token: self.authorized.and(claims.as_ref()),
        };
        let now = host::now_ms();
        let annotation = annotate::explain(&failure, &facts, &config, now, replacement);
        if let Ok(mut metrics) = vm.metrics.try_borrow_mut() {
            metrics.add(m::UPSTREAM_AUTH_FAILURES, &[annotation.diagnosis], 1);
        }
        if vm
            .log_limiter
            .try_borrow_mut()
            .is_ok_and(|mut l| l.allow(annotation.diagnosis, now))
        {
            log::warn!("{}", annotation.log_line(inspection.status, &self.host));
        }
        if rewrite {
            if let Some(annotated) = annotate::annotated_body(body, &annotation) {
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

impl Context for Request {}

/// `make build` removes the module's `proxy_on_log` and `proxy_on_done`
/// exports (`tools/trim-exports`), so Envoy does not enter the VM for them:
/// overriding `on_log` or `on_done` here would have no effect.
impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(vm) = &self.vm else {
            return Action::Continue;
        };
        let authority = host::request_header(":authority");
        // An authority that is not plain text matches nothing.
        let host = authority
            .as_deref()
            .and_then(wire::text)
            .unwrap_or_default();
        self.matched = vm.hosts.matches(host);
        if !self.matched {
            vm.passed_through.set(vm.passed_through.get() + 1);
            return Action::Continue;
        }
        self.host = host.to_owned();
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
                    Err(status) => {
                        log::warn!("cannot rewrite request headers (host status {})", status.0)
                    }
                }
                Action::Continue
            }
            Admission::Park { kick } => {
                drop(agent);
                self.parked = true;
                vm.report_waiting();
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
        // Answers to requests the filter did not match are not ours: untouched.
        if !self.matched {
            return Action::Continue;
        }
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
                if let (Some(inspection), Some(vm)) = (self.inspection.take(), self.vm.clone()) {
                    self.explain(&vm, &inspection, rewrite, size);
                }
                Action::Continue
            }
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let (true, Some(vm)) = (self.parked, &self.vm) {
            if let Ok(mut agent) = vm.agent.try_borrow_mut() {
                agent.forget(self.id);
            }
            vm.report_waiting();
            if let Ok(mut resumed) = vm.resumed.try_borrow_mut() {
                resumed.remove(&self.id);
            }
        }
    }
}
