//! AuthorizationPolicies attached with `targetRefs` → what waypoints enforce.
//!
//! What a waypoint cannot evaluate is treated as ztunnel treats L7 fields: an ALLOW rule that
//! needs it never matches (dropped), a DENY rule applies without it (denies more). A policy
//! is never widened by what Warren does not understand.

use warren_core::{
    l7::{L7Authorization, L7Condition, L7Rule, Operation, PolicyTarget, condition_key_supported},
    policy::{Action, Source},
};

use super::{CLUSTER_DOMAIN, Mesh, Report, namespace_of};
use crate::{
    findings::{Finding, codes},
    objects::{AuthorizationPolicy, AuthorizationRule, PolicyTargetRef},
};

pub(super) fn translate(
    ap: &AuthorizationPolicy,
    mesh: &Mesh<'_>,
    findings: &mut Vec<Finding>,
) -> Option<L7Authorization> {
    let spec = &ap.spec;
    let refs: Vec<(String, &PolicyTargetRef)> = spec
        .target_refs
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("spec.targetRefs[{i}]"), t))
        .chain(spec.target_ref.iter().map(|t| ("spec.targetRef".to_string(), t)))
        .collect();
    if refs.is_empty() {
        // Selector policies are ztunnel's (translate.rs).
        return None;
    }
    let mut r = Report::new("AuthorizationPolicy", &ap.metadata, findings);
    let namespace = namespace_of(&ap.metadata);
    let mut targets = Vec::new();
    for (at, t) in &refs {
        if let Some(target) = target(t, at, &namespace, mesh, &mut r)
            && !targets.contains(&target)
        {
            targets.push(target);
        }
    }
    if targets.is_empty() {
        r.warning(codes::UNSUPPORTED, "spec.targetRefs", "no usable target; the policy is not enforced");
        return None;
    }
    let action = match spec.action.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some(other) => {
            r.warning(
                codes::INVALID_VALUE,
                "spec.action",
                format!("action {other} is not enforced by waypoints; the policy is ignored"),
            );
            return None;
        }
    };
    let rules = spec
        .rules
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, rule)| translate_rule(rule, &format!("spec.rules[{i}]"), action, &mut r))
        .collect();
    Some(L7Authorization {
        name: ap.metadata.name.clone().unwrap_or_default(),
        namespace,
        targets,
        action,
        rules,
    })
}

fn target(
    t: &PolicyTargetRef,
    at: &str,
    namespace: &str,
    mesh: &Mesh<'_>,
    r: &mut Report<'_>,
) -> Option<PolicyTarget> {
    if let Some(other) = t.namespace.as_deref().filter(|n| *n != namespace) {
        r.warning(
            codes::INVALID_VALUE,
            format!("{at}.namespace"),
            format!("targets namespace {other}, but a policy applies in its own namespace only; this target is ignored"),
        );
        return None;
    }
    // An omitted group is the one the kind belongs to.
    let default_group = if t.kind == "Gateway" { "gateway.networking.k8s.io" } else { "" };
    let group = t.group.as_deref().unwrap_or(default_group);
    match (group, t.kind.as_str()) {
        ("gateway.networking.k8s.io", "Gateway") => Some(PolicyTarget::Gateway(t.name.clone())),
        ("" | "core", "Service") => {
            let host = format!("{}.{namespace}.svc.{CLUSTER_DOMAIN}", t.name);
            if !mesh.is_service(&host) {
                r.warning(codes::UNKNOWN_HOST, format!("{at}.name"), format!("{host} is not a Service"));
            } else {
                mesh.check_waypoint(&host, at, "policies", r);
            }
            Some(PolicyTarget::Service(t.name.clone()))
        }
        (group, kind) => {
            r.warning(
                codes::UNSUPPORTED,
                format!("{at}.kind"),
                format!("{group}/{kind} targets are not supported (a waypoint Gateway or a Service); this target is ignored"),
            );
            None
        }
    }
}

/// One rule, or None when it can never match (an ALLOW rule needing what the waypoint cannot
/// evaluate).
fn translate_rule(rule: &AuthorizationRule, at: &str, action: Action, r: &mut Report<'_>) -> Option<L7Rule> {
    // Fields the waypoint cannot evaluate, by path.
    let mut unsupported = Vec::new();
    let mut from = Vec::new();
    for (i, f) in rule.from.iter().enumerate() {
        let s = &f.source;
        let here = format!("{at}.from[{i}].source");
        for (name, values) in [
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ] {
            if !values.is_empty() {
                unsupported.push(format!("{here}.{name}"));
            }
        }
        unsupported.extend(s.other.keys().map(|k| format!("{here}.{k}")));
        from.push(Source {
            principals: s.principals.clone(),
            not_principals: s.not_principals.clone(),
            namespaces: s.namespaces.clone(),
            not_namespaces: s.not_namespaces.clone(),
            ip_blocks: s.ip_blocks.clone(),
            not_ip_blocks: s.not_ip_blocks.clone(),
        });
    }
    let mut to = Vec::new();
    for (j, t) in rule.to.iter().enumerate() {
        let o = &t.operation;
        let here = format!("{at}.to[{j}].operation");
        unsupported.extend(o.other.keys().map(|k| format!("{here}.{k}")));
        let ports = port_list(&o.ports, &format!("{here}.ports"), r);
        // A `notPorts` value that is not a port excludes nothing: leaving it out is exact.
        let not_ports = port_list(&o.not_ports, &format!("{here}.notPorts"), r);
        if !o.ports.is_empty() && ports.is_empty() {
            // No valid port: the operation matches no request.
            match action {
                Action::Allow => {
                    r.error(
                        codes::L7_POLICY_UNSUPPORTED,
                        format!("{here}.ports"),
                        "no valid port, so this operation matches nothing; dropped from the ALLOW rule",
                    );
                    continue;
                }
                Action::Deny => r.error(
                    codes::L7_POLICY_UNSUPPORTED,
                    format!("{here}.ports"),
                    "no valid port; this DENY rule applies to every port (it denies more)",
                ),
            }
        }
        to.push(Operation {
            methods: o.methods.clone(),
            not_methods: o.not_methods.clone(),
            paths: o.paths.clone(),
            not_paths: o.not_paths.clone(),
            hosts: o.hosts.clone(),
            not_hosts: o.not_hosts.clone(),
            ports,
            not_ports,
        });
    }
    if !rule.to.is_empty() && to.is_empty() {
        r.error(
            codes::L7_POLICY_UNSUPPORTED,
            format!("{at}.to"),
            "no operation of this ALLOW rule can match; the rule is dropped (it never matches)",
        );
        return None;
    }
    let mut when = Vec::new();
    for (k, c) in rule.when.iter().enumerate() {
        if condition_key_supported(&c.key) {
            when.push(L7Condition {
                key: c.key.clone(),
                values: c.values.clone(),
                not_values: c.not_values.clone(),
            });
        } else {
            unsupported.push(format!("{at}.when[{k}] ({})", c.key));
        }
    }
    if !unsupported.is_empty() {
        let effect = match action {
            Action::Allow => {
                "waypoints cannot evaluate these, so this ALLOW rule never matches; it is dropped"
            }
            Action::Deny => {
                "waypoints cannot evaluate these, so this DENY rule applies without them (it denies more)"
            }
        };
        r.error(codes::L7_POLICY_UNSUPPORTED, unsupported.join(", "), effect);
        if action == Action::Allow {
            return None;
        }
    }
    Some(L7Rule { from, to, when })
}

/// Port numbers; values that are not are reported and left out.
fn port_list(values: &[String], at: &str, r: &mut Report<'_>) -> Vec<u16> {
    values
        .iter()
        .filter_map(|p| {
            let port = super::port_number(p.parse().unwrap_or(0));
            if port.is_none() {
                r.error(codes::INVALID_VALUE, at, format!("{p:?} is not a port number; ignored"));
            }
            port
        })
        .collect()
}
