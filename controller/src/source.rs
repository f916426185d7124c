//! Local mode's source: a directory of Kubernetes YAML (multi-document files), read into a
//! [`Snapshot`]. A document that does not parse is reported with its file and position and
//! skipped; the rest keeps flowing.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    findings::{Finding, codes, error, warning},
    objects::Snapshot,
};

/// Reads a directory again and again, parsing only the files whose contents changed since
/// the last read: a one-pod edit next to a 10,000-pod file costs the edit, not the file.
#[derive(Default)]
pub struct DirReader {
    parsed: HashMap<PathBuf, ParsedFile>,
}

struct ParsedFile {
    /// The whole text, compared on each read: size and modification time are not enough
    /// (timestamps are only as fine as the kernel's tick, and an edit may keep the size).
    text: String,
    snapshot: Snapshot,
    findings: Vec<Finding>,
}

impl DirReader {
    /// Every `*.yaml` / `*.yml` under `dir` (recursively, in name order), as one snapshot.
    pub fn read(&mut self, dir: &Path) -> std::io::Result<(Snapshot, Vec<Finding>)> {
        let mut files = Vec::new();
        collect(dir, &mut files)?;
        files.sort();
        let mut snapshot = Snapshot::default();
        let mut findings = Vec::new();
        let mut parsed = HashMap::with_capacity(files.len());
        for file in files {
            let text = std::fs::read_to_string(&file)?;
            let entry = match self.parsed.remove(&file) {
                Some(cached) if cached.text == text => cached,
                _ => {
                    let mut entry = ParsedFile { text, snapshot: Snapshot::default(), findings: Vec::new() };
                    let origin = file.display().to_string();
                    read_documents(&origin, &entry.text, &mut entry.snapshot, &mut entry.findings);
                    entry
                }
            };
            snapshot.extend_from(&entry.snapshot);
            findings.extend(entry.findings.iter().cloned());
            parsed.insert(file, entry);
        }
        // Files gone from the directory are forgotten with the old map.
        self.parsed = parsed;
        Ok((snapshot, findings))
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    api_version: Option<String>,
    kind: Option<String>,
}

/// Parses the documents of one file into `snapshot`.
pub fn read_documents(origin: &str, text: &str, snapshot: &mut Snapshot, findings: &mut Vec<Finding>) {
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let place = format!("{origin}: document {}", i + 1);
        let value = match serde_yaml_ng::Value::deserialize(document) {
            Ok(serde_yaml_ng::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                // The YAML parser cannot resynchronise after a syntax error: the rest of this
                // file is unreadable, other files are not.
                findings.push(error(
                    codes::SCHEMA,
                    place,
                    None,
                    format!("not valid YAML, rest of the file skipped: {e}"),
                ));
                break;
            }
        };
        let meta: TypeMeta =
            serde_yaml_ng::from_value(value.clone()).unwrap_or(TypeMeta { api_version: None, kind: None });
        let (Some(api_version), Some(kind)) = (meta.api_version, meta.kind) else {
            findings.push(error(codes::SCHEMA, place, None, "a Kubernetes object needs apiVersion and kind"));
            continue;
        };
        let group = api_version.split_once('/').map_or("", |(g, _)| g);
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("<unnamed>")
            .to_string();
        let object = format!("{kind} {name} ({place})");
        // The error names the field (`spec.containers`), not just the problem.
        macro_rules! take {
            ($list:expr) => {
                match serde_path_to_error::deserialize(value) {
                    Ok(o) => $list.push(std::sync::Arc::new(o)),
                    Err(e) => {
                        let field = e.path().to_string();
                        findings.push(error(codes::SCHEMA, object, Some(field), e.into_inner().to_string()))
                    }
                }
            };
        }
        match (group, kind.as_str()) {
            ("", "Namespace") => take!(snapshot.namespaces),
            ("", "Pod") => take!(snapshot.pods),
            ("", "Service") => take!(snapshot.services),
            ("", "ServiceAccount") => take!(snapshot.service_accounts),
            ("security.istio.io", "PeerAuthentication") => take!(snapshot.peer_authentications),
            ("security.istio.io", "AuthorizationPolicy") => take!(snapshot.authorization_policies),
            ("networking.istio.io", "VirtualService") => take!(snapshot.virtual_services),
            ("networking.istio.io", "DestinationRule") => take!(snapshot.destination_rules),
            ("gateway.networking.k8s.io", "HTTPRoute") => take!(snapshot.http_routes),
            ("gateway.networking.k8s.io", "Gateway") => take!(snapshot.gateways),
            ("gateway.networking.k8s.io", "ReferenceGrant") => take!(snapshot.reference_grants),
            _ => findings.push(warning(
                codes::UNKNOWN_KIND,
                object,
                None,
                format!("{api_version} {kind} is not read by Warren yet; ignored"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn pod(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{containers: [{{name: app, image: x}}]}}\nstatus: {{podIPs: [{{ip: {ip}}}]}}\n"
        )
    }

    fn names(snapshot: &Snapshot) -> Vec<String> {
        snapshot.pods.iter().map(|p| p.metadata.name.clone().unwrap_or_default()).collect()
    }

    /// After every kind of edit, the reused reader gives what a fresh one gives, and files
    /// whose contents did not change keep their parsed objects (the same `Arc`s).
    #[test]
    fn a_reused_reader_sees_every_edit_and_reparses_only_changed_files() {
        let dir = std::env::temp_dir().join(format!("warren-dir-reader-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.yaml"), pod("a", "10.0.0.1")).unwrap();
        std::fs::write(
            dir.join("sub/b.yml"),
            format!("{}---\n{}", pod("b", "10.0.0.2"), pod("c", "10.0.0.3")),
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
        let mut reader = DirReader::default();
        let fresh = |dir: &Path| DirReader::default().read(dir).unwrap();

        let (first, _) = reader.read(&dir).unwrap();
        assert_eq!(names(&first), ["a", "b", "c"]);

        // One file changes (same size: a different IP): only it is parsed again.
        std::fs::write(dir.join("a.yaml"), pod("a", "10.0.0.9")).unwrap();
        let (second, findings) = reader.read(&dir).unwrap();
        assert_eq!(names(&second), names(&fresh(&dir).0));
        assert!(findings.is_empty(), "{findings:?}");
        assert!(!Arc::ptr_eq(&first.pods[0], &second.pods[0]), "the changed file was parsed again");
        assert!(Arc::ptr_eq(&first.pods[1], &second.pods[1]), "the unchanged file was not");
        let ip = |s: &Snapshot| s.pods[0].status.as_ref().unwrap().pod_ips.as_ref().unwrap()[0].ip.clone();
        assert_eq!(ip(&second), "10.0.0.9");

        // A file removed, one added, one broken: the same as reading from nothing.
        std::fs::remove_file(dir.join("sub/b.yml")).unwrap();
        std::fs::write(dir.join("d.yaml"), pod("d", "10.0.0.4")).unwrap();
        std::fs::write(dir.join("e.yaml"), "apiVersion: v1\nkind: Pod\nmetadata: [\n").unwrap();
        let (third, findings) = reader.read(&dir).unwrap();
        let (expected, expected_findings) = fresh(&dir);
        assert_eq!(names(&third), ["a", "d"]);
        assert_eq!(names(&third), names(&expected));
        assert_eq!(findings, expected_findings);
        assert_eq!(findings.len(), 1, "{findings:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
