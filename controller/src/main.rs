//! Warren's controller: translates Kubernetes objects into the config file ztunnels and
//! waypoints read, and is the mesh CA (`serve`). The objects come from a directory of manifests
//! (local mode, `--dir`) or from a real API server (Kubernetes mode, `--kubernetes`); one
//! translation serves both.

mod analyze;
mod background;
mod ca_service;
mod findings;
mod kube_ca;
mod kube_source;
mod objects;
mod out_file;
mod source;
mod stream;
mod translate;
mod translate_l7;
mod waypoint_binding;

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::findings::{Finding, Severity};

#[derive(Parser)]
#[command(name = "controller", version, about = "Warren's controller")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Translate a manifest directory into the config model (JSON on stdout, or --out).
    Translate {
        /// Directory of Kubernetes YAML (read recursively, multi-document files).
        #[arg(long)]
        dir: PathBuf,
        /// Write the config here (atomically) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Report problems in a manifest directory; exits 1 when any is an error.
    Analyze {
        #[arg(long)]
        dir: PathBuf,
        /// Print findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-translate whenever the objects change, rewriting --out for the ztunnels and
    /// waypoints: from a manifest directory (`--dir`) or a Kubernetes API server
    /// (`--kubernetes`).
    Watch {
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long)]
        out: PathBuf,
        /// Local mode: how often the directory is checked for changes. (Kubernetes mode is told
        /// of changes by the API server; a burst is gathered into one rebuild.)
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
    /// `watch` with the mesh CA: also sign proxies' certificates over HTTPS. Nodes authenticate
    /// with the bootstrap tokens of --tokens; in Kubernetes mode also (or only, without
    /// --tokens) with pod-bound ServiceAccount tokens, checked with a TokenReview: the
    /// ztunnel's for its node, any other pod's (a waypoint's) for that pod's own identity.
    Serve {
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long)]
        out: PathBuf,
        /// Local mode: how often the directory is checked for changes.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
        /// Where the mesh root lives (root-cert.pem, root-key.pem); created on first start.
        /// Kubernetes mode keeps it in Secret warren-system/warren-ca-root instead, unless this
        /// is given.
        #[arg(long, required_unless_present = "kubernetes")]
        ca_dir: Option<PathBuf>,
        /// Node bootstrap tokens: `<node> <token>` per line. Optional in Kubernetes mode, where
        /// proxies authenticate with their pod-bound ServiceAccount token.
        #[arg(long, required_unless_present = "kubernetes")]
        tokens: Option<PathBuf>,
        /// Kubernetes mode: the ztunnel's ServiceAccount (NAMESPACE/NAME). A token bound to a
        /// pod of it speaks for that pod's node (every identity scheduled there); a token bound
        /// to a pod of any other ServiceAccount gets only that pod's own identity.
        #[arg(long, default_value = "warren-system/ztunnel")]
        ztunnel_service_account: kube_ca::ServiceAccountRef,
        /// Where the CA listens.
        #[arg(long, default_value = "127.0.0.1:15012")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Lifetime of the workload certificates it signs.
        #[arg(long, default_value_t = 24 * 3600)]
        cert_lifetime_secs: u64,
        /// Admin endpoint: /debug/proxy-status (which proxies run the latest config) and
        /// /debug/config_dump.
        #[arg(long, default_value = "127.0.0.1:15014")]
        admin: std::net::SocketAddr,
    },
    /// Which proxies are subscribed to a running `serve` and whether they run its latest
    /// config (SYNCED), an older one (STALE) or refused it (NACKED, with their reason).
    ProxyStatus {
        /// The controller's admin endpoint.
        #[arg(long, default_value = "127.0.0.1:15014")]
        admin: std::net::SocketAddr,
        /// Print the JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Subscribes to a running `serve`'s config stream as a proxy would, and prints one JSON
    /// line per update applied (version, time, counts; with --config the whole config): what a
    /// node's ztunnel or a waypoint is being told, for debugging and for the benchmark.
    Subscribe {
        /// The controller's CA / config-stream address.
        #[arg(long, default_value = "127.0.0.1:15012")]
        controller: std::net::SocketAddr,
        /// The mesh root certificate (the controller's identity is checked against it).
        #[arg(long)]
        root: PathBuf,
        /// The token to authenticate with (a node's bootstrap token, or a pod-bound
        /// ServiceAccount token in Kubernetes mode); read on each (re)connect.
        #[arg(long)]
        token_file: PathBuf,
        /// The node to subscribe for.
        #[arg(long)]
        node: String,
        /// Subscribe as this waypoint (NAMESPACE/NAME) instead of as the node's ztunnel.
        #[arg(long)]
        waypoint: Option<String>,
        /// The name shown in `proxy-status` (default `subscribe/<node>`).
        #[arg(long)]
        proxy: Option<String>,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Print each update's whole config, not only its counts.
        #[arg(long)]
        config: bool,
    },
}

/// Where `watch` and `serve` read the Kubernetes objects from: exactly one of `--dir` and
/// `--kubernetes`.
#[derive(clap::Args)]
struct SourceArgs {
    /// Local mode: a directory of Kubernetes YAML (read recursively, multi-document files).
    #[arg(long, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    dir: Option<PathBuf>,
    /// Kubernetes mode: watch Namespaces, Pods, Services, ServiceAccounts, Istio's
    /// VirtualService, DestinationRule, PeerAuthentication and AuthorizationPolicy, and Gateway
    /// API HTTPRoute and Gateway on an API server. Needs the read-only RBAC of
    /// deploy/rbac/controller.yaml.
    #[arg(long)]
    kubernetes: bool,
    /// Kubernetes mode: the kubeconfig to use. Default: $KUBECONFIG, then ~/.kube/config, then
    /// the in-cluster service account.
    // `conflicts_with`, not `requires = "kubernetes"`: a flag's default `false` satisfies
    // `requires`, so it would not catch `--dir D --kubeconfig K`.
    #[arg(long, conflicts_with = "dir")]
    kubeconfig: Option<PathBuf>,
}

/// Kubernetes mode: a change arriving within this long of the last rebuild waits this long for
/// the rest of its burst, which is then rebuilt once; an isolated change is rebuilt at once.
const KUBE_DEBOUNCE: Duration = Duration::from_millis(20);

/// The CA's own identity, which ztunnels expect when they call it.
pub const CA_SERVICE_ACCOUNT: (&str, &str) = ("warren-system", "warren-controller");

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Translate { dir, out } => {
            let (config, findings) = translate_dir(&mut Default::default(), &dir)?;
            let json = serde_json::to_string_pretty(&config)?;
            report(&findings);
            match out {
                Some(path) => out_file::write_atomically(&path, &json)?,
                None => println!("{json}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Analyze { dir, json } => {
            let (_, findings) = translate_dir(&mut Default::default(), &dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&findings)?);
            } else if findings.is_empty() {
                println!("No problems found in {}.", dir.display());
            } else {
                findings.iter().for_each(|f| println!("{f}"));
            }
            let errors = findings.iter().any(|f| f.severity == Severity::Error);
            Ok(if errors { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::Watch { source, out, interval_ms } => match source.dir {
            Some(dir) => watch(&dir, &out, interval_ms, |_| {}),
            None => {
                let runtime =
                    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
                runtime.block_on(watch_kubernetes(source.kubeconfig, out, None, |_| {}))
            }
        },
        Command::ProxyStatus { admin, json } => proxy_status(admin, json),
        Command::Subscribe { controller, root, token_file, node, waypoint, proxy, trust_domain, config } => {
            let kind = match waypoint {
                None => warren_core::config_stream::ProxyKind::Ztunnel,
                Some(w) => {
                    let Some((namespace, name)) = w.split_once('/') else {
                        anyhow::bail!("--waypoint takes NAMESPACE/NAME, not {w:?}");
                    };
                    warren_core::config_stream::ProxyKind::Waypoint {
                        namespace: namespace.into(),
                        name: name.into(),
                    }
                }
            };
            let settings = warren_core::config_stream::ClientSettings::load(
                controller,
                &root,
                &token_file,
                &trust_domain,
                proxy.unwrap_or_else(|| format!("subscribe/{node}")),
                node,
                kind,
            )
            .map_err(anyhow::Error::msg)?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let status = std::sync::Arc::new(std::sync::Mutex::new(Default::default()));
            runtime.block_on(warren_core::config_stream::run_client(settings, status, move |version, c| {
                print_update(version, c, config)
            }));
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            source,
            out,
            interval_ms,
            ca_dir,
            tokens,
            ztunnel_service_account,
            listen,
            trust_domain,
            cert_lifetime_secs,
            admin,
        } => {
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
            let kube_client = match source.kubernetes {
                true => Some(runtime.block_on(kube_ca::connect(source.kubeconfig.as_deref()))?),
                false => None,
            };
            let ca = match (&ca_dir, &kube_client) {
                (Some(dir), _) => {
                    if kube_client.is_some() {
                        eprintln!(
                            "controller: the mesh root is read from --ca-dir {}, not from Secret {}/{}",
                            dir.display(),
                            kube_ca::ROOT_SECRET_NAMESPACE,
                            kube_ca::ROOT_SECRET_NAME
                        );
                    }
                    ca_service::load_or_create_root(dir, &trust_domain)?
                }
                (None, Some(client)) => {
                    runtime.block_on(kube_ca::load_or_create_root(client, &trust_domain))?
                }
                (None, None) => anyhow::bail!("local mode needs --ca-dir"),
            };
            let tokens = match &tokens {
                Some(path) => Some(ca_service::Tokens::parse(
                    &std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
                )),
                None => None,
            };
            let own_identity = warren_core::identity::SpiffeId {
                trust_domain: trust_domain.clone(),
                namespace: CA_SERVICE_ACCOUNT.0.into(),
                service_account: CA_SERVICE_ACCOUNT.1.into(),
            };
            let own = ca.issue(&own_identity, Duration::from_secs(365 * 24 * 3600))?;
            let mut tls = warren_core::tls::server_config_without_client_auth(&own)?;
            // HTTP/1.1 for the CA, h2 for the config stream, on the one port.
            tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let tls = std::sync::Arc::new(tls);
            // The CA reads the pods the Kubernetes watch holds, once it has started.
            let watched_pods = std::sync::Arc::new(std::sync::OnceLock::new());
            let reviewer = kube_client.map(|client| {
                eprintln!(
                    "controller: CA accepts pod-bound ServiceAccount tokens (TokenReview): {}'s for \
                     its pod's node, any other pod's for its own identity",
                    ztunnel_service_account.username()
                );
                kube_ca::TokenReviewer::new(client, ztunnel_service_account, watched_pods.clone())
            });
            let config = std::sync::Arc::new(std::sync::RwLock::new(Default::default()));
            // The CA and the config stream authenticate proxies the same way.
            let auth = std::sync::Arc::new(ca_service::Authenticator { tokens, reviewer });
            let hub = stream::Hub::new(auth.clone());
            let service = std::sync::Arc::new(ca_service::CaService {
                ca,
                auth,
                trust_domain,
                lifetime: Duration::from_secs(cert_lifetime_secs),
                config: config.clone(),
            });
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind(listen))
                .with_context(|| format!("binding {listen}"))?;
            eprintln!("controller: CA listening on {listen} as {own_identity}");
            runtime.spawn(ca_service::serve(listener, tls, service, Some(hub.clone())));
            let admin_listener = runtime
                .block_on(tokio::net::TcpListener::bind(admin))
                .with_context(|| format!("binding the admin endpoint {admin}"))?;
            runtime.spawn(stream::serve_admin(admin_listener, hub.clone()));
            eprintln!("controller: config stream on {listen} (h2), admin on {admin}");
            let apply = |c: std::sync::Arc<warren_core::model::NodeConfig>| {
                hub.publish(c.clone());
                let replaced = std::mem::replace(&mut *config.write().expect("poisoned"), c);
                background::drop_later(replaced);
            };
            match source.dir {
                Some(dir) => watch(&dir, &out, interval_ms, apply),
                None => runtime.block_on(watch_kubernetes(source.kubeconfig, out, Some(watched_pods), apply)),
            }
        }
    }
}

/// `controller proxy-status`: asks a running controller's admin endpoint.
fn proxy_status(admin: std::net::SocketAddr, json: bool) -> Result<ExitCode> {
    use std::io::{Read, Write};
    let mut tcp =
        std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(3)).with_context(|| {
            format!("connecting to the controller's admin endpoint {admin} (is `controller serve` running?)")
        })?;
    write!(tcp, "GET /debug/proxy-status HTTP/1.0\r\nHost: {admin}\r\n\r\n")?;
    let mut text = String::new();
    tcp.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let view: stream::StatusView =
        serde_json::from_str(body).with_context(|| format!("unexpected answer from {admin}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", stream::render_status(&view));
    }
    Ok(if view.proxies.iter().all(|p| p.state == "SYNCED") { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// One line per applied update, flushed at once (a reader times its arrival).
fn print_update(version: &str, c: &warren_core::model::NodeConfig, whole: bool) {
    use std::io::Write;
    let applied_unix_ms =
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let mut line = serde_json::json!({
        "version": version,
        "appliedUnixMs": applied_unix_ms,
        "workloads": c.workloads.len(),
        "services": c.services.len(),
        "authorizations": c.authorizations.len(),
        "peerAuthentications": c.peer_authentications.len(),
        "virtualServices": c.routing.virtual_services.len(),
        "destinationRules": c.routing.destination_rules.len(),
        "l7Authorizations": c.routing.authorizations.len(),
    });
    if whole {
        line["config"] = serde_json::to_value(c).unwrap_or_default();
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Re-translates `dir` whenever it changes, writing `out` and handing the config to `apply`.
fn watch(
    dir: &std::path::Path,
    out: &std::path::Path,
    interval_ms: u64,
    apply: impl Fn(std::sync::Arc<warren_core::model::NodeConfig>),
) -> Result<ExitCode> {
    let mut last = None;
    let mut reader = source::DirReader::default();
    let out_file = out_file::OutFile::spawn(out.to_path_buf());
    let mut last_findings: Vec<String> = Vec::new();
    let mut stamp_error: Option<String> = None;
    loop {
        let stamp = match dir_stamp(dir) {
            Ok(stamp) => stamp,
            // At start, a directory that cannot be read is a mistake to report and stop on.
            Err(e) if last.is_none() => return Err(e),
            // Later it is transient (out of file descriptors, the directory being replaced):
            // the proxies keep the last config, and the directory is read again.
            Err(e) => {
                let message = format!("{e:#}");
                if stamp_error.as_ref() != Some(&message) {
                    eprintln!("controller: {message}; keeping the last config, trying again");
                    stamp_error = Some(message);
                }
                std::thread::sleep(Duration::from_millis(interval_ms.max(10)));
                continue;
            }
        };
        stamp_error = None;
        if last.as_ref() != Some(&stamp) {
            let started = std::time::Instant::now();
            match translate_dir(&mut reader, dir) {
                Ok((config, findings)) => {
                    let config = std::sync::Arc::new(config);
                    apply(config.clone());
                    eprintln!(
                        "controller: {} translated and published in {} ms",
                        dir.display(),
                        started.elapsed().as_millis()
                    );
                    // Findings are reported when they change, not again on every edit.
                    let rendered: Vec<String> = findings.iter().map(ToString::to_string).collect();
                    if rendered != last_findings {
                        report(&findings);
                        last_findings = rendered;
                    }
                    out_file.write(config);
                }
                Err(e) => eprintln!("controller: {e:#}; keeping the last config"),
            }
            last = Some(stamp);
        }
        std::thread::sleep(Duration::from_millis(interval_ms.max(10)));
    }
}

/// Kubernetes mode: follows the API server until a fatal error (which names what to fix).
async fn watch_kubernetes(
    kubeconfig: Option<PathBuf>,
    out: PathBuf,
    share_pods: Option<kube_source::SharedPods>,
    apply: impl FnMut(std::sync::Arc<warren_core::model::NodeConfig>),
) -> Result<ExitCode> {
    let options = kube_source::Options { kubeconfig, out, debounce: KUBE_DEBOUNCE, share_pods };
    kube_source::run(options, apply).await?;
    Ok(ExitCode::SUCCESS)
}

fn translate_dir(
    reader: &mut source::DirReader,
    dir: &std::path::Path,
) -> Result<(warren_core::model::NodeConfig, Vec<Finding>)> {
    let (snapshot, mut findings) =
        reader.read(dir).with_context(|| format!("reading manifests in {}", dir.display()))?;
    let (config, more) = translate_snapshot(&snapshot);
    findings.extend(more);
    Ok((config, findings))
}

/// The translation and analysis both sources share.
fn translate_snapshot(snapshot: &objects::Snapshot) -> (warren_core::model::NodeConfig, Vec<Finding>) {
    let (config, mut findings) = translate::translate(snapshot);
    findings.extend(analyze::analyze(snapshot));
    (config, findings)
}

fn report(findings: &[Finding]) {
    for f in findings {
        eprintln!("controller: {f}");
    }
}

/// Names, sizes and modification times of the directory's files: changes when any file does.
fn dir_stamp(dir: &std::path::Path) -> Result<Vec<(PathBuf, u64, SystemTime)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                out.push((entry.path(), meta.len(), meta.modified()?));
            }
        }
    }
    out.sort();
    Ok(out)
}
