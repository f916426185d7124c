//! The mesh CA as a service: signs a proxy's CSR for an identity only when the proxy is
//! authenticated and the identity is one its [`Principal`] may have:
//!
//! - a node (its ztunnel: a per-node bootstrap token, or on Kubernetes a pod-bound token of the
//!   ztunnel's ServiceAccount, see [`crate::kube_ca`]) gets the identities of the pods scheduled
//!   on it;
//! - any other pod (on Kubernetes, its pod-bound ServiceAccount token: a waypoint) gets its own
//!   identity only.
//!
//! The protocol is in `warren_core::ca_protocol`.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateSigningRequestDer;
use warren_core::{
    accept::{AcceptErrors, HANDSHAKE_TIMEOUT},
    ca::{Ca, base64, base64_decode},
    ca_protocol::{ErrorResponse, PATH, SignRequest, SignResponse},
    endpoints::{IDLE_TIMEOUT, http1_server},
    identity::SpiffeId,
    model::NodeConfig,
};

/// The largest signing request read (a CSR and an identity are a few KiB).
const MAX_REQUEST_BYTES: usize = 64 * 1024;

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
        "a bearer token identifying the requesting proxy is required".to_string(),
    ))
}

/// Who an authenticated token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A node's ztunnel: a bootstrap token of `--tokens`, or a pod-bound token of the ztunnel's
    /// ServiceAccount (`--ztunnel-service-account`) whose pod runs on this node.
    Node(String),
    /// Any other pod, by its pod-bound ServiceAccount token (Kubernetes mode): a waypoint, or
    /// any workload asking for its own identity.
    Pod { namespace: String, service_account: String, name: String, node: String },
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Node(node) => write!(f, "node {node}"),
            Principal::Pod { namespace, service_account, name, node } => {
                write!(f, "pod {namespace}/{name} (ServiceAccount {service_account}, node {node})")
            }
        }
    }
}

/// Whether `principal` (authenticated) may have `identity` signed: for a node, a pod running
/// as that identity is scheduled on it; for a pod, it is the pod's own identity.
pub fn authorize(
    config: &NodeConfig,
    trust_domain: &str,
    principal: &Principal,
    identity: &SpiffeId,
) -> Result<(), (StatusCode, String)> {
    if identity.trust_domain != trust_domain {
        return Err((StatusCode::FORBIDDEN, format!("{identity} is not in trust domain {trust_domain}")));
    }
    match principal {
        Principal::Node(node) => {
            let runs_here =
                config.workloads.iter().any(|w| w.node == *node && w.identity(trust_domain) == *identity);
            if !runs_here {
                return Err((StatusCode::FORBIDDEN, format!("no pod on node {node} runs as {identity}")));
            }
        }
        Principal::Pod { namespace, service_account, .. } => {
            let own = SpiffeId {
                trust_domain: trust_domain.to_string(),
                namespace: namespace.clone(),
                service_account: service_account.clone(),
            };
            if own != *identity {
                return Err((
                    StatusCode::FORBIDDEN,
                    format!(
                        "{principal} asked for {identity}, but a pod's ServiceAccount token gets only \
                         its own identity, {own} (node-wide identities need the ztunnel's \
                         ServiceAccount token)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// How the CA finds who is asking from its token: the bootstrap tokens of `--tokens` first
/// (constant-time comparison, no API call), then, in Kubernetes mode, a TokenReview.
#[derive(Default)]
pub struct Authenticator {
    pub tokens: Option<Tokens>,
    pub reviewer: Option<crate::kube_ca::TokenReviewer>,
}

impl Authenticator {
    pub async fn principal(&self, token: &str) -> Result<Principal, (StatusCode, String)> {
        if let Some(node) = self.tokens.as_ref().and_then(|t| t.node(token)) {
            return Ok(Principal::Node(node.to_string()));
        }
        match &self.reviewer {
            Some(reviewer) => reviewer.principal(token).await.map_err(|e| (e.status(), e.to_string())),
            None => Err((StatusCode::UNAUTHORIZED, "unknown token".to_string())),
        }
    }
}

pub struct CaService {
    pub ca: Ca,
    pub auth: Arc<Authenticator>,
    pub trust_domain: String,
    pub lifetime: Duration,
    /// The latest translation (shared with the config stream's hub, never copied).
    pub config: Arc<RwLock<Arc<NodeConfig>>>,
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
    let mut errors = AcceptErrors::new();
    loop {
        let (tcp, peer) = match accept(&listener).await {
            Ok(accepted) => accepted,
            Err(e) => {
                errors.back_off(&e, |line| eprintln!("controller: CA and config-stream port: {line}")).await;
                continue;
            }
        };
        let (acceptor, service, hub) = (acceptor.clone(), service.clone(), hub.clone());
        tokio::spawn(async move {
            // A client that never finishes its handshake must not hold the descriptor.
            let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
                return;
            };
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
            // The request head within the idle bound, as on every endpoint; the body has its
            // own bound in `handle`.
            let _ = http1_server(IDLE_TIMEOUT).serve_connection(TokioIo::new(stream), handler).await;
        });
    }
}

/// The next connection, with Nagle's algorithm off, as the proxies' side has it: the config
/// stream is written as h2 frames under a flow-control window, and a small write held back
/// until the peer's delayed ACK stalled about half of the proxies' first full config (4 MB at
/// 10,000 pods) to 2.6 s instead of 0.4 s.
async fn accept(
    listener: &tokio::net::TcpListener,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    let (tcp, peer) = listener.accept().await?;
    // Only slower without it: not a reason to drop the connection.
    let _ = tcp.set_nodelay(true);
    Ok((tcp, peer))
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_vec(body).unwrap_or_default())));
    *r.status_mut() = status;
    r
}

async fn handle<B>(service: &CaService, req: Request<B>, peer: std::net::SocketAddr) -> Response<Full<Bytes>>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let refuse = |status: StatusCode, error: String| {
        eprintln!("controller: CA refused a request from {peer}: {status} {error}");
        json(status, &ErrorResponse { error })
    };
    if req.method() != hyper::Method::POST || req.uri().path() != PATH {
        return refuse(StatusCode::NOT_FOUND, format!("POST {PATH}"));
    }
    let authorization =
        req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    // A signing request is a CSR and an identity, a few KiB. Read whole, so bounded in size
    // and time: anyone can reach this port, and an endless or stalled body would hold memory
    // and the connection.
    let body = Limited::new(req.into_body(), MAX_REQUEST_BYTES);
    let body = match tokio::time::timeout(IDLE_TIMEOUT, body.collect()).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) if e.is::<LengthLimitError>() => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a request is at most {MAX_REQUEST_BYTES} bytes"),
            );
        }
        Ok(Err(_)) => return refuse(StatusCode::BAD_REQUEST, "unreadable body".into()),
        Err(_) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {} s", IDLE_TIMEOUT.as_secs()),
            );
        }
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
    let principal = match bearer(authorization.as_deref()) {
        Ok(token) => match service.auth.principal(token).await {
            Ok(principal) => principal,
            Err((status, error)) => return refuse(status, error),
        },
        Err((status, error)) => return refuse(status, error),
    };
    let authorized = {
        let config = service.config.read().expect("poisoned");
        authorize(&config, &service.trust_domain, &principal, &identity)
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
            eprintln!("controller: CA signed {identity} for {principal}");
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
            waypoint: None,
        };
        let config = NodeConfig {
            workloads: vec![pod("node-1", "checkout"), pod("node-2", "payment")],
            ..Default::default()
        };
        let id = |sa: &str| format!("spiffe://cluster.local/ns/shop/sa/{sa}").parse::<SpiffeId>().unwrap();
        let ask = |auth: Option<&str>, sa: &str| {
            let token = bearer(auth).map_err(|e| e.0)?;
            let node = tokens.node(token).ok_or(StatusCode::UNAUTHORIZED)?;
            authorize(&config, "cluster.local", &Principal::Node(node.into()), &id(sa))
                .map_err(|e| e.0)
                .map(|()| node)
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
            authorize(&config, "cluster.local", &Principal::Node("node-1".into()), &foreign).map_err(|e| e.0),
            Err(StatusCode::FORBIDDEN)
        );
    }

    #[tokio::test]
    async fn connections_are_accepted_without_nagles_delay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, _client) = tokio::join!(accept(&listener), tokio::net::TcpStream::connect(addr));
        let (tcp, _) = accepted.unwrap();
        assert!(tcp.nodelay().unwrap(), "the CA / config-stream side must not delay small writes");
    }

    fn service() -> CaService {
        CaService {
            ca: Ca::generate("cluster.local").unwrap(),
            auth: Arc::new(Authenticator {
                tokens: Some(Tokens::parse("node-1 secret-1\n")),
                reviewer: None,
            }),
            trust_domain: "cluster.local".into(),
            lifetime: Duration::from_secs(3600),
            config: Default::default(),
        }
    }

    fn post<B>(body: B) -> Request<B> {
        Request::post(PATH).header("authorization", "Bearer secret-1").body(body).unwrap()
    }

    #[tokio::test]
    async fn an_oversized_body_is_refused_without_being_read_whole() {
        let peer = "127.0.0.1:1".parse().unwrap();
        let huge = Full::new(Bytes::from(vec![b' '; MAX_REQUEST_BYTES + 1]));
        assert_eq!(handle(&service(), post(huge), peer).await.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // Just under the bound it is read, and refused for what it says.
        let json_but_wrong = Full::new(Bytes::from(vec![b' '; MAX_REQUEST_BYTES - 1]));
        assert_eq!(handle(&service(), post(json_but_wrong), peer).await.status(), StatusCode::BAD_REQUEST);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_is_given_up_after_the_idle_timeout() {
        // A body whose bytes never come.
        struct Stalled;
        impl hyper::body::Body for Stalled {
            type Data = Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
                std::task::Poll::Pending
            }
        }
        let stalled = Stalled;
        let started = tokio::time::Instant::now();
        let service = service();
        let handled = handle(&service, post(stalled), "127.0.0.1:1".parse().unwrap());
        let response =
            tokio::time::timeout(IDLE_TIMEOUT * 2, handled).await.expect("the CA gave up on the body");
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(started.elapsed(), IDLE_TIMEOUT);
    }

    #[tokio::test]
    async fn without_a_token_review_only_the_bootstrap_tokens_authenticate() {
        let auth = Authenticator { tokens: Some(Tokens::parse("node-1 secret-1\n")), reviewer: None };
        assert_eq!(auth.principal("secret-1").await, Ok(Principal::Node("node-1".to_string())));
        assert_eq!(auth.principal("other").await.map_err(|e| e.0), Err(StatusCode::UNAUTHORIZED));
        let none = Authenticator::default();
        assert_eq!(none.principal("secret-1").await.map_err(|e| e.0), Err(StatusCode::UNAUTHORIZED));
    }

    #[test]
    fn a_pod_gets_its_own_identity_only_whatever_runs_on_its_node() {
        let waypoint = Principal::Pod {
            namespace: "shop".into(),
            service_account: "waypoint".into(),
            name: "waypoint-7d9f".into(),
            node: "node-1".into(),
        };
        let checkout = Workload {
            uid: "c".into(),
            name: "checkout".into(),
            namespace: "shop".into(),
            service_account: "checkout".into(),
            node: "node-1".into(),
            ips: vec![],
            enrolled: true,
            labels: Default::default(),
            waypoint: None,
        };
        let config = NodeConfig { workloads: vec![checkout], ..Default::default() };
        let id = |ns: &str, sa: &str| {
            format!("spiffe://cluster.local/ns/{ns}/sa/{sa}").parse::<SpiffeId>().unwrap()
        };
        // Its own identity, even though the config does not list the waypoint's pod.
        assert_eq!(authorize(&config, "cluster.local", &waypoint, &id("shop", "waypoint")), Ok(()));
        // Not another pod's on its node (which the node itself may have), nor its name elsewhere.
        let (status, message) =
            authorize(&config, "cluster.local", &waypoint, &id("shop", "checkout")).unwrap_err();
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(message.contains("spiffe://cluster.local/ns/shop/sa/checkout"), "{message}");
        assert!(
            message.contains("only its own identity, spiffe://cluster.local/ns/shop/sa/waypoint"),
            "{message}"
        );
        assert!(message.contains("pod shop/waypoint-7d9f"), "{message}");
        assert_eq!(
            authorize(&config, "cluster.local", &Principal::Node("node-1".into()), &id("shop", "checkout")),
            Ok(())
        );
        assert_eq!(
            authorize(&config, "cluster.local", &waypoint, &id("other", "waypoint")).map_err(|e| e.0),
            Err(StatusCode::FORBIDDEN)
        );
        let foreign: SpiffeId = "spiffe://evil/ns/shop/sa/waypoint".parse().unwrap();
        assert_eq!(
            authorize(&config, "cluster.local", &waypoint, &foreign).map_err(|e| e.0),
            Err(StatusCode::FORBIDDEN)
        );
    }
}
