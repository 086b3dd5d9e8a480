//! The dynamic-module floor of `make bench`: an Envoy dynamic module (ABI
//! v0.2.0, Envoy 1.40) whose HTTP filter exists and does nothing. What Envoy
//! spends on it per request is what any dynamic module filter costs before
//! it does its work, as `bench/empty-filter` is for proxy-wasm.
//!
//! Every hook Envoy resolves is exported; each ignores its arguments (the
//! C calling convention lets a callee declare fewer than it is passed) and
//! answers "continue". Loaded as `dynamic_module_config: {name: empty_native}`.

use std::ffi::{c_char, c_void};

/// Any non-null pointer: Envoy only hands it back.
static HANDLE: u8 = 0;

fn handle() -> *const c_void {
    std::ptr::addr_of!(HANDLE).cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    c"v0.2.0".as_ptr()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new() -> *const c_void {
    handle()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new() -> *const c_void {
    handle()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new() -> *const c_void {
    handle()
}

/// The hooks that answer a status: 0 is "continue" for every one of them.
macro_rules! continue_hooks {
    ($($hook:ident),* $(,)?) => {$(
        #[no_mangle]
        pub extern "C" fn $hook() -> u32 {
            0
        }
    )*};
}

continue_hooks!(
    envoy_dynamic_module_on_http_filter_request_headers,
    envoy_dynamic_module_on_http_filter_request_body,
    envoy_dynamic_module_on_http_filter_request_trailers,
    envoy_dynamic_module_on_http_filter_response_headers,
    envoy_dynamic_module_on_http_filter_response_body,
    envoy_dynamic_module_on_http_filter_response_trailers,
    envoy_dynamic_module_on_http_filter_local_reply,
);

/// The hooks that answer nothing.
macro_rules! empty_hooks {
    ($($hook:ident),* $(,)?) => {$(
        #[no_mangle]
        pub extern "C" fn $hook() {}
    )*};
}

empty_hooks!(
    envoy_dynamic_module_on_http_filter_config_destroy,
    envoy_dynamic_module_on_http_filter_config_scheduled,
    envoy_dynamic_module_on_http_filter_config_http_callout_done,
    envoy_dynamic_module_on_http_filter_config_http_stream_headers,
    envoy_dynamic_module_on_http_filter_config_http_stream_data,
    envoy_dynamic_module_on_http_filter_config_http_stream_trailers,
    envoy_dynamic_module_on_http_filter_config_http_stream_complete,
    envoy_dynamic_module_on_http_filter_config_http_stream_reset,
    envoy_dynamic_module_on_http_filter_per_route_config_destroy,
    envoy_dynamic_module_on_http_filter_stream_complete,
    envoy_dynamic_module_on_http_filter_destroy,
    envoy_dynamic_module_on_http_filter_scheduled,
    envoy_dynamic_module_on_http_filter_http_callout_done,
    envoy_dynamic_module_on_http_filter_http_stream_headers,
    envoy_dynamic_module_on_http_filter_http_stream_data,
    envoy_dynamic_module_on_http_filter_http_stream_trailers,
    envoy_dynamic_module_on_http_filter_http_stream_complete,
    envoy_dynamic_module_on_http_filter_http_stream_reset,
    envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark,
    envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark,
);
