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
}

/// Asks the CA at `addr` (expected to be `ca_identity` under `bundle`) to sign `csr` for
/// `identity`, authenticating with `token`.
pub async fn request_certificate(
    addr: SocketAddr,
    bundle: &TrustBundle,
    ca_identity: &SpiffeId,
    token: &str,
    identity: &SpiffeId,
    csr: &CertificateSigningRequestDer<'_>,
) -> Result<Vec<CertificateDer<'static>>, RemoteCaError> {
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
        let message =
            serde_json::from_str::<ErrorResponse>(body).map(|e| e.error).unwrap_or_else(|_| body.to_string());
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
}
