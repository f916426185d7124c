//! The waypoint end to end: client pod → (eBPF capture) → ztunnel → HBONE → waypoint →
//! HBONE → ztunnel → server pod, with the real binaries, the project's echo server and load
//! client, across two nodes. Each claim of L7 routing and policy is asserted on what the
//! client receives, and on the waypoint's and ztunnels' own logs and metrics.
//!
//! One test binary; each module holds one concern, on the shared fixture of [`mesh`].

mod client_gone;
mod concurrency;
mod grpc;
mod idle;
mod mesh;
mod routing;
mod seed;
mod streaming;
mod upgrade;
mod upstream;
