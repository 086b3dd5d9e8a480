//! Requests held until a token exists: the waiting room of one agent.
//!
//! A cold start or an outage can hold thousands of requests on one worker,
//! and every arrival, departure (a client hanging up) and gauge report
//! touches this set. So each of those is O(1) (amortised): requests are
//! found by id in a map, counted per target as they come and go, and kept
//! in arrival order in a queue from which departures are removed lazily.
//! Arrival order is also time order (the times are monotonic), so requests
//! that waited too long are always at the front.

use std::collections::{HashMap, VecDeque};

/// A request held until a token exists, and the target it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub request: u32,
    pub target: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    target: u32,
    /// Monotonic time it arrived.
    since_ms: u64,
    /// Already offered a fallback to its own key.
    offered: bool,
}

#[derive(Debug, Default)]
pub struct Parked {
    entries: HashMap<u32, Entry>,
    /// (request, arrival time) in arrival order; may name requests that left.
    order: VecDeque<(u32, u64)>,
    /// Held requests by target.
    per_target: Vec<usize>,
}

impl Parked {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, request: u32) -> bool {
        self.entries.contains_key(&request)
    }

    /// Requests of `target` held right now.
    pub fn count_for(&self, target: u32) -> usize {
        self.per_target.get(target as usize).copied().unwrap_or(0)
    }

    /// Hold `waiter` from monotonic time `since_ms` (never earlier than the
    /// previous arrival's). A request already held keeps its place.
    pub fn insert(&mut self, waiter: Waiter, since_ms: u64) {
        if self.entries.contains_key(&waiter.request) {
            return;
        }
        self.entries.insert(
            waiter.request,
            Entry {
                target: waiter.target,
                since_ms,
                offered: false,
            },
        );
        self.order.push_back((waiter.request, since_ms));
        let slot = waiter.target as usize;
        if self.per_target.len() <= slot {
            self.per_target.resize(slot + 1, 0);
        }
        if let Some(count) = self.per_target.get_mut(slot) {
            *count += 1;
        }
    }

    /// A held request went away (its client hung up).
    pub fn remove(&mut self, request: u32) {
        if let Some(entry) = self.entries.remove(&request) {
            self.left(entry.target);
            // The queue drops it lazily; keep it from growing unbounded.
            if self.order.len() > 2 * self.entries.len() + 64 {
                let entries = &self.entries;
                self.order
                    .retain(|(id, since)| entries.get(id).is_some_and(|e| e.since_ms == *since));
            }
        }
    }

    /// Every held request, in arrival order; the room is empty afterwards.
    pub fn take_all(&mut self) -> Vec<Waiter> {
        let mut taken = Vec::with_capacity(self.entries.len());
        while let Some((request, since)) = self.order.pop_front() {
            if let Some(entry) = self.take_if_current(request, since) {
                taken.push(Waiter {
                    request,
                    target: entry.target,
                });
            }
        }
        self.entries.clear();
        self.per_target.iter_mut().for_each(|c| *c = 0);
        taken
    }

    /// Requests that arrived at or before `cutoff_ms`, in arrival order.
    pub fn take_arrived_by(&mut self, cutoff_ms: u64) -> Vec<Waiter> {
        let mut taken = Vec::new();
        while let Some(&(request, since)) = self.order.front() {
            if since > cutoff_ms {
                break;
            }
            self.order.pop_front();
            if let Some(entry) = self.take_if_current(request, since) {
                taken.push(Waiter {
                    request,
                    target: entry.target,
                });
            }
        }
        taken
    }

    /// Held requests of `targets` not yet offered a fallback, marked offered.
    pub fn offer(&mut self, targets: &[u32]) -> Vec<Waiter> {
        let mut offered = Vec::new();
        for &(request, since) in &self.order {
            if let Some(entry) = self.entries.get_mut(&request) {
                if entry.since_ms == since && !entry.offered && targets.contains(&entry.target) {
                    entry.offered = true;
                    offered.push(Waiter {
                        request,
                        target: entry.target,
                    });
                }
            }
        }
        offered
    }

    fn take_if_current(&mut self, request: u32, since: u64) -> Option<Entry> {
        match self.entries.get(&request) {
            Some(entry) if entry.since_ms == since => {
                let entry = *entry;
                self.entries.remove(&request);
                self.left(entry.target);
                Some(entry)
            }
            _ => None,
        }
    }

    fn left(&mut self, target: u32) {
        if let Some(count) = self.per_target.get_mut(target as usize) {
            *count = count.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(request: u32, target: u32) -> Waiter {
        Waiter { request, target }
    }

    #[test]
    fn requests_leave_in_arrival_order_and_departures_are_skipped() {
        let mut room = Parked::default();
        for (i, at) in [(1, 10), (2, 20), (3, 30), (4, 40)] {
            room.insert(waiter(i, i % 2), at);
        }
        room.remove(2);
        assert_eq!(room.len(), 3);
        assert_eq!((room.count_for(0), room.count_for(1)), (1, 2));
        let early: Vec<u32> = room.take_arrived_by(30).iter().map(|w| w.request).collect();
        assert_eq!(early, [1, 3]);
        let rest: Vec<u32> = room.take_all().iter().map(|w| w.request).collect();
        assert_eq!(rest, [4]);
        assert!(room.is_empty());
        assert_eq!(room.count_for(1), 0);
    }

    #[test]
    fn a_fallback_is_offered_once_per_request_of_the_named_targets() {
        let mut room = Parked::default();
        room.insert(waiter(1, 0), 1);
        room.insert(waiter(2, 1), 2);
        assert_eq!(room.offer(&[1]), [waiter(2, 1)]);
        assert!(room.offer(&[1]).is_empty());
        assert_eq!(room.len(), 2, "offered requests stay until they leave");
    }

    #[test]
    fn parking_and_dropping_many_requests_costs_linear_work() {
        // 200 000 arrivals and departures: quadratic bookkeeping would need
        // 10^10 steps here; linear needs a few million and ends at once.
        let mut room = Parked::default();
        let n = 200_000u32;
        for i in 0..n {
            room.insert(waiter(i, i % 3), u64::from(i));
            assert_eq!(room.len(), i as usize + 1);
        }
        let counted: usize = (0..3).map(|t| room.count_for(t)).sum();
        assert_eq!(counted, n as usize);
        for i in (0..n).filter(|i| i % 2 == 0) {
            room.remove(i);
        }
        assert_eq!(room.len(), n as usize / 2);
        assert!(
            room.order.len() <= 2 * room.len() + 64,
            "departures are compacted"
        );
        let left = room.take_all();
        assert_eq!(left.len(), n as usize / 2);
        assert!(left.windows(2).all(|w| w[0].request < w[1].request));
    }
}
