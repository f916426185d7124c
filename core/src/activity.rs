//! When a relay last moved bytes, for idle timeouts on streams that have no requests to count
//! (a waypoint's TCP passthrough, as Envoy's `tcp_proxy` `idle_timeout`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

/// Shared between a relay, which reports each chunk it moves ([`moved`](Activity::moved)),
/// and a watchdog waiting in [`idle_for`](Activity::idle_for), which also knows how many
/// bytes went each way if it has to end the relay.
#[derive(Clone, Debug)]
pub struct Activity(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    start: Instant,
    /// Milliseconds from `start` to the last chunk.
    last_ms: AtomicU64,
    /// Bytes moved into the watched stream (sent on it) and out of it (received on it).
    into_stream: AtomicU64,
    out_of_stream: AtomicU64,
}

/// Which way a relay moved a chunk, seen from the watched stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Sent on the stream.
    IntoStream,
    /// Received on the stream.
    OutOfStream,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// Counts as active now.
    pub fn new() -> Self {
        Self(Arc::new(Inner {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            into_stream: AtomicU64::new(0),
            out_of_stream: AtomicU64::new(0),
        }))
    }

    /// A chunk of `bytes` has been moved `direction`.
    pub fn moved(&self, direction: Direction, bytes: usize) {
        let ms = self.0.start.elapsed().as_millis() as u64;
        self.0.last_ms.fetch_max(ms, Ordering::Relaxed);
        let count = match direction {
            Direction::IntoStream => &self.0.into_stream,
            Direction::OutOfStream => &self.0.out_of_stream,
        };
        count.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Bytes moved so far: (into the stream, out of it).
    pub fn bytes(&self) -> (u64, u64) {
        (self.0.into_stream.load(Ordering::Relaxed), self.0.out_of_stream.load(Ordering::Relaxed))
    }

    fn last(&self) -> Instant {
        self.0.start + Duration::from_millis(self.0.last_ms.load(Ordering::Relaxed))
    }

    /// Returns once no chunk has moved for `limit` (to the millisecond).
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let deadline = self.last() + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_only_after_the_limit_with_no_touch() {
        let activity = Activity::new();
        let limit = Duration::from_secs(10);
        let started = Instant::now();
        let toucher = {
            let activity = activity.clone();
            async move {
                // Touched every 6 s for 30 s: never 10 s apart.
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_secs(6)).await;
                    activity.moved(Direction::IntoStream, 2);
                    activity.moved(Direction::OutOfStream, 1);
                }
            }
        };
        let ((), ()) = tokio::join!(toucher, activity.idle_for(limit));
        // Idle from the last touch at 30 s: returns at 40 s.
        assert_eq!(started.elapsed().as_secs(), 40);
        assert_eq!(activity.bytes(), (10, 5));
    }
}
