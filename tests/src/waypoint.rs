//! A real waypoint process in its own pod netns, the project's echo server and load client in
//! pods, and a raw HTTP/1.1 request helper: what the L7 tests drive. Processes are killed on
//! drop.

use std::{
    fs,
    io::{Read, Write},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use serde_json::Value;
use warren_apps::load::Summary;

use crate::{
    topology::Pod,
    wait_until,
    ztunnel::{MeshCa, binary},
};

pub const ADMIN: &str = "127.0.0.1:15000";

pub struct Waypoint {
    child: Child,
    log: PathBuf,
    pod_ns: PathBuf,
}

impl Waypoint {
    /// Starts `waypoint` inside `pod` as Gateway `namespace/name` (ServiceAccount `name`),
    /// reading `config_file`, certificates from the development CA `ca`; waits until ready.
    pub fn start(pod: &Pod, namespace: &str, name: &str, config_file: &std::path::Path, ca: &MeshCa) -> Self {
        Self::start_with_args(pod, namespace, name, config_file, ca, &[])
    }

    /// As [`Waypoint::start`], with extra flags.
    pub fn start_with_args(
        pod: &Pod,
        namespace: &str,
        name: &str,
        config_file: &std::path::Path,
        ca: &MeshCa,
        extra: &[&str],
    ) -> Self {
        let mut args = vec!["--dev-ca-dir".to_string(), ca.dir.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_with_ca_args(pod, namespace, name, config_file, &args)
    }

    /// As [`Waypoint::start`], with its CA flags given (`--ca-addr ... --ca-root ...
    /// --ca-token-file ...` for the controller's CA).
    pub fn start_with_ca_args(
        pod: &Pod,
        namespace: &str,
        name: &str,
        config_file: &std::path::Path,
        ca_args: &[String],
    ) -> Self {
        Self::start_program(&binary("waypoint"), pod, namespace, name, config_file, ca_args)
    }

    /// As [`Waypoint::start`], running `program` instead of this build's waypoint (another
    /// build's, for comparing two side by side).
    pub fn start_build(
        program: &std::path::Path,
        pod: &Pod,
        namespace: &str,
        name: &str,
        config_file: &std::path::Path,
        ca: &MeshCa,
    ) -> Self {
        let ca_args = ["--dev-ca-dir".to_string(), ca.dir.display().to_string()];
        Self::start_program(program, pod, namespace, name, config_file, &ca_args)
    }

    fn start_program(
        program: &std::path::Path,
        pod: &Pod,
        namespace: &str,
        name: &str,
        config_file: &std::path::Path,
        ca_args: &[String],
    ) -> Self {
        let dir = std::env::temp_dir().join("warren-e2e").join(&pod.name);
        fs::create_dir_all(&dir).expect("temp dir");
        let log = dir.join("waypoint.log");
        // Config from the file, unless the flags subscribe to the controller's stream.
        let config_args: Vec<std::ffi::OsString> = if ca_args.iter().any(|a| a == "--controller") {
            vec![]
        } else {
            vec!["--config".into(), config_file.into()]
        };
        let child = pod
            .ns
            .command(program)
            .args(["--name", name, "--namespace", namespace, "--log-format", "json"])
            .args(ca_args)
            .args(config_args)
            .args(["--reload-interval-ms", "100"])
            // WARREN_E2E_WAYPOINT_LOG overrides the filter (e.g. `warn` to measure without
            // access logs).
            .env("WARREN_LOG", std::env::var("WARREN_E2E_WAYPOINT_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start waypoint");
        let mut w = Waypoint { child, log, pod_ns: pod.ns.path() };
        let ready = wait_until(Duration::from_secs(20), || w.get("/healthz/ready").is_ok() || w.exited());
        assert!(ready && !w.exited(), "waypoint did not become ready:\n{}", w.log());
        w
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The access-log lines (one per request), once the waypoint has written what it buffered.
    pub fn access_log(&self) -> Vec<Value> {
        let text = crate::settled_log(&self.log);
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["target"] == "access")
            .collect()
    }

    pub fn get(&self, path: &str) -> std::io::Result<String> {
        self.get_at(ADMIN.parse().unwrap(), path)
    }

    pub fn get_at(&self, addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let request = format!("GET {path} HTTP/1.0\r\n\r\n");
        let response = raw_in(&self.pod_ns, addr, request)?;
        if response.status != 200 {
            return Err(std::io::Error::other(format!("{path}: {}", response.status)));
        }
        Ok(response.body)
    }

    pub fn config_dump(&self) -> Value {
        serde_json::from_str(&self.get("/config_dump").expect("GET /config_dump")).expect("JSON")
    }

    pub fn metrics(&self) -> String {
        self.get_at("127.0.0.1:15020".parse().unwrap(), "/metrics").expect("GET /metrics")
    }
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- waypoint log ---\n{}", self.log());
        }
        if let Some(dir) = self.log.parent() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// The project's echo server (`warren-echo`) in a pod.
pub struct Echo {
    child: Child,
}

impl Echo {
    /// Serves on `port` (IPv4 and IPv6) in `pod` as `version`, with extra flags.
    pub fn start(pod: &Pod, port: u16, version: &str, extra: &[&str]) -> Self {
        Self::start_as(pod, &pod.name, "default", &[port], version, extra)
    }

    /// Serves on `ports` in `pod`, reporting itself as pod `name` of `namespace`.
    pub fn start_as(
        pod: &Pod,
        name: &str,
        namespace: &str,
        ports: &[u16],
        version: &str,
        extra: &[&str],
    ) -> Self {
        let listen: Vec<String> = ports
            .iter()
            .flat_map(|p| {
                ["--listen".to_string(), format!("0.0.0.0:{p}"), "--listen".to_string(), format!("[::]:{p}")]
            })
            .collect();
        let child = pod
            .ns
            .command(binary("warren-echo"))
            .args(&listen)
            .args(["--pod", name, "--namespace", namespace, "--version", version])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start warren-echo");
        // Loopback: a pod's connection to its own IP would be captured into the mesh.
        let addr = SocketAddr::from(([127, 0, 0, 1], ports.first().copied().unwrap_or(8080)));
        let up = wait_until(Duration::from_secs(10), || {
            pod.ns
                .run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
        });
        assert!(up, "warren-echo did not start in {}", pod.name);
        Echo { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the project's load client in `pod` against `url` and returns its summary.
pub fn load(pod: &Pod, url: &str, args: &[&str]) -> Summary {
    let out = pod
        .ns
        .command(binary("warren-load"))
        .arg(url)
        .args(args)
        .arg("--json")
        .output()
        .expect("run warren-load");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "warren-load {url} {args:?}: {e}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A raw HTTP/1 exchange's result.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header lines, lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request from inside `pod` (connection closed after it).
pub fn http(pod: &Pod, addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    http_in(&pod.ns.path(), addr, method, path, headers)
        .unwrap_or_else(|e| panic!("{method} {addr}{path} from {}: {e}", pod.name))
}

/// One HTTP/1.1 request from inside the network namespace at `netns`.
pub fn http_in(
    netns: &std::path::Path,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<RawResponse> {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: 0\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    raw_in(netns, addr, request)
}

fn raw_in(netns: &std::path::Path, addr: SocketAddr, request: String) -> std::io::Result<RawResponse> {
    let netns = fs::File::open(netns)?;
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on this short-lived thread only.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        parse(&String::from_utf8_lossy(&raw))
    })
    .join()
    .expect("request thread")
}

fn parse(text: &str) -> std::io::Result<RawResponse> {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect::<Vec<_>>();
    // Chunked bodies (hyper's default for streamed responses): join the chunks.
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Ok(RawResponse { status, headers, body })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// An OTLP/HTTP trace collector for tests: accepts `POST /v1/traces` (JSON) on 127.0.0.1 inside
/// a pod's netns and keeps every span it receives.
pub struct Collector {
    spans: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub addr: SocketAddr,
}

impl Collector {
    pub fn start(pod: &Pod, port: u16) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = pod.ns.run(move || std::net::TcpListener::bind(addr)).expect("collector listen");
        listener.set_nonblocking(true).unwrap();
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st) = (spans.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = Self::serve(stream, &s);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Collector { spans, stop, addr }
    }

    /// One HTTP/1.1 connection: requests with a content-length, each answered 200.
    fn serve(mut stream: std::net::TcpStream, spans: &std::sync::Mutex<Vec<Value>>) -> std::io::Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < head_end + 4 + length {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body: Value =
                serde_json::from_slice(&buf[head_end + 4..head_end + 4 + length]).unwrap_or(Value::Null);
            for rs in body["resourceSpans"].as_array().into_iter().flatten() {
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    spans.lock().unwrap().extend(ss["spans"].as_array().into_iter().flatten().cloned());
                }
            }
            stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
            buf.drain(..head_end + 4 + length);
        }
    }

    pub fn spans(&self) -> Vec<Value> {
        self.spans.lock().unwrap().clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
