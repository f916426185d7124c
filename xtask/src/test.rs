//! `cargo xtask test`: everything CI runs, in the order that fails fastest.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

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
    run_checked(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // The end-to-end tests run the real binaries: build them first.
    println!("==> cargo build --bins");
    run_checked(cargo().args(["build", "--bins"]))?;
    println!("==> cargo test");
    let mut child = cargo()
        .arg("test")
        .args(cargo_test_args)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    // Echo the output and add up every test binary's result line, for one closing summary.
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next())
                    && let Ok(n) = n.parse::<u64>()
                {
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("\ntests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}
