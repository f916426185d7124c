//! A filesystem of ztunnel's own, mounted on a fresh directory under the temp dir: its view of
//! cgroup2 (to learn its cgroup inside a private cgroup namespace) or of procfs (where the
//! container's /proc/sys is read-only). Needs CAP_SYS_ADMIN.

use std::{
    ffi::{CStr, CString},
    fs, io,
    path::{Path, PathBuf},
};

/// Where [`mount`] mounts `name`: `<temp dir>/warren-<name>-<pid>`.
pub fn dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("warren-{name}-{}", std::process::id()))
}

/// Mounts a `fstype` filesystem (nosuid, nodev, noexec) on [`dir`]`(name)`.
pub fn mount(fstype: &CStr, name: &str) -> io::Result<PathBuf> {
    let dir = dir(name);
    fs::create_dir_all(&dir)?;
    let target = c_path(&dir)?;
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let error = io::Error::last_os_error();
        let _ = fs::remove_dir(&dir);
        return Err(error);
    }
    Ok(dir)
}

/// Undoes [`mount`]: detaches the filesystem and removes the directory.
pub fn unmount(dir: &Path) {
    if let Ok(target) = c_path(dir) {
        // SAFETY: a valid C string naming a mount point [`mount`] made.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = fs::remove_dir(dir);
}

fn c_path(dir: &Path) -> io::Result<CString> {
    CString::new(dir.as_os_str().as_encoded_bytes()).map_err(io::Error::other)
}
