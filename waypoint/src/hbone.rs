//! The waypoint's HBONE client: one mTLS HTTP/2 connection per destination node address,
//! shared by every CONNECT stream to it, presenting the waypoint's own identity and checking
//! the destination's.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::StatusCode;
use tokio::net::TcpStream;
use tracing::debug;
use warren_core::{
    certs::CertManager,
    hbone::{ConnectRequest, H2Stream, PORT},
    identity::SpiffeId,
};

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("certificates: {0}")]
    Certs(#[from] warren_core::certs::CertError),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("mTLS handshake with {addr} (expecting {expected}): {source}")]
    Tls { addr: SocketAddr, expected: SpiffeId, source: std::io::Error },
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("the destination's ztunnel answered the CONNECT with {0}")]
    Status(StatusCode),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

pub struct HboneClient {
    certs: Arc<CertManager>,
    identity: SpiffeId,
    /// How long a TCP connect may take (`--connect-timeout-ms`), for every upstream dial.
    pub connect_timeout: std::time::Duration,
    conns: Mutex<HashMap<Key, SendRequest<Bytes>>>,
    /// One dial per destination at a time, as ztunnel's pool does: the CONNECTs that find no
    /// connection wait for the one being opened. Without it, a burst of upstream connections
    /// to a node not yet connected (HTTP/1.1 requests at once on a cold waypoint) opened one
    /// mTLS connection each, and past 128 at once ran into that ztunnel's bound on a source's
    /// handshakes in progress.
    dialing: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    opened: AtomicUsize,
}

/// A destination ztunnel's HBONE address and the identity it must present.
type Key = (SocketAddr, SpiffeId);

impl HboneClient {
    pub fn new(certs: Arc<CertManager>, identity: SpiffeId, connect_timeout: std::time::Duration) -> Self {
        Self {
            certs,
            identity,
            connect_timeout,
            conns: Mutex::new(HashMap::new()),
            dialing: Mutex::default(),
            opened: AtomicUsize::new(0),
        }
    }

    pub fn open_connections(&self) -> usize {
        self.conns.lock().expect("poisoned").len()
    }

    /// HBONE connections opened since start.
    pub fn connections_opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }

    /// A CONNECT stream to `request.target` through the ztunnel at `hbone_ip`, which must
    /// present `expected`.
    pub async fn connect(
        &self,
        hbone_ip: std::net::IpAddr,
        expected: &SpiffeId,
        request: &ConnectRequest,
    ) -> Result<H2Stream, HboneError> {
        let addr = SocketAddr::new(hbone_ip, PORT);
        let key = (addr, expected.clone());
        if let Some(stream) = self.over_cached(&key, request).await? {
            return Ok(stream);
        }
        let send = {
            let lock = self.dialing.lock().expect("poisoned").entry(key.clone()).or_default().clone();
            let _dialing = lock.lock().await;
            // Opened by the request this one waited behind?
            let cached = self.conns.lock().expect("poisoned").get(&key).cloned();
            match cached {
                Some(send) => send,
                None => {
                    let send = self.dial(addr, expected).await?;
                    self.opened.fetch_add(1, Ordering::Relaxed);
                    self.conns.lock().expect("poisoned").insert(key, send.clone());
                    send
                }
            }
        };
        open_stream(send, request, addr).await
    }

    /// A CONNECT stream over the pooled connection to `key`, if there is one that works (one
    /// the peer has closed since is dropped from the pool).
    async fn over_cached(&self, key: &Key, request: &ConnectRequest) -> Result<Option<H2Stream>, HboneError> {
        let Some(send) = self.conns.lock().expect("poisoned").get(key).cloned() else { return Ok(None) };
        match open_stream(send, request, key.0).await {
            Ok(stream) => Ok(Some(stream)),
            // The peer closed the pooled connection since: dial afresh once.
            Err(HboneError::H2 { .. }) => {
                self.conns.lock().expect("poisoned").remove(key);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn dial(&self, addr: SocketAddr, expected: &SpiffeId) -> Result<SendRequest<Bytes>, HboneError> {
        let own = self.certs.get(&self.identity).await?;
        let tcp = warren_core::connect::within(addr, self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|source| HboneError::Connect { addr, source })?;
        let (send, connection) = warren_core::hbone::connect(tcp, &own, self.certs.bundle()?, expected)
            .await
            .map_err(|e| match e {
                warren_core::hbone::HandshakeError::H2(source) => HboneError::H2 { addr, source },
                warren_core::hbone::HandshakeError::Config(e) => HboneError::Config(e),
                other => HboneError::Tls {
                    addr,
                    expected: expected.clone(),
                    source: std::io::Error::other(other.to_string()),
                },
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%addr, "HBONE connection ended: {e}");
            }
        });
        debug!(%addr, peer = %expected, "HBONE connection opened");
        Ok(send)
    }
}

async fn open_stream(
    send: SendRequest<Bytes>,
    request: &ConnectRequest,
    addr: SocketAddr,
) -> Result<H2Stream, HboneError> {
    let h2 = |source| HboneError::H2 { addr, source };
    let mut send = send.ready().await.map_err(h2)?;
    let (response, stream) = send.send_request(request.to_request(), false).map_err(h2)?;
    let response = response.await.map_err(h2)?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Status(response.status()));
    }
    Ok(H2Stream::new(stream, response.into_body()))
}
