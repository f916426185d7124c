//! The harness for Warren's end-to-end tests: network namespaces joined by veths, the real
//! binaries started inside them, and sockets opened inside pods straight from the test.
//!
//! Everything is named uniquely per test (tests run in parallel) and torn down by `Drop`, so a
//! failing or panicking test still removes its namespaces, processes and pins.

pub mod controller;
pub mod foreign;
pub mod kube;
pub mod netns;
pub mod topology;
pub mod waypoint;
pub mod ztunnel;

use std::time::{Duration, Instant};

/// A name no other test in any concurrent run uses: `prefix` + pid + counter, short enough
/// for interface names (15 bytes).
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A proxy's log file once its buffered lines are out: the proxies write info lines in
/// batches up to `warren_core::logging::MAX_DELAY` after they are logged, so the file is read
/// until it has not grown for longer than that (at most 3 s).
pub fn settled_log(path: &std::path::Path) -> String {
    let read = || std::fs::read_to_string(path).unwrap_or_default();
    let quiet = warren_core::logging::MAX_DELAY + Duration::from_millis(50);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut text = read();
    loop {
        std::thread::sleep(quiet);
        let again = read();
        if again.len() == text.len() || Instant::now() > deadline {
            return again;
        }
        text = again;
    }
}

/// A process's CPU time (user + system) so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" that ends the command name: utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// End-to-end tests need root (namespaces, BPF); say so plainly instead of failing obscurely.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "Warren's end-to-end tests need root (network namespaces and BPF)"
    );
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The cgroup v2 mount (a hybrid layout puts it at /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> std::path::PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2").then(|| left.split_whitespace().nth(4))?
        })
        .map(std::path::PathBuf::from)
        .expect("a cgroup2 mount")
}

pub mod app;
