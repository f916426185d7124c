//! Builds the eBPF capture programs (ebpf/programs) with the pinned nightly and bpf-linker, and
//! leaves the object in OUT_DIR for `include_bytes!`. Checks the tools first, so a missing one
//! gives one clear message naming the command that fixes it instead of a wall of linker errors.

use std::{env, fs, path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir.parent().expect("ztunnel lives in the workspace root");
    let pins_path = root.join("ebpf/pins.env");
    println!("cargo:rerun-if-changed={}", pins_path.display());
    let pins = fs::read_to_string(&pins_path).expect("ebpf/pins.env is part of the repository");
    let pin = |name: &str| {
        pins.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("ebpf/pins.env lacks {name}"))
            .trim()
            .to_string()
    };
    let nightly = pin("EBPF_NIGHTLY");
    let linker_version = pin("BPF_LINKER_VERSION");

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let object = out_dir.join("warren-capture");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // Type-checking only; ztunnel refuses to start with an empty object.
        fs::write(&object, []).expect("write placeholder object");
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return;
    }

    let linker = bpf_linker_path(&nightly, &linker_version);
    if let Err(problem) = check_tools(&nightly, &linker) {
        eprintln!(
            "\n\nerror: cannot build Warren's eBPF programs: {problem}.\n\
             fix: run `./x setup` (or `cargo xtask setup`), which installs the pinned nightly \
             ({nightly}, with rust-src) and bpf-linker {linker_version}.\n"
        );
        std::process::exit(1);
    }
    // aya-build spawns cargo for the eBPF crate; point it at our bpf-linker, whatever PATH says.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker) };
    println!("cargo:rerun-if-changed={}", linker.display());

    let ebpf_dir = root.join("ebpf/programs");
    let package = aya_build::Package {
        name: "warren-ebpf",
        root_dir: ebpf_dir.to_str().expect("utf-8 path"),
        ..Default::default()
    };
    if let Err(err) = aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&nightly)) {
        eprintln!("\n\nerror: building Warren's eBPF programs failed: {err:#}\n");
        std::process::exit(1);
    }
    // aya-build does not see changes to the shared types crate on its own.
    println!("cargo:rerun-if-changed={}", root.join("ebpf/types/src").display());
}

/// Where `cargo xtask setup` installs bpf-linker: a directory of its own per (version, nightly),
/// because the binary is linked against that nightly's libLLVM.
fn bpf_linker_path(nightly: &str, version: &str) -> PathBuf {
    println!("cargo:rerun-if-env-changed=WARREN_BPF_LINKER");
    if let Ok(explicit) = env::var("WARREN_BPF_LINKER") {
        return PathBuf::from(explicit);
    }
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("CARGO_HOME or HOME is set");
    cargo_home.join(format!("warren/bpf-linker-{version}-{nightly}/bin/bpf-linker"))
}

fn check_tools(nightly: &str, linker: &std::path::Path) -> Result<(), String> {
    let sysroot = Command::new("rustup")
        .args(["run", nightly, "rustc", "--print", "sysroot"])
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .map_err(|e| format!("rustup could not be run ({e})"))?;
    if !sysroot.status.success() {
        return Err(format!("the toolchain {nightly} is not installed"));
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Err(format!("the rust-src component of {nightly} is not installed"));
    }
    if !linker.is_file() {
        return Err(format!("bpf-linker is not installed at {}", linker.display()));
    }
    let runs = Command::new(linker).arg("--version").output();
    if !runs.is_ok_and(|o| o.status.success()) {
        return Err(format!(
            "bpf-linker at {} does not run (its LLVM library may have been removed)",
            linker.display()
        ));
    }
    Ok(())
}
