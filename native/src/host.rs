//! The worker's [`Host`] over Envoy's dynamic-module ABI: the only file that
//! calls Envoy (through [`abi`](crate::abi)), plus the process-wide pieces
//! proxy-wasm gave the wasm build for free: shared data with CAS, shared
//! queues, and a way to reach another thread.
//!
//! Threads: every Envoy worker thread has its own [`Worker`](aoai_msi_filter::worker::Worker)
//! and [`NativeHost`]; nothing of a worker is touched from another thread.
//! What crosses threads is mail ([`Mailbox`]) and a doorbell: a filter
//! scheduler of a live request on the receiving thread, committed from
//! anywhere (Envoy runs the event on the filter's own thread).

use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aoai_msi_filter::config::{Config, SdsRef, SdsSecret, SecretHost};
use aoai_msi_filter::metrics::{Kind, Metric, ALL};
use aoai_msi_filter::safe;
use aoai_msi_filter::source::TokenRequest;
use aoai_msi_filter::store::{SharedStore, StoreError};
use aoai_msi_filter::token::FetchFailure;
use aoai_msi_filter::worker::{Host, Level, Status};

use crate::abi::{self, EnvoyBuffer, EnvoyHeader, ModuleBuffer, ModuleHeader};
use crate::federated;

/// Every log line of the module starts with this (Envoy prints it under
/// `[dynamic_modules]`).
pub const LOG_PREFIX: &str = "aoai-msi-filter: ";

/// Statuses the host adapter reports (numbers of its own, as the worker only logs them).
pub mod status {
    pub const NOT_FOUND: u32 = 1;
    pub const BAD_ARGUMENT: u32 = 2;
    pub const REFUSED: u32 = 3;
}

/// A pointer Envoy owns, carried between threads; only ever passed back to
/// the thread-safe callbacks (scheduler commits) or used on its own thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ptr(pub *mut c_void);

// SAFETY: the pointer is an opaque handle; the callbacks it is passed to from
// another thread (scheduler commits) are documented as thread-safe, and
// everything else uses it only on the thread that received it.
unsafe impl Send for Ptr {}
// SAFETY: as for `Send`: shared references only hand the handle to
// thread-safe callbacks.
unsafe impl Sync for Ptr {}

pub fn log(level: Level, line: &str) {
    let message = format!("{LOG_PREFIX}{line}");
    // SAFETY: the buffer points into `message`, alive for the call.
    unsafe {
        abi::envoy_dynamic_module_callback_log(
            level_number(level),
            ModuleBuffer::of(message.as_bytes()),
        )
    }
}

fn level_number(level: Level) -> u32 {
    match level {
        Level::Trace => abi::log_level::TRACE,
        Level::Debug => abi::log_level::DEBUG,
        Level::Info => abi::log_level::INFO,
        Level::Warn => abi::log_level::WARN,
        Level::Error => abi::log_level::ERROR,
        Level::Critical => abi::log_level::CRITICAL,
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere was caught; the data is
    // plain values, still consistent between statements.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------- store

/// Shared data with proxy-wasm's semantics: one map per process, each value
/// with a CAS number that changes on every write; a write naming a CAS
/// fails if the key holds another (a key never set takes any write).
struct Entries {
    map: HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
}

fn entries() -> &'static Mutex<Entries> {
    static ENTRIES: OnceLock<Mutex<Entries>> = OnceLock::new();
    ENTRIES.get_or_init(|| {
        Mutex::new(Entries {
            map: HashMap::new(),
            next_cas: 0,
        })
    })
}

pub struct ProcessStore;

impl SharedStore for ProcessStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        let entries = lock(entries());
        Ok(match entries.map.get(key) {
            Some((value, cas)) => (Some(value.clone()), Some(*cas)),
            None => (None, None),
        })
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let mut entries = lock(entries());
        if let (Some(expected), Some((_, current))) = (cas, entries.map.get(key)) {
            if expected != *current {
                return Err(StoreError::CasMismatch);
            }
        }
        // Never 0: proxy-wasm's "no CAS".
        entries.next_cas = entries.next_cas.checked_add(1).unwrap_or(1);
        let next = entries.next_cas;
        entries.map.insert(key.to_owned(), (value.to_vec(), next));
        Ok(())
    }
}

// ---------------------------------------------------------------- mail

/// What reaches a worker from elsewhere.
#[derive(Debug)]
pub enum Mail {
    /// The answer to a token call (`status` None: no answer at all).
    Answer {
        call: u32,
        status: Option<u16>,
        body: Vec<u8>,
    },
    /// A token call answered here with a failure, never sent.
    Failed { call: u32, failure: FetchFailure },
    /// A token call the main thread could not send.
    Undispatched {
        call: u32,
        cluster: String,
        status: u32,
    },
    /// A message for the worker's queue.
    Queue(Vec<u8>),
    /// Time to tick.
    Tick,
}

/// The doorbell's event id (filter scheduler).
pub const DOORBELL: u64 = 1;

/// The doorbells of one Envoy worker thread: schedulers of the requests
/// held there, whatever their configuration. Mail for any worker of the
/// thread rings one, and the scheduled hook takes in the mail of every
/// worker of the thread: a worker needs no request of its own to be woken
/// (after a reload, none of its configuration may ever come again, while
/// the answer to its token call is still on its way).
#[derive(Default)]
pub struct Bell {
    doorbells: Mutex<Vec<(u32, Ptr)>>,
}

thread_local! {
    static BELL: Arc<Bell> = Arc::new(Bell::default());
}

/// This thread's doorbells.
pub fn thread_bell() -> Arc<Bell> {
    BELL.with(Arc::clone)
}

impl Bell {
    /// Run the scheduled event on one of the thread's held requests.
    /// Without one, the mail waits for the thread's next request.
    pub fn ring(&self) {
        let doorbells = lock(&self.doorbells);
        if let Some((_, scheduler)) = doorbells.first() {
            // SAFETY: a scheduler in the list is not deleted while the lock
            // is held, and committing is thread-safe.
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_scheduler_commit(
                    scheduler.0,
                    DOORBELL,
                )
            };
        }
    }

    /// On the thread of request `filter`: its scheduler is a doorbell.
    pub fn add(&self, filter: u32, scheduler: Ptr) {
        lock(&self.doorbells).push((filter, scheduler));
    }

    /// On the thread of request `filter`, which is going: delete its
    /// scheduler (the caller rings another if mail is waiting: it may have
    /// been rung on this very doorbell).
    pub fn remove(&self, filter: u32) {
        let mut doorbells = lock(&self.doorbells);
        if let Some(at) = doorbells.iter().position(|(id, _)| *id == filter) {
            let (_, scheduler) = doorbells.remove(at);
            // SAFETY: created by scheduler_new for this filter and removed
            // from the list under the lock, so no commit races the delete.
            unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler.0) };
        }
    }
}

/// How a mailbox wakes its worker's thread.
enum Wake {
    /// A worker thread: its doorbells.
    Thread(Arc<Bell>),
    /// The main thread: its configuration's scheduler.
    Main(Weak<Shared>),
}

/// One worker's incoming mail.
pub struct Mailbox {
    mail: Mutex<VecDeque<Mail>>,
    pending: AtomicBool,
    tick_posted: AtomicBool,
    wake: Wake,
}

impl Mailbox {
    /// The mailbox of a worker on this (worker) thread.
    pub fn on_thread() -> Mailbox {
        Mailbox::with(Wake::Thread(thread_bell()))
    }

    /// The mailbox of the main thread's worker of `shared`.
    pub fn on_main(shared: &Arc<Shared>) -> Mailbox {
        Mailbox::with(Wake::Main(Arc::downgrade(shared)))
    }

    fn with(wake: Wake) -> Mailbox {
        Mailbox {
            mail: Mutex::new(VecDeque::new()),
            pending: AtomicBool::new(false),
            tick_posted: AtomicBool::new(false),
            wake,
        }
    }

    pub fn is_main(&self) -> bool {
        matches!(self.wake, Wake::Main(_))
    }

    pub fn post(&self, mail: Mail) {
        lock(&self.mail).push_back(mail);
        self.pending.store(true, Ordering::Release);
        self.ring();
    }

    /// A tick, unless one is already waiting.
    pub fn post_tick(&self) {
        if !self.tick_posted.swap(true, Ordering::AcqRel) {
            self.post(Mail::Tick);
        }
    }

    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Wake the worker's thread (see [`Bell::ring`]; on the main thread: a
    /// configuration event).
    pub fn ring(&self) {
        match &self.wake {
            Wake::Thread(bell) => bell.ring(),
            Wake::Main(shared) => {
                if let Some(shared) = shared.upgrade() {
                    shared.commit(EVENT_MAIL);
                }
            }
        }
    }

    pub fn take(&self) -> VecDeque<Mail> {
        if !self.pending.swap(false, Ordering::AcqRel) {
            return VecDeque::new();
        }
        self.tick_posted.store(false, Ordering::Release);
        std::mem::take(&mut *lock(&self.mail))
    }
}

// ---------------------------------------------------------------- queues

fn queues() -> &'static Mutex<HashMap<u32, Weak<Mailbox>>> {
    static QUEUES: OnceLock<Mutex<HashMap<u32, Weak<Mailbox>>>> = OnceLock::new();
    QUEUES.get_or_init(|| Mutex::new(HashMap::new()))
}

static NEXT_QUEUE: AtomicU32 = AtomicU32::new(1);
/// Configurations that went away so far (threads sweep their workers).
static GONE: AtomicU64 = AtomicU64::new(0);

pub fn configurations_gone() -> u64 {
    GONE.load(Ordering::Acquire)
}
static NEXT_CALL: AtomicU32 = AtomicU32::new(1);

// ---------------------------------------------------------------- shared

/// A token call on its way to the main thread.
struct Outgoing {
    call: u32,
    mailbox: Weak<Mailbox>,
    cluster: String,
    timeout_ms: u64,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

/// Config scheduler events.
pub const EVENT_OUTBOX: u64 = 1;
pub const EVENT_TICK: u64 = 2;
/// Mail for the main thread's worker.
pub const EVENT_MAIL: u64 = 3;
/// Envoy serves: start the timer and the main thread's worker.
pub const EVENT_START: u64 = 4;

/// Metric ids Envoy gave at configuration time: per metric, one per subset
/// of its labels (a label with an empty value is left out, as the wasm
/// build leaves it out of the stat name).
#[derive(Default)]
pub struct MetricIds {
    ids: HashMap<(&'static str, u8), usize>,
}

impl MetricIds {
    /// Define every metric the worker could use, for `config` (the pointer
    /// Envoy passed to `config_new`; defining later is refused).
    pub fn define_all(config: *mut c_void) -> Result<MetricIds, String> {
        let mut ids = HashMap::new();
        for metric in ALL {
            // Every label, and without `client` (empty for targets without
            // gateway keys). A metric without labels exists from now on; one
            // with labels appears on first use, as the wasm build's do.
            let all = (1u8 << metric.labels.len()) - 1;
            let masks = match metric.labels.iter().position(|l| *l == "client") {
                Some(client) => vec![all, all & !(1 << client)],
                None => vec![all],
            };
            for mask in masks {
                let names: Vec<ModuleBuffer> = metric
                    .labels
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, l)| ModuleBuffer::of(l.as_bytes()))
                    .collect();
                let mut id = 0usize;
                let name = ModuleBuffer::of(metric.name.as_bytes());
                // SAFETY: every buffer points into 'static strings or `names`,
                // alive for the call; `id` is a valid out pointer.
                let result = unsafe {
                    match metric.kind {
                        Kind::Counter => {
                            abi::envoy_dynamic_module_callback_http_filter_config_define_counter(
                                config,
                                name,
                                names.as_ptr(),
                                names.len(),
                                &mut id,
                            )
                        }
                        Kind::Gauge => {
                            abi::envoy_dynamic_module_callback_http_filter_config_define_gauge(
                                config,
                                name,
                                names.as_ptr(),
                                names.len(),
                                &mut id,
                            )
                        }
                        Kind::Histogram => {
                            abi::envoy_dynamic_module_callback_http_filter_config_define_histogram(
                                config,
                                name,
                                names.as_ptr(),
                                names.len(),
                                &mut id,
                            )
                        }
                    }
                };
                if result != abi::METRICS_SUCCESS {
                    return Err(format!(
                        "cannot define metric {} (Envoy result {result})",
                        metric.name
                    ));
                }
                ids.insert((metric.name, mask), id);
            }
        }
        Ok(MetricIds { ids })
    }
}

/// Envoy's configuration pointer, until the configuration goes: read-locked
/// around every use from any thread, so it cannot go in the middle of one.
pub type EnvoyConfig = RwLock<Option<Ptr>>;

fn read_config(config: &EnvoyConfig) -> std::sync::RwLockReadGuard<'_, Option<Ptr>> {
    config
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------- secrets

/// SDS generic secrets, as this host gives them to the core: subscribed in
/// `config_new` (main thread; Envoy refuses later subscriptions), read at
/// each token exchange with `config_get_generic_secret`. The read happens
/// on the thread of the worker that builds the request, always an Envoy
/// thread (a hook or a scheduled event), which the thread-local value Envoy
/// keeps requires; Envoy updates that value on every thread when SDS
/// delivers a new one, so the next exchange uses it.
pub struct Secrets {
    config: Arc<EnvoyConfig>,
}

impl Secrets {
    pub fn new(config: Arc<EnvoyConfig>) -> Secrets {
        Secrets { config }
    }
}

impl SecretHost for Secrets {
    fn subscribe(&self, secret: &SdsRef) -> Result<SdsSecret, String> {
        let source = secret.sds_config.as_deref().unwrap_or("");
        let id = match *read_config(&self.config) {
            // SAFETY: the live configuration (read-locked), in config_new on
            // the main thread; both buffers live for the call.
            Some(ptr) => unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_generic_secret_subscribe(
                    ptr.0,
                    ModuleBuffer::of(secret.name.as_bytes()),
                    ModuleBuffer::of(source.as_bytes()),
                )
            },
            None => 0,
        };
        if id == 0 {
            // Envoy logs the reason itself (the ABI does not return it).
            return Err("Envoy's error line just before this one says why".to_owned());
        }
        log(
            Level::Debug,
            &format!(
                "subscribed to the SDS generic secret {:?} ({}; id {id})",
                secret.name,
                if secret.sds_config.is_some() {
                    "SDS"
                } else {
                    "static"
                }
            ),
        );
        let config = Arc::clone(&self.config);
        Ok(SdsSecret::new(
            &secret.name,
            Arc::new(move || read_secret(&config, id)),
        ))
    }
}

/// The current bytes of secret `id`, copied out; `None` for an id Envoy does
/// not know, or once the configuration is gone.
fn read_secret(config: &EnvoyConfig, id: usize) -> Option<Vec<u8>> {
    let guard = read_config(config);
    let ptr = (*guard)?;
    let mut out = EnvoyBuffer::EMPTY;
    // SAFETY: the live configuration (read-locked); `out` is a valid out
    // pointer; called on an Envoy thread (see `Secrets`).
    let found = unsafe {
        abi::envoy_dynamic_module_callback_http_filter_config_get_generic_secret(
            ptr.0, id, &mut out,
        )
    };
    // SAFETY: Envoy's bytes, valid on this thread until its next update of
    // the secret, which cannot run while this call is on the thread.
    let bytes = unsafe { out.to_vec() };
    // Found but empty stays empty: the core tells "empty" from "not there".
    found.then_some(bytes)
}

/// Everything of one filter configuration that all threads share.
pub struct Shared {
    pub config: Config,
    /// `AZURE_FEDERATED_TOKEN_FILE`, as Envoy's environment had it when the
    /// configuration loaded: workload-identity assertions are read from it.
    pub token_file: Option<PathBuf>,
    /// Envoy's configuration, until it goes (shared with [`Secrets`]).
    envoy_config: Arc<EnvoyConfig>,
    scheduler: Mutex<Option<Ptr>>,
    outbox: Mutex<VecDeque<Outgoing>>,
    /// Envoy callout id → where its answer goes (main thread only).
    callouts: Mutex<HashMap<u64, (Weak<Mailbox>, u32)>>,
    mailboxes: Mutex<Vec<Weak<Mailbox>>>,
    metrics: MetricIds,
    /// Counter increments not yet handed to Envoy, one per stat.
    tallies: Mutex<Vec<Arc<Tally>>>,
    timer: std::sync::Once,
    alive: AtomicBool,
}

impl Shared {
    /// On the main thread, in `config_new`.
    pub fn new(
        config: Config,
        token_file: Option<PathBuf>,
        envoy_config: Arc<EnvoyConfig>,
        metrics: MetricIds,
    ) -> Shared {
        Shared {
            config,
            token_file,
            envoy_config,
            scheduler: Mutex::new(None),
            outbox: Mutex::new(VecDeque::new()),
            callouts: Mutex::new(HashMap::new()),
            mailboxes: Mutex::new(Vec::new()),
            metrics,
            tallies: Mutex::new(Vec::new()),
            timer: std::sync::Once::new(),
            alive: AtomicBool::new(true),
        }
    }

    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Call `f` with Envoy's configuration, if it is still there.
    fn with_config<T>(&self, f: impl FnOnce(*mut c_void) -> T) -> Option<T> {
        let config = read_config(&self.envoy_config);
        config.map(|ptr| f(ptr.0))
    }

    /// In `config_new` (main thread): the configuration's scheduler, and a
    /// first event on it. Envoy runs that event only once it serves
    /// (`envoy --mode validate` never does), and the event [`Shared::start`]s.
    pub fn arm(&self) {
        // SAFETY: the live configuration (read-locked); the scheduler is
        // deleted in `stop`.
        let scheduler = self
            .with_config(|config| unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(config)
            })
            .unwrap_or(null_mut());
        if scheduler.is_null() {
            log(
                Level::Critical,
                "cannot create a configuration scheduler: no token calls",
            );
            return;
        }
        *lock(&self.scheduler) = Some(Ptr(scheduler));
        self.commit(EVENT_START);
    }

    /// Start serving: the tick timer, once (never under `envoy --mode validate`).
    pub fn start(self: &Arc<Shared>) {
        self.timer.call_once(|| {
            let weak = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("aoai-msi-tick".into())
                .spawn(move || loop {
                    std::thread::sleep(aoai_msi_filter::worker::TICK);
                    let Some(shared) = weak.upgrade() else { break };
                    if !shared.alive() {
                        break;
                    }
                    shared.commit(EVENT_TICK);
                });
            if let Err(e) = spawned {
                log(
                    Level::Critical,
                    &format!("cannot start the tick thread: {e}"),
                );
            }
        });
    }

    /// The configuration is going (main thread): no more events, and no
    /// more use of it from any thread.
    pub fn stop(&self) {
        self.flush_tallies();
        self.alive.store(false, Ordering::Release);
        *self
            .envoy_config
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        GONE.fetch_add(1, Ordering::AcqRel);
        if let Some(scheduler) = lock(&self.scheduler).take() {
            // SAFETY: created by config_scheduler_new; taken out under the
            // lock, so no commit races the delete.
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler.0)
            };
        }
    }

    /// The one tally of a counter stat (its id and label values), made on
    /// first use by whichever thread defines it first.
    fn tally(&self, id: usize, values: &[String]) -> Arc<Tally> {
        let mut tallies = lock(&self.tallies);
        if let Some(found) = tallies.iter().find(|t| t.id == id && *t.values == *values) {
            return Arc::clone(found);
        }
        let tally = Arc::new(Tally {
            id,
            values: values.into(),
            pending: AtomicU64::new(0),
        });
        tallies.push(Arc::clone(&tally));
        tally
    }

    /// Main thread, every tick and when the configuration goes: hand Envoy
    /// the counts added up since the last time, one labelled increment per
    /// stat that moved.
    pub fn flush_tallies(&self) {
        let tallies: Vec<Arc<Tally>> = lock(&self.tallies).clone();
        for tally in tallies {
            let count = tally.pending.swap(0, Ordering::Relaxed);
            if count == 0 {
                continue;
            }
            let values: Vec<ModuleBuffer> = tally
                .values
                .iter()
                .map(|v| ModuleBuffer::of(v.as_bytes()))
                .collect();
            // SAFETY: the configuration that defined the counter, live
            // while read-locked; the label buffers outlive the call.
            let _ = self.with_config(|config| unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_increment_counter(
                    config,
                    tally.id,
                    values.as_ptr(),
                    values.len(),
                    count,
                )
            });
        }
    }

    pub fn commit(&self, event: u64) -> bool {
        match *lock(&self.scheduler) {
            Some(scheduler) => {
                // SAFETY: not deleted while the lock is held; commit is thread-safe.
                unsafe {
                    abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
                        scheduler.0,
                        event,
                    )
                };
                true
            }
            None => false,
        }
    }

    pub fn add_mailbox(&self, mailbox: &Arc<Mailbox>) {
        let mut mailboxes = lock(&self.mailboxes);
        mailboxes.retain(|m| m.strong_count() > 0);
        mailboxes.push(Arc::downgrade(mailbox));
    }

    /// Main thread, every tick: tell every worker thread to tick.
    pub fn broadcast_tick(&self) {
        let mailboxes: Vec<Arc<Mailbox>> = lock(&self.mailboxes)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for mailbox in mailboxes {
            if !mailbox.is_main() {
                mailbox.post_tick();
            }
        }
    }

    /// Main thread: send the token calls the workers handed over.
    pub fn send_outbox(&self) {
        let outgoing: Vec<Outgoing> = lock(&self.outbox).drain(..).collect();
        for call in outgoing {
            let headers: Vec<ModuleHeader> = call
                .headers
                .iter()
                .map(|(name, value)| ModuleHeader::of(name.as_bytes(), value.as_bytes()))
                .collect();
            let mut callout = 0u64;
            // SAFETY: every buffer points into `call` or `headers`, alive for
            // the call; the configuration is live (read-locked); `callout` is
            // a valid out pointer.
            let result = self
                .with_config(|config| unsafe {
                    abi::envoy_dynamic_module_callback_http_filter_config_http_callout(
                        config,
                        &mut callout,
                        ModuleBuffer::of(call.cluster.as_bytes()),
                        headers.as_ptr(),
                        headers.len(),
                        ModuleBuffer::of(&call.body),
                        call.timeout_ms,
                    )
                })
                .unwrap_or(status::REFUSED);
            if result == abi::CALLOUT_INIT_SUCCESS {
                lock(&self.callouts).insert(callout, (call.mailbox, call.call));
            } else if let Some(mailbox) = call.mailbox.upgrade() {
                mailbox.post(Mail::Undispatched {
                    call: call.call,
                    cluster: call.cluster,
                    status: result,
                });
            }
        }
    }

    /// Main thread: a token call answered (or failed).
    pub fn answered(&self, callout: u64, status: Option<u16>, body: Vec<u8>) {
        let Some((mailbox, call)) = lock(&self.callouts).remove(&callout) else {
            return;
        };
        if let Some(mailbox) = mailbox.upgrade() {
            mailbox.post(Mail::Answer { call, status, body });
        }
    }
}

// ---------------------------------------------------------------- filters

thread_local! {
    /// This thread's live requests: id → Envoy's filter pointer.
    static FILTERS: RefCell<HashMap<u32, Ptr>> = RefCell::new(HashMap::new());
}

static NEXT_FILTER: AtomicU32 = AtomicU32::new(1);

pub fn add_filter(envoy: *mut c_void) -> u32 {
    let id = NEXT_FILTER.fetch_add(1, Ordering::Relaxed);
    FILTERS.with(|f| {
        if let Ok(mut filters) = f.try_borrow_mut() {
            filters.insert(id, Ptr(envoy));
        }
    });
    id
}

pub fn remove_filter(id: u32) {
    FILTERS.with(|f| {
        if let Ok(mut filters) = f.try_borrow_mut() {
            filters.remove(&id);
        }
    });
}

fn find_filter(id: u32) -> Option<Ptr> {
    FILTERS.with(|f| {
        f.try_borrow()
            .ok()
            .and_then(|filters| filters.get(&id).copied())
    })
}

// ---------------------------------------------------------------- host

/// One metric as the worker defined it: Envoy's id and the label values;
/// a counter's increments go to its [`Tally`].
struct Defined {
    id: usize,
    kind: Kind,
    values: Vec<String>,
    tally: Option<Arc<Tally>>,
}

/// A counter stat's increments from every thread, added up until the main
/// thread's next tick hands them to Envoy. A labelled increment makes Envoy
/// find the stat by its label values, which costs a few thousand
/// instructions, and the worker reports its per-request counts each time it
/// goes idle: with a tally a request pays one atomic add, and a counter lags
/// by at most one tick, as the wasm build's counters do.
struct Tally {
    id: usize,
    values: Box<[String]>,
    pending: AtomicU64,
}

/// The host of one worker: one Envoy worker thread, one configuration.
pub struct NativeHost {
    pub shared: Arc<Shared>,
    pub mailbox: Arc<Mailbox>,
    /// The request in hand (null: none).
    current: Cell<*mut c_void>,
    /// The request whose callback is running (null: none).
    home: Cell<*mut c_void>,
    /// The id of the request last entered (until `leave`).
    entered: Cell<Option<u32>>,
    metrics: RefCell<Vec<Defined>>,
    /// Requests the worker let go, continued once it is done deciding.
    resumes: RefCell<Vec<u32>>,
}

/// While a callback runs: its filter is the request in hand; the previous
/// one comes back when it returns (callbacks nest: resuming a request can
/// run another's).
pub struct InHook<'a> {
    host: &'a NativeHost,
    saved: (*mut c_void, *mut c_void, Option<u32>),
}

impl Drop for InHook<'_> {
    fn drop(&mut self) {
        self.host.current.set(self.saved.0);
        self.host.home.set(self.saved.1);
        self.host.entered.set(self.saved.2);
    }
}

impl NativeHost {
    pub fn new(shared: Arc<Shared>, mailbox: Arc<Mailbox>) -> NativeHost {
        NativeHost {
            shared,
            mailbox,
            current: Cell::new(null_mut()),
            home: Cell::new(null_mut()),
            entered: Cell::new(None),
            metrics: RefCell::new(Vec::new()),
            resumes: RefCell::new(Vec::new()),
        }
    }

    /// Continue the requests the worker let go. Envoy runs a continued
    /// request's next callbacks inside `continue_decoding`, so it is called
    /// only once the worker has finished the step that released them (with
    /// proxy-wasm, a resumed request's callbacks also come after the VM call).
    pub fn run_resumes(&self) {
        loop {
            let resumes = match self.resumes.try_borrow_mut() {
                Ok(mut resumes) => std::mem::take(&mut *resumes),
                Err(_) => return,
            };
            if resumes.is_empty() {
                return;
            }
            for request in resumes {
                // Gone meanwhile (the client hung up): nothing to continue.
                if let Some(filter) = find_filter(request) {
                    // SAFETY: a live request of this thread, held by this filter.
                    unsafe {
                        abi::envoy_dynamic_module_callback_http_filter_continue_decoding(filter.0)
                    };
                }
            }
        }
    }

    pub fn hook(&self, filter: *mut c_void) -> InHook<'_> {
        let saved = (
            self.current.replace(filter),
            self.home.replace(filter),
            self.entered.take(),
        );
        InHook { host: self, saved }
    }

    fn filter(&self) -> Result<*mut c_void, Status> {
        let current = self.current.get();
        if current.is_null() {
            Err(Status(status::NOT_FOUND))
        } else {
            Ok(current)
        }
    }

    fn set_header(&self, kind: u32, name: &str, value: Option<&[u8]>) -> Result<(), Status> {
        let filter = self.filter()?;
        let value = value.map_or(ModuleBuffer::NULL, ModuleBuffer::of);
        // SAFETY: `filter` is the live request in hand on this thread; the
        // buffers are alive for the call.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                filter,
                kind,
                ModuleBuffer::of(name.as_bytes()),
                value,
            )
        };
        if ok {
            Ok(())
        } else {
            Err(Status(status::REFUSED))
        }
    }

    fn header(&self, kind: u32, name: &str) -> Option<Vec<u8>> {
        let filter = self.filter().ok()?;
        let mut value = EnvoyBuffer::EMPTY;
        // SAFETY: live filter on this thread; `value` is a valid out pointer
        // and the optional count pointer may be null.
        let found = unsafe {
            abi::envoy_dynamic_module_callback_http_get_header(
                filter,
                kind,
                ModuleBuffer::of(name.as_bytes()),
                &mut value,
                0,
                null_mut(),
            )
        };
        if !found || value.ptr.is_null() {
            return None;
        }
        // SAFETY: Envoy's buffer, valid until the end of this hook.
        Some(unsafe { value.to_vec() })
    }

    fn body_chunks(filter: *mut c_void, kind: u32) -> Vec<EnvoyBuffer> {
        // SAFETY: live filter on this thread.
        let count =
            unsafe { abi::envoy_dynamic_module_callback_http_get_body_chunks_size(filter, kind) };
        if count == 0 {
            return Vec::new();
        }
        let mut chunks = vec![EnvoyBuffer::EMPTY; count];
        // SAFETY: `chunks` has room for `count` buffers, as Envoy asked.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_get_body_chunks(
                filter,
                kind,
                chunks.as_mut_ptr(),
            )
        };
        if ok {
            chunks
        } else {
            Vec::new()
        }
    }

    /// The response body so far: what Envoy buffered, then the chunk in
    /// hand (unless the chunk in hand is the buffer itself).
    fn response_chunks(&self) -> Vec<EnvoyBuffer> {
        let Ok(filter) = self.filter() else {
            return Vec::new();
        };
        let buffered = Self::body_chunks(filter, abi::body_type::BUFFERED_RESPONSE);
        let received = Self::body_chunks(filter, abi::body_type::RECEIVED_RESPONSE);
        let same =
            matches!((buffered.first(), received.first()), (Some(a), Some(b)) if a.ptr == b.ptr);
        if same {
            buffered
        } else {
            buffered.into_iter().chain(received).collect()
        }
    }

    /// Answer the assertion call `call` with the token file, through the
    /// mailbox like any answer (taken in after the worker has recorded the
    /// call): what the token-file listener would have served.
    fn answer_from_file(&self, call: u32, file: &Path) {
        let answer = match federated::read_token(file) {
            Ok(body) => Mail::Answer {
                call,
                status: Some(200),
                body,
            },
            Err(e) => {
                let path = safe::free_text(&file.display().to_string(), 200);
                log(
                    Level::Warn,
                    &format!(
                        "cannot read the service-account token file {path} ({}): {e}",
                        federated::TOKEN_FILE_VARIABLE
                    ),
                );
                Mail::Failed {
                    call,
                    failure: FetchFailure::AssertionFileUnreadable {
                        variable: federated::TOKEN_FILE_VARIABLE.to_owned(),
                        path,
                        error: e.to_string(),
                    },
                }
            }
        };
        self.mailbox.post(answer);
    }

    /// Bytes of the response body held so far.
    pub fn response_body_size(&self) -> usize {
        self.response_chunks().iter().map(|c| c.length).sum()
    }

    /// Every request header of the request in hand, as Envoy's own buffers
    /// (see [`header_pairs`]): one call for the map, no copy of any value.
    pub fn request_headers(&self) -> Vec<EnvoyHeader> {
        let Ok(filter) = self.filter() else {
            return Vec::new();
        };
        // SAFETY: live filter on this thread.
        let count = unsafe {
            abi::envoy_dynamic_module_callback_http_get_headers_size(
                filter,
                abi::header_type::REQUEST,
            )
        };
        let empty = EnvoyHeader {
            key_ptr: std::ptr::null(),
            key_length: 0,
            value_ptr: std::ptr::null(),
            value_length: 0,
        };
        let mut headers = vec![empty; count];
        // SAFETY: `headers` has room for `count` entries, as Envoy asked.
        let ok = count > 0
            && unsafe {
                abi::envoy_dynamic_module_callback_http_get_headers(
                    filter,
                    abi::header_type::REQUEST,
                    headers.as_mut_ptr(),
                )
            };
        if ok {
            headers
        } else {
            Vec::new()
        }
    }

    fn metric_call(&self, id: u32, delta: i64, set: bool) -> Result<(), Status> {
        let metrics = self
            .metrics
            .try_borrow()
            .map_err(|_| Status(status::REFUSED))?;
        let defined = metrics.get(id as usize).ok_or(Status(status::NOT_FOUND))?;
        if let (Some(tally), false) = (&defined.tally, set) {
            tally
                .pending
                .fetch_add(delta.unsigned_abs(), Ordering::Relaxed);
            return Ok(());
        }
        let values: Vec<ModuleBuffer> = defined
            .values
            .iter()
            .map(|v| ModuleBuffer::of(v.as_bytes()))
            .collect();
        let (ptr, len) = (values.as_ptr(), values.len());
        let magnitude = delta.unsigned_abs();
        // SAFETY: the configuration that defined the metric, live while
        // read-locked; the label buffers are alive for the call and as many
        // as were defined.
        let result = self.shared.with_config(|config| unsafe {
            match (defined.kind, set) {
                (Kind::Counter, _) => {
                    abi::envoy_dynamic_module_callback_http_filter_config_increment_counter(
                        config, defined.id, ptr, len, magnitude,
                    )
                }
                (Kind::Gauge, true) => {
                    abi::envoy_dynamic_module_callback_http_filter_config_set_gauge(
                        config, defined.id, ptr, len, magnitude,
                    )
                }
                (Kind::Gauge, false) if delta < 0 => {
                    abi::envoy_dynamic_module_callback_http_filter_config_decrement_gauge(
                        config, defined.id, ptr, len, magnitude,
                    )
                }
                (Kind::Gauge, false) => {
                    abi::envoy_dynamic_module_callback_http_filter_config_increment_gauge(
                        config, defined.id, ptr, len, magnitude,
                    )
                }
                (Kind::Histogram, _) => {
                    abi::envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
                        config, defined.id, ptr, len, magnitude,
                    )
                }
            }
        });
        match result {
            Some(abi::METRICS_SUCCESS) => Ok(()),
            Some(other) => Err(Status(other)),
            None => Err(Status(status::NOT_FOUND)),
        }
    }
}

/// The metric and label values of a stat name the core wrote
/// (`name;label=value;…`, labels in the metric's order).
fn parse_stat_name(name: &str) -> Option<(&'static Metric, u8, Vec<String>)> {
    let mut parts = name.split(';');
    let base = parts.next()?;
    let metric = ALL.iter().find(|m| m.name == base)?;
    let mut mask = 0u8;
    let mut values = Vec::new();
    for part in parts {
        let (label, value) = part.split_once('=')?;
        let index = metric.labels.iter().position(|l| *l == label)?;
        mask |= 1 << index;
        values.push(value.to_owned());
    }
    Some((metric, mask, values))
}

impl Host for NativeHost {
    type Store = ProcessStore;

    fn store(&self) -> ProcessStore {
        ProcessStore
    }

    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn random_seed(&self) -> u64 {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(now_ms());
        hasher.finish()
    }

    fn logs(&self, level: Level) -> bool {
        // SAFETY: a plain query, callable from any thread.
        unsafe { abi::envoy_dynamic_module_callback_log_enabled(level_number(level)) }
    }

    fn log(&self, level: Level, line: &str) {
        log(level, line);
    }

    fn register_queue(&self, _name: &str) -> Result<u32, Status> {
        let id = NEXT_QUEUE.fetch_add(1, Ordering::Relaxed);
        lock(queues()).insert(id, Arc::downgrade(&self.mailbox));
        Ok(id)
    }

    fn enqueue(&self, queue: u32, message: &[u8]) -> Result<(), Status> {
        let mailbox = lock(queues()).get(&queue).and_then(Weak::upgrade);
        match mailbox {
            Some(mailbox) => {
                mailbox.post(Mail::Queue(message.to_vec()));
                Ok(())
            }
            None => Err(Status(status::NOT_FOUND)),
        }
    }

    /// The module's own timer thread ticks every worker (see [`Shared::start`]).
    fn set_tick(&self, _period: Duration) -> Result<(), Status> {
        Ok(())
    }

    /// Handed to the main thread, which owns the configuration's callouts:
    /// a request going away cannot cancel it.
    fn dispatch(&self, request: &TokenRequest) -> Result<u32, Status> {
        let call = NEXT_CALL.fetch_add(1, Ordering::Relaxed);
        if let Some(file) = &self.shared.token_file {
            if federated::is_assertion_call(&self.shared.config, request) {
                self.answer_from_file(call, file);
                return Ok(call);
            }
        }
        lock(&self.shared.outbox).push_back(Outgoing {
            call,
            mailbox: Arc::downgrade(&self.mailbox),
            cluster: request.cluster.clone(),
            timeout_ms: request.timeout_ms,
            headers: request.headers.clone(),
            body: request.body.clone(),
        });
        if self.shared.commit(EVENT_OUTBOX) {
            Ok(call)
        } else {
            Err(Status(status::REFUSED))
        }
    }

    /// Only the main thread's worker: a worker thread runs only inside
    /// Envoy's callbacks for requests, and with none held there the answer
    /// to its call waits for the thread's next request (a client waiting on
    /// a request parked on another thread may never send one).
    fn wakes_when_idle(&self) -> bool {
        self.mailbox.is_main()
    }

    fn define_metric(&self, _kind: Kind, name: &str) -> Result<u32, Status> {
        let (metric, mask, values) = parse_stat_name(name).ok_or(Status(status::BAD_ARGUMENT))?;
        let id = *self
            .shared
            .metrics
            .ids
            .get(&(metric.name, mask))
            .ok_or(Status(status::NOT_FOUND))?;
        let mut metrics = self
            .metrics
            .try_borrow_mut()
            .map_err(|_| Status(status::REFUSED))?;
        let tally = matches!(metric.kind, Kind::Counter).then(|| self.shared.tally(id, &values));
        metrics.push(Defined {
            id,
            kind: metric.kind,
            values,
            tally,
        });
        u32::try_from(metrics.len() - 1).map_err(|_| Status(status::REFUSED))
    }

    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), Status> {
        self.metric_call(id, delta, false)
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        self.metric_call(id, i64::try_from(value).unwrap_or(i64::MAX), true)
    }

    fn enter(&self, request: u32) -> Result<(), Status> {
        let filter = find_filter(request).ok_or(Status(status::NOT_FOUND))?;
        self.current.set(filter.0);
        self.entered.set(Some(request));
        Ok(())
    }

    fn leave(&self) {
        self.current.set(self.home.get());
        self.entered.set(None);
    }

    fn routed_cluster(&self) -> Option<Vec<u8>> {
        let filter = self.filter().ok()?;
        let mut name = EnvoyBuffer::EMPTY;
        // SAFETY: live filter on this thread; `name` is a valid out pointer.
        let found =
            unsafe { abi::envoy_dynamic_module_callback_http_get_cluster_name(filter, &mut name) };
        if !found || name.ptr.is_null() {
            return None;
        }
        // SAFETY: Envoy's buffer, valid until the end of this hook.
        Some(unsafe { name.to_vec() })
    }

    fn set_request_header(&self, name: &str, value: &str) -> Result<(), Status> {
        self.set_header(abi::header_type::REQUEST, name, Some(value.as_bytes()))
    }

    fn remove_request_header(&self, name: &str) -> Result<(), Status> {
        self.set_header(abi::header_type::REQUEST, name, None)
    }

    /// Continued by [`NativeHost::run_resumes`], after the worker's step.
    fn resume_request(&self) -> Result<(), Status> {
        let request = self.entered.get().ok_or(Status(status::NOT_FOUND))?;
        self.resumes
            .try_borrow_mut()
            .map_err(|_| Status(status::REFUSED))?
            .push(request);
        Ok(())
    }

    fn send_local_reply(
        &self,
        status: u16,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<(), Status> {
        let filter = self.filter()?;
        let headers: Vec<ModuleHeader> = headers
            .iter()
            .map(|(n, v)| ModuleHeader::of(n.as_bytes(), v.as_bytes()))
            .collect();
        let details = b"aoai_msi_filter";
        // SAFETY: live filter on this thread; buffers alive for the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                filter,
                u32::from(status),
                headers.as_ptr(),
                headers.len(),
                ModuleBuffer::of(body.as_bytes()),
                ModuleBuffer::of(details),
            )
        };
        Ok(())
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.header(abi::header_type::RESPONSE, name)
    }

    fn set_response_header(&self, name: &str, value: Option<&str>) -> Result<(), Status> {
        self.set_header(abi::header_type::RESPONSE, name, value.map(str::as_bytes))
    }

    fn response_body(&self, size: usize) -> Vec<u8> {
        let mut body = Vec::with_capacity(size);
        for chunk in self.response_chunks() {
            if body.len() >= size {
                break;
            }
            // SAFETY: Envoy's buffer, valid until the end of this hook.
            let bytes = unsafe { chunk.to_vec() };
            let room = size - body.len();
            body.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
        body
    }

    /// The whole body is held (the worker only replaces a body it buffered
    /// to the end): drop it all and put `body` in its place.
    fn replace_response_body(&self, _size: usize, body: &[u8]) -> Result<(), Status> {
        let filter = self.filter()?;
        // SAFETY: live filter on this thread; draining more than there is
        // drains everything; the new body's buffer is alive for the call.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_drain_body(
                filter,
                abi::body_type::BUFFERED_RESPONSE,
                usize::MAX,
            );
            abi::envoy_dynamic_module_callback_http_drain_body(
                filter,
                abi::body_type::RECEIVED_RESPONSE,
                usize::MAX,
            );
            abi::envoy_dynamic_module_callback_http_append_body(
                filter,
                abi::body_type::RECEIVED_RESPONSE,
                ModuleBuffer::of(body),
            )
        };
        if ok {
            Ok(())
        } else {
            Err(Status(status::REFUSED))
        }
    }
}

/// Name and value of each header, borrowed from Envoy.
///
/// # Safety
/// The headers must come from [`NativeHost::request_headers`] in the hook
/// that is still running: Envoy keeps their bytes until the hook returns,
/// and the pairs must not outlive it.
pub unsafe fn header_pairs(headers: &[EnvoyHeader]) -> Vec<(&[u8], &[u8])> {
    headers
        .iter()
        .map(|h| {
            let name = EnvoyBuffer {
                ptr: h.key_ptr,
                length: h.key_length,
            };
            let value = EnvoyBuffer {
                ptr: h.value_ptr,
                length: h.value_length,
            };
            // SAFETY: Envoy's buffers, readable until this hook returns (the caller's promise).
            unsafe { (name.as_slice(), value.as_slice()) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_name_gives_back_its_metric_and_labels() {
        let name =
            aoai_msi_filter::metrics::TOKEN_FETCHES.stat_name(&["chat", "imds", "status_500"]);
        let (metric, mask, values) = parse_stat_name(&name).expect("parsed");
        assert_eq!(metric.name, "aoai_msi_token_fetches_total");
        assert_eq!(mask, 0b111);
        assert_eq!(values, ["chat", "imds", "status_500"]);
        let name = aoai_msi_filter::metrics::REQUESTS_AUTHORIZED.stat_name(&["chat", ""]);
        let (_, mask, values) = parse_stat_name(&name).expect("parsed");
        assert_eq!((mask, values), (0b01, vec!["chat".to_owned()]));
    }

    #[test]
    fn the_store_keeps_proxy_wasm_cas_semantics() {
        let mut store = ProcessStore;
        let key = "test/cas";
        assert_eq!(store.get(key), Ok((None, None)));
        store
            .set(key, b"a", Some(7))
            .expect("a key never set takes any write");
        let (_, cas) = store.get(key).expect("read");
        assert_eq!(
            store.set(key, b"b", cas.map(|c| c + 1)),
            Err(StoreError::CasMismatch)
        );
        store.set(key, b"b", cas).expect("matching cas");
        assert_eq!(store.get(key).expect("read").0.as_deref(), Some(&b"b"[..]));
    }
}
