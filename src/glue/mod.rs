//! proxy-wasm glue: callbacks in, [`Agent`] decisions, host calls out.
//!
//! One root context per VM (per Envoy worker, plus two on the main thread)
//! owns the VM's [`Agent`] and a notification queue; request contexts borrow
//! the agent only to ask whether a token is ready. Token calls are always
//! dispatched by the root, so a client hanging up cannot cancel them.

mod host;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::agent::{Admission, Agent, Command, Level, FETCH_TIMEOUT_MS};
use crate::config::{Config, IdentitySelector};
use crate::rewrite::HostPatterns;
use crate::store;
use crate::token::{parse_response, FetchFailure, TokenRequest, MAX_RESPONSE_BYTES};
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
                let timeout = Duration::from_millis(FETCH_TIMEOUT_MS);
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
                let bearer = vm
                    .agent
                    .try_borrow()
                    .ok()
                    .and_then(|a| a.bearer().map(str::to_owned));
                let Some(bearer) = bearer else { continue };
                for request in requests {
                    if host::enter(request).is_ok() && host::authorize_request(&bearer).is_ok() {
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
            Admission::Authorize(bearer) => {
                if let Err(status) = host::authorize_request(bearer) {
                    log::warn!("cannot rewrite request headers ({status:?})");
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
        }
    }
}
