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
pub mod dial_gate;
pub mod endpoints;
pub mod frame_backlog;
pub mod hbone;
pub mod identity;
pub mod l7;
pub mod logging;
pub mod malloc;
pub mod model;
pub mod policy;
pub mod tls;

/// A hash map for lookups on a request's path. Its keys are addresses, uids and names from the
/// mesh config (never bytes a client chose freely), so SipHash's flooding resistance buys
/// nothing there; foldhash, seeded per process, hashes them in a fraction of the time.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A hash set on a request's path (see [`FastMap`]).
pub type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
