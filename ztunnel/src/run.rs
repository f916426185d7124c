//! `ztunnel run`: start-up checks, loading capture, the reconcile loop, shutdown.

use std::{
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;
use tracing::{error, info, warn};
use warren_core::{
    model::{NodeConfig, WorkloadIndex},
    policy::Policies,
};

use crate::{
    admin::{self, AdminState, Endpoints},
    capture::{Capture, CaptureSettings},
    certs::{CaSettings, CertManager},
    cgroup,
    config::{Config, LogFormat},
    hbone::Pool,
    inpod::InPod,
    netns,
    proxy::Proxy,
};

pub fn run(config: Config) -> Result<()> {
    // Before any thread exists: every thread returns to this netns after entering a pod's.
    netns::init();
    init_logging(config.log_format);
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(config))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
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
    let capture = Arc::new(Capture::load(&CaptureSettings {
        pin_dir: &pin_dir,
        cgroup2_root: &cgroup_root,
        ztunnel_cgroup_id: cgroup_id,
        mark: config.mark,
        ebpf_debug_logs: tracing::enabled!(target: "warren_capture", tracing::Level::DEBUG),
    })?);
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
    });
    let inpod = Arc::new(InPod::new(proxy.clone(), tokio::runtime::Handle::current()));
    let bind = |addr, what: &'static str| async move {
        TcpListener::bind(addr).await.with_context(|| format!("binding the {what} endpoint {addr}"))
    };
    let admin_listener = bind(config.admin_addr, "admin").await?;
    let metrics_listener = bind(config.metrics_addr, "metrics").await?;
    let readiness_listener = bind(config.readiness_addr, "readiness").await?;
    let state = Arc::new(AdminState {
        config: config.clone(),
        capture: capture.clone(),
        inpod: inpod.clone(),
        proxy: proxy.clone(),
        workloads: Mutex::new(NodeConfig::default()),
        ready: false.into(),
        stream: Default::default(),
    });
    tokio::spawn(admin::serve(admin_listener, state.clone(), Endpoints::Admin));
    tokio::spawn(admin::serve(metrics_listener, state.clone(), Endpoints::Metrics));
    tokio::spawn(admin::serve(readiness_listener, state.clone(), Endpoints::Readiness));
    info!(admin = %config.admin_addr, metrics = %config.metrics_addr, readiness = %config.readiness_addr, "endpoints listening");

    let drain_timeout = Duration::from_secs(config.drain_timeout_secs);
    let reconciler = tokio::spawn(reconcile_loop(config, state.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => info!("interrupted: draining"),
        r = reconciler => bail!("the reconcile loop ended: {r:?}"),
    }
    drain(&state, drain_timeout).await;
    Ok(())
}

/// Stops accepting (new connections of enrolled pods are refused: capture stays pinned and
/// fails closed until a ztunnel returns), then lets open connections finish, up to `timeout`.
async fn drain(state: &AdminState, timeout: Duration) {
    state.ready.store(false, Ordering::Relaxed);
    state.inpod.stop_accepting();
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
    let mut tick = tokio::time::interval(config.reconcile_interval());
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
        let cleanup = first;
        let done = tokio::task::spawn_blocking(move || {
            inpod.reconcile(&desired, &netns::scan());
            if cleanup {
                inpod.remove_leftovers();
            }
        })
        .await;
        if let Err(e) = done {
            error!("reconcile panicked: {e}");
        }
        if first {
            state.ready.store(true, Ordering::Relaxed);
            first = false;
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
fn ensure_bpffs(path: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
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
