//! Retry policies: which outcomes of an attempt are tried again (Envoy's `retry_on`),
//! compiled once per config instead of comparing condition strings per attempt.

use std::{sync::LazyLock, time::Duration};

use warren_core::l7::Retries;

use crate::upstream::UpstreamError;

/// A route's retries, ready to evaluate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try (0: none).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    on: Conditions,
    /// Statuses retried under `retriable-status-codes`.
    codes: Vec<u16>,
}

/// Envoy's conditions, one bit each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Conditions(u16);

impl Conditions {
    const FIVE_XX: u16 = 1;
    const GATEWAY_ERROR: u16 = 1 << 1;
    const CONNECT_FAILURE: u16 = 1 << 2;
    const RESET: u16 = 1 << 3;
    const RETRIABLE_4XX: u16 = 1 << 4;
    const REFUSED_STREAM: u16 = 1 << 5;
    const RETRIABLE_STATUS_CODES: u16 = 1 << 6;
    // gRPC's, read from the `grpc-status` of a trailers-only response (as Envoy does: a
    // status that arrives in trailers comes after the body, too late to try again).
    const CANCELLED: u16 = 1 << 7;
    const DEADLINE_EXCEEDED: u16 = 1 << 8;
    const INTERNAL: u16 = 1 << 9;
    const RESOURCE_EXHAUSTED: u16 = 1 << 10;
    const UNAVAILABLE: u16 = 1 << 11;

    fn any(self, bits: u16) -> bool {
        self.0 & bits != 0
    }
}

/// The condition a `retryOn` entry names, or none for one this waypoint does not evaluate.
fn condition(name: &str) -> Option<u16> {
    Some(match name {
        "5xx" => Conditions::FIVE_XX,
        "gateway-error" => Conditions::GATEWAY_ERROR,
        "connect-failure" => Conditions::CONNECT_FAILURE,
        "reset" => Conditions::RESET,
        "retriable-4xx" => Conditions::RETRIABLE_4XX,
        "refused-stream" => Conditions::REFUSED_STREAM,
        "retriable-status-codes" => Conditions::RETRIABLE_STATUS_CODES,
        "cancelled" => Conditions::CANCELLED,
        "deadline-exceeded" => Conditions::DEADLINE_EXCEEDED,
        "internal" => Conditions::INTERNAL,
        "resource-exhausted" => Conditions::RESOURCE_EXHAUSTED,
        "unavailable" => Conditions::UNAVAILABLE,
        _ => return None,
    })
}

/// Istio's policy for a service that no route covers (as for a route that says nothing about
/// retries; the controller fills that one in).
pub static ISTIO_DEFAULT: LazyLock<RetryPolicy> =
    LazyLock::new(|| RetryPolicy::compile(&Retries::istio_default()));

/// What an attempt came to, as far as retrying goes.
pub enum Attempt<'a> {
    /// `grpc_status`: a gRPC call's trailers-only status, if any.
    Response {
        status: u16,
        grpc_status: Option<u8>,
    },
    Failed(&'a UpstreamError),
}

impl RetryPolicy {
    /// Entries that are neither a condition above nor a status code are skipped (the
    /// controller warns about them when it translates the route).
    pub fn compile(retries: &Retries) -> Self {
        let mut on = Conditions::default();
        let mut codes = Vec::new();
        for entry in &retries.retry_on {
            if let Some(bit) = condition(entry) {
                on.0 |= bit;
            } else if let Ok(code) = entry.parse::<u16>() {
                codes.push(code);
            }
        }
        RetryPolicy {
            attempts: retries.attempts,
            per_try_timeout: retries.per_try_timeout_ms.map(Duration::from_millis),
            on,
            codes,
        }
    }

    /// Whether Envoy would try `attempt` again under this policy.
    pub fn retriable(&self, attempt: &Attempt<'_>) -> bool {
        use Conditions as C;
        let on = self.on;
        match *attempt {
            Attempt::Response { status, grpc_status } => {
                (on.any(C::FIVE_XX) && status >= 500)
                    || (on.any(C::GATEWAY_ERROR) && matches!(status, 502..=504))
                    || (on.any(C::RETRIABLE_4XX) && status == 409)
                    || (on.any(C::RETRIABLE_STATUS_CODES) && self.codes.contains(&status))
                    || grpc_status.is_some_and(|code| self.grpc_retriable(code))
            }
            Attempt::Failed(UpstreamError::Overflow) => false,
            Attempt::Failed(UpstreamError::Connect(_)) => {
                on.any(C::CONNECT_FAILURE | C::FIVE_XX | C::GATEWAY_ERROR | C::RESET)
            }
            Attempt::Failed(UpstreamError::Reset(_)) => on.any(C::RESET | C::FIVE_XX),
            // Never processed upstream: Envoy's `refused-stream`, and what `reset` and `5xx`
            // cover.
            Attempt::Failed(UpstreamError::Refused(_)) => on.any(C::REFUSED_STREAM | C::RESET | C::FIVE_XX),
            Attempt::Failed(UpstreamError::Timeout) => on.any(C::FIVE_XX | C::GATEWAY_ERROR | C::RESET),
        }
    }

    fn grpc_retriable(&self, code: u8) -> bool {
        use Conditions as C;
        let bit = match code {
            1 => C::CANCELLED,
            4 => C::DEADLINE_EXCEEDED,
            8 => C::RESOURCE_EXHAUSTED,
            13 => C::INTERNAL,
            14 => C::UNAVAILABLE,
            _ => return false,
        };
        self.on.any(bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: &[&str]) -> RetryPolicy {
        RetryPolicy::compile(&Retries {
            attempts: 2,
            per_try_timeout_ms: None,
            retry_on: on.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn status(policy: &RetryPolicy, status: u16) -> bool {
        policy.retriable(&Attempt::Response { status, grpc_status: None })
    }

    fn grpc(policy: &RetryPolicy, code: u8) -> bool {
        policy.retriable(&Attempt::Response { status: 200, grpc_status: Some(code) })
    }

    fn failed(policy: &RetryPolicy, e: UpstreamError) -> bool {
        policy.retriable(&Attempt::Failed(&e))
    }

    #[test]
    fn status_conditions_follow_envoy() {
        assert!(status(&policy(&["5xx"]), 503));
        assert!(!status(&policy(&["gateway-error"]), 500));
        assert!(status(&policy(&["gateway-error"]), 504));
        assert!(status(&policy(&["retriable-4xx"]), 409));
        assert!(status(&policy(&["retriable-status-codes", "418"]), 418));
        // Codes count only under the condition that names them, as in Envoy.
        assert!(!status(&policy(&["418"]), 418));
        assert!(!status(&policy(&["5xx"]), 200));
    }

    #[test]
    fn failure_conditions_follow_envoy() {
        assert!(failed(&policy(&["connect-failure"]), UpstreamError::Connect("x".into())));
        assert!(!failed(&policy(&["5xx", "connect-failure"]), UpstreamError::Overflow));
        let refused = || UpstreamError::Refused("REFUSED_STREAM".into());
        assert!(failed(&policy(&["refused-stream"]), refused()));
        assert!(failed(&policy(&["reset"]), refused()));
        assert!(!failed(&policy(&["connect-failure", "gateway-error"]), refused()));
        assert!(!failed(&policy(&["refused-stream"]), UpstreamError::Reset("connection reset".into())));
        assert!(failed(&policy(&["gateway-error"]), UpstreamError::Timeout));
        assert!(!failed(&policy(&["connect-failure"]), UpstreamError::Timeout));
    }

    #[test]
    fn grpc_conditions_follow_envoy() {
        let each = [
            ("cancelled", 1),
            ("deadline-exceeded", 4),
            ("resource-exhausted", 8),
            ("internal", 13),
            ("unavailable", 14),
        ];
        for (condition, code) in each {
            assert!(grpc(&policy(&[condition]), code), "{condition} should retry grpc-status {code}");
            for (other, _) in each.iter().filter(|(c, _)| *c != condition) {
                assert!(!grpc(&policy(&[other]), code), "{other} should not retry grpc-status {code}");
            }
        }
        let all =
            policy(&["cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"]);
        assert!(!grpc(&all, 0), "OK is never retried");
        assert!(!grpc(&all, 2), "UNKNOWN is not among the conditions");
        assert!(!status(&all, 200), "no grpc-status: nothing to retry");
        assert!(!grpc(&policy(&["5xx"]), 14), "HTTP conditions ignore gRPC statuses");
    }

    #[test]
    fn istios_default_policy_retries_what_istio_does() {
        let default = &*ISTIO_DEFAULT;
        assert_eq!(default.attempts, 2);
        assert!(status(default, 503));
        assert!(!status(default, 500));
        assert!(failed(default, UpstreamError::Connect("x".into())));
        assert!(failed(default, UpstreamError::Refused("REFUSED_STREAM".into())));
        assert!(!failed(default, UpstreamError::Reset("x".into())));
        assert!(!failed(default, UpstreamError::Timeout));
        assert!(grpc(default, 14));
        assert!(grpc(default, 1));
        assert!(!grpc(default, 13));
    }

    #[test]
    fn every_condition_the_controller_passes_on_is_evaluated() {
        for name in warren_core::l7::RETRY_CONDITIONS {
            assert!(condition(name).is_some(), "{name} is passed on by the controller but not evaluated");
        }
    }

    #[test]
    fn unknown_entries_are_skipped() {
        let p = policy(&["5xx", "envoy-ratelimited", "no-such-thing"]);
        assert_eq!(p, policy(&["5xx"]));
    }
}
