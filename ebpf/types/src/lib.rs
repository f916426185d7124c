//! Map keys and values shared by the eBPF programs (`warren-ebpf`) and ztunnel.
//!
//! Every type is `#[repr(C)]` with explicit padding, so the kernel and user space agree on the
//! bytes. Addresses are stored as 16 bytes in network order, IPv4 as v4-mapped IPv6
//! (`::ffff:a.b.c.d`), so one key type serves both families.
#![no_std]

/// ztunnel's outbound listener inside each enrolled pod's netns (127.0.0.1 and [::1]).
pub const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's plaintext inbound listener inside each enrolled pod's netns.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// ztunnel's HBONE (mTLS HTTP/2 CONNECT) listener inside each enrolled pod's netns.
pub const HBONE_PORT: u16 = 15008;

/// Names of the maps, as pinned under ztunnel's bpffs directory.
pub mod map_names {
    pub const ENROLLED: &str = "WARREN_ENROLLED";
    pub const PENDING_ORIGINAL_DST: &str = "WARREN_PENDING_DST";
    pub const ORIGINAL_DST: &str = "WARREN_ORIGINAL_DST";
    pub const LISTENERS: &str = "WARREN_LISTENERS";
    pub const PROBE_SOURCES: &str = "WARREN_PROBE_SOURCES";
    pub const ZTUNNELS: &str = "WARREN_ZTUNNELS";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    pub const CONNECT4: &str = "warren_connect4";
    pub const CONNECT6: &str = "warren_connect6";
    pub const SOCK_OPS: &str = "warren_sock_ops";
    pub const SK_LOOKUP: &str = "warren_sk_lookup";
}

/// Names of the load-time globals (`EbpfLoader::set_global`).
pub mod global_names {
    /// The SO_MARK ztunnel sets on every socket it opens in a pod's netns: with a cgroup in
    /// the ztunnels map, what exempts ztunnel's own sockets.
    pub const ZTUNNEL_MARK: &str = "ZTUNNEL_MARK";
}

/// Value of the ztunnels map, keyed by the cgroup v2 id a running ztunnel is in (`u64`).
///
/// The map is pinned and shared, not a load-time global, because during a rolling update two
/// ztunnels (two pods, two cgroups) run on one node, and each one's programs must exempt both.
/// The rest identifies the process, so that a ztunnel that starts can tell an entry of a live
/// ztunnel from one a killed ztunnel left, and one that exits removes only its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZtunnelInstance {
    /// Process id, in the PID namespace named by `pid_namespace`.
    pub pid: u32,
    pub _pad: u32,
    /// Inode of the PID namespace `pid` belongs to (`/proc/self/ns/pid`).
    pub pid_namespace: u64,
    /// The process's start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot):
    /// with the pid, one process, even after the pid is reused.
    pub start_time: u64,
}

/// Value of the enrolled map, keyed by a pod's netns cookie (`u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    /// Reserved for per-pod capture options; zero today.
    pub flags: u32,
    pub _pad: u32,
}

/// An IP address and port, the address in network order (v4-mapped for IPv4), the port in
/// host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr16 {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}

impl SockAddr16 {
    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        Self { addr, port, _pad: [0; 6] }
    }
}

/// Key of the original-destination map: the client end of a captured connection as ztunnel's
/// outbound listener sees it (the peer address of the accepted socket) in one pod netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns_cookie: u64,
    pub client: SockAddr16,
}

/// Which of ztunnel's in-pod listeners a [`ListenerKey`] names.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    InboundPlaintext = 1,
    Hbone = 2,
}

/// Key of the listener socket map: the pod IP (v4-mapped for IPv4) the inbound connection is
/// addressed to, and the listener it must be steered to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub addr: [u8; 16],
    pub kind: u32,
    pub _pad: u32,
}

impl ListenerKey {
    pub const fn new(addr: [u8; 16], kind: ListenerKind) -> Self {
        Self { addr, kind: kind as u32, _pad: 0 }
    }
}

/// v4-mapped IPv6 form of an IPv4 address given as its four octets.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3]]
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: plain-old-data, #[repr(C)], every byte (padding included) is a named field.
    unsafe impl aya::Pod for EnrolledPod {}
    unsafe impl aya::Pod for SockAddr16 {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for ZtunnelInstance {}
}
