//! The config file `watch` and `serve` keep up to date (`--out`). It is for tools and
//! development, so a thread of its own writes it at the lowest CPU priority, the latest
//! config only: serializing 10,000 workloads never delays the proxies, and a burst of changes
//! is written once.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
};

use anyhow::{Context, Result};
use warren_core::model::NodeConfig;

pub struct OutFile {
    latest: mpsc::Sender<Arc<NodeConfig>>,
}

impl OutFile {
    pub fn spawn(path: PathBuf) -> Self {
        let (latest, configs) = mpsc::channel::<Arc<NodeConfig>>();
        std::thread::Builder::new()
            .name("out-file".into())
            .spawn(move || {
                lowest_priority();
                while let Ok(mut config) = configs.recv() {
                    // Only the newest of what queued up meanwhile.
                    while let Ok(newer) = configs.try_recv() {
                        config = newer;
                    }
                    let written = serde_json::to_string_pretty(&*config)
                        .context("serializing the config")
                        .and_then(|text| write_atomically(&path, &text));
                    match written {
                        Ok(()) => eprintln!("controller: wrote {}", path.display()),
                        Err(e) => eprintln!("controller: {e:#}"),
                    }
                }
            })
            .expect("spawning a thread");
        OutFile { latest }
    }

    pub fn write(&self, config: Arc<NodeConfig>) {
        // The thread lives as long as the process.
        let _ = self.latest.send(config);
    }
}

/// Nice 19 for the calling thread only (Linux applies `setpriority(PRIO_PROCESS, 0)` to the
/// calling thread). Best effort: at worst the file is written at normal priority.
fn lowest_priority() {
    // SAFETY: setpriority only reads its arguments.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
