//! cgroup v2: where the capture programs attach, and ztunnel's own cgroup (the exemption).

use std::{
    fs,
    io::Write,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup2 filesystem is mounted (none in /proc/self/mountinfo): Warren attaches its \
         connect programs to cgroup v2; mount it (mount -t cgroup2 none /sys/fs/cgroup) or pass --cgroup2-root"
    )]
    NotMounted,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "ztunnel runs in the host's root cgroup, shared with every process: its sockets could not be \
         told apart from pods'; give it a cgroup of its own with --own-cgroup (WARREN_OWN_CGROUP), or \
         run it in a container (its own cgroup, private cgroup namespaces are fine)"
    )]
    SharedRootCgroup,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.to_path_buf(), source }
}

/// The first cgroup2 mount in /proc/self/mountinfo.
pub fn find_cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    text.lines()
        .find_map(|line| {
            // "... mount-point options - fstype source super-options"
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or(CgroupError::NotMounted)
}

/// This process's cgroup v2 path relative to the cgroup2 root ("0::/path" in /proc/self/cgroup).
pub fn own_cgroup_path() -> Result<String, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    Ok(text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").to_string())
}

/// Moves this process into `relative` under `root`, creating it.
pub fn move_self_into(root: &Path, relative: &str) -> Result<(), CgroupError> {
    let dir = root.join(relative.trim_start_matches('/'));
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let procs = dir.join("cgroup.procs");
    let mut file = fs::OpenOptions::new().write(true).open(&procs).map_err(io_err(&procs))?;
    write!(file, "{}", std::process::id()).map_err(io_err(&procs))
}

/// The cgroup id (what bpf_get_current_cgroup_id returns) is the directory's inode number.
///
/// In a private cgroup namespace (what container runtimes give unprivileged containers) the
/// process's own cgroup reads as `/`: its id is then the root inode of a cgroup2 mount made
/// inside that namespace. Only the host's real root cgroup (inode 1) is refused.
pub fn cgroup_id(root: &Path, relative: &str) -> Result<u64, CgroupError> {
    if relative == "/" {
        return match namespaced_cgroup_id()? {
            Some(id) => Ok(id),
            None => Err(CgroupError::SharedRootCgroup),
        };
    }
    let dir = root.join(relative.trim_start_matches('/'));
    Ok(fs::metadata(&dir).map_err(io_err(&dir))?.ino())
}

/// The root cgroup's inode on cgroup v2.
const ROOT_CGROUP_INO: u64 = 1;

/// Mounts cgroup2 on a private directory, reads its root's inode (this namespace's root: our
/// own cgroup), unmounts. None when that is the host's root cgroup.
fn namespaced_cgroup_id() -> Result<Option<u64>, CgroupError> {
    let dir = crate::private_mount::mount(c"cgroup2", "cgroupns")
        .map_err(io_err(&crate::private_mount::dir("cgroupns")))?;
    let ino = fs::metadata(&dir).map(|m| m.ino());
    crate::private_mount::unmount(&dir);
    let ino = ino.map_err(io_err(&dir))?;
    Ok((ino != ROOT_CGROUP_INO).then_some(ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_machines_cgroup2_mount() {
        // Every machine this runs on has cgroup v2 somewhere (Warren requires it).
        let mount = find_cgroup2_mount().unwrap();
        assert!(mount.join("cgroup.procs").exists(), "{}", mount.display());
    }
}
