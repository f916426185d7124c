use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{
        BPF_SK_LOOKUP_F_NO_REUSEPORT, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, sk_action,
    },
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use warren_ebpf_types::{
    ConnKey, EnrolledPod, HBONE_PORT, ListenerKey, ListenerKind, OUTBOUND_PORT, SockAddr16, ZtunnelInstance,
    v4_mapped,
};

/// Reads one context field with a volatile load. The verifier refuses context accesses through
/// a pointer the compiler has offset and reused across branches; one load per field avoids it.
macro_rules! ctx_field {
    ($ctx:expr, $($field:tt)+) => {
        read_volatile(&raw const (*$ctx).$($field)+)
    };
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
/// The loopback device is ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// Allow the connect to proceed (the rewrite, if any, is in the context).
const CONNECT_PROCEED: i32 = 1;

/// Filled in by ztunnel at load time; see `warren_ebpf_types::global_names`.
#[unsafe(no_mangle)]
static ZTUNNEL_MARK: Global<u32> = Global::new(0);

/// Netns cookies of the pods this node's ztunnel captures.
#[map(name = "WARREN_ENROLLED")]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(16384, 0);

/// Original destinations of captured connects, by socket cookie, until sock_ops knows the
/// source port. LRU so that a connect that dies before that point cannot fill the map.
#[map(name = "WARREN_PENDING_DST")]
static PENDING_DST: LruHashMap<u64, SockAddr16> = LruHashMap::pinned(65536, 0);

/// Original destinations by (pod netns cookie, client address): read and deleted by ztunnel
/// when it accepts the connection, deleted here when the client socket closes first.
#[map(name = "WARREN_ORIGINAL_DST")]
static ORIGINAL_DST: LruHashMap<ConnKey, SockAddr16> = LruHashMap::pinned(262144, 0);

/// ztunnel's in-pod inbound listeners, by pod IP and kind.
#[map(name = "WARREN_LISTENERS")]
static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(32768, 0);

/// The cgroups of the ztunnels running on this node: one, or two during a rolling update. Each
/// ztunnel adds its own at start and removes it when it exits; see `ZtunnelInstance`.
#[map(name = "WARREN_ZTUNNELS")]
static ZTUNNELS: HashMap<u64, ZtunnelInstance> = HashMap::pinned(256, 0);

/// Source addresses whose connections go straight to the pod (kubelet probes from the node).
#[map(name = "WARREN_PROBE_SOURCES")]
static PROBE_SOURCES: HashMap<[u8; 16], u8> = HashMap::pinned(64, 0);

#[cgroup_sock_addr(connect4)]
pub fn warren_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the verifier guarantees ctx points at a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP || !enrolled(&ctx) {
        return CONNECT_PROCEED;
    }
    let dst = u32::from_be(sa.user_ip4).to_be_bytes();
    // 127/8 and 0.0.0.0 stay inside the pod.
    if dst[0] == 127 || dst == [0; 4] || ztunnel_socket(&ctx) {
        return CONNECT_PROCEED;
    }
    let original = SockAddr16::new(v4_mapped(dst), u16::from_be(sa.user_port as u16));
    if park(&ctx, &original).is_err() {
        // Without a record ztunnel cannot route the connection; still send it to ztunnel,
        // which refuses it, rather than letting it bypass the mesh.
        debug!(&ctx, "connect4: could not record the original destination");
    }
    sa.user_ip4 = u32::from_be_bytes([127, 0, 0, 1]).to_be();
    sa.user_port = u32::from(OUTBOUND_PORT.to_be());
    CONNECT_PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn warren_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the verifier guarantees ctx points at a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP || !enrolled(&ctx) {
        return CONNECT_PROCEED;
    }
    let p = ctx.sock_addr;
    // SAFETY: p is the verifier-checked context.
    let words = unsafe {
        [
            ctx_field!(p, user_ip6[0]),
            ctx_field!(p, user_ip6[1]),
            ctx_field!(p, user_ip6[2]),
            ctx_field!(p, user_ip6[3]),
        ]
    };
    let dst = ip6_octets(words);
    let v4_mapped_dst = dst[..10] == [0; 10] && dst[10] == 0xff && dst[11] == 0xff;
    let loopback = if v4_mapped_dst {
        dst[12] == 127 || dst[12..] == [0; 4]
    } else {
        dst[..15] == [0; 15] && (dst[15] == 1 || dst[15] == 0)
    };
    if loopback || ztunnel_socket(&ctx) {
        return CONNECT_PROCEED;
    }
    let original = SockAddr16::new(dst, u16::from_be(sa.user_port as u16));
    if park(&ctx, &original).is_err() {
        debug!(&ctx, "connect6: could not record the original destination");
    }
    // A v4-mapped destination keeps going over IPv4, to ztunnel's 127.0.0.1 listener.
    let target = if v4_mapped_dst { v4_mapped([127, 0, 0, 1]) } else { ipv6_loopback() };
    sa.user_ip6 = ip6_words(target);
    sa.user_port = u32::from(OUTBOUND_PORT.to_be());
    CONNECT_PROCEED
}

#[sock_ops]
pub fn warren_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: bpf_get_socket_cookie accepts a sock_ops context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: the value is copied out before the entry is removed.
            let Some(original) = (unsafe { PENDING_DST.get(&cookie) }).copied() else {
                return 0;
            };
            let _ = PENDING_DST.remove(&cookie);
            let key = client_key(&ctx);
            if ORIGINAL_DST.insert(&key, &original, 0).is_ok() {
                // Ask for state changes so the entry goes when the socket closes, even if
                // ztunnel never accepts it.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let _ = ORIGINAL_DST.remove(&client_key(&ctx));
        }
        _ => {}
    }
    0
}

#[sk_lookup]
pub fn warren_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY (all ctx_field! reads): l is the verifier-checked context.
    let (protocol, ifindex, family) =
        unsafe { (ctx_field!(l, protocol), ctx_field!(l, ingress_ifindex), ctx_field!(l, family)) };
    if protocol != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX {
        return sk_action::SK_PASS;
    }
    let (local, remote) = if family == AF_INET {
        let (local, remote) = unsafe { (ctx_field!(l, local_ip4), ctx_field!(l, remote_ip4)) };
        (v4_mapped(u32::from_be(local).to_be_bytes()), v4_mapped(u32::from_be(remote).to_be_bytes()))
    } else {
        let local = unsafe {
            [
                ctx_field!(l, local_ip6[0]),
                ctx_field!(l, local_ip6[1]),
                ctx_field!(l, local_ip6[2]),
                ctx_field!(l, local_ip6[3]),
            ]
        };
        let remote = unsafe {
            [
                ctx_field!(l, remote_ip6[0]),
                ctx_field!(l, remote_ip6[1]),
                ctx_field!(l, remote_ip6[2]),
                ctx_field!(l, remote_ip6[3]),
            ]
        };
        (ip6_octets(local), ip6_octets(remote))
    };
    // A pod talking to its own IP (ztunnel's delivery to the application included) is local
    // traffic. It is routed over lo, but the kernel reports the address's device as the
    // ingress interface, so the ifindex test above does not catch it.
    if local == remote {
        return sk_action::SK_PASS;
    }
    // SAFETY: only presence is checked.
    if unsafe { PROBE_SOURCES.get(&remote) }.is_some() {
        return sk_action::SK_PASS;
    }
    let local_port = unsafe { ctx_field!(l, local_port) };
    let kind = if local_port == u32::from(HBONE_PORT) {
        ListenerKind::Hbone
    } else {
        ListenerKind::InboundPlaintext
    };
    // NO_REUSEPORT: the listener in the map, not whichever member of its reuseport group the
    // kernel would pick. During a hand-over both ztunnels' listeners share the address; the
    // map names the new one's, so inbound moves to it at once and the old one's accept queue
    // only drains. (Both ztunnels' links of this program are attached to the netns meanwhile:
    // the second run's assign fails, a socket being chosen already — the same one, from the
    // same map — and the kernel keeps the last socket chosen whatever a later program returns.)
    let flags = u64::from(BPF_SK_LOOKUP_F_NO_REUSEPORT);
    match LISTENERS.redirect_sk_lookup(&ctx, &ListenerKey::new(local, kind), flags) {
        Ok(()) => sk_action::SK_PASS,
        Err(_) => {
            debug!(&ctx, "sk_lookup: no ztunnel listener for port {}: dropped", local_port);
            sk_action::SK_DROP
        }
    }
}

fn enrolled(ctx: &SockAddrContext) -> bool {
    // SAFETY: bpf_get_netns_cookie accepts a sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: only presence is checked.
    unsafe { ENROLLED.get(&netns) }.is_some()
}

/// ztunnel's own sockets carry both a ztunnel's cgroup and the mark: a pod process can set the
/// mark, but it cannot run in a ztunnel's cgroup, so it is still captured.
fn ztunnel_socket(ctx: &SockAddrContext) -> bool {
    // SAFETY: helper without arguments, allowed in cgroup sock_addr programs.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: only presence is checked.
    if unsafe { ZTUNNELS.get(&cgroup) }.is_none() {
        return false;
    }
    // SAFETY: ctx->sk is always a valid full socket in sock_addr programs.
    let mark = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark };
    mark == ZTUNNEL_MARK.load()
}

fn park(ctx: &SockAddrContext, original: &SockAddr16) -> Result<(), i32> {
    // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    PENDING_DST.insert(&cookie, original, 0).map_err(|e| e as i32)
}

/// The client end of a captured connection, as ztunnel sees the peer it accepts.
fn client_key(ctx: &SockOpsContext) -> ConnKey {
    // SAFETY: bpf_get_netns_cookie accepts a sock_ops context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let ops = ctx.ops;
    // SAFETY (all ctx_field! reads): ops is the verifier-checked context.
    let (family, port) = unsafe { (ctx_field!(ops, family), ctx_field!(ops, local_port)) };
    let addr = if family == AF_INET6 {
        let words = unsafe {
            [
                ctx_field!(ops, local_ip6[0]),
                ctx_field!(ops, local_ip6[1]),
                ctx_field!(ops, local_ip6[2]),
                ctx_field!(ops, local_ip6[3]),
            ]
        };
        ip6_octets(words)
    } else {
        let ip4 = unsafe { ctx_field!(ops, local_ip4) };
        v4_mapped(u32::from_be(ip4).to_be_bytes())
    };
    ConnKey { netns_cookie, client: SockAddr16::new(addr, port as u16) }
}

/// The kernel keeps IPv6 addresses as four u32 in network order.
fn ip6_octets(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = u32::from_be(words[i]).to_be_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

fn ip6_words(octets: [u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_be_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]).to_be();
    [w(0), w(4), w(8), w(12)]
}

const fn ipv6_loopback() -> [u8; 16] {
    let mut a = [0u8; 16];
    a[15] = 1;
    a
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
