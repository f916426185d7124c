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
