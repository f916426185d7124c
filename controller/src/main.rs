//! Warren's controller. Today: local mode's translation and analysis over a directory of
//! Kubernetes manifests, written as the config file ztunnels read. The Kubernetes watcher, the
//! config stream and the CA service come next (see the controller issue).

mod analyze;
mod findings;
mod objects;
mod source;
mod translate;

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
}

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
            let (json, findings) = translate_dir(&dir)?;
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
        Command::Watch { dir, out, interval_ms } => {
            let mut last = None;
            loop {
                let stamp = dir_stamp(&dir)?;
                if last.as_ref() != Some(&stamp) {
                    match translate_dir(&dir) {
                        Ok((json, findings)) => {
                            report(&findings);
                            write_atomically(&out, &json)?;
                            eprintln!("controller: wrote {} from {}", out.display(), dir.display());
                        }
                        Err(e) => eprintln!("controller: {e:#}; keeping the last config"),
                    }
                    last = Some(stamp);
                }
                std::thread::sleep(Duration::from_millis(interval_ms.max(50)));
            }
        }
    }
}

fn translate_dir(dir: &std::path::Path) -> Result<(String, Vec<Finding>)> {
    let (snapshot, mut findings) =
        source::read_dir(dir).with_context(|| format!("reading manifests in {}", dir.display()))?;
    let (config, more) = translate::translate(&snapshot);
    findings.extend(more);
    findings.extend(analyze::analyze(&snapshot));
    Ok((serde_json::to_string_pretty(&config)?, findings))
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
