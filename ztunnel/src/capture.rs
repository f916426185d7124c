//! The eBPF capture programs: loading them into the kernel, attaching them, pinning, and the
//! maps ztunnel reads and writes.
//!
//! Maps and links are pinned under `<bpffs>/warren/<node>/`, so a ztunnel restart neither loses
//! the enrolled pods nor opens a bypass: while ztunnel is down, captured connects are still
//! rewritten to its (closed) listener and refused, and inbound connections are dropped.

use std::{
    collections::HashSet,
    fs::{self, File},
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use serde::Serialize;
use warren_ebpf_types::{
    ConnKey, EnrolledPod, ListenerKey, ListenerKind, SockAddr16, ZtunnelInstance, global_names, map_names,
    program_names,
};

/// The capture programs, built by build.rs from ebpf/programs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/warren-capture"));

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("this ztunnel was built with AYA_BUILD_SKIP=1 and holds no eBPF object: rebuild it without")]
    NoObject,
    #[error("the BPF filesystem at {path}: {source}")]
    Bpffs { path: PathBuf, source: io::Error },
    #[error(
        "loading the eBPF object into the kernel failed ({source}); the kernel needs BPF, BTF and the {needs}"
    )]
    Load { needs: &'static str, source: aya::EbpfError },
    #[error("program {program}: {action} failed: {source}. It needs {feature}")]
    Program {
        program: &'static str,
        action: &'static str,
        feature: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: aya::maps::MapError },
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("opening {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
}

/// Load-time facts the programs need.
pub struct CaptureSettings<'a> {
    pub pin_dir: &'a Path,
    pub cgroup2_root: &'a Path,
    pub mark: u32,
    pub ebpf_debug_logs: bool,
}

/// One attachment, as the admin view lists it.
#[derive(Clone, Debug, Serialize)]
pub struct Attachment {
    pub program: &'static str,
    pub program_id: u32,
    pub link_id: u32,
    pub attach_point: String,
    pub pin: PathBuf,
}

pub struct Capture {
    programs: Mutex<Programs>,
    enrolled: Mutex<BpfHashMap<MapData, u64, EnrolledPod>>,
    listeners: Mutex<SockHash<MapData, ListenerKey>>,
    original_dst: Mutex<BpfHashMap<MapData, ConnKey, SockAddr16>>,
    pending_dst: BpfHashMap<MapData, u64, SockAddr16>,
    probe_sources: Mutex<BpfHashMap<MapData, [u8; 16], u8>>,
    ztunnels: Mutex<BpfHashMap<MapData, u64, ZtunnelInstance>>,
    pin_dir: PathBuf,
}

struct Programs {
    ebpf: Ebpf,
    cgroup_attachments: Vec<Attachment>,
    _cgroup_links: Vec<PinnedLink>,
}

/// cgroup attachments through BPF links always coexist with other programs on the cgroup
/// (the kernel's multi-attach mode); the link API refuses the legacy ALLOW_MULTI flag, which
/// aya sends for `AllowMultiple`. `Single` sends no flag, which is what a link wants.
const LINK_ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// Features named in errors, so an operator knows what the kernel lacks.
const CGROUP_SOCK_ADDR_FEATURE: &str =
    "cgroup v2 BPF (CONFIG_CGROUP_BPF) with BPF links for cgroups (Linux 5.7+)";
const SOCK_OPS_FEATURE: &str = "BPF sock_ops on cgroup v2 with BPF links (Linux 5.7+)";
const SK_LOOKUP_FEATURE: &str = "BPF sk_lookup (Linux 5.9+, CONFIG_INET)";

impl Capture {
    /// Loads the programs (reusing pinned maps), attaches connect4/6 and sock_ops to the cgroup
    /// v2 root in multi-attach mode, and replaces links a previous ztunnel left pinned.
    pub fn load(settings: &CaptureSettings<'_>) -> Result<Self, CaptureError> {
        if OBJECT.is_empty() {
            return Err(CaptureError::NoObject);
        }
        let pin_dir = settings.pin_dir.to_path_buf();
        fs::create_dir_all(pin_dir.join("links"))
            .map_err(|source| CaptureError::Bpffs { path: pin_dir.clone(), source })?;
        let log_level: u8 = if settings.ebpf_debug_logs { 4 } else { 0 };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .override_global(global_names::ZTUNNEL_MARK, &settings.mark, true)
            .override_global("AYA_LOG_LEVEL", &log_level, false)
            .load(OBJECT)
            .map_err(|source| CaptureError::Load {
                needs: "program types cgroup/connect, sock_ops and sk_lookup",
                source,
            })?;
        if settings.ebpf_debug_logs {
            spawn_ebpf_logger(&mut ebpf);
        }

        let cgroup = File::open(settings.cgroup2_root)
            .map_err(|source| CaptureError::Open { path: settings.cgroup2_root.to_path_buf(), source })?;
        let root = settings.cgroup2_root.display().to_string();
        let mut attachments = Vec::new();
        let mut links = Vec::new();
        for name in [program_names::CONNECT4, program_names::CONNECT6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            let fail = |action, source| CaptureError::Program {
                program: name,
                action,
                feature: CGROUP_SOCK_ADDR_FEATURE,
                source: Box::new(source),
            };
            prog.load().map_err(|e| fail("loading", e))?;
            let id = prog.attach(&cgroup, LINK_ATTACH_MODE).map_err(|e| fail("attaching", e))?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|e| fail("taking the link", e))?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| fail("taking the link", e.into()))?;
            let program_id = prog.info().map(|i| i.id()).unwrap_or_default();
            let (att, pinned) = pin_replacing(&pin_dir, name, name, program_id, &root, link)?;
            attachments.push(att);
            links.push(pinned);
        }
        {
            let name = program_names::SOCK_OPS;
            let prog: &mut SockOps = program(&mut ebpf, name)?;
            let fail = |action, source| CaptureError::Program {
                program: name,
                action,
                feature: SOCK_OPS_FEATURE,
                source: Box::new(source),
            };
            prog.load().map_err(|e| fail("loading", e))?;
            let id = prog.attach(&cgroup, LINK_ATTACH_MODE).map_err(|e| fail("attaching", e))?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|e| fail("taking the link", e))?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| fail("taking the link", e.into()))?;
            let program_id = prog.info().map(|i| i.id()).unwrap_or_default();
            let (att, pinned) = pin_replacing(&pin_dir, name, name, program_id, &root, link)?;
            attachments.push(att);
            links.push(pinned);
        }
        {
            let prog: &mut SkLookup = program(&mut ebpf, program_names::SK_LOOKUP)?;
            prog.load().map_err(|source| CaptureError::Program {
                program: program_names::SK_LOOKUP,
                action: "loading",
                feature: SK_LOOKUP_FEATURE,
                source: Box::new(source),
            })?;
        }

        let enrolled = take_map(&mut ebpf, map_names::ENROLLED)?;
        let original_dst = take_map(&mut ebpf, map_names::ORIGINAL_DST)?;
        let pending_dst = take_map(&mut ebpf, map_names::PENDING_ORIGINAL_DST)?;
        let probe_sources = take_map(&mut ebpf, map_names::PROBE_SOURCES)?;
        let ztunnels = take_map(&mut ebpf, map_names::ZTUNNELS)?;
        let listeners = {
            let map = ebpf.take_map(map_names::LISTENERS).ok_or(CaptureError::Map {
                map: map_names::LISTENERS,
                source: aya::maps::MapError::InvalidName { name: map_names::LISTENERS.into() },
            })?;
            SockHash::try_from(map)
                .map_err(|source| CaptureError::Map { map: map_names::LISTENERS, source })?
        };
        Ok(Capture {
            programs: Mutex::new(Programs { ebpf, cgroup_attachments: attachments, _cgroup_links: links }),
            enrolled: Mutex::new(enrolled),
            listeners: Mutex::new(listeners),
            original_dst: Mutex::new(original_dst),
            pending_dst,
            probe_sources: Mutex::new(probe_sources),
            ztunnels: Mutex::new(ztunnels),
            pin_dir,
        })
    }

    /// The root-cgroup attachments (connect4, connect6, sock_ops).
    pub fn cgroup_attachments(&self) -> Vec<Attachment> {
        self.programs.lock().expect("poisoned").cgroup_attachments.clone()
    }

    /// Attaches sk_lookup to a pod's netns, pinned by netns cookie (replacing a pin a previous
    /// ztunnel left).
    pub fn attach_sk_lookup(
        &self,
        netns: &File,
        cookie: u64,
        netns_path: &Path,
    ) -> Result<(Attachment, PinnedLink), CaptureError> {
        let name = program_names::SK_LOOKUP;
        let mut programs = self.programs.lock().expect("poisoned");
        let prog: &mut SkLookup = program(&mut programs.ebpf, name)?;
        let fail = |action, source| CaptureError::Program {
            program: name,
            action,
            feature: SK_LOOKUP_FEATURE,
            source: Box::new(source),
        };
        let id = prog.attach(netns).map_err(|e| fail("attaching", e))?;
        let link: FdLink = prog.take_link(id).map_err(|e| fail("taking the link", e))?.into();
        let program_id = prog.info().map(|i| i.id()).unwrap_or_default();
        let attach_point = netns_path.display().to_string();
        pin_replacing(&self.pin_dir, &sk_lookup_pin_name(cookie), name, program_id, &attach_point, link)
    }

    /// Detaches a pod's sk_lookup link, whether this process or a previous one pinned it.
    pub fn detach_sk_lookup(&self, cookie: u64, link: Option<PinnedLink>) {
        let pin = self.pin_dir.join("links").join(sk_lookup_pin_name(cookie));
        let link = link.or_else(|| PinnedLink::from_pin(&pin).ok());
        if let Some(link) = link {
            // Unpinning drops the last reference: the kernel detaches the program.
            if let Err(e) = link.unpin() {
                tracing::warn!(pin = %pin.display(), "unpinning sk_lookup link: {e}");
            }
        }
    }

    pub fn enroll(&self, cookie: u64) -> Result<(), CaptureError> {
        self.enrolled
            .lock()
            .expect("poisoned")
            .insert(&cookie, &EnrolledPod::default(), 0)
            .map_err(|source| CaptureError::Map { map: map_names::ENROLLED, source })
    }

    pub fn unenroll(&self, cookie: u64) {
        let _ = self.enrolled.lock().expect("poisoned").remove(&cookie);
    }

    /// Netns cookies in the enrolled map (including ones a previous ztunnel left).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.enrolled.lock().expect("poisoned").keys().filter_map(Result::ok).collect()
    }

    /// Cookies that have a pinned sk_lookup link under this node's pin directory.
    pub fn pinned_sk_lookup_cookies(&self) -> Vec<u64> {
        let Ok(entries) = fs::read_dir(self.pin_dir.join("links")) else {
            return vec![];
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("sk_lookup-")?.parse().ok())
            .collect()
    }

    pub fn add_listener(
        &self,
        pod_ip: IpAddr,
        kind: ListenerKind,
        listener: &impl std::os::fd::AsRawFd,
    ) -> Result<(), CaptureError> {
        let key = ListenerKey::new(mapped(pod_ip), kind);
        // SAFETY: the fd stays open for the duration of the call; the map takes its own ref.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(listener.as_raw_fd()) };
        self.listeners
            .lock()
            .expect("poisoned")
            .insert(&key, fd, 0)
            .map_err(|source| CaptureError::Map { map: map_names::LISTENERS, source })
    }

    /// The keys the listener map holds now. An entry goes when its socket closes: a ztunnel
    /// that handed over and exited takes out what it had registered last.
    pub fn registered_listeners(&self) -> HashSet<ListenerKey> {
        self.listeners.lock().expect("poisoned").keys().filter_map(Result::ok).collect()
    }

    pub fn remove_listener(&self, pod_ip: IpAddr, kind: ListenerKind) {
        let _ = self.listeners.lock().expect("poisoned").remove(&ListenerKey::new(mapped(pod_ip), kind));
    }

    /// The original destination of a connection accepted on the outbound listener of the pod
    /// netns `cookie`, by its peer address; the entry is consumed.
    pub fn take_original_dst(&self, cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = ConnKey { netns_cookie: cookie, client: SockAddr16::new(mapped(peer.ip()), peer.port()) };
        let mut map = self.original_dst.lock().expect("poisoned");
        let dst = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(SocketAddr::new(unmapped(dst.addr), dst.port))
    }

    /// Entries in the original-destination map (stale ones show up here).
    pub fn original_dst_entries(&self) -> usize {
        self.original_dst.lock().expect("poisoned").keys().count()
    }

    /// Entries parked by connect4/6 that sock_ops has not moved yet.
    pub fn pending_dst_entries(&self) -> usize {
        self.pending_dst.keys().count()
    }

    /// Exempts this process's cgroup from capture (with the mark), in the ztunnels map every
    /// ztunnel on the node shares. First removes entries of ztunnels that are gone.
    pub fn exempt(&self, cgroup_id: u64) -> Result<ZtunnelInstance, CaptureError> {
        let me = own_instance()
            .map_err(|source| CaptureError::Open { path: PathBuf::from("/proc/self/stat"), source })?;
        let mut map = self.ztunnels.lock().expect("poisoned");
        let entries: Vec<(u64, ZtunnelInstance)> = map.iter().filter_map(Result::ok).collect();
        for (cgroup, other) in entries {
            // Only a process of our own PID namespace can be checked (the chart's ztunnel runs
            // in the host's). An entry that stays although its ztunnel is gone is harmless: no
            // process can be in a deleted cgroup, and cgroup ids are not reused while the
            // machine runs; a cgroup that remains is a ztunnel's own (`--own-cgroup`, where a
            // restarted ztunnel replaces the entry).
            if cgroup != cgroup_id && other.pid_namespace == me.pid_namespace && !is_running(&other) {
                tracing::info!(
                    cgroup_id = cgroup,
                    pid = other.pid,
                    "removing the exemption of a ztunnel that is gone"
                );
                let _ = map.remove(&cgroup);
            }
        }
        map.insert(&cgroup_id, &me, 0)
            .map_err(|source| CaptureError::Map { map: map_names::ZTUNNELS, source })?;
        Ok(me)
    }

    /// Ends the exemption [`Capture::exempt`] gave, unless another process has taken the
    /// entry over (a ztunnel restarted in the same cgroup): the other ztunnel of a hand-over
    /// keeps its own.
    pub fn unexempt(&self, cgroup_id: u64, me: &ZtunnelInstance) {
        let mut map = self.ztunnels.lock().expect("poisoned");
        if map.get(&cgroup_id, 0).is_ok_and(|v| v == *me) {
            let _ = map.remove(&cgroup_id);
        }
    }

    /// Whether connect programs of a ztunnel from a release before the ztunnels map (one
    /// that exempted its own cgroup only, by a load-time global) are still loaded for this
    /// node: programs named like ours that use this node's pinned enrolled map but not its
    /// ztunnels map. A rolling update from such a release runs this ztunnel beside one; until
    /// it exits (its programs go with its last link), they would capture this ztunnel's own
    /// connections out of pods, so this one must not enroll any.
    pub fn earlier_release_attached(&self) -> bool {
        let id = |name: &str| aya::maps::MapInfo::from_pin(self.pin_dir.join(name)).map(|m| m.id()).ok();
        let (Some(enrolled), Some(ztunnels)) = (id(map_names::ENROLLED), id(map_names::ZTUNNELS)) else {
            return false;
        };
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| matches!(p.name_as_str(), Some(program_names::CONNECT4 | program_names::CONNECT6)))
            .any(|p| {
                let maps = p.map_ids().ok().flatten().unwrap_or_default();
                maps.contains(&enrolled) && !maps.contains(&ztunnels)
            })
    }

    /// The exempt ztunnel cgroups, for the admin view.
    pub fn exempt_cgroups(&self) -> Vec<u64> {
        self.ztunnels.lock().expect("poisoned").keys().filter_map(Result::ok).collect()
    }

    pub fn set_probe_sources(&self, sources: &[IpAddr]) -> Result<(), CaptureError> {
        let mut map = self.probe_sources.lock().expect("poisoned");
        let old: Vec<[u8; 16]> = map.keys().filter_map(Result::ok).collect();
        for k in old {
            let _ = map.remove(&k);
        }
        for ip in sources {
            map.insert(&mapped(*ip), &1, 0)
                .map_err(|source| CaptureError::Map { map: map_names::PROBE_SOURCES, source })?;
        }
        Ok(())
    }
}

/// Removes everything this node's ztunnel pinned: links detach, maps go. Used by `uninstall`;
/// ztunnel must not be running.
pub fn uninstall(pin_dir: &Path) -> io::Result<bool> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    fs::remove_dir_all(pin_dir)?;
    // The shared parent goes too once the last node's pins are gone.
    if let Some(parent) = pin_dir.parent() {
        let _ = fs::remove_dir(parent);
    }
    Ok(true)
}

/// Whether the pins under `pin_dir` are an earlier release's: capture programs pinned, but no
/// ztunnels map (that release exempted its own cgroup through a load-time constant). Checked
/// before loading: once this release loads, the map is pinned.
pub fn earlier_release_pinned(pin_dir: &Path) -> bool {
    pin_dir.join("links").join(program_names::CONNECT4).exists()
        && !pin_dir.join(map_names::ZTUNNELS).exists()
}

/// This process as the ztunnels map records it.
fn own_instance() -> io::Result<ZtunnelInstance> {
    use std::os::unix::fs::MetadataExt;
    let pid = std::process::id();
    let pid_namespace = fs::metadata("/proc/self/ns/pid")?.ino();
    let start_time = start_time(&fs::read_to_string("/proc/self/stat")?)
        .ok_or_else(|| io::Error::other("/proc/self/stat has no start time"))?;
    Ok(ZtunnelInstance { pid, _pad: 0, pid_namespace, start_time })
}

/// Whether the process an entry names still runs (same pid, same start time).
fn is_running(instance: &ZtunnelInstance) -> bool {
    fs::read_to_string(format!("/proc/{}/stat", instance.pid))
        .ok()
        .and_then(|stat| start_time(&stat))
        .is_some_and(|t| t == instance.start_time)
}

/// Field 22 of /proc/<pid>/stat. The command name (field 2) may hold spaces and parentheses:
/// count from the last ')'.
fn start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn sk_lookup_pin_name(cookie: u64) -> String {
    format!("sk_lookup-{cookie}")
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(CaptureError::Program {
        program: name,
        action: "finding it in the object",
        feature: "a ztunnel built from this repository",
        source: Box::new(aya::programs::ProgramError::NotLoaded),
    })?;
    prog.try_into().map_err(|source: aya::programs::ProgramError| CaptureError::Program {
        program: name,
        action: "reading its type",
        feature: "a ztunnel built from this repository",
        source: Box::new(source),
    })
}

fn take_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, CaptureError> {
    let map = ebpf.take_map(name).ok_or(CaptureError::Map {
        map: name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    BpfHashMap::try_from(map).map_err(|source| CaptureError::Map { map: name, source })
}

/// Pins `link` at links/<name>, first detaching whatever a previous ztunnel pinned there. The
/// new program is attached before the old one goes, so capture never has a gap.
fn pin_replacing(
    pin_dir: &Path,
    pin_name: &str,
    program: &'static str,
    program_id: u32,
    attach_point: &str,
    link: FdLink,
) -> Result<(Attachment, PinnedLink), CaptureError> {
    let path = pin_dir.join("links").join(pin_name);
    let pin_err = |reason: String| CaptureError::Pin { path: path.clone(), reason };
    if path.exists() {
        match PinnedLink::from_pin(&path) {
            Ok(old) => drop(old.unpin().map_err(|e| pin_err(e.to_string()))?),
            Err(_) => fs::remove_file(&path).map_err(|e| pin_err(e.to_string()))?,
        }
    }
    let link_id = link.info().map(|i| i.id()).unwrap_or_default();
    let pinned = link.pin(&path).map_err(|e| pin_err(e.to_string()))?;
    let attachment =
        Attachment { program, program_id, link_id, attach_point: attach_point.to_string(), pin: path };
    Ok((attachment, pinned))
}

fn spawn_ebpf_logger(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => {
            tokio::spawn(async move {
                // SAFETY: the logger owns its ring buffer fd and lives inside the AsyncFd.
                let registered = unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
                };
                let Ok(mut fd) = registered else {
                    return;
                };
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else {
                        return;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => tracing::warn!("eBPF logs unavailable: {e}"),
    }
}

pub fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn unmapped(octets: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(octets).to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 1000 10";
        assert_eq!(start_time(stat), Some(987654));
        assert_eq!(start_time("no parenthesis"), None);
    }

    #[test]
    fn this_process_is_running_and_a_different_start_time_is_not() {
        let me = own_instance().unwrap();
        assert!(is_running(&me));
        assert!(!is_running(&ZtunnelInstance { start_time: me.start_time + 1, ..me }));
    }
}
