//! The config stream: how the controller feeds ztunnels and waypoints, in the manner of
//! delta xDS but spelled in JSON so it can be read with a packet capture and a text editor.
//!
//! One HTTP/2 stream (`POST /v1/config`) inside TLS to the controller (ALPN `h2`, the
//! controller presenting its SPIFFE identity under the mesh root; the proxy authenticates with
//! its node's bearer token in the first message). Both directions carry newline-delimited JSON
//! messages ([`ProxyMessage`], [`ControllerMessage`]). The configuration is a set of named,
//! hashed **resources** (a workload, a service, a policy, a route table ...); the controller
//! sends only what changed since what the proxy has (upserts and removals), every update under
//! a new version. The proxy applies an update to a copy, checks the result, and answers ACK
//! (it now runs that version) or NACK with its reason (it keeps the previous config). A proxy
//! that reconnects says which resources it holds (name → hash), so the controller resumes with
//! the difference instead of a full resend. While the controller is away, proxies keep serving
//! their last good config. docs/config-stream.md has the schema.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    l7::{DestinationRule, L7Authorization, VirtualService},
    model::{NodeConfig, Service, Workload},
    policy::{Authorization, PeerAuthentication},
};

pub const PATH: &str = "/v1/config";

/// What kind of proxy subscribes, and so which resources it gets.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum ProxyKind {
    /// A node proxy: workloads, services, L4 policies, the identities it may request.
    Ztunnel,
    /// A waypoint: workloads, services, routes, DestinationRules, L7 policies.
    Waypoint { namespace: String, name: String },
}

/// Resource kinds, as they appear in resource keys (`kind/name`).
pub mod kinds {
    pub const WORKLOAD: &str = "workload";
    pub const SERVICE: &str = "service";
    pub const AUTHORIZATION: &str = "authorization";
    pub const PEER_AUTHENTICATION: &str = "peerAuthentication";
    pub const VIRTUAL_SERVICE: &str = "virtualService";
    pub const DESTINATION_RULE: &str = "destinationRule";
    pub const L7_AUTHORIZATION: &str = "l7Authorization";
    pub const MESH: &str = "mesh";
    /// The SPIFFE identities of the enrolled pods on a ztunnel's node: the certificates it
    /// may request.
    pub const IDENTITY: &str = "identity";
}

/// One resource as sent: its key, content hash, order (route tables are ordered) and value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    /// `kind/name`, e.g. `workload/production/checkout-0`.
    pub key: String,
    pub hash: String,
    /// Position among resources of its kind where order matters (VirtualServices).
    #[serde(default)]
    pub order: u32,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum ProxyMessage {
    /// First message on a stream.
    Subscribe {
        /// Stable across reconnects: `ztunnel/<node>` or `waypoint/<ns>/<name>/<node>`.
        proxy: String,
        node: String,
        #[serde(flatten)]
        kind: ProxyKind,
        token: String,
        /// The version the proxy runs, and what it holds (key → hash), to resume.
        #[serde(default)]
        version: Option<String>,
        #[serde(default)]
        have: BTreeMap<String, String>,
    },
    Ack {
        version: String,
    },
    Nack {
        version: String,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum ControllerMessage {
    Update {
        version: String,
        #[serde(default)]
        upsert: Vec<Resource>,
        #[serde(default)]
        remove: Vec<String>,
    },
    /// The subscription is refused (bad token, ...): the proxy should not retry quickly.
    Refused { reason: String },
}

/// A content hash: hex SHA-256 (first 16 bytes) of the JSON.
pub fn hash(value: &Value, order: u32) -> String {
    let bytes = serde_json::to_vec(&(value, order)).expect("JSON values serialize");
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

fn resource(kind: &str, name: &str, order: u32, value: impl Serialize) -> (String, Resource) {
    let value = serde_json::to_value(value).expect("the model serializes");
    let key = format!("{kind}/{name}");
    (key.clone(), Resource { key, hash: hash(&value, order), order, value })
}

/// The resources a proxy of `kind` on `node` gets from `config`.
pub fn resources_for(config: &NodeConfig, kind: &ProxyKind, node: &str) -> BTreeMap<String, Resource> {
    let mut out = shared_resources(config, kind);
    out.extend(node_resources(config, kind, node));
    out
}

/// What every proxy of `kind`'s family gets, whatever its node: computed once per version.
pub fn shared_resources(config: &NodeConfig, kind: &ProxyKind) -> BTreeMap<String, Resource> {
    let mut out = BTreeMap::new();
    for w in &config.workloads {
        out.extend([resource(kinds::WORKLOAD, &w.uid, 0, w)]);
    }
    for s in &config.services {
        out.extend([resource(kinds::SERVICE, &format!("{}/{}", s.namespace, s.name), 0, s)]);
    }
    out.extend([resource(
        kinds::MESH,
        "settings",
        0,
        serde_json::json!({"rootNamespace": config.root_namespace}),
    )]);
    match kind {
        ProxyKind::Ztunnel => {
            for a in &config.authorizations {
                out.extend([resource(kinds::AUTHORIZATION, &format!("{}/{}", a.namespace, a.name), 0, a)]);
            }
            for p in &config.peer_authentications {
                out.extend([resource(
                    kinds::PEER_AUTHENTICATION,
                    &format!("{}/{}", p.namespace, p.name),
                    0,
                    p,
                )]);
            }
        }
        ProxyKind::Waypoint { .. } => {
            for (i, v) in config.routing.virtual_services.iter().enumerate() {
                let name = format!("{}/{}/{:?}", v.namespace, v.name, v.kind);
                out.extend([resource(kinds::VIRTUAL_SERVICE, &name, i as u32, v)]);
            }
            for (i, d) in config.routing.destination_rules.iter().enumerate() {
                out.extend([resource(
                    kinds::DESTINATION_RULE,
                    &format!("{}/{}", d.namespace, d.name),
                    i as u32,
                    d,
                )]);
            }
            for a in &config.routing.authorizations {
                out.extend([resource(kinds::L7_AUTHORIZATION, &format!("{}/{}", a.namespace, a.name), 0, a)]);
            }
        }
    }
    out
}

/// What only the proxy on `node` gets: a ztunnel's identities.
pub fn node_resources(config: &NodeConfig, kind: &ProxyKind, node: &str) -> BTreeMap<String, Resource> {
    let mut out = BTreeMap::new();
    if *kind == ProxyKind::Ztunnel {
        for w in config.workloads.iter().filter(|w| w.enrolled && w.node == node) {
            out.extend([resource(
                kinds::IDENTITY,
                &w.uid,
                0,
                serde_json::json!({"namespace": w.namespace, "serviceAccount": w.service_account}),
            )]);
        }
    }
    out
}

/// What to send a proxy that holds `have` (key → hash) so it ends up with `shared` (what
/// every proxy of its kind gets) and `own` (what only it gets), without merging the two.
pub fn delta(
    have: &BTreeMap<String, String>,
    shared: &BTreeMap<String, Resource>,
    own: &BTreeMap<String, Resource>,
) -> (Vec<Resource>, Vec<String>) {
    let upsert =
        shared.values().chain(own.values()).filter(|r| have.get(&r.key) != Some(&r.hash)).cloned().collect();
    let remove = have.keys().filter(|k| !shared.contains_key(*k) && !own.contains_key(*k)).cloned().collect();
    (upsert, remove)
}

/// Why an update was refused (the NACK's reason).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RejectReason {
    #[error("resource {key}: {error}")]
    Malformed { key: String, error: String },
    #[error("resource {0}: unknown kind (a newer controller?)")]
    UnknownKind(String),
    #[error("{0}")]
    Invalid(String),
}

/// One resource, parsed.
#[derive(Clone, Debug)]
enum Typed {
    Workload(Box<Workload>),
    Service(Box<Service>),
    Authorization(Box<Authorization>),
    PeerAuthentication(Box<PeerAuthentication>),
    VirtualService(u32, Box<VirtualService>),
    DestinationRule(u32, Box<DestinationRule>),
    L7Authorization(Box<L7Authorization>),
    Mesh(String),
    Identity,
}

fn parse(r: &Resource) -> Result<Typed, RejectReason> {
    let malformed =
        |e: serde_json::Error| RejectReason::Malformed { key: r.key.clone(), error: e.to_string() };
    let value = r.value.clone();
    Ok(match r.key.split('/').next().unwrap_or("") {
        kinds::WORKLOAD => Typed::Workload(serde_json::from_value(value).map_err(malformed)?),
        kinds::SERVICE => Typed::Service(serde_json::from_value(value).map_err(malformed)?),
        kinds::AUTHORIZATION => Typed::Authorization(serde_json::from_value(value).map_err(malformed)?),
        kinds::PEER_AUTHENTICATION => {
            Typed::PeerAuthentication(serde_json::from_value(value).map_err(malformed)?)
        }
        kinds::VIRTUAL_SERVICE => {
            Typed::VirtualService(r.order, serde_json::from_value(value).map_err(malformed)?)
        }
        kinds::DESTINATION_RULE => {
            Typed::DestinationRule(r.order, serde_json::from_value(value).map_err(malformed)?)
        }
        kinds::L7_AUTHORIZATION => Typed::L7Authorization(serde_json::from_value(value).map_err(malformed)?),
        kinds::MESH => Typed::Mesh(value["rootNamespace"].as_str().unwrap_or_default().to_string()),
        kinds::IDENTITY => Typed::Identity,
        _ => return Err(RejectReason::UnknownKind(r.key.clone())),
    })
}

/// The resources a proxy holds (their hashes, and parsed), and the config they make.
#[derive(Clone, Debug, Default)]
pub struct Held {
    hashes: BTreeMap<String, String>,
    typed: BTreeMap<String, Typed>,
}

impl Held {
    pub fn hashes(&self) -> BTreeMap<String, String> {
        self.hashes.clone()
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Applies an update to a copy and builds its config; `self` is untouched on failure. Only
    /// the upserted resources are parsed.
    pub fn apply(&self, upsert: &[Resource], remove: &[String]) -> Result<(Held, NodeConfig), RejectReason> {
        let parsed: Vec<(String, String, Typed)> = upsert
            .iter()
            .map(|r| Ok((r.key.clone(), r.hash.clone(), parse(r)?)))
            .collect::<Result<_, _>>()?;
        let mut next = self.clone();
        for key in remove {
            next.hashes.remove(key);
            next.typed.remove(key);
        }
        for (key, hash, typed) in parsed {
            next.hashes.insert(key.clone(), hash);
            next.typed.insert(key, typed);
        }
        let config = next.config()?;
        Ok((next, config))
    }

    /// The config these resources make, checked for what would make it ambiguous.
    pub fn config(&self) -> Result<NodeConfig, RejectReason> {
        let mut config = NodeConfig::default();
        let mut ordered_vs: Vec<(u32, VirtualService)> = Vec::new();
        let mut ordered_dr: Vec<(u32, DestinationRule)> = Vec::new();
        for typed in self.typed.values() {
            match typed {
                Typed::Workload(w) => config.workloads.push((**w).clone()),
                Typed::Service(s) => config.services.push((**s).clone()),
                Typed::Authorization(a) => config.authorizations.push((**a).clone()),
                Typed::PeerAuthentication(p) => config.peer_authentications.push((**p).clone()),
                Typed::VirtualService(order, v) => ordered_vs.push((*order, (**v).clone())),
                Typed::DestinationRule(order, d) => ordered_dr.push((*order, (**d).clone())),
                Typed::L7Authorization(a) => config.routing.authorizations.push((**a).clone()),
                Typed::Mesh(root) => config.root_namespace = root.clone(),
                Typed::Identity => {}
            }
        }
        ordered_vs.sort_by_key(|(order, _)| *order);
        ordered_dr.sort_by_key(|(order, _)| *order);
        config.routing.virtual_services = ordered_vs.into_iter().map(|(_, v)| v).collect();
        config.routing.destination_rules = ordered_dr.into_iter().map(|(_, d)| d).collect();
        check_addresses(&config)?;
        Ok(config)
    }
}

/// Two workloads claiming one IP would make every connection to it ambiguous (and capture
/// steer it to the wrong pod): such a config is refused whole, the last good one kept.
fn check_addresses(config: &NodeConfig) -> Result<(), RejectReason> {
    let mut seen: HashMap<std::net::IpAddr, &str> = HashMap::new();
    for w in &config.workloads {
        for ip in &w.ips {
            if let Some(other) = seen.insert(*ip, &w.uid)
                && other != w.uid
            {
                return Err(RejectReason::Invalid(format!(
                    "workloads {other} and {} both claim IP {ip}",
                    w.uid
                )));
            }
        }
    }
    let mut vips = HashSet::new();
    for s in &config.services {
        for vip in &s.vips {
            if !vips.insert(*vip) {
                return Err(RejectReason::Invalid(format!(
                    "service {}/{} claims VIP {vip}, which another service has",
                    s.namespace, s.name
                )));
            }
        }
    }
    Ok(())
}

/// Encodes a message as one line.
pub fn encode<T: Serialize>(message: &T) -> bytes::Bytes {
    let mut line = serde_json::to_vec(message).expect("messages serialize");
    line.push(b'\n');
    bytes::Bytes::from(line)
}

/// Splits a byte stream into lines (messages) as chunks arrive.
#[derive(Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            lines.push(line[..line.len() - 1].to_vec());
        }
        lines
    }
}

/// Where and as whom a proxy subscribes.
#[derive(Clone)]
pub struct ClientSettings {
    pub addr: std::net::SocketAddr,
    pub bundle: crate::tls::TrustBundle,
    pub controller_identity: crate::identity::SpiffeId,
    /// Re-read at every (re)subscription.
    pub token: crate::certs::Token,
    pub proxy: String,
    pub node: String,
    pub kind: ProxyKind,
}

impl ClientSettings {
    /// Settings from the mesh root (PEM file) and the node's token file.
    pub fn load(
        addr: std::net::SocketAddr,
        root_pem: &std::path::Path,
        token_file: &std::path::Path,
        trust_domain: &str,
        proxy: String,
        node: String,
        kind: ProxyKind,
    ) -> Result<Self, String> {
        let pem = std::fs::read(root_pem)
            .map_err(|e| format!("reading the mesh root {}: {e}", root_pem.display()))?;
        let root: rustls_pki_types::CertificateDer<'static> =
            rustls_pki_types::pem::PemObject::from_pem_slice(&pem)
                .map_err(|e| format!("{}: not a PEM certificate: {e:?}", root_pem.display()))?;
        let bundle =
            crate::tls::TrustBundle::new(&[root]).map_err(|e| format!("{}: {e}", root_pem.display()))?;
        let token = crate::certs::Token::File(token_file.to_path_buf());
        token.get()?;
        Ok(ClientSettings {
            addr,
            bundle,
            controller_identity: crate::certs::ca_identity(trust_domain),
            token,
            proxy,
            node,
            kind,
        })
    }
}

/// What the proxy's side of the stream reports, for its admin endpoint.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientStatus {
    pub connected: bool,
    /// The version the proxy runs.
    pub version: Option<String>,
    pub resources: usize,
    pub last_nack: Option<String>,
    pub last_error: Option<String>,
    pub updates_applied: u64,
    pub reconnects: u64,
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("connecting: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("the controller answered {0}")]
    Status(http::StatusCode),
    #[error("the controller refused the subscription: {0}")]
    Refused(String),
    #[error("the controller closed the stream")]
    Closed,
    #[error("unreadable message from the controller: {0}")]
    Garbled(String),
}

/// Subscribes to the controller and keeps subscribed: applies each update (calling `deliver`
/// with the new config and its version), ACKs or NACKs it, and on any failure reconnects with
/// backoff, resuming from what it holds. Never returns; the last good config stays in force
/// meanwhile.
pub async fn run_client(
    settings: ClientSettings,
    status: std::sync::Arc<std::sync::Mutex<ClientStatus>>,
    deliver: impl Fn(&str, NodeConfig) + Send + Sync + 'static,
) {
    let mut held = Held::default();
    let mut version: Option<String> = None;
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        let result = subscribe_once(&settings, &mut held, &mut version, &status, &deliver).await;
        let refused = matches!(result, Err(StreamError::Refused(_)));
        {
            let mut s = status.lock().expect("poisoned");
            s.connected = false;
            s.reconnects += 1;
            if let Err(e) = &result {
                s.last_error = Some(e.to_string());
            }
        }
        match &result {
            Err(e) => {
                tracing::warn!(controller = %settings.addr, "config stream: {e}; keeping the last good config and reconnecting in {backoff:?}")
            }
            Ok(()) => tracing::warn!(controller = %settings.addr, "config stream ended; reconnecting"),
        }
        tokio::time::sleep(if refused { backoff.max(std::time::Duration::from_secs(5)) } else { backoff })
            .await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
        if result.is_ok() {
            backoff = std::time::Duration::from_millis(200);
        }
    }
}

async fn subscribe_once(
    settings: &ClientSettings,
    held: &mut Held,
    version: &mut Option<String>,
    status: &std::sync::Mutex<ClientStatus>,
    deliver: &(impl Fn(&str, NodeConfig) + Send + Sync),
) -> Result<(), StreamError> {
    let tcp = tokio::net::TcpStream::connect(settings.addr).await?;
    let _ = tcp.set_nodelay(true);
    let mut tls_config =
        crate::tls::anonymous_client_config(&settings.bundle, &settings.controller_identity)?;
    tls_config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls_config))
        .connect(rustls_pki_types::ServerName::IpAddress(settings.addr.ip().into()), tcp)
        .await?;
    let (send, connection) = h2::client::handshake(tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut send = send.ready().await?;
    let request = http::Request::post(PATH).body(()).expect("static request");
    let (response, mut outgoing) = send.send_request(request, false)?;
    outgoing.send_data(
        encode(&ProxyMessage::Subscribe {
            proxy: settings.proxy.clone(),
            node: settings.node.clone(),
            kind: settings.kind.clone(),
            token: settings.token.get().map_err(|e| StreamError::Io(std::io::Error::other(e)))?,
            version: version.clone(),
            have: held.hashes(),
        }),
        false,
    )?;
    let response = response.await?;
    if response.status() != http::StatusCode::OK {
        return Err(StreamError::Status(response.status()));
    }
    {
        let mut s = status.lock().expect("poisoned");
        s.connected = true;
        s.last_error = None;
    }
    tracing::info!(controller = %settings.addr, resumed_from = ?version, held = held.len(), "config stream connected");
    let mut body = response.into_body();
    let mut lines = LineBuffer::default();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        for line in lines.push(&chunk) {
            let message: ControllerMessage =
                serde_json::from_slice(&line).map_err(|e| StreamError::Garbled(e.to_string()))?;
            match message {
                ControllerMessage::Refused { reason } => return Err(StreamError::Refused(reason)),
                ControllerMessage::Update { version: v, upsert, remove } => {
                    match held.apply(&upsert, &remove) {
                        Ok((next, config)) => {
                            *held = next;
                            *version = Some(v.clone());
                            deliver(&v, config);
                            tracing::info!(
                                version = v,
                                upserted = upsert.len(),
                                removed = remove.len(),
                                "config update applied"
                            );
                            let mut s = status.lock().expect("poisoned");
                            s.version = Some(v.clone());
                            s.resources = held.len();
                            s.updates_applied += 1;
                            drop(s);
                            outgoing.send_data(encode(&ProxyMessage::Ack { version: v }), false)?;
                        }
                        Err(reason) => {
                            tracing::error!(version = v, %reason, "config update refused; keeping the previous config");
                            status.lock().expect("poisoned").last_nack = Some(format!("{v}: {reason}"));
                            outgoing.send_data(
                                encode(&ProxyMessage::Nack { version: v, reason: reason.to_string() }),
                                false,
                            )?;
                        }
                    }
                }
            }
        }
    }
    Err(StreamError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServicePort;

    fn workload(uid: &str, ip: &str, node: &str) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "shop".into(),
            service_account: "default".into(),
            node: node.into(),
            ips: vec![ip.parse().unwrap()],
            enrolled: true,
            labels: Default::default(),
        }
    }

    fn config() -> NodeConfig {
        NodeConfig {
            workloads: vec![workload("a", "10.0.0.1", "n1"), workload("b", "10.0.0.2", "n2")],
            services: vec![Service {
                name: "pay".into(),
                namespace: "shop".into(),
                vips: vec!["10.96.0.1".parse().unwrap()],
                ports: vec![ServicePort { port: 80, target_port: 8080 }],
                endpoints: vec!["a".into()],
                waypoint: None,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_proxy_gets_the_config_back_and_only_deltas_after() {
        let want = resources_for(&config(), &ProxyKind::Ztunnel, "n1");
        assert!(want.contains_key("identity/a") && !want.contains_key("identity/b"), "{:?}", want.keys());
        let (upsert, remove) = delta(&BTreeMap::new(), &want, &BTreeMap::new());
        assert_eq!((upsert.len(), remove.len()), (want.len(), 0));
        let (held, built) = Held::default().apply(&upsert, &remove).unwrap();
        assert_eq!(built.workloads.len(), 2);
        assert_eq!(built.services, config().services);

        // One workload changes, one goes: the delta says exactly that.
        let mut next = config();
        next.workloads[0].labels.insert("version".into(), "v2".into());
        next.workloads.pop();
        let want = resources_for(&next, &ProxyKind::Ztunnel, "n1");
        let (upsert, remove) = delta(&held.hashes(), &want, &BTreeMap::new());
        assert_eq!(upsert.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["workload/a"]);
        assert_eq!(remove, ["workload/b"]);
        let (_, built) = held.apply(&upsert, &remove).unwrap();
        assert_eq!(built.workloads, next.workloads);
    }

    #[test]
    fn a_bad_update_is_refused_and_the_held_config_kept() {
        let want = resources_for(&config(), &ProxyKind::Ztunnel, "n1");
        let (held, _) = Held::default().apply(&want.values().cloned().collect::<Vec<_>>(), &[]).unwrap();
        let (_, clash) = resource(kinds::WORKLOAD, "c", 0, workload("c", "10.0.0.1", "n1"));
        let err = held.apply(&[clash], &[]).unwrap_err();
        assert!(err.to_string().contains("both claim IP 10.0.0.1"), "{err}");
        let bad = Resource {
            key: "workload/d".into(),
            hash: "x".into(),
            order: 0,
            value: serde_json::json!({"uid": 1}),
        };
        assert!(matches!(held.apply(&[bad], &[]), Err(RejectReason::Malformed { .. })));
        let future = Resource { key: "gizmo/x".into(), hash: "x".into(), order: 0, value: Value::Null };
        assert_eq!(held.apply(&[future], &[]).unwrap_err(), RejectReason::UnknownKind("gizmo/x".into()));
        assert_eq!(held.config().unwrap().workloads.len(), 2, "the held config is untouched");
    }

    #[test]
    fn messages_are_lines() {
        let msg = ProxyMessage::Subscribe {
            proxy: "ztunnel/n1".into(),
            node: "n1".into(),
            kind: ProxyKind::Waypoint { namespace: "shop".into(), name: "wp".into() },
            token: "t".into(),
            version: None,
            have: BTreeMap::new(),
        };
        let line = encode(&msg);
        let mut buf = LineBuffer::default();
        assert!(buf.push(&line[..5]).is_empty());
        let lines = buf.push(&line[5..]);
        assert_eq!(serde_json::from_slice::<ProxyMessage>(&lines[0]).unwrap(), msg);
        assert!(String::from_utf8_lossy(&line).contains("\"type\":\"subscribe\""));
        assert!(String::from_utf8_lossy(&line).contains("\"kind\":\"waypoint\""));
    }
}
