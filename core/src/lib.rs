//! What Warren's ztunnel, waypoint and controller all need: the config model the controller
//! produces and the proxies consume, and SPIFFE workload identities.

pub mod identity;
pub mod model;
