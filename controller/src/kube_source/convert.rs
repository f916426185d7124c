//! The reflector stores' contents to a [`Snapshot`]: pure, so every rule is unit-tested without
//! an API server. Core kinds arrive typed; the CRD kinds arrive as `DynamicObject`s and are read
//! into objects.rs's types through JSON, with the same field-naming errors as local mode.
//!
//! Stores are hash maps: objects are sorted by namespace/name here so that the same cluster
//! state always translates to the same bytes (the config file is rewritten only on change).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Service, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::api::DynamicObject;
use serde::de::DeserializeOwned;

use super::kinds::Kind;
use crate::{
    findings::{Finding, codes, error},
    objects::Snapshot,
};

/// What the stores hold at one moment.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    pub service_accounts: Vec<Arc<ServiceAccount>>,
    /// The CRD kinds; a kind whose CRD is not installed is absent (or empty).
    pub dynamic: BTreeMap<Kind, Vec<Arc<DynamicObject>>>,
}

/// The snapshot the translation reads, and the objects that could not be read (no cache).
#[cfg(test)]
pub fn snapshot(objects: &Objects) -> (Snapshot, Vec<Finding>) {
    snapshot_with(objects, &mut ReadCache::default())
}

/// CRD objects already read, by kind, uid and resourceVersion: an object the API server has
/// not changed is not read from JSON again on every rebuild (what it read into, or the finding
/// it gave, is reused).
#[derive(Default)]
pub struct ReadCache {
    read: HashMap<(Kind, String, String), ReadOutcome>,
    next: HashMap<(Kind, String, String), ReadOutcome>,
}

type ReadOutcome = Result<Arc<dyn std::any::Any + Send + Sync>, Finding>;

/// [`snapshot`], reusing `cache` across rebuilds (the watch loop keeps one).
pub fn snapshot_with(objects: &Objects, cache: &mut ReadCache) -> (Snapshot, Vec<Finding>) {
    let mut findings = Vec::new();
    let mut s = Snapshot {
        namespaces: typed(&objects.namespaces, |n| &n.metadata),
        pods: typed(&objects.pods, |p| &p.metadata),
        services: typed(&objects.services, |s| &s.metadata),
        service_accounts: typed(&objects.service_accounts, |s| &s.metadata),
        ..Snapshot::default()
    };
    for (kind, list) in &objects.dynamic {
        let mut list: Vec<&DynamicObject> = list.iter().map(|o| o.as_ref()).collect();
        list.sort_by(|a, b| key(&a.metadata).cmp(&key(&b.metadata)));
        for object in list {
            match *kind {
                Kind::VirtualService => cache.read(*kind, object, &mut s.virtual_services, &mut findings),
                Kind::DestinationRule => cache.read(*kind, object, &mut s.destination_rules, &mut findings),
                Kind::PeerAuthentication => {
                    cache.read(*kind, object, &mut s.peer_authentications, &mut findings)
                }
                Kind::AuthorizationPolicy => {
                    cache.read(*kind, object, &mut s.authorization_policies, &mut findings)
                }
                Kind::HttpRoute => cache.read(*kind, object, &mut s.http_routes, &mut findings),
                Kind::Gateway => cache.read(*kind, object, &mut s.gateways, &mut findings),
                Kind::ReferenceGrant => cache.read(*kind, object, &mut s.reference_grants, &mut findings),
                // Core kinds are never dynamic; nothing to read.
                Kind::Namespace | Kind::Pod | Kind::Service | Kind::ServiceAccount => {}
            }
        }
    }
    // Objects gone from the stores are forgotten.
    cache.read = std::mem::take(&mut cache.next);
    (s, findings)
}

impl ReadCache {
    fn read<T: DeserializeOwned + Send + Sync + 'static>(
        &mut self,
        kind: Kind,
        object: &DynamicObject,
        out: &mut Vec<Arc<T>>,
        findings: &mut Vec<Finding>,
    ) {
        let meta = &object.metadata;
        let Some(key) = meta.uid.clone().zip(meta.resource_version.clone()).map(|(u, v)| (kind, u, v)) else {
            // Without a uid and version (never from an API server) there is nothing to key on.
            read(kind, object, out, findings);
            return;
        };
        let outcome = match self.read.remove(&key) {
            Some(outcome) => outcome,
            None => {
                let (mut parsed, mut found): (Vec<Arc<T>>, Vec<Finding>) = (Vec::new(), Vec::new());
                read(kind, object, &mut parsed, &mut found);
                match (parsed.pop(), found.pop()) {
                    (Some(o), _) => Ok(o as Arc<dyn std::any::Any + Send + Sync>),
                    (None, Some(f)) => Err(f),
                    (None, None) => return,
                }
            }
        };
        match &outcome {
            Ok(o) => out.push(o.clone().downcast::<T>().expect("cached under this object's kind")),
            Err(f) => findings.push(f.clone()),
        }
        self.next.insert(key, outcome);
    }
}

/// Namespace and name, borrowed: sorting 10,000 pods compares keys ~140,000 times, and an
/// owned key would allocate twice each time.
fn key(meta: &ObjectMeta) -> (&str, &str) {
    (meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default())
}

fn typed<T>(list: &[Arc<T>], meta: impl Fn(&T) -> &ObjectMeta) -> Vec<Arc<T>> {
    let mut out: Vec<Arc<T>> = list.to_vec();
    out.sort_by(|a, b| key(meta(a)).cmp(&key(meta(b))));
    out
}

/// Reads one CRD object into its typed form; a field of the wrong type is a finding naming the
/// field (`spec.http[0].route`), and the object is skipped — the rest keeps flowing.
fn read<T: DeserializeOwned>(
    kind: Kind,
    object: &DynamicObject,
    out: &mut Vec<Arc<T>>,
    findings: &mut Vec<Finding>,
) {
    let name = crate::objects::object_name(&object.metadata);
    let value = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => {
            findings.push(error(codes::SCHEMA, format!("{} {name}", kind.kind()), None, e.to_string()));
            return;
        }
    };
    match serde_path_to_error::deserialize(value) {
        Ok(o) => out.push(Arc::new(o)),
        Err(e) => {
            let field = e.path().to_string();
            findings.push(error(
                codes::SCHEMA,
                format!("{} {name}", kind.kind()),
                Some(field),
                e.into_inner().to_string(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{findings::Severity, source, translate};

    fn dynamic(value: serde_json::Value) -> Arc<DynamicObject> {
        Arc::new(serde_json::from_value(value).expect("a DynamicObject"))
    }

    fn typed_from<T: DeserializeOwned>(value: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(value).expect("a typed object"))
    }

    fn pod(ns: &str, name: &str, ip: &str) -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": {"app": name}},
            "spec": {"nodeName": "node-1", "serviceAccountName": name, "containers": [{"name": "app", "image": "echo"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]}
        })
    }

    fn virtual_service(name: &str, http: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"hosts": ["payment"], "http": http}
        })
    }

    /// The cluster of the tests below, once as API objects and once as the YAML local mode reads.
    fn cluster() -> (Objects, String) {
        let namespace = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}});
        let pods = [pod("shop", "checkout", "10.0.0.1"), pod("shop", "payment", "10.0.0.2")];
        let service = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "payment", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "payment"}, "ports": [{"port": 80, "targetPort": 8080}]}});
        let vs = virtual_service(
            "payment",
            json!([{"route": [{"destination": {"host": "payment", "subset": "v1"}, "weight": 100}]}]),
        );
        let dr = json!({"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
            "metadata": {"name": "payment", "namespace": "shop"},
            "spec": {"host": "payment", "subsets": [{"name": "v1", "labels": {"app": "payment"}}]}});
        let pa = json!({"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "shop"}, "spec": {"mtls": {"mode": "STRICT"}}});
        let objects = Objects {
            namespaces: vec![typed_from(namespace.clone())],
            // Stores hand objects out in no particular order.
            pods: pods.iter().rev().cloned().map(typed_from).collect(),
            services: vec![typed_from(service.clone())],
            service_accounts: vec![],
            dynamic: BTreeMap::from([
                (Kind::VirtualService, vec![dynamic(vs.clone())]),
                (Kind::DestinationRule, vec![dynamic(dr.clone())]),
                (Kind::PeerAuthentication, vec![dynamic(pa.clone())]),
            ]),
        };
        let yaml = [namespace, pods[0].clone(), pods[1].clone(), service, vs, dr, pa]
            .iter()
            .map(|v| serde_yaml_ng::to_string(v).unwrap())
            .collect::<Vec<_>>()
            .join("---\n");
        (objects, yaml)
    }

    #[test]
    fn api_objects_translate_exactly_like_the_same_manifests() {
        let (objects, yaml) = cluster();
        let (from_api, findings) = snapshot(&objects);
        assert!(findings.is_empty(), "{findings:?}");
        let mut from_yaml = Snapshot::default();
        let mut yaml_findings = Vec::new();
        source::read_documents("cluster.yaml", &yaml, &mut from_yaml, &mut yaml_findings);
        assert!(yaml_findings.is_empty(), "{yaml_findings:?}");
        let (a, _) = translate::translate(&from_api);
        let (b, _) = translate::translate(&from_yaml);
        assert_eq!(serde_json::to_value(&a).unwrap(), serde_json::to_value(&b).unwrap());
        assert_eq!(a.workloads.len(), 2);
        assert_eq!(a.routing.virtual_services.len(), 1);
        assert_eq!(a.peer_authentications.len(), 1);
    }

    #[test]
    fn objects_are_sorted_whatever_order_the_stores_give() {
        let (mut objects, _) = cluster();
        let first = serde_json::to_value(translate::translate(&snapshot(&objects).0).0).unwrap();
        objects.pods.reverse();
        let (s, _) = snapshot(&objects);
        let names: Vec<_> = s.pods.iter().map(|p| p.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["checkout", "payment"]);
        let second = serde_json::to_value(translate::translate(&s).0).unwrap();
        assert_eq!(first, second, "store order changed the config");
    }

    #[test]
    fn a_malformed_crd_object_is_a_finding_naming_its_field_and_the_rest_flows() {
        let (mut objects, _) = cluster();
        objects
            .dynamic
            .get_mut(&Kind::VirtualService)
            .unwrap()
            .push(dynamic(virtual_service("broken", json!([{"route": 7}]))));
        let (s, findings) = snapshot(&objects);
        assert_eq!(s.virtual_services.len(), 1, "the good VirtualService is still read");
        assert_eq!(findings.len(), 1, "{findings:?}");
        let f = &findings[0];
        assert_eq!((f.code, f.severity), (codes::SCHEMA, Severity::Error));
        assert_eq!(f.object, "VirtualService shop/broken");
        assert_eq!(f.field.as_deref(), Some("spec.http[0].route"));
    }

    #[test]
    fn unchanged_crd_objects_are_not_read_again_and_read_the_same() {
        let versioned = |name: &str, version: &str, http: serde_json::Value| {
            let mut v = virtual_service(name, http);
            v["metadata"]["uid"] = json!(format!("uid-{name}"));
            v["metadata"]["resourceVersion"] = json!(version);
            dynamic(v)
        };
        let (mut objects, _) = cluster();
        let list = objects.dynamic.get_mut(&Kind::VirtualService).unwrap();
        list.clear();
        list.push(versioned("a", "1", json!([{"route": [{"destination": {"host": "payment"}}]}])));
        list.push(versioned("broken", "1", json!([{"route": 7}])));
        let mut cache = ReadCache::default();
        let (first, first_findings) = snapshot_with(&objects, &mut cache);
        let (again, again_findings) = snapshot_with(&objects, &mut cache);
        assert!(Arc::ptr_eq(&first.virtual_services[0], &again.virtual_services[0]), "read again");
        assert_eq!(first_findings, again_findings, "a cached finding is reported again");
        assert_eq!(again_findings.len(), 1);
        let uncached = snapshot(&objects);
        assert_eq!(
            serde_json::to_value(translate::translate(&again).0).unwrap(),
            serde_json::to_value(translate::translate(&uncached.0).0).unwrap()
        );

        // A new resourceVersion is read anew; a deleted object is forgotten.
        let list = objects.dynamic.get_mut(&Kind::VirtualService).unwrap();
        list[0] = versioned("a", "2", json!([{"route": [{"destination": {"host": "checkout"}}]}]));
        list.pop();
        let (third, third_findings) = snapshot_with(&objects, &mut cache);
        assert!(!Arc::ptr_eq(&again.virtual_services[0], &third.virtual_services[0]));
        assert!(third_findings.is_empty(), "{third_findings:?}");
        assert_eq!(cache.read.len(), 1);
    }

    #[test]
    fn every_crd_kind_lands_in_its_own_list() {
        let gateway_api = |kind: &str, spec: serde_json::Value| {
            dynamic(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
                "metadata": {"name": "w", "namespace": "shop"}, "spec": spec}))
        };
        let objects = Objects {
            dynamic: BTreeMap::from([
                (
                    Kind::AuthorizationPolicy,
                    vec![dynamic(
                        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                        "metadata": {"name": "p", "namespace": "shop"}, "spec": {"action": "DENY", "rules": [{}]}}),
                    )],
                ),
                (Kind::Gateway, vec![gateway_api("Gateway", json!({"gatewayClassName": "istio-waypoint"}))]),
                (
                    Kind::HttpRoute,
                    vec![gateway_api(
                        "HTTPRoute",
                        json!({"parentRefs": [{"kind": "Service", "group": "", "name": "payment"}]}),
                    )],
                ),
            ]),
            ..Objects::default()
        };
        let (s, findings) = snapshot(&objects);
        assert!(findings.is_empty(), "{findings:?}");
        assert_eq!(s.authorization_policies[0].spec.action.as_deref(), Some("DENY"));
        assert_eq!(s.gateways[0].spec.gateway_class_name, "istio-waypoint");
        assert_eq!(s.http_routes[0].spec.parent_refs[0].name, "payment");
        assert!(s.virtual_services.is_empty() && s.pods.is_empty());
    }
}
