//! The shared-data record every worker reads and writes, and the
//! compare-and-swap loop that keeps it consistent.
//!
//! One record per token identity (see [`TokenSpec::fingerprint`]) holds the
//! current token, the lease of the worker fetching the next one (single
//! flight), the last failure with its retry time (shared backoff), and a
//! rejected token's replacement request. A second key lists the notification
//! queue of every live VM with its last heartbeat, so the queues of VMs that
//! went away (configuration reloads) stop being written to.
//!
//! [`TokenSpec::fingerprint`]: crate::config::TokenSpec::fingerprint

use serde::{Deserialize, Serialize};

use crate::clock::stepped_back;
use crate::token::{FetchFailure, Token};

/// Bumped whenever the record's encoding changes incompatibly.
pub const RECORD_VERSION: u8 = 2;
/// How many times a CAS update is retried before giving up for this round.
const CAS_ATTEMPTS: usize = 32;
/// The queue list keeps at most this many entries, the most recently seen.
pub const MAX_QUEUES: usize = 256;
/// Every VM renews its queue's entry this often.
pub const HEARTBEAT_MS: u64 = 5_000;
/// An entry not renewed for this long belongs to a VM that went away.
pub const QUEUE_STALE_MS: u64 = 4 * HEARTBEAT_MS;

/// The host's key-value store with CAS, as proxy-wasm offers it. A key that
/// was never set has no CAS value, and a write without one is unconditional.
pub trait SharedStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError>;
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Someone else wrote between our read and our write.
    CasMismatch,
    /// Contention did not settle within the retry budget.
    Contended,
    Host(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::CasMismatch => f.write_str("shared data changed concurrently"),
            StoreError::Contended => f.write_str("shared data stayed contended"),
            StoreError::Host(e) => write!(f, "shared data unavailable: {e}"),
        }
    }
}

/// The worker that is fetching a token, since when, and until when it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub holder: u32,
    pub since_ms: u64,
    pub until_ms: u64,
}

/// The last failed fetch and when the next attempt may start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub cause: FetchFailure,
    /// Consecutive failures.
    pub attempts: u32,
    pub retry_at_ms: u64,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub token: Option<Token>,
    /// Bumped with every new token, so a VM can tell whether its copy is current.
    pub generation: u64,
    pub lease: Option<Lease>,
    pub failure: Option<Failure>,
    /// The generation the upstream rejected, while its replacement is wanted.
    #[serde(default)]
    pub replace: Option<u64>,
    /// When a replacement was last asked for.
    #[serde(default)]
    pub invalidated_at_ms: Option<u64>,
    /// When the endpoint answered a replacement request with the same token.
    #[serde(default)]
    pub same_token_at_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u8,
    #[serde(flatten)]
    body: T,
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&Envelope {
            v: RECORD_VERSION,
            body: self,
        })
        .unwrap_or_default()
    }

    /// A record of another version, or garbage, reads as no record: the next
    /// write replaces it and the worst case is one extra token fetch.
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let envelope: Envelope<Record> = serde_json::from_slice(bytes).ok()?;
        (envelope.v == RECORD_VERSION).then_some(envelope.body)
    }

    /// A lease taken before a backward clock step has lapsed.
    pub fn lease_active(&self, now_ms: u64) -> bool {
        self.lease
            .is_some_and(|l| now_ms < l.until_ms && !stepped_back(l.since_ms, now_ms))
    }

    /// Does the current token's replacement wait to be fetched?
    pub fn wants_replacement(&self) -> bool {
        self.token.is_some() && self.replace == Some(self.generation)
    }
}

/// What an update decided: write this record (or leave the store alone), and
/// hand back a result.
// A short-lived return value, moved once per CAS attempt: boxing the record
// would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Decision<T> {
    Write(Record, T),
    Keep(T),
}

/// Read-modify-write `key` under CAS until it sticks. `decide` sees the
/// current record (or none) and may be called several times.
pub fn update<T>(
    store: &mut dyn SharedStore,
    key: &str,
    mut decide: impl FnMut(Option<Record>) -> Decision<T>,
) -> Result<T, StoreError> {
    cas_loop(store, key, |bytes| {
        match decide(bytes.and_then(Record::decode)) {
            Decision::Keep(result) => (None, result),
            Decision::Write(record, result) => (Some(record.encode()), result),
        }
    })
}

/// The one CAS retry loop: `step` sees the value under `key` (if any) and
/// says what to write (nothing, to leave it) and what to return; a write
/// that loses the race is tried again from a fresh read, at most
/// [`CAS_ATTEMPTS`] times.
fn cas_loop<T>(
    store: &mut dyn SharedStore,
    key: &str,
    mut step: impl FnMut(Option<&[u8]>) -> (Option<Vec<u8>>, T),
) -> Result<T, StoreError> {
    for _ in 0..CAS_ATTEMPTS {
        let (bytes, cas) = store.get(key)?;
        let (write, result) = step(bytes.as_deref());
        let Some(value) = write else {
            return Ok(result);
        };
        match store.set(key, &value, cas) {
            Ok(()) => return Ok(result),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Contended)
}

/// Read without writing.
pub fn read(store: &dyn SharedStore, key: &str) -> Result<Option<Record>, StoreError> {
    let (bytes, _) = store.get(key)?;
    Ok(bytes.as_deref().and_then(Record::decode))
}

/// Make sure `key` exists, so that later CAS writes are conditional. Called at
/// configure time, before workers race for a lease (a never-set key accepts
/// any write).
pub fn ensure_record(store: &mut dyn SharedStore, key: &str) -> Result<(), StoreError> {
    if store.get(key)?.0.is_none() {
        store.set(key, &Record::default().encode(), None)?;
    }
    Ok(())
}

/// Add or renew a VM's notification queue in the list under `key`, dropping
/// entries whose VM stopped renewing them. Returns how many live entries the
/// list holds.
pub fn register_queue(
    store: &mut dyn SharedStore,
    key: &str,
    queue: u32,
    now_ms: u64,
) -> Result<usize, StoreError> {
    cas_loop(store, key, |bytes| {
        let mut entries = bytes.map(decode_queues).unwrap_or_default();
        entries.retain(|e| e.queue != queue && is_live(e, now_ms));
        entries.push(QueueEntry {
            queue,
            seen_ms: now_ms,
        });
        if entries.len() > MAX_QUEUES {
            entries.sort_by_key(|e| e.seen_ms);
            entries.drain(..entries.len() - MAX_QUEUES);
        }
        (Some(encode_queues(&entries)), entries.len())
    })
}

/// Remove a VM's queue from the list (the VM is going away).
pub fn unregister_queue(
    store: &mut dyn SharedStore,
    key: &str,
    queue: u32,
) -> Result<(), StoreError> {
    cas_loop(store, key, |bytes| {
        let mut entries = bytes.map(decode_queues).unwrap_or_default();
        let before = entries.len();
        entries.retain(|e| e.queue != queue);
        let changed = entries.len() != before;
        (changed.then(|| encode_queues(&entries)), ())
    })
}

/// The queues of live VMs: those renewed within [`QUEUE_STALE_MS`].
pub fn queues(store: &dyn SharedStore, key: &str, now_ms: u64) -> Result<Vec<u32>, StoreError> {
    Ok(store
        .get(key)?
        .0
        .as_deref()
        .map(decode_queues)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| is_live(e, now_ms))
        .map(|e| e.queue)
        .collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QueueEntry {
    queue: u32,
    seen_ms: u64,
}

/// Renewed recently; an entry from "the future" was renewed before a
/// backward clock step, and its VM will renew it again within a heartbeat.
fn is_live(entry: &QueueEntry, now_ms: u64) -> bool {
    now_ms.saturating_sub(entry.seen_ms) <= QUEUE_STALE_MS
        && entry.seen_ms <= now_ms.saturating_add(QUEUE_STALE_MS)
}

/// A process-wide counter: every VM takes a distinct number from it.
pub fn next_sequence(store: &mut dyn SharedStore, key: &str) -> Result<u32, StoreError> {
    cas_loop(store, key, |bytes| {
        let current = bytes
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_le_bytes);
        let next = current.wrapping_add(1);
        (Some(next.to_le_bytes().to_vec()), next)
    })
}

fn encode_queues(entries: &[QueueEntry]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|e| {
            let mut bytes = [0u8; 12];
            bytes[..4].copy_from_slice(&e.queue.to_le_bytes());
            bytes[4..].copy_from_slice(&e.seen_ms.to_le_bytes());
            bytes
        })
        .collect()
}

fn decode_queues(bytes: &[u8]) -> Vec<QueueEntry> {
    bytes
        .chunks_exact(12)
        .filter_map(|c| {
            Some(QueueEntry {
                queue: u32::from_le_bytes(c.get(..4)?.try_into().ok()?),
                seen_ms: u64::from_le_bytes(c.get(4..)?.try_into().ok()?),
            })
        })
        .collect()
}

/// An in-memory store with the host's CAS semantics: the fake host of the
/// unit and in-wasm tests.
pub mod memory {
    use std::collections::HashMap;

    use super::{SharedStore, StoreError};

    #[derive(Default)]
    pub struct MemoryStore {
        entries: HashMap<String, (Vec<u8>, u32)>,
        next_cas: u32,
        /// Writes that will fail with a CAS mismatch before succeeding, to
        /// exercise contention.
        pub injected_conflicts: usize,
        pub writes: usize,
    }

    impl SharedStore for MemoryStore {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            Ok(match self.entries.get(key) {
                Some((value, cas)) => (Some(value.clone()), Some(*cas)),
                None => (None, None),
            })
        }

        fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            if self.injected_conflicts > 0 {
                self.injected_conflicts -= 1;
                return Err(StoreError::CasMismatch);
            }
            if let (Some(expected), Some((_, current))) = (cas, self.entries.get(key)) {
                if expected != *current {
                    return Err(StoreError::CasMismatch);
                }
            }
            self.next_cas += 1;
            self.entries
                .insert(key.to_owned(), (value.to_vec(), self.next_cas));
            self.writes += 1;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemoryStore;
    use super::*;
    use crate::token::Secret;

    #[test]
    fn record_round_trips_and_other_versions_read_as_empty() {
        let record = Record {
            token: Some(Token {
                secret: Secret::new("abc".into()),
                obtained_at_ms: 1,
                expires_at_ms: 2,
                refresh_after_ms: Some(3),
            }),
            generation: 7,
            lease: Some(Lease {
                holder: 3,
                since_ms: 1,
                until_ms: 9,
            }),
            failure: Some(Failure {
                cause: FetchFailure::NoResponse,
                attempts: 2,
                retry_at_ms: 5,
                at_ms: 4,
            }),
            replace: Some(7),
            invalidated_at_ms: Some(3),
            same_token_at_ms: Some(4),
        };
        assert_eq!(Record::decode(&record.encode()), Some(record.clone()));
        let future = String::from_utf8(record.encode())
            .unwrap()
            .replace("\"v\":2", "\"v\":3");
        assert_eq!(Record::decode(future.as_bytes()), None);
        assert_eq!(Record::decode(b"\x00garbage"), None);
    }

    #[test]
    fn update_retries_until_its_write_sticks() {
        let mut store = MemoryStore::default();
        ensure_record(&mut store, "k").unwrap();
        store.injected_conflicts = 3;
        let mut calls = 0;
        let out = update(&mut store, "k", |r| {
            calls += 1;
            let mut r = r.unwrap();
            r.generation += 1;
            Decision::Write(r, "done")
        })
        .unwrap();
        assert_eq!(out, "done");
        assert_eq!(calls, 4);
        assert_eq!(read(&store, "k").unwrap().unwrap().generation, 1);
    }

    #[test]
    fn endless_contention_is_reported_not_looped_forever() {
        let mut store = MemoryStore::default();
        store.injected_conflicts = usize::MAX;
        let out = update(&mut store, "k", |_| Decision::Write(Record::default(), ()));
        assert_eq!(out, Err(StoreError::Contended));
    }

    #[test]
    fn a_stale_cas_value_is_refused() {
        let mut store = MemoryStore::default();
        ensure_record(&mut store, "k").unwrap();
        let (_, cas) = store.get("k").unwrap();
        store.set("k", b"x", cas).unwrap();
        assert_eq!(store.set("k", b"y", cas), Err(StoreError::CasMismatch));
    }

    #[test]
    fn ensure_record_leaves_an_existing_record_alone() {
        let mut store = MemoryStore::default();
        let r = Record {
            generation: 4,
            ..Record::default()
        };
        store.set("k", &r.encode(), None).unwrap();
        ensure_record(&mut store, "k").unwrap();
        assert_eq!(read(&store, "k").unwrap().unwrap().generation, 4);
    }

    #[test]
    fn queue_list_keeps_each_queue_once_and_at_most_the_newest_entries() {
        let mut store = MemoryStore::default();
        for q in [5, 6, 5] {
            register_queue(&mut store, "q", q, 1_000).unwrap();
        }
        assert_eq!(queues(&store, "q", 1_000).unwrap(), vec![6, 5]);
        for q in 0..(MAX_QUEUES as u32 + 10) {
            register_queue(&mut store, "q", 1000 + q, 1_000 + u64::from(q)).unwrap();
        }
        let list = queues(&store, "q", 2_000).unwrap();
        assert_eq!(list.len(), MAX_QUEUES);
        assert_eq!(list.last(), Some(&(1000 + MAX_QUEUES as u32 + 9)));
    }

    #[test]
    fn queues_of_vms_that_stopped_renewing_are_not_notified_and_are_dropped() {
        let mut store = MemoryStore::default();
        let t0 = 1_000_000;
        register_queue(&mut store, "q", 1, t0).unwrap();
        register_queue(&mut store, "q", 2, t0).unwrap();
        // VM 2 keeps renewing; VM 1 went away with an old configuration.
        let mut t = t0;
        while t < t0 + QUEUE_STALE_MS + HEARTBEAT_MS {
            t += HEARTBEAT_MS;
            register_queue(&mut store, "q", 2, t).unwrap();
        }
        assert_eq!(queues(&store, "q", t).unwrap(), vec![2]);
        let (bytes, _) = store.get("q").unwrap();
        assert_eq!(
            bytes.unwrap().len(),
            12,
            "the stale entry is gone, not only skipped"
        );
    }

    #[test]
    fn an_unregistered_queue_is_gone_at_once() {
        let mut store = MemoryStore::default();
        register_queue(&mut store, "q", 1, 10).unwrap();
        register_queue(&mut store, "q", 2, 10).unwrap();
        unregister_queue(&mut store, "q", 1).unwrap();
        assert_eq!(queues(&store, "q", 10).unwrap(), vec![2]);
        unregister_queue(&mut store, "q", 9).unwrap();
    }

    #[test]
    fn a_lease_taken_before_a_backward_clock_step_has_lapsed() {
        let record = Record {
            lease: Some(Lease {
                holder: 1,
                since_ms: 10_000_000,
                until_ms: 10_012_000,
            }),
            ..Record::default()
        };
        assert!(record.lease_active(10_005_000));
        assert!(!record.lease_active(10_012_000));
        assert!(
            !record.lease_active(10_000_000 - 3_600_000),
            "stepped back an hour"
        );
    }

    #[test]
    fn sequence_numbers_are_distinct() {
        let mut store = MemoryStore::default();
        let a = next_sequence(&mut store, "s").unwrap();
        let b = next_sequence(&mut store, "s").unwrap();
        assert_ne!(a, b);
    }
}
