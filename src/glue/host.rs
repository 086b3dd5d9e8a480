//! The host, seen through the few operations the filter needs. The only file
//! that calls `proxy_wasm::hostcalls`; host statuses become `Result`s here.

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};

use crate::store::{SharedStore, StoreError};

/// Envoy's shared data: one key-value store per process, with CAS.
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        hostcalls::get_shared_data(key).map_err(status_error)
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|s| match s {
            Status::CasMismatch => StoreError::CasMismatch,
            other => status_error(other),
        })
    }
}

fn status_error(status: Status) -> StoreError {
    StoreError::Host(format!("{status:?}"))
}

/// Last words of a panicking VM.
pub fn log_critical(message: &str) {
    let _ = hostcalls::log(proxy_wasm::types::LogLevel::Critical, message);
}

/// Milliseconds since the Unix epoch, by the host's clock. Seconds and
/// milliseconds are combined in `u64`: `as_millis` would divide a `u128`,
/// which wasm32 does in software on every request.
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| {
            d.as_secs()
                .saturating_mul(1000)
                .saturating_add(u64::from(d.subsec_millis()))
        })
}

pub fn plugin_configuration() -> Vec<u8> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
        .ok()
        .flatten()
        .unwrap_or_default()
}

pub fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

/// `:status` of the upstream's answer to the current request.
pub fn response_status() -> Option<u16> {
    hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok())
}

/// The buffered response body of the current request.
pub fn response_body(size: usize) -> Vec<u8> {
    hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

pub fn response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
}

/// Set (or with `None`, remove) a response header.
pub fn set_response_header(name: &str, value: Option<&str>) -> Result<(), Status> {
    hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value)
}

/// Replace the first `size` bytes (the whole buffered body) of the response.
pub fn replace_response_body(size: usize, body: &[u8]) -> Result<(), Status> {
    hostcalls::set_buffer(BufferType::HttpResponseBody, 0, size, body)
}

/// Remove `api-key` and set exactly one `authorization` on the current request.
pub fn authorize_request(bearer: &str) -> Result<(), Status> {
    hostcalls::set_map_value(
        MapType::HttpRequestHeaders,
        crate::rewrite::API_KEY_HEADER,
        None,
    )?;
    hostcalls::set_map_value(
        MapType::HttpRequestHeaders,
        crate::rewrite::AUTHORIZATION_HEADER,
        Some(bearer),
    )
}

/// Make `context` the one later host calls act on.
pub fn enter(context: u32) -> Result<(), Status> {
    hostcalls::set_effective_context(context)
}

pub fn resume_request() -> Result<(), Status> {
    hostcalls::resume_http_request()
}

pub fn send_local_reply(status: u16, headers: &[(&str, &str)], body: &str) -> Result<(), Status> {
    hostcalls::send_http_response(u32::from(status), headers.to_vec(), Some(body.as_bytes()))
}

pub fn dispatch(cluster: &str, headers: &[(&str, &str)], timeout: Duration) -> Result<u32, Status> {
    hostcalls::dispatch_http_call(cluster, headers.to_vec(), None, vec![], timeout)
}

/// `:status` of a token call's answer, if it got one.
pub fn call_status() -> Option<u16> {
    hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok())
}

pub fn call_body(size: usize) -> Vec<u8> {
    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

pub fn register_queue(name: &str) -> Result<u32, Status> {
    hostcalls::register_shared_queue(name)
}

pub fn enqueue(queue: u32, message: &[u8]) -> Result<(), Status> {
    hostcalls::enqueue_shared_queue(queue, Some(message))
}

/// Empty a queue; the messages only say "look at the record".
pub fn drain(queue: u32) {
    while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue) {}
}

pub fn set_tick(period: Duration) -> Result<(), Status> {
    hostcalls::set_tick_period(period)
}

pub fn define_metric(kind: crate::metrics::Kind, name: &str) -> Result<u32, Status> {
    use crate::metrics::Kind;
    let kind = match kind {
        Kind::Counter => MetricType::Counter,
        Kind::Gauge => MetricType::Gauge,
        Kind::Histogram => MetricType::Histogram,
    };
    hostcalls::define_metric(kind, name)
}

pub fn increment_metric(id: u32, delta: i64) -> Result<(), Status> {
    hostcalls::increment_metric(id, delta)
}

pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
    hostcalls::record_metric(id, value)
}
