//! What a worker needs from the proxy that runs it: one trait, implemented
//! once per host (`glue` for proxy-wasm; the native build for Envoy's
//! dynamic modules). Values read from a host are bytes, decoded by the
//! worker with [`crate::wire`]; a host call that fails is a [`Status`], never
//! a panic.

use std::time::Duration;

use crate::metrics::Kind;
use crate::source::TokenRequest;
use crate::store::SharedStore;

/// A host status that was not OK, kept as the number the host returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u32);

/// Log levels, numbered as proxy-wasm and Envoy's dynamic modules both
/// number them (`level as u32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    /// Start-up problems that must stand out.
    Critical = 5,
}

/// The operations of one worker's host. "The request in hand" is the one
/// whose callback is running, or the one last [`Host::enter`]ed.
pub trait Host {
    /// The process-wide store every worker shares.
    type Store: SharedStore;

    fn store(&self) -> Self::Store;
    /// Milliseconds since the Unix epoch, by the host's clock.
    fn now_ms(&self) -> u64;
    /// 64 random bits (or the best the host can do).
    fn random_seed(&self) -> u64;
    fn logs(&self, level: Level) -> bool;
    fn log(&self, level: Level, line: &str);

    /// A queue other workers can wake this one through.
    fn register_queue(&self, name: &str) -> Result<u32, Status>;
    fn enqueue(&self, queue: u32, message: &[u8]) -> Result<(), Status>;
    fn set_tick(&self, period: Duration) -> Result<(), Status>;
    /// Send a token call; its answer comes back to [`super::Worker::answered`]
    /// under the returned call id.
    fn dispatch(&self, request: &TokenRequest) -> Result<u32, Status>;
    /// Can the host run this worker, while it holds no request, to take in
    /// the answer to its token call? A worker that cannot leaves refreshing
    /// ahead to those that can (`Agent::refresh_ahead`).
    fn wakes_when_idle(&self) -> bool {
        true
    }
    fn define_metric(&self, kind: Kind, name: &str) -> Result<u32, Status>;
    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), Status>;
    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status>;

    /// Make `request` the request in hand; an error means it is gone.
    fn enter(&self, request: u32) -> Result<(), Status>;
    /// Done with the requests entered: back to the worker's own context.
    fn leave(&self);
    /// The cluster Envoy routes the request in hand to, as Envoy sees it now.
    fn routed_cluster(&self) -> Option<Vec<u8>>;
    fn set_request_header(&self, name: &str, value: &str) -> Result<(), Status>;
    fn remove_request_header(&self, name: &str) -> Result<(), Status>;
    /// Let the request in hand go on, after it was held.
    fn resume_request(&self) -> Result<(), Status>;
    fn send_local_reply(
        &self,
        status: u16,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<(), Status>;
    fn response_header(&self, name: &str) -> Option<Vec<u8>>;
    /// Set (or with `None`, remove) a response header.
    fn set_response_header(&self, name: &str, value: Option<&str>) -> Result<(), Status>;
    /// Up to `size` bytes of the response body received so far.
    fn response_body(&self, size: usize) -> Vec<u8>;
    /// Replace the first `size` bytes (the whole buffered body) of the response.
    fn replace_response_body(&self, size: usize, body: &[u8]) -> Result<(), Status>;
}

/// Log through a host, formatting only when the host wants the level.
macro_rules! say {
    ($host:expr, $level:ident, $($arg:tt)+) => {{
        let host = &$host;
        if host.logs($crate::worker::Level::$level) {
            host.log($crate::worker::Level::$level, &format!($($arg)+));
        }
    }};
}
pub(crate) use say;
