//! The resources Kubernetes mode watches. deploy/rbac/controller.yaml grants get/list/watch on
//! exactly these; keep the two in step (a unit test below checks the RBAC file).

use std::fmt;

/// One watched resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    ServiceAccount,
    VirtualService,
    DestinationRule,
    PeerAuthentication,
    AuthorizationPolicy,
    HttpRoute,
    Gateway,
    ReferenceGrant,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::ServiceAccount,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::HttpRoute,
        Kind::Gateway,
        Kind::ReferenceGrant,
    ];

    /// The kinds read through CRDs, which may not be installed.
    pub const DYNAMIC: [Kind; 7] = [
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::HttpRoute,
        Kind::Gateway,
        Kind::ReferenceGrant,
    ];

    /// API group (`""` for core).
    pub fn group(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Pod | Kind::Service | Kind::ServiceAccount => "",
            Kind::VirtualService | Kind::DestinationRule => "networking.istio.io",
            Kind::PeerAuthentication | Kind::AuthorizationPolicy => "security.istio.io",
            Kind::HttpRoute | Kind::Gateway | Kind::ReferenceGrant => "gateway.networking.k8s.io",
        }
    }

    /// The `kind` field.
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::HttpRoute => "HTTPRoute",
            Kind::Gateway => "Gateway",
            Kind::ReferenceGrant => "ReferenceGrant",
        }
    }

    /// The resource (plural) name, as RBAC and URLs spell it.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::ServiceAccount => "serviceaccounts",
            Kind::VirtualService => "virtualservices",
            Kind::DestinationRule => "destinationrules",
            Kind::PeerAuthentication => "peerauthentications",
            Kind::AuthorizationPolicy => "authorizationpolicies",
            Kind::HttpRoute => "httproutes",
            Kind::Gateway => "gateways",
            Kind::ReferenceGrant => "referencegrants",
        }
    }

    pub fn is_dynamic(self) -> bool {
        !self.group().is_empty()
    }
}

/// `pods`, or `virtualservices.networking.istio.io` (the CRD's name): what RBAC and
/// `kubectl get` call it.
impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_dynamic() {
            write!(f, "{}.{}", self.plural(), self.group())
        } else {
            f.write_str(self.plural())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_is_exactly_the_crd_kinds() {
        let dynamic: Vec<Kind> = Kind::ALL.into_iter().filter(|k| k.is_dynamic()).collect();
        assert_eq!(dynamic, Kind::DYNAMIC);
        assert_eq!(Kind::Pod.to_string(), "pods");
        assert_eq!(Kind::HttpRoute.to_string(), "httproutes.gateway.networking.k8s.io");
    }

    /// The ClusterRole grants get/list/watch on exactly the watched resources: nothing missing
    /// (the controller would fail) and nothing more (least privilege).
    #[test]
    fn the_rbac_manifest_grants_exactly_what_is_watched() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac/controller.yaml");
        let text = std::fs::read_to_string(path).expect("deploy/rbac/controller.yaml");
        let mut granted = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc).expect("YAML");
            if value["kind"] != "ClusterRole" {
                continue;
            }
            for rule in value["rules"].as_array().expect("rules") {
                let verbs: Vec<&str> =
                    rule["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
                assert_eq!(verbs, ["get", "list", "watch"], "read-only verbs only: {rule}");
                assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
                for group in rule["apiGroups"].as_array().unwrap() {
                    for resource in rule["resources"].as_array().unwrap() {
                        granted.push((
                            group.as_str().unwrap().to_string(),
                            resource.as_str().unwrap().to_string(),
                        ));
                    }
                }
            }
        }
        granted.sort();
        let mut watched: Vec<(String, String)> =
            Kind::ALL.iter().map(|k| (k.group().to_string(), k.plural().to_string())).collect();
        watched.sort();
        assert_eq!(granted, watched);
    }
}
