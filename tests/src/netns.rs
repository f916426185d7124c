//! Named network namespaces (`ip netns`), and running code or processes inside them.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::Command,
};

use crate::sh;

/// A network namespace under /var/run/netns, deleted on drop.
pub struct Netns {
    pub name: String,
    deleted: bool,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(remove_orphans);
        sh("ip", &["netns", "add", name]);
        let ns = Netns { name: name.to_string(), deleted: false };
        // No IPv6 duplicate address detection: addresses (link-local ones included) are usable
        // at once, instead of failing neighbour discovery for a second or two after start.
        let no_dad = "echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad && echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad";
        sh("ip", &["netns", "exec", name, "sh", "-c", no_dad]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n <name> ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Runs `f` on a fresh thread inside this namespace; sockets it creates stay in it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: setns on this short-lived thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread inside the netns panicked")
    }

    /// A command that will run inside this namespace (network only: unlike `ip netns exec`,
    /// the mount namespace, and so /sys/fs/cgroup and /sys/fs/bpf, stay as they are).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let file = File::open(self.path()).expect("open netns");
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe; `file` is moved into the closure and lives
        // until exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Deletes the namespace now (the test checks what follows).
    pub fn delete(&mut self) {
        if !self.deleted {
            sh("ip", &["netns", "del", &self.name]);
            self.deleted = true;
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        }
    }
}

/// Deletes the namespaces that test processes no longer alive left behind. Drop deletes a
/// test's namespaces, also when it fails; a process that dies without unwinding (killed by a
/// timeout, aborted by a panic inside a panic, SIGPIPE'd when its output was cut short)
/// cannot, so the next run cleans up. Names are `w` + role + pid % 100,000 + `x` + counter
/// ([`crate::unique_name`]); one whose pid residue matches any live process is kept.
fn remove_orphans() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    // Processes read after the list: a namespace listed was made by a process that existed
    // then, so one started meanwhile is never mistaken for dead.
    let live = live_pid_residues();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if orphan_pid(name).is_some_and(|pid| !live.contains(&pid)) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// The pid residue in a namespace name of this harness (`wp12345x6`, `wn...`, `wu...`).
fn orphan_pid(name: &str) -> Option<u32> {
    let rest =
        name.strip_prefix("wp").or_else(|| name.strip_prefix("wn")).or_else(|| name.strip_prefix("wu"))?;
    let (pid, counter) = rest.split_once('x')?;
    counter.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// pid % 100,000 of every live process.
fn live_pid_residues() -> std::collections::HashSet<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .map(|pid| pid % 100_000)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_harness_names_carry_a_pid() {
        assert_eq!(orphan_pid("wp19978x4"), Some(19978));
        assert_eq!(orphan_pid("wu19978x3"), Some(19978));
        assert_eq!(orphan_pid("wn7x0"), Some(7));
        assert_eq!(orphan_pid("cni-1234"), None);
        assert_eq!(orphan_pid("wpx1"), None);
        assert_eq!(orphan_pid("wp12x"), None);
    }

    /// For real: a namespace of a dead process goes, one of this process stays.
    #[test]
    fn a_dead_processes_namespaces_are_removed_and_live_ones_kept() {
        crate::require_root();
        let live = live_pid_residues();
        let dead = (1..100_000).rev().find(|r| !live.contains(r)).expect("a residue no process has");
        let orphan = format!("wu{dead}x0");
        sh("ip", &["netns", "add", &orphan]);
        let mine = Netns::new(&crate::unique_name("wu"));
        remove_orphans();
        let names = sh("ip", &["netns", "list"]);
        let listed = |n: &str| names.lines().any(|l| l.split_whitespace().next() == Some(n));
        let gone = !listed(&orphan);
        if !gone {
            let _ = Command::new("ip").args(["netns", "del", &orphan]).status();
        }
        assert!(gone, "{orphan} was left:\n{names}");
        assert!(listed(&mine.name), "{} was removed:\n{names}", mine.name);
    }
}
