//! How a ztunnel asks the mesh CA (the controller) for a certificate: HTTPS, TLS 1.3 with the
//! CA presenting its own SPIFFE identity under the mesh root; the ztunnel authenticates with a
//! bearer token naming its node (local mode: a per-node bootstrap token; on Kubernetes: its
//! ServiceAccount token, checked with a TokenReview). The CA signs only identities of pods
//! scheduled on that node.
//!
//! `POST /v1/certificates` with `{"identity": "spiffe://...", "csr": "<base64 DER>"}` →
//! 200 `{"chain": ["<base64 DER>", ...]}`, or 400/401/403 `{"error": "..."}`.

use std::net::SocketAddr;

use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    ca::{base64, base64_decode},
    identity::SpiffeId,
    tls::{TrustBundle, anonymous_client_config},
};

pub const PATH: &str = "/v1/certificates";
/// The CA's port.
pub const PORT: u16 = 15012;

#[derive(Debug, Serialize, Deserialize)]
pub struct SignRequest {
    pub identity: String,
    /// The CSR, base64 DER.
    pub csr: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SignResponse {
    /// Leaf first, base64 DER.
    pub chain: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteCaError {
    #[error("connecting to the CA at {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("TLS with the CA at {addr} (expecting {expected}): {source}")]
    Tls { addr: SocketAddr, expected: String, source: std::io::Error },
    #[error("the CA at {addr} answered {status}: {message}")]
    Refused { addr: SocketAddr, status: u16, message: String },
    #[error("the CA at {addr} answered something unreadable: {0}", addr = .1)]
    BadResponse(String, SocketAddr),
    #[error(
        "the CA at {addr} did not answer within {after:?} (overloaded, or not the CA?); the request is tried again"
    )]
    Timeout { addr: SocketAddr, after: std::time::Duration },
}

/// How long one certificate request may take, connection to answer. The CA signs in
/// milliseconds; without a bound, a CA that accepts and never answers would hold the request
/// (and every connection waiting for that identity's certificate) for good.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Asks the CA at `addr` (expected to be `ca_identity` under `bundle`) to sign `csr` for
/// `identity`, authenticating with `token`, within [`REQUEST_TIMEOUT`].
pub async fn request_certificate(
    addr: SocketAddr,
    bundle: &TrustBundle,
    ca_identity: &SpiffeId,
    token: &str,
    identity: &SpiffeId,
    csr: &CertificateSigningRequestDer<'_>,
) -> Result<Vec<CertificateDer<'static>>, RemoteCaError> {
    let exchange = async {
        let bad = |what: String| RemoteCaError::BadResponse(what, addr);
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| RemoteCaError::Connect { addr, source })?;
        let config = anonymous_client_config(bundle, ca_identity).map_err(|e| RemoteCaError::Tls {
            addr,
            expected: ca_identity.to_string(),
            source: std::io::Error::other(e),
        })?;
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|source| RemoteCaError::Tls { addr, expected: ca_identity.to_string(), source })?;
        let body = serde_json::to_string(&SignRequest { identity: identity.to_string(), csr: base64(csr) })
            .expect("serializable");
        let request = format!(
            "POST {PATH} HTTP/1.1\r\nHost: warren-ca\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let io = |source| RemoteCaError::Connect { addr, source };
        tls.write_all(request.as_bytes()).await.map_err(io)?;
        let mut response = Vec::new();
        // A TLS close without close_notify after a complete response is fine for us.
        if let Err(e) = tls.read_to_end(&mut response).await
            && response.is_empty()
        {
            return Err(io(e));
        }
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| bad("no HTTP response".into()))?;
        let status: u16 =
            head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad(head.into()))?;
        if status != 200 {
            let message = serde_json::from_str::<ErrorResponse>(body)
                .map(|e| e.error)
                .unwrap_or_else(|_| body.to_string());
            return Err(RemoteCaError::Refused { addr, status, message });
        }
        let signed: SignResponse = serde_json::from_str(body).map_err(|e| bad(e.to_string()))?;
        signed
            .chain
            .iter()
            .map(|c| {
                base64_decode(c)
                    .map(CertificateDer::from)
                    .ok_or_else(|| bad("a certificate is not base64".into()))
            })
            .collect()
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or(Err(RemoteCaError::Timeout { addr, after: REQUEST_TIMEOUT }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA that takes the connection and never answers: the request ends with a timeout, so
    /// the certificate is asked for again instead of awaited for good. (Paused time: the
    /// runtime skips ahead to the deadline once nothing else can happen.)
    #[tokio::test(start_paused = true)]
    async fn a_ca_that_never_answers_times_out() {
        let ca = crate::ca::Ca::generate("cluster.local").unwrap();
        let bundle = TrustBundle::new(std::slice::from_ref(ca.root())).unwrap();
        let identity: SpiffeId = "spiffe://cluster.local/ns/shop/sa/checkout".parse().unwrap();
        let ca_identity: SpiffeId =
            "spiffe://cluster.local/ns/warren-system/sa/warren-controller".parse().unwrap();
        let (_, csr) = crate::ca::new_key_and_csr(&identity).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let (held, _) = listener.accept().await.unwrap();
            tokio::time::sleep(REQUEST_TIMEOUT * 2).await;
            drop(held);
        });
        let started = tokio::time::Instant::now();
        let outcome = request_certificate(addr, &bundle, &ca_identity, "token", &identity, &csr).await;
        assert!(
            matches!(outcome, Err(RemoteCaError::Timeout { after, .. }) if after == REQUEST_TIMEOUT),
            "{:?}",
            outcome.err()
        );
        assert!(started.elapsed() >= REQUEST_TIMEOUT);
        silent.abort();
    }
}
