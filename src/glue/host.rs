//! The host, seen through the few operations the filter needs. The only file
//! that reaches the host (through [`abi`](super::abi)); statuses become
//! `Result`s and values stay bytes until [`crate::wire`] decodes them.

use std::time::Duration;

use super::abi::{self, Buffer, Map};
use crate::metrics::Kind;
use crate::source::TokenRequest;
use crate::store::{SharedStore, StoreError};
use crate::wire;
use crate::worker::{Host, Level, Status};

/// Envoy's shared data: one key-value store per process, with CAS.
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        abi::shared_data(key).map_err(status_error)
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        abi::set_shared_data(key, value, cas).map_err(|s| match s {
            abi::CAS_MISMATCH => StoreError::CasMismatch,
            other => status_error(other),
        })
    }
}

fn status_error(status: u32) -> StoreError {
    StoreError::Host(format!("host status {status}"))
}

/// Last words of a panicking VM.
pub fn log_critical(message: &str) {
    // `Level` lists the levels in proxy-wasm's order, from 0.
    abi::log(Level::Critical as u32, message);
}

pub fn plugin_configuration() -> Vec<u8> {
    abi::buffer(Buffer::PluginConfiguration, 0, usize::MAX)
}

/// Every request header, serialised (decode with `wire::deserialize_pairs`);
/// empty when the host cannot give them.
pub fn request_headers() -> Vec<u8> {
    abi::header_pairs(Map::RequestHeaders)
}

/// `:status` of a token call's answer, if it got one.
pub fn call_status() -> Option<u16> {
    abi::header(Map::CallResponseHeaders, ":status")
        .as_deref()
        .and_then(wire::status)
}

pub fn call_body(size: usize) -> Vec<u8> {
    abi::buffer(Buffer::CallResponseBody, 0, size)
}

/// Empty a queue, returning what it held; at most `limit` messages.
pub fn drain(queue: u32, limit: usize) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| abi::dequeue(queue))
        .take(limit)
        .collect()
}

/// The worker's host: proxy-wasm, entered through the VM's root context
/// `root` (the context requests are left for).
#[derive(Debug, Clone, Copy)]
pub struct Wasm {
    pub root: u32,
}

impl Host for Wasm {
    type Store = HostStore;

    fn store(&self) -> HostStore {
        HostStore
    }

    /// By the host's clock (0 if it has none).
    fn now_ms(&self) -> u64 {
        abi::now_nanos().map_or(0, |nanos| nanos / 1_000_000)
    }

    /// From WASI `random_get`, or from the clock if the host has none.
    fn random_seed(&self) -> u64 {
        let mut bytes = [0u8; 8];
        match getrandom::getrandom(&mut bytes) {
            Ok(()) => u64::from_le_bytes(bytes),
            Err(_) => abi::now_nanos().unwrap_or(0).rotate_left(29),
        }
    }

    /// Envoy filters by its own log level.
    fn logs(&self, _level: Level) -> bool {
        true
    }

    fn log(&self, level: Level, line: &str) {
        abi::log(level as u32, line);
    }

    fn register_queue(&self, name: &str) -> Result<u32, Status> {
        abi::register_queue(name).map_err(Status)
    }

    fn enqueue(&self, queue: u32, message: &[u8]) -> Result<(), Status> {
        abi::enqueue(queue, message).map_err(Status)
    }

    fn set_tick(&self, period: Duration) -> Result<(), Status> {
        let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
        abi::set_tick_period_ms(ms).map_err(Status)
    }

    /// A token call from the root; its answer reaches the root's
    /// `on_http_call_response`.
    fn dispatch(&self, request: &TokenRequest) -> Result<u32, Status> {
        let headers: Vec<(&str, &str)> = request
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        let body = (!request.body.is_empty()).then_some(request.body.as_slice());
        let timeout = Duration::from_millis(request.timeout_ms);
        proxy_wasm::hostcalls::dispatch_http_call(&request.cluster, headers, body, vec![], timeout)
            .map_err(|s| Status(s as u32))
    }

    fn define_metric(&self, kind: Kind, name: &str) -> Result<u32, Status> {
        let kind = match kind {
            Kind::Counter => 0,
            Kind::Gauge => 1,
            Kind::Histogram => 2,
        };
        abi::define_metric(kind, name).map_err(Status)
    }

    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), Status> {
        abi::increment_metric(id, delta).map_err(Status)
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        abi::record_metric(id, value).map_err(Status)
    }

    fn enter(&self, request: u32) -> Result<(), Status> {
        abi::set_effective_context(request).map_err(Status)
    }

    fn leave(&self) {
        let _ = abi::set_effective_context(self.root);
    }

    /// Envoy 1.33+ exposes the routed cluster as `xds.cluster_name` (the
    /// bare `cluster_name` is gone), resolved before the first decoder
    /// filter runs, and again when the route cache is cleared.
    fn routed_cluster(&self) -> Option<Vec<u8>> {
        abi::property(&wire::serialize_path(&["xds", "cluster_name"]))
    }

    fn set_request_header(&self, name: &str, value: &str) -> Result<(), Status> {
        abi::set_header(Map::RequestHeaders, name, value.as_bytes()).map_err(Status)
    }

    fn remove_request_header(&self, name: &str) -> Result<(), Status> {
        abi::remove_header(Map::RequestHeaders, name).map_err(Status)
    }

    fn resume_request(&self) -> Result<(), Status> {
        abi::resume_request().map_err(Status)
    }

    fn send_local_reply(
        &self,
        status: u16,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<(), Status> {
        let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        abi::send_local_response(status, &wire::serialize_pairs(&pairs), body.as_bytes())
            .map_err(Status)
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        abi::header(Map::ResponseHeaders, name)
    }

    fn set_response_header(&self, name: &str, value: Option<&str>) -> Result<(), Status> {
        match value {
            Some(v) => abi::set_header(Map::ResponseHeaders, name, v.as_bytes()),
            None => abi::remove_header(Map::ResponseHeaders, name),
        }
        .map_err(Status)
    }

    fn response_body(&self, size: usize) -> Vec<u8> {
        abi::buffer(Buffer::ResponseBody, 0, size)
    }

    fn replace_response_body(&self, size: usize, body: &[u8]) -> Result<(), Status> {
        abi::set_buffer(Buffer::ResponseBody, 0, size, body).map_err(Status)
    }
}
