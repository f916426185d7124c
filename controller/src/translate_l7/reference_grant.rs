//! Gateway API ReferenceGrants: which HTTPRoutes may send traffic to a Service in another
//! namespace. Without a grant in the Service's namespace, such a backend (or mirror) is refused,
//! as the Gateway API requires: a route must not reach into a namespace that did not allow it.

use std::sync::Arc;

use crate::objects::gateway_api::ReferenceGrant;

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// The grants that concern HTTPRoutes referring to Services.
#[derive(Default)]
pub(super) struct Grants {
    /// (grant's namespace, namespace allowed to refer into it, Service name or every Service).
    allowed: Vec<(String, String, Option<String>)>,
}

impl Grants {
    pub(super) fn new(grants: &[Arc<ReferenceGrant>]) -> Self {
        let mut allowed = Vec::new();
        for grant in grants {
            let into = grant.metadata.namespace.clone().unwrap_or_default();
            let services = || {
                grant
                    .spec
                    .to
                    .iter()
                    .filter(|t| matches!(t.group.as_str(), "" | "core") && t.kind == "Service")
            };
            for from in grant.spec.from.iter().filter(|f| f.group == GATEWAY_GROUP && f.kind == "HTTPRoute") {
                for to in services() {
                    allowed.push((into.clone(), from.namespace.clone(), to.name.clone()));
                }
            }
        }
        Grants { allowed }
    }

    /// Whether an HTTPRoute in `route_namespace` may send traffic to Service `name` in
    /// `service_namespace`: always within one namespace, else only with a grant.
    pub(super) fn route_may_use(&self, route_namespace: &str, service_namespace: &str, name: &str) -> bool {
        route_namespace == service_namespace
            || self.allowed.iter().any(|(into, from, service)| {
                into == service_namespace
                    && from == route_namespace
                    && service.as_deref().is_none_or(|s| s == name)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(namespace: &str, yaml: &str) -> Arc<ReferenceGrant> {
        let spec: serde_json::Value = serde_yaml_ng::from_str(yaml).unwrap();
        let value = serde_json::json!({"metadata": {"name": "g", "namespace": namespace}, "spec": spec});
        Arc::new(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn only_a_grant_in_the_services_namespace_for_httproutes_lets_a_route_in() {
        let grants = Grants::new(&[
            // payments lets shop's HTTPRoutes reach its ledger Service only.
            grant(
                "payments",
                "{from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}], \
                 to: [{group: '', kind: Service, name: ledger}]}",
            ),
            // audit lets shop's HTTPRoutes reach every Service in it.
            grant(
                "audit",
                "{from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}], to: [{group: '', kind: Service}]}",
            ),
            // Grants for other kinds say nothing about HTTPRoutes to Services.
            grant(
                "secrets",
                "{from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: shop}], to: [{group: '', kind: Service}]}",
            ),
            grant(
                "vault",
                "{from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}], to: [{group: '', kind: Secret}]}",
            ),
        ]);
        assert!(grants.route_may_use("shop", "shop", "anything"), "same namespace needs no grant");
        assert!(grants.route_may_use("shop", "payments", "ledger"));
        assert!(!grants.route_may_use("shop", "payments", "cards"), "the grant names ledger only");
        assert!(!grants.route_may_use("web", "payments", "ledger"), "the grant is for shop's routes");
        assert!(grants.route_may_use("shop", "audit", "log"));
        assert!(!grants.route_may_use("shop", "secrets", "x"), "granted to Gateways, not HTTPRoutes");
        assert!(!grants.route_may_use("shop", "vault", "x"), "granted for Secrets, not Services");
        assert!(!grants.route_may_use("shop", "elsewhere", "x"), "no grant at all");
    }
}
