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
    dial_gate::DialGate,
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
    /// The dial this CONNECT waited behind failed; it fails alike rather than dial again.
    #[error("{0}")]
    DialFailed(String),
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
    /// handshakes in progress. CONNECTs that waited behind a failed dial fail with it.
    dialing: DialGate<Key>,
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
            dialing: DialGate::default(),
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
            let mut turn = self.dialing.turn(&key).await;
            // Opened, or failed, by the dial this one waited behind?
            let cached = self.conns.lock().expect("poisoned").get(&key).cloned();
            match (cached, turn.failed_while_waiting()) {
                (Some(send), _) => send,
                (None, Some(error)) => return Err(HboneError::DialFailed(error.to_owned())),
                (None, None) => {
                    let dialed = self.dial(addr, expected).await;
                    turn.record(dialed.as_ref().err());
                    let send = dialed?;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls_pki_types::CertificateSigningRequestDer;
    use warren_core::certs::{CaClient, CertError, SignFuture};

    use super::*;

    /// A CA that takes a while to refuse: every dial fails, after a pause.
    struct RefusingCa;

    impl CaClient for RefusingCa {
        fn sign(&self, _csr: CertificateSigningRequestDer<'static>, identity: SpiffeId) -> SignFuture<'_> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err(CertError::Signing { identity, reason: "CA unavailable".into() })
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn connects_waiting_behind_a_failed_dial_fail_with_it_instead_of_dialing_in_turn() {
        let me: SpiffeId = "spiffe://cluster.local/ns/shop/sa/waypoint".parse().unwrap();
        let client = Arc::new(HboneClient::new(
            CertManager::new(Some(Arc::new(RefusingCa)), None),
            me,
            Duration::from_secs(1),
        ));
        let peer: SpiffeId = "spiffe://cluster.local/ns/shop/sa/payment".parse().unwrap();
        let started = tokio::time::Instant::now();
        let connects: Vec<_> = (0..10)
            .map(|_| {
                let (client, peer) = (client.clone(), peer.clone());
                tokio::spawn(async move {
                    let request = ConnectRequest::new("10.0.0.1:8080".parse().unwrap());
                    client.connect("127.0.0.1".parse().unwrap(), &peer, &request).await.err().unwrap()
                })
            })
            .collect();
        let mut errors = Vec::new();
        for connect in connects {
            errors.push(connect.await.unwrap());
        }
        let dialed = errors.iter().filter(|e| !matches!(e, HboneError::DialFailed(_))).count();
        assert_eq!(dialed, 1, "one dial, the others failing with it: {errors:?}");
        assert!(errors.iter().all(|e| e.to_string().contains("CA unavailable")), "{errors:?}");
        // One 100 ms refusal, not ten in turn.
        assert!(started.elapsed() < Duration::from_millis(500), "took {:?}", started.elapsed());

        // A CONNECT that comes after the failure dials afresh.
        tokio::time::advance(Duration::from_millis(1)).await;
        let request = ConnectRequest::new("10.0.0.1:8080".parse().unwrap());
        let again = client.connect("127.0.0.1".parse().unwrap(), &peer, &request).await.err().unwrap();
        assert!(matches!(again, HboneError::Certs(_)), "{again:?}");
    }
}
