//! The controller in local mode for tests and the demo: a manifest directory, the config file
//! it writes, and `controller serve` (translation + the mesh CA) running inside a node's netns.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use crate::{
    topology::{Cluster, Pod},
    unique_name, wait_until,
    ztunnel::binary,
};

/// A pod manifest in `namespace`, with the IPs the harness gave the pod (it plays the kubelet).
pub fn pod_manifest(
    pod: &Pod,
    namespace: &str,
    name: &str,
    node: &str,
    sa: &str,
    extra_labels: &str,
) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{app: {name}{extra_labels}}}\n\
         spec:\n  serviceAccountName: {sa}\n  nodeName: {node}\n  containers: [{{name: app, image: echo}}]\n\
         status:\n  phase: Running\n  podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]\n",
        pod.ipv4, pod.ipv6
    )
}

/// An ambient (meshed) namespace manifest.
pub fn ambient_namespace(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {{istio.io/dataplane-mode: ambient}}\n"
    )
}

/// A directory of manifests and what the controller makes of it; removed on drop.
pub struct LocalMode {
    pub root: PathBuf,
    pub manifests: PathBuf,
    pub config: PathBuf,
    process: Option<Child>,
    /// Where `serve` runs (node 0's netns) and listens, for restarts.
    node0: Option<PathBuf>,
    ca_addr: Option<SocketAddr>,
    /// `serve`'s open-files limit (RLIMIT_NOFILE), when a test sets one.
    pub max_open_files: Option<u64>,
}

impl LocalMode {
    pub fn new(prefix: &str) -> Self {
        let root = std::env::temp_dir().join("warren-e2e").join(unique_name(prefix));
        let manifests = root.join("manifests");
        fs::create_dir_all(&manifests).expect("manifest dir");
        let config = root.join("config.json");
        LocalMode { root, manifests, config, process: None, node0: None, ca_addr: None, max_open_files: None }
    }

    /// Writes (or replaces) a manifest file atomically.
    pub fn write(&self, file: &str, text: &str) {
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        fs::write(&tmp, text).expect("write manifest");
        fs::rename(tmp, self.manifests.join(file)).expect("rename manifest");
    }

    pub fn remove(&self, file: &str) {
        fs::remove_file(self.manifests.join(file)).expect("remove manifest");
    }

    /// `controller watch` (translation only), in this process's netns.
    pub fn watch(&mut self) {
        let child = std::process::Command::new(binary("controller"))
            .args(["watch", "--interval-ms", "100", "--dir"])
            .arg(&self.manifests)
            .arg("--out")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the controller");
        self.process = Some(child);
        assert!(
            wait_until(Duration::from_secs(10), || self.config.exists()),
            "the controller wrote no config"
        );
    }

    /// `controller serve` (translation, the CA and the config stream) inside node 0's netns,
    /// on its underlay address, with a bootstrap token per node. Returns the CA address (the
    /// config stream's too). Its log is [`LocalMode::controller_log`].
    pub fn serve(&mut self, cluster: &Cluster) -> SocketAddr {
        let tokens: String = cluster.nodes.iter().map(|n| format!("{} token-{}\n", n.name, n.name)).collect();
        fs::write(self.root.join("tokens"), tokens).expect("tokens");
        for n in &cluster.nodes {
            fs::write(self.token_file(&n.name), format!("token-{}", n.name)).expect("token file");
        }
        let ca_addr = SocketAddr::new(cluster.underlay_ips[0], 15012);
        self.node0 = Some(cluster.nodes[0].ns.path());
        self.ca_addr = Some(ca_addr);
        self.start_serve();
        let ready = wait_until(Duration::from_secs(10), || self.config.exists() && self.root_pem().exists());
        assert!(ready, "the controller did not start:\n{}", self.controller_log());
        // The root is written before the CA listens.
        let listening = wait_until(Duration::from_secs(5), || {
            cluster.nodes[1 % cluster.nodes.len()].ns.run(move || {
                std::net::TcpStream::connect_timeout(&ca_addr, Duration::from_millis(200)).is_ok()
            })
        });
        assert!(listening, "the CA is not listening on {ca_addr}");
        ca_addr
    }

    fn start_serve(&mut self) {
        let (Some(node0), Some(ca_addr)) = (self.node0.clone(), self.ca_addr) else {
            panic!("serve() first");
        };
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("controller.log"))
            .expect("log");
        let netns = fs::File::open(node0).expect("node netns");
        let max_open_files = self.max_open_files;
        let mut command = std::process::Command::new(binary("controller"));
        // SAFETY: setns and setrlimit are async-signal-safe; the file lives until exec.
        unsafe {
            use std::os::{fd::AsRawFd, unix::process::CommandExt};
            command.pre_exec(move || {
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(n) = max_open_files {
                    let limit = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command
            .args(["serve", "--interval-ms", "100", "--listen", &ca_addr.to_string()])
            .arg("--dir")
            .arg(&self.manifests)
            .arg("--out")
            .arg(&self.config)
            .arg("--ca-dir")
            .arg(self.root.join("ca"))
            .arg("--tokens")
            .arg(self.root.join("tokens"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the controller");
        self.process = Some(child);
    }

    /// The running controller's process id.
    pub fn controller_pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// What the controller has logged so far.
    pub fn controller_log(&self) -> String {
        fs::read_to_string(self.root.join("controller.log")).unwrap_or_default()
    }

    /// Stops the controller (the proxies keep their last config).
    pub fn stop_controller(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Starts `serve` again, on the same address and directories (the root is kept).
    pub fn restart_controller(&mut self) {
        self.stop_controller();
        self.start_serve();
    }

    /// `controller proxy-status --json` against the running controller (from node 0's netns).
    pub fn proxy_status(&self) -> serde_json::Value {
        let node0 = self.node0.clone().expect("serve() first");
        let out = std::process::Command::new("ip")
            .args(["netns", "exec"])
            .arg(node0.file_name().expect("netns name"))
            .arg(binary("controller"))
            .args(["proxy-status", "--json"])
            .output()
            .expect("controller proxy-status");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    pub fn root_pem(&self) -> PathBuf {
        self.root.join("ca").join("root-cert.pem")
    }

    pub fn token_file(&self, node: &str) -> PathBuf {
        self.root.join(format!("token-{node}"))
    }

    pub fn manifests(&self) -> &Path {
        &self.manifests
    }
}

impl Drop for LocalMode {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}
