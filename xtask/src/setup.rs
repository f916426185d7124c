//! `cargo xtask setup`: installs what building and testing Warren needs, and nothing twice.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

// Declared here rather than in main.rs: it is a part of set-up (the real kube-apiserver).
#[path = "setup_kube.rs"]
mod setup_kube;

/// Debian packages the tests and the demo use (`ip` for namespaces and veths).
const DEBIAN_PACKAGES: &[&str] = &["iproute2"];

pub struct Pins {
    pub nightly: String,
    pub llvm_major: String,
    pub bpf_linker: String,
}

impl Pins {
    pub fn read() -> Result<Self> {
        let path = workspace_root().join("ebpf/pins.env");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let get = |name: &str| -> Result<String> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .map(|v| v.trim().to_string())
                .with_context(|| format!("{} lacks {name}", path.display()))
        };
        Ok(Self {
            nightly: get("EBPF_NIGHTLY")?,
            llvm_major: get("EBPF_LLVM_MAJOR")?,
            bpf_linker: get("BPF_LINKER_VERSION")?,
        })
    }

    /// Mirrors ztunnel/build.rs: one install directory per (bpf-linker version, nightly).
    fn bpf_linker_root(&self) -> PathBuf {
        cargo_home().join(format!("warren/bpf-linker-{}-{}", self.bpf_linker, self.nightly))
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_path_buf()
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"))
}

pub fn run() -> Result<()> {
    let started = Instant::now();
    let pins = Pins::read()?;
    debian_packages()?;
    nightly(&pins)?;
    bpf_linker(&pins)?;
    setup_kube::run()?;
    crate::setup_helm::run()?;
    println!("==> setup complete ({:.1}s)", started.elapsed().as_secs_f64());
    Ok(())
}

fn step(what: &str) {
    println!("==> {what}");
}

fn ok(what: &str) {
    println!("    ok: {what}");
}

fn debian_packages() -> Result<()> {
    ensure_debian_packages(DEBIAN_PACKAGES)
}

/// Installs whichever of `packages` are missing (one apt-get run), saying what it does.
pub fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]).output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        ok(&format!("Debian packages ({})", packages.join(", ")));
        return Ok(());
    }
    step(&format!("installing Debian packages: {}", missing.join(", ")));
    run_checked(Command::new("apt-get").args(["update", "-q"]))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn rustup_run(toolchain: &str, args: &[&str]) -> Option<String> {
    let out = Command::new("rustup")
        .args(["run", toolchain])
        .args(args)
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_sysroot(pins: &Pins) -> Option<PathBuf> {
    let sysroot = PathBuf::from(rustup_run(&pins.nightly, &["rustc", "--print", "sysroot"])?.trim());
    sysroot.join("lib/rustlib/src/rust/library/core").is_dir().then_some(sysroot)
}

fn nightly(pins: &Pins) -> Result<()> {
    if nightly_sysroot(pins).is_some() {
        ok(&format!("{} with rust-src (builds the eBPF crate)", pins.nightly));
        return Ok(());
    }
    step(&format!("installing {} with rust-src (builds the eBPF crate)", pins.nightly));
    run_checked(Command::new("rustup").args([
        "toolchain",
        "install",
        "--no-self-update",
        &pins.nightly,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn bpf_linker(pins: &Pins) -> Result<()> {
    let root = pins.bpf_linker_root();
    let binary = root.join("bin/bpf-linker");
    let works = Command::new(&binary).arg("--version").output().is_ok_and(|o| o.status.success());
    if works {
        ok(&format!("bpf-linker {} at {}", pins.bpf_linker, binary.display()));
        return Ok(());
    }
    step(&format!(
        "building bpf-linker {} against the LLVM of {} (takes a few minutes, once)",
        pins.bpf_linker, pins.nightly
    ));
    let verbose = rustup_run(&pins.nightly, &["rustc", "--version", "--verbose"])
        .context("the nightly toolchain does not run")?;
    let llvm = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc --version --verbose names no LLVM version")?;
    if llvm.split('.').next() != Some(pins.llvm_major.as_str()) {
        bail!(
            "{} ships LLVM {llvm}, but ebpf/pins.env pins LLVM {}: update the pins together",
            pins.nightly,
            pins.llvm_major
        );
    }
    // bpf-linker links the nightly's own libLLVM: give it a prefix whose lib/ holds the names
    // the linker looks for. The binary's rpath points at this directory, so it stays.
    let sysroot = nightly_sysroot(pins).context("the nightly's rust-src is missing")?;
    let libllvm = fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so")))
        .with_context(|| format!("no libLLVM.so in {}/lib", sysroot.display()))?;
    let prefix = root.join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib)?;
    let soname = libllvm.file_name().expect("a file").to_owned();
    for name in [Path::new("libLLVM.so").as_os_str(), soname.as_os_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    run_checked(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--locked", "--force", "--no-default-features"])
            .args(["--version", &pins.bpf_linker])
            .args(["--features", &format!("llvm-{}", pins.llvm_major)])
            .arg("--root")
            .arg(&root)
            .env("LLVM_PREFIX", &prefix),
    )?;
    let works = Command::new(&binary).arg("--version").output().is_ok_and(|o| o.status.success());
    if !works {
        bail!("bpf-linker was installed at {} but does not run", binary.display());
    }
    ok(&format!("bpf-linker {} at {}", pins.bpf_linker, binary.display()));
    Ok(())
}

pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
