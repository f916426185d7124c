//! Warren's waypoint: the optional L7 proxy of a namespace's services. It terminates HBONE
//! from ztunnels, routes each HTTP request by VirtualService / HTTPRoute and DestinationRule,
//! enforces L7 AuthorizationPolicy, and opens its own HBONE streams to the chosen endpoints.

mod admin;
mod authz;
mod body;
mod config;
mod deadline;
mod dialing;
mod forward;
mod grpc;
mod h2_client;
mod h2_server;
mod hashing;
mod hbone;
mod headers;
mod idle;
mod inbound;
mod metrics;
mod record;
mod retry;
mod routing;
mod run;
mod state;
mod trace;
mod upgrade;
mod upstream;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    warren_core::malloc::tune_for_relaying();
    let config = config::Config::parse();
    match run::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            warren_core::logging::flush();
            eprintln!("waypoint: {e:#}");
            ExitCode::FAILURE
        }
    }
}
