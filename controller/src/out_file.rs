//! The config file `watch` and `serve` keep up to date (`--out`), in both modes. It is for
//! tools and development (proxies take the config stream), so a thread of its own writes it at
//! the lowest CPU priority, the latest config only: serializing 10,000 workloads (4 MB) never
//! delays the proxies, and a burst of changes is written once. It is replaced atomically
//! (write + rename: a reader never sees half a file) and only when its bytes change (a pod
//! status heartbeat that changes nothing Warren reads does not touch it).

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
                crate::background::lowest_priority();
                let mut last_written: Option<String> = None;
                while let Ok(mut config) = configs.recv() {
                    // Only the newest of what queued up meanwhile.
                    while let Ok(newer) = configs.try_recv() {
                        config = newer;
                    }
                    let text = match serde_json::to_string_pretty(&*config) {
                        Ok(text) => text,
                        Err(e) => {
                            eprintln!("controller: serializing the config: {e}");
                            continue;
                        }
                    };
                    if last_written.as_ref() == Some(&text) {
                        continue;
                    }
                    match write_atomically(&path, &text) {
                        Ok(()) => {
                            eprintln!(
                                "controller: wrote {} ({} workloads, {} services)",
                                path.display(),
                                config.workloads.len(),
                                config.services.len()
                            );
                            last_written = Some(text);
                        }
                        Err(e) => {
                            eprintln!("controller: {e:#}. Check that its directory exists and is writable")
                        }
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

pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn wait_for(path: &Path, what: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if what(&text) {
                return text;
            }
            assert!(Instant::now() < until, "{} never showed what was expected: {text:?}", path.display());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn writes_the_latest_config_atomically_and_only_when_it_changed() {
        let dir = std::env::temp_dir().join(format!("warren-out-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        let out = OutFile::spawn(path.clone());
        let one = Arc::new(NodeConfig { root_namespace: "one".into(), ..Default::default() });
        out.write(one.clone());
        wait_for(&path, |t| t.contains("\"one\""));
        let first = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        out.write(one);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            first,
            "an unchanged config rewrote it"
        );
        out.write(Arc::new(NodeConfig { root_namespace: "two".into(), ..Default::default() }));
        let text = wait_for(&path, |t| t.contains("\"two\""));
        assert!(serde_json::from_str::<NodeConfig>(&text).is_ok(), "a whole config: {text}");
        assert!(!dir.join("config.tmp").exists(), "the temporary file is renamed away");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
