//! The controller's side of the config stream (`warren_core::config_stream`): every proxy
//! subscribes over HTTP/2 inside the CA's TLS port; each new translation is published as a
//! version and each subscriber gets the delta from what it has acknowledged. The hub remembers
//! every proxy it has seen and whether it runs the latest version — the proxy-status view.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use warren_core::{
    config_stream::{self, ControllerMessage, LineBuffer, ProxyKind, ProxyMessage, ResourceCache},
    model::NodeConfig,
};

use crate::ca_service::{Authenticator, Principal};

/// One published translation.
pub struct Published {
    pub version: String,
    pub config: Arc<NodeConfig>,
    /// False for the placeholder before the first translation: never sent (an empty config
    /// would tell a resuming proxy to drop everything it holds).
    pub translated: bool,
    /// The resources every ztunnel / every waypoint gets, computed once per version.
    shared: [std::sync::OnceLock<Arc<SharedSet>>; 2],
    /// Each node's identity grants, computed once per version (not once per ztunnel: a pass
    /// over every workload per proxy made a change's cost grow with nodes × workloads).
    grants: std::sync::OnceLock<Arc<config_stream::NodeGrants>>,
}

/// One version's shared resources for a kind of proxy, and how they differ from the version
/// the hub built before (`base`): a proxy known to hold `base` is sent `changes`, without
/// comparing everything.
struct SharedSet {
    resources: config_stream::Resources,
    base: Option<String>,
    changes: config_stream::Changes,
}

impl Published {
    fn new(version: String, config: Arc<NodeConfig>, translated: bool) -> Self {
        Published { version, config, translated, shared: Default::default(), grants: Default::default() }
    }

    fn grants(&self) -> Arc<config_stream::NodeGrants> {
        self.grants.get_or_init(|| Arc::new(config_stream::grants_by_node(&self.config))).clone()
    }

    /// Built from the hub's cache for `kind`, so only what changed since the last version
    /// is serialized and hashed again.
    fn shared_for(&self, kind: &ProxyKind, caches: &Mutex<[BuiltFor; 2]>) -> Arc<SharedSet> {
        let i = match kind {
            ProxyKind::Ztunnel => 0,
            ProxyKind::Waypoint { .. } => 1,
        };
        self.shared[i]
            .get_or_init(|| {
                let mut caches = caches.lock().expect("poisoned");
                let (cache, built_for) = &mut caches[i];
                let resources = config_stream::shared_resources(&self.config, kind, cache);
                let base = built_for.replace(self.version.clone());
                Arc::new(SharedSet { resources, base, changes: cache.changes().clone() })
            })
            .clone()
    }
}

/// A proxy as the status view shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub proxy: String,
    pub node: String,
    pub kind: String,
    pub connected: bool,
    /// The last version the proxy runs: it acknowledged it, or nothing in it differed for
    /// this proxy (a waypoint-only change is not sent to ztunnels, yet they are current).
    pub acked: Option<String>,
    /// The last version sent to it.
    pub sent: Option<String>,
    /// The last NACK: version and the proxy's reason.
    pub nacked: Option<(String, String)>,
    /// SYNCED, STALE or NACKED, against the latest version.
    pub state: String,
    /// When it subscribed, or (disconnected) when it went away.
    pub since_unix: u64,
    /// Which of the proxy's connections this row is: a late disconnect of an old stream must
    /// not mark a proxy that has already reconnected.
    #[serde(skip)]
    pub connection: u64,
}

/// A proxy gone this long (seconds) leaves the status view: nodes come and go, and a
/// long-gone proxy is not a proxy that is behind.
pub const FORGET_DISCONNECTED_AFTER_SECS: u64 = 600;

pub struct Hub {
    boot: u64,
    generation: Mutex<u64>,
    current: watch::Sender<Arc<Published>>,
    auth: Arc<Authenticator>,
    proxies: Mutex<BTreeMap<String, ProxyStatus>>,
    /// The shared resources of the last version built, per kind of proxy (ztunnel, waypoint).
    caches: Mutex<[BuiltFor; 2]>,
    /// Numbers each subscription (see [`ProxyStatus::connection`]).
    connections: std::sync::atomic::AtomicU64,
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Hub {
    pub fn new(auth: Arc<Authenticator>) -> Arc<Self> {
        let boot = now_unix();
        let (current, _) =
            watch::channel(Arc::new(Published::new(format!("{boot}-0"), Default::default(), false)));
        Arc::new(Hub {
            boot,
            generation: Mutex::new(0),
            current,
            auth,
            proxies: Mutex::new(BTreeMap::new()),
            caches: Default::default(),
            connections: Default::default(),
        })
    }

    /// Publishes a translation as a new version (unless nothing changed). Versions are
    /// `<controller start>-<n>`, unique across controller restarts.
    pub fn publish(&self, config: Arc<NodeConfig>) {
        if self.current.borrow().translated && *self.current.borrow().config == *config {
            return;
        }
        let mut generation = self.generation.lock().expect("poisoned");
        *generation += 1;
        let version = format!("{}-{}", self.boot, *generation);
        let replaced = self.current.send_replace(Arc::new(Published::new(version, config, true)));
        // Its resource sets (13,000 entries at 10,000 pods) are freed off the proxies' path.
        crate::background::drop_later(replaced);
    }

    pub fn latest_version(&self) -> String {
        self.current.borrow().version.clone()
    }

    /// Every proxy seen (and not gone for longer than [`FORGET_DISCONNECTED_AFTER_SECS`]),
    /// with its state against the latest version.
    pub fn status(&self) -> Vec<ProxyStatus> {
        self.status_at(now_unix())
    }

    fn status_at(&self, now: u64) -> Vec<ProxyStatus> {
        let latest = self.latest_version();
        let mut proxies = self.proxies.lock().expect("poisoned");
        proxies
            .retain(|_, p| p.connected || now.saturating_sub(p.since_unix) <= FORGET_DISCONNECTED_AFTER_SECS);
        proxies
            .values()
            .map(|p| {
                let mut p = p.clone();
                p.state = if p.nacked.as_ref().is_some_and(|(v, _)| *v == latest) {
                    "NACKED".into()
                } else if p.connected && p.acked.as_deref() == Some(latest.as_str()) {
                    "SYNCED".into()
                } else {
                    "STALE".into()
                };
                p
            })
            .collect()
    }

    /// Updates the row of `proxy`'s connection `connection` (not a newer one's).
    fn update(&self, proxy: &str, connection: u64, f: impl FnOnce(&mut ProxyStatus)) {
        if let Some(p) = self.proxies.lock().expect("poisoned").get_mut(proxy)
            && p.connection == connection
        {
            f(p);
        }
    }
}

/// Whether `principal` (authenticated) may subscribe as `kind` on `node`: a node subscribes as
/// any proxy on itself (its ztunnel, or in local mode a waypoint holding its token); a pod
/// only as the waypoint its ServiceAccount is named after (a waypoint runs as the
/// ServiceAccount of its Gateway's name, as Istio's do), in its own namespace, on its own node.
/// Without the name check any pod could read the whole mesh's workloads from the stream. The
/// error is the refusal's reason.
pub fn may_subscribe(principal: &Principal, node: &str, kind: &ProxyKind) -> Result<(), String> {
    match principal {
        Principal::Node(owner) if owner == node => Ok(()),
        Principal::Node(owner) => Err(format!("the token belongs to node {owner}, not {node}")),
        Principal::Pod { namespace, service_account, node: pod_node, .. } => match kind {
            ProxyKind::Ztunnel => Err(format!(
                "the token is {principal}'s, which may subscribe only as a waypoint of namespace \
                 {namespace}, not as a ztunnel (a ztunnel sends a token of the ztunnel's \
                 ServiceAccount, see `controller serve --ztunnel-service-account`)"
            )),
            ProxyKind::Waypoint { namespace: asked, name } if asked != namespace => Err(format!(
                "the token is {principal}'s, which may subscribe only as a waypoint of namespace \
                 {namespace}, not as waypoint {asked}/{name}"
            )),
            ProxyKind::Waypoint { name, .. } if name != service_account => Err(format!(
                "the token is {principal}'s, which may subscribe only as waypoint \
                 {namespace}/{service_account} (a waypoint pod runs as the ServiceAccount named \
                 after its Gateway), not as waypoint {namespace}/{name}"
            )),
            ProxyKind::Waypoint { .. } if pod_node != node => {
                Err(format!("the token is {principal}'s, which runs on node {pod_node}, not {node}"))
            }
            ProxyKind::Waypoint { .. } => Ok(()),
        },
    }
}

/// A resource cache and the version whose shared set it holds.
type BuiltFor = (ResourceCache, Option<String>);

/// A ztunnel's own resources and the node grants they were built from.
type OwnBuilt = (Vec<(String, config_stream::IdentityGrant)>, Arc<config_stream::Resources>);

/// A resource an update sets (to its hash) or removes (`None`).
type KeyChange = (String, Option<String>);

/// Serves the config stream on one TLS connection that negotiated `h2`.
pub async fn serve_connection<T>(io: T, peer: std::net::SocketAddr, hub: Arc<Hub>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Ok(mut connection) = h2::server::handshake(io).await else { return };
    while let Some(Ok((request, respond))) = connection.accept().await {
        let hub = hub.clone();
        tokio::spawn(async move { serve_stream(request, respond, peer, hub).await });
    }
}

async fn serve_stream(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: std::net::SocketAddr,
    hub: Arc<Hub>,
) {
    if request.method() != http::Method::POST || request.uri().path() != config_stream::PATH {
        let _ = respond
            .send_response(Response::builder().status(StatusCode::NOT_FOUND).body(()).expect("static"), true);
        return;
    }
    let Ok(mut outgoing) =
        respond.send_response(Response::builder().status(StatusCode::OK).body(()).expect("static"), false)
    else {
        return;
    };
    let mut incoming = request.into_body();
    let mut lines = LineBuffer::default();
    // The first message subscribes.
    let subscribe = loop {
        match incoming.data().await {
            Some(Ok(chunk)) => {
                let _ = incoming.flow_control().release_capacity(chunk.len());
                if let Some(line) = lines.push(&chunk).into_iter().next() {
                    break serde_json::from_slice::<ProxyMessage>(&line).ok();
                }
            }
            _ => return,
        }
    };
    let Some(ProxyMessage::Subscribe { proxy, node, kind, token, version, have }) = subscribe else {
        let _ = outgoing.send_data(
            config_stream::encode(&ControllerMessage::Refused {
                reason: "the first message must be a subscribe".into(),
            }),
            true,
        );
        return;
    };
    // The same authentication as the CA: a node's bootstrap token, or (Kubernetes mode) a
    // pod-bound ServiceAccount token checked with a TokenReview.
    let refusal = match hub.auth.principal(&token).await {
        Ok(principal) => may_subscribe(&principal, &node, &kind).err(),
        Err((_, reason)) => Some(reason),
    };
    if let Some(reason) = refusal {
        eprintln!("controller: config stream from {peer} ({proxy}) refused: {reason}");
        let _ = outgoing.send_data(config_stream::encode(&ControllerMessage::Refused { reason }), true);
        return;
    }
    let kind_name = match &kind {
        ProxyKind::Ztunnel => "ztunnel".to_string(),
        ProxyKind::Waypoint { namespace, name } => format!("waypoint {namespace}/{name}"),
    };
    eprintln!(
        "controller: {proxy} ({kind_name}) on node {node} subscribed from {peer}{}",
        version
            .as_ref()
            .map(|v| format!(", resuming from {v} with {} resources", have.len()))
            .unwrap_or_default()
    );
    let connection = hub.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    hub.proxies.lock().expect("poisoned").insert(
        proxy.clone(),
        ProxyStatus {
            proxy: proxy.clone(),
            node: node.clone(),
            kind: kind_name,
            connected: true,
            acked: version.clone(),
            sent: None,
            nacked: None,
            state: String::new(),
            since_unix: now_unix(),
            connection,
        },
    );
    // What the proxy is known to hold: its resume set, then each acknowledged update.
    let mut acked = have;
    // The version whose shared set the proxy is known to hold exactly (none yet: a resuming
    // proxy's `have` is compared in full once).
    let mut holds: Option<String> = None;
    // The update in flight: its version, and each key it sets (to a hash) or removes (None).
    let mut pending: Option<(String, Vec<KeyChange>)> = None;
    // This proxy's own resources (a ztunnel's identities), reused between versions.
    let mut own_cache = ResourceCache::default();
    // The node's grants the own resources were last built from: an unchanged node (most of
    // them, for a one-pod change) reuses them as they are.
    let mut own_built: Option<OwnBuilt> = None;
    let mut updates = hub.current.subscribe();
    // Nothing is sent before the first translation.
    if updates.wait_for(|p| p.translated).await.is_err() {
        return;
    }
    let mut first = true;
    // A new version to send: at first, then whenever one is published (`changed()` marks the
    // version seen as it returns, so this remembers it). One update in flight at a time: the
    // next is computed from what the proxy acknowledged, once it has answered the last (as xDS
    // flow control does), so a slow proxy never gets a delta against a state it may not hold.
    let mut dirty = true;
    loop {
        if dirty && pending.is_none() {
            dirty = false;
            let published = updates.borrow_and_update().clone();
            let shared = published.shared_for(&kind, &hub.caches);
            let own = match kind {
                ProxyKind::Ztunnel => {
                    let grants = published.grants();
                    let mine = grants.get(&node).map(Vec::as_slice).unwrap_or_default();
                    match &own_built {
                        Some((built_from, own)) if built_from.as_slice() == mine => own.clone(),
                        _ => {
                            let own = Arc::new(config_stream::identity_resources(mine, &mut own_cache));
                            own_built = Some((mine.to_vec(), own.clone()));
                            own
                        }
                    }
                }
                ProxyKind::Waypoint { .. } => Arc::default(),
            };
            let (upsert, remove) = match &holds {
                Some(held) if shared.base.as_ref() == Some(held) => {
                    config_stream::delta_from_changes(&acked, &shared.resources, &shared.changes, &own)
                }
                _ => config_stream::delta(&acked, &shared.resources, &own),
            };
            if first || !upsert.is_empty() || !remove.is_empty() {
                let total = shared.resources.len() + own.len();
                eprintln!(
                    "controller: sending {} to {proxy}: {} of {total} resources changed, {} removed",
                    published.version,
                    upsert.len(),
                    remove.len()
                );
                let changes = upsert
                    .iter()
                    .map(|r| (r.key.clone(), Some(r.hash.clone())))
                    .chain(remove.iter().map(|k| (k.clone(), None)))
                    .collect();
                let message =
                    ControllerMessage::Update { version: published.version.clone(), upsert, remove };
                if outgoing.send_data(config_stream::encode(&message), false).is_err() {
                    break;
                }
                pending = Some((published.version.clone(), changes));
                hub.update(&proxy, connection, |p| p.sent = Some(published.version.clone()));
            } else {
                // Nothing of this version differs for it: it holds this version's set, and
                // runs what this version would give it.
                holds = Some(published.version.clone());
                hub.update(&proxy, connection, |p| p.acked = Some(published.version.clone()));
            }
            first = false;
        }
        tokio::select! {
            changed = updates.changed() => {
                if changed.is_err() {
                    break;
                }
                dirty = true;
            }
            chunk = incoming.data() => {
                let Some(Ok(chunk)) = chunk else { break };
                let _ = incoming.flow_control().release_capacity(chunk.len());
                for line in lines.push(&chunk) {
                    match serde_json::from_slice::<ProxyMessage>(&line) {
                        Ok(ProxyMessage::Ack { version }) => {
                            if let Some((v, changes)) = pending.take_if(|(v, _)| *v == version) {
                                for (key, hash) in changes {
                                    match hash {
                                        Some(hash) => acked.insert(key, hash),
                                        None => acked.remove(&key),
                                    };
                                }
                                holds = Some(v.clone());
                                hub.update(&proxy, connection, |p| p.acked = Some(v));
                            }
                        }
                        Ok(ProxyMessage::Nack { version, reason }) => {
                            eprintln!("controller: {proxy} refused {version}: {reason}");
                            // It keeps what it had: later deltas are computed from that.
                            pending = None;
                            hub.update(&proxy, connection, |p| p.nacked = Some((version, reason)));
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    eprintln!("controller: {proxy} disconnected");
    hub.update(&proxy, connection, |p| {
        p.connected = false;
        p.since_unix = now_unix();
    });
}

/// The admin endpoint (`--admin`, 127.0.0.1:15014 by default): `/debug/proxy-status`,
/// `/debug/config_dump` (the latest version and its config).
pub async fn serve_admin(listener: tokio::net::TcpListener, hub: Arc<Hub>) {
    use warren_core::endpoints::{self, Limits, text};
    let report = |line: &str| eprintln!("controller: {line}");
    endpoints::serve(listener, "admin port", Limits::default(), report, move |req| match req.uri().path() {
        "/debug/proxy-status" => {
            let view = StatusView { latest: hub.latest_version(), proxies: hub.status() };
            text(StatusCode::OK, serde_json::to_string_pretty(&view).unwrap_or_default())
        }
        "/debug/config_dump" => {
            let published = hub.current.borrow().clone();
            let dump = serde_json::json!({"version": published.version, "config": &*published.config});
            text(StatusCode::OK, serde_json::to_string_pretty(&dump).unwrap_or_default())
        }
        _ => text(StatusCode::NOT_FOUND, "endpoints: /debug/proxy-status /debug/config_dump\n"),
    })
    .await
}

/// What `/debug/proxy-status` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusView {
    pub latest: String,
    pub proxies: Vec<ProxyStatus>,
}

/// The table `controller proxy-status` prints.
pub fn render_status(view: &StatusView) -> String {
    let mut out = format!("latest version: {}\n", view.latest);
    out.push_str(&format!("{:<40} {:<12} {:<10} {:<16} {}\n", "PROXY", "NODE", "STATE", "ACKED", "DETAIL"));
    for p in &view.proxies {
        let detail = match (&p.nacked, p.connected) {
            (Some((v, reason)), _) if p.state == "NACKED" => format!("refused {v}: {reason}"),
            (_, false) => "disconnected".to_string(),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{:<40} {:<12} {:<10} {:<16} {detail}\n",
            p.proxy,
            p.node,
            p.state,
            p.acked.as_deref().unwrap_or("-")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca_service::Tokens;

    #[test]
    fn a_pod_subscribes_only_as_its_own_waypoint_of_its_namespace_on_its_node() {
        let waypoint =
            |namespace: &str| ProxyKind::Waypoint { namespace: namespace.into(), name: "wp".into() };
        let node = Principal::Node("node-1".into());
        assert_eq!(may_subscribe(&node, "node-1", &ProxyKind::Ztunnel), Ok(()));
        assert_eq!(may_subscribe(&node, "node-1", &waypoint("shop")), Ok(()), "local mode: a node token");
        assert_eq!(
            may_subscribe(&node, "node-2", &ProxyKind::Ztunnel),
            Err("the token belongs to node node-1, not node-2".into())
        );
        let pod = Principal::Pod {
            namespace: "shop".into(),
            service_account: "wp".into(),
            name: "wp-7d9f".into(),
            node: "node-1".into(),
        };
        assert_eq!(may_subscribe(&pod, "node-1", &waypoint("shop")), Ok(()));
        let as_ztunnel = may_subscribe(&pod, "node-1", &ProxyKind::Ztunnel).unwrap_err();
        assert!(
            as_ztunnel.contains("pod shop/wp-7d9f") && as_ztunnel.contains("not as a ztunnel"),
            "{as_ztunnel}"
        );
        let elsewhere = may_subscribe(&pod, "node-1", &waypoint("bank")).unwrap_err();
        assert!(elsewhere.contains("namespace shop, not as waypoint bank/wp"), "{elsewhere}");
        let other_node = may_subscribe(&pod, "node-2", &waypoint("shop")).unwrap_err();
        assert!(other_node.contains("runs on node node-1, not node-2"), "{other_node}");
        // Any pod of the namespace holds a bound token: only the Gateway's ServiceAccount may
        // subscribe as its waypoint.
        let app = Principal::Pod {
            namespace: "shop".into(),
            service_account: "checkout".into(),
            name: "checkout-5c4b".into(),
            node: "node-1".into(),
        };
        let not_the_gateway = may_subscribe(&app, "node-1", &waypoint("shop")).unwrap_err();
        assert!(
            not_the_gateway.contains("only as waypoint shop/checkout")
                && not_the_gateway.contains("not as waypoint shop/wp"),
            "{not_the_gateway}"
        );
    }

    #[test]
    fn versions_advance_only_on_change_and_status_compares_to_the_latest() {
        let hub =
            Hub::new(Arc::new(Authenticator { tokens: Some(Tokens::parse("n1 t1\n")), reviewer: None }));
        hub.publish(Arc::new(NodeConfig::default()));
        let v1 = hub.latest_version();
        hub.publish(Arc::new(NodeConfig::default()));
        assert_eq!(hub.latest_version(), v1, "an unchanged config is not a new version");
        hub.proxies.lock().unwrap().insert(
            "ztunnel/n1".into(),
            ProxyStatus {
                proxy: "ztunnel/n1".into(),
                node: "n1".into(),
                kind: "ztunnel".into(),
                connected: true,
                acked: Some(v1.clone()),
                sent: Some(v1.clone()),
                nacked: None,
                state: String::new(),
                since_unix: 0,
                connection: 7,
            },
        );
        assert_eq!(hub.status()[0].state, "SYNCED");
        hub.publish(Arc::new(NodeConfig { root_namespace: "mesh".into(), ..Default::default() }));
        assert_eq!(hub.status()[0].state, "STALE");
        let latest = hub.latest_version();
        hub.update("ztunnel/n1", 7, |p| p.nacked = Some((latest.clone(), "bad".into())));
        let view = StatusView { latest: hub.latest_version(), proxies: hub.status() };
        assert_eq!(view.proxies[0].state, "NACKED");
        assert!(render_status(&view).contains("refused"), "{}", render_status(&view));

        // An older connection's late disconnect does not touch the row of the newer one.
        hub.update("ztunnel/n1", 6, |p| p.connected = false);
        assert!(hub.status()[0].connected);
        // Gone: shown (STALE) for a while, then forgotten.
        hub.update("ztunnel/n1", 7, |p| {
            p.connected = false;
            p.since_unix = 1_000;
        });
        assert!(!hub.status_at(1_000 + FORGET_DISCONNECTED_AFTER_SECS)[0].connected);
        assert!(hub.status_at(1_001 + FORGET_DISCONNECTED_AFTER_SECS).is_empty());
    }
}
