//! `cargo xtask` (or `./x`, which first installs the pinned user-space toolchain).
//!
//! Every command but `setup` runs the setup first: it is idempotent and takes about a second
//! when everything is in place.

mod bench;
mod demo;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Warren's developer and user workflows")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing: Debian packages, the pinned nightly with rust-src, bpf-linker.
    Setup,
    /// The whole test suite: fmt, clippy, then unit and end-to-end tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (for example a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
    /// Show capture on this kernel: a node and three pods in network namespaces.
    Demo,
    /// Measure Warren against baselines in the same run (needs root); writes
    /// target/bench/results.json and docs/performance.md.
    Bench {
        /// Fewer rounds and connections: a few minutes at most, for everyday checks.
        #[arg(long)]
        quick: bool,
        /// Run one group only: `capture` or `datapath` (the report then has only that group).
        #[arg(long)]
        only: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Setup => setup::run(),
        Command::Test { cargo_test_args } => {
            setup::run()?;
            test::run(&cargo_test_args)
        }
        Command::Demo => {
            setup::run()?;
            demo::run()
        }
        Command::Bench { quick, only } => {
            setup::run()?;
            bench::run(quick, only.as_deref())
        }
    }
}
