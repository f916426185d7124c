//! `cargo xtask image`: minimal OCI images of Warren's binaries, without a container engine.
//!
//! Each image is one layer: the release binary at `/usr/local/bin/<name>`, the shared libraries
//! it needs, the dynamic loader, and a few files (`/etc/passwd`, `/etc/group`,
//! `/etc/nsswitch.conf`, `/tmp`). The binaries are linked dynamically against glibc (Rust's
//! default `x86_64-unknown-linux-gnu`: libc, libm, libgcc_s and `ld-linux`), so the libraries
//! `ldd` names are copied from this Debian system into the layer at the paths `ldd` reports: the
//! image then runs exactly the glibc the binary was linked and tested against. A static (musl)
//! build would need another Rust target and a musl C toolchain for `ring`, for no gain here.
//!
//! The OCI image layout is written directly — the layer (a deterministic tar, gzip), the config
//! JSON, the manifest and `index.json`, each blob named by its SHA-256 — and packed as one tar:
//! `target/images/<name>.tar`, an OCI archive that `kind load image-archive`, `skopeo copy
//! oci-archive:…`, `podman load` and `ctr images import` read. The reference is
//! `docker.io/warren/<name>:<workspace version>`, what the chart's images default to.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::setup::{run_checked, workspace_root};

/// One image: its name (`warren/<name>`), the cargo package and binaries it holds (the first is
/// the entrypoint), and the user it runs as.
pub struct Spec {
    pub name: &'static str,
    pub package: &'static str,
    pub binaries: &'static [&'static str],
    pub user: &'static str,
}

/// What Warren ships, and the echo/load test application the kind cluster's examples run.
pub const IMAGES: &[Spec] = &[
    // root: it loads BPF programs and enters pods' namespaces (the chart grants the rest).
    Spec { name: "ztunnel", package: "warren-ztunnel", binaries: &["ztunnel"], user: "0:0" },
    Spec { name: "controller", package: "warren-controller", binaries: &["controller"], user: "65532:65532" },
    Spec { name: "waypoint", package: "warren-waypoint", binaries: &["waypoint"], user: "65532:65532" },
    Spec {
        name: "echo",
        package: "warren-apps",
        binaries: &["warren-echo", "warren-load"],
        user: "65532:65532",
    },
];

pub const REGISTRY_PREFIX: &str = "docker.io/warren";

/// The image tag: the workspace version, which is also the chart's appVersion.
pub fn tag() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

pub fn reference(name: &str) -> String {
    format!("{REGISTRY_PREFIX}/{name}:{}", tag())
}

/// Where the archives go.
pub fn images_dir() -> PathBuf {
    workspace_root().join("target/images")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { workspace_root().join(d) }
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds the release binaries (unless `no_build`) and writes every image archive.
pub fn run(no_build: bool) -> Result<Vec<PathBuf>> {
    if !no_build {
        let mut cmd = Command::new("cargo");
        cmd.args(["build", "--release"]).current_dir(workspace_root());
        for spec in IMAGES {
            cmd.args(["-p", spec.package]);
        }
        println!("==> building the release binaries");
        run_checked(&mut cmd)?;
    }
    let release = target_dir().join("release");
    let out_dir = images_dir();
    fs::create_dir_all(&out_dir)?;
    let mut written = Vec::new();
    for spec in IMAGES {
        let binaries: Vec<PathBuf> = spec.binaries.iter().map(|b| release.join(b)).collect();
        if let Some(missing) = binaries.iter().find(|b| !b.is_file()) {
            bail!("{} is missing: build it (drop --no-build) or set CARGO_TARGET_DIR", missing.display());
        }
        let out = out_dir.join(format!("{}.tar", spec.name));
        let image = assemble(spec, &binaries, &out)?;
        // Read it back as a consumer would: every digest and size, the entrypoint inside.
        let check = inspect(&out)?;
        let entry = format!("usr/local/bin/{}", spec.binaries[0]);
        if check.files.get(&entry).is_none_or(|(mode, _)| mode & 0o111 == 0) {
            bail!("{}: {entry} is missing or not executable", out.display());
        }
        println!(
            "    {} -> {} ({} files, {:.1} MB, manifest {})",
            image.reference,
            out.display(),
            image.files,
            image.archive_bytes as f64 / 1e6,
            image.manifest_digest
        );
        written.push(out);
    }
    println!(
        "load them with: kind load image-archive target/images/<name>.tar   (or podman load -i, skopeo copy oci-archive:...)"
    );
    Ok(written)
}

pub struct Built {
    pub reference: String,
    pub manifest_digest: String,
    pub files: usize,
    pub archive_bytes: u64,
}

/// A file of the layer: its path in the image (no leading `/`), mode and content, or a
/// directory.
#[derive(Clone, Debug, PartialEq)]
enum Entry {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
}

/// Writes the OCI archive for `spec` with `binaries` (host paths, in `spec.binaries` order).
pub fn assemble(spec: &Spec, binaries: &[PathBuf], out: &Path) -> Result<Built> {
    let mut files: BTreeMap<String, Entry> = BTreeMap::new();
    for (name, host) in spec.binaries.iter().zip(binaries) {
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        add_file(&mut files, &format!("usr/local/bin/{name}"), 0o755, data);
        for lib in shared_libraries(host)? {
            let data = fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
            let path = lib.to_string_lossy().trim_start_matches('/').to_string();
            add_file(&mut files, &path, 0o755, data);
        }
    }
    add_file(
        &mut files,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
            .to_vec(),
    );
    add_file(&mut files, "etc/group", 0o644, b"root:x:0:\nnonroot:x:65532:\n".to_vec());
    add_file(&mut files, "etc/nsswitch.conf", 0o644, b"hosts: files dns\n".to_vec());
    files.insert("tmp".into(), Entry::Dir { mode: 0o1777 });
    let count = files.values().filter(|e| matches!(e, Entry::File { .. })).count();

    let layer_tar = layer_tar(&files)?;
    let diff_id = digest(&layer_tar);
    let layer_gz = gzip(&layer_tar)?;
    let layer_digest = digest(&layer_gz);
    let reference = reference(spec.name);
    let entrypoint = format!("/usr/local/bin/{}", spec.binaries[0]);
    let config = json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": spec.user,
            "Entrypoint": [entrypoint],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": format!("warren-{}", spec.name),
                "org.opencontainers.image.version": tag(),
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image"}],
    });
    let config_bytes = serde_json::to_vec(&config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": digest(&config_bytes), "size": config_bytes.len()},
        "layers": [{"mediaType": MEDIA_LAYER_GZIP, "digest": layer_digest, "size": layer_gz.len()}],
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = digest(&manifest_bytes);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                // containerd (kind, ctr import) names the image after this one...
                "io.containerd.image.name": reference,
                // ...skopeo, podman and umoci after this one.
                "org.opencontainers.image.ref.name": reference,
            },
        }],
    });

    let mut archive: Vec<(String, Vec<u8>)> = vec![
        ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        ("index.json".into(), serde_json::to_vec(&index)?),
    ];
    for blob in [manifest_bytes, config_bytes, layer_gz] {
        archive.push((format!("blobs/sha256/{}", digest(&blob).trim_start_matches("sha256:")), blob));
    }
    let partial = out.with_extension("tar.partial");
    {
        let mut builder = tar::Builder::new(fs::File::create(&partial)?);
        for dir in ["blobs", "blobs/sha256"] {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            builder.append_data(&mut h, format!("{dir}/"), std::io::empty())?;
        }
        for (path, data) in &archive {
            let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
            builder.append_data(&mut h, path, data.as_slice())?;
        }
        builder.into_inner()?.flush()?;
    }
    fs::rename(&partial, out)?;
    Ok(Built { reference, manifest_digest, files: count, archive_bytes: fs::metadata(out)?.len() })
}

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", crate::setup_helm::sha256_hex(bytes))
}

fn add_file(files: &mut BTreeMap<String, Entry>, path: &str, mode: u32, data: Vec<u8>) {
    let mut parent = Path::new(path).parent();
    while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
        files.entry(dir.to_string_lossy().into_owned()).or_insert(Entry::Dir { mode: 0o755 });
        parent = dir.parent();
    }
    files.insert(path.to_string(), Entry::File { mode, data });
}

/// The shared libraries and the dynamic loader `ldd` names for `binary` (absolute paths;
/// symlinks resolved to their content when read). Empty for a static binary.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("running ldd (Debian package libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    }
    parse_ldd(&text)
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and `/lib64/ld-linux-x86-64.so.2 (0x…)`
/// lines; `linux-vdso.so.1` has no file. A library ldd cannot find is an error.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("=> not found") {
            bail!("a shared library is missing on this system: {line}");
        }
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// The layer: every entry in path order, owned by root, time 0 — the same inputs give the same
/// digest.
fn layer_tar(files: &BTreeMap<String, Entry>) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, entry) in files {
        match entry {
            Entry::Dir { mode } => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                builder.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Entry::File { mode, data } => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                builder.append_data(&mut h, path, data.as_slice())?;
            }
        }
    }
    Ok(builder.into_inner()?)
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::default());
    encoder.write_all(data)?;
    Ok(encoder.finish()?)
}

/// Reads an archive back: `index.json`, the manifest, the config and the layer's files (path →
/// mode and content), checking every digest and size on the way. For tests and `xtask kind`.
pub fn inspect(archive: &Path) -> Result<Inspected> {
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut tar = tar::Archive::new(fs::File::open(archive)?);
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().trim_end_matches('/').to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data)?;
        blobs.insert(path, data);
    }
    let blob = |descriptor: &Value| -> Result<Vec<u8>> {
        let digest_text = descriptor["digest"].as_str().context("a descriptor without digest")?;
        let hex = digest_text.strip_prefix("sha256:").context("a digest that is not sha256")?;
        let data = blobs
            .get(&format!("blobs/sha256/{hex}"))
            .with_context(|| format!("blob {digest_text} is missing"))?;
        if digest(data) != digest_text {
            bail!("blob {digest_text} has digest {}", digest(data));
        }
        if descriptor["size"].as_u64() != Some(data.len() as u64) {
            bail!("blob {digest_text} has size {}, the descriptor says {}", data.len(), descriptor["size"]);
        }
        Ok(data.clone())
    };
    let layout: Value = serde_json::from_slice(blobs.get("oci-layout").context("no oci-layout")?)?;
    if layout["imageLayoutVersion"] != "1.0.0" {
        bail!("oci-layout says {layout}");
    }
    let index: Value = serde_json::from_slice(blobs.get("index.json").context("no index.json")?)?;
    let descriptor = index["manifests"].get(0).context("index.json lists no manifest")?.clone();
    let manifest: Value = serde_json::from_slice(&blob(&descriptor)?)?;
    let config: Value = serde_json::from_slice(&blob(&manifest["config"])?)?;
    let mut files = BTreeMap::new();
    let layers = manifest["layers"].as_array().context("a manifest without layers")?;
    for (i, layer) in layers.iter().enumerate() {
        let gz = blob(layer)?;
        let mut tar_bytes = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut tar_bytes)?;
        if config["rootfs"]["diff_ids"][i] != digest(&tar_bytes).as_str() {
            bail!("layer {i}: diff_id {} is not the digest of its tar", config["rootfs"]["diff_ids"][i]);
        }
        for entry in tar::Archive::new(tar_bytes.as_slice()).entries()? {
            let mut entry = entry?;
            let path = entry.path()?.to_string_lossy().trim_end_matches('/').to_string();
            let mode = entry.header().mode()?;
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data)?;
            files.insert(path, (mode, data));
        }
    }
    Ok(Inspected { index, manifest, config, files })
}

#[cfg_attr(not(test), allow(dead_code))]
pub struct Inspected {
    pub index: Value,
    pub manifest: Value,
    pub config: Value,
    /// Path in the image (no leading `/`) → (mode, content).
    pub files: BTreeMap<String, (u32, Vec<u8>)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("warren-image-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// This test binary (a dynamically linked Rust program, like the release binaries) packed
    /// as an image, then read back with every digest checked.
    fn build_test_image(dir: &Path) -> (PathBuf, PathBuf) {
        // Without its debug info (170 MB in a debug build) the layer is quick to gzip.
        let exe = dir.join("selftest");
        fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
        let _ = Command::new("strip").arg("--strip-debug").arg(&exe).status();
        let spec = Spec { name: "selftest", package: "xtask", binaries: &["selftest"], user: "65532:65532" };
        let out = dir.join("selftest.tar");
        let built = assemble(&spec, std::slice::from_ref(&exe), &out).unwrap();
        assert_eq!(built.reference, format!("docker.io/warren/selftest:{}", tag()));
        (exe, out)
    }

    #[test]
    fn parses_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn archive_is_a_valid_oci_layout_with_the_binary_and_its_libraries() {
        let dir = scratch("layout");
        let (exe, out) = build_test_image(&dir);
        let image = inspect(&out).unwrap();
        assert_eq!(image.index["schemaVersion"], 2);
        assert_eq!(image.index["manifests"][0]["mediaType"], MEDIA_MANIFEST);
        let name = &image.index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"];
        assert_eq!(name, &json!(format!("docker.io/warren/selftest:{}", tag())));
        assert_eq!(image.manifest["layers"][0]["mediaType"], MEDIA_LAYER_GZIP);
        assert_eq!(image.config["os"], "linux");
        assert_eq!(image.config["architecture"], "amd64");
        assert_eq!(image.config["config"]["Entrypoint"], json!(["/usr/local/bin/selftest"]));
        assert_eq!(image.config["config"]["User"], "65532:65532");
        let (mode, data) = &image.files["usr/local/bin/selftest"];
        assert_eq!(mode & 0o777, 0o755, "the binary is executable");
        assert_eq!(data, &fs::read(&exe).unwrap(), "the binary is the one given");
        // Every library ldd names, and the loader the binary's PT_INTERP names, are inside.
        for lib in shared_libraries(&exe).unwrap() {
            let key = lib.to_string_lossy().trim_start_matches('/').to_string();
            assert!(image.files.contains_key(&key), "{key} is missing from the layer");
        }
        assert!(image.files.keys().any(|k| k.contains("ld-linux")), "no dynamic loader in the layer");
        assert_eq!(image.files["tmp"].0 & 0o7777, 0o1777);
        // Deterministic: the same inputs give the same manifest digest.
        let again = dir.join("again.tar");
        let spec = Spec { name: "selftest", package: "xtask", binaries: &["selftest"], user: "65532:65532" };
        let second = assemble(&spec, &[exe], &again).unwrap();
        assert_eq!(json!(second.manifest_digest), image.index["manifests"][0]["digest"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn inspect_refuses_a_corrupted_blob() {
        let dir = scratch("corrupt");
        let (_, out) = build_test_image(&dir);
        let mut bytes = fs::read(&out).unwrap();
        // Flip a byte near the end of the archive's data (inside the last blob, the layer).
        let at = bytes.len() - 2048 - 100;
        bytes[at] ^= 0xff;
        fs::write(&out, &bytes).unwrap();
        let error = inspect(&out).err().expect("a corrupted archive is refused");
        assert!(
            format!("{error:#}").contains("digest") || format!("{error:#}").contains("gzip"),
            "{error:#}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The real tools read it: skopeo copies the archive into an OCI directory (checking every
    /// digest), umoci unpacks that into a root filesystem, and — as root — the binary runs
    /// chrooted inside it with only the libraries the layer carries.
    #[test]
    fn skopeo_and_umoci_read_the_archive_and_the_binary_runs_from_it() {
        let has = |tool: &str| Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
        if !has("skopeo") || !has("umoci") {
            eprintln!("SKIPPED: skopeo or umoci is not installed (./x setup installs both from Debian)");
            return;
        }
        let dir = scratch("tools");
        let (_, out) = build_test_image(&dir);
        let inspect = Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}", out.display()))
            .output()
            .unwrap();
        assert!(inspect.status.success(), "skopeo inspect: {}", String::from_utf8_lossy(&inspect.stderr));
        let seen: Value = serde_json::from_slice(&inspect.stdout).unwrap();
        assert_eq!(seen["Architecture"], "amd64");
        assert_eq!(seen["Os"], "linux");
        assert_eq!(seen["Layers"].as_array().map(Vec::len), Some(1));
        let layout = dir.join("layout");
        let copy = Command::new("skopeo")
            .args(["copy", "--quiet"])
            .arg(format!("oci-archive:{}", out.display()))
            .arg(format!("oci:{}:selftest", layout.display()))
            .output()
            .unwrap();
        assert!(copy.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&copy.stderr));
        let bundle = dir.join("bundle");
        let unpack = Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:selftest", layout.display()))
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(unpack.status.success(), "umoci unpack: {}", String::from_utf8_lossy(&unpack.stderr));
        let binary = bundle.join("rootfs/usr/local/bin/selftest");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&binary).unwrap().permissions().mode() & 0o111, 0o111);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let run = Command::new("chroot")
                .arg(bundle.join("rootfs"))
                .args(["/usr/local/bin/selftest", "--list"])
                .output()
                .unwrap();
            assert!(
                run.status.success(),
                "the binary does not run from its image alone: {}",
                String::from_utf8_lossy(&run.stderr)
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
