//! One dial per destination at a time, for the proxies' upstream connection pools.
//!
//! A burst of connections to a destination with no pooled connection yet would otherwise
//! each dial their own (a cold waypoint's 150 requests opened 76 mTLS connections to one
//! node). With the gate, the first caller dials and the rest wait their turn; by then the
//! connection it opened is in the pool. If that dial failed instead, the callers that waited
//! behind it fail with its error rather than each dialing the unreachable node again in turn,
//! one connect timeout after another.
//!
//! A key's entry lives only while someone holds or waits for its turn: the failure it records
//! is for those waiters alone, so a pool whose destinations come and go (pods' addresses and
//! identities) does not keep one entry per destination it ever dialed.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
};

use tokio::{sync::OwnedMutexGuard, time::Instant};

/// Per-key turns to dial.
pub struct DialGate<K: Hash + Eq + Clone> {
    gates: Arc<Mutex<HashMap<K, Gate>>>,
}

/// The last dial's failure, if it failed: when, and why.
type Gate = Arc<tokio::sync::Mutex<Option<(Instant, String)>>>;

impl<K: Hash + Eq + Clone> Default for DialGate<K> {
    fn default() -> Self {
        Self { gates: Arc::default() }
    }
}

impl<K: Hash + Eq + Clone> DialGate<K> {
    /// Waits until no one else is dialing `key`. The caller then looks in its pool again (the
    /// dial it waited behind may have filled it), and otherwise either fails with
    /// [`Turn::failed_while_waiting`] or dials and reports the outcome with [`Turn::record`].
    pub async fn turn(&self, key: &K) -> Turn<K> {
        let waiting_since = Instant::now();
        let gate = self.gates.lock().expect("poisoned").entry(key.clone()).or_default().clone();
        let last = gate.clone().lock_owned().await;
        Turn { key: key.clone(), gates: self.gates.clone(), gate, last: Some(last), waiting_since }
    }

    /// Keys someone is dialing or waiting to dial (for tests and admin views).
    pub fn keys_in_use(&self) -> usize {
        self.gates.lock().expect("poisoned").len()
    }
}

/// The right to dial one key; others wait until it is dropped.
pub struct Turn<K: Hash + Eq + Clone> {
    key: K,
    gates: Arc<Mutex<HashMap<K, Gate>>>,
    gate: Gate,
    last: Option<OwnedMutexGuard<Option<(Instant, String)>>>,
    waiting_since: Instant,
}

impl<K: Hash + Eq + Clone> Turn<K> {
    /// The error of a dial that ended while this caller waited for its turn: it should fail
    /// with it rather than dial again at once.
    pub fn failed_while_waiting(&self) -> Option<&str> {
        match self.last.as_deref()? {
            Some((at, error)) if *at >= self.waiting_since => Some(error),
            _ => None,
        }
    }

    /// The outcome of this turn's dial: a failure is handed to those waiting behind it.
    pub fn record<E: std::fmt::Display>(&mut self, failed: Option<&E>) {
        if let Some(last) = self.last.as_deref_mut() {
            *last = failed.map(|e| (Instant::now(), e.to_string()));
        }
    }
}

impl<K: Hash + Eq + Clone> Drop for Turn<K> {
    fn drop(&mut self) {
        let mut gates = self.gates.lock().expect("poisoned");
        // Held by the map, by this turn (twice: `gate` and inside its guard), and by nobody
        // waiting: no one needs what it recorded, so the entry goes. Under the map's lock, so
        // no one can pick it up meanwhile.
        if Arc::strong_count(&self.gate) == 3
            && gates.get(&self.key).is_some_and(|g| Arc::ptr_eq(g, &self.gate))
        {
            gates.remove(&self.key);
        }
        // The guard goes after the entry, still under the map's lock.
        self.last.take();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn callers_waiting_behind_a_failed_dial_fail_with_it_and_later_ones_dial_again() {
        let gate = Arc::new(DialGate::<&str>::default());
        let first = gate.turn(&"node-1").await;
        assert!(first.failed_while_waiting().is_none());
        // Two more callers queue behind the first's dial.
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    let turn = gate.turn(&"node-1").await;
                    turn.failed_while_waiting().map(str::to_owned)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut first = first;
        first.record(Some(&"connecting to 10.0.0.2:15008: timed out"));
        drop(first);
        for w in waiters {
            assert_eq!(w.await.unwrap().as_deref(), Some("connecting to 10.0.0.2:15008: timed out"));
        }
        // Nobody waits any more: the entry is gone, and a later caller dials afresh.
        assert_eq!(gate.keys_in_use(), 0);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let later = gate.turn(&"node-1").await;
        assert!(later.failed_while_waiting().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_recorded_before_a_caller_began_waiting_is_not_its_own() {
        let gate = Arc::new(DialGate::<&str>::default());
        let mut first = gate.turn(&"node-1").await;
        // A second caller holds on to the gate, so the entry (and its record) outlive the turn.
        let holder = gate.clone();
        let second = tokio::spawn(async move {
            let turn = holder.turn(&"node-1").await;
            assert!(turn.failed_while_waiting().is_some(), "it waited behind the failure");
            // Still holding its turn when the third caller comes.
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.record(Some(&"refused"));
        drop(first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The third arrives after the failure: it waits for the second's turn, then dials.
        let third = gate.turn(&"node-1").await;
        assert!(third.failed_while_waiting().is_none());
        second.await.unwrap();
        drop(third);
        assert_eq!(gate.keys_in_use(), 0);
    }

    #[tokio::test]
    async fn a_successful_dial_clears_the_record() {
        let gate = DialGate::<u8>::default();
        let mut turn = gate.turn(&1).await;
        turn.record(None::<&String>);
        assert!(turn.failed_while_waiting().is_none());
        drop(turn);
        assert_eq!(gate.keys_in_use(), 0);
    }
}
