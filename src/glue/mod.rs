//! proxy-wasm glue: callbacks in, the [`Worker`] decides, host calls out.
//!
//! One root context per VM (per Envoy worker, plus two on the main thread)
//! owns the VM's [`Worker`]; each request context owns its [`Stream`]. This
//! file only turns proxy-wasm's callbacks into the worker's calls, and
//! [`host`] implements the worker's [`Host`] over proxy-wasm's ABI.

mod abi;
mod host;

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::token::MAX_RESPONSE_BYTES;
use crate::wire;
use crate::worker::{Flow, Stream, Worker, DRAIN_LIMIT};
use host::Wasm;

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| host::log_critical(&format!("aoai-msi-filter: {info}"))));
    proxy_wasm::set_root_context(|id| Box::new(Root { host: Wasm { root: id }, worker: None }));
}}

struct Root {
    host: Wasm,
    worker: Option<Rc<Live>>,
}

/// The VM's worker, stopped when its configuration goes away: when the
/// root and the last request that started under it are gone.
struct Live {
    worker: Worker,
    host: Wasm,
}

impl std::ops::Deref for Live {
    type Target = Worker;

    fn deref(&self) -> &Worker {
        &self.worker
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.worker.stop(&self.host);
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
        let Some(worker) = &self.worker else { return };
        let status = host::call_status();
        // Read one byte past the bound so an oversized body is recognised unread.
        let body = host::call_body(body_size.min(MAX_RESPONSE_BYTES + 1));
        worker.answered(&self.host, call, status, &body);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        // The VM's environment is what `vm_config.environment_variables`
        // passes in, read through WASI.
        let env = |name: &str| std::env::var(name).ok();
        match Worker::configure(
            &self.host,
            &host::plugin_configuration(),
            // No SDS secrets: Envoy gives wasm filters none.
            &crate::config::HostEnv::vars(&env),
            self.host.root,
        ) {
            Some(worker) => {
                self.worker = Some(Rc::new(Live {
                    worker,
                    host: self.host,
                }));
                true
            }
            None => false,
        }
    }

    fn on_tick(&mut self) {
        if let Some(worker) = &self.worker {
            worker.tick(&self.host);
        }
    }

    fn on_queue_ready(&mut self, queue: u32) {
        let messages = host::drain(queue, DRAIN_LIMIT);
        if let Some(worker) = &self.worker {
            worker.queue_ready(&self.host, &messages);
        }
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            host: self.host,
            worker: self.worker.clone(),
            stream: Stream::new(id),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    host: Wasm,
    worker: Option<Rc<Live>>,
    stream: Stream,
}

impl Request {
    /// One step of the request with its VM's worker; without one (the
    /// configuration failed) every request passes.
    fn step(&mut self, step: impl FnOnce(&mut Stream, &Worker, &Wasm) -> Flow) -> Action {
        match self
            .worker
            .as_deref()
            .map(|w| step(&mut self.stream, w, &self.host))
        {
            Some(Flow::Pause) => Action::Pause,
            Some(Flow::Continue) | None => Action::Continue,
        }
    }
}

impl Context for Request {}

/// `make build` removes the module's `proxy_on_log` and `proxy_on_done`
/// exports (`tools/trim-exports`), so Envoy does not enter the VM for them:
/// overriding `on_log` or `on_done` here would have no effect.
impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        self.step(|stream, w, host| {
            // Every request header in one host call: each separate read costs
            // another copy into the VM (measured by `make bench`: reading
            // `:authority` and `:path` apart cost 8 000 instructions more).
            let map = host::request_headers();
            let headers = wire::deserialize_pairs(&map).unwrap_or_default();
            stream.request_headers(w, host, &headers)
        })
    }

    fn on_http_request_body(&mut self, _size: usize, _end_of_stream: bool) -> Action {
        self.step(|stream, w, _| stream.request_body_or_trailers(w))
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        self.step(|stream, w, _| stream.request_body_or_trailers(w))
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        self.step(|stream, w, host| stream.response_headers(w, host))
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.step(|stream, w, host| stream.response_body(w, host, size, end_of_stream))
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Some(worker) = &self.worker {
            self.stream.finish(worker, &self.host);
        }
    }
}
