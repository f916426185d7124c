//! `cargo xtask test`: everything CI runs, in the order that fails fastest.

use std::process::Command;

use anyhow::Result;

use crate::setup::{run_checked, workspace_root};

pub fn run(cargo_test_args: &[String]) -> Result<()> {
    let root = workspace_root();
    let cargo = || {
        let mut c = Command::new("cargo");
        c.current_dir(&root);
        c
    };
    println!("==> cargo fmt --check");
    run_checked(cargo().args(["fmt", "--all", "--", "--check"]))?;
    println!("==> cargo clippy --workspace --all-targets -- -D warnings");
    run_checked(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The end-to-end tests run the real binaries: build them first.
    println!("==> cargo build --bins");
    run_checked(cargo().args(["build", "--bins"]))?;
    println!("==> cargo test");
    run_checked(cargo().arg("test").args(cargo_test_args))
}
