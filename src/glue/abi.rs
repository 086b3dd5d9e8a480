//! The proxy-wasm ABI 0.2.1 functions the filter uses, declared here with
//! statuses as plain `u32`.
//!
//! The SDK's `hostcalls` wrappers `panic!` on any status they did not expect,
//! unwrap UTF-8 in their string getters, and read the status into a Rust enum
//! (undefined behaviour for a value the enum lacks). One odd byte from an
//! upstream would then abort the VM. Here every status is a number and every
//! value is bytes; [`host`](super::host) decides what they mean.
//!
//! The only SDK call left is `dispatch_http_call`, which must also register the
//! call with the SDK's dispatcher so its answer reaches the root context; it
//! panics only on statuses Envoy's `httpCall` never returns.

use std::ptr::{null, null_mut};

/// `WasmResult::Ok`.
pub const OK: u32 = 0;
/// `WasmResult::NotFound`.
pub const NOT_FOUND: u32 = 1;
/// `WasmResult::CasMismatch`.
pub const CAS_MISMATCH: u32 = 8;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message: *const u8, size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        kind: u32,
        start: usize,
        max_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        kind: u32,
        start: usize,
        size: usize,
        data: *const u8,
        data_size: usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        kind: u32,
        key: *const u8,
        key_size: usize,
        value: *mut *mut u8,
        value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        kind: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(kind: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_get_header_map_pairs(kind: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        value: *mut *mut u8,
        value_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        value: *mut *mut u8,
        value_size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_register_shared_queue(name: *const u8, name_size: usize, queue: *mut u32) -> u32;
    fn proxy_enqueue_shared_queue(queue: u32, value: *const u8, value_size: usize) -> u32;
    fn proxy_dequeue_shared_queue(queue: u32, value: *mut *mut u8, value_size: *mut usize) -> u32;
    fn proxy_set_effective_context(context: u32) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, delta: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
}

/// Header maps (`WasmHeaderMapType`), named as the ABI names them.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
#[allow(clippy::enum_variant_names)]
pub enum Map {
    RequestHeaders = 0,
    ResponseHeaders = 2,
    CallResponseHeaders = 6,
}

/// Buffers (`WasmBufferType`).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum Buffer {
    ResponseBody = 1,
    CallResponseBody = 4,
    PluginConfiguration = 7,
}

/// `proxy_continue_stream`'s stream: the request direction.
const STREAM_REQUEST: u32 = 0;

/// One host call that hands back a value: it writes a pointer and a length
/// and returns a status. The value is taken over (the host allocated it
/// through the SDK's `proxy_on_memory_allocate`, a boxed slice of exactly
/// `size` bytes); `None` when the host wrote no pointer.
fn call_for(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> (u32, Option<Vec<u8>>) {
    let (mut data, mut size) = (null_mut(), 0usize);
    let code = call(&mut data, &mut size);
    let value = (!data.is_null()).then(|| {
        // SAFETY: just written by the host call, allocated as a Box<[u8]>
        // of `size` bytes (capacity == size), not yet freed.
        unsafe { Vec::from_raw_parts(data, size, size) }
    });
    (code, value)
}

/// [`call_for`] with the usual statuses: `Ok(None)` when the host has no
/// such value.
fn get(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Result<Option<Vec<u8>>, u32> {
    match call_for(call) {
        (OK, value) => Ok(Some(value.unwrap_or_default())),
        (NOT_FOUND, _) => Ok(None),
        (other, _) => Err(other),
    }
}

fn status(code: u32) -> Result<(), u32> {
    if code == OK {
        Ok(())
    } else {
        Err(code)
    }
}

pub fn log(level: u32, message: &str) {
    // SAFETY: the pointer and length describe `message`.
    let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

pub fn now_nanos() -> Option<u64> {
    let mut nanos = 0u64;
    // SAFETY: the host writes one u64.
    (unsafe { proxy_get_current_time_nanoseconds(&mut nanos) } == OK).then_some(nanos)
}

pub fn set_tick_period_ms(period: u32) -> Result<(), u32> {
    // SAFETY: no pointers.
    status(unsafe { proxy_set_tick_period_milliseconds(period) })
}

/// Up to `max_size` bytes of a buffer from `start`; empty when the host has none.
pub fn buffer(kind: Buffer, start: usize, max_size: usize) -> Vec<u8> {
    // SAFETY: the host writes a pointer and a length.
    get(|data, size| unsafe { proxy_get_buffer_bytes(kind as u32, start, max_size, data, size) })
        .ok()
        .flatten()
        .unwrap_or_default()
}

pub fn set_buffer(kind: Buffer, start: usize, size: usize, value: &[u8]) -> Result<(), u32> {
    // SAFETY: the pointer and length describe `value`.
    status(unsafe { proxy_set_buffer_bytes(kind as u32, start, size, value.as_ptr(), value.len()) })
}

pub fn header(map: Map, name: &str) -> Option<Vec<u8>> {
    // SAFETY: the host reads `name` and writes a pointer and a length.
    get(|data, size| unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), data, size)
    })
    .ok()
    .flatten()
}

/// The whole header map, serialised as the ABI does (see
/// [`crate::wire::deserialize_pairs`]): one crossing for every header.
pub fn header_pairs(map: Map) -> Vec<u8> {
    // SAFETY: the host writes a pointer and a length.
    get(|data, size| unsafe { proxy_get_header_map_pairs(map as u32, data, size) })
        .ok()
        .flatten()
        .unwrap_or_default()
}

pub fn set_header(map: Map, name: &str, value: &[u8]) -> Result<(), u32> {
    // SAFETY: the pointers and lengths describe `name` and `value`.
    status(unsafe {
        proxy_replace_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

pub fn remove_header(map: Map, name: &str) -> Result<(), u32> {
    // SAFETY: the pointer and length describe `name`.
    status(unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) })
}

/// A property, by its path serialised with [`crate::wire::serialize_path`].
pub fn property(path: &[u8]) -> Option<Vec<u8>> {
    // SAFETY: the host reads `path` and writes a pointer and a length.
    get(|data, size| unsafe { proxy_get_property(path.as_ptr(), path.len(), data, size) })
        .ok()
        .flatten()
}

/// `(value, cas)`; a key that was never set is `(None, None)`.
pub fn shared_data(key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), u32> {
    let mut cas = 0u32;
    // SAFETY: the host reads `key` and writes a pointer, a length and a CAS value.
    let (code, value) = call_for(|data, size| unsafe {
        proxy_get_shared_data(key.as_ptr(), key.len(), data, size, &mut cas)
    });
    match code {
        OK => Ok((value, (cas != 0).then_some(cas))),
        NOT_FOUND => Ok((None, None)),
        other => Err(other),
    }
}

pub fn set_shared_data(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), u32> {
    // SAFETY: the pointers and lengths describe `key` and `value`.
    status(unsafe {
        proxy_set_shared_data(
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            cas.unwrap_or(0),
        )
    })
}

pub fn register_queue(name: &str) -> Result<u32, u32> {
    let mut queue = 0u32;
    // SAFETY: the host reads `name` and writes one u32.
    status(unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut queue) })?;
    Ok(queue)
}

pub fn enqueue(queue: u32, message: &[u8]) -> Result<(), u32> {
    // SAFETY: the pointer and length describe `message`.
    status(unsafe { proxy_enqueue_shared_queue(queue, message.as_ptr(), message.len()) })
}

/// The next message, `None` when the queue is empty (`Empty`, 7) or gone.
pub fn dequeue(queue: u32) -> Option<Vec<u8>> {
    // SAFETY: the host writes a pointer and a length.
    get(|data, size| unsafe { proxy_dequeue_shared_queue(queue, data, size) })
        .ok()
        .flatten()
}

pub fn set_effective_context(context: u32) -> Result<(), u32> {
    // SAFETY: no pointers.
    status(unsafe { proxy_set_effective_context(context) })
}

pub fn resume_request() -> Result<(), u32> {
    // SAFETY: no pointers.
    status(unsafe { proxy_continue_stream(STREAM_REQUEST) })
}

pub fn send_local_response(status_code: u16, headers: &[u8], body: &[u8]) -> Result<(), u32> {
    // SAFETY: the pointers and lengths describe `headers` and `body`.
    status(unsafe {
        proxy_send_local_response(
            u32::from(status_code),
            null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}

pub fn define_metric(kind: u32, name: &str) -> Result<u32, u32> {
    let mut id = 0u32;
    // SAFETY: the host reads `name` and writes one u32.
    status(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment_metric(id: u32, delta: i64) -> Result<(), u32> {
    // SAFETY: no pointers.
    status(unsafe { proxy_increment_metric(id, delta) })
}

pub fn record_metric(id: u32, value: u64) -> Result<(), u32> {
    // SAFETY: no pointers.
    status(unsafe { proxy_record_metric(id, value) })
}
