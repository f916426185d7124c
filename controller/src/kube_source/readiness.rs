//! When Kubernetes mode may write its first config, and which watch failures stop it: a small
//! state machine, kept out of the async loop so it is unit-tested.
//!
//! The first config waits until every kind has been listed once (or its CRD is known to be
//! missing): writing earlier would, for instance, publish workloads before their STRICT
//! PeerAuthentication, briefly opening the mesh to plaintext.

use std::collections::BTreeSet;

use super::{KubeSourceError, kinds::Kind};

/// What a per-kind watch task reports to the loop.
#[derive(Debug)]
pub enum Signal {
    /// An object was added, changed or deleted (or a re-list completed) after the first sync.
    Changed,
    /// The kind's (re-)list completed: its store holds the server's full state.
    Synced(Kind),
    /// The kind's CRD is not installed: it reads as empty until it is.
    Missing(Kind),
    /// The API server refused the kind: 403 (`forbidden`) or 401 (`unauthorized`).
    Refused { kind: Kind, forbidden: bool, message: String },
}

#[derive(Debug)]
pub struct Readiness {
    pending: BTreeSet<Kind>,
    started: bool,
}

/// What the loop should do after a signal.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Still waiting for the first full sync.
    Wait,
    /// Rebuild the snapshot (after the debounce).
    Rebuild,
    /// Log this and carry on (the watcher retries with backoff).
    Warn(String),
}

impl Default for Readiness {
    fn default() -> Self {
        Self { pending: Kind::ALL.into_iter().collect(), started: false }
    }
}

impl Readiness {
    /// Whether the first config has been released.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Kinds not yet listed, for the "waiting for ..." message.
    pub fn pending(&self) -> impl Iterator<Item = Kind> + '_ {
        self.pending.iter().copied()
    }

    /// A refusal before the first sync is a configuration error (RBAC, credentials): stop with
    /// a message naming the resource. After it, it may be an RBAC roll-out in progress: keep the
    /// last config and let the watcher retry.
    pub fn on(&mut self, signal: Signal) -> Result<Next, KubeSourceError> {
        match signal {
            Signal::Changed => {}
            Signal::Synced(kind) | Signal::Missing(kind) => {
                self.pending.remove(&kind);
            }
            Signal::Refused { kind, forbidden, message } => {
                let resource = kind.to_string();
                if !self.started {
                    return Err(if forbidden {
                        KubeSourceError::Forbidden { resource, message }
                    } else {
                        KubeSourceError::Unauthorized { resource, message }
                    });
                }
                return Ok(Next::Warn(format!(
                    "the API server now refuses {resource} ({message}); keeping the last config and retrying"
                )));
            }
        }
        if self.pending.is_empty() {
            self.started = true;
            Ok(Next::Rebuild)
        } else {
            Ok(Next::Wait)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(kind: Kind, forbidden: bool) -> Signal {
        Signal::Refused { kind, forbidden, message: "pods is forbidden: User \"x\" cannot list".into() }
    }

    #[test]
    fn the_first_config_waits_for_every_kind_listed_or_missing() {
        let mut r = Readiness::default();
        assert_eq!(r.on(Signal::Changed).unwrap(), Next::Wait);
        for kind in Kind::ALL {
            assert!(!r.started());
            let signal = if kind == Kind::Gateway { Signal::Missing(kind) } else { Signal::Synced(kind) };
            let expected = if kind == *Kind::ALL.last().unwrap() { Next::Rebuild } else { Next::Wait };
            assert_eq!(r.on(signal).unwrap(), expected, "{kind}");
        }
        assert!(r.started() && r.pending().next().is_none());
        assert_eq!(r.on(Signal::Changed).unwrap(), Next::Rebuild);
    }

    #[test]
    fn a_refusal_before_the_first_sync_stops_naming_the_resource() {
        let mut r = Readiness::default();
        let e = r.on(refused(Kind::Pod, true)).unwrap_err();
        assert!(matches!(&e, KubeSourceError::Forbidden { resource, .. } if resource == "pods"));
        assert!(e.to_string().contains("deploy/rbac/controller.yaml"), "{e}");
        let e = Readiness::default().on(refused(Kind::VirtualService, false)).unwrap_err();
        assert!(e.to_string().contains("virtualservices.networking.istio.io"), "{e}");
        assert!(matches!(e, KubeSourceError::Unauthorized { .. }));
    }

    #[test]
    fn a_refusal_after_the_first_sync_is_a_warning() {
        let mut r = Readiness::default();
        for kind in Kind::ALL {
            r.on(Signal::Synced(kind)).unwrap();
        }
        assert!(matches!(r.on(refused(Kind::Pod, true)).unwrap(), Next::Warn(m) if m.contains("pods")));
    }
}
