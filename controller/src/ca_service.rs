//! The mesh CA as a service: signs a ztunnel's CSR for an identity only when the ztunnel is
//! authenticated (a per-node bootstrap token, or on Kubernetes its ServiceAccount token checked
//! with a TokenReview, see [`crate::kube_ca`]) and a pod running as that identity is scheduled
//! on the ztunnel's node. The protocol is in `warren_core::ca_protocol`.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateSigningRequestDer;
use warren_core::{
    ca::{Ca, base64, base64_decode},
    ca_protocol::{ErrorResponse, PATH, SignRequest, SignResponse},
    identity::SpiffeId,
    model::NodeConfig,
};

/// Node bootstrap tokens: `<node> <token>` per line, `#` comments.
#[derive(Debug, Default, Clone)]
pub struct Tokens(HashMap<String, String>);

impl Tokens {
    pub fn parse(text: &str) -> Self {
        let pairs =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).filter_map(|l| {
                let (node, token) = l.split_once(char::is_whitespace)?;
                Some((token.trim().to_string(), node.to_string()))
            });
        Tokens(pairs.collect())
    }

    /// The node a token belongs to, compared in constant time per candidate.
    pub fn node(&self, token: &str) -> Option<&str> {
        self.0.iter().find(|(t, _)| constant_time_eq(t.as_bytes(), token.as_bytes())).map(|(_, n)| n.as_str())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of an `Authorization` header (401 without one).
pub fn bearer(authorization: Option<&str>) -> Result<&str, (StatusCode, String)> {
    authorization.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim).filter(|t| !t.is_empty()).ok_or((
        StatusCode::UNAUTHORIZED,
        "a bearer token identifying the requesting node is required".to_string(),
    ))
}

/// Whether `node` (authenticated) may have `identity` signed: a pod running as that identity
/// is scheduled on it.
pub fn authorize(
    config: &NodeConfig,
    trust_domain: &str,
    node: &str,
    identity: &SpiffeId,
) -> Result<(), (StatusCode, String)> {
    if identity.trust_domain != trust_domain {
        return Err((StatusCode::FORBIDDEN, format!("{identity} is not in trust domain {trust_domain}")));
    }
    let runs_here = config.workloads.iter().any(|w| w.node == node && w.identity(trust_domain) == *identity);
    if !runs_here {
        return Err((StatusCode::FORBIDDEN, format!("no pod on node {node} runs as {identity}")));
    }
    Ok(())
}

/// How the CA finds the requesting node from its token: the bootstrap tokens of `--tokens`
/// first (constant-time comparison, no API call), then, in Kubernetes mode, a TokenReview.
#[derive(Default)]
pub struct Authenticator {
    pub tokens: Option<Tokens>,
    pub reviewer: Option<crate::kube_ca::TokenReviewer>,
}

impl Authenticator {
    pub async fn node(&self, token: &str) -> Result<String, (StatusCode, String)> {
        if let Some(node) = self.tokens.as_ref().and_then(|t| t.node(token)) {
            return Ok(node.to_string());
        }
        match &self.reviewer {
            Some(reviewer) => reviewer.node(token).await.map_err(|e| (e.status(), e.to_string())),
            None => Err((StatusCode::UNAUTHORIZED, "unknown token".to_string())),
        }
    }
}

pub struct CaService {
    pub ca: Ca,
    pub auth: Arc<Authenticator>,
    pub trust_domain: String,
    pub lifetime: Duration,
    pub config: Arc<RwLock<NodeConfig>>,
}

/// Loads the root from `dir` (root-cert.pem, root-key.pem), creating it on first start.
pub fn load_or_create_root(dir: &Path, trust_domain: &str) -> anyhow::Result<Ca> {
    let (cert, key) = (dir.join("root-cert.pem"), dir.join("root-key.pem"));
    if cert.exists() && key.exists() {
        return Ok(Ca::from_pem(&std::fs::read_to_string(&cert)?, &std::fs::read_to_string(&key)?)?);
    }
    std::fs::create_dir_all(dir)?;
    let ca = Ca::generate(trust_domain)?;
    std::fs::write(&cert, ca.root_pem())?;
    std::fs::write(&key, ca.key_pem())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    eprintln!("controller: created a new mesh root in {}", dir.display());
    Ok(ca)
}

/// Serves the CA (HTTP/1.1) and, on connections that negotiate `h2`, the config stream: one
/// TLS port for both, as Istio serves certificates and xDS on 15012. `tls` must offer both
/// ALPN protocols.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: Arc<CaService>,
    hub: Option<Arc<crate::stream::Hub>>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, peer)) = listener.accept().await else { continue };
        let (acceptor, service, hub) = (acceptor.clone(), service.clone(), hub.clone());
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else { return };
            if let Some(hub) = hub
                && stream.get_ref().1.alpn_protocol() == Some(b"h2")
            {
                crate::stream::serve_connection(stream, peer, hub).await;
                return;
            }
            let handler = service_fn(move |req| {
                let service = service.clone();
                async move { Ok::<_, hyper::Error>(handle(&service, req, peer).await) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), handler).await;
        });
    }
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_vec(body).unwrap_or_default())));
    *r.status_mut() = status;
    r
}

async fn handle(
    service: &CaService,
    req: Request<hyper::body::Incoming>,
    peer: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
    let refuse = |status: StatusCode, error: String| {
        eprintln!("controller: CA refused a request from {peer}: {status} {error}");
        json(status, &ErrorResponse { error })
    };
    if req.method() != hyper::Method::POST || req.uri().path() != PATH {
        return refuse(StatusCode::NOT_FOUND, format!("POST {PATH}"));
    }
    let authorization =
        req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let Ok(body) = req.into_body().collect().await else {
        return refuse(StatusCode::BAD_REQUEST, "unreadable body".into());
    };
    let Ok(request) = serde_json::from_slice::<SignRequest>(&body.to_bytes()) else {
        return refuse(StatusCode::BAD_REQUEST, "expected {\"identity\", \"csr\"}".into());
    };
    let Ok(identity) = request.identity.parse::<SpiffeId>() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("{:?} is not a workload SPIFFE ID", request.identity),
        );
    };
    let node = match bearer(authorization.as_deref()) {
        Ok(token) => match service.auth.node(token).await {
            Ok(node) => node,
            Err((status, error)) => return refuse(status, error),
        },
        Err((status, error)) => return refuse(status, error),
    };
    let authorized = {
        let config = service.config.read().expect("poisoned");
        authorize(&config, &service.trust_domain, &node, &identity)
    };
    if let Err((status, error)) = authorized {
        return refuse(status, error);
    }
    let Some(csr) = base64_decode(&request.csr) else {
        return refuse(StatusCode::BAD_REQUEST, "the CSR is not base64".into());
    };
    match service.ca.sign(
        &CertificateSigningRequestDer::from(csr),
        &identity,
        service.lifetime,
        SystemTime::now(),
    ) {
        Ok(chain) => {
            eprintln!("controller: CA signed {identity} for node {node}");
            json(StatusCode::OK, &SignResponse { chain: chain.iter().map(|c| base64(c)).collect() })
        }
        Err(e) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use warren_core::model::Workload;

    use super::*;

    #[test]
    fn only_an_authenticated_node_gets_the_identities_of_its_own_pods() {
        let tokens = Tokens::parse("# node token\nnode-1 secret-1\nnode-2 secret-2\n");
        let pod = |node: &str, sa: &str| Workload {
            uid: sa.into(),
            name: sa.into(),
            namespace: "shop".into(),
            service_account: sa.into(),
            node: node.into(),
            ips: vec![],
            enrolled: true,
            labels: Default::default(),
        };
        let config = NodeConfig {
            workloads: vec![pod("node-1", "checkout"), pod("node-2", "payment")],
            ..Default::default()
        };
        let id = |sa: &str| format!("spiffe://cluster.local/ns/shop/sa/{sa}").parse::<SpiffeId>().unwrap();
        let ask = |auth: Option<&str>, sa: &str| {
            let token = bearer(auth).map_err(|e| e.0)?;
            let node = tokens.node(token).ok_or(StatusCode::UNAUTHORIZED)?;
            authorize(&config, "cluster.local", node, &id(sa)).map_err(|e| e.0).map(|()| node)
        };
        assert_eq!(ask(Some("Bearer secret-1"), "checkout"), Ok("node-1"));
        assert_eq!(
            ask(Some("Bearer secret-1"), "payment"),
            Err(StatusCode::FORBIDDEN),
            "a pod on another node"
        );
        assert_eq!(ask(Some("Bearer secret-2"), "payment"), Ok("node-2"));
        assert_eq!(ask(None, "checkout"), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(ask(Some("Bearer "), "checkout"), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(ask(Some("Basic secret-1"), "checkout"), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(ask(Some("Bearer guess"), "checkout"), Err(StatusCode::UNAUTHORIZED));
        let foreign: SpiffeId = "spiffe://evil/ns/shop/sa/checkout".parse().unwrap();
        assert_eq!(
            authorize(&config, "cluster.local", "node-1", &foreign).map_err(|e| e.0),
            Err(StatusCode::FORBIDDEN)
        );
    }

    #[tokio::test]
    async fn without_a_token_review_only_the_bootstrap_tokens_authenticate() {
        let auth = Authenticator { tokens: Some(Tokens::parse("node-1 secret-1\n")), reviewer: None };
        assert_eq!(auth.node("secret-1").await, Ok("node-1".to_string()));
        assert_eq!(auth.node("other").await.map_err(|e| e.0), Err(StatusCode::UNAUTHORIZED));
        let none = Authenticator::default();
        assert_eq!(none.node("secret-1").await.map_err(|e| e.0), Err(StatusCode::UNAUTHORIZED));
    }
}
