//! proxy-wasm glue: callbacks in, [`Agent`] decisions, host calls out.
//!
//! One root context per VM (per Envoy worker, plus two on the main thread)
//! owns the VM's [`Agent`] and a notification queue; request contexts borrow
//! the agent only to ask whether a token is ready. Token calls are always
//! dispatched by the root, so a client hanging up cannot cancel them.

mod host;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::agent::{Admission, Agent, Command, Level};
use crate::config::{Config, IdentitySelector};
use crate::rewrite::HostPatterns;
use crate::store;
use crate::token::{parse_response, FetchFailure, TokenRequest, MAX_RESPONSE_BYTES};
use crate::upstream::{self, UpstreamFailure};
use host::HostStore;

/// How often each VM checks for refresh, lapsed leases and waiting requests.
const TICK: Duration = Duration::from_millis(250);
/// Process-wide counter naming each VM's lease and queue.
const SEQUENCE_KEY: &str = "aoai-msi-filter/v1/vm-sequence";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    std::panic::set_hook(Box::new(|info| host::log_critical(&format!("{info}"))));
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
        })
    }

    /// Let the agent decide, then carry out what it decided.
    fn drive(&self, decide: impl FnOnce(&mut Agent, u64) -> Vec<Command>) {
        let Some(vm) = &self.vm else { return };
        let commands = match vm.agent.try_borrow_mut() {
            Ok(mut agent) => decide(&mut agent, host::now_ms()),
            Err(_) => return,
        };
        execute(vm, commands);
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
        let status = host::call_status();
        // Read one byte past the bound so an oversized body is recognised unread.
        let body = host::call_body(body_size.min(MAX_RESPONSE_BYTES + 1));
        self.drive(|agent, now| {
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
        self.drive(|agent, now| agent.tick(now, &mut HostStore));
    }

    fn on_queue_ready(&mut self, queue: u32) {
        host::drain(queue);
        self.drive(|agent, now| agent.sync(now, &mut HostStore));
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            id,
            vm: self.vm.clone(),
            parked: false,
            authorized: None,
            inspect_body: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn execute(vm: &Vm, commands: Vec<Command>) {
    let mut pending = VecDeque::from(commands);
    while let Some(command) = pending.pop_front() {
        match command {
            Command::Fetch => {
                let headers: Vec<(&str, &str)> = vm
                    .request
                    .headers
                    .iter()
                    .map(|(name, value)| (*name, value.as_str()))
                    .collect();
                let timeout = Duration::from_millis(vm.request.timeout_ms);
                if let Err(status) = host::dispatch(&vm.request.cluster, &headers, timeout) {
                    log::warn!(
                        "cannot dispatch the token call to cluster {} ({status:?})",
                        vm.request.cluster
                    );
                    let failure = FetchFailure::Dispatch {
                        cluster: vm.request.cluster.clone(),
                    };
                    if let Ok(mut agent) = vm.agent.try_borrow_mut() {
                        pending.extend(agent.fetched(host::now_ms(), &mut HostStore, Err(failure)));
                    }
                }
            }
            Command::NotifyOthers => {
                let queues = store::queues(&HostStore, &vm.queues_key).unwrap_or_default();
                for queue in queues.into_iter().filter(|q| *q != vm.queue) {
                    // A queue of a VM that went away is simply not there.
                    let _ = host::enqueue(queue, b"sync");
                }
            }
            Command::Resume(requests) => {
                let token = vm
                    .agent
                    .try_borrow()
                    .ok()
                    .and_then(|a| Some((a.bearer()?.to_owned(), a.generation()?)));
                let Some((bearer, generation)) = token else {
                    continue;
                };
                for request in requests {
                    if host::enter(request).is_ok() && host::authorize_request(&bearer).is_ok() {
                        if let Ok(mut resumed) = vm.resumed.try_borrow_mut() {
                            resumed.insert(request, generation);
                        }
                        let _ = host::resume_request();
                    }
                }
                let _ = host::enter(vm.root);
            }
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
                let _ = host::enter(vm.root);
                log::warn!(
                    "answered {} waiting request(s) with {} {}: {}",
                    requests.len(),
                    diagnosis.status,
                    diagnosis.code,
                    diagnosis.message
                );
            }
            Command::Log(level, line) => match level {
                Level::Debug => log::debug!("{line}"),
                Level::Info => log::info!("{line}"),
                Level::Warn => log::warn!("{line}"),
            },
        }
    }
}

struct Request {
    id: u32,
    vm: Option<Rc<Vm>>,
    parked: bool,
    /// Generation of the token this request left with, if it got one.
    authorized: Option<u64>,
    /// The upstream answered 401: read the body to see whether it rejected the token.
    inspect_body: bool,
}

impl Request {
    /// The upstream rejected the token this request carried.
    fn token_rejected(&self, vm: &Vm, generation: u64) {
        let commands = match vm.agent.try_borrow_mut() {
            Ok(mut agent) => agent.invalidate(host::now_ms(), &mut HostStore, generation),
            Err(_) => return,
        };
        let dropped = commands.contains(&Command::NotifyOthers);
        // Only notifications and log lines: safe to carry out from a request.
        execute(vm, commands);
        if dropped {
            // The root, not this request, dispatches the new token call.
            let _ = host::enqueue(vm.queue, b"kick");
        }
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(vm) = &self.vm else {
            return Action::Continue;
        };
        let matches = host::request_header(":authority").is_some_and(|a| vm.hosts.matches(&a));
        if !matches {
            return Action::Continue;
        }
        let Ok(mut agent) = vm.agent.try_borrow_mut() else {
            return Action::Continue;
        };
        match agent.admit(host::now_ms(), self.id) {
            Admission::Authorize { bearer, generation } => {
                match host::authorize_request(bearer) {
                    Ok(()) => self.authorized = Some(generation),
                    Err(status) => log::warn!("cannot rewrite request headers ({status:?})"),
                }
                Action::Continue
            }
            Admission::Park { kick } => {
                drop(agent);
                self.parked = true;
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
        if self.parked {
            let still = self
                .vm
                .as_ref()
                .is_some_and(|vm| vm.agent.try_borrow().map_or(true, |a| a.is_parked(self.id)));
            if still {
                return Action::Pause;
            }
            self.parked = false;
            // Resumed by the root with the token it held then.
            self.authorized = self
                .vm
                .as_ref()
                .and_then(|vm| vm.agent.try_borrow().ok().and_then(|a| a.generation()));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if self.authorized.is_some() && host::response_status() == Some(401) {
            self.inspect_body = true;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !self.inspect_body {
            return Action::Continue;
        }
        if !end_of_stream {
            // Hold the (small) error body until it is complete.
            return Action::Pause;
        }
        self.inspect_body = false;
        let body = host::response_body(size.min(upstream::MAX_ERROR_BODY + 1));
        if let (Some(UpstreamFailure::TokenRejected), Some(generation), Some(vm)) =
            (upstream::classify(401, &body), self.authorized, &self.vm)
        {
            self.token_rejected(vm, generation);
        }
        Action::Continue
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let (true, Some(vm)) = (self.parked, &self.vm) {
            if let Ok(mut agent) = vm.agent.try_borrow_mut() {
                agent.forget(self.id);
            }
            if let Ok(mut resumed) = vm.resumed.try_borrow_mut() {
                resumed.remove(&self.id);
            }
        }
    }
}
