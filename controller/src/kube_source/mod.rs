//! Kubernetes mode's source: the objects Warren reads, watched from a real API server and kept
//! in kube-runtime reflector stores, rebuilt into the same [`Snapshot`](crate::objects::Snapshot)
//! local mode reads from YAML, so the one translation serves both.
//!
//! - [`kinds`]: what is watched (core kinds typed, Istio and Gateway API kinds dynamic).
//! - [`convert`]: the stores' contents to a `Snapshot` — pure, unit-tested.
//! - [`readiness`]: when the first config may be written, and which failures are fatal — pure.
//! - [`watch`]: the thin async loop tying the reflectors to the above; the config file is
//!   written by [`crate::out_file`], as in local mode.

pub mod convert;
pub mod kinds;
pub mod readiness;
pub mod watch;

use std::path::PathBuf;

pub use watch::{Options, SharedPods, run};

/// What stops Kubernetes mode. Each message says what the operator should do about it.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error(
        "no usable kubeconfig: {0}. Pass --kubeconfig PATH, set KUBECONFIG, or run in a pod with a \
         service account"
    )]
    Config(String),
    #[error("reading kubeconfig {path}: {message}. Check that the file exists and is a valid kubeconfig")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("creating the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error(
        "the API server forbids this controller to list/watch {resource} cluster-wide ({message}). \
         Grant it with deploy/rbac/controller.yaml (ClusterRole warren-controller bound to \
         ServiceAccount warren-system/warren-controller), or run the controller as that ServiceAccount"
    )]
    Forbidden { resource: String, message: String },
    #[error(
        "the API server rejected the controller's credentials while listing {resource} ({message}). \
         Check the token or client certificate in the kubeconfig"
    )]
    Unauthorized { resource: String, message: String },
}

#[cfg(test)]
mod cli_tests {
    use clap::Parser;

    use crate::{Cli, Command};

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("controller").chain(args.split_whitespace()))
    }

    #[test]
    fn exactly_one_source_and_kubeconfig_only_with_kubernetes() {
        let Command::Watch { source, .. } =
            parse("watch --kubernetes --kubeconfig k --out f").unwrap().command
        else {
            panic!("not watch")
        };
        assert!(source.kubernetes && source.dir.is_none());
        assert_eq!(source.kubeconfig.as_deref(), Some(std::path::Path::new("k")));
        assert!(parse("watch --dir d --out f").is_ok(), "local mode unchanged");
        assert!(parse("serve --kubernetes --out f --ca-dir c --tokens t").is_ok());
        for wrong in [
            "watch --out f",
            "watch --dir d --kubernetes --out f",
            "watch --dir d --kubeconfig k --out f",
            "serve --dir d --kubernetes --out f --ca-dir c --tokens t",
        ] {
            assert!(parse(wrong).is_err(), "accepted: {wrong}");
        }
    }
}
