//! Warren's controller. Today: local mode's translation and analysis over a directory of
//! Kubernetes manifests, written as the config file ztunnels read. The Kubernetes watcher, the
//! config stream and the CA service come next (see the controller issue).

mod analyze;
mod ca_service;
mod findings;
mod objects;
mod source;
mod translate;
mod translate_l7;

use std::{path::PathBuf, process::ExitCode, time::Duration};

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
    /// Local mode: re-translate whenever a manifest changes, rewriting --out for the ztunnels.
    Watch {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// How often the directory is checked for changes.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
    /// Local mode with the mesh CA: `watch`, and sign ztunnels' certificates over HTTPS.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
        /// Where the mesh root lives (root-cert.pem, root-key.pem); created on first start.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Node bootstrap tokens: `<node> <token>` per line.
        #[arg(long)]
        tokens: PathBuf,
        /// Where the CA listens.
        #[arg(long, default_value = "127.0.0.1:15012")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Lifetime of the workload certificates it signs.
        #[arg(long, default_value_t = 24 * 3600)]
        cert_lifetime_secs: u64,
    },
}

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
            let (config, findings) = translate_dir(&dir)?;
            let json = serde_json::to_string_pretty(&config)?;
            report(&findings);
            match out {
                Some(path) => write_atomically(&path, &json)?,
                None => println!("{json}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Analyze { dir, json } => {
            let (_, findings) = translate_dir(&dir)?;
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
        Command::Watch { dir, out, interval_ms } => watch(&dir, &out, interval_ms, |_| {}),
        Command::Serve {
            dir,
            out,
            interval_ms,
            ca_dir,
            tokens,
            listen,
            trust_domain,
            cert_lifetime_secs,
        } => {
            let ca = ca_service::load_or_create_root(&ca_dir, &trust_domain)?;
            let tokens = ca_service::Tokens::parse(
                &std::fs::read_to_string(&tokens).with_context(|| format!("reading {}", tokens.display()))?,
            );
            let own_identity = warren_core::identity::SpiffeId {
                trust_domain: trust_domain.clone(),
                namespace: CA_SERVICE_ACCOUNT.0.into(),
                service_account: CA_SERVICE_ACCOUNT.1.into(),
            };
            let own = ca.issue(&own_identity, Duration::from_secs(365 * 24 * 3600))?;
            let tls = std::sync::Arc::new(warren_core::tls::server_config_without_client_auth(&own)?);
            let config = std::sync::Arc::new(std::sync::RwLock::new(Default::default()));
            let service = std::sync::Arc::new(ca_service::CaService {
                ca,
                tokens,
                trust_domain,
                lifetime: Duration::from_secs(cert_lifetime_secs),
                config: config.clone(),
            });
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind(listen))
                .with_context(|| format!("binding {listen}"))?;
            eprintln!("controller: CA listening on {listen} as {own_identity}");
            runtime.spawn(ca_service::serve(listener, tls, service));
            watch(&dir, &out, interval_ms, |c| *config.write().expect("poisoned") = c)
        }
    }
}

/// Re-translates `dir` whenever it changes, writing `out` and handing the config to `apply`.
fn watch(
    dir: &std::path::Path,
    out: &std::path::Path,
    interval_ms: u64,
    apply: impl Fn(warren_core::model::NodeConfig),
) -> Result<ExitCode> {
    let mut last = None;
    loop {
        let stamp = dir_stamp(dir)?;
        if last.as_ref() != Some(&stamp) {
            match translate_dir(dir) {
                Ok((config, findings)) => {
                    report(&findings);
                    write_atomically(out, &serde_json::to_string_pretty(&config)?)?;
                    apply(config);
                    eprintln!("controller: wrote {} from {}", out.display(), dir.display());
                }
                Err(e) => eprintln!("controller: {e:#}; keeping the last config"),
            }
            last = Some(stamp);
        }
        std::thread::sleep(Duration::from_millis(interval_ms.max(50)));
    }
}

fn translate_dir(dir: &std::path::Path) -> Result<(warren_core::model::NodeConfig, Vec<Finding>)> {
    let (snapshot, mut findings) =
        source::read_dir(dir).with_context(|| format!("reading manifests in {}", dir.display()))?;
    let (config, more) = translate::translate(&snapshot);
    findings.extend(more);
    findings.extend(analyze::analyze(&snapshot));
    Ok((config, findings))
}

fn report(findings: &[Finding]) {
    for f in findings {
        eprintln!("controller: {f}");
    }
}

/// Names, sizes and modification times of the directory's files: changes when any file does.
fn dir_stamp(dir: &std::path::Path) -> Result<Vec<(PathBuf, u64, std::time::SystemTime)>> {
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

fn write_atomically(path: &std::path::Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
