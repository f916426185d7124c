//! Warren's ztunnel: the per-node proxy.

mod admin;
mod capture;
use warren_core::certs;
mod cgroup;
mod config;
mod enforce;
mod hbone;
mod inpod;
mod metrics;
mod netns;
mod private_mount;
mod proxy;
mod route;
mod run;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ztunnel", version, about = "Warren's per-node proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the capture programs, enroll this node's pods and proxy their traffic.
    Run(Box<config::Config>),
    /// Show the attached programs and links and the enrolled pods of a running ztunnel.
    Status {
        /// The ztunnel's admin address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        /// Print the raw JSON of /capture.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 if the ztunnel serving this readiness socket is ready (the chart's readiness
    /// probe: it reaches this pod's ztunnel only, even while another shares the node's ports).
    Ready {
        #[arg(long, env = "WARREN_READINESS_SOCKET")]
        socket: PathBuf,
    },
    /// Detach this node's capture programs and remove every pin (ztunnel must be stopped).
    Uninstall {
        #[arg(long = "node", env = "WARREN_NODE_NAME")]
        node_name: String,
        #[arg(long, env = "WARREN_BPFFS", default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(config) => {
            warren_core::malloc::tune_for_relaying();
            run::run(*config)
        }
        Command::Status { admin, json } => status(admin, json),
        Command::Ready { socket } => admin::ready(&socket).map_err(anyhow::Error::msg),
        Command::Uninstall { node_name, bpffs } => {
            let dir = bpffs.join("warren").join(&node_name);
            match capture::uninstall(&dir) {
                Ok(true) => {
                    println!("removed {}: capture programs detached, maps gone", dir.display());
                    Ok(())
                }
                Ok(false) => {
                    println!("nothing to remove: {} does not exist", dir.display());
                    Ok(())
                }
                Err(e) => Err(anyhow::anyhow!("removing {}: {e}", dir.display())),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztunnel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn status(admin: SocketAddr, raw: bool) -> anyhow::Result<()> {
    let body = admin::get(admin, "/capture")
        .map_err(|e| anyhow::anyhow!("cannot reach ztunnel's admin endpoint at {admin}: {e}"))?;
    if raw {
        print!("{body}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    println!("node {}  (pins in {})", v["node"].as_str().unwrap_or("?"), v["pinDir"].as_str().unwrap_or("?"));
    println!("\nPROGRAM              PROG-ID  LINK-ID  ATTACHED TO");
    let empty = vec![];
    for p in v["programs"].as_array().unwrap_or(&empty) {
        println!(
            "{:<20} {:>7}  {:>7}  {}",
            p["program"].as_str().unwrap_or(""),
            p["program_id"],
            p["link_id"],
            p["attach_point"].as_str().unwrap_or("")
        );
    }
    println!("\nPOD                            NETNS-COOKIE  IPS                  SK_LOOKUP LINK  NETNS");
    for p in v["pods"].as_array().unwrap_or(&empty) {
        let ips: Vec<&str> =
            p["ips"].as_array().unwrap_or(&empty).iter().filter_map(|i| i.as_str()).collect();
        println!(
            "{:<30} {:>12}  {:<20} {:>14}  {}",
            p["pod"].as_str().unwrap_or(""),
            p["netns_cookie"],
            ips.join(","),
            p["sk_lookup"]["link_id"],
            p["netns"].as_str().unwrap_or("")
        );
    }
    // Two during a rolling update (the old and the new ztunnel), one otherwise.
    println!("\nexempt ztunnel cgroups: {}", v["exemptCgroups"]);
    println!("stats: {}", v["stats"]);
    Ok(())
}
