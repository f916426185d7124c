//! What Warren's ztunnel, waypoint and controller all need: the config model the controller
//! produces and the proxies consume, SPIFFE workload identities, the mesh CA's signing, mutual
//! TLS set-up with SPIFFE verification, the HBONE codec, and how their servers accept
//! connections.

pub mod accept;
pub mod activity;
pub mod ca;
pub mod ca_protocol;
pub mod certs;
pub mod config_stream;
pub mod connect;
pub mod endpoints;
pub mod hbone;
pub mod identity;
pub mod l7;
pub mod logging;
pub mod malloc;
pub mod model;
pub mod policy;
pub mod tls;
