//! Pod enrollment: ztunnel's listeners inside each enrolled pod's network namespace, the
//! pod's sk_lookup link, and its entry in the enrolled map.
//!
//! Enrolling goes listeners → listener map → sk_lookup → enrolled map, so that by the time
//! anything is steered to ztunnel its listener exists; unenrolling goes the other way. A step
//! that fails undoes the earlier ones: a pod is enrolled completely or not at all.
//!
//! Hand-over (a rolling update that starts the new ztunnel before the old one leaves): every
//! in-pod listener has `SO_REUSEPORT`, so a second ztunnel binds the same addresses beside the
//! first. Its listener-map entries replace the first one's, and sk_lookup steers to exactly
//! the socket in the map: inbound moves to the newcomer at once. Outbound connects to
//! 127.0.0.1:15001 are spread over both until the old one closes its listeners on SIGTERM;
//! `tcp_migrate_req`, set in every pod netns, moves what its queues still hold to the new one.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::links::PinnedLink;
use serde::Serialize;
use tokio::{runtime::Handle, sync::watch, task::JoinHandle};
use tracing::{info, warn};
use warren_core::model::Workload;
use warren_ebpf_types::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, ListenerKey, ListenerKind, OUTBOUND_PORT};

use crate::{
    capture::{Attachment, Capture, CaptureError},
    netns::{self, NetnsError, NetnsRef},
    proxy::{self, PodContext, Proxy},
};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("pod {pod} has no IP yet: waiting")]
    NoIp { pod: String },
    #[error("pod {pod}: {source}")]
    Netns { pod: String, source: NetnsError },
    #[error(
        "pod {pod}: opening ztunnel's listeners in its netns failed: {source} (is loopback up there, and ports 15001/15006/15008 free?)"
    )]
    Listeners { pod: String, source: io::Error },
    #[error(
        "pod {pod}: another process holds ports 15001/15006/15008 in its netns without sharing them: \
         a ztunnel of a release before hand-over support, during an upgrade; retrying until it leaves"
    )]
    ListenersHeld { pod: String },
    #[error("pod {pod}: {source}")]
    Capture { pod: String, source: Box<CaptureError> },
    #[error(
        "a ztunnel of a release before hand-over support still runs on this node (its capture \
         programs exempt only its own sockets and would capture this one's): enrolling pods once \
         it has exited"
    )]
    EarlierRelease,
    #[error("pods {first} and {second} both claim IP {ip}: neither is enrolled until one lets go")]
    DuplicateIp { ip: IpAddr, first: String, second: String },
}

/// One enrolled pod, as the admin view shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EnrolledPodView {
    pub pod: String,
    pub uid: String,
    pub ips: Vec<IpAddr>,
    pub netns: PathBuf,
    pub netns_inode: u64,
    pub netns_cookie: u64,
    pub sk_lookup: Attachment,
}

struct EnrolledPod {
    view: EnrolledPodView,
    workload: Workload,
    sk_lookup: Option<PinnedLink>,
    listener_keys: Vec<(IpAddr, ListenerKind)>,
    /// The inbound listeners' fds, to put back into the listener map if their entries go
    /// (see `InPod::restore_listeners`). Open as long as the pod is in `InPod::pods`: its
    /// accept loops close them only after being told to stop, after it left the map.
    inbound_fds: Vec<(IpAddr, ListenerKind, RawFd)>,
    /// Tells the accept loops to take what is queued and close their listeners.
    stop: watch::Sender<bool>,
}

/// The enrolled pods of this node.
pub struct InPod {
    capture: Arc<Capture>,
    proxy: Arc<Proxy>,
    runtime: Handle,
    pods: Mutex<BTreeMap<String, EnrolledPod>>,
    /// Last error reported per pod, so a pod that stays broken is logged once, not every tick.
    last_error: Mutex<HashMap<String, String>>,
    /// Pods that failed to enroll: when to try again, and the current backoff.
    retry: Mutex<HashMap<String, (Instant, Duration)>>,
    /// Set by `stop_accepting` (SIGTERM): from then on nothing is enrolled, repaired or undone,
    /// whatever a reconcile still running does; a ztunnel that took over owns it all.
    stopped: AtomicBool,
    /// Whether `tcp_migrate_req` could not be set somewhere (reported once).
    migration_warned: AtomicBool,
    /// Whether no ztunnel of a release before hand-over support runs any more (checked until
    /// it holds).
    earlier_release_gone: AtomicBool,
}

/// Backoff between enrollment attempts of a pod that fails (no netns yet, say). A pod whose
/// ports an old ztunnel holds is retried at the minimum: it is free the moment that one leaves.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Sockets created inside a pod's netns.
struct InPodSockets {
    cookie: u64,
    outbound: Vec<std::net::TcpListener>,
    inbound: Vec<(IpAddr, ListenerKind, std::net::TcpListener)>,
    /// Whether `tcp_migrate_req` is on in the pod's netns (else why not).
    migration: io::Result<()>,
}

impl InPod {
    pub fn new(proxy: Arc<Proxy>, runtime: Handle) -> Self {
        Self {
            capture: proxy.capture.clone(),
            proxy,
            runtime,
            pods: Mutex::new(BTreeMap::new()),
            last_error: Mutex::new(HashMap::new()),
            retry: Mutex::new(HashMap::new()),
            stopped: AtomicBool::new(false),
            migration_warned: AtomicBool::new(false),
            earlier_release_gone: AtomicBool::new(false),
        }
    }

    pub fn view(&self) -> Vec<EnrolledPodView> {
        self.pods.lock().expect("poisoned").values().map(|p| p.view.clone()).collect()
    }

    /// Whether every enrolled pod's network namespace is still where it was last found: its
    /// path still names the same nsfs inode. One `stat` per pod; while it holds, the last full
    /// scan still tells the truth about them (a namespace is gone once the path its pod was
    /// found through is, and then a full scan decides).
    pub fn enrolled_netns_in_place(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.pods
            .lock()
            .expect("poisoned")
            .values()
            .all(|p| std::fs::metadata(&p.view.netns).is_ok_and(|m| m.ino() == p.view.netns_inode))
    }

    /// After a full scan: names each enrolled pod's namespace by a path that still leads to it
    /// (the process it was found through may have exited while the pod's others hold it).
    pub fn renew_netns_paths(&self, namespaces: &[NetnsRef]) {
        for pod in self.pods.lock().expect("poisoned").values_mut() {
            if let Some(found) = namespaces.iter().find(|n| n.inode == pod.view.netns_inode) {
                pod.view.netns.clone_from(&found.path);
            }
        }
    }

    /// Brings the enrolled set to `desired` (the enrolled workloads of this node). Blocking:
    /// it enters network namespaces; call it from a blocking thread. Returns whether every
    /// pod that can be enrolled is.
    pub fn reconcile(&self, desired: &[Workload], namespaces: &[NetnsRef]) -> bool {
        if self.stopped.load(Ordering::Acquire) {
            return false;
        }
        self.restore_listeners();
        // Once gone it does not come back (a rollback's chart replaces ztunnels old-then-new),
        // so the loaded programs are not listed again every tick.
        if !self.earlier_release_gone.load(Ordering::Acquire) {
            if self.capture.earlier_release_attached() {
                self.report("earlier-release", &EnrollError::EarlierRelease);
                return false;
            }
            self.earlier_release_gone.store(true, Ordering::Release);
            self.last_error.lock().expect("poisoned").remove("earlier-release");
        }
        let (admissible, conflicts) = without_duplicate_ips(desired);
        for conflict in conflicts {
            self.report(&conflict.to_string(), &conflict);
        }
        let wanted: HashMap<&str, &Workload> = admissible.iter().map(|w| (w.uid.as_str(), *w)).collect();

        // Unenroll what is no longer wanted, changed, or whose netns is gone.
        let stale: Vec<String> = {
            let pods = self.pods.lock().expect("poisoned");
            pods.iter()
                .filter(|(uid, pod)| {
                    wanted.get(uid.as_str()).is_none_or(|w| w.ips != pod.workload.ips)
                        || !netns::still_present(pod.view.netns_inode, namespaces)
                })
                .map(|(uid, _)| uid.clone())
                .collect()
        };
        for uid in stale {
            self.unenroll(&uid);
        }

        let now = Instant::now();
        let mut complete = true;
        for workload in admissible {
            if self.pods.lock().expect("poisoned").contains_key(&workload.uid) {
                continue;
            }
            complete = false;
            // A pod that failed recently waits its turn: each attempt may enter every network
            // namespace on the node.
            let due =
                self.retry.lock().expect("poisoned").get(&workload.uid).is_none_or(|(at, _)| now >= *at);
            if !due {
                continue;
            }
            match self.enroll(workload, namespaces) {
                Ok(()) => {
                    self.last_error.lock().expect("poisoned").remove(&workload.uid);
                    self.retry.lock().expect("poisoned").remove(&workload.uid);
                }
                // Waiting for an IP costs nothing: no backoff, so it enrolls as soon as it has one.
                Err(e @ EnrollError::NoIp { .. }) => self.report(&workload.uid, &e),
                Err(e @ EnrollError::ListenersHeld { .. }) => {
                    self.report(&workload.uid, &e);
                    self.retry
                        .lock()
                        .expect("poisoned")
                        .insert(workload.uid.clone(), (now + RETRY_MIN, RETRY_MIN));
                }
                Err(e) => {
                    self.report(&workload.uid, &e);
                    let mut retry = self.retry.lock().expect("poisoned");
                    let backoff =
                        retry.get(&workload.uid).map_or(RETRY_MIN, |(_, b)| (*b * 2).min(RETRY_MAX));
                    retry.insert(workload.uid.clone(), (now + backoff, backoff));
                }
            }
        }
        // Forget the backoff of pods that are gone from the config.
        self.retry.lock().expect("poisoned").retain(|uid, _| wanted.contains_key(uid.as_str()));
        complete
    }

    /// Drain: stop accepting on every pod's listeners (each takes what its queue holds, then
    /// closes), keep everything else — the pinned programs, the enrolled map, the listener-map
    /// entries (a socket's entry goes when it closes): a ztunnel that took over, or the next
    /// one to start, relies on them. Connections already accepted carry on in their own tasks.
    pub fn stop_accepting(&self) {
        let pods = self.pods.lock().expect("poisoned");
        self.stopped.store(true, Ordering::Release);
        for pod in pods.values() {
            pod.stop.send_replace(true);
        }
    }

    /// Puts this ztunnel's inbound listeners back into the listener map where their entries
    /// are missing. An entry goes when its socket closes, and during a hand-over a pod that
    /// both ztunnels enrolled may hold the old one's socket: it is gone when that one exits.
    /// Only missing entries are filled, so two running ztunnels never take turns.
    fn restore_listeners(&self) {
        let pods = self.pods.lock().expect("poisoned");
        if pods.is_empty() || self.stopped.load(Ordering::Acquire) {
            return;
        }
        let registered = self.capture.registered_listeners();
        for pod in pods.values() {
            for (ip, kind, fd) in &pod.inbound_fds {
                if registered.contains(&ListenerKey::new(crate::capture::mapped(*ip), *kind)) {
                    continue;
                }
                // SAFETY: open while the pod is in `pods`, which is locked (see inbound_fds).
                let fd = unsafe { BorrowedFd::borrow_raw(*fd) };
                match self.capture.add_listener(*ip, *kind, &fd) {
                    Ok(()) => info!(pod = pod.view.pod, %ip, ?kind, "listener-map entry restored"),
                    Err(e) => warn!(pod = pod.view.pod, %ip, ?kind, "restoring a listener-map entry: {e}"),
                }
            }
        }
    }

    /// Removes what a previous ztunnel left for pods this one does not enroll. Call once every
    /// pod this one should enroll is enrolled (`reconcile` says so): until then, an entry may
    /// be a pod this one has not managed to enroll yet, still served by the ztunnel it takes
    /// over from, and removing it would let that pod's traffic around the mesh.
    pub fn remove_leftovers(&self) {
        let ours: HashSet<u64> =
            self.pods.lock().expect("poisoned").values().map(|p| p.view.netns_cookie).collect();
        for cookie in self.capture.enrolled_cookies() {
            if !ours.contains(&cookie) {
                info!(netns_cookie = cookie, "removing an enrolled netns left by a previous ztunnel");
                self.capture.unenroll(cookie);
            }
        }
        for cookie in self.capture.pinned_sk_lookup_cookies() {
            if !ours.contains(&cookie) {
                self.capture.detach_sk_lookup(cookie, None);
            }
        }
    }

    fn report(&self, key: &str, error: &EnrollError) {
        let text = error.to_string();
        let mut last = self.last_error.lock().expect("poisoned");
        if last.get(key) != Some(&text) {
            match error {
                EnrollError::NoIp { .. } => info!("{text}"),
                _ => warn!("{text}"),
            }
            last.insert(key.to_string(), text);
        }
    }

    fn enroll(&self, workload: &Workload, namespaces: &[NetnsRef]) -> Result<(), EnrollError> {
        let pod = workload.display_name();
        let first_ip = *workload.ips.first().ok_or_else(|| EnrollError::NoIp { pod: pod.clone() })?;
        let (netns_ref, netns_file) = netns::find_by_ip(first_ip, namespaces)
            .map_err(|source| EnrollError::Netns { pod: pod.clone(), source })?;
        let sockets = open_listeners(&netns_file, &workload.ips).map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                EnrollError::ListenersHeld { pod: pod.clone() }
            } else {
                EnrollError::Listeners { pod: pod.clone(), source }
            }
        })?;
        let cookie = sockets.cookie;
        if let Err(e) = &sockets.migration
            && !self.migration_warned.swap(true, Ordering::Relaxed)
        {
            warn!(
                pod,
                "net.ipv4.tcp_migrate_req could not be set in the pod's netns ({e}): a ztunnel hand-over \
                 may reset connections queued but not yet accepted by the old ztunnel; set it in pods' \
                 namespaces (Linux 5.14+) or let ztunnel write /proc/sys"
            );
        }
        let inbound_fds: Vec<_> =
            sockets.inbound.iter().map(|(ip, kind, listener)| (*ip, *kind, listener.as_raw_fd())).collect();
        let capture_err =
            |source: CaptureError| EnrollError::Capture { pod: pod.clone(), source: Box::new(source) };

        // Listener map first: sk_lookup must find the listeners the moment it is attached.
        let mut keys = Vec::new();
        for (ip, kind, listener) in &sockets.inbound {
            if let Err(e) = self.capture.add_listener(*ip, *kind, listener) {
                self.remove_listener_keys(&keys);
                return Err(capture_err(e));
            }
            keys.push((*ip, *kind));
        }
        let (attachment, link) = match self.capture.attach_sk_lookup(&netns_file, cookie, &netns_ref.path) {
            Ok(x) => x,
            Err(e) => {
                self.remove_listener_keys(&keys);
                return Err(capture_err(e));
            }
        };
        let context = Arc::new(PodContext {
            pod: pod.clone(),
            workload: workload.clone(),
            netns: netns_file,
            netns_cookie: cookie,
            proxy: self.proxy.clone(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let accept_loops = {
            let _guard = self.runtime.enter();
            match proxy::spawn_accept_loops(&context, sockets.outbound, sockets.inbound, &stop_rx) {
                Ok(loops) => loops,
                Err(e) => {
                    self.capture.detach_sk_lookup(cookie, Some(link));
                    self.remove_listener_keys(&keys);
                    return Err(EnrollError::Listeners { pod, source: e });
                }
            }
        };
        // Last: from here on the pod's outbound connects are captured. Not after SIGTERM: the
        // listener map now names sockets about to close, the ztunnel that took over restores.
        let enrolled =
            if self.stopped.load(Ordering::Acquire) { Ok(()) } else { self.capture.enroll(cookie) };
        if let Err(e) = enrolled {
            accept_loops.iter().for_each(JoinHandle::abort);
            self.capture.detach_sk_lookup(cookie, Some(link));
            self.remove_listener_keys(&keys);
            return Err(capture_err(e));
        }
        info!(pod, netns = %netns_ref.path.display(), netns_cookie = cookie, ips = ?workload.ips, "enrolled");
        let view = EnrolledPodView {
            pod,
            uid: workload.uid.clone(),
            ips: workload.ips.clone(),
            netns: netns_ref.path,
            netns_inode: netns_ref.inode,
            netns_cookie: cookie,
            sk_lookup: attachment,
        };
        let mut pods = self.pods.lock().expect("poisoned");
        if self.stopped.load(Ordering::Acquire) {
            // Drain began meanwhile: these listeners close unused, as every other pod's.
            stop.send_replace(true);
            return Ok(());
        }
        pods.insert(
            workload.uid.clone(),
            EnrolledPod {
                view,
                workload: workload.clone(),
                sk_lookup: Some(link),
                listener_keys: keys,
                inbound_fds,
                stop,
            },
        );
        Ok(())
    }

    /// Reverse order of enroll. Connections already relayed keep running in their own tasks.
    fn unenroll(&self, uid: &str) {
        let Some(mut pod) = self.pods.lock().expect("poisoned").remove(uid) else {
            return;
        };
        self.capture.unenroll(pod.view.netns_cookie);
        self.capture.detach_sk_lookup(pod.view.netns_cookie, pod.sk_lookup.take());
        self.remove_listener_keys(&pod.listener_keys);
        // The accept loops take what is queued and close their listeners.
        pod.stop.send_replace(true);
        info!(pod = pod.view.pod, netns_cookie = pod.view.netns_cookie, "unenrolled");
    }

    fn remove_listener_keys(&self, keys: &[(IpAddr, ListenerKind)]) {
        for (ip, kind) in keys {
            self.capture.remove_listener(*ip, *kind);
        }
    }
}

/// Splits out workloads that claim an IP another workload also claims.
fn without_duplicate_ips(desired: &[Workload]) -> (Vec<&Workload>, Vec<EnrollError>) {
    let mut owner: HashMap<IpAddr, &Workload> = HashMap::new();
    let mut conflicted: HashSet<&str> = HashSet::new();
    let mut errors = Vec::new();
    for w in desired {
        for ip in &w.ips {
            if let Some(first) = owner.get(ip) {
                conflicted.insert(first.uid.as_str());
                conflicted.insert(w.uid.as_str());
                errors.push(EnrollError::DuplicateIp {
                    ip: *ip,
                    first: first.display_name(),
                    second: w.display_name(),
                });
            } else {
                owner.insert(*ip, w);
            }
        }
    }
    let admissible = desired.iter().filter(|w| !conflicted.contains(w.uid.as_str())).collect();
    (admissible, errors)
}

fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    // A second ztunnel (a rolling update's new one) binds the same addresses while this one
    // runs; see the module docs.
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Opens ztunnel's listeners inside the pod's netns. The inbound ones are bound to loopback:
/// sk_lookup steers to them whatever they are bound to, and nothing outside the pod reaches
/// them any other way.
fn open_listeners(netns: &File, ips: &[IpAddr]) -> io::Result<InPodSockets> {
    netns::run_in(netns, || {
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let mut outbound = vec![listen(SocketAddr::new(v4, OUTBOUND_PORT))?];
        // IPv6 may be disabled in the pod; then nothing can connect over it either.
        if let Ok(l) = listen(SocketAddr::new(v6, OUTBOUND_PORT)) {
            outbound.push(l);
        }
        let cookie = netns::netns_cookie(&outbound[0])?;
        let migration = netns::enable_request_migration();
        let mut inbound = Vec::new();
        for ip in ips {
            let local = if ip.is_ipv4() { v4 } else { v6 };
            for (kind, port) in
                [(ListenerKind::InboundPlaintext, INBOUND_PLAINTEXT_PORT), (ListenerKind::Hbone, HBONE_PORT)]
            {
                inbound.push((*ip, kind, listen(SocketAddr::new(local, port))?));
            }
        }
        Ok(InPodSockets { cookie, outbound, inbound, migration })
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(uid: &str, ips: &[&str]) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            node: "n".into(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            enrolled: true,
            labels: Default::default(),
            waypoint: None,
        }
    }

    #[test]
    fn pods_claiming_one_ip_are_both_held_back_and_named() {
        let desired =
            [workload("a", &["10.0.0.1"]), workload("b", &["10.0.0.1"]), workload("c", &["10.0.0.2"])];
        let (ok, errors) = without_duplicate_ips(&desired);
        assert_eq!(ok.iter().map(|w| w.uid.as_str()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(errors.len(), 1);
        let msg = errors[0].to_string();
        assert!(msg.contains("default/a") && msg.contains("default/b") && msg.contains("10.0.0.1"), "{msg}");
    }
}
