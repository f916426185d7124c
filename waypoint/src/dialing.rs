//! Upstream HTTP/2 connections being opened, and the requests that wait for them.
//!
//! A request that finds no pooled HTTP/2 connection with a free stream used to open a
//! connection of its own, and a new connection joined the pool only once its first response
//! had come back: 2,000 slow requests at once on a cold pool opened ~1,800 upstream
//! connections (an HBONE stream and an HTTP/2 connection each, ~16 KB apiece: 29 MB of the
//! waypoint's heap, measured with heaptrack). Envoy attaches pending streams to a connecting
//! client up to the streams it expects it to have; here a request likewise waits for a
//! connection being opened while that one is expected to have a stream for it. Once the
//! server's SETTINGS (its stream limit) are known, the waiters are handed streams of the new
//! connection first (as many as it has free), and then it joins the pool for the rest.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::watch;

use crate::upstream::{DialKey, UpstreamError};

/// The connections a cluster is opening (HTTP/2 only: an HTTP/1.1 connection carries one
/// request at a time, so nothing could wait for it). `H` is what a waiter is handed: a
/// stream of the new connection.
pub struct Dials<H>(Arc<Mutex<Vec<Arc<Dial<H>>>>>);

impl<H> Default for Dials<H> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

struct Dial<H> {
    key: DialKey,
    /// Requests besides its opener that it is expected to carry at once.
    room: usize,
    waiting: AtomicUsize,
    /// Streams for the waiters, taken one each; any left over (a waiter gone meanwhile) are
    /// released with the dial.
    handed: Mutex<Vec<H>>,
    outcome: watch::Sender<Outcome>,
}

#[derive(Clone, Debug)]
enum Outcome {
    Pending,
    /// Open: each waiter takes a stream handed over, or (none left) looks in the pool again.
    Opened,
    /// Its opener gave up (its request cancelled mid-dial): the waiters look again, and may
    /// open one themselves.
    Abandoned,
    /// The waiters fail as its opener did (Envoy fails the streams attached to a connecting
    /// client with the connect failure).
    Failed(UpstreamError),
}

impl<H> Dials<H> {
    /// Registers a connection being opened to `key` that is expected to carry `room`
    /// requests besides its opener's.
    #[cfg(test)]
    pub fn open(&self, key: DialKey, room: usize) -> Opening<H> {
        match self.join_or_open(key, room, || false, || true) {
            Some(Turn::Open(opening)) => opening,
            _ => unreachable!("not admitted to wait, granted a slot: it opens"),
        }
    }

    #[cfg(test)]
    pub fn join(&self, key: DialKey, admit: impl FnOnce() -> bool) -> Option<Waiting<H>> {
        Self::join_locked(&lock(&self.0), key, admit)
    }

    /// Joins a connection being opened to `key` that has room for one more request, if
    /// `admit` lets the request wait (it takes a slot under `http1MaxPendingRequests`); else
    /// registers a new one, expected to carry `room` requests besides its opener's, if
    /// `take_slot` grants it a slot under `maxConnections`. Under one lock, so that requests
    /// arriving together, finding nothing to join, do not each open a connection.
    pub fn join_or_open(
        &self,
        key: DialKey,
        room: usize,
        admit: impl FnOnce() -> bool,
        take_slot: impl FnOnce() -> bool,
    ) -> Option<Turn<H>> {
        let mut open = lock(&self.0);
        if let Some(waiting) = Self::join_locked(&open, key, admit) {
            return Some(Turn::Wait(waiting));
        }
        if !take_slot() {
            return None;
        }
        let (outcome, _) = watch::channel(Outcome::Pending);
        let dial = Arc::new(Dial {
            key,
            room,
            waiting: AtomicUsize::new(0),
            handed: Mutex::new(Vec::new()),
            outcome,
        });
        open.push(dial.clone());
        Some(Turn::Open(Opening { list: self.0.clone(), dial }))
    }

    fn join_locked(open: &[Arc<Dial<H>>], key: DialKey, admit: impl FnOnce() -> bool) -> Option<Waiting<H>> {
        let dial = open.iter().find(|d| {
            d.key == key
                && matches!(*d.outcome.borrow(), Outcome::Pending)
                && d.waiting.load(Ordering::Acquire) < d.room
        })?;
        if !admit() {
            return None;
        }
        dial.waiting.fetch_add(1, Ordering::AcqRel);
        Some(Waiting { outcome: dial.outcome.subscribe(), dial: dial.clone() })
    }
}

/// What [`Dials::join_or_open`] gave a request: a place among a connection's waiters, or the
/// connection to open.
pub enum Turn<H> {
    Wait(Waiting<H>),
    Open(Opening<H>),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The opener's side of a [`Dial`]: says how it ended. Dropped without a word (its request
/// cancelled mid-dial), it tells the waiters to look again.
pub struct Opening<H> {
    list: Arc<Mutex<Vec<Arc<Dial<H>>>>>,
    dial: Arc<Dial<H>>,
}

impl<H> Opening<H> {
    /// How many requests wait for the connection now.
    pub fn waiting(&self) -> usize {
        self.dial.waiting.load(Ordering::Acquire)
    }

    /// The connection is open: `streams`, claimed before it joined the pool (so requests
    /// arriving since could not take them first), go to the waiters, one each.
    pub fn opened(self, streams: Vec<H>) {
        *lock(&self.dial.handed) = streams;
        self.dial.outcome.send_replace(Outcome::Opened);
    }

    /// The connection could not be opened: the waiters fail with `error`.
    pub fn failed(self, error: UpstreamError) {
        self.dial.outcome.send_replace(Outcome::Failed(error));
    }
}

impl<H> Drop for Opening<H> {
    fn drop(&mut self) {
        lock(&self.list).retain(|d| !Arc::ptr_eq(d, &self.dial));
        self.dial.outcome.send_if_modified(|outcome| {
            let pending = matches!(outcome, Outcome::Pending);
            if pending {
                *outcome = Outcome::Abandoned;
            }
            pending
        });
    }
}

/// A request's place among a [`Dial`]'s waiters; dropped, it leaves room for another.
pub struct Waiting<H> {
    dial: Arc<Dial<H>>,
    outcome: watch::Receiver<Outcome>,
}

impl<H> Waiting<H> {
    /// Waits for the connection: a stream of it, or none when the pool is worth another look
    /// (its streams ran out, or its opener gave up); the opener's error when it failed.
    pub async fn finished(mut self) -> Result<Option<H>, UpstreamError> {
        // The sender lives in the dial this waiter holds, so the channel cannot close.
        let outcome = self.outcome.wait_for(|o| !matches!(o, Outcome::Pending)).await.map(|o| o.clone());
        match outcome {
            Ok(Outcome::Failed(error)) => Err(error),
            Ok(Outcome::Opened) => Ok(lock(&self.dial.handed).pop()),
            _ => Ok(None),
        }
    }
}

impl<H> Drop for Waiting<H> {
    fn drop(&mut self) {
        self.dial.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::upstream::Protocol;

    fn key(port: u16) -> DialKey {
        (std::net::SocketAddr::from(([10, 0, 0, 1], port)), Protocol::Http2)
    }

    #[tokio::test]
    async fn requests_wait_for_a_connection_being_opened_up_to_its_room() {
        let dials = Dials::<&str>::default();
        let opening = dials.open(key(80), 2);
        let first = dials.join(key(80), || true).expect("room for one");
        let second = dials.join(key(80), || true).expect("room for two");
        assert!(dials.join(key(80), || true).is_none(), "a third would be past its room");
        assert!(dials.join(key(81), || true).is_none(), "another address has no connection being opened");
        drop(second);
        assert!(
            dials.join(key(80), || false).is_none(),
            "one not admitted (its pending slots full) does not wait"
        );
        let second = dials.join(key(80), || true).expect("a waiter gone leaves room");

        let waiters = tokio::spawn(async move { (first.finished().await, second.finished().await) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiters.is_finished(), "the waiters wait for the outcome");
        assert_eq!(opening.waiting(), 2);
        // The server allows one stream more: one waiter gets it, the other looks again.
        opening.opened(vec!["stream"]);
        let (first, second) = waiters.await.unwrap();
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_eq!([first, second].iter().flatten().count(), 1, "{first:?} {second:?}");
        assert!(dials.join(key(80), || true).is_none(), "a connection opened is no longer joined");
    }

    #[tokio::test]
    async fn a_failed_opening_fails_its_waiters_with_its_error() {
        let dials = Dials::<()>::default();
        let opening = dials.open(key(80), 5);
        let waiting = dials.join(key(80), || true).unwrap();
        opening.failed(UpstreamError::Connect("10.0.0.1:80: connection refused".into()));
        match waiting.finished().await {
            Err(UpstreamError::Connect(e)) => assert_eq!(e, "10.0.0.1:80: connection refused"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_opener_that_gives_up_sends_its_waiters_back_to_the_pool() {
        let dials = Dials::<()>::default();
        let opening = dials.open(key(80), 5);
        let waiting = dials.join(key(80), || true).unwrap();
        drop(opening);
        assert!(matches!(waiting.finished().await, Ok(None)));
        assert!(dials.join(key(80), || true).is_none());
    }

    #[test]
    fn of_requests_arriving_together_one_opens_and_the_next_waits_for_it() {
        let dials = Dials::<()>::default();
        let first = dials.join_or_open(key(80), 1, || true, || true);
        assert!(matches!(first, Some(Turn::Open(_))));
        let slot_asked = std::cell::Cell::new(false);
        let second = dials.join_or_open(
            key(80),
            1,
            || true,
            || {
                slot_asked.set(true);
                true
            },
        );
        assert!(matches!(second, Some(Turn::Wait(_))) && !slot_asked.get(), "it waits, taking no slot");
        // Past its room the third opens another, if a slot is free; else it gets neither.
        assert!(dials.join_or_open(key(80), 1, || true, || false).is_none());
        assert!(matches!(dials.join_or_open(key(80), 1, || true, || true), Some(Turn::Open(_))));
    }

    #[test]
    fn no_room_no_waiting() {
        // maxConcurrentStreams 1: every request opens its own connection.
        let dials = Dials::<()>::default();
        let _opening = dials.open(key(80), 0);
        assert!(dials.join(key(80), || true).is_none());
    }
}
