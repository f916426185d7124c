//! `warren-load`: see `warren_apps::load` and docs/apps.md.

use std::process::ExitCode;

use clap::Parser;
use warren_apps::load::{self, Config};

fn main() -> ExitCode {
    // Usage errors exit with clap's status 2 here.
    let config = Config::parse();
    let json = config.json;
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("warren-load: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let summary = match runtime.block_on(load::run(config)) {
        Ok(summary) => summary,
        Err(e) => {
            eprintln!("warren-load: {e:#}");
            return ExitCode::from(2);
        }
    };
    if json {
        match serde_json::to_string_pretty(&summary) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("warren-load: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{summary}");
    }
    // Failed requests are measurements, not failures of the tool; an unreachable target is.
    if summary.nothing_sent() {
        eprintln!("warren-load: no request could be sent: all {} connection attempts failed", summary.total);
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
