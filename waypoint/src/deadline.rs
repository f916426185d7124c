//! An optional time limit around a future, holding the future once.
//!
//! `match limit { Some(t) => timeout(t, f).await, None => f.await }` compiles to a state
//! machine with room for both `Timeout<F>` and `F`, side by side; nested a few levels (the
//! route's timeout around the attempts, the per-try timeout around each send, the connect
//! timeout around a dial) the copies multiply, and the request's future reached 13 KB, every
//! byte of it copied when hyper moves the future into its task. [`Deadline`] holds `F` once
//! and a timer only when there is a limit.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Sleep;

/// The limit passed before the future completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

pin_project_lite::pin_project! {
    /// `future`, failed with [`Elapsed`] if `limit` passes first; never fails without a limit.
    pub struct Deadline<F> {
        #[pin]
        future: F,
        // Boxed: a `Sleep` is a timer entry of its own, and most requests have no limit.
        sleep: Option<Pin<Box<Sleep>>>,
    }
}

pub fn within<F: Future>(limit: Option<Duration>, future: F) -> Deadline<F> {
    Deadline { future, sleep: limit.map(|l| Box::pin(tokio::time::sleep(l))) }
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
        match this.sleep {
            Some(sleep) => sleep.as_mut().poll(cx).map(|()| Err(Elapsed)),
            None => Poll::Pending,
        }
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
}
