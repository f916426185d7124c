//! A real Kubernetes API server for end-to-end tests: etcd and kube-apiserver on 127.0.0.1 with
//! random free ports and a temporary data directory, torn down on drop (also when a test
//! panics). kube-apiserver is the one `./x setup` builds from Debian's source package and
//! caches under `$CARGO_HOME/warren/kube-apiserver-<version>/` (xtask/src/setup_kube.rs).
//!
//! Authentication: a static token for an admin in `system:masters` (the test's own client),
//! and real ServiceAccount tokens from the TokenRequest API for the identities under test, so
//! a controller runs under exactly the RBAC that deploy/rbac grants its ServiceAccount. There
//! is no kubelet, scheduler or controller-manager: the test plays the kubelet by patching pod
//! status.

use std::{
    fs,
    net::TcpListener,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Pod, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    discovery::{self, Scope},
};

use crate::{unique_name, wait_until, ztunnel::binary};

/// The upstream release `./x setup` builds (xtask/src/setup_kube.rs pins the same).
pub const KUBE_APISERVER_VERSION: &str = "1.20.2";

const ADMIN_TOKEN: &str = "warren-e2e-admin";

/// kube-apiserver: `$WARREN_KUBE_APISERVER`, the one `./x setup` caches, or one on PATH.
pub fn apiserver_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("WARREN_KUBE_APISERVER") {
        return Some(PathBuf::from(path));
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    let cached =
        cargo_home.join(format!("warren/kube-apiserver-{KUBE_APISERVER_VERSION}/bin/kube-apiserver"));
    if cached.is_file() {
        return Some(cached);
    }
    let on_path = std::env::var_os("PATH")?;
    std::env::split_paths(&on_path).map(|d| d.join("kube-apiserver")).find(|p| p.is_file())
}

/// The binary, or `None` after printing why the test is skipped and how to install it.
pub fn apiserver_or_skip(test: &str) -> Option<PathBuf> {
    let found = apiserver_binary();
    if found.is_none() {
        eprintln!(
            "SKIPPED {test}: kube-apiserver is not installed. Run `./x setup` (builds Kubernetes \
             {KUBE_APISERVER_VERSION}'s kube-apiserver from Debian's source package into \
             $CARGO_HOME/warren/, ~9 minutes once), or point WARREN_KUBE_APISERVER at a binary."
        );
    }
    found
}

/// A port on 127.0.0.1 nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// Starts `cmd` with its output in `log`, killed if the test thread dies without dropping it.
fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let out = fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    // SAFETY: prctl is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
}

/// SIGTERM, then SIGKILL if it has not exited within `grace`.
fn stop(child: &mut Child, grace: Duration) {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub struct ApiServer {
    pub root: PathBuf,
    pub port: u16,
    binary: PathBuf,
    etcd: Option<Child>,
    etcd_url: String,
    apiserver: Option<Child>,
    restarts: u32,
    runtime: tokio::runtime::Runtime,
    /// The admin's; set once the server has written its certificate.
    client: Option<Client>,
}

impl ApiServer {
    /// etcd and kube-apiserver, ready to serve (RBAC bootstrap roles in place).
    pub fn start(binary: &Path) -> Self {
        let root = std::env::temp_dir().join("warren-e2e").join(unique_name("kube"));
        fs::create_dir_all(&root).expect("temp dir");
        let (client_port, peer_port, port) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = spawn_logged(
            Command::new("etcd")
                .arg("--data-dir")
                .arg(root.join("etcd"))
                .args([
                    "--name",
                    "e2e",
                    "--listen-client-urls",
                    &etcd_url,
                    "--advertise-client-urls",
                    &etcd_url,
                ])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("e2e={peer_url}")]),
            &root.join("etcd.log"),
        );
        fs::write(root.join("tokens.csv"), format!("{ADMIN_TOKEN},warren-e2e-admin,1,\"system:masters\"\n"))
            .expect("token file");
        write_service_account_key(&root);
        let apiserver = spawn_apiserver(binary, &root, &etcd_url, port, 0);
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let mut server = ApiServer {
            port,
            binary: binary.to_path_buf(),
            etcd: Some(etcd),
            etcd_url,
            apiserver: Some(apiserver),
            restarts: 0,
            client: None,
            runtime,
            root,
        };
        let admin = server.kubeconfig(ADMIN_TOKEN, "admin.kubeconfig");
        server.client = Some(server.client_for(&admin));
        server.wait_ready();
        server
    }

    fn start_apiserver(&mut self) {
        let child = spawn_apiserver(&self.binary, &self.root, &self.etcd_url, self.port, self.restarts);
        self.apiserver = Some(child);
    }

    fn wait_ready(&mut self) {
        let client = self.client();
        let ready = wait_until(Duration::from_secs(60), || {
            let exited = self.apiserver.as_mut().and_then(|c| c.try_wait().ok().flatten());
            assert!(exited.is_none(), "kube-apiserver exited ({exited:?}):\n{}", self.log());
            let request = http::Request::get("/readyz").body(Vec::new()).unwrap();
            self.runtime.block_on(client.request_text(request)).is_ok_and(|t| t.trim() == "ok")
        });
        assert!(ready, "kube-apiserver did not become ready:\n{}", self.log());
    }

    /// The API server's log since its last (re)start.
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.join(format!("apiserver-{}.log", self.restarts))).unwrap_or_default()
    }

    /// Stops the API server (SIGTERM) and starts it again on the same port and etcd.
    pub fn restart(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            stop(&mut child, Duration::from_secs(20));
        }
        self.restarts += 1;
        self.start_apiserver();
        self.wait_ready();
    }

    /// A kubeconfig for `token`, trusting the server's certificate; returns its path.
    pub fn kubeconfig(&self, token: &str, file: &str) -> PathBuf {
        let ca = self.root.join("certs/apiserver.crt");
        assert!(
            wait_until(Duration::from_secs(30), || ca.is_file()),
            "kube-apiserver wrote no certificate:\n{}",
            self.log()
        );
        let text = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: e2e, cluster: {{server: \"https://127.0.0.1:{}\", certificate-authority: \"{}\"}}}}]\n\
             users: [{{name: user, user: {{token: \"{token}\"}}}}]\n\
             contexts: [{{name: e2e, context: {{cluster: e2e, user: user}}}}]\n\
             current-context: e2e\n",
            self.port,
            ca.display()
        );
        let path = self.root.join(file);
        fs::write(&path, text).expect("kubeconfig");
        path
    }

    fn client_for(&self, kubeconfig: &Path) -> Client {
        self.runtime.block_on(async {
            let file = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
            let config =
                kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await.unwrap();
            Client::try_from(config).expect("client")
        })
    }

    /// The admin's client (system:masters), and the runtime to drive it.
    pub fn client(&self) -> Client {
        self.client.clone().expect("the admin client")
    }

    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// A real token of ServiceAccount `namespace/name` (TokenRequest API, one hour), with which
    /// the API server authenticates `system:serviceaccount:<namespace>:<name>`.
    pub fn service_account_token(&self, namespace: &str, name: &str) -> String {
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() },
            ..Default::default()
        };
        let answer = self
            .block_on(api.create_token_request(name, &PostParams::default(), &request))
            .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{name}: {e}"));
        answer.status.expect("a token").token
    }

    /// A token of ServiceAccount `namespace/name` bound to its pod `pod` (TokenRequest with a
    /// `boundObjectRef`, as a kubelet projects it): valid only while that pod exists, and
    /// reviewed with the pod's name and uid in `user.extra`.
    pub fn bound_service_account_token(&self, namespace: &str, name: &str, pod: &str) -> String {
        let pods: Api<Pod> = Api::namespaced(self.client(), namespace);
        let uid = self
            .block_on(pods.get(pod))
            .unwrap_or_else(|e| panic!("getting pod {namespace}/{pod}: {e}"))
            .metadata
            .uid;
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(3600),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.into()),
                    uid,
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = self
            .block_on(api.create_token_request(name, &PostParams::default(), &request))
            .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{name} bound to pod {pod}: {e}"));
        answer.status.expect("a token").token
    }

    /// Server-side applies every document of `yaml` (as the admin).
    pub fn apply(&self, yaml: &str) {
        for document in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value: serde_json::Value = serde::Deserialize::deserialize(document).expect("YAML");
            if value.is_null() {
                continue;
            }
            let object: DynamicObject = serde_json::from_value(value).expect("a Kubernetes object");
            let api = self.api_for(&object);
            let name = object.metadata.name.clone().expect("a name");
            let params = PatchParams::apply("warren-e2e").force();
            self.block_on(api.patch(&name, &params, &Patch::Apply(&object)))
                .unwrap_or_else(|e| panic!("applying {name}: {e}"));
        }
    }

    /// Applies a file of the repository (path relative to the workspace root).
    pub fn apply_file(&self, relative: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
        self.apply(&fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    }

    /// Waits until the API server serves `kind` of `api_version` (a CRD is established).
    pub fn wait_served(&self, api_version: &str, kind: &str) {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let served = wait_until(Duration::from_secs(30), || {
            self.block_on(discovery::pinned_kind(&self.client(), &gvk)).is_ok()
        });
        assert!(served, "{api_version} {kind} is not served");
    }

    fn api_for(&self, object: &DynamicObject) -> Api<DynamicObject> {
        let types = object.types.as_ref().expect("apiVersion and kind");
        let gvk = GroupVersionKind::try_from(types).expect("a valid apiVersion");
        let (resource, caps) = self
            .block_on(discovery::pinned_kind(&self.client(), &gvk))
            .unwrap_or_else(|e| panic!("{} {} is not served: {e}", types.api_version, types.kind));
        match (caps.scope, object.metadata.namespace.as_deref()) {
            (Scope::Namespaced, Some(ns)) => Api::namespaced_with(self.client(), ns, &resource),
            (Scope::Namespaced, None) => Api::default_namespaced_with(self.client(), &resource),
            (Scope::Cluster, _) => Api::all_with(self.client(), &resource),
        }
    }

    /// Merge-patches an object (`apiVersion`, `kind`, namespace, name).
    pub fn patch(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        patch: serde_json::Value,
    ) {
        let api = self.api_for(&reference(api_version, kind, namespace, name));
        self.block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)))
            .unwrap_or_else(|e| panic!("patching {kind} {namespace}/{name}: {e}"));
    }

    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let api = self.api_for(&reference(api_version, kind, namespace, name));
        // No kubelet acknowledges a graceful deletion: remove the object at once.
        self.block_on(
            api.delete(name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }),
        )
        .unwrap_or_else(|e| panic!("deleting {kind} {namespace}/{name}: {e}"));
    }

    /// Creates `objects` as the admin, `in_flight` requests at a time, telling `progress` how
    /// many are done after each: for loading a cluster at scale (the controller benchmark). A
    /// Pod's `status` is left out of its create (the API server resets it) and merge-patched
    /// onto its status subresource afterwards, as a kubelet would report it, in the same batch
    /// of concurrent requests. Namespaces go first, all of them before anything else: an object
    /// created concurrently with its namespace is refused (404) until the API server's
    /// namespace admission has seen it, and such a refusal is retried for a few seconds.
    pub fn create_all(
        &self,
        objects: Vec<serde_json::Value>,
        in_flight: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<(), kube::Error> {
        // One discovery per kind, not per object.
        let mut resources = std::collections::HashMap::new();
        let mut requests = Vec::with_capacity(objects.len());
        for mut value in objects {
            let status = value.as_object_mut().and_then(|o| o.remove("status"));
            let object: DynamicObject = serde_json::from_value(value).map_err(kube::Error::SerdeError)?;
            let types = object.types.clone().unwrap_or_default();
            let key = (types.api_version.clone(), types.kind.clone());
            if !resources.contains_key(&key) {
                let gvk = GroupVersionKind::try_from(&types).map_err(|e| {
                    kube::Error::Discovery(kube::error::DiscoveryError::InvalidGroupVersion(e.to_string()))
                })?;
                resources.insert(key.clone(), self.block_on(discovery::pinned_kind(&self.client(), &gvk))?);
            }
            let (resource, caps) = &resources[&key];
            let api: Api<DynamicObject> = match (&caps.scope, object.metadata.namespace.as_deref()) {
                (Scope::Namespaced, Some(ns)) => Api::namespaced_with(self.client(), ns, resource),
                (Scope::Namespaced, None) => Api::default_namespaced_with(self.client(), resource),
                (Scope::Cluster, _) => Api::all_with(self.client(), resource),
            };
            requests.push((api, object, status));
        }
        let total = requests.len();
        // Stable: the namespaces first, everything else in the order given.
        let is_namespace = |o: &DynamicObject| {
            o.types.as_ref().is_some_and(|t| t.kind == "Namespace" && t.api_version == "v1")
        };
        requests.sort_by_key(|(_, object, _)| !is_namespace(object));
        let namespaces = requests.iter().take_while(|(_, object, _)| is_namespace(object)).count();
        self.block_on(async move {
            let mut running = tokio::task::JoinSet::new();
            let mut done = 0;
            for (i, (api, object, status)) in requests.into_iter().enumerate() {
                // The last namespace is in before the first object that may live in it.
                let limit = if i == namespaces { 1 } else { in_flight.max(1) };
                while running.len() >= limit {
                    running.join_next().await.expect("a running request").expect("not cancelled")?;
                    done += 1;
                    progress(done);
                }
                running.spawn(async move {
                    let mut attempts = 0;
                    let created = loop {
                        match api.create(&PostParams::default(), &object).await {
                            Err(kube::Error::Api(e))
                                if e.code == 404 && e.message.starts_with("namespaces ") && attempts < 50 =>
                            {
                                attempts += 1;
                                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            }
                            other => break other?,
                        }
                    };
                    if let Some(status) = status {
                        let name = created.metadata.name.unwrap_or_default();
                        let patch = serde_json::json!({ "status": status });
                        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                    }
                    Ok::<_, kube::Error>(())
                });
            }
            while let Some(finished) = running.join_next().await {
                finished.expect("not cancelled")?;
                done += 1;
                progress(done);
            }
            debug_assert_eq!(done, total);
            Ok(())
        })
    }

    /// Merge-patches pod `namespace/name` with one request (no discovery first: for timing).
    pub fn patch_pod(
        &self,
        namespace: &str,
        name: &str,
        patch: serde_json::Value,
    ) -> Result<(), kube::Error> {
        let api: Api<Pod> = Api::namespaced(self.client(), namespace);
        self.block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))).map(drop)
    }

    /// `key` of Secret `namespace/name`, read as the admin.
    pub fn secret_value(&self, namespace: &str, name: &str, key: &str) -> Option<Vec<u8>> {
        let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(self.client(), namespace);
        let secret = self.block_on(api.get_opt(name)).ok()??;
        secret.data?.remove(key).map(|b| b.0)
    }

    /// Plays the kubelet: the pod is running, ready, with these IPs (status subresource).
    pub fn pod_running(&self, namespace: &str, name: &str, ips: &[&str]) {
        let api: Api<Pod> = Api::namespaced(self.client(), namespace);
        let status = serde_json::json!({"status": {
            "phase": "Running",
            "podIP": ips[0],
            "podIPs": ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>(),
            "conditions": [{"type": "Ready", "status": "True"}],
        }});
        self.block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)))
            .unwrap_or_else(|e| panic!("patching the status of pod {namespace}/{name}: {e}"));
    }
}

fn spawn_apiserver(binary: &Path, root: &Path, etcd_url: &str, port: u16, restarts: u32) -> Child {
    let path = |name: &str| root.join(name).display().to_string();
    spawn_logged(
        Command::new(binary)
            .arg(format!("--etcd-servers={}", etcd_url))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={}", port))
            // 1.20 still opens an unauthenticated port 8080 by default: not here.
            .arg("--insecure-port=0")
            // A self-signed serving certificate, kept across restarts, which the
            // kubeconfigs trust (it names 127.0.0.1).
            .arg(format!("--cert-dir={}", path("certs")))
            .arg(format!("--token-auth-file={}", path("tokens.csv")))
            .arg("--authorization-mode=RBAC")
            // No controller-manager creates default ServiceAccounts for the admission
            // plugin to check.
            .arg("--disable-admission-plugins=ServiceAccount")
            // ServiceAccount tokens (TokenRequest) signed and verified with one test key.
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", path("sa.pub")))
            .arg(format!("--service-account-signing-key-file={}", path("sa.key")))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--shutdown-delay-duration=0s"),
        &root.join(format!("apiserver-{restarts}.log")),
    )
}

fn reference(api_version: &str, kind: &str, namespace: &str, name: &str) -> DynamicObject {
    serde_json::from_value(serde_json::json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {"name": name, "namespace": (!namespace.is_empty()).then_some(namespace)},
    }))
    .expect("an object reference")
}

/// An EC P-256 key that signs ServiceAccount tokens (PKCS#8 `sa.key`), and its public half that
/// verifies them (`sa.pub`: 1.20 reads no public key out of a PKCS#8 file).
fn write_service_account_key(root: &Path) {
    let key = rcgen::KeyPair::generate().expect("a key");
    fs::write(root.join("sa.key"), key.serialize_pem()).expect("service account key");
    fs::write(root.join("sa.pub"), key.public_key_pem()).expect("service account public key");
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // SIGKILL: nothing needs a clean shutdown, and a panicking test should not wait.
        for child in [self.apiserver.take(), self.etcd.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("kube-apiserver log:\n{}", tail(&self.log(), 40));
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `controller watch --kubernetes` (or `serve --kubernetes`) as the real binary, logging to a
/// file.
pub struct KubeController {
    child: Child,
    log: PathBuf,
    pub out: PathBuf,
    /// `serve`: where its CA listens.
    pub ca_addr: Option<std::net::SocketAddr>,
}

impl KubeController {
    pub fn watch(kubeconfig: &Path, dir: &Path, name: &str) -> Self {
        let out = dir.join(format!("{name}.json"));
        let log = dir.join(format!("{name}.log"));
        let child = spawn_logged(
            Command::new(binary("controller"))
                .args(["watch", "--kubernetes", "--kubeconfig"])
                .arg(kubeconfig)
                .arg("--out")
                .arg(&out),
            &log,
        );
        KubeController { child, log, out, ca_addr: None }
    }

    /// `controller serve --kubernetes` (the CA with its root in a Secret and TokenReview
    /// authentication, no bootstrap tokens), on free 127.0.0.1 ports; returns once the CA
    /// accepts connections.
    pub fn serve(kubeconfig: &Path, dir: &Path, name: &str) -> Self {
        let mut controller = Self::start_serve(kubeconfig, dir, name);
        controller.wait_ca();
        controller
    }

    /// [`serve`](Self::serve) without waiting for the CA (to start several at once). Call it
    /// from the test's own thread: the child is killed when the thread that started it ends.
    pub fn start_serve(kubeconfig: &Path, dir: &Path, name: &str) -> Self {
        let out = dir.join(format!("{name}.json"));
        let log = dir.join(format!("{name}.log"));
        let ca_addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = spawn_logged(
            Command::new(binary("controller"))
                .args(["serve", "--kubernetes", "--kubeconfig"])
                .arg(kubeconfig)
                .arg("--out")
                .arg(&out)
                .args(["--listen", &ca_addr.to_string(), "--admin", &admin.to_string()]),
            &log,
        );
        KubeController { child, log, out, ca_addr: Some(ca_addr) }
    }

    /// Waits until `serve`'s CA accepts connections; panics with the log if it exits first.
    pub fn wait_ca(&mut self) {
        let ca_addr = self.ca_addr.expect("started with serve");
        let listening = wait_until(Duration::from_secs(60), || {
            let exited = self.child.try_wait().ok().flatten();
            let log = || fs::read_to_string(&self.log).unwrap_or_default();
            assert!(exited.is_none(), "the controller exited ({exited:?}):\n{}", log());
            std::net::TcpStream::connect(ca_addr).is_ok()
        });
        assert!(listening, "the controller's CA never listened on {ca_addr}:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The config it last wrote (`Null` before the first).
    pub fn config(&self) -> serde_json::Value {
        fs::read_to_string(&self.out).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
    }

    /// Waits until the written config satisfies `condition`; panics with the log if it does not.
    pub fn wait_config(&self, what: &str, mut condition: impl FnMut(&serde_json::Value) -> bool) {
        let held = wait_until(Duration::from_secs(60), || condition(&self.config()));
        assert!(
            held,
            "the controller's config never showed {what}:\n{:#}\nlog:\n{}",
            self.config(),
            self.log()
        );
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for KubeController {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("controller log:\n{}", tail(&self.log(), 40));
        }
    }
}
