//! The config stream: how the controller feeds ztunnels and waypoints, in the manner of
//! delta xDS but spelled in JSON so it can be read with a packet capture and a text editor.
//!
//! One HTTP/2 stream (`POST /v1/config`) inside TLS to the controller (ALPN `h2`, the
//! controller presenting its SPIFFE identity under the mesh root; the proxy authenticates with
//! its node's bearer token in the first message). Both directions carry newline-delimited JSON
//! messages ([`ProxyMessage`], [`ControllerMessage`]). The configuration is a set of named,
//! hashed **resources** (a workload, a service, a policy, a route table ...); the controller
//! sends only what changed since what the proxy has (upserts and removals), every update under
//! a new version. The proxy applies an update (in place, undone if the result is refused) and
//! answers ACK (it now runs that version) or NACK with its reason (it keeps the previous
//! config). A proxy
//! that reconnects says which resources it holds (name → hash), so the controller resumes with
//! the difference instead of a full resend. While the controller is away, proxies keep serving
//! their last good config. docs/config-stream.md has the schema.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

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

/// Resources by key, shared between versions and proxies (most of them do not change).
pub type Resources = BTreeMap<String, Arc<Resource>>;

/// The name an object has in its resource key (`workload/<uid>`, `service/<namespace>/<name>`
/// ...): the controller names resources by it, and a proxy keeps its lists sorted by it — one
/// definition, so the two cannot drift apart.
trait ResourceName {
    fn resource_name(&self) -> String;
    /// `resource_name().cmp(name)` without building the name (a proxy binary-searches by it).
    fn cmp_name(&self, name: &str) -> std::cmp::Ordering;
}

impl ResourceName for Workload {
    fn resource_name(&self) -> String {
        self.uid.clone()
    }

    fn cmp_name(&self, name: &str) -> std::cmp::Ordering {
        self.uid.as_str().cmp(name)
    }
}

/// Namespaced objects: `<namespace>/<name>`.
macro_rules! namespaced_resource_name {
    ($($t:ty),*) => {$(
        impl ResourceName for $t {
            fn resource_name(&self) -> String {
                format!("{}/{}", self.namespace, self.name)
            }

            fn cmp_name(&self, name: &str) -> std::cmp::Ordering {
                let own = self.namespace.bytes().chain(std::iter::once(b'/')).chain(self.name.bytes());
                own.cmp(name.bytes())
            }
        }
    )*};
}

namespaced_resource_name!(Service, Authorization, PeerAuthentication, L7Authorization, DestinationRule);

/// The resources built for the last version, each with the object it was made from: the
/// next version reuses the resource (its JSON value and hash) of every object that compares
/// equal, so publishing a one-pod change builds one resource, not ten thousand. The objects
/// themselves are compared (not a fingerprint), so a change never goes unseen.
#[derive(Default)]
pub struct ResourceCache {
    built: HashMap<String, Built>,
    changes: Changes,
    /// Which build this is: an entry not touched by the current one is gone.
    generation: u64,
}

/// One built resource, the object it was made from, and the last build that had it.
struct Built {
    object: Box<dyn std::any::Any + Send + Sync>,
    resource: Arc<Resource>,
    generation: u64,
}

impl ResourceCache {
    /// What the last build changed against the one before it (everything, the first time).
    pub fn changes(&self) -> &Changes {
        &self.changes
    }
}

/// The difference between two builds of a set of resources: the keys built anew (new or
/// changed) and the keys gone. A proxy known to hold the earlier set needs exactly this.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    pub upserted: Vec<String>,
    pub removed: Vec<String>,
}

/// Builds resources against a cache, updating it in place (one lookup per object, no key
/// allocated for an unchanged one); what was not built this time is dropped from it. At
/// 12,000 objects this is what every version of the mesh costs, so it avoids rebuilding maps.
struct Builder<'a> {
    cache: &'a mut ResourceCache,
    out: Vec<(String, Arc<Resource>)>,
    upserted: Vec<String>,
    /// The key being looked up, reused.
    key: String,
}

impl<'a> Builder<'a> {
    fn new(cache: &'a mut ResourceCache) -> Self {
        cache.generation += 1;
        let out = Vec::with_capacity(cache.built.len());
        Builder { cache, out, upserted: Vec::new(), key: String::new() }
    }

    fn add<T>(&mut self, kind: &str, name: &str, order: u32, object: &T)
    where
        T: Serialize + PartialEq + Clone + Send + Sync + 'static,
    {
        use std::fmt::Write;
        self.key.clear();
        let _ = write!(self.key, "{kind}/{name}");
        let generation = self.cache.generation;
        let fresh = || Built {
            object: Box::new(object.clone()),
            resource: Arc::new(resource(kind, name, order, object).1),
            generation,
        };
        let resource = match self.cache.built.get_mut(self.key.as_str()) {
            Some(built)
                if built.resource.order == order && built.object.downcast_ref::<T>() == Some(object) =>
            {
                built.generation = generation;
                built.resource.clone()
            }
            Some(built) => {
                *built = fresh();
                self.upserted.push(self.key.clone());
                built.resource.clone()
            }
            None => {
                let built = fresh();
                let resource = built.resource.clone();
                self.cache.built.insert(self.key.clone(), built);
                self.upserted.push(self.key.clone());
                resource
            }
        };
        self.out.push((self.key.clone(), resource));
    }

    fn finish(self) -> Resources {
        // What the last build had and this one did not add back is gone.
        let generation = self.cache.generation;
        let mut removed = Vec::new();
        self.cache.built.retain(|key, built| {
            let kept = built.generation == generation;
            if !kept {
                removed.push(key.clone());
            }
            kept
        });
        removed.sort();
        self.cache.changes = Changes { upserted: self.upserted, removed };
        // Collecting sorts once and builds the tree in bulk (faster than inserting one by one);
        // of equal keys the last added wins, as an insert would.
        self.out.into_iter().collect()
    }
}

/// The resources a proxy of `kind` on `node` gets from `config`.
pub fn resources_for(config: &NodeConfig, kind: &ProxyKind, node: &str) -> Resources {
    let mut out = shared_resources(config, kind, &mut ResourceCache::default());
    out.extend(node_resources(config, kind, node, &mut ResourceCache::default()));
    out
}

/// What every proxy of `kind`'s family gets, whatever its node: computed once per version,
/// reusing `cache` (one per kind of proxy) for what did not change.
pub fn shared_resources(config: &NodeConfig, kind: &ProxyKind, cache: &mut ResourceCache) -> Resources {
    let mut out = Builder::new(cache);
    for w in &config.workloads {
        out.add(kinds::WORKLOAD, &w.resource_name(), 0, w);
    }
    for s in &config.services {
        out.add(kinds::SERVICE, &s.resource_name(), 0, s);
    }
    out.add(kinds::MESH, "settings", 0, &serde_json::json!({"rootNamespace": config.root_namespace}));
    match kind {
        ProxyKind::Ztunnel => {
            for a in &config.authorizations {
                out.add(kinds::AUTHORIZATION, &a.resource_name(), 0, a);
            }
            for p in &config.peer_authentications {
                out.add(kinds::PEER_AUTHENTICATION, &p.resource_name(), 0, p);
            }
        }
        ProxyKind::Waypoint { .. } => {
            for (i, v) in config.routing.virtual_services.iter().enumerate() {
                let name = format!("{}/{}/{:?}", v.namespace, v.name, v.kind);
                out.add(kinds::VIRTUAL_SERVICE, &name, i as u32, v);
            }
            for (i, d) in config.routing.destination_rules.iter().enumerate() {
                out.add(kinds::DESTINATION_RULE, &d.resource_name(), i as u32, d);
            }
            for a in &config.routing.authorizations {
                out.add(kinds::L7_AUTHORIZATION, &a.resource_name(), 0, a);
            }
        }
    }
    out.finish()
}

/// What only the proxy on `node` gets: a ztunnel's identities. `cache` is that proxy's.
pub fn node_resources(
    config: &NodeConfig,
    kind: &ProxyKind,
    node: &str,
    cache: &mut ResourceCache,
) -> Resources {
    match kind {
        ProxyKind::Ztunnel => {
            let grants = grants_by_node(config);
            identity_resources(grants.get(node).map(Vec::as_slice).unwrap_or_default(), cache)
        }
        ProxyKind::Waypoint { .. } => Builder::new(cache).finish(),
    }
}

/// The identities each node's ztunnel may request: one pass over the workloads for every node
/// (the controller builds it once per version, not once per proxy).
pub fn grants_by_node(config: &NodeConfig) -> NodeGrants {
    let mut out = NodeGrants::new();
    for w in config.workloads.iter().filter(|w| w.enrolled) {
        let identity =
            IdentityGrant { namespace: w.namespace.clone(), service_account: w.service_account.clone() };
        out.entry(w.node.clone()).or_default().push((w.uid.clone(), identity));
    }
    out
}

/// A ztunnel's identity resources from its node's grants. `cache` is that proxy's.
pub fn identity_resources(grants: &[(String, IdentityGrant)], cache: &mut ResourceCache) -> Resources {
    let mut out = Builder::new(cache);
    for (uid, identity) in grants {
        out.add(kinds::IDENTITY, uid, 0, identity);
    }
    out.finish()
}

/// Each node's identity grants, by workload uid, in workload order.
pub type NodeGrants = HashMap<String, Vec<(String, IdentityGrant)>>;

/// An identity resource's value: a ServiceAccount whose certificate the node may request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityGrant {
    pub namespace: String,
    pub service_account: String,
}

/// [`delta`] for a proxy known to hold exactly the shared set that `changes` was built
/// against: the shared part is `changes` itself (no walk over everything), the own part is
/// compared as usual. Own resources are a ztunnel's identities.
pub fn delta_from_changes(
    have: &BTreeMap<String, String>,
    shared: &Resources,
    changes: &Changes,
    own: &Resources,
) -> (Vec<Resource>, Vec<String>) {
    let mut upsert: Vec<Resource> =
        changes.upserted.iter().filter_map(|k| shared.get(k)).map(|r| Resource::clone(r)).collect();
    let mut remove = changes.removed.clone();
    upsert.extend(changed(have, own));
    let own_prefix = format!("{}/", kinds::IDENTITY);
    remove.extend(
        have.range(own_prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&own_prefix))
            .filter(|(k, _)| !own.contains_key(*k))
            .map(|(k, _)| k.clone()),
    );
    (upsert, remove)
}

/// The resources of `set` that `have` lacks or holds at another hash.
fn changed<'a>(
    have: &'a BTreeMap<String, String>,
    set: &'a Resources,
) -> impl Iterator<Item = Resource> + 'a {
    set.values().filter(|r| have.get(&r.key) != Some(&r.hash)).map(|r| Resource::clone(r))
}

/// What to send a proxy that holds `have` (key → hash) so it ends up with `shared` (what
/// every proxy of its kind gets) and `own` (what only it gets), without merging the two.
/// `have` and `shared` are walked side by side in key order (both are sorted maps): one
/// comparison per key instead of a lookup, for every proxy on every version.
pub fn delta(
    have: &BTreeMap<String, String>,
    shared: &Resources,
    own: &Resources,
) -> (Vec<Resource>, Vec<String>) {
    let mut upsert = Vec::new();
    let mut remove = Vec::new();
    let mut held = have.iter().peekable();
    for (key, resource) in shared {
        // Held keys before this one are not shared: removed, unless they are this proxy's own.
        while let Some((k, _)) = held.next_if(|(k, _)| k.as_str() < key.as_str()) {
            if !own.contains_key(k) {
                remove.push(k.clone());
            }
        }
        match held.next_if(|(k, _)| *k == key) {
            Some((_, hash)) if *hash == resource.hash => {}
            _ => upsert.push(Resource::clone(resource)),
        }
    }
    for (k, _) in held {
        if !own.contains_key(k) {
            remove.push(k.clone());
        }
    }
    upsert.extend(changed(have, own));
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
    let (kind, name) = r.key.split_once('/').unwrap_or((r.key.as_str(), ""));
    let typed = match kind {
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
    };
    // The held config is kept sorted by these names: a resource must be named after what it
    // holds.
    if let Some(own) = sorted_name(&typed)
        && own != name
    {
        return Err(RejectReason::Malformed {
            key: r.key.clone(),
            error: format!("the resource holds {own:?}, not {name:?}"),
        });
    }
    Ok(typed)
}

/// The name a kept-sorted object has in its resource key (`workload/<uid>`,
/// `service/<namespace>/<name>` ...).
fn sorted_name(typed: &Typed) -> Option<String> {
    Some(match typed {
        Typed::Workload(w) => w.resource_name(),
        Typed::Service(s) => s.resource_name(),
        Typed::Authorization(a) => a.resource_name(),
        Typed::PeerAuthentication(p) => p.resource_name(),
        Typed::L7Authorization(a) => a.resource_name(),
        Typed::VirtualService(..) | Typed::DestinationRule(..) | Typed::Mesh(_) | Typed::Identity => {
            return None;
        }
    })
}

/// Inserts or replaces the item named `name` in a list sorted by name; returns what it replaced.
fn put_sorted<T: ResourceName>(list: &mut Vec<T>, name: &str, item: T) -> Option<T> {
    match list.binary_search_by(|x| x.cmp_name(name)) {
        Ok(i) => Some(std::mem::replace(&mut list[i], item)),
        Err(i) => {
            list.insert(i, item);
            None
        }
    }
}

fn take_sorted<T: ResourceName>(list: &mut Vec<T>, name: &str) -> Option<T> {
    list.binary_search_by(|x| x.cmp_name(name)).ok().map(|i| list.remove(i))
}

/// The resources a proxy holds (their hashes) and the config they make, patched in place by
/// each update: a one-resource update to 10,000 held ones costs one resource, not a rebuild.
/// Kinds kept sorted by name sit in the config's lists in resource-key order; route tables
/// (ordered by the controller) are kept aside and their lists rebuilt when they change.
#[derive(Clone, Debug, Default)]
pub struct Held {
    hashes: BTreeMap<String, String>,
    config: NodeConfig,
    virtual_services: BTreeMap<String, (u32, VirtualService)>,
    destination_rules: BTreeMap<String, (u32, DestinationRule)>,
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

    /// The config the held resources make.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Applies an update and returns the config it makes; on failure nothing held changes.
    /// Only the upserted resources are parsed; the update is applied in place and undone if
    /// the result is refused.
    pub fn apply(&mut self, upsert: &[Resource], remove: &[String]) -> Result<&NodeConfig, RejectReason> {
        let parsed: Vec<(String, String, Typed)> = upsert
            .iter()
            .map(|r| Ok((r.key.clone(), r.hash.clone(), parse(r)?)))
            .collect::<Result<_, _>>()?;
        // What each change replaced, to put back in reverse order if the result is refused.
        let mut undo: Vec<(String, Option<String>, Option<Typed>)> = Vec::new();
        for key in remove {
            if let Some(hash) = self.hashes.remove(key) {
                let before = self.take(key);
                undo.push((key.clone(), Some(hash), before));
            }
        }
        for (key, hash, typed) in parsed {
            let hash_before = self.hashes.insert(key.clone(), hash);
            let before = self.put(&key, typed);
            undo.push((key, hash_before, before));
        }
        let is_route_table = |key: &String| {
            key.split_once('/')
                .is_some_and(|(k, _)| k == kinds::VIRTUAL_SERVICE || k == kinds::DESTINATION_RULE)
        };
        let route_tables_changed = undo.iter().any(|(key, ..)| is_route_table(key));
        if route_tables_changed {
            self.rebuild_route_tables();
        }
        if let Err(reason) = check_addresses(&self.config) {
            for (key, hash, before) in undo.into_iter().rev() {
                match hash {
                    Some(hash) => self.hashes.insert(key.clone(), hash),
                    None => self.hashes.remove(&key),
                };
                match before {
                    Some(typed) => self.put(&key, typed),
                    None => self.take(&key),
                };
            }
            if route_tables_changed {
                self.rebuild_route_tables();
            }
            return Err(reason);
        }
        Ok(&self.config)
    }

    /// Puts a parsed resource into the config; returns what it replaced.
    fn put(&mut self, key: &str, typed: Typed) -> Option<Typed> {
        let name = key.split_once('/').map_or("", |(_, n)| n);
        let c = &mut self.config;
        match typed {
            Typed::Workload(w) => put_sorted(&mut c.workloads, name, *w).map(|w| Typed::Workload(w.into())),
            Typed::Service(s) => put_sorted(&mut c.services, name, *s).map(|s| Typed::Service(s.into())),
            Typed::Authorization(a) => {
                put_sorted(&mut c.authorizations, name, *a).map(|a| Typed::Authorization(a.into()))
            }
            Typed::PeerAuthentication(p) => {
                put_sorted(&mut c.peer_authentications, name, *p).map(|p| Typed::PeerAuthentication(p.into()))
            }
            Typed::L7Authorization(a) => {
                put_sorted(&mut c.routing.authorizations, name, *a).map(|a| Typed::L7Authorization(a.into()))
            }
            Typed::VirtualService(order, v) => self
                .virtual_services
                .insert(key.to_string(), (order, *v))
                .map(|(o, v)| Typed::VirtualService(o, v.into())),
            Typed::DestinationRule(order, d) => self
                .destination_rules
                .insert(key.to_string(), (order, *d))
                .map(|(o, d)| Typed::DestinationRule(o, d.into())),
            Typed::Mesh(root) => Some(Typed::Mesh(std::mem::replace(&mut c.root_namespace, root))),
            // Identities are only the node's right to certificates: held as hashes.
            Typed::Identity => None,
        }
    }

    /// Takes a resource out of the config; returns it.
    fn take(&mut self, key: &str) -> Option<Typed> {
        let (kind, name) = key.split_once('/').unwrap_or((key, ""));
        let c = &mut self.config;
        match kind {
            kinds::WORKLOAD => take_sorted(&mut c.workloads, name).map(|w| Typed::Workload(w.into())),
            kinds::SERVICE => take_sorted(&mut c.services, name).map(|s| Typed::Service(s.into())),
            kinds::AUTHORIZATION => {
                take_sorted(&mut c.authorizations, name).map(|a| Typed::Authorization(a.into()))
            }
            kinds::PEER_AUTHENTICATION => {
                take_sorted(&mut c.peer_authentications, name).map(|p| Typed::PeerAuthentication(p.into()))
            }
            kinds::L7_AUTHORIZATION => {
                take_sorted(&mut c.routing.authorizations, name).map(|a| Typed::L7Authorization(a.into()))
            }
            kinds::VIRTUAL_SERVICE => {
                self.virtual_services.remove(key).map(|(o, v)| Typed::VirtualService(o, v.into()))
            }
            kinds::DESTINATION_RULE => {
                self.destination_rules.remove(key).map(|(o, d)| Typed::DestinationRule(o, d.into()))
            }
            kinds::MESH => Some(Typed::Mesh(std::mem::take(&mut c.root_namespace))),
            _ => None,
        }
    }

    /// Route tables in the controller's order (few; rebuilt whole).
    fn rebuild_route_tables(&mut self) {
        let mut vs: Vec<&(u32, VirtualService)> = self.virtual_services.values().collect();
        vs.sort_by_key(|(order, _)| *order);
        self.config.routing.virtual_services = vs.into_iter().map(|(_, v)| v.clone()).collect();
        let mut dr: Vec<&(u32, DestinationRule)> = self.destination_rules.values().collect();
        dr.sort_by_key(|(order, _)| *order);
        self.config.routing.destination_rules = dr.into_iter().map(|(_, d)| d.clone()).collect();
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
    /// How much of `buf` is known to hold no newline: each chunk is searched once, not the
    /// whole unfinished line again (a proxy's first config is one line of megabytes, arriving
    /// in 16 KB frames: searching it all per frame took two thirds of a proxy's CPU to take it).
    scanned: usize,
}

impl LineBuffer {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(chunk);
        let mut lines = Vec::new();
        // The current line's start, and where to look for its end.
        let (mut start, mut from) = (0, self.scanned);
        while let Some(i) = self.buf[from..].iter().position(|b| *b == b'\n') {
            let end = from + i;
            lines.push(self.buf[start..end].to_vec());
            start = end + 1;
            from = start;
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
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
    deliver: impl Fn(&str, &NodeConfig) + Send + Sync + 'static,
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
    deliver: &(impl Fn(&str, &NodeConfig) + Send + Sync),
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
                        Ok(config) => {
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
            waypoint: None,
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
                waypoint_namespace: None,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn each_node_is_granted_the_identities_of_its_enrolled_workloads() {
        let mut config = config();
        let mut unenrolled = workload("c", "10.0.0.3", "n1");
        unenrolled.enrolled = false;
        config.workloads.push(unenrolled);
        config.workloads.push(workload("d", "10.0.0.4", "n1"));
        let grants = grants_by_node(&config);
        let uids = |node: &str| grants[node].iter().map(|(uid, _)| uid.as_str()).collect::<Vec<_>>();
        assert_eq!((uids("n1"), uids("n2")), (vec!["a", "d"], vec!["b"]), "in workload order, enrolled only");
        assert!(!grants.contains_key("n3"));
        // The per-node path gives what the one-node function does.
        let mut cache = ResourceCache::default();
        assert_eq!(
            identity_resources(&grants["n1"], &mut cache),
            node_resources(&config, &ProxyKind::Ztunnel, "n1", &mut ResourceCache::default())
        );
        assert!(
            node_resources(
                &config,
                &ProxyKind::Waypoint { namespace: "shop".into(), name: "w".into() },
                "n1",
                &mut cache
            )
            .is_empty()
        );
    }

    #[test]
    fn a_proxy_gets_the_config_back_and_only_deltas_after() {
        let want = resources_for(&config(), &ProxyKind::Ztunnel, "n1");
        assert!(want.contains_key("identity/a") && !want.contains_key("identity/b"), "{:?}", want.keys());
        let (upsert, remove) = delta(&BTreeMap::new(), &want, &BTreeMap::new());
        assert_eq!((upsert.len(), remove.len()), (want.len(), 0));
        let mut held = Held::default();
        let built = held.apply(&upsert, &remove).unwrap().clone();
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
        let built = held.apply(&upsert, &remove).unwrap();
        assert_eq!(built.workloads, next.workloads);

        // Shared and own resources kept apart: a held identity still owned stays, one no
        // longer owned goes, and nothing shared is mistaken for either.
        let kind = ProxyKind::Ztunnel;
        let shared = shared_resources(&config(), &kind, &mut ResourceCache::default());
        let own = node_resources(&config(), &kind, "n1", &mut ResourceCache::default());
        let mut have: BTreeMap<String, String> =
            shared.iter().chain(&own).map(|(k, r)| (k.clone(), r.hash.clone())).collect();
        assert_eq!(delta(&have, &shared, &own), (vec![], vec![]));
        have.insert("identity/gone".into(), "h".into());
        have.insert("zzz/last".into(), "h".into());
        let (upsert, remove) = delta(&have, &shared, &own);
        assert!(upsert.is_empty());
        assert_eq!(remove, ["identity/gone", "zzz/last"]);
    }

    #[test]
    fn a_bad_update_is_refused_and_the_held_config_kept() {
        let want = resources_for(&config(), &ProxyKind::Ztunnel, "n1");
        let mut held = Held::default();
        held.apply(&want.values().map(|r| Resource::clone(r)).collect::<Vec<_>>(), &[]).unwrap();
        let before = held.hashes();
        // Refused after a removal and an upsert of the same key in the one update: all of it
        // is undone.
        let (_, clash) = resource(kinds::WORKLOAD, "c", 0, workload("c", "10.0.0.1", "n1"));
        let (_, changed_b) = resource(kinds::WORKLOAD, "b", 0, workload("b", "10.0.0.9", "n2"));
        let err = held.apply(&[changed_b, clash], &["workload/b".into()]).unwrap_err();
        assert!(err.to_string().contains("both claim IP 10.0.0.1"), "{err}");
        assert_eq!(held.hashes(), before);
        let mut fresh = Held::default();
        fresh.apply(&want.values().map(|r| Resource::clone(r)).collect::<Vec<_>>(), &[]).unwrap();
        assert_eq!(held.config(), fresh.config());
        let bad = Resource {
            key: "workload/d".into(),
            hash: "x".into(),
            order: 0,
            value: serde_json::json!({"uid": 1}),
        };
        assert!(matches!(held.apply(&[bad], &[]), Err(RejectReason::Malformed { .. })));
        let future = Resource { key: "gizmo/x".into(), hash: "x".into(), order: 0, value: Value::Null };
        assert_eq!(held.apply(&[future], &[]).unwrap_err(), RejectReason::UnknownKind("gizmo/x".into()));
        assert_eq!(held.config().workloads.len(), 2, "the held config is untouched");
        assert_eq!(held.config(), fresh.config());
    }

    #[test]
    fn updates_patch_the_held_config_in_place_in_the_controllers_order() {
        let vs = |name: &str| VirtualService {
            name: name.into(),
            namespace: "shop".into(),
            kind: Default::default(),
            hosts: vec![format!("{name}.shop.svc.cluster.local")],
            http: vec![],
        };
        let waypoint = ProxyKind::Waypoint { namespace: "shop".into(), name: "wp".into() };
        let mut config = config();
        config.routing.virtual_services = vec![vs("b"), vs("a")];
        let mut held = Held::default();
        let all = |c: &NodeConfig| resources_for(c, &waypoint, "n1");
        let (upsert, remove) = delta(&held.hashes(), &all(&config), &BTreeMap::new());
        held.apply(&upsert, &remove).unwrap();
        assert_eq!(held.config().routing.virtual_services, config.routing.virtual_services);

        // Reordered by the controller, a workload added in the middle, a service gone.
        config.routing.virtual_services.reverse();
        config.workloads.insert(1, workload("ab", "10.0.0.3", "n1"));
        config.services.clear();
        let (upsert, remove) = delta(&held.hashes(), &all(&config), &BTreeMap::new());
        let built = held.apply(&upsert, &remove).unwrap();
        assert_eq!(built, &config, "the same config a fresh build would give");

        // A resource whose key does not name what it holds would break the order: refused.
        let (_, mut misnamed) = resource(kinds::WORKLOAD, "zz", 0, workload("c", "10.0.0.4", "n1"));
        misnamed.key = "workload/zz".into();
        assert!(matches!(held.apply(&[misnamed], &[]), Err(RejectReason::Malformed { .. })));
        assert_eq!(held.config(), &config);
    }

    #[test]
    fn a_new_version_rebuilds_only_the_resources_that_changed() {
        let mut cache = ResourceCache::default();
        let first = shared_resources(&config(), &ProxyKind::Ztunnel, &mut cache);
        let mut next = config();
        next.workloads[1].labels.insert("version".into(), "v2".into());
        let second = shared_resources(&next, &ProxyKind::Ztunnel, &mut cache);
        assert!(Arc::ptr_eq(&first["workload/a"], &second["workload/a"]), "unchanged: reused");
        assert!(!Arc::ptr_eq(&first["workload/b"], &second["workload/b"]));
        assert_ne!(first["workload/b"].hash, second["workload/b"].hash);
        assert_eq!(cache.changes().upserted, ["workload/b"]);
        // The same as building from nothing.
        assert_eq!(second, shared_resources(&next, &ProxyKind::Ztunnel, &mut ResourceCache::default()));

        // A proxy holding the first set gets from the changes what the full delta gives it.
        next.workloads.remove(0);
        next.services[0].endpoints.clear();
        let have: BTreeMap<String, String> =
            second.iter().map(|(k, r)| (k.clone(), r.hash.clone())).collect();
        let mut have_with_own = have.clone();
        have_with_own.insert("identity/a".into(), "h".into());
        have_with_own.insert("identity/gone".into(), "h".into());
        let third = shared_resources(&next, &ProxyKind::Ztunnel, &mut cache);
        let own = node_resources(&next, &ProxyKind::Ztunnel, "n1", &mut ResourceCache::default());
        let sorted = |(mut u, mut r): (Vec<Resource>, Vec<String>)| {
            u.sort_by(|a, b| a.key.cmp(&b.key));
            r.sort();
            (u, r)
        };
        let fast = sorted(delta_from_changes(&have_with_own, &third, cache.changes(), &own));
        assert_eq!(fast, sorted(delta(&have_with_own, &third, &own)));
        assert_eq!(fast.1, ["identity/a", "identity/gone", "workload/a"]);
    }

    #[test]
    fn a_name_compares_as_the_name_it_builds() {
        use crate::policy::MtlsMode;
        let names =
            ["", "a", "a/", "a/b", "a/b/c", "a-b/c", "ab/", "b/a", "shop/pay", "shop/payment", "shop0/a"];
        for (namespace, name) in [("shop", "pay"), ("a", "b"), ("a-b", "c"), ("", ""), ("a", "")] {
            let p = PeerAuthentication {
                name: name.into(),
                namespace: namespace.into(),
                selector: None,
                mode: MtlsMode::Permissive,
                port_level: Default::default(),
            };
            for other in names {
                assert_eq!(
                    p.cmp_name(other),
                    p.resource_name().as_str().cmp(other),
                    "{namespace}/{name} vs {other}"
                );
            }
        }
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

    #[test]
    fn lines_are_whole_however_the_stream_is_cut() {
        let long = "x".repeat(100_000);
        let stream = format!("one\n\n{long}\nthree\nfour");
        let expected: Vec<Vec<u8>> =
            ["one", "", long.as_str(), "three"].iter().map(|l| l.as_bytes().to_vec()).collect();
        for size in [1, 2, 3, 7, 4096, 16_384, stream.len()] {
            let mut buf = LineBuffer::default();
            let lines: Vec<Vec<u8>> = stream.as_bytes().chunks(size).flat_map(|c| buf.push(c)).collect();
            assert_eq!(lines, expected, "chunks of {size} bytes");
            // The unfinished line stays until its newline comes.
            assert_eq!(buf.push(b"\n"), vec![b"four".to_vec()], "chunks of {size} bytes");
        }
    }
}
