//! A real ztunnel process for one test node: started inside the node's netns with its own
//! cgroup, pin directory and workloads file; stopped, uninstalled and cleaned up on drop.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use serde_json::Value;
use warren_core::model::{NodeConfig, Workload};

use crate::{topology::Node, wait_until};

/// Where cargo put the workspace's binaries: `WARREN_BIN_DIR` if set, else beside this
/// executable (xtask), or one level up from a test executable in `deps/`.
pub fn binary(name: &str) -> PathBuf {
    // The benchmark points this at the release binaries.
    if let Some(dir) = std::env::var_os("WARREN_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("current exe");
    let here = exe.parent().expect("exe dir");
    let candidates = [here.join(name), here.parent().unwrap_or(here).join(name)];
    let found = candidates.iter().find(|p| p.is_file());
    found.cloned().unwrap_or_else(|| {
        panic!("{} is not built: run `cargo build --bins` first (`./x test` does)", candidates[1].display())
    })
}

/// A mesh root for a test: written where ztunnel's `--dev-ca-dir` reads it, shared by every
/// ztunnel of one test cluster, and usable by the test itself to sign certificates.
pub struct MeshCa {
    pub ca: warren_core::ca::Ca,
    pub dir: PathBuf,
}

impl MeshCa {
    pub fn new() -> Self {
        let ca = warren_core::ca::Ca::generate("cluster.local").expect("generate root");
        let dir = std::env::temp_dir().join("warren-e2e").join(crate::unique_name("ca"));
        fs::create_dir_all(&dir).expect("CA dir");
        fs::write(dir.join("root-cert.pem"), ca.root_pem()).expect("write root");
        fs::write(dir.join("root-key.pem"), ca.key_pem()).expect("write key");
        MeshCa { ca, dir }
    }
}

impl Default for MeshCa {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for MeshCa {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub struct Ztunnel {
    pub node: String,
    netns: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    cgroup: String,
    /// How it gets certificates: `--dev-ca-dir DIR`, or `--ca-addr ... --ca-root ... --ca-token-file ...`.
    ca_args: Vec<String>,
    /// The config file ztunnel reads (written by the test, or by a controller).
    workloads_file: PathBuf,
    extra_args: Vec<String>,
    /// Run as a container runtime runs an unprivileged container: in its cgroup, but inside a
    /// private cgroup namespace (so its cgroup reads as `/`), without `--own-cgroup`.
    private_cgroup_namespace: bool,
    /// The CA this ztunnel made for itself (when not given one).
    _own_ca: Option<MeshCa>,
    /// Whether dropping it uninstalls the node's pins (not when another ztunnel took over).
    uninstall_on_drop: bool,
    /// The binary: this workspace's, or an earlier release's (which has no readiness socket).
    program: PathBuf,
    earlier_release: bool,
}

pub const ADMIN: &str = "127.0.0.1:15000";

/// CPU that ztunnels started from now on are pinned to (all threads), or -1. The benchmark
/// pins every process of a measured path to one vCPU.
pub static PIN_CPU: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Makes `cmd` run pinned to `cpu` (set before exec, so every thread inherits it).
pub fn pin_command(cmd: &mut std::process::Command, cpu: usize) {
    use std::os::unix::process::CommandExt;
    // SAFETY: sched_setaffinity is async-signal-safe; the set is built before exec.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// ztunnel's arguments for the development CA in `ca`.
fn dev_ca_args(ca: &MeshCa) -> Vec<String> {
    vec!["--dev-ca-dir".into(), ca.dir.display().to_string()]
}

impl Ztunnel {
    /// Starts ztunnel for `node` with these workloads and a CA of its own, and waits until it
    /// is ready.
    pub fn start(node: &Node, workloads: &[Workload]) -> Self {
        let ca = MeshCa::new();
        let mut z = Self::start_with(node, workloads, &ca, &[]);
        z._own_ca = Some(ca);
        z
    }

    /// Starts ztunnel for `node` with the mesh root `ca` and extra `run` arguments.
    pub fn start_with(node: &Node, workloads: &[Workload], ca: &MeshCa, extra_args: &[&str]) -> Self {
        Self::start_instance(node, "", Some(workloads), None, dev_ca_args(ca), extra_args, false)
    }

    /// Starts ztunnel reading its config from `config_file`, which someone else (a controller)
    /// writes.
    pub fn start_reading(node: &Node, config_file: &std::path::Path, ca: &MeshCa) -> Self {
        Self::start_instance(node, "", None, Some(config_file.to_path_buf()), dev_ca_args(ca), &[], false)
    }

    /// Starts ztunnel reading `config_file` and asking the controller's CA at `ca_addr` for
    /// certificates, with the mesh root `root_pem` and this node's `token_file`.
    pub fn start_with_remote_ca(
        node: &Node,
        config_file: &std::path::Path,
        ca_addr: SocketAddr,
        root_pem: &std::path::Path,
        token_file: &std::path::Path,
    ) -> Self {
        let ca_args = vec![
            "--ca-addr".into(),
            ca_addr.to_string(),
            "--ca-root".into(),
            root_pem.display().to_string(),
            "--ca-token-file".into(),
            token_file.display().to_string(),
        ];
        Self::start_instance(node, "", None, Some(config_file.to_path_buf()), ca_args, &[], false)
    }

    /// Starts ztunnel subscribed to the controller's config stream at `controller` (the CA's
    /// address), with the mesh root `root_pem` and this node's `token_file`.
    pub fn start_with_controller(
        node: &Node,
        controller: SocketAddr,
        root_pem: &std::path::Path,
        token_file: &std::path::Path,
    ) -> Self {
        let args = vec![
            "--controller".to_string(),
            controller.to_string(),
            "--ca-addr".into(),
            controller.to_string(),
            "--ca-root".into(),
            root_pem.display().to_string(),
            "--ca-token-file".into(),
            token_file.display().to_string(),
        ];
        Self::start_instance(node, "", None, None, args, &[], false)
    }

    /// Starts a second ztunnel on `node` while the first still runs, as a rolling update's new
    /// pod: the same node, pins and ports, its own cgroup (`instance` names it), log, config
    /// file and readiness socket. Returns once it is ready, asked on its own socket.
    pub fn start_beside(
        node: &Node,
        workloads: &[Workload],
        ca: &MeshCa,
        instance: &str,
        extra_args: &[&str],
    ) -> Self {
        Self::start_instance(node, instance, Some(workloads), None, dev_ca_args(ca), extra_args, false)
    }

    /// Starts `program`, a ztunnel binary of a release before hand-over support (no readiness
    /// socket; ready when its admin endpoint says so).
    pub fn start_earlier_release(
        node: &Node,
        workloads: &[Workload],
        ca: &MeshCa,
        program: PathBuf,
        extra_args: &[&str],
    ) -> Self {
        let mut z = Self::prepare(node, "", Some(workloads), None, dev_ca_args(ca), extra_args);
        z.program = program;
        z.earlier_release = true;
        z.spawn(node);
        z
    }

    fn start_instance(
        node: &Node,
        instance: &str,
        workloads: Option<&[Workload]>,
        config_file: Option<PathBuf>,
        ca_args: Vec<String>,
        extra_args: &[&str],
        private_cgroup_namespace: bool,
    ) -> Self {
        let mut z = Self::prepare(node, instance, workloads, config_file, ca_args, extra_args);
        z.private_cgroup_namespace = private_cgroup_namespace;
        z.spawn(node);
        z
    }

    fn prepare(
        node: &Node,
        instance: &str,
        workloads: Option<&[Workload]>,
        config_file: Option<PathBuf>,
        ca_args: Vec<String>,
        extra_args: &[&str],
    ) -> Self {
        let name = if instance.is_empty() { node.name.clone() } else { format!("{}-{instance}", node.name) };
        let dir = std::env::temp_dir().join("warren-e2e").join(&name);
        fs::create_dir_all(&dir).expect("temp dir");
        let z = Ztunnel {
            workloads_file: config_file.unwrap_or_else(|| dir.join("workloads.json")),
            node: node.name.clone(),
            netns: node.ns.path(),
            dir,
            child: None,
            cgroup: format!("warren-e2e/{name}"),
            ca_args,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            private_cgroup_namespace: false,
            _own_ca: None,
            uninstall_on_drop: true,
            program: binary("ztunnel"),
            earlier_release: false,
        };
        if let Some(workloads) = workloads {
            z.set_workloads(workloads);
        }
        z
    }

    /// As [`Ztunnel::start_with`], but run the way a container runtime runs an unprivileged
    /// container: in its own cgroup seen through a private cgroup namespace (its cgroup reads
    /// as `/`), without `--own-cgroup`, and in a mount namespace of its own (host mounts still
    /// propagate in, as with `mountPropagation: HostToContainer`) where `/proc/sys` is
    /// read-only.
    pub fn start_in_private_cgroup_namespace(node: &Node, workloads: &[Workload], ca: &MeshCa) -> Self {
        Self::start_instance(node, "", Some(workloads), None, dev_ca_args(ca), &[], true)
    }

    fn spawn(&mut self, node: &Node) {
        let log = fs::File::create(self.log_path()).expect("log file");
        let mut command = node.ns.command(&self.program);
        let cpu = PIN_CPU.load(std::sync::atomic::Ordering::Relaxed);
        if cpu >= 0 {
            pin_command(&mut command, cpu as usize);
        }
        command.args(["run", "--node", &self.node, "--log-format", "json"]);
        // Config from a file, unless it subscribes to the controller's stream.
        if !self.ca_args.iter().any(|a| a == "--controller") {
            command.arg("--workloads").arg(&self.workloads_file);
        }
        if self.private_cgroup_namespace {
            let dir = crate::cgroup2_mount().join(&self.cgroup);
            fs::create_dir_all(&dir).expect("ztunnel's cgroup");
            let procs =
                std::ffi::CString::new(dir.join("cgroup.procs").into_os_string().into_encoded_bytes())
                    .expect("no NUL");
            // SAFETY: open/write/close/unshare are async-signal-safe; the buffers are built
            // before fork.
            unsafe {
                use std::os::unix::process::CommandExt;
                command.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0" joins the writing process itself.
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if written != 1 || libc::unshare(libc::CLONE_NEWCGROUP | libc::CLONE_NEWNS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let (null, no_data) = (std::ptr::null(), std::ptr::null());
                    let sys = c"/proc/sys".as_ptr();
                    let slave = libc::MS_REC | libc::MS_SLAVE;
                    let read_only = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
                    if libc::mount(null, c"/".as_ptr(), null, slave, no_data) != 0
                        || libc::mount(sys, sys, null, libc::MS_BIND | libc::MS_REC, no_data) != 0
                        || libc::mount(null, sys, null, read_only, no_data) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        } else {
            command.args(["--own-cgroup", &self.cgroup]);
        }
        if !self.earlier_release {
            command.arg("--readiness-socket").arg(self.readiness_socket());
        }
        let child = command
            .args(["--reconcile-interval-ms", "100"])
            .args(&self.ca_args)
            .args(&self.extra_args)
            .env("WARREN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start ztunnel");
        self.child = Some(child);
        // Its own socket: the admin port may be another ztunnel's on this node.
        let earlier = self.earlier_release;
        let ready = wait_until(Duration::from_secs(20), || {
            (if earlier { self.get("/healthz/ready").is_ok() } else { self.ready() }) || self.exited()
        });
        assert!(ready && !self.exited(), "ztunnel did not become ready:\n{}", self.log());
    }

    /// The readiness socket only this process serves (`--readiness-socket`).
    pub fn readiness_socket(&self) -> PathBuf {
        self.dir.join("ready.sock")
    }

    /// Whether it says it is ready on its readiness socket.
    pub fn ready(&self) -> bool {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(self.readiness_socket()) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut text = String::new();
        s.write_all(b"GET /healthz/ready HTTP/1.0\r\n\r\n").is_ok()
            && s.read_to_string(&mut text).is_ok()
            && text.lines().next().is_some_and(|status| status.split_whitespace().nth(1) == Some("200"))
    }

    /// Dropping it leaves the node's pins: another ztunnel took over from it.
    pub fn keep_pins_on_drop(&mut self) {
        self.uninstall_on_drop = false;
    }

    /// Starts it again after `stop` (same node, same pins).
    pub fn restart(&mut self, node: &Node) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn(node);
    }

    /// The ztunnel process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn exited(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("ztunnel.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The log once ztunnel has written what it buffered (info lines wait up to
    /// `warren_core::logging::MAX_DELAY`; warnings and errors are written at once).
    pub fn settled_log(&self) -> String {
        crate::settled_log(&self.log_path())
    }

    /// JSON log lines (access log and events), once ztunnel has written what it buffered.
    pub fn log_lines(&self) -> Vec<Value> {
        self.settled_log().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Access-log records of one direction.
    pub fn access_log(&self, direction: &str) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|l| l["target"] == "access" && l["direction"] == direction)
            .collect()
    }

    /// Replaces the workloads file with just these workloads.
    pub fn set_workloads(&self, workloads: &[Workload]) {
        self.set_config(&NodeConfig { workloads: workloads.to_vec(), ..Default::default() });
    }

    /// Replaces the workloads file atomically (ztunnel re-reads it on change).
    pub fn set_config(&self, config: &NodeConfig) {
        let tmp = self.workloads_file.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(config).unwrap()).expect("write workloads");
        fs::rename(&tmp, &self.workloads_file).expect("rename workloads");
    }

    /// Replaces the config and waits until ztunnel has loaded it (its `/config_dump` shows it).
    pub fn apply_config(&self, config: &NodeConfig) {
        self.set_config(config);
        let want = serde_json::to_value(config).expect("serializable");
        let loaded = wait_until(Duration::from_secs(10), || {
            self.get("/config_dump")
                .ok()
                .and_then(|d| serde_json::from_str::<Value>(&d).ok())
                .is_some_and(|d| d["workloads"] == want)
        });
        assert!(loaded, "ztunnel {} did not load the new config:\n{}", self.node, self.log());
    }

    /// GET on the admin endpoint, from inside the node's netns.
    pub fn get(&self, path: &str) -> std::io::Result<String> {
        self.get_at(ADMIN.parse().unwrap(), path)
    }

    /// GET on any of ztunnel's HTTP endpoints (admin, :15020 metrics, :15021 readiness).
    pub fn get_at(&self, addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let netns = fs::File::open(&self.netns)?;
        let path = path.to_string();
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this short-lived thread only.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            if !head.contains(" 200 ") {
                return Err(std::io::Error::other(head.lines().next().unwrap_or("").to_string()));
            }
            Ok(body.to_string())
        })
        .join()
        .expect("admin thread")
    }

    /// The admin `/capture` view.
    pub fn capture(&self) -> Value {
        serde_json::from_str(&self.get("/capture").expect("GET /capture")).expect("JSON")
    }

    /// The enrolled pod named `uid` in `/capture`, if enrolled.
    pub fn enrolled_pod(&self, uid: &str) -> Option<Value> {
        let view = self.capture();
        view["pods"].as_array()?.iter().find(|p| p["uid"] == uid).cloned()
    }

    pub fn wait_enrolled(&self, uid: &str) -> Value {
        let mut pod = None;
        let ok = wait_until(Duration::from_secs(10), || {
            pod = self.enrolled_pod(uid);
            pod.is_some()
        });
        assert!(ok, "{uid} was not enrolled:\n{}", self.log());
        pod.unwrap()
    }

    pub fn wait_unenrolled(&self, uid: &str) {
        let ok = wait_until(Duration::from_secs(10), || self.enrolled_pod(uid).is_none());
        assert!(ok, "{uid} was not unenrolled:\n{}", self.log());
    }

    /// The admin `/config_dump`.
    pub fn config_dump(&self) -> Value {
        serde_json::from_str(&self.get("/config_dump").expect("GET /config_dump")).expect("JSON")
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.capture()["stats"][name].as_u64().unwrap_or(0)
    }

    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/warren").join(&self.node)
    }

    /// Sends SIGTERM and returns at once (ztunnel drains).
    pub fn terminate(&mut self) {
        if let Some(child) = &self.child {
            // SAFETY: plain kill(2) on our child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
    }

    /// Whether the process has exited within `timeout`.
    pub fn exits_within(&mut self, timeout: Duration) -> bool {
        wait_until(timeout, || self.exited())
    }

    /// SIGTERM and wait; the pins stay (capture fails closed while it is down).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on our child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            if !wait_until(Duration::from_secs(5), || child.try_wait().ok().flatten().is_some()) {
                let _ = child.kill();
            }
            let _ = child.wait();
            // Where it mounted its own procfs (a read-only /proc/sys), in its mount namespace,
            // gone with it: the empty directory is all that is left on the host.
            let _ = fs::remove_dir(std::env::temp_dir().join(format!("warren-proc-{}", child.id())));
        }
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self.stop();
        if self.uninstall_on_drop {
            let _ = std::process::Command::new(binary("ztunnel"))
                .args(["uninstall", "--node", &self.node])
                .stdout(Stdio::null())
                .status();
        }
        let cgroup = crate::cgroup2_mount().join(&self.cgroup);
        let _ = fs::remove_dir(&cgroup);
        // The shared parent goes with the last test that used it (fails while others run).
        let _ = cgroup.parent().map(fs::remove_dir);
        if std::thread::panicking() {
            eprintln!("--- ztunnel log ({}) ---\n{}", self.node, self.log());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
