//! Checks over a snapshot that are not part of translating it: the mistakes that turn into
//! silent 503s or undefined behaviour at L7 (`istioctl analyze`'s job). These relate objects
//! to each other; what is wrong within one field (a regex, a duration, a port) is reported by
//! translation, which also says what it dropped, so `controller analyze` (which prints both)
//! never reports one thing twice.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    findings::{Finding, codes, error, warning},
    objects::{Snapshot, VirtualService, object_name},
    translate_l7::fqdn,
};

pub fn analyze(snapshot: &Snapshot) -> Vec<Finding> {
    let mut findings = Vec::new();
    let services: BTreeSet<String> = snapshot
        .services
        .iter()
        .map(|s| {
            fqdn(
                s.metadata.name.as_deref().unwrap_or(""),
                s.metadata.namespace.as_deref().unwrap_or("default"),
            )
        })
        .collect();
    let mut subsets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for dr in &snapshot.destination_rules {
        let ns = dr.metadata.namespace.as_deref().unwrap_or("default");
        subsets
            .entry(fqdn(&dr.spec.host, ns))
            .or_default()
            .extend(dr.spec.subsets.iter().map(|s| s.name.clone()));
    }
    let mut claimed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for vs in &snapshot.virtual_services {
        let ns = vs.metadata.namespace.as_deref().unwrap_or("default");
        for host in &vs.spec.hosts {
            claimed.entry(fqdn(host, ns)).or_default().push(object_name(&vs.metadata));
        }
        routes(vs, ns, &services, &subsets, &mut findings);
    }
    for (host, owners) in claimed {
        if owners.len() > 1 {
            findings.push(warning(
                codes::CONFLICTING_VIRTUAL_SERVICES,
                format!("VirtualService {}", owners.join(", ")),
                Some("spec.hosts".into()),
                format!(
                    "{host} is claimed by {} VirtualServices; which one applies is undefined",
                    owners.len()
                ),
            ));
        }
    }
    findings
}

fn routes(
    vs: &VirtualService,
    ns: &str,
    services: &BTreeSet<String>,
    subsets: &BTreeMap<String, BTreeSet<String>>,
    findings: &mut Vec<Finding>,
) {
    let object = format!("VirtualService {}", object_name(&vs.metadata));
    for (i, http) in vs.spec.http.iter().enumerate() {
        for (k, route) in http.route.iter().enumerate() {
            let host = fqdn(&route.destination.host, ns);
            let field = format!("spec.http[{i}].route[{k}].destination");
            if !services.contains(&host) {
                findings.push(error(
                    codes::UNKNOWN_HOST,
                    object.clone(),
                    Some(format!("{field}.host")),
                    format!("{host} is not a Service"),
                ));
            }
            if let Some(subset) = &route.destination.subset
                && !subsets.get(&host).is_some_and(|s| s.contains(subset))
            {
                findings.push(error(
                    codes::UNDEFINED_SUBSET,
                    object.clone(),
                    Some(format!("{field}.subset")),
                    format!("no DestinationRule for {host} defines subset {subset:?}: requests routed here would fail with 503"),
                ));
            }
        }
        if http.route.len() > 1 {
            let total: i64 = http.route.iter().map(|r| r.weight.unwrap_or(0)).sum();
            if total != 100 {
                findings.push(warning(
                    codes::WEIGHTS,
                    object.clone(),
                    Some(format!("spec.http[{i}].route[*].weight")),
                    format!("weights add up to {total}, not 100"),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::read_documents;

    #[test]
    fn the_l7_traps_are_reported_with_their_fields() {
        let mut snapshot = Snapshot::default();
        let mut parse = Vec::new();
        read_documents("fixture", include_str!("../fixtures/routing.yaml"), &mut snapshot, &mut parse);
        assert!(parse.is_empty(), "{parse:#?}");
        let findings = analyze(&snapshot);
        let by_code = |code: &str| findings.iter().filter(|f| f.code == code).collect::<Vec<_>>();
        let subset = by_code(codes::UNDEFINED_SUBSET);
        assert_eq!(subset.len(), 1, "{findings:#?}");
        assert_eq!(subset[0].field.as_deref(), Some("spec.http[1].route[1].destination.subset"));
        assert!(subset[0].message.contains("\"v3\""));
        let host = by_code(codes::UNKNOWN_HOST);
        assert_eq!(host.len(), 1);
        assert!(host[0].message.contains("ledger.production.svc.cluster.local"));
        assert_eq!(by_code(codes::WEIGHTS).len(), 1);
        assert!(by_code(codes::WEIGHTS)[0].message.contains("90"));
        assert_eq!(by_code(codes::CONFLICTING_VIRTUAL_SERVICES).len(), 1);
        // The bad regex is translation's to report (it drops the match).
        assert!(by_code(codes::INVALID_REGEX).is_empty());
    }
}
