//! Start-up, the config reload loop, and draining on SIGTERM.

use std::{
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;
use tracing::{error, info, warn};
use warren_core::{certs::CaSettings, endpoints::Endpoints, model::NodeConfig};

use crate::{
    admin,
    config::Config,
    hbone::HboneClient,
    state::{Snapshot, WaypointState},
    upstream::Clusters,
};

pub fn run(config: Config) -> Result<()> {
    warren_core::logging::init(config.log_format);
    // 0: one worker per CPU this process may run on (its affinity and cgroup quota).
    let workers = match config.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    // One worker: a single-threaded runtime (no work stealing, no cross-thread wake-ups), as an
    // Envoy with --concurrency 1 runs one event loop.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = builder.enable_all().build()?;
    let result = runtime.block_on(serve(config));
    warren_core::logging::flush();
    result
}

async fn serve(config: Config) -> Result<()> {
    let ca = CaSettings {
        ca_addr: config.ca_addr,
        ca_root: config.ca_root.clone(),
        ca_token_file: config.ca_token_file.clone(),
        dev_ca_dir: config.dev_ca_dir.clone(),
        dev_cert_lifetime: Duration::from_secs(config.cert_lifetime_secs),
        trust_domain: config.trust_domain.clone(),
    };
    let Some(certs) = ca.cert_manager()? else {
        bail!(
            "no CA configured: a waypoint speaks only HBONE and needs a certificate; pass --ca-addr with --ca-root and --ca-token-file (or --dev-ca-dir for development)"
        );
    };
    let identity = warren_core::identity::SpiffeId {
        trust_domain: config.trust_domain.clone(),
        namespace: config.namespace.clone(),
        service_account: config.service_account().to_string(),
    };
    let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
    let clusters = Clusters::new(HboneClient::new(certs.clone(), identity, connect_timeout));
    let exporter = config.tracing_collector.map(|collector| {
        info!(%collector, sampling_percent = config.tracing_sampling, "exporting spans over OTLP/HTTP");
        crate::trace::Exporter::start(collector, format!("{}.{}", config.name, config.namespace))
    });
    let state = WaypointState::new(config.clone(), certs, clusters, exporter);
    let bind = |addr, what: &'static str| async move {
        TcpListener::bind(addr).await.with_context(|| format!("binding the {what} endpoint {addr}"))
    };
    let hbone = bind(config.hbone_addr, "HBONE").await?;
    let admin_listener = bind(config.admin_addr, "admin").await?;
    let metrics_listener = bind(config.metrics_addr, "metrics").await?;
    let readiness_listener = bind(config.readiness_addr, "readiness").await?;
    tokio::spawn(admin::serve(admin_listener, state.clone(), Endpoints::Admin));
    tokio::spawn(admin::serve(metrics_listener, state.clone(), Endpoints::Metrics));
    tokio::spawn(admin::serve(readiness_listener, state.clone(), Endpoints::Readiness));

    // The certificate first: a waypoint without one cannot accept anything.
    let cert = state.certs.get(&state.identity).await.context("the waypoint's certificate")?;
    info!(identity = %state.identity, not_after = ?cert.not_after, "certificate issued");
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(crate::inbound::serve(hbone, state.clone(), drain_rx));
    // Pooled upstream connections past their DestinationRule's idleTimeout close.
    let pools = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            pools.clusters.close_idle();
        }
    });
    info!(name = config.name, namespace = config.namespace, hbone = %config.hbone_addr, admin = %config.admin_addr, metrics = %config.metrics_addr, "waypoint listening");

    let reloader = match (config.controller, &config.config_file) {
        (Some(addr), _) => {
            let settings = warren_core::config_stream::ClientSettings::load(
                addr,
                config.ca_root.as_deref().context("--controller needs --ca-root")?,
                config.ca_token_file.as_deref().context("--controller needs --ca-token-file")?,
                &config.trust_domain,
                format!(
                    "waypoint/{}/{}/{}",
                    config.namespace,
                    config.name,
                    config.node.clone().unwrap_or_default()
                ),
                config.node.clone().context("--controller needs --node")?,
                warren_core::config_stream::ProxyKind::Waypoint {
                    namespace: config.namespace.clone(),
                    name: config.name.clone(),
                },
            )
            .map_err(anyhow::Error::msg)?;
            let target = state.clone();
            let deliver = move |version: &str, config: &warren_core::model::NodeConfig| {
                let snapshot = Snapshot::new(config.clone());
                for e in &snapshot.routes.errors {
                    error!(route = e.route, "{}", e.error);
                }
                info!(version, "config loaded from the controller");
                target.set_snapshot(snapshot);
                target.ready.store(true, Ordering::Relaxed);
            };
            info!(controller = %addr, "config from the controller's stream");
            tokio::spawn(warren_core::config_stream::run_client(settings, state.stream.clone(), deliver))
        }
        (None, Some(path)) => tokio::spawn(reload_loop(state.clone(), path.clone())),
        (None, None) => bail!("--config or --controller is required"),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => info!("interrupted: draining"),
        r = reloader => bail!("the config loop ended: {r:?}"),
    }
    state.ready.store(false, Ordering::Relaxed);
    let _ = drain_tx.send(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(config.drain_timeout_secs);
    loop {
        let open = state.open_streams.load(Ordering::Relaxed);
        if open == 0 {
            info!("drained: no stream open");
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(open, "drain timeout: closing the remaining streams");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Re-reads the config file when it changes; a bad file keeps the last good config.
async fn reload_loop(state: Arc<WaypointState>, path: std::path::PathBuf) {
    let mut last_seen: Option<SystemTime> = None;
    let mut last_error = String::new();
    let mut tick = tokio::time::interval(state.config.reload_interval());
    loop {
        tick.tick().await;
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified == last_seen {
            continue;
        }
        match read_config(&path) {
            Ok(config) => {
                let snapshot = Snapshot::new(config);
                for e in &snapshot.routes.errors {
                    error!(route = e.route, "{}", e.error);
                }
                let served = snapshot
                    .config
                    .services
                    .iter()
                    .filter(|s| s.is_served_by(&state.config.namespace, &state.config.name))
                    .count();
                info!(
                    services = served,
                    virtual_services = snapshot.config.routing.virtual_services.len(),
                    destination_rules = snapshot.config.routing.destination_rules.len(),
                    authorizations = snapshot.config.routing.authorizations.len(),
                    "config loaded"
                );
                state.set_snapshot(snapshot);
                state.ready.store(true, Ordering::Relaxed);
                last_seen = modified;
                last_error.clear();
            }
            Err(e) => {
                let text = format!("{e:#}");
                if text != last_error {
                    error!("{text}; keeping the last good config");
                    last_error = text;
                }
            }
        }
    }
}

fn read_config(path: &Path) -> Result<NodeConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("config file {}", path.display()))
}
