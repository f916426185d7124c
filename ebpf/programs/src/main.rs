//! Warren's traffic capture, in place of Istio's in-pod iptables.
//!
//! - `warren_connect4` / `warren_connect6` (cgroup/connect4, connect6 on the root cgroup):
//!   a TCP connect from an enrolled pod's netns to anything but loopback is rewritten to
//!   ztunnel's outbound listener (127.0.0.1:15001 or [::1]:15001) in that netns; the original
//!   destination is parked under the socket cookie.
//! - `warren_sock_ops` (sock_ops on the root cgroup): once the captured socket has its source
//!   port, the parked destination is re-keyed by (netns cookie, client address) — what ztunnel
//!   sees as the peer of the connection it accepts — and removed again when the socket closes.
//! - `warren_sk_lookup` (one link per enrolled pod netns): TCP arriving from outside (not over
//!   `lo`) goes to ztunnel's HBONE listener (port 15008) or plaintext inbound listener (any
//!   other port). No listener means drop: capture fails closed, never open.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod capture;

/// On the host this crate is only type-checked (clippy); the real object is built for BPF.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
