//! The L7 objects to [`Routing`], what waypoints evaluate: VirtualServices and mesh HTTPRoutes
//! (route tables), DestinationRules (subsets, traffic policy) and the AuthorizationPolicies
//! attached to a waypoint or a Service with `targetRefs`.
//!
//! The Kubernetes-shaped work is done here so the waypoint evaluates the model as it is: host
//! names resolved to FQDNs, Istio's and the Gateway API's defaults filled, durations in
//! milliseconds. A bad field costs only itself, or the smallest thing that cannot stand
//! without it (a match, a destination, a route, a rule); each such loss is a finding naming
//! the object and the field. Checks that relate objects to each other (undefined subsets,
//! destinations that are not Services, weights, two VirtualServices for one host) are
//! `analyze`'s, so the two never report the same thing.

mod authorization;
mod destination_rule;
mod http_route;
mod reference_grant;
mod virtual_service;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::core::v1::Service as K8sService,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use warren_core::{
    l7::{HeaderOperations, Retries, Routing, StringMatch},
    model::Service,
};

use crate::{
    findings::{Finding, codes, error, warning},
    objects::{Snapshot, object_name},
};

/// The cluster's DNS domain: Service FQDNs are `name.namespace.svc.cluster.local`.
const CLUSTER_DOMAIN: &str = "cluster.local";

/// Everything L7 in `snapshot`, with `services` as translated (they carry their waypoints).
pub fn routing(snapshot: &Snapshot, services: &[Service], findings: &mut Vec<Finding>) -> Routing {
    let mesh = Mesh::new(snapshot, services);
    // Istio merges routes for one host oldest first; ties by namespace/name. HTTPRoutes go in
    // the same order (the Gateway API's rule across routes).
    let mut routes: Vec<(OrderKey, Vec<_>)> = Vec::new();
    for vs in &snapshot.virtual_services {
        let translated = virtual_service::translate(vs, &mesh, findings);
        routes.push((order_key(&vs.metadata, 0), translated.into_iter().collect()));
    }
    for route in &snapshot.http_routes {
        routes.push((order_key(&route.metadata, 1), http_route::translate(route, &mesh, findings)));
    }
    routes.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rules: Vec<_> = snapshot
        .destination_rules
        .iter()
        .filter_map(|dr| {
            Some((order_key(&dr.metadata, 0), destination_rule::translate(dr, &mesh, findings)?))
        })
        .collect();
    rules.sort_by(|a, b| a.0.cmp(&b.0));
    let mut authorizations: Vec<_> = snapshot
        .authorization_policies
        .iter()
        .filter_map(|ap| authorization::translate(ap, &mesh, findings))
        .collect();
    authorizations.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Routing {
        virtual_services: routes.into_iter().flat_map(|(_, v)| v).collect(),
        destination_rules: rules.into_iter().map(|(_, r)| r).collect(),
        authorizations,
    }
}

/// Creation time (objects read from files have none, and sort first), namespace, name, then
/// kind (VirtualService before HTTPRoute).
type OrderKey = (Option<Time>, String, String, u8);

fn order_key(meta: &ObjectMeta, kind: u8) -> OrderKey {
    (meta.creation_timestamp.clone(), namespace_of(meta), meta.name.clone().unwrap_or_default(), kind)
}

fn namespace_of(meta: &ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".into())
}

/// Resolves a host as Kubernetes DNS would from `namespace`: `payment`, `payment.production`,
/// `payment.production.svc` and the FQDN all name the same Service.
pub(crate) fn fqdn(host: &str, namespace: &str) -> String {
    let host = host.trim_end_matches('.');
    match host.split('.').count() {
        1 => format!("{host}.{namespace}.svc.{CLUSTER_DOMAIN}"),
        2 => format!("{host}.svc.{CLUSTER_DOMAIN}"),
        3 if host.ends_with(".svc") => format!("{host}.{CLUSTER_DOMAIN}"),
        _ => host.to_string(),
    }
}

/// What translation needs to know about the rest of the mesh.
struct Mesh<'a> {
    /// Every Service by FQDN, with its waypoint.
    services: BTreeMap<String, Option<&'a str>>,
    k8s_services: BTreeMap<String, &'a K8sService>,
    /// Gateways by (namespace, name), with their class.
    gateways: BTreeMap<(String, String), &'a str>,
    grants: reference_grant::Grants,
}

impl<'a> Mesh<'a> {
    fn new(snapshot: &'a Snapshot, services: &'a [Service]) -> Self {
        Mesh {
            services: services.iter().map(|s| (s.hostname(), s.waypoint.as_deref())).collect(),
            k8s_services: snapshot
                .services
                .iter()
                .map(|s| (fqdn(s.metadata.name.as_deref().unwrap_or(""), &namespace_of(&s.metadata)), &**s))
                .collect(),
            gateways: snapshot
                .gateways
                .iter()
                .map(|g| {
                    let key = (namespace_of(&g.metadata), g.metadata.name.clone().unwrap_or_default());
                    (key, g.spec.gateway_class_name.as_str())
                })
                .collect(),
            grants: reference_grant::Grants::new(&snapshot.reference_grants),
        }
    }

    fn is_service(&self, host: &str) -> bool {
        self.services.contains_key(host)
    }

    /// Warns when `host`, a Service, has no waypoint: nothing would apply what targets it.
    fn check_waypoint(&self, host: &str, field: &str, what: &str, r: &mut Report<'_>) {
        if let Some(None) = self.services.get(host) {
            r.warning(
                codes::NO_WAYPOINT,
                field,
                format!("{host} has no waypoint (istio.io/use-waypoint), so nothing applies these {what}"),
            );
        }
    }

    /// The number of the port named `name` of the Service `host`.
    fn port_named(&self, host: &str, name: &str) -> Option<u16> {
        let spec = self.k8s_services.get(host)?.spec.as_ref()?;
        let port = spec.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name))?;
        u16::try_from(port.port).ok()
    }

    fn gateway_class(&self, namespace: &str, name: &str) -> Option<&str> {
        self.gateways.get(&(namespace.to_string(), name.to_string())).copied()
    }
}

/// Findings about one object, each naming a field.
struct Report<'a> {
    object: String,
    findings: &'a mut Vec<Finding>,
}

impl<'a> Report<'a> {
    fn new(kind: &str, meta: &ObjectMeta, findings: &'a mut Vec<Finding>) -> Self {
        Report { object: format!("{kind} {}", object_name(meta)), findings }
    }

    fn error(&mut self, code: &'static str, field: impl Into<String>, message: impl Into<String>) {
        self.findings.push(error(code, self.object.clone(), Some(field.into()), message));
    }

    fn warning(&mut self, code: &'static str, field: impl Into<String>, message: impl Into<String>) {
        self.findings.push(warning(code, self.object.clone(), Some(field.into()), message));
    }
}

/// An Istio or Gateway API duration (`1s`, `500ms`, `1.5s`, `1m`, `1h30m`; Go's syntax) in
/// milliseconds, rounded up so that a short positive duration never becomes 0 ("none").
pub(crate) fn duration_ms(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a duration (like 1s, 500ms, 1.5s, 1m)");
    if text == "0" {
        return Ok(0);
    }
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_end);
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale: u128 = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" => 1_000,
            "ns" => 1,
            _ => return Err(bad()),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
            return Err(bad());
        }
        let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
        // At most 9 fractional digits matter below a nanosecond-scaled unit.
        let digits = &fraction[..fraction.len().min(9)];
        let fraction_value: u128 = if digits.is_empty() { 0 } else { digits.parse().map_err(|_| bad())? };
        let part = whole
            .checked_mul(scale)
            .and_then(|w| w.checked_add(fraction_value * scale / 10u128.pow(digits.len() as u32)))
            .ok_or_else(bad)?;
        nanos = nanos.checked_add(part).ok_or_else(bad)?;
        rest = tail;
    }
    u64::try_from(nanos.div_ceil(1_000_000)).map_err(|_| bad())
}

/// A duration field that may be absent: `Some(ms)`, None when absent or zero (Istio and the
/// Gateway API: a zero timeout is no timeout), None with an error when it does not parse.
fn optional_duration(text: Option<&str>, field: &str, effect: &str, r: &mut Report<'_>) -> Option<u64> {
    match duration_ms(text?) {
        Ok(0) => None,
        Ok(ms) => Some(ms),
        Err(e) => {
            r.error(codes::INVALID_VALUE, field, format!("{e}; {effect}"));
            None
        }
    }
}

/// A share of requests in percent: 100 when unset; None (with an error) outside 0–100.
fn percentage(value: Option<f64>, field: &str, r: &mut Report<'_>, dropped: &str) -> Option<f64> {
    match value {
        None => Some(100.0),
        Some(v) if (0.0..=100.0).contains(&v) => Some(v),
        Some(v) => {
            r.error(
                codes::INVALID_VALUE,
                field,
                format!("{v} is not a percentage (0 to 100); {dropped} dropped"),
            );
            None
        }
    }
}

fn port_number(n: i64) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// Why `re` does not compile as the waypoint compiles it (RE2 syntax, anchored), in one line.
fn regex_error(re: &str) -> Option<String> {
    let error = regex::Regex::new(re).and_then(|_| regex::Regex::new(&format!("^(?:{re})$"))).err()?;
    // The crate's message draws a caret under the pattern; its last line is the reason.
    let text = error.to_string();
    let reason = text.lines().last().unwrap_or_default().trim_start_matches("error: ");
    Some(format!("{re:?} does not compile: {reason}"))
}

/// A compiled-ahead check of `StringMatch::Regex`; other matches always pass.
fn check_regex(m: &StringMatch, field: &str, r: &mut Report<'_>, dropped: &str) -> bool {
    match m {
        StringMatch::Regex(re) => match regex_error(re) {
            None => true,
            Some(e) => {
                r.error(codes::INVALID_REGEX, field, format!("{e}; {dropped}"));
                false
            }
        },
        _ => true,
    }
}

/// Header operations with lower-case names (HTTP header names are case-insensitive).
fn header_operations<'h>(
    set: impl IntoIterator<Item = (&'h String, &'h String)>,
    add: impl IntoIterator<Item = (&'h String, &'h String)>,
    remove: impl IntoIterator<Item = &'h String>,
) -> HeaderOperations {
    let lower = |(k, v): (&String, &String)| (k.to_ascii_lowercase(), v.clone());
    let mut remove: Vec<String> = remove.into_iter().map(|h| h.to_ascii_lowercase()).collect();
    let mut seen = BTreeSet::new();
    remove.retain(|h| seen.insert(h.clone()));
    HeaderOperations {
        set: set.into_iter().map(lower).collect(),
        add: add.into_iter().map(lower).collect(),
        remove,
    }
}

/// Istio's retry policy for a route that says nothing about retries (its `DefaultPolicy`):
/// the waypoint retries exactly what an Istio waypoint would.
fn default_retries() -> Retries {
    Retries::istio_default()
}

#[cfg(test)]
mod tests;
