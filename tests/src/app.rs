//! A tiny TCP application for capture tests, run from the test process itself: a server whose
//! socket lives in a pod's netns, and clients whose sockets live in another's.
//!
//! The server greets each connection with `peer=<addr>\n` (the source it sees) and then echoes.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::topology::Pod;

pub struct Server {
    pub accepted: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on [::]:port (IPv4 too) inside `pod`.
    pub fn start(pod: &Pod, port: u16) -> Self {
        let listener = pod.ns.run(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
            s.set_only_v6(false)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
            s.listen(1024)?;
            s.set_nonblocking(true)?;
            io::Result::Ok(TcpListener::from(s))
        });
        let listener = listener.expect("server listen");
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            accepted.lock().unwrap().push(canonical(peer));
                            std::thread::spawn(move || serve_one(stream, peer));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Server { accepted, stop, thread: Some(thread) }
    }

    pub fn accepted_count(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }
}

fn serve_one(mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    if writeln!(stream, "peer={}", canonical(peer)).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A client connection opened from inside a pod.
pub struct Client {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    /// Connects from `pod` to `dst`, optionally with SO_MARK set first, and a 2 s timeout.
    pub fn connect_with_mark(pod: &Pod, dst: SocketAddr, mark: Option<u32>) -> io::Result<Client> {
        let stream = pod.ns.run(move || {
            let domain = if dst.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
            let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
            if let Some(mark) = mark {
                s.set_mark(mark)?;
            }
            s.connect_timeout(&dst.into(), Duration::from_secs(2))?;
            io::Result::Ok(TcpStream::from(s))
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Client { stream, reader })
    }

    pub fn connect(pod: &Pod, dst: SocketAddr) -> io::Result<Client> {
        Self::connect_with_mark(pod, dst, None)
    }

    /// The source address the server saw (its greeting).
    pub fn greeting(&mut self) -> io::Result<SocketAddr> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        line.trim()
            .strip_prefix("peer=")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| io::Error::other(format!("unexpected greeting {line:?}")))
    }

    /// Sends `text` and reads the echo.
    pub fn echo(&mut self, text: &str) -> io::Result<String> {
        writeln!(self.stream, "{text}")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        Ok(line.trim_end().to_string())
    }

    /// Where the client's socket is connected, as the kernel says (127.0.0.1:15001 when
    /// captured).
    pub fn peer(&self) -> SocketAddr {
        canonical(self.stream.peer_addr().expect("peer addr"))
    }
}
