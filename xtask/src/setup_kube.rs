//! The real Kubernetes API server the controller's end-to-end tests run against.
//!
//! No reachable registry ships a kube-apiserver binary, so it is built once from Debian 12's
//! own `kubernetes` source package (which vendors every Go dependency) with Debian's Go 1.19,
//! and cached under `$CARGO_HOME/warren/kube-apiserver-<version>/`, outside the work tree, so
//! that `cargo clean` or a fresh checkout never pays the ~9 minute build again. See
//! `/work/shared/kube-apiserver.md` for why each step is needed.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use super::{ensure_debian_packages, run_checked};

/// The Debian source package version (bookworm-security) and the upstream release it holds.
const SOURCE_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
const UPSTREAM_VERSION: &str = "1.20.2";

/// Run-time packages: the store, and kubectl for people poking at the test server (the tests
/// themselves talk to it with kube-rs).
const RUNTIME_PACKAGES: &[&str] = &["etcd-server"];
const KUBECTL_PACKAGE: &str = "kubernetes-client";

/// Build-only packages. The two Go libraries replace vendored versions that crash with Go 1.18+.
const BUILD_PACKAGES: &[&str] = &[
    "golang-1.19-go",
    "golang-1.19-src",
    "rsync",
    "make",
    "dpkg-dev",
    "golang-github-modern-go-reflect2-dev",
    "golang-github-json-iterator-go-dev",
];

/// Vendored Go packages replaced by Debian's newer sources: (vendor path, Debian gocode path).
const VENDOR_FIXES: &[(&str, &str)] = &[
    ("github.com/modern-go/reflect2", "/usr/share/gocode/src/github.com/modern-go/reflect2"),
    ("github.com/json-iterator/go", "/usr/share/gocode/src/github.com/json-iterator/go"),
];

/// Where the cached binary lives; the e2e harness (tests/src/kube.rs) looks in the same place.
pub fn install_dir() -> PathBuf {
    cargo_home().join(format!("warren/kube-apiserver-{UPSTREAM_VERSION}"))
}

pub fn run() -> Result<()> {
    ensure_debian_packages(RUNTIME_PACKAGES)?;
    kubectl()?;
    let dir = install_dir();
    let binary = dir.join("bin/kube-apiserver");
    if runs(&binary) {
        ok(&format!("kube-apiserver {UPSTREAM_VERSION} at {}", binary.display()));
        return Ok(());
    }
    step(&format!(
        "building kube-apiserver {UPSTREAM_VERSION} from Debian's source package into {} \
         (slow: 6–9 minutes on 2 cores and ~3 GB of temporary disk, once — no registry reachable here ships \
         the binary, so Go compiles the whole API server from source)",
        dir.display()
    ));
    let started = Instant::now();
    ensure_debian_packages(BUILD_PACKAGES)?;
    let work = dir.join("build");
    let tree = fetch_source(&work)?;
    step("replacing the vendored reflect2 and json-iterator (they crash with Go 1.18+)");
    fix_vendor(&tree)?;
    step("compiling cmd/kube-apiserver (make WHAT=cmd/kube-apiserver)");
    compile(&tree, &work)?;
    let built = tree.join("_output/local/bin/linux/amd64/kube-apiserver");
    let built = if built.is_file() { built } else { tree.join("_output/bin/kube-apiserver") };
    fs::create_dir_all(dir.join("bin"))?;
    // Copy then rename, so an interrupted run never leaves a half-written binary that the
    // "already built" check above would accept.
    let partial = dir.join("bin/kube-apiserver.partial");
    fs::copy(&built, &partial).with_context(|| format!("copying {}", built.display()))?;
    fs::rename(&partial, &binary)?;
    if !runs(&binary) {
        bail!("kube-apiserver was built at {} but does not run", binary.display());
    }
    // The tree and the Go cache are ~3 GB; only the binary is needed from now on.
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    ok(&format!(
        "kube-apiserver {UPSTREAM_VERSION} at {} (built in {:.0}s)",
        binary.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

// setup.rs keeps its helpers private; these three mirror them so its output reads the same.
fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"))
}

fn step(what: &str) {
    println!("==> {what}");
}

fn ok(what: &str) {
    println!("    ok: {what}");
}

/// Any kubectl will do: another package (e.g. Google Cloud SDK's `kubectl`) may already own
/// /usr/bin/kubectl, and installing `kubernetes-client` over it would fail in dpkg.
fn kubectl() -> Result<()> {
    let found = Command::new("kubectl").args(["version", "--client"]).output();
    if found.is_ok_and(|o| o.status.success()) {
        ok("kubectl (already on PATH)");
        return Ok(());
    }
    ensure_debian_packages(&[KUBECTL_PACKAGE])
}

fn runs(binary: &Path) -> bool {
    Command::new(binary).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Downloads and unpacks the source package with a private apt configuration (a `deb-src`
/// list, package lists and archive cache under `work/`), so the system's /etc/apt is untouched.
fn fetch_source(work: &Path) -> Result<PathBuf> {
    let tree = work.join(format!("kubernetes-{UPSTREAM_VERSION}"));
    if tree.join("Makefile").is_file() && tree.join("vendor").is_dir() {
        ok(&format!("source tree already unpacked at {}", tree.display()));
        return Ok(tree);
    }
    step(&format!("downloading Debian source package kubernetes {SOURCE_VERSION}"));
    let apt = work.join("apt");
    for sub in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(apt.join(sub))?;
    }
    let sources = apt.join("sources.list");
    fs::write(
        &sources,
        "deb-src http://deb.debian.org/debian bookworm main\n\
         deb-src http://deb.debian.org/debian-security bookworm-security main\n",
    )?;
    let apt_options = [
        format!("Dir::Etc::SourceList={}", sources.display()),
        "Dir::Etc::SourceParts=/nonexistent".to_string(),
        format!("Dir::State::Lists={}", apt.join("lists").display()),
        format!("Dir::Cache={}", apt.join("cache").display()),
        // The private lists are ours to write, so apt needs no root-owned lock for them.
        "Debug::NoLocking=1".to_string(),
    ];
    let apt_get = |args: &[&str]| -> Command {
        let mut cmd = Command::new("apt-get");
        for o in &apt_options {
            cmd.arg("-o").arg(o);
        }
        cmd.args(args).current_dir(work);
        cmd
    };
    run_checked(&mut apt_get(&["update", "-q"]))?;
    run_checked(&mut apt_get(&["source", "--download-only", "-q", &format!("kubernetes={SOURCE_VERSION}")]))?;
    let dsc = fs::read_dir(work)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "dsc"))
        .with_context(|| format!("apt-get source left no .dsc in {}", work.display()))?;
    step("unpacking the source package (dpkg-source -x applies Debian's patches)");
    let _ = fs::remove_dir_all(&tree);
    run_checked(Command::new("dpkg-source").arg("-x").arg(&dsc).arg(&tree).current_dir(work))?;
    Ok(tree)
}

fn fix_vendor(tree: &Path) -> Result<()> {
    for (vendored, debian) in VENDOR_FIXES {
        let target = tree.join("vendor").join(vendored);
        if !Path::new(debian).is_dir() {
            bail!("{debian} is missing: is its Debian package installed?");
        }
        // rsync --delete makes the vendor folder exactly Debian's copy, also on a re-run.
        run_checked(
            Command::new("rsync")
                .args(["-a", "--delete", "--exclude=*_test.go"])
                .arg(format!("{debian}/"))
                .arg(format!("{}/", target.display())),
        )?;
    }
    Ok(())
}

fn compile(tree: &Path, work: &Path) -> Result<()> {
    let go_root = Path::new("/usr/lib/go-1.19");
    let path = format!("{}:{}", go_root.join("bin").display(), env::var("PATH").unwrap_or_default());
    run_checked(
        Command::new("make")
            .arg("WHAT=cmd/kube-apiserver")
            .current_dir(tree)
            .env("PATH", path)
            .env("GOROOT", go_root)
            .env("GOCACHE", work.join("gocache"))
            .env("GOPATH", work.join("gopath"))
            .env("GOFLAGS", "-mod=vendor")
            .env("GO111MODULE", "on")
            .env("GOTOOLCHAIN", "local")
            // The source package is not a git checkout: give the version stamping its values.
            .env("KUBE_GIT_VERSION", format!("v{UPSTREAM_VERSION}"))
            .env("KUBE_GIT_TREE_STATE", "clean")
            .env("KUBE_GIT_MAJOR", "1")
            .env("KUBE_GIT_MINOR", "20")
            // Static, no C toolchain involved: the binary then runs anywhere on the machine.
            .env("CGO_ENABLED", "0")
            .env("KUBE_VERBOSE", "1"),
    )
}
