//! A "foreign" cgroup/connect4 program, standing in for another agent's socket load balancer
//! (Cilium's, say) on the same root cgroup: it rewrites connects to one ip:port to another
//! port. Hand-assembled and loaded with the raw bpf(2) syscall, so it shares nothing with
//! Warren's object, loader or maps.

use std::{
    fs::File,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
/// Offsets in struct bpf_sock_addr.
const USER_IP4: i16 = 4;
const USER_PORT: i16 = 24;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | dst;
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

/// Attached while alive; dropping it closes the link, which detaches the program.
pub struct PortRewrite {
    _prog: OwnedFd,
    _link: OwnedFd,
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<OwnedFd> {
    // SAFETY: attr is a zero-padded bpf_attr of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl PortRewrite {
    /// Rewrites TCP/UDP connects to `ip:from_port` into `ip:to_port`, on the cgroup at `cgroup`.
    pub fn attach(cgroup: &Path, ip: Ipv4Addr, from_port: u16, to_port: u16) -> io::Result<Self> {
        let ip_word = u32::from_ne_bytes(ip.octets()) as i32;
        let program: Vec<[u8; 8]> = vec![
            insn(0x61, 2, 1, USER_IP4, 0),                     // r2 = ctx->user_ip4
            insn(0x55, 2, 0, 4, ip_word),                      // if r2 != ip goto out
            insn(0x61, 2, 1, USER_PORT, 0),                    // r2 = ctx->user_port
            insn(0x55, 2, 0, 2, i32::from(from_port.to_be())), // if r2 != from goto out
            insn(0xb7, 2, 0, 0, i32::from(to_port.to_be())),   // r2 = to
            insn(0x63, 1, 2, USER_PORT, 0),                    // ctx->user_port = r2
            insn(0xb7, 0, 0, 0, 1),                            // out: r0 = 1 (proceed)
            insn(0x95, 0, 0, 0, 0),                            // exit
        ];
        let code: Vec<u8> = program.concat();
        let license = b"GPL\0";
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_CGROUP_SOCK_ADDR.to_ne_bytes());
        attr[4..8].copy_from_slice(&(program.len() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(code.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..55].copy_from_slice(b"foreign");
        attr[68..72].copy_from_slice(&BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        let prog = bpf(BPF_PROG_LOAD, &mut attr)?;

        let cgroup = File::open(cgroup)?;
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(cgroup.as_raw_fd() as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        let link = bpf(BPF_LINK_CREATE, &mut attr)?;
        Ok(PortRewrite { _prog: prog, _link: link })
    }
}
