//! `cargo xtask` (or `./x`, which first installs the pinned user-space toolchain).
//!
//! Every command but `setup` runs the setup first: it is idempotent and takes about a second
//! when everything is in place.

mod bench;
mod cluster;
mod demo;
mod image;
mod kind;
mod setup;
mod setup_helm;
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
    /// Build a local cluster from a directory of Kubernetes manifests (nodes and pods as
    /// network namespaces, a ztunnel per node, the controller, waypoints) and leave it
    /// running. Adding or removing a manifest while it runs adds or removes the pods.
    Up {
        /// Directory of manifests: Namespaces, Deployments or Pods (`nodeName: node-N` places
        /// them), Services, ServiceAccounts, Istio resources, Gateways, HTTPRoutes.
        dir: std::path::PathBuf,
        /// The cluster's name; clusters with different names run side by side.
        #[arg(long, default_value = cluster::DEFAULT_NAME)]
        name: String,
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Use the binaries already built (target/debug) instead of building them first.
        #[arg(long)]
        no_build: bool,
    },
    /// Stop a local cluster and remove everything it made (also what a crashed run left).
    Down {
        #[arg(long, default_value = cluster::DEFAULT_NAME)]
        name: String,
    },
    /// The process that runs a cluster (started by `up`; not for direct use).
    #[command(hide = true)]
    ClusterSupervise {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        nodes: usize,
    },
    /// Build minimal OCI images (ztunnel, controller, waypoint, echo) from the release
    /// binaries into target/images/<name>.tar, without a container engine.
    Image {
        /// Use the release binaries already built instead of building them first.
        #[arg(long)]
        no_build: bool,
    },
    /// With Docker: a kind cluster (1 control plane, 2 workers) with the images, the chart,
    /// deploy/examples and a load test through the mesh.
    Kind {
        #[arg(long, default_value = kind::DEFAULT_NAME)]
        name: String,
        #[arg(long)]
        no_build: bool,
    },
    /// Measure: capture, the L4 and L7 data paths against direct and relay baselines, the
    /// controller at scale; writes docs/performance.md (docs/performance.md explains each).
    Bench {
        /// Fewer rounds and connections: a few minutes at most, for everyday checks.
        #[arg(long)]
        quick: bool,
        /// Run one group only: `capture`, `datapath`, `l7` or `controller` (the report then has only
        /// that group, and goes to target/bench/performance-GROUP.md, not docs/).
        #[arg(long)]
        only: Option<String>,
    },
    /// Compare this build's waypoint (A) with another build's (B, e.g. a copy of
    /// target/release/waypoint from before a change), side by side on the L7 benchmark's bed at
    /// 1,000 requests/s: CPU per 1,000 requests and p50 latency of each, round by round, and
    /// the median B/A ratio. Run it once with the same binary on both sides first: that shows
    /// the rig's own bias and noise (about ±5 % here).
    BenchWaypointAb {
        /// The other waypoint binary.
        #[arg(long)]
        baseline: std::path::PathBuf,
        /// Paired rounds (each runs A and B, alternating which goes first).
        #[arg(long, default_value_t = 8)]
        rounds: usize,
        /// Length of each run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// HTTP/2 (prior knowledge) instead of HTTP/1.1.
        #[arg(long)]
        http2: bool,
        /// Requests per second (the L7 benchmark's fixed rate by default). Lower it to run a
        /// side under a slow tool such as `valgrind --tool=callgrind`.
        #[arg(long, default_value_t = bench::L7_RATE)]
        rate: u32,
    },
    /// The benchmark's connection holder (started by `bench` inside a pod; not for direct
    /// use): opens COUNT connections to ADDR, prints how many, keeps them until its stdin
    /// closes or HOLD_SECS pass.
    #[command(hide = true)]
    BenchHold {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        limit_secs: f64,
        #[arg(long)]
        hold_secs: f64,
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
        Command::Up { dir, name, nodes, no_build } => {
            if !no_build {
                setup::run()?;
                demo::build_binaries()?;
            }
            cluster::up(&cluster::Up { dir, name, nodes, quiet: false }).map(|_| ())
        }
        Command::Down { name } => {
            let removed = cluster::down(&name)?;
            if removed.is_empty() {
                println!("cluster {name:?} was not running; nothing left behind");
            } else {
                println!("cluster {name:?} removed: {}", removed.join(", "));
            }
            Ok(())
        }
        Command::ClusterSupervise { dir, name, nodes } => {
            cluster::supervisor::run(cluster::supervisor::Settings {
                state_dir: cluster::state_dir(&name),
                dir,
                name,
                nodes,
            })
        }
        Command::Image { no_build } => image::run(no_build).map(|_| ()),
        Command::Kind { name, no_build } => kind::run(&name, no_build),
        Command::Bench { quick, only } => {
            setup::run()?;
            bench::run(quick, only.as_deref())
        }
        Command::BenchWaypointAb { baseline, rounds, seconds, http2, rate } => {
            setup::run()?;
            bench::waypoint_ab(&baseline, rounds, seconds, http2, rate)
        }
        Command::BenchHold { addr, count, limit_secs, hold_secs } => {
            bench::hold_main(addr, count, limit_secs, hold_secs)
        }
    }
}
