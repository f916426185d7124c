//! The config file ztunnels and waypoints read: replaced atomically (write + rename, so a reader
//! never sees half a file) and only when its bytes change, since a Pod status heartbeat that
//! changes nothing Warren reads must not make every reader reload.

use std::path::{Path, PathBuf};

use super::KubeSourceError;

pub struct Output {
    path: PathBuf,
    last: Option<String>,
}

impl Output {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), last: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `text` unless it is what was last written; returns whether it wrote.
    pub fn write(&mut self, text: String) -> Result<bool, KubeSourceError> {
        if self.last.as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        let tmp = self.path.with_extension("tmp");
        let write_error = |source| KubeSourceError::Write { path: self.path.clone(), source };
        std::fs::write(&tmp, &text).map_err(write_error)?;
        std::fs::rename(&tmp, &self.path).map_err(write_error)?;
        self.last = Some(text);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_only_changes_and_atomically() {
        let dir = std::env::temp_dir().join(format!("warren-output-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        let mut out = Output::new(&path);
        assert!(out.write("one".into()).unwrap());
        let first = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!out.write("one".into()).unwrap(), "unchanged text rewrote the file");
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), first);
        assert!(out.write("two".into()).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        assert!(!dir.join("config.tmp").exists(), "the temporary file is renamed away");
        let mut nowhere = Output::new(&dir.join("missing-dir/config.json"));
        let e = nowhere.write("x".into()).unwrap_err();
        assert!(e.to_string().contains("writable"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
