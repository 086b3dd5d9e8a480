//! aoai-msi-filter as an Envoy dynamic module (`libaoai_msi.so`): the same
//! core as the proxy-wasm filter, behind Envoy's native C ABI.
//!
//! The twin of `src/glue`: Envoy's event hooks in, the core's
//! [`Worker`]/[`Stream`] decide, [`host::NativeHost`] calls out. As with
//! proxy-wasm's one VM per worker thread, each Envoy worker thread has its
//! own `Worker` per filter configuration (thread-local, created by the first
//! request on that thread), and each request its own `Stream`.
//!
//! Token calls go out from the main thread, as configuration callouts (a
//! client hanging up cannot cancel them); their answers come back to the
//! thread that asked, through its mailbox. Every hook catches panics
//! ([`guard`]): a panic never crosses into Envoy, and the request fails
//! closed.

#![cfg(not(target_arch = "wasm32"))]
// A panic must unwind to the hook's catch, never abort Envoy.
#[cfg(panic = "abort")]
compile_error!("build the native module with panic = \"unwind\" (make build-native does)");

mod abi;
mod federated;
mod guard;
mod host;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;
use std::sync::{Arc, RwLock};

use aoai_msi_filter::config::{Config, HostEnv};
use aoai_msi_filter::token::MAX_RESPONSE_BYTES;
use aoai_msi_filter::wire;
use aoai_msi_filter::worker::{self, Flow, Host, Level, Stream, Worker, DRAIN_LIMIT, TICK};

use abi::{EnvoyBuffer, EnvoyHeader};
use guard::{guarded, OnPanic};
use host::{log, EnvoyConfig, Mail, Mailbox, MetricIds, NativeHost, Ptr, Secrets, Shared};

// ---------------------------------------------------------------- program

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const u8 {
    // Quiet the default panic message on stderr; the hooks log panics themselves.
    std::panic::set_hook(Box::new(|_| {}));
    abi::ABI_VERSION.as_ptr()
}

// ---------------------------------------------------------------- configuration

/// The module's side of one filter configuration.
struct ConfigHandle {
    shared: Arc<Shared>,
}

/// # Safety
/// Called by Envoy on the main thread with live buffers.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: *mut c_void,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    guarded("config_new", OnPanic::Return(std::ptr::null()), || {
        // SAFETY: Envoy's buffer, valid for this hook.
        let bytes = unsafe { config.to_vec() };
        let env = |name: &str| std::env::var(name).ok();
        let envoy_config: Arc<EnvoyConfig> = Arc::new(RwLock::new(Some(Ptr(config_envoy))));
        // SDS generic secrets are subscribed to now, while Envoy allows it.
        let secrets = Secrets::new(Arc::clone(&envoy_config));
        let config = match Config::parse_with_host(&bytes, &HostEnv::with_secrets(&env, &secrets)) {
            Ok(config) => config,
            Err(e) => {
                log(Level::Error, &worker::invalid_configuration(e));
                return std::ptr::null();
            }
        };
        // Envoy takes metric definitions only now: every one the worker could use.
        let metrics = match MetricIds::define_all(config_envoy) {
            Ok(metrics) => metrics,
            Err(e) => {
                log(Level::Error, &worker::cannot_start(e));
                return std::ptr::null();
            }
        };
        let handle = ConfigHandle {
            shared: Arc::new(Shared::new(
                config,
                federated::token_file(env),
                envoy_config,
                metrics,
            )),
        };
        handle.shared.arm();
        Box::into_raw(Box::new(handle)) as *const c_void
    })
}

/// # Safety
/// `config` is a pointer `config_new` returned, destroyed once.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    guarded("config_destroy", OnPanic::Return(()), || {
        if config.is_null() {
            return;
        }
        // SAFETY: made by Box::into_raw in config_new; Envoy destroys it once.
        let handle = unsafe { Box::from_raw(config as *mut ConfigHandle) };
        // The main thread's worker stops while its configuration still lives.
        let key = Arc::as_ptr(&handle.shared) as usize;
        let main = WORKERS.with(|w| w.try_borrow_mut().ok().and_then(|mut w| w.remove(&key)));
        drop(main);
        handle.shared.stop();
    })
}

/// # Safety
/// `config` is a live pointer `config_new` returned.
unsafe fn config_handle<'a>(config: *const c_void) -> Option<&'a ConfigHandle> {
    // SAFETY: the caller's guarantee; null is None.
    unsafe { (config as *const ConfigHandle).as_ref() }
}

/// # Safety
/// Called by Envoy on the main thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _config_envoy: *mut c_void,
    config: *const c_void,
    event: u64,
) {
    guarded("config_scheduled", OnPanic::Return(()), || {
        // SAFETY: Envoy passes the live configuration.
        let Some(handle) = (unsafe { config_handle(config) }) else {
            return;
        };
        let shared = &handle.shared;
        match event {
            host::EVENT_OUTBOX => shared.send_outbox(),
            host::EVENT_START | host::EVENT_TICK | host::EVENT_MAIL => {
                shared.start();
                if event == host::EVENT_TICK {
                    shared.broadcast_tick();
                    shared.flush_tallies();
                }
                // The main thread's own worker: it keeps tokens fresh while
                // no request comes (as the wasm build's main-thread VMs do).
                if let Some(live) = worker_for(shared, std::ptr::null_mut(), true) {
                    let _hook = live.host.hook(std::ptr::null_mut());
                    if event == host::EVENT_TICK {
                        live.host.mailbox.post_tick();
                    }
                    live.drain();
                }
            }
            _ => {}
        }
    })
}

/// # Safety
/// Called by Envoy on the main thread; headers and chunks valid for the hook.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _config_envoy: *mut c_void,
    config: *const c_void,
    callout: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_size: usize,
    chunks: *const EnvoyBuffer,
    chunks_size: usize,
) {
    guarded("config_http_callout_done", OnPanic::Return(()), || {
        // SAFETY: Envoy passes the live configuration.
        let Some(handle) = (unsafe { config_handle(config) }) else {
            return;
        };
        // "Success" also for an HTTP error: the status is `:status`.
        let mut status = None;
        let mut body = Vec::new();
        if result == abi::CALLOUT_SUCCESS {
            // SAFETY: Envoy's arrays of the given sizes, valid for this hook.
            let headers = unsafe { slice(headers, headers_size) };
            for h in headers {
                // SAFETY: Envoy's buffers, valid for this hook.
                let key = unsafe {
                    EnvoyBuffer {
                        ptr: h.key_ptr,
                        length: h.key_length,
                    }
                    .to_vec()
                };
                if key == b":status" {
                    // SAFETY: as above.
                    let value = unsafe {
                        EnvoyBuffer {
                            ptr: h.value_ptr,
                            length: h.value_length,
                        }
                        .to_vec()
                    };
                    status = wire::status(&value);
                }
            }
            // One byte past the bound, so an oversized body is recognised unread.
            // SAFETY: as above.
            for chunk in unsafe { slice(chunks, chunks_size) } {
                if body.len() > MAX_RESPONSE_BYTES {
                    break;
                }
                // SAFETY: Envoy's buffer, valid for this hook.
                let bytes = unsafe { chunk.to_vec() };
                let room = MAX_RESPONSE_BYTES + 1 - body.len();
                body.extend_from_slice(&bytes[..bytes.len().min(room)]);
            }
        }
        handle.shared.answered(callout, status, body);
    })
}

/// # Safety
/// `ptr` null or pointing to `len` values.
unsafe fn slice<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: the caller's guarantee.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

// ---------------------------------------------------------------- workers

/// This thread's worker for one configuration.
struct Live {
    worker: Worker,
    host: NativeHost,
    /// Requests of this worker still alive on this thread.
    filters: Cell<usize>,
    last_tick_ms: Cell<u64>,
}

impl Live {
    /// Take in what arrived from other threads, and tick when it is time.
    fn drain(&self) {
        let now = self.host.now_ms();
        let due = now.saturating_sub(self.last_tick_ms.get());
        let mut tick = due >= TICK.as_millis() as u64;
        let mut messages = Vec::new();
        for mail in self.host.mailbox.take() {
            match mail {
                Mail::Answer { call, status, body } => {
                    self.worker.answered(&self.host, call, status, &body)
                }
                Mail::Failed { call, failure } => self.worker.failed(&self.host, call, failure),
                Mail::Undispatched {
                    call,
                    cluster,
                    status,
                } => self.worker.undispatched(
                    &self.host,
                    call,
                    &cluster,
                    aoai_msi_filter::worker::Status(status),
                ),
                Mail::Queue(message) => messages.push(message),
                Mail::Tick => tick |= due >= TICK.as_millis() as u64 / 2,
            }
        }
        for batch in messages.chunks(DRAIN_LIMIT) {
            self.worker.queue_ready(&self.host, batch);
        }
        if tick {
            self.last_tick_ms.set(now);
            self.worker.tick(&self.host);
        }
        self.host.run_resumes();
    }

    /// What the request's own step posted to this worker (a replacement
    /// asked for when the upstream refused the credential): taken in now,
    /// as an idle thread would not wake for it. Only after response-side
    /// steps, where this request is not held.
    fn drain_posted(&self) {
        if self.host.mailbox.pending() {
            self.drain();
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.worker.stop(&self.host);
    }
}

thread_local! {
    /// This thread's workers, by configuration.
    static WORKERS: RefCell<HashMap<usize, Rc<Live>>> = RefCell::new(HashMap::new());
}

/// This thread's worker for `shared`, started on first use (`main`: this is
/// the main thread, woken through the configuration's scheduler).
fn worker_for(shared: &Arc<Shared>, filter: *mut c_void, main: bool) -> Option<Rc<Live>> {
    let key = Arc::as_ptr(shared) as usize;
    if let Some(live) = WORKERS.with(|w| w.try_borrow().ok().and_then(|w| w.get(&key).cloned())) {
        return Some(live);
    }
    if !shared.alive() {
        return None;
    }
    let mailbox = Arc::new(if main {
        Mailbox::on_main(shared)
    } else {
        Mailbox::on_thread()
    });
    shared.add_mailbox(&mailbox);
    let host = NativeHost::new(shared.clone(), mailbox);
    let worker = {
        let _hook = host.hook(filter);
        let fallback_id = host::add_filter(std::ptr::null_mut());
        host::remove_filter(fallback_id);
        Worker::start(&host, shared.config.clone(), fallback_id)
    };
    match worker {
        Ok(worker) => {
            let live = Rc::new(Live {
                worker,
                host,
                filters: Cell::new(0),
                last_tick_ms: Cell::new(host::now_ms()),
            });
            WORKERS.with(|w| {
                if let Ok(mut w) = w.try_borrow_mut() {
                    w.insert(key, live.clone());
                }
            });
            Some(live)
        }
        Err(e) => {
            log(Level::Critical, &worker::cannot_start(e));
            None
        }
    }
}

/// This thread's workers of live configurations, with mail waiting.
fn with_mail() -> Vec<Rc<Live>> {
    WORKERS.with(|w| match w.try_borrow() {
        Ok(w) => w
            .values()
            .filter(|live| live.host.mailbox.pending() && live.host.shared.alive())
            .cloned()
            .collect(),
        Err(_) => Vec::new(),
    })
}

/// Take in the mail of every worker on this thread, whatever its
/// configuration: a worker has no requests of its own to be woken through
/// once a reload has replaced its configuration, yet the answer to the token
/// call it leads still comes to it (and until it does, it holds the lease
/// that every worker of the new configuration waits on).
fn drain_thread() {
    for live in with_mail() {
        let _hook = live.host.hook(std::ptr::null_mut());
        live.drain();
    }
}

thread_local! {
    /// Configurations gone, as this thread last swept.
    static SWEPT: Cell<u64> = const { Cell::new(0) };
}

/// Stop this thread's workers of configurations that went away (Envoy
/// destroys a configuration after its last request, so none is left here).
fn sweep() {
    let gone = host::configurations_gone();
    if SWEPT.with(|s| s.replace(gone)) == gone {
        return;
    }
    let dead: Vec<Rc<Live>> = WORKERS.with(|w| match w.try_borrow_mut() {
        Ok(mut w) => {
            let keys: Vec<usize> = w
                .iter()
                .filter(|(_, live)| !live.host.shared.alive())
                .map(|(key, _)| *key)
                .collect();
            keys.iter().filter_map(|key| w.remove(key)).collect()
        }
        Err(_) => Vec::new(),
    });
    drop(dead);
}

// ---------------------------------------------------------------- requests

/// The module's side of one request.
struct Filter {
    id: u32,
    envoy: *mut c_void,
    live: Option<Rc<Live>>,
    stream: RefCell<Stream>,
    /// Its scheduler is one of the thread's doorbells.
    doorbell: Cell<bool>,
    finished: Cell<bool>,
}

impl Filter {
    /// Held: keep a doorbell on this request while it lives, and ring it if
    /// mail is already waiting for a worker of this thread.
    fn park(&self) {
        if !self.doorbell.get() {
            // SAFETY: this filter, live, on its own thread.
            let scheduler =
                unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_new(self.envoy) };
            if !scheduler.is_null() {
                host::thread_bell().add(self.id, Ptr(scheduler));
                self.doorbell.set(true);
            }
        }
        if !with_mail().is_empty() {
            host::thread_bell().ring();
        }
    }

    fn finish(&self, live: &Live) {
        if !self.finished.replace(true) {
            if let Ok(stream) = self.stream.try_borrow() {
                stream.finish(&live.worker, &live.host);
            }
        }
    }
}

/// # Safety
/// `filter` is a live pointer `filter_new` returned.
unsafe fn filter_of<'a>(filter: *const c_void) -> Option<&'a Filter> {
    // SAFETY: the caller's guarantee; null is None.
    unsafe { (filter as *const Filter).as_ref() }
}

/// One step of a filter inside its hook: Envoy's pointer made current for
/// the filter's worker and the worker's mail taken in, then `step`. `None`
/// when the filter is null or has no worker (it then passes everything).
///
/// # Safety
/// `filter` is a live pointer `filter_new` returned; `envoy` is Envoy's
/// pointer for it, passed to this hook.
unsafe fn in_hook<R>(
    envoy: *mut c_void,
    filter: *const c_void,
    step: impl FnOnce(&Filter, &Live) -> R,
) -> Option<R> {
    // SAFETY: the caller's guarantee.
    let filter = unsafe { filter_of(filter) }?;
    let live = filter.live.as_deref()?;
    let _hook = live.host.hook(envoy);
    live.drain();
    Some(step(filter, live))
}

/// # Safety
/// Called by Envoy on a worker thread with a live configuration.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    envoy: *mut c_void,
) -> *const c_void {
    guarded("filter_new", OnPanic::Return(std::ptr::null()), || {
        // SAFETY: Envoy passes the live configuration.
        let Some(handle) = (unsafe { config_handle(config) }) else {
            return std::ptr::null();
        };
        sweep();
        handle.shared.start();
        let live = worker_for(&handle.shared, envoy, false);
        let id = host::add_filter(envoy);
        if let Some(live) = &live {
            live.filters.set(live.filters.get() + 1);
        }
        let filter = Filter {
            id,
            envoy,
            live,
            stream: RefCell::new(Stream::new(id)),
            doorbell: Cell::new(false),
            finished: Cell::new(false),
        };
        Box::into_raw(Box::new(filter)) as *const c_void
    })
}

/// # Safety
/// Called by Envoy on the filter's thread with its live pointers.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: *mut c_void,
    filter: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    use abi::headers_status::{CONTINUE, STOP_ALL_ITERATION_AND_WATERMARK};
    guarded(
        "request_headers",
        OnPanic::FailRequest(envoy, STOP_ALL_ITERATION_AND_WATERMARK),
        || {
            let step = |filter: &Filter, live: &Live| {
                drain_thread();
                let headers = live.host.request_headers();
                // SAFETY: taken in this hook, and dropped before it returns.
                let pairs = unsafe { host::header_pairs(&headers) };
                let flow = match filter.stream.try_borrow_mut() {
                    Ok(mut stream) => stream.request_headers(&live.worker, &live.host, &pairs),
                    Err(_) => Flow::Continue,
                };
                match flow {
                    Flow::Continue => CONTINUE,
                    Flow::Pause => {
                        filter.park();
                        STOP_ALL_ITERATION_AND_WATERMARK
                    }
                }
            };
            // SAFETY: Envoy passes the live filter and its pointer.
            unsafe { in_hook(envoy, filter, step) }.unwrap_or(CONTINUE)
        },
    )
}

/// A body chunk or the trailers of the request.
fn request_rest(envoy: *mut c_void, filter: *const c_void) -> Flow {
    let step = |filter: &Filter, live: &Live| match filter.stream.try_borrow() {
        Ok(stream) => stream.request_body_or_trailers(&live.worker),
        Err(_) => Flow::Continue,
    };
    // SAFETY: Envoy passes the live filter and its pointer.
    unsafe { in_hook(envoy, filter, step) }.unwrap_or(Flow::Continue)
}

/// # Safety
/// Called by Envoy on the filter's thread with its live pointers.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    envoy: *mut c_void,
    filter: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    use abi::body_status::{CONTINUE, STOP_ITERATION_AND_BUFFER};
    guarded(
        "request_body",
        OnPanic::FailRequest(envoy, STOP_ITERATION_AND_BUFFER),
        || match request_rest(envoy, filter) {
            Flow::Continue => CONTINUE,
            Flow::Pause => STOP_ITERATION_AND_BUFFER,
        },
    )
}

/// # Safety
/// Called by Envoy on the filter's thread with its live pointers.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    envoy: *mut c_void,
    filter: *const c_void,
) -> u32 {
    use abi::trailers_status::{CONTINUE, STOP_ITERATION};
    guarded(
        "request_trailers",
        OnPanic::FailRequest(envoy, STOP_ITERATION),
        || match request_rest(envoy, filter) {
            Flow::Continue => CONTINUE,
            Flow::Pause => STOP_ITERATION,
        },
    )
}

/// # Safety
/// Called by Envoy on the filter's thread with its live pointers.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: *mut c_void,
    filter: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    use abi::headers_status::CONTINUE;
    guarded("response_headers", OnPanic::Return(CONTINUE), || {
        let step = |filter: &Filter, live: &Live| {
            // A reply the filter sends from its own request callback comes
            // back here at once: its stream is busy, and the reply carries
            // its diagnosis already.
            if let Ok(mut stream) = filter.stream.try_borrow_mut() {
                stream.response_headers(&live.worker, &live.host);
            }
            live.drain_posted();
        };
        // SAFETY: Envoy passes the live filter and its pointer.
        let _ = unsafe { in_hook(envoy, filter, step) };
        CONTINUE
    })
}

/// # Safety
/// Called by Envoy on the filter's thread with its live pointers.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    envoy: *mut c_void,
    filter: *const c_void,
    end_of_stream: bool,
) -> u32 {
    use abi::body_status::{CONTINUE, STOP_ITERATION_AND_BUFFER};
    guarded("response_body", OnPanic::Return(CONTINUE), || {
        let step = |filter: &Filter, live: &Live| {
            let flow = match filter.stream.try_borrow_mut() {
                // Most answers are not read: no need to measure them.
                Ok(stream) if !stream.reads_response_body() => Flow::Continue,
                Ok(mut stream) => {
                    let size = live.host.response_body_size();
                    stream.response_body(&live.worker, &live.host, size, end_of_stream)
                }
                Err(_) => Flow::Continue,
            };
            live.drain_posted();
            match flow {
                Flow::Continue => CONTINUE,
                Flow::Pause => STOP_ITERATION_AND_BUFFER,
            }
        };
        // SAFETY: Envoy passes the live filter and its pointer.
        unsafe { in_hook(envoy, filter, step) }.unwrap_or(CONTINUE)
    })
}

/// # Safety
/// Called by Envoy on the filter's thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _envoy: *mut c_void,
    _filter: *const c_void,
) -> u32 {
    abi::trailers_status::CONTINUE
}

/// # Safety
/// Called by Envoy on the filter's thread with its live pointers.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    envoy: *mut c_void,
    filter: *const c_void,
) {
    guarded("stream_complete", OnPanic::Return(()), || {
        // SAFETY: Envoy passes the live filter.
        let Some(filter) = (unsafe { filter_of(filter) }) else {
            return;
        };
        if let Some(live) = &filter.live {
            let _hook = live.host.hook(envoy);
            filter.finish(live);
            live.drain_posted();
        }
    })
}

/// # Safety
/// `filter` is a pointer `filter_new` returned, destroyed once, on its thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: *const c_void) {
    guarded("filter_destroy", OnPanic::Return(()), || {
        if filter.is_null() {
            return;
        }
        // SAFETY: made by Box::into_raw in filter_new; Envoy destroys it once.
        let filter = unsafe { Box::from_raw(filter as *mut Filter) };
        host::remove_filter(filter.id);
        let Some(live) = &filter.live else { return };
        if filter.doorbell.get() {
            host::thread_bell().remove(filter.id);
            // Mail may have rung this very doorbell: ring another.
            if !with_mail().is_empty() {
                host::thread_bell().ring();
            }
        }
        {
            // Envoy's pointer is no longer to be used.
            let _hook = live.host.hook(std::ptr::null_mut());
            filter.finish(live);
        }
        live.filters.set(live.filters.get().saturating_sub(1));
        if live.filters.get() == 0 {
            // The thread goes idle and will not tick: report its counts now.
            let _hook = live.host.hook(std::ptr::null_mut());
            live.worker.flush(&live.host);
        }
    })
}

/// The doorbell: mail for a worker of this thread.
///
/// # Safety
/// Called by Envoy on the filter's thread with its live pointers.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    envoy: *mut c_void,
    filter: *const c_void,
    _event: u64,
) {
    guarded("scheduled", OnPanic::Return(()), || {
        // SAFETY: Envoy passes the live filter.
        let Some(filter) = (unsafe { filter_of(filter) }) else {
            return;
        };
        if let Some(live) = &filter.live {
            let _hook = live.host.hook(envoy);
            live.drain();
        }
        drain_thread();
    })
}

// ---------------------------------------------------------------- unused hooks
// Envoy requires every hook of an HTTP filter module; these do nothing.

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> *const c_void {
    log(Level::Error, "per-route configuration is not supported");
    std::ptr::null()
}

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
    _config: *const c_void,
) {
}

/// # Safety
/// Called by Envoy; no pointer is used (the module makes no filter callouts).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _envoy: *mut c_void,
    _filter: *const c_void,
    _callout: u64,
    _result: u32,
    _headers: *const EnvoyHeader,
    _headers_size: usize,
    _chunks: *const EnvoyBuffer,
    _chunks_size: usize,
) {
}

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _envoy: *mut c_void,
    _filter: *const c_void,
    _stream: u64,
    _headers: *const EnvoyHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _envoy: *mut c_void,
    _filter: *const c_void,
    _stream: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _envoy: *mut c_void,
    _filter: *const c_void,
    _stream: u64,
    _trailers: *const EnvoyHeader,
    _trailers_size: usize,
) {
}

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _envoy: *mut c_void,
    _filter: *const c_void,
    _stream: u64,
) {
}

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _envoy: *mut c_void,
    _filter: *const c_void,
    _stream: u64,
    _reason: u32,
) {
}

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _envoy: *mut c_void,
    _filter: *const c_void,
) {
}

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _envoy: *mut c_void,
    _filter: *const c_void,
) {
}

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _envoy: *mut c_void,
    _filter: *const c_void,
    _response_code: u32,
    _details: EnvoyBuffer,
    _reset_imminent: bool,
) -> u32 {
    abi::LOCAL_REPLY_CONTINUE
}

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
    _config_envoy: *mut c_void,
    _config: *const c_void,
    _stream: u64,
    _headers: *const EnvoyHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
    _config_envoy: *mut c_void,
    _config: *const c_void,
    _stream: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
    _config_envoy: *mut c_void,
    _config: *const c_void,
    _stream: u64,
    _trailers: *const EnvoyHeader,
    _trailers_size: usize,
) {
}

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(
    _config_envoy: *mut c_void,
    _config: *const c_void,
    _stream: u64,
) {
}

/// # Safety
/// Called by Envoy; no pointer is used.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(
    _config_envoy: *mut c_void,
    _config: *const c_void,
    _stream: u64,
    _reason: u32,
) {
}
