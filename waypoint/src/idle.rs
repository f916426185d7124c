//! The downstream idle timeout: a client's HTTP connection (inside its CONNECT stream) with no
//! request in flight for `--idle-timeout-secs` is closed, as Envoy's HTTP connection manager
//! does after its `idle_timeout` (1 h by default). Without it an idle keep-alive connection
//! holds its CONNECT stream, buffers and a task here, and stream state on both ztunnels, until
//! the client goes away.
//!
//! A request counts as in flight from its arrival until its response body has been sent, so a
//! long request or a slow stream of response bytes is never cut by this bound (the response
//! body holds the request's [`Busy`] guard: `forward::ResponseCounter`).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

/// Tracks one downstream connection's requests in flight and since when it has had none.
#[derive(Clone)]
pub struct IdleWatch(Arc<State>);

struct State {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl IdleWatch {
    pub fn new() -> Self {
        Self(Arc::new(State { in_flight: AtomicUsize::new(0), idle_since: Mutex::new(Instant::now()) }))
    }

    /// Marks a request in flight until the guard drops.
    pub fn busy(&self) -> Busy {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(self.0.clone())
    }

    /// Resolves once the connection has had no request in flight for `limit`.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let next = if self.0.in_flight.load(Ordering::Acquire) > 0 {
                // Busy: look again a full period later (the request's end restarts it anyway).
                Instant::now() + limit
            } else {
                *self.0.idle_since.lock().expect("poisoned") + limit
            };
            tokio::time::sleep_until(next).await;
            let idle_since = *self.0.idle_since.lock().expect("poisoned");
            if self.0.in_flight.load(Ordering::Acquire) == 0 && idle_since + limit <= Instant::now() {
                return;
            }
        }
    }
}

/// A request in flight; dropping it (when the response body ends) may start the idle period.
pub struct Busy(Arc<State>);

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("poisoned") = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_requests_is_idle_after_the_limit() {
        let watch = IdleWatch::new();
        let started = Instant::now();
        watch.idle_for(LIMIT).await;
        assert_eq!(started.elapsed(), LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_holds_the_connection_and_its_end_restarts_the_period() {
        let watch = IdleWatch::new();
        let busy = watch.busy();
        let started = Instant::now();
        let ended = tokio::spawn(async move {
            // A request (or a response body) that takes three idle periods.
            tokio::time::sleep(3 * LIMIT).await;
            drop(busy);
        });
        watch.idle_for(LIMIT).await;
        ended.await.unwrap();
        // Idle only a full period after the request ended, not before.
        assert!(started.elapsed() >= 4 * LIMIT, "{:?}", started.elapsed());
        assert!(started.elapsed() <= 5 * LIMIT, "{:?}", started.elapsed());
    }
}
