//! Outgoing TCP connections, bounded: both proxies give a connect `--connect-timeout-ms`
//! (Envoy's connect timeout; 10 s in Istio). A peer that drops everything — its node died, a
//! firewall — would otherwise hold the connection for the kernel's SYN retries, about two
//! minutes, and the client with it.

use std::{future::Future, io, net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

/// `connect` (a connection to `dst`) if it completes within `timeout`; else a `TimedOut`
/// error naming the destination and the flag that sets the bound.
pub async fn within(
    dst: SocketAddr,
    timeout: Duration,
    connect: impl Future<Output = io::Result<TcpStream>>,
) -> io::Result<TcpStream> {
    match tokio::time::timeout(timeout, connect).await {
        Ok(connected) => connected,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer from {dst} within {timeout:?} (--connect-timeout-ms)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connect_that_never_completes_times_out_naming_its_destination() {
        let dst: SocketAddr = "10.0.0.9:8080".parse().unwrap();
        let never = std::future::pending::<io::Result<TcpStream>>();
        let e = within(dst, Duration::from_secs(10), never).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(e.to_string(), "no answer from 10.0.0.9:8080 within 10s (--connect-timeout-ms)");
    }
}
