//! Workload certificates for ztunnel and waypoints: one key per identity, generated here (it
//! never leaves the proxy), a CSR
//! to the CA, renewal at half-life. If renewal fails the current certificate is kept until it
//! expires, and renewal is retried. Connections are never dropped by a rotation: new
//! connections pick up the new certificate, established ones keep the one they started with.

use std::{
    collections::HashMap,
    future::Future,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use crate::{
    ca::{Ca, CaError, WorkloadCertificate, new_key_and_csr, workload_certificate},
    identity::SpiffeId,
    tls::TrustBundle,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use serde::Serialize;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(
        "no CA is configured, so this proxy has no certificates and cannot speak HBONE: pass --ca-addr (the controller's CA) or --dev-ca-dir (development and tests)"
    )]
    NoCa,
    #[error("the CA refused or failed to sign for {identity}: {reason}")]
    Signing { identity: SpiffeId, reason: String },
    #[error("reading the CA in {dir}: {reason}")]
    LoadCa { dir: String, reason: String },
    #[error("building the TLS configuration: {0}")]
    Tls(String),
}

impl CertError {
    pub fn from_tls(e: rustls::Error) -> Self {
        CertError::Tls(e.to_string())
    }
}

pub type SignFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<CertificateDer<'static>>, CertError>> + Send + 'a>>;

/// Where certificates come from. The controller's CA service will implement this over its
/// config stream; today the only implementation is the in-process development CA.
pub trait CaClient: Send + Sync {
    fn sign(&self, csr: CertificateSigningRequestDer<'static>, identity: SpiffeId) -> SignFuture<'_>;
}

/// A CA in this process, from a root key on disk. For development and tests only: in a real
/// mesh only the controller holds the root key.
pub struct DevCa {
    ca: Ca,
    lifetime: Duration,
}

impl DevCa {
    /// Reads `root-cert.pem` and `root-key.pem` from `dir`.
    pub fn load(dir: &Path, lifetime: Duration) -> Result<Self, CertError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| CertError::LoadCa {
                dir: dir.display().to_string(),
                reason: format!("{name}: {e}"),
            })
        };
        let ca = Ca::from_pem(&read("root-cert.pem")?, &read("root-key.pem")?)
            .map_err(|e| CertError::LoadCa { dir: dir.display().to_string(), reason: e.to_string() })?;
        Ok(Self { ca, lifetime })
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.ca.root().clone()
    }
}

impl CaClient for DevCa {
    fn sign(&self, csr: CertificateSigningRequestDer<'static>, identity: SpiffeId) -> SignFuture<'_> {
        Box::pin(async move {
            self.ca
                .sign(&csr, &identity, self.lifetime, SystemTime::now())
                .map_err(|e: CaError| CertError::Signing { identity, reason: e.to_string() })
        })
    }
}

/// Where a proxy's bearer token comes from.
#[derive(Clone, Debug)]
pub enum Token {
    Static(String),
    /// Re-read at every use: Kubernetes rotates projected ServiceAccount tokens in place.
    File(std::path::PathBuf),
}

impl Token {
    pub fn get(&self) -> Result<String, String> {
        match self {
            Token::Static(t) => Ok(t.clone()),
            Token::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("reading the token {}: {e}", path.display())),
        }
    }
}

/// The mesh CA over the network (the controller): `warren_core::ca_protocol`.
pub struct RemoteCa {
    pub addr: std::net::SocketAddr,
    pub bundle: TrustBundle,
    pub ca_identity: SpiffeId,
    pub token: Token,
}

impl CaClient for RemoteCa {
    fn sign(&self, csr: CertificateSigningRequestDer<'static>, identity: SpiffeId) -> SignFuture<'_> {
        Box::pin(async move {
            let token = self
                .token
                .get()
                .map_err(|reason| CertError::Signing { identity: identity.clone(), reason })?;
            crate::ca_protocol::request_certificate(
                self.addr,
                &self.bundle,
                &self.ca_identity,
                &token,
                &identity,
                &csr,
            )
            .await
            .map_err(|e| CertError::Signing { identity, reason: e.to_string() })
        })
    }
}

/// Where a proxy gets its certificates, as its flags say.
#[derive(Clone, Debug, Default)]
pub struct CaSettings {
    /// The mesh CA (the controller) to send CSRs to.
    pub ca_addr: Option<std::net::SocketAddr>,
    /// The mesh root certificate (PEM), required with `ca_addr`.
    pub ca_root: Option<std::path::PathBuf>,
    /// The token file (a node bootstrap token, or a projected ServiceAccount token), required
    /// with `ca_addr`; re-read at every request.
    pub ca_token_file: Option<std::path::PathBuf>,
    /// Development and tests: sign with a root key in this directory, in-process.
    pub dev_ca_dir: Option<std::path::PathBuf>,
    pub dev_cert_lifetime: Duration,
    pub trust_domain: String,
}

/// The controller's own identity, which proxies expect when they call the CA.
pub fn ca_identity(trust_domain: &str) -> SpiffeId {
    SpiffeId {
        trust_domain: trust_domain.to_string(),
        namespace: "warren-system".into(),
        service_account: "warren-controller".into(),
    }
}

impl CaSettings {
    /// The certificate manager these settings describe; none when no CA is configured.
    pub fn cert_manager(&self) -> Result<Option<Arc<CertManager>>, CertError> {
        let load = |what: &str, path: &std::path::Path, reason: String| CertError::LoadCa {
            dir: path.display().to_string(),
            reason: format!("{what}: {reason}"),
        };
        if let Some(addr) = self.ca_addr {
            let (Some(root), Some(token_file)) = (&self.ca_root, &self.ca_token_file) else {
                return Err(CertError::LoadCa {
                    dir: addr.to_string(),
                    reason: "--ca-addr needs --ca-root (the mesh root, PEM) and --ca-token-file (the node's bootstrap token, or the pod's projected ServiceAccount token)".into(),
                });
            };
            let pem = std::fs::read(root).map_err(|e| load("the mesh root", root, e.to_string()))?;
            let root_der: CertificateDer<'static> = rustls_pki_types::pem::PemObject::from_pem_slice(&pem)
                .map_err(|e| load("the mesh root", root, format!("not a PEM certificate: {e:?}")))?;
            let bundle =
                TrustBundle::new(&[root_der]).map_err(|e| load("the mesh root", root, e.to_string()))?;
            // Read now to fail early on a missing file; re-read at every request after.
            std::fs::read_to_string(token_file)
                .map_err(|e| load("the CA token", token_file, e.to_string()))?;
            let token = Token::File(token_file.clone());
            let ca = RemoteCa {
                addr,
                bundle: bundle.clone(),
                ca_identity: ca_identity(&self.trust_domain),
                token,
            };
            info!(%addr, "certificates from the mesh CA");
            return Ok(Some(CertManager::new(Some(Arc::new(ca)), Some(bundle))));
        }
        if let Some(dir) = &self.dev_ca_dir {
            let ca = DevCa::load(dir, self.dev_cert_lifetime)?;
            let bundle =
                TrustBundle::new(&[ca.root()]).map_err(|e| load("the development CA", dir, e.to_string()))?;
            info!(dir = %dir.display(), "using the development CA in this process (not for production)");
            return Ok(Some(CertManager::new(Some(Arc::new(ca)), Some(bundle))));
        }
        Ok(None)
    }
}

/// A certificate as `/config_dump` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct CertView {
    pub identity: String,
    pub not_before: u64,
    pub not_after: u64,
    pub refresh_at: u64,
    pub serial_sha256: String,
}

pub struct CertManager {
    ca: Option<Arc<dyn CaClient>>,
    pub bundle: Option<TrustBundle>,
    certs: Mutex<HashMap<SpiffeId, Arc<WorkloadCertificate>>>,
    /// One signing request per identity at a time.
    fetching: tokio::sync::Mutex<()>,
    pub rotations: std::sync::atomic::AtomicU64,
}

impl CertManager {
    pub fn new(ca: Option<Arc<dyn CaClient>>, bundle: Option<TrustBundle>) -> Arc<Self> {
        Arc::new(Self {
            ca,
            bundle,
            certs: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
            rotations: 0.into(),
        })
    }

    pub fn bundle(&self) -> Result<&TrustBundle, CertError> {
        self.bundle.as_ref().ok_or(CertError::NoCa)
    }

    /// The current certificate for `identity`, fetching it the first time (and starting its
    /// renewal loop).
    pub async fn get(self: &Arc<Self>, identity: &SpiffeId) -> Result<Arc<WorkloadCertificate>, CertError> {
        if let Some(cert) = self.cached(identity) {
            return Ok(cert);
        }
        let _one_at_a_time = self.fetching.lock().await;
        if let Some(cert) = self.cached(identity) {
            return Ok(cert);
        }
        let cert = Arc::new(self.fetch(identity).await?);
        info!(%identity, not_after = ?cert.not_after, "certificate issued");
        self.certs.lock().expect("poisoned").insert(identity.clone(), cert.clone());
        tokio::spawn(self.clone().renew_loop(identity.clone()));
        Ok(cert)
    }

    fn cached(&self, identity: &SpiffeId) -> Option<Arc<WorkloadCertificate>> {
        let certs = self.certs.lock().expect("poisoned");
        certs.get(identity).filter(|c| c.not_after > SystemTime::now()).cloned()
    }

    async fn fetch(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, CertError> {
        let ca = self.ca.as_ref().ok_or(CertError::NoCa)?;
        let signing = |reason: String| CertError::Signing { identity: identity.clone(), reason };
        let (key, csr) = new_key_and_csr(identity).map_err(|e| signing(e.to_string()))?;
        let chain = ca.sign(csr, identity.clone()).await?;
        workload_certificate(identity.clone(), &key, chain).map_err(|e| signing(e.to_string()))
    }

    /// Renews at half-life; on failure keeps the current certificate and retries with backoff.
    async fn renew_loop(self: Arc<Self>, identity: SpiffeId) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let Some(current) = self.certs.lock().expect("poisoned").get(&identity).cloned() else {
                return;
            };
            let wait = current.refresh_at().duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
            match self.fetch(&identity).await {
                Ok(fresh) => {
                    info!(%identity, not_after = ?fresh.not_after, "certificate renewed");
                    self.certs.lock().expect("poisoned").insert(identity.clone(), Arc::new(fresh));
                    self.rotations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    backoff = Duration::from_secs(1);
                }
                Err(e) => {
                    warn!(%identity, "renewal failed, keeping the current certificate until it expires: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    pub fn view(&self) -> Vec<CertView> {
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let certs = self.certs.lock().expect("poisoned");
        let mut out: Vec<CertView> = certs
            .values()
            .map(|c| CertView {
                identity: c.identity.to_string(),
                not_before: secs(c.not_before),
                not_after: secs(c.not_after),
                refresh_at: secs(c.refresh_at()),
                serial_sha256: fingerprint(&c.chain[0]),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert);
    digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn a_token_file_is_read_again_at_every_use() {
        // The kubelet rotates a projected ServiceAccount token by replacing the file: every
        // proxy (ztunnel and waypoint, through CaSettings and config_stream::ClientSettings)
        // must send the current one.
        let dir = std::env::temp_dir().join(format!("warren-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "first\n").unwrap();
        let token = Token::File(path.clone());
        assert_eq!(token.get(), Ok("first".to_string()));
        std::fs::write(&path, "rotated").unwrap();
        assert_eq!(token.get(), Ok("rotated".to_string()));
        std::fs::remove_file(&path).unwrap();
        assert!(token.get().unwrap_err().contains(&path.display().to_string()));
        let _ = std::fs::remove_dir(&dir);
    }

    /// The real CA signing, that starts refusing after `good` certificates: how a renewal
    /// failure looks to ztunnel (the CA unreachable or refusing).
    struct FlakyCa {
        ca: Ca,
        lifetime: Duration,
        good: usize,
        calls: AtomicUsize,
    }

    impl CaClient for FlakyCa {
        fn sign(&self, csr: CertificateSigningRequestDer<'static>, identity: SpiffeId) -> SignFuture<'_> {
            Box::pin(async move {
                if self.calls.fetch_add(1, Ordering::SeqCst) >= self.good {
                    return Err(CertError::Signing { identity, reason: "CA unavailable".into() });
                }
                self.ca
                    .sign(&csr, &identity, self.lifetime, SystemTime::now())
                    .map_err(|e| CertError::Signing { identity, reason: e.to_string() })
            })
        }
    }

    #[tokio::test]
    async fn a_failed_renewal_keeps_the_current_certificate_until_it_expires() {
        let ca = Ca::generate("cluster.local").unwrap();
        let bundle = TrustBundle::new(std::slice::from_ref(ca.root())).unwrap();
        // Four-second certificates (to the second): renewal is due after about two.
        let flaky =
            Arc::new(FlakyCa { ca, lifetime: Duration::from_secs(4), good: 1, calls: AtomicUsize::new(0) });
        let certs = CertManager::new(Some(flaky.clone()), Some(bundle));
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let first = certs.get(&id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(flaky.calls.load(Ordering::SeqCst) >= 2, "renewal was not attempted");
        let still = certs.get(&id).await.unwrap();
        assert!(Arc::ptr_eq(&first, &still), "the current certificate was dropped after a failed renewal");
        assert_eq!(certs.rotations.load(Ordering::Relaxed), 0);
        // Once it has expired, and the CA still refuses, there is no certificate to hand out.
        tokio::time::sleep(
            first.not_after.duration_since(SystemTime::now()).unwrap_or_default()
                + Duration::from_millis(1100),
        )
        .await;
        assert!(certs.get(&id).await.is_err(), "an expired certificate was handed out");
    }
}
