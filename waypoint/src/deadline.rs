//! An optional time limit around a future, holding the future once.
//!
//! `match limit { Some(t) => timeout(t, f).await, None => f.await }` compiles to a state
//! machine with room for both `Timeout<F>` and `F`, side by side; nested a few levels (the
//! route's timeout around the attempts, the per-try timeout around each send, the connect
//! timeout around a dial) the copies multiply, and the request's future reached 13 KB, every
//! byte of it copied when hyper moves the future into its task. [`Deadline`] holds `F` once
//! and a timer only when there is a limit.
//!
//! A limit may also start late ([`within_after`]): a route's timeouts count from the end of
//! the client's request, as Envoy's do, so a slow upload or a client still streaming is not
//! held against them.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::{Instant, Sleep};

/// The limit passed before the future completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// What a limit may wait for before it starts counting: the end of the client's request,
/// where Envoy starts a route's `timeout` and `perTryTimeout`.
pub type Start = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A time limit: none, one counting already, or one that starts counting when its [`Start`]
/// completes. Boxed where it holds anything: most requests have no limit, and the request's
/// future holds several of these.
pub enum Timer {
    Off,
    Waiting(Box<(Duration, Start)>),
    // A `Sleep` is a timer entry of its own.
    Counting(Pin<Box<Sleep>>),
}

impl Timer {
    /// `limit` from when `start` completes; from now without one.
    pub fn after(limit: Option<Duration>, start: Option<Start>) -> Self {
        match (limit, start) {
            (None, _) => Timer::Off,
            (Some(limit), None) => Timer::Counting(Box::pin(tokio::time::sleep(limit))),
            (Some(limit), Some(start)) => Timer::Waiting(Box::new((limit, start))),
        }
    }

    /// Passing at `deadline`.
    pub fn until(deadline: Instant) -> Self {
        Timer::Counting(Box::pin(tokio::time::sleep_until(deadline)))
    }

    /// Whether the limit has passed (registering `cx` to be woken when it does).
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if let Timer::Waiting(waiting) = self {
            let (limit, start) = &mut **waiting;
            if start.as_mut().poll(cx).is_pending() {
                return false;
            }
            *self = Timer::Counting(Box::pin(tokio::time::sleep(*limit)));
        }
        match self {
            Timer::Counting(sleep) => sleep.as_mut().poll(cx).is_ready(),
            _ => false,
        }
    }
}

pin_project_lite::pin_project! {
    /// `future`, failed with [`Elapsed`] if its timer passes first; never fails without one.
    pub struct Deadline<F> {
        #[pin]
        future: F,
        timer: Timer,
    }
}

pub fn within<F: Future>(limit: Option<Duration>, future: F) -> Deadline<F> {
    within_after(limit, None, future)
}

/// `limit` counted from when `start` completes (from now without one).
pub fn within_after<F: Future>(limit: Option<Duration>, start: Option<Start>, future: F) -> Deadline<F> {
    Deadline { future, timer: Timer::after(limit, start) }
}

impl<F: Future> Future for Deadline<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The future first, as `tokio::time::timeout` does: a result that is ready counts
        // even when the limit passed at the same moment.
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        if this.timer.poll_expired(cx) { Poll::Ready(Err(Elapsed)) } else { Poll::Pending }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_future_that_outlives_its_limit_fails() {
        let slow = tokio::time::sleep(Duration::from_secs(5));
        assert_eq!(within(Some(Duration::from_secs(1)), slow).await, Err(Elapsed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_future_within_its_limit_or_without_one_completes() {
        let quick = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            7
        };
        assert_eq!(within(Some(Duration::from_secs(1)), quick).await, Ok(7));
        let long = async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            8
        };
        assert_eq!(within(None, long).await, Ok(8));
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_that_starts_late_counts_from_its_start() {
        let three_seconds = || async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            9
        };
        let at = |secs: f64| -> Start { Box::pin(tokio::time::sleep(Duration::from_secs_f64(secs))) };
        // Started at 2 s, 1.5 s of limit: 3 s is within it.
        let limit = Some(Duration::from_millis(1500));
        assert_eq!(within_after(limit, Some(at(2.0)), three_seconds()).await, Ok(9));
        // Started at 0.5 s: it passes at 2 s.
        let began = tokio::time::Instant::now();
        assert_eq!(within_after(limit, Some(at(0.5)), three_seconds()).await, Err(Elapsed));
        assert_eq!(began.elapsed(), Duration::from_secs(2));
        // A start that never comes: no limit at all.
        let never: Start = Box::pin(std::future::pending());
        assert_eq!(within_after(limit, Some(never), three_seconds()).await, Ok(9));
    }
}
