//! Network namespaces: finding a pod's by its IP, and doing socket work inside it.
//!
//! Sockets keep the netns they were created in, so ztunnel enters a pod's netns only for the
//! `socket()`/`bind()` calls and returns at once; everything else runs in ztunnel's own.

use std::{
    collections::HashMap,
    fs::{self, File},
    io,
    net::{IpAddr, SocketAddr},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
    sync::OnceLock,
};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("no network namespace holds {ip} (looked in /proc/*/ns/net and /var/run/netns)")]
    NotFound { ip: IpAddr },
    #[error(
        "{ip} is held by more than one network namespace ({first} and {second}): refusing to guess which is the pod"
    )]
    Ambiguous { ip: IpAddr, first: PathBuf, second: PathBuf },
}

/// ztunnel's own netns, opened once at start from the main thread.
fn home() -> &'static File {
    static HOME: OnceLock<File> = OnceLock::new();
    HOME.get_or_init(|| File::open("/proc/thread-self/ns/net").expect("open own netns"))
}

/// Call once at start, before any thread changes namespace.
pub fn init() {
    let _ = home();
}

/// Runs `f` with the calling thread inside `netns`, then returns the thread to ztunnel's own
/// netns. If returning fails the process aborts: carrying on in a pod's netns would be worse.
pub fn run_in<T>(netns: &File, f: impl FnOnce() -> T) -> io::Result<T> {
    // SAFETY: setns on this thread only; both fds are valid open nsfs files.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let out = f();
    // SAFETY: as above.
    if unsafe { libc::setns(home().as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let error = io::Error::last_os_error();
        warren_core::logging::flush();
        eprintln!("ztunnel: cannot return to its own network namespace: {error}");
        std::process::abort();
    }
    Ok(out)
}

/// A network namespace seen on this machine: a path that names it and its nsfs inode.
#[derive(Clone, Debug)]
pub struct NetnsRef {
    pub path: PathBuf,
    pub inode: u64,
}

/// Every network namespace reachable through /var/run/netns and /proc/*/ns/net, one entry per
/// namespace (inode), ztunnel's own left out.
pub fn scan() -> Vec<NetnsRef> {
    let own = fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    let mut seen: HashMap<u64, PathBuf> = HashMap::new();
    let mut visit = |path: PathBuf| {
        if let Ok(meta) = fs::metadata(&path)
            && Some(meta.ino()) != own
        {
            seen.entry(meta.ino()).or_insert(path);
        }
    };
    if let Ok(entries) = fs::read_dir("/var/run/netns") {
        for e in entries.flatten() {
            visit(e.path());
        }
    }
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                visit(e.path().join("ns/net"));
            }
        }
    }
    seen.into_iter().map(|(inode, path)| NetnsRef { path, inode }).collect()
}

/// Whether `ip` is a local address of the netns: binding to it succeeds only there.
fn holds_ip(netns: &File, ip: IpAddr) -> io::Result<bool> {
    run_in(netns, || {
        let domain = if ip.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
        let probe = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        match probe.bind(&SocketAddr::new(ip, 0).into()) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
            Err(e) => Err(e),
        }
    })?
}

/// Finds the one network namespace that holds `ip`, among `candidates`.
pub fn find_by_ip(ip: IpAddr, candidates: &[NetnsRef]) -> Result<(NetnsRef, File), NetnsError> {
    let mut found: Option<(NetnsRef, File)> = None;
    for candidate in candidates {
        // Processes come and go during the scan: a vanished candidate is simply not it.
        let Ok(file) = File::open(&candidate.path) else {
            continue;
        };
        // A namespace being torn down refuses setns (EINVAL): it is not the pod's, and must not
        // fail the search for every other pod on the node.
        match holds_ip(&file, ip) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(source) => {
                tracing::debug!(path = %candidate.path.display(), "skipping a namespace that cannot be entered: {source}");
                continue;
            }
        }
        if let Some((first, _)) = &found {
            return Err(NetnsError::Ambiguous {
                ip,
                first: first.path.clone(),
                second: candidate.path.clone(),
            });
        }
        found = Some((candidate.clone(), file));
    }
    found.ok_or(NetnsError::NotFound { ip })
}

/// SO_NETNS_COOKIE of a socket: the same value bpf_get_netns_cookie gives the eBPF programs.
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length describe `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Whether a netns inode is still in use by a process or named in /var/run/netns.
pub fn still_present(inode: u64, current: &[NetnsRef]) -> bool {
    current.iter().any(|n| n.inode == inode)
}

/// Turns on `net.ipv4.tcp_migrate_req` (Linux 5.14+) in the network namespace the calling
/// thread is in; call it inside [`run_in`]. With it, when a listener closes, the connections
/// in its accept queue move to another listener of its `SO_REUSEPORT` group instead of being
/// reset: what makes a ztunnel hand-over lose none of the connections the old ztunnel had
/// queued but not accepted. It covers IPv6 sockets too.
///
/// `/proc/sys/net` shows the opening thread's namespace. In an unprivileged container the
/// runtime mounts `/proc/sys` read-only; then the same file of a procfs mounted privately
/// (ztunnel holds CAP_SYS_ADMIN) is used.
pub fn enable_request_migration() -> io::Result<()> {
    const SYSCTL: &str = "sys/net/ipv4/tcp_migrate_req";
    let set = |proc: &std::path::Path| -> io::Result<()> {
        let path = proc.join(SYSCTL);
        if fs::read_to_string(&path)?.trim() == "1" {
            return Ok(());
        }
        fs::write(&path, "1")
    };
    match set(std::path::Path::new("/proc")) {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => match private_proc() {
            Some(proc) => set(proc),
            None => Err(e),
        },
        other => other,
    }
}

/// A procfs of ztunnel's own, mounted once (first use) where /proc/sys is read-only.
fn private_proc() -> Option<&'static std::path::Path> {
    static PROC: OnceLock<Option<PathBuf>> = OnceLock::new();
    PROC.get_or_init(|| match crate::private_mount::mount(c"proc", "proc") {
        Ok(dir) => Some(dir),
        Err(e) => {
            tracing::debug!("mounting a private procfs: {e}");
            None
        }
    })
    .as_deref()
}
