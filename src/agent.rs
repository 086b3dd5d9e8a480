//! The token agent: one per Wasm VM (one per Envoy worker), deciding from the
//! time, the shared record and its own state what the glue must do.
//!
//! ```text
//!            request, token usable ──────────────► authorize (VM-local copy)
//!            request, no usable token ──► park ──► kick own root
//! root: sync (kick, notification, tick)
//!     record has a fresh token ─────────────────► adopt it, resume parked
//!     no lease, no backoff, token missing/due ──► take the lease, Fetch
//!     lease held elsewhere / backing off ───────► wait (parked stay parked)
//!     failure that retrying cannot fix ─────────► reject parked with a diagnosis
//! root: fetched(result)
//!     ok ──► write token, drop lease, notify every VM, resume parked
//!     err ─► write failure + retry time, drop lease, notify, settle parked
//! root: tick ──► time out parked requests; sync when a refresh is due
//! ```
//!
//! The lease in shared data makes fetches single-flight across workers; the
//! failure's `retry_at` makes backoff shared too. Requests never read shared
//! data: they use the VM-local copy, which notifications keep current.

use crate::claims::Claims;
use crate::config::Config;
use crate::diagnose::Diagnosis;
use crate::lifecycle::retry_delay_ms;
use crate::rewrite::bearer_header;
use crate::store::{self, Decision, Failure, Lease, Record, SharedStore};
use crate::token::{FailureClass, FetchFailure, Secret, Token};

/// A lease outlives the call it covers (`token_source.timeout_ms`) by this
/// much, then others may take over: the holder's VM may have gone away with
/// the call.
pub const LEASE_GRACE_MS: u64 = 2_000;

/// What happens to a request to a matching host.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<'a> {
    /// Send it with this `authorization` value, from token `generation`.
    Authorize { bearer: &'a str, generation: u64 },
    /// Hold it. When `kick` is set, the glue must wake this VM's root, which
    /// will start or join a token fetch.
    Park { kick: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
}

/// Work for the glue, in order.
#[derive(Debug, PartialEq)]
pub enum Command {
    /// Dispatch the token call (this VM holds the lease).
    Fetch,
    /// Wake every other VM so it adopts the record.
    NotifyOthers,
    /// Rewrite these requests with [`Agent::bearer`] and resume them.
    Resume(Vec<u32>),
    /// Answer these requests locally with the diagnosis.
    Reject(Vec<u32>, Diagnosis),
    /// A line for the log; never contains a secret.
    Log(Level, String),
    /// Something to count.
    Record(Event),
}

/// Lifecycle events the metrics count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A token call ended: `ok` or the failure's label, and how long it took.
    Fetched {
        outcome: String,
        duration_ms: Option<u64>,
    },
    /// A background refresh started while a usable token served requests.
    RefreshStarted,
    /// A token the upstream rejected was dropped.
    Invalidated,
}

enum Invalidation {
    Dropped,
    RateLimited(u64),
    AlreadyReplaced,
}

#[derive(Debug)]
struct Local {
    token: Token,
    /// `Bearer <token>`, formatted once per token.
    bearer: Secret,
    generation: u64,
    /// Read once per token, for diagnoses only.
    claims: Option<Claims>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parked {
    id: u32,
    since_ms: u64,
}

#[derive(Debug)]
pub struct Agent {
    config: Config,
    key: String,
    vm: u32,
    local: Option<Local>,
    failure: Option<Failure>,
    parked: Vec<Parked>,
    kicked: bool,
    fetch_started_ms: Option<u64>,
}

impl Agent {
    /// `vm` must be distinct per VM: it is the lease holder's name.
    pub fn new(config: Config, vm: u32) -> Agent {
        let key = Agent::record_key(&config);
        Agent {
            config,
            key,
            vm,
            local: None,
            failure: None,
            parked: Vec::new(),
            kicked: false,
            fetch_started_ms: None,
        }
    }

    /// Shared-data key of the record for this configuration's token.
    pub fn record_key(config: &Config) -> String {
        format!("aoai-msi-filter/v1/{}/token", config.token_fingerprint())
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The `authorization` value of the VM-local token, if any.
    pub fn bearer(&self) -> Option<&str> {
        self.local.as_ref().map(|l| l.bearer.expose())
    }

    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Unverified claims of the VM-local token, to explain failures.
    pub fn claims(&self) -> Option<&Claims> {
        self.local.as_ref().and_then(|l| l.claims.as_ref())
    }

    /// When the VM-local token expires (ms since the epoch).
    pub fn expires_at_ms(&self) -> Option<u64> {
        self.local.as_ref().map(|l| l.token.expires_at_ms)
    }

    /// Generation of the VM-local token, if any.
    pub fn generation(&self) -> Option<u64> {
        self.local.as_ref().map(|l| l.generation)
    }

    /// How long a lease protects a token call.
    pub fn lease_ms(&self) -> u64 {
        self.config.imds().timeout_ms + LEASE_GRACE_MS
    }

    pub fn is_parked(&self, request: u32) -> bool {
        self.parked.iter().any(|p| p.id == request)
    }

    /// The hot path: no shared data, no allocation when a token is usable.
    pub fn admit(&mut self, now_ms: u64, request: u32) -> Admission<'_> {
        let usable = self.local.as_ref().is_some_and(|l| l.token.usable(now_ms));
        if usable {
            if let Some(local) = &self.local {
                return Admission::Authorize {
                    bearer: local.bearer.expose(),
                    generation: local.generation,
                };
            }
        }
        self.parked.push(Parked {
            id: request,
            since_ms: now_ms,
        });
        let kick = !self.kicked;
        self.kicked = true;
        Admission::Park { kick }
    }

    /// A parked request went away (client disconnect): forget it.
    pub fn forget(&mut self, request: u32) {
        self.parked.retain(|p| p.id != request);
    }

    /// Look at the shared record: adopt a newer token, lead a fetch if one is
    /// needed and nobody else is on it, settle parked requests.
    pub fn sync(&mut self, now_ms: u64, store: &mut dyn SharedStore) -> Vec<Command> {
        self.kicked = false;
        let mut commands = Vec::new();
        let busy = self.fetch_started_ms.is_some();
        let vm = self.vm;
        let lease_ms = self.lease_ms();
        let outcome = store::update(store, &self.key, |record| {
            let mut record = record.unwrap_or_default();
            let usable = record.token.as_ref().is_some_and(|t| t.usable(now_ms));
            let fresh = usable
                && record
                    .token
                    .as_ref()
                    .is_some_and(|t| !t.refresh_due(now_ms));
            let backing_off = record
                .failure
                .as_ref()
                .is_some_and(|f| now_ms < f.next_attempt_ms(!usable));
            if fresh || busy || record.lease_active(now_ms) || backing_off {
                return Decision::Keep((record, false));
            }
            record.lease = Some(Lease {
                holder: vm,
                until_ms: now_ms + lease_ms,
            });
            Decision::Write(record.clone(), (record, true))
        });
        match outcome {
            Ok((record, lead)) => {
                let refreshing = record.token.as_ref().is_some_and(|t| t.usable(now_ms));
                self.adopt(record);
                if lead {
                    self.fetch_started_ms = Some(now_ms);
                    if refreshing {
                        commands.push(Command::Record(Event::RefreshStarted));
                    }
                    commands.push(Command::Fetch);
                }
            }
            Err(e) => commands.push(Command::Log(Level::Warn, format!("token record: {e}"))),
        }
        self.settle(now_ms, &mut commands);
        commands
    }

    /// The periodic check: time out parked requests, and sync when this VM's
    /// copy is missing, due for refresh, or requests are waiting.
    pub fn tick(&mut self, now_ms: u64, store: &mut dyn SharedStore) -> Vec<Command> {
        let lease_ms = self.lease_ms();
        if self
            .fetch_started_ms
            .is_some_and(|started| now_ms >= started + lease_ms)
        {
            // The host never answered the call; the lease has lapsed too.
            self.fetch_started_ms = None;
        }
        let needs_sync = !self.parked.is_empty()
            || self
                .local
                .as_ref()
                .is_none_or(|l| l.token.refresh_due(now_ms));
        let mut commands = if needs_sync && self.fetch_started_ms.is_none() {
            self.sync(now_ms, store)
        } else {
            Vec::new()
        };
        self.expire_parked(now_ms, &mut commands);
        commands
    }

    /// The token call this VM dispatched has ended.
    pub fn fetched(
        &mut self,
        now_ms: u64,
        store: &mut dyn SharedStore,
        result: Result<Token, FetchFailure>,
    ) -> Vec<Command> {
        let duration_ms = self
            .fetch_started_ms
            .take()
            .map(|started| now_ms.saturating_sub(started));
        let vm = self.vm;
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(cause) => cause.label(),
        };
        let mut commands = vec![Command::Record(Event::Fetched {
            outcome,
            duration_ms,
        })];
        let release = |record: &mut Record| {
            if record.lease.is_some_and(|l| l.holder == vm) {
                record.lease = None;
            }
        };
        match result {
            Ok(token) => {
                commands.push(Command::Log(
                    Level::Info,
                    format!(
                        "token acquired: expires in {} s, refresh in {} s, usable for {} s",
                        token.expires_at_ms.saturating_sub(now_ms) / 1000,
                        token.refresh_at_ms().saturating_sub(now_ms) / 1000,
                        token.unusable_at_ms().saturating_sub(now_ms) / 1000,
                    ),
                ));
                let written = store::update(store, &self.key, |record| {
                    let mut record = record.unwrap_or_default();
                    record.token = Some(token.clone());
                    record.generation += 1;
                    record.failure = None;
                    release(&mut record);
                    Decision::Write(record.clone(), record)
                });
                match written {
                    Ok(record) => self.adopt(record),
                    Err(e) => {
                        commands.push(Command::Log(
                            Level::Warn,
                            format!("token kept on this worker only: {e}"),
                        ));
                        self.install(token, u64::MAX);
                    }
                }
            }
            Err(cause) => {
                let seed = u64::from(vm) ^ now_ms;
                let written = store::update(store, &self.key, |record| {
                    let mut record = record.unwrap_or_default();
                    let attempts = record.failure.as_ref().map_or(0, |f| f.attempts) + 1;
                    let delay = retry_delay_ms(cause.class(), attempts, seed);
                    record.failure = Some(Failure {
                        cause: cause.clone(),
                        attempts,
                        retry_at_ms: now_ms + delay,
                        at_ms: now_ms,
                    });
                    release(&mut record);
                    Decision::Write(record.clone(), record)
                });
                match written {
                    Ok(record) => self.adopt(record),
                    Err(e) => {
                        commands.push(Command::Log(Level::Warn, format!("token record: {e}")))
                    }
                }
                let urgent = !self.local.as_ref().is_some_and(|l| l.token.usable(now_ms));
                if let Some(f) = &self.failure {
                    commands.push(Command::Log(
                        Level::Warn,
                        format!(
                            "token fetch failed ({}), attempt {}, next try in {} ms: {}",
                            f.cause.label(),
                            f.attempts,
                            f.next_attempt_ms(urgent).saturating_sub(now_ms),
                            Diagnosis::for_failure(f, &self.config, now_ms).message
                        ),
                    ));
                }
            }
        }
        commands.push(Command::NotifyOthers);
        self.settle(now_ms, &mut commands);
        commands
    }

    /// The upstream rejected token `generation` as a token (401 missing /
    /// invalid / audience / expired). Drop it everywhere so the next request
    /// fetches a new one — at most once per `invalidation_interval_ms`, so a
    /// misconfigured audience cannot become an IMDS storm. The glue then wakes
    /// the root, which leads the fetch.
    pub fn invalidate(
        &mut self,
        now_ms: u64,
        store: &mut dyn SharedStore,
        generation: u64,
    ) -> Vec<Command> {
        let interval = self.config.invalidation_interval_ms;
        let outcome = store::update(store, &self.key, |record| {
            let mut record = record.unwrap_or_default();
            if record.generation != generation || record.token.is_none() {
                return Decision::Keep((record, Invalidation::AlreadyReplaced));
            }
            if let Some(last) = record.invalidated_at_ms {
                if now_ms < last + interval {
                    let again_in = last + interval - now_ms;
                    return Decision::Keep((record, Invalidation::RateLimited(again_in)));
                }
            }
            record.token = None;
            record.generation += 1;
            record.invalidated_at_ms = Some(now_ms);
            Decision::Write(record.clone(), (record, Invalidation::Dropped))
        });
        match outcome {
            Ok((record, what)) => {
                self.adopt(record);
                match what {
                    Invalidation::Dropped => vec![
                        Command::Record(Event::Invalidated),
                        Command::Log(
                            Level::Warn,
                            format!(
                                "the upstream rejected the token (401: missing, invalid, wrong audience or expired):                                  dropped it and fetching a new one; the next drop is allowed in {} s",
                                interval / 1000
                            ),
                        ),
                        Command::NotifyOthers,
                    ],
                    Invalidation::RateLimited(again_in) => vec![Command::Log(
                        Level::Debug,
                        format!("the upstream rejected the token again; kept it, next drop allowed in {again_in} ms"),
                    )],
                    Invalidation::AlreadyReplaced => Vec::new(),
                }
            }
            Err(e) => vec![Command::Log(Level::Warn, format!("token record: {e}"))],
        }
    }

    fn adopt(&mut self, record: Record) {
        self.failure = record.failure;
        let current = self.local.as_ref().map(|l| l.generation);
        if current == Some(record.generation) {
            return;
        }
        match record.token {
            Some(token) => self.install(token, record.generation),
            // The token was dropped (rejected upstream): stop using it.
            None if current.is_some() => self.local = None,
            None => {}
        }
    }

    fn install(&mut self, token: Token, generation: u64) {
        let bearer = Secret::new(bearer_header(token.secret.expose()));
        let claims = Claims::read(token.secret.expose());
        self.local = Some(Local {
            token,
            bearer,
            generation,
            claims,
        });
    }

    /// Resume parked requests when a token is usable; fail them at once when
    /// the last failure is one that waiting will not fix.
    fn settle(&mut self, now_ms: u64, commands: &mut Vec<Command>) {
        if self.parked.is_empty() {
            return;
        }
        if self.local.as_ref().is_some_and(|l| l.token.usable(now_ms)) {
            commands.push(Command::Resume(self.take_parked(|_| true)));
            return;
        }
        if let Some(failure) = &self.failure {
            if failure.cause.class() != FailureClass::Transient {
                let diagnosis = Diagnosis::for_failure(failure, &self.config, now_ms);
                commands.push(Command::Reject(self.take_parked(|_| true), diagnosis));
            }
        }
    }

    fn expire_parked(&mut self, now_ms: u64, commands: &mut Vec<Command>) {
        let limit = self.config.token_wait_timeout_ms;
        let expired = self.take_parked(|p| now_ms.saturating_sub(p.since_ms) >= limit);
        if expired.is_empty() {
            return;
        }
        let diagnosis = match &self.failure {
            Some(f) => Diagnosis::for_failure(f, &self.config, now_ms),
            None => Diagnosis::waited(&self.config),
        };
        commands.push(Command::Reject(expired, diagnosis));
    }

    fn take_parked(&mut self, pick: impl Fn(&Parked) -> bool) -> Vec<u32> {
        let mut taken = Vec::new();
        self.parked.retain(|p| {
            if pick(p) {
                taken.push(p.id);
                false
            } else {
                true
            }
        });
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::code;
    use crate::store::memory::MemoryStore;

    const T0: u64 = 1_763_752_300_000;

    fn token(now_ms: u64, lifetime_s: u64, value: &str) -> Token {
        Token {
            secret: Secret::new(value.into()),
            obtained_at_ms: now_ms,
            expires_at_ms: now_ms + lifetime_s * 1000,
        }
    }

    /// `n` VMs sharing one store, as Envoy's workers do.
    fn vms(n: u32) -> (Vec<Agent>, MemoryStore) {
        let mut store = MemoryStore::default();
        let config = Config::default();
        store::ensure_record(&mut store, &Agent::record_key(&config)).unwrap();
        (
            (0..n).map(|vm| Agent::new(config.clone(), vm)).collect(),
            store,
        )
    }

    /// What `admit` answers for a usable token, whatever its generation.
    fn authorized(bearer: &str) -> AuthorizedAs<'_> {
        AuthorizedAs(bearer)
    }

    struct AuthorizedAs<'a>(&'a str);

    impl PartialEq<AuthorizedAs<'_>> for Admission<'_> {
        fn eq(&self, other: &AuthorizedAs<'_>) -> bool {
            matches!(self, Admission::Authorize { bearer, .. } if *bearer == other.0)
        }
    }

    impl std::fmt::Debug for AuthorizedAs<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Authorize({})", self.0)
        }
    }

    fn fetches(commands: &[Command]) -> usize {
        commands.iter().filter(|c| **c == Command::Fetch).count()
    }

    fn resumed(commands: &[Command]) -> Vec<u32> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Resume(ids) => Some(ids.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn rejected(commands: &[Command]) -> Option<(Vec<u32>, Diagnosis)> {
        commands.iter().find_map(|c| match c {
            Command::Reject(ids, d) => Some((ids.clone(), d.clone())),
            _ => None,
        })
    }

    #[test]
    fn cold_burst_on_four_workers_makes_exactly_one_fetch_and_resumes_everyone() {
        let (mut agents, mut store) = vms(4);
        let mut total_fetches = 0;
        let mut kicks = 0;
        for (i, agent) in agents.iter_mut().enumerate() {
            for r in 0..25 {
                match agent.admit(T0, (i * 100 + r) as u32) {
                    Admission::Park { kick } => kicks += usize::from(kick),
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(kicks, 4, "one kick per VM, not per request");
        for agent in agents.iter_mut() {
            total_fetches += fetches(&agent.sync(T0 + 1, &mut store));
        }
        assert_eq!(total_fetches, 1);
        let leader = 0;
        let commands =
            agents[leader].fetched(T0 + 300, &mut store, Ok(token(T0 + 300, 86_400, "tok")));
        assert!(commands.contains(&Command::NotifyOthers));
        let mut woken = resumed(&commands).len();
        for agent in agents.iter_mut().skip(1) {
            let commands = agent.sync(T0 + 301, &mut store);
            assert_eq!(fetches(&commands), 0);
            woken += resumed(&commands).len();
            assert_eq!(agent.bearer(), Some("Bearer tok"));
        }
        assert_eq!(woken, 100);
    }

    #[test]
    fn usable_token_is_served_from_the_local_copy_without_touching_shared_data() {
        let (mut agents, mut store) = vms(1);
        agents[0].admit(T0, 1);
        agents[0].sync(T0, &mut store);
        agents[0].fetched(T0, &mut store, Ok(token(T0, 3600, "tok")));
        let writes = store.writes;
        for i in 0..1000 {
            assert_eq!(
                agents[0].admit(T0 + i, 10 + i as u32),
                authorized("Bearer tok")
            );
        }
        assert_eq!(store.writes, writes);
    }

    #[test]
    fn token_within_the_skew_margin_is_never_used() {
        let (mut agents, mut store) = vms(1);
        agents[0].sync(T0, &mut store);
        agents[0].fetched(T0, &mut store, Ok(token(T0, 8, "short")));
        // 8 s token: margin 2 s, so usable until T0 + 6 s exactly.
        assert_eq!(agents[0].admit(T0 + 5_999, 1), authorized("Bearer short"));
        assert!(matches!(
            agents[0].admit(T0 + 6_000, 2),
            Admission::Park { .. }
        ));
    }

    #[test]
    fn refresh_starts_at_half_life_on_one_worker_while_others_keep_serving() {
        let (mut agents, mut store) = vms(3);
        agents[0].sync(T0, &mut store);
        agents[0].fetched(T0, &mut store, Ok(token(T0, 60, "old")));
        for agent in agents.iter_mut().skip(1) {
            agent.sync(T0 + 1, &mut store);
        }
        let half = T0 + 30_000;
        assert_eq!(
            agents
                .iter_mut()
                .map(|a| fetches(&a.tick(half - 1, &mut store)))
                .sum::<usize>(),
            0
        );
        let started: usize = agents
            .iter_mut()
            .map(|a| fetches(&a.tick(half, &mut store)))
            .sum();
        assert_eq!(started, 1, "single flight across workers");
        for (i, agent) in agents.iter_mut().enumerate() {
            assert_eq!(agent.admit(half + 10, i as u32), authorized("Bearer old"));
        }
        let leader = agents
            .iter()
            .position(|a| a.fetch_started_ms.is_some())
            .unwrap();
        agents[leader].fetched(half + 200, &mut store, Ok(token(half + 200, 60, "new")));
        for agent in agents.iter_mut() {
            agent.sync(half + 201, &mut store);
            assert_eq!(agent.bearer(), Some("Bearer new"));
        }
    }

    #[test]
    fn a_refresh_failure_never_reaches_requests_while_the_old_token_is_usable() {
        let (mut agents, mut store) = vms(1);
        agents[0].sync(T0, &mut store);
        agents[0].fetched(T0, &mut store, Ok(token(T0, 60, "old")));
        let half = T0 + 30_000;
        assert_eq!(fetches(&agents[0].tick(half, &mut store)), 1);
        let failed = agents[0].fetched(half + 10, &mut store, Err(FetchFailure::NoResponse));
        assert!(rejected(&failed).is_none());
        assert_eq!(agents[0].admit(half + 20, 1), authorized("Bearer old"));
        // Backoff is respected, then the refresh is tried again.
        assert_eq!(fetches(&agents[0].tick(half + 11, &mut store)), 0);
        assert_eq!(fetches(&agents[0].tick(half + 10 + 501, &mut store)), 1);
    }

    #[test]
    fn once_the_token_is_unusable_a_long_backoff_is_cut_to_the_urgent_cap() {
        let (mut agents, mut store) = vms(1);
        let a = &mut agents[0];
        a.sync(T0, &mut store);
        a.fetched(T0, &mut store, Ok(token(T0, 8, "short")));
        // The refresh has failed nine times; the next try is scheduled 30 s out.
        let failed_at = T0 + 5_000;
        store::update(&mut store, a.key(), |r| {
            let mut r = r.unwrap();
            r.failure = Some(Failure {
                cause: FetchFailure::NoResponse,
                attempts: 9,
                retry_at_ms: failed_at + 30_000,
                at_ms: failed_at,
            });
            Decision::Write(r, ())
        })
        .unwrap();
        // While the token is usable, the schedule stands.
        assert_eq!(fetches(&a.sync(T0 + 5_900, &mut store)), 0);
        // Past its margin (6 s), requests wait: the retry comes within the urgent cap.
        assert!(matches!(a.admit(T0 + 6_500, 1), Admission::Park { .. }));
        let urgent = failed_at + crate::lifecycle::URGENT_CAP_MS;
        assert_eq!(fetches(&a.sync(urgent - 1, &mut store)), 0);
        assert_eq!(fetches(&a.sync(urgent, &mut store)), 1);
    }

    #[test]
    fn identity_not_found_rejects_parked_requests_on_every_worker_at_once() {
        let (mut agents, mut store) = vms(2);
        agents[0].admit(T0, 1);
        agents[1].admit(T0, 2);
        assert_eq!(fetches(&agents[0].sync(T0, &mut store)), 1);
        assert_eq!(fetches(&agents[1].sync(T0, &mut store)), 0);
        let failure = FetchFailure::Status {
            status: 400,
            error: Some("invalid_request".into()),
            description: Some("Identity not found".into()),
        };
        let commands = agents[0].fetched(T0 + 5, &mut store, Err(failure));
        let (ids, d) = rejected(&commands).unwrap();
        assert_eq!(
            (ids, d.status, d.code),
            (vec![1], 401, code::MANAGED_IDENTITY_NOT_FOUND)
        );
        let (ids, d) = rejected(&agents[1].sync(T0 + 6, &mut store)).unwrap();
        assert_eq!((ids, d.code), (vec![2], code::MANAGED_IDENTITY_NOT_FOUND));
        // A request arriving later fails at once too, without a new fetch.
        agents[1].admit(T0 + 10, 3);
        let commands = agents[1].sync(T0 + 10, &mut store);
        assert_eq!(fetches(&commands), 0);
        assert_eq!(rejected(&commands).unwrap().0, vec![3]);
    }

    #[test]
    fn parked_request_gets_a_diagnosis_exactly_at_the_wait_bound() {
        let (mut agents, mut store) = vms(1);
        agents[0].admit(T0, 7);
        agents[0].sync(T0, &mut store);
        assert!(rejected(&agents[0].tick(T0 + 4_999, &mut store)).is_none());
        let (ids, d) = rejected(&agents[0].tick(T0 + 5_000, &mut store)).unwrap();
        assert_eq!(
            (ids, d.status, d.code),
            (vec![7], 503, code::TOKEN_WAIT_TIMEOUT)
        );
    }

    #[test]
    fn parked_request_that_timed_out_after_a_transient_failure_is_told_the_cause() {
        let (mut agents, mut store) = vms(1);
        agents[0].admit(T0, 7);
        agents[0].sync(T0, &mut store);
        let f = FetchFailure::Status {
            status: 503,
            error: None,
            description: None,
        };
        assert!(rejected(&agents[0].fetched(T0 + 10, &mut store, Err(f))).is_none());
        let (_, d) = rejected(&agents[0].tick(T0 + 5_000, &mut store)).unwrap();
        assert_eq!((d.status, d.code), (503, code::TOKEN_ENDPOINT_UNAVAILABLE));
        assert!(d.retry_after_s.is_some());
    }

    #[test]
    fn a_lease_whose_holder_vanished_is_taken_over_after_it_lapses() {
        let (mut agents, mut store) = vms(2);
        assert_eq!(fetches(&agents[0].sync(T0, &mut store)), 1);
        // VM 0 disappears with its call. VM 1 waits for the lease to lapse.
        let lease = agents[1].lease_ms();
        assert_eq!(lease, 12_000);
        assert_eq!(fetches(&agents[1].sync(T0 + lease - 1, &mut store)), 0);
        assert_eq!(fetches(&agents[1].sync(T0 + lease, &mut store)), 1);
    }

    #[test]
    fn a_disconnected_parked_request_is_forgotten() {
        let (mut agents, mut store) = vms(1);
        agents[0].admit(T0, 1);
        agents[0].admit(T0, 2);
        agents[0].forget(1);
        agents[0].sync(T0, &mut store);
        let commands = agents[0].fetched(T0 + 5, &mut store, Ok(token(T0 + 5, 3600, "t")));
        assert_eq!(resumed(&commands), vec![2]);
    }

    #[test]
    fn only_the_first_parked_request_kicks_until_the_root_has_synced() {
        let (mut agents, mut store) = vms(1);
        assert_eq!(agents[0].admit(T0, 1), Admission::Park { kick: true });
        assert_eq!(agents[0].admit(T0, 2), Admission::Park { kick: false });
        agents[0].sync(T0, &mut store);
        assert_eq!(agents[0].admit(T0, 3), Admission::Park { kick: true });
    }

    fn generation(admission: Admission<'_>) -> u64 {
        match admission {
            Admission::Authorize { generation, .. } => generation,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_rejected_token_is_dropped_on_every_worker_and_fetched_anew() {
        let (mut agents, mut store) = vms(2);
        agents[0].sync(T0, &mut store);
        agents[0].fetched(T0, &mut store, Ok(token(T0, 3600, "bad")));
        agents[1].sync(T0, &mut store);
        let rejected = generation(agents[1].admit(T0 + 10, 1));
        let commands = agents[1].invalidate(T0 + 20, &mut store, rejected);
        assert!(commands.contains(&Command::NotifyOthers));
        assert!(matches!(
            agents[1].admit(T0 + 21, 2),
            Admission::Park { .. }
        ));
        // The other worker learns of it by notification; exactly one fetches.
        let mut started = fetches(&agents[0].sync(T0 + 22, &mut store));
        assert!(matches!(
            agents[0].admit(T0 + 23, 3),
            Admission::Park { .. }
        ));
        started += fetches(&agents[1].sync(T0 + 24, &mut store));
        assert_eq!(started, 1);
    }

    #[test]
    fn rejections_drop_the_token_at_most_once_per_interval() {
        let (mut agents, mut store) = vms(1);
        let a = &mut agents[0];
        a.sync(T0, &mut store);
        a.fetched(T0, &mut store, Ok(token(T0, 3600, "t1")));
        let first = generation(a.admit(T0, 1));
        a.invalidate(T0 + 1, &mut store, first);
        a.sync(T0 + 2, &mut store);
        a.fetched(T0 + 3, &mut store, Ok(token(T0 + 3, 3600, "t2")));
        let second = generation(a.admit(T0 + 4, 2));
        // Still rejected (say, a wrong audience): kept until the interval has passed.
        a.invalidate(T0 + 5, &mut store, second);
        assert_eq!(a.admit(T0 + 6, 3), authorized("Bearer t2"));
        a.invalidate(T0 + 1 + 60_000, &mut store, second);
        assert!(matches!(
            a.admit(T0 + 1 + 60_000, 4),
            Admission::Park { .. }
        ));
    }

    #[test]
    fn a_rejection_of_an_already_replaced_token_changes_nothing() {
        let (mut agents, mut store) = vms(1);
        let a = &mut agents[0];
        a.sync(T0, &mut store);
        a.fetched(T0, &mut store, Ok(token(T0, 60, "old")));
        let old = generation(a.admit(T0, 1));
        a.tick(T0 + 30_000, &mut store);
        a.fetched(T0 + 30_001, &mut store, Ok(token(T0 + 30_001, 60, "new")));
        assert!(a.invalidate(T0 + 30_002, &mut store, old).is_empty());
        assert_eq!(a.admit(T0 + 30_003, 2), authorized("Bearer new"));
    }

    #[test]
    fn log_lines_never_contain_the_token() {
        let (mut agents, mut store) = vms(1);
        agents[0].sync(T0, &mut store);
        let commands = agents[0].fetched(T0, &mut store, Ok(token(T0, 3600, "SECRET-TOKEN-VALUE")));
        for c in &commands {
            if let Command::Log(_, line) = c {
                assert!(!line.contains("SECRET-TOKEN-VALUE"), "{line}");
            }
        }
        assert!(!format!("{:?}", agents[0]).contains("SECRET-TOKEN-VALUE"));
    }
}
