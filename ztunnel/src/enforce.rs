//! L4 policy enforcement: the decision at connection time, and re-evaluation of every open
//! inbound connection when policy (or a workload) changes, closing the ones now denied.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::oneshot;
use tracing::info;
use warren_core::{
    identity::SpiffeId,
    model::{Workload, WorkloadIndex},
    policy::{ConnectionFacts, Policies, Verdict},
};

/// An open inbound connection, as policy sees it.
struct Tracked {
    source_identity: Option<SpiffeId>,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
    /// Plaintext connections are also subject to PeerAuthentication.
    plaintext: bool,
    close: Option<oneshot::Sender<String>>,
}

#[derive(Default)]
pub struct Tracker {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Tracked>>,
    pub closed_by_policy: AtomicU64,
}

/// Removes the entry when the connection ends.
pub struct TrackGuard<'a> {
    tracker: &'a Tracker,
    id: u64,
}

impl Drop for TrackGuard<'_> {
    fn drop(&mut self) {
        self.tracker.open.lock().expect("poisoned").remove(&self.id);
    }
}

impl Tracker {
    /// Registers an admitted inbound connection; the receiver fires with the reason if a later
    /// policy denies it.
    pub fn track(
        &self,
        source_identity: Option<SpiffeId>,
        source_ip: IpAddr,
        destination_ip: IpAddr,
        destination_port: u16,
        plaintext: bool,
    ) -> (TrackGuard<'_>, oneshot::Receiver<String>) {
        let (tx, rx) = oneshot::channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let tracked = Tracked {
            source_identity,
            source_ip,
            destination_ip,
            destination_port,
            plaintext,
            close: Some(tx),
        };
        self.open.lock().expect("poisoned").insert(id, tracked);
        (TrackGuard { tracker: self, id }, rx)
    }

    pub fn open_connections(&self) -> usize {
        self.open.lock().expect("poisoned").len()
    }

    /// Re-decides every open connection under the new policies and closes the denied ones.
    pub fn reevaluate(&self, policies: &Policies, workloads: &WorkloadIndex) {
        let mut open = self.open.lock().expect("poisoned");
        for tracked in open.values_mut() {
            let Some(destination) = workloads.by_ip(tracked.destination_ip) else {
                continue;
            };
            let verdict = decide(
                policies,
                workloads,
                tracked.source_identity.as_ref(),
                tracked.source_ip,
                destination,
                tracked.destination_port,
                tracked.plaintext,
            );
            if let Err(reason) = verdict
                && let Some(close) = tracked.close.take()
            {
                info!(src = %tracked.source_ip, dst = %tracked.destination_ip, port = tracked.destination_port, "closing a live connection: {reason}");
                self.closed_by_policy.fetch_add(1, Ordering::Relaxed);
                let _ = close.send(reason);
            }
        }
    }
}

/// The whole inbound decision: PeerAuthentication for plaintext, then AuthorizationPolicy.
pub fn decide(
    policies: &Policies,
    workloads: &WorkloadIndex,
    source_identity: Option<&SpiffeId>,
    source_ip: IpAddr,
    destination: &Workload,
    destination_port: u16,
    plaintext: bool,
) -> Result<(), String> {
    if plaintext && policies.mtls_mode(destination, destination_port) == warren_core::policy::MtlsMode::Strict
    {
        return Err("plaintext refused: PeerAuthentication is STRICT".into());
    }
    let from_its_waypoint = source_identity.is_some_and(|id| workloads.is_waypoint_of(id, destination));
    let verdict = policies.authorize(&ConnectionFacts {
        source_identity,
        source_ip,
        destination,
        destination_port,
        from_its_waypoint,
    });
    match verdict {
        Verdict::Allow => Ok(()),
        denied => Err(denied.to_string()),
    }
}
