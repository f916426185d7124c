//! The benchmark's own load tools, run from this process with sockets inside pods' network
//! namespaces: a 1-byte echo (request/response latency and new connections per second), a
//! sink (throughput) and a holder (open connections for memory). Every loop is bounded in
//! count and time.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use warren_e2e::topology::Pod;

pub const ECHO_PORT: u16 = 5001;
pub const SINK_PORT: u16 = 5002;
pub const HOLD_PORT: u16 = 5003;

pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The servers of one benchmark run, inside the server pod. Threads are pinned to CPU 0.
pub struct Servers {
    stop: Arc<AtomicBool>,
    pub sunk: Arc<AtomicU64>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(pod: &Pod) -> Result<Self> {
        let listeners = pod.ns.run(|| -> std::io::Result<Vec<TcpListener>> {
            [ECHO_PORT, SINK_PORT, HOLD_PORT]
                .into_iter()
                .map(|port| {
                    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                    l.set_reuse_address(true)?;
                    l.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
                    // A deep backlog: the holder opens thousands of connections back to back.
                    l.listen(4096)?;
                    // accept() wakes at least this often to notice the stop flag.
                    l.set_read_timeout(Some(Duration::from_millis(100)))?;
                    Ok(TcpListener::from(l))
                })
                .collect()
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let sunk = Arc::new(AtomicU64::new(0));
        let held = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let (stop, sunk, held) = (stop.clone(), sunk.clone(), held.clone());
            threads.push(std::thread::spawn(move || {
                let _ = pin_to_cpu(0);
                while !stop.load(Ordering::Relaxed) {
                    let Ok((stream, _)) = listener.accept() else { continue };
                    let _ = stream.set_nodelay(true);
                    match i {
                        0 => drop(std::thread::spawn(move || echo(stream))),
                        1 => {
                            let sunk = sunk.clone();
                            drop(std::thread::spawn(move || sink(stream, &sunk)));
                        }
                        _ => held.lock().expect("poisoned").push(stream),
                    }
                }
            }));
        }
        Ok(Servers { stop, sunk, held, threads })
    }

    /// Connections the hold server has accepted and keeps.
    pub fn held_count(&self) -> usize {
        self.held.lock().expect("poisoned").len()
    }

    pub fn release_held(&self) {
        self.held.lock().expect("poisoned").clear();
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn echo(mut s: TcpStream) {
    let _ = pin_to_cpu(0);
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = [0u8; 64];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

fn sink(mut s: TcpStream, sunk: &AtomicU64) {
    let _ = pin_to_cpu(0);
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = vec![0u8; 256 * 1024];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            return;
        }
        sunk.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Latencies of `iterations` 1-byte round trips on one connection, in ns, sorted.
pub fn request_response(pod: &Pod, dst: SocketAddr, iterations: usize) -> Result<Vec<u64>> {
    pod.ns
        .run(move || -> std::io::Result<Vec<u64>> {
            pin_to_cpu(0)?;
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut byte = [7u8; 1];
            // Warm up: the first exchanges open pooled connections and fill caches.
            for _ in 0..200 {
                s.write_all(&byte)?;
                s.read_exact(&mut byte)?;
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut out = Vec::with_capacity(iterations);
            while out.len() < iterations && Instant::now() < deadline {
                let t = Instant::now();
                s.write_all(&byte)?;
                s.read_exact(&mut byte)?;
                out.push(t.elapsed().as_nanos() as u64);
            }
            out.sort_unstable();
            Ok(out)
        })
        .context("request/response")
}

/// New connections per second: connect, one 1-byte exchange, close, for `duration`.
pub fn connections_per_second(pod: &Pod, dst: SocketAddr, duration: Duration) -> Result<f64> {
    pod.ns
        .run(move || -> std::io::Result<f64> {
            pin_to_cpu(0)?;
            let started = Instant::now();
            let mut done = 0u64;
            while started.elapsed() < duration {
                let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut byte = [1u8; 1];
                s.write_all(&byte)?;
                s.read_exact(&mut byte)?;
                // Reset instead of TIME_WAIT: thousands of closes must not exhaust ports.
                socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
                done += 1;
            }
            Ok(done as f64 / started.elapsed().as_secs_f64())
        })
        .context("new connections")
}

/// Bytes per second received by the sink from `streams` parallel senders over `duration`.
pub fn throughput(
    pod: &Pod,
    dst: SocketAddr,
    streams: usize,
    duration: Duration,
    sunk: &AtomicU64,
) -> Result<f64> {
    let senders: Vec<TcpStream> = (0..streams)
        .map(|_| pod.ns.run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(3))))
        .collect::<std::io::Result<_>>()
        .context("throughput connections")?;
    let before = sunk.load(Ordering::Relaxed);
    let started = Instant::now();
    let threads: Vec<JoinHandle<()>> = senders
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let _ = pin_to_cpu(0);
                let buf = vec![0x5au8; 128 * 1024];
                while started.elapsed() < duration {
                    if s.write_all(&buf).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Let the last bytes in flight land before reading the counter.
    std::thread::sleep(Duration::from_millis(200));
    Ok((sunk.load(Ordering::Relaxed) - before) as f64 / elapsed)
}

/// Connections held open from a pod, by a process of their own (`xtask bench-hold`, this
/// executable): the server ends live in this process, and one process may not have enough
/// file descriptors for both ends. Killed (and the connections closed) on drop.
pub struct Holder {
    child: std::process::Child,
    /// How many connections it opened (all asked for, unless time ran out or one failed).
    pub opened: usize,
}

impl Holder {
    /// Opens `count` connections from `pod` to `dst`, one after another, for at most `limit`;
    /// returns once they are open. The holder exits by itself after `hold` at the latest.
    pub fn start(
        pod: &Pod,
        dst: SocketAddr,
        count: usize,
        limit: Duration,
        hold: Duration,
    ) -> Result<Holder> {
        use std::io::BufRead as _;
        let mut child = pod
            .ns
            .command(std::env::current_exe()?)
            .args(["bench-hold", "--addr", &dst.to_string(), "--count", &count.to_string()])
            .args(["--limit-secs", &limit.as_secs_f64().to_string()])
            .args(["--hold-secs", &hold.as_secs_f64().to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting the connection holder")?;
        let mut line = String::new();
        let read = std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line);
        let mut holder = Holder { child, opened: 0 };
        read.context("reading the connection holder's count")?;
        holder.opened = line.trim().parse().with_context(|| format!("connection holder said {line:?}"))?;
        Ok(holder)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `xtask bench-hold`: inside a pod, opens `count` connections to `addr` (for at most
/// `limit_secs`), prints how many it opened, and keeps them until stdin closes or `hold_secs`
/// pass.
pub fn hold_main(addr: SocketAddr, count: usize, limit_secs: f64, hold_secs: f64) -> Result<()> {
    raise_open_file_limit(count as u64 + 256);
    let limit = Duration::from_secs_f64(limit_secs);
    let started = Instant::now();
    let mut held = Vec::with_capacity(count);
    let mut failed = None;
    while held.len() < count && started.elapsed() < limit {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => held.push(s),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    println!("{}", held.len());
    std::io::stdout().flush()?;
    if let Some(e) = failed {
        eprintln!("bench-hold: connection {} to {addr} failed: {e}", held.len() + 1);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read(&mut [0u8; 1]);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs_f64(hold_secs));
    Ok(())
}

/// A process's CPU time (user + system) so far, in seconds.
pub use warren_e2e::cpu_seconds;

/// A process's resident memory, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Raises this process's open-file limit (soft and hard) to at least `want`; processes it
/// starts from now on inherit it. Raising the hard limit needs CAP_SYS_RESOURCE, which even
/// root may lack in a container; without it the soft limit goes as far as the hard one.
pub fn raise_open_file_limit(want: u64) {
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            let raised =
                libc::rlimit { rlim_cur: limit.rlim_max.max(want), rlim_max: limit.rlim_max.max(want) };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                limit.rlim_cur = limit.rlim_max;
                let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}

/// The open-file limit (soft) of this process.
pub fn open_file_limit() -> u64 {
    // SAFETY: getrlimit on a valid struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 { limit.rlim_cur } else { 0 }
    }
}
