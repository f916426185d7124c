//! `ztunnel run`: start-up checks, loading capture, the reconcile loop, shutdown.

use std::{
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;
use tracing::{error, info, warn};
use warren_core::{
    accept::{Handshakes, MAX_HANDSHAKES_PER_SOURCE},
    endpoints::Endpoints,
    model::{NodeConfig, Workload, WorkloadIndex},
    policy::Policies,
};

use crate::{
    admin::{self, AdminState},
    capture::{self, Capture, CaptureSettings},
    certs::{CaSettings, CertManager},
    cgroup,
    config::Config,
    hbone::Pool,
    inpod::InPod,
    netns::{self, NetnsRef},
    proxy::Proxy,
};

pub fn run(config: Config) -> Result<()> {
    // Before any thread exists: every thread returns to this netns after entering a pod's.
    netns::init();
    warren_core::logging::init(config.log_format);
    raise_open_file_limit();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        builder.worker_threads(config.worker_threads);
    }
    let runtime = builder.enable_all().build()?;
    let result = runtime.block_on(serve(config));
    warren_core::logging::flush();
    result
}

async fn serve(config: Config) -> Result<()> {
    let cgroup_root = match &config.cgroup2_root {
        Some(root) => root.clone(),
        None => cgroup::find_cgroup2_mount()?,
    };
    if let Some(own) = &config.own_cgroup {
        cgroup::move_self_into(&cgroup_root, own)?;
    }
    let own_cgroup = cgroup::own_cgroup_path()?;
    let cgroup_id = cgroup::cgroup_id(&cgroup_root, &own_cgroup)?;
    ensure_bpffs(&config.bpffs)?;

    let pin_dir = config.pin_dir();
    if capture::earlier_release_pinned(&pin_dir)
        && address_held(config.admin_addr)
        && !stand_by(&config).await?
    {
        return Ok(());
    }
    let capture = Arc::new(Capture::load(&CaptureSettings {
        pin_dir: &pin_dir,
        cgroup2_root: &cgroup_root,
        mark: config.mark,
        ebpf_debug_logs: tracing::enabled!(target: "warren_capture", tracing::Level::DEBUG),
    })?);
    // Before this ztunnel opens any socket in a pod. Undone when `serve` returns, whichever way.
    let _exemption = Exemption { instance: capture.exempt(cgroup_id)?, capture: capture.clone(), cgroup_id };
    capture.set_probe_sources(&config.probe_sources)?;
    for a in capture.cgroup_attachments() {
        info!(program = a.program, program_id = a.program_id, link_id = a.link_id, attach_point = a.attach_point, pin = %a.pin.display(), "attached");
    }
    info!(
        node = config.node_name,
        cgroup = own_cgroup,
        cgroup_id,
        mark = config.mark,
        "capture loaded; ztunnel's own sockets are exempt"
    );

    let ca = CaSettings {
        ca_addr: config.ca_addr,
        ca_root: config.ca_root.clone(),
        ca_token_file: config.ca_token_file.clone(),
        dev_ca_dir: config.dev_ca_dir.clone(),
        dev_cert_lifetime: Duration::from_secs(config.cert_lifetime_secs),
        trust_domain: config.trust_domain.clone(),
    };
    let certs = match ca.cert_manager()? {
        Some(certs) => certs,
        None => {
            warn!("no CA configured: enrolled pods can reach only destinations outside the mesh");
            CertManager::new(None, None)
        }
    };
    let proxy = Arc::new(Proxy {
        capture: capture.clone(),
        certs,
        pool: Pool::new(config.pool_max_streams, Duration::from_secs(config.pool_idle_timeout_secs)),
        index: Default::default(),
        policies: Default::default(),
        tracker: Default::default(),
        metrics: Default::default(),
        round_robin: Default::default(),
        stats: Default::default(),
        mark: config.mark,
        trust_domain: config.trust_domain.clone(),
        connect_timeout: Duration::from_millis(config.connect_timeout_ms),
        draining: tokio::sync::watch::Sender::new(false),
        handshakes: Handshakes::new(MAX_HANDSHAKES_PER_SOURCE),
    });
    let inpod = Arc::new(InPod::new(proxy.clone(), tokio::runtime::Handle::current()));
    let state = Arc::new(AdminState {
        config: config.clone(),
        capture: capture.clone(),
        inpod: inpod.clone(),
        proxy: proxy.clone(),
        workloads: Mutex::new(NodeConfig::default()),
        ready: false.into(),
        stream: Default::default(),
    });
    for (addr, endpoints) in [
        (config.admin_addr, Endpoints::Admin),
        (config.metrics_addr, Endpoints::Metrics),
        (config.readiness_addr, Endpoints::Readiness),
    ] {
        match listen_shared(addr) {
            Ok(listener) => {
                tokio::spawn(admin::serve(listener, state.clone(), endpoints));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                warn!(%addr, "another process holds the {endpoints:?} endpoint's address without sharing it (a ztunnel of a release before hand-over support, during an upgrade): serving it once that one leaves");
                tokio::spawn(serve_when_free(addr, state.clone(), endpoints));
            }
            Err(e) => return Err(e).with_context(|| format!("binding the {endpoints:?} endpoint {addr}")),
        }
    }
    if let Some(path) = &config.readiness_socket {
        let listener = admin::bind_unix(path)
            .with_context(|| format!("binding the readiness socket {}", path.display()))?;
        let state = state.clone();
        tokio::spawn(admin::serve_unix(listener, move || state.ready.load(Ordering::Relaxed)));
    }
    info!(admin = %config.admin_addr, metrics = %config.metrics_addr, readiness = %config.readiness_addr, readiness_socket = ?config.readiness_socket, "endpoints listening");

    let drain_timeout = Duration::from_secs(config.drain_timeout_secs);
    let mut reconciler = tokio::spawn(reconcile_loop(config, state.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => info!("interrupted: draining"),
        r = &mut reconciler => bail!("the reconcile loop ended: {r:?}"),
    }
    // No enrolling or unenrolling while draining: in a rolling update the new ztunnel owns
    // the pods now, and an old one enrolling a pod would point its inbound at a listener about
    // to close. (A reconcile already running is held back by `InPod::stop_accepting`.)
    reconciler.abort();
    drain(&state, drain_timeout).await;
    Ok(())
}

/// Waits, capture not loaded, while a ztunnel of a release before hand-over support runs on this
/// node (a rolling update from it starts this one beside it). Its programs exempt only its own
/// cgroup: attached beside them, this one's would capture that one's connections out of pods,
/// and that one's would capture this one's. So this one stands by — ready, so that the
/// DaemonSet goes on and terminates the other — and starts once the other has exited: it held
/// the admin address without sharing it. Meanwhile the other serves the node as before; after
/// it, the pinned programs fail closed until this one has loaded and enrolled (moments).
/// Returns false when told to terminate meanwhile (nothing loaded, nothing to drain).
async fn stand_by(config: &Config) -> Result<bool> {
    warn!(admin = %config.admin_addr, "a ztunnel of a release before hand-over support still runs on this node: standing by (ready, capture not loaded) until it exits");
    let responder = match &config.readiness_socket {
        Some(path) => {
            let listener = admin::bind_unix(path)
                .with_context(|| format!("binding the readiness socket {}", path.display()))?;
            Some(tokio::spawn(admin::serve_unix(listener, || true)))
        }
        None => None,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = term.recv() => {
                info!("SIGTERM while standing by: nothing loaded, nothing to drain");
                return Ok(false);
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if !address_held(config.admin_addr) {
            break;
        }
    }
    if let Some(responder) = responder {
        responder.abort();
    }
    info!("the earlier ztunnel has exited: taking over");
    Ok(true)
}

/// Whether a socket that does not share its address holds `addr` on this node.
fn address_held(addr: std::net::SocketAddr) -> bool {
    matches!(listen_shared(addr), Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
}

/// Removes this ztunnel's cgroup from the exempt set when `serve` ends (not if the process is
/// killed: see `Capture::exempt` for why a left entry is harmless and how it goes).
struct Exemption {
    capture: Arc<Capture>,
    cgroup_id: u64,
    instance: warren_ebpf_types::ZtunnelInstance,
}

impl Drop for Exemption {
    fn drop(&mut self) {
        self.capture.unexempt(self.cgroup_id, &self.instance);
    }
}

/// A listener on the node that a second ztunnel can share during a rolling update
/// (`SO_REUSEPORT`): either may answer until the old one exits. The readiness probe must not
/// be answered by the other one, so the chart probes `--readiness-socket` instead.
fn listen_shared(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Binds `addr` once the process holding it lets go, then serves it.
async fn serve_when_free(addr: std::net::SocketAddr, state: Arc<AdminState>, endpoints: Endpoints) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match listen_shared(addr) {
            Ok(listener) => {
                info!(%addr, "{endpoints:?} endpoint listening");
                return admin::serve(listener, state, endpoints).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => {
                error!(%addr, "binding the {endpoints:?} endpoint: {e}");
                return;
            }
        }
    }
}

/// Stops accepting, then lets open connections finish, up to `timeout`. With no other ztunnel
/// on the node, new connections of enrolled pods are refused meanwhile (capture stays pinned
/// and fails closed until one returns); with one that took over, they go to it. Nothing this
/// ztunnel set up is undone: the pins, the enrolled map and the other ztunnel's exemption and
/// listener-map entries stay.
async fn drain(state: &AdminState, timeout: Duration) {
    state.ready.store(false, Ordering::Relaxed);
    state.inpod.stop_accepting();
    state.proxy.draining.send_replace(true);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let open = state.proxy.metrics.open_connections();
        if open == 0 {
            info!("drained: no connection open");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(open, "drain timeout: closing the remaining connections");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the config comes from: a file re-read when it changes, or the controller's stream
/// (whose client task drops each accepted version here).
enum Source {
    File { path: std::path::PathBuf, last_seen: Option<SystemTime> },
    Stream(Arc<Mutex<Option<NodeConfig>>>),
}

impl Source {
    /// A new config if there is one; errors are reported by the caller.
    fn poll(&mut self, first: bool) -> Option<Result<NodeConfig>> {
        match self {
            Source::File { path, last_seen } => {
                let modified = std::fs::metadata(&*path).and_then(|m| m.modified()).ok();
                if modified == *last_seen && !first {
                    return None;
                }
                let read = read_workloads(path);
                if read.is_ok() {
                    *last_seen = modified;
                }
                Some(read)
            }
            Source::Stream(slot) => slot.lock().expect("poisoned").take().map(Ok),
        }
    }
}

/// Starts the config-stream client when `--controller` is set.
fn config_source(config: &Config, state: &Arc<AdminState>) -> Result<Source> {
    let (Some(addr), Some(root), Some(token)) = (config.controller, &config.ca_root, &config.ca_token_file)
    else {
        let path = config.workloads_file.clone().context("--workloads or --controller is required")?;
        return Ok(Source::File { path, last_seen: None });
    };
    let settings = warren_core::config_stream::ClientSettings::load(
        addr,
        root,
        token,
        &config.trust_domain,
        format!("ztunnel/{}", config.node_name),
        config.node_name.clone(),
        warren_core::config_stream::ProxyKind::Ztunnel,
    )
    .map_err(anyhow::Error::msg)?;
    let slot = Arc::new(Mutex::new(None));
    let deliver = {
        let slot = slot.clone();
        move |_version: &str, config: &NodeConfig| *slot.lock().expect("poisoned") = Some(config.clone())
    };
    info!(controller = %addr, "config from the controller's stream");
    tokio::spawn(warren_core::config_stream::run_client(settings, state.stream.clone(), deliver));
    Ok(Source::Stream(slot))
}

/// Takes new configs from the source and brings the enrolled pods in line, checking every
/// tick that the pods' network namespaces still exist.
async fn reconcile_loop(config: Config, state: Arc<AdminState>) {
    let mut source = match config_source(&config, &state) {
        Ok(s) => s,
        Err(e) => {
            error!("{e:#}");
            return;
        }
    };
    let mut last_error = String::new();
    let mut first = true;
    let mut leftovers_removed = false;
    let mut tick = tokio::time::interval(config.reconcile_interval());
    // The last full scan of the node's network namespaces, and what the last tick wanted
    // enrolled and whether it all was: a tick with nothing new reuses the scan.
    let mut scanned: Option<(Vec<NetnsRef>, Instant)> = None;
    let mut last_desired: Vec<Workload> = Vec::new();
    let mut all_enrolled = false;
    loop {
        tick.tick().await;
        match source.poll(first) {
            Some(Ok(workloads)) => {
                let policies = Arc::new(Policies {
                    root_namespace: workloads.root_namespace.clone(),
                    authorizations: workloads.authorizations.clone(),
                    peer_authentications: workloads.peer_authentications.clone(),
                });
                let index = Arc::new(WorkloadIndex::new(&workloads));
                state.proxy.tracker.reevaluate(&policies, &index);
                state.proxy.round_robin.prune(&index);
                *state.proxy.policies.write().expect("poisoned") = policies;
                *state.proxy.index.write().expect("poisoned") = index;
                *state.workloads.lock().expect("poisoned") = workloads;
                last_error.clear();
            }
            Some(Err(e)) => {
                let text = format!("{e:#}");
                if text != last_error {
                    error!("{text}; keeping the last good workloads");
                    last_error = text;
                }
            }
            None => {}
        }
        let desired: Vec<_> =
            state.workloads.lock().expect("poisoned").enrolled_on(&config.node_name).cloned().collect();
        let inpod = state.inpod.clone();
        let cleanup = !leftovers_removed;
        let desired_changed = desired != last_desired;
        let last_scan = scanned.take();
        let done = tokio::task::spawn_blocking(move || {
            let since = last_scan.as_ref().map(|(_, at)| at.elapsed());
            let rescan =
                full_scan_needed(desired_changed, all_enrolled, since, || inpod.enrolled_netns_in_place());
            let scan = match last_scan {
                Some(last) if !rescan => last,
                _ => {
                    let namespaces = netns::scan();
                    inpod.renew_netns_paths(&namespaces);
                    (namespaces, Instant::now())
                }
            };
            let complete = inpod.reconcile(&desired, &scan.0);
            if cleanup && complete {
                inpod.remove_leftovers();
            }
            (complete, scan, desired)
        })
        .await;
        match done {
            Ok((complete, scan, desired)) => {
                leftovers_removed |= complete;
                all_enrolled = complete;
                scanned = Some(scan);
                last_desired = desired;
            }
            Err(e) => error!("reconcile panicked: {e}"),
        }
        if first {
            state.ready.store(true, Ordering::Relaxed);
            first = false;
        }
    }
}

/// A full scan (every /proc/*/ns/net and /var/run/netns: thousands of `stat`s on a busy node)
/// is needed at least this often even when nothing seems to have changed.
const FULL_SCAN_AT_LEAST_EVERY: Duration = Duration::from_secs(10);

/// Whether a reconcile tick must scan the node's network namespaces afresh rather than reuse
/// the last scan: first of all; when the pods to enroll changed (a new pod's namespace must be
/// found); while some pod is not enrolled yet (its namespace may appear); when an enrolled
/// pod's namespace is no longer where it was found (gone, or its sandbox replaced); and at
/// least every [`FULL_SCAN_AT_LEAST_EVERY`]. `enrolled_in_place` is asked last: it stats every
/// enrolled pod's namespace.
fn full_scan_needed(
    desired_changed: bool,
    all_enrolled: bool,
    since_last: Option<Duration>,
    enrolled_in_place: impl FnOnce() -> bool,
) -> bool {
    match since_last {
        None => true,
        Some(age) => {
            desired_changed || !all_enrolled || age >= FULL_SCAN_AT_LEAST_EVERY || !enrolled_in_place()
        }
    }
}

fn read_workloads(path: &Path) -> Result<NodeConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the workloads file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("workloads file {}", path.display()))
}

/// Every proxied connection holds two sockets; the usual soft limit of 1024 would cap a node
/// at a few hundred connections. Raise it to the hard limit, as Envoy and Istio's ztunnel do.
fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Mounts the BPF filesystem at `path` if something else is there (or nothing).
///
/// The look and the mount hold a lock on the parent directory: two ztunnels starting at once
/// on a node without it (or two test clusters) would otherwise both mount, and the second
/// mount hides the first, with whatever the first ztunnel already made there.
fn ensure_bpffs(path: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    let lock = std::fs::File::open(parent).with_context(|| format!("opening {}", parent.display()))?;
    // SAFETY: flock on a descriptor we own; released when `lock` closes.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        bail!(
            "locking {} to mount the BPF filesystem: {}",
            parent.display(),
            std::io::Error::last_os_error()
        );
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: c_path is a valid C string; statfs writes into `buf`.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } == 0 && buf.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    info!(path = %path.display(), "mounting the BPF filesystem");
    let fstype = c"bpf";
    // SAFETY: valid C strings; no data argument.
    if unsafe { libc::mount(fstype.as_ptr(), c_path.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) } != 0 {
        bail!(
            "mounting the BPF filesystem at {} failed: {} (ztunnel pins its maps and links there; mount it: mount -t bpf bpf {})",
            path.display(),
            std::io::Error::last_os_error(),
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mounts of the filesystem at `path`, from this process's mount table.
    fn mounts_at(path: &Path) -> usize {
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let wanted = path.to_str().unwrap();
        table.lines().filter(|line| line.split(' ').nth(4) == Some(wanted)).count()
    }

    #[test]
    fn ztunnels_starting_at_once_mount_the_bpf_filesystem_once() {
        // Needs root (mount); a user without it has nothing to race.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("warren-bpffs-race-{}", std::process::id()));
        let path = dir.join("bpf");
        std::fs::create_dir_all(&path).unwrap();
        let starting = std::sync::Barrier::new(8);
        let results: Vec<_> = std::thread::scope(|s| {
            let starts: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        starting.wait();
                        ensure_bpffs(&path).map_err(|e| e.to_string())
                    })
                })
                .collect();
            starts.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let mounted = mounts_at(&path);
        for _ in 0..mounted {
            let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
            unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(mounted, 1, "eight ztunnels at once mounted the BPF filesystem {mounted} times");
    }

    #[test]
    fn the_namespaces_are_scanned_afresh_only_when_something_may_have_changed() {
        let recent = Some(Duration::from_secs(1));
        let in_place = || true;
        // Nothing new: the last scan is reused, after checking the enrolled pods' namespaces.
        let mut asked = false;
        assert!(!full_scan_needed(false, true, recent, || {
            asked = true;
            true
        }));
        assert!(asked, "the enrolled pods' namespaces are checked");
        // Each reason alone forces a scan.
        assert!(full_scan_needed(false, true, None, in_place), "first tick");
        assert!(full_scan_needed(true, true, recent, in_place), "the pods to enroll changed");
        assert!(full_scan_needed(false, false, recent, in_place), "a pod is waiting to be enrolled");
        assert!(full_scan_needed(false, true, recent, || false), "an enrolled pod's namespace moved");
        assert!(
            full_scan_needed(false, true, Some(FULL_SCAN_AT_LEAST_EVERY), in_place),
            "the last scan is old"
        );
        // The stats are skipped when a cheaper reason already decided.
        assert!(full_scan_needed(true, true, recent, || panic!("not needed")));
    }
}
