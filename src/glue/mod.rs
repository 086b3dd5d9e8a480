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

use crate::config::Config;
use crate::token::MAX_RESPONSE_BYTES;
use crate::wire;
use crate::worker::{Flow, Stream, Worker, DRAIN_LIMIT};
use host::Wasm;

proxy_wasm::main! {{
    host::install_logger();
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
        let config = match Config::parse_with_env(&host::plugin_configuration(), &host::env_var) {
            Ok(config) => config,
            Err(e) => {
                log::error!("invalid plugin configuration: {e}");
                return false;
            }
        };
        match Worker::start(&self.host, config, self.host.root) {
            Ok(worker) => {
                self.worker = Some(Rc::new(Live {
                    worker,
                    host: self.host,
                }));
                true
            }
            Err(e) => {
                log::error!("cannot start: {e}");
                false
            }
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

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

impl Context for Request {}

/// `make build` removes the module's `proxy_on_log` and `proxy_on_done`
/// exports (`tools/trim-exports`), so Envoy does not enter the VM for them:
/// overriding `on_log` or `on_done` here would have no effect.
impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(worker) = &self.worker else {
            return Action::Continue;
        };
        // Every request header in one host call: each separate read costs
        // another copy into the VM (measured by `make bench`: reading
        // `:authority` and `:path` apart cost 8 000 instructions more).
        let map = host::request_headers();
        let headers = wire::deserialize_pairs(&map).unwrap_or_default();
        action(self.stream.request_headers(worker, &self.host, &headers))
    }

    fn on_http_request_body(&mut self, _size: usize, _end_of_stream: bool) -> Action {
        self.worker.as_ref().map_or(Action::Continue, |w| {
            action(self.stream.request_body_or_trailers(w))
        })
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        self.worker.as_ref().map_or(Action::Continue, |w| {
            action(self.stream.request_body_or_trailers(w))
        })
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        self.worker.as_ref().map_or(Action::Continue, |w| {
            action(self.stream.response_headers(w, &self.host))
        })
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.worker.as_ref().map_or(Action::Continue, |w| {
            action(
                self.stream
                    .response_body(w, &self.host, size, end_of_stream),
            )
        })
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Some(worker) = &self.worker {
            self.stream.finish(worker, &self.host);
        }
    }
}
