//! Istio DestinationRule → subsets and traffic policy.

use warren_core::l7::{
    self, ConnectionPool, HashCookie, HashKey, LoadBalancer, OutlierDetection, PortTrafficPolicy, SimpleLb,
    Subset, TrafficPolicy,
};

use super::{Mesh, Report, duration_ms, fqdn, namespace_of, port_number};
use crate::{
    findings::{Finding, codes},
    objects,
};

pub(super) fn translate(
    dr: &objects::DestinationRule,
    mesh: &Mesh<'_>,
    findings: &mut Vec<Finding>,
) -> Option<l7::DestinationRule> {
    let mut r = Report::new("DestinationRule", &dr.metadata, findings);
    let namespace = namespace_of(&dr.metadata);
    let spec = &dr.spec;
    if spec.host.is_empty() {
        r.error(codes::INVALID_VALUE, "spec.host", "is empty; the DestinationRule is ignored");
        return None;
    }
    let host = fqdn(&spec.host, &namespace);
    if !mesh.is_service(&host) {
        r.warning(
            codes::UNKNOWN_HOST,
            "spec.host",
            format!("{:?} ({host}) is not a Service; the DestinationRule is ignored", spec.host),
        );
        return None;
    }
    let rule_policy = traffic_policy(spec.traffic_policy.as_ref(), "spec.trafficPolicy", &mut r);
    let mut subsets: Vec<Subset> = Vec::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let at = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            r.error(codes::INVALID_VALUE, format!("{at}.name"), "is empty; the subset is dropped");
            continue;
        }
        if subsets.iter().any(|x| x.name == s.name) {
            r.error(
                codes::INVALID_VALUE,
                format!("{at}.name"),
                format!("subset {:?} is defined twice; the first is kept", s.name),
            );
            continue;
        }
        let own = s
            .traffic_policy
            .as_ref()
            .map(|p| traffic_policy(Some(p), &format!("{at}.trafficPolicy"), &mut r));
        subsets.push(Subset {
            name: s.name.clone(),
            labels: s.labels.clone(),
            traffic_policy: own.filter(|p| !p.is_empty()),
        });
    }
    Some(l7::DestinationRule {
        name: dr.metadata.name.clone().unwrap_or_default(),
        namespace,
        host,
        traffic_policy: rule_policy,
        subsets,
    })
}

fn traffic_policy(p: Option<&objects::TrafficPolicy>, at: &str, r: &mut Report<'_>) -> TrafficPolicy {
    let Some(p) = p else { return TrafficPolicy::default() };
    let (load_balancer, connection_pool, outlier_detection) =
        policy_fields(&p.load_balancer, &p.connection_pool, &p.outlier_detection, at, r);
    TrafficPolicy { load_balancer, connection_pool, outlier_detection, port_level: port_level(p, at, r) }
}

type PolicyFields = (Option<LoadBalancer>, Option<ConnectionPool>, Option<OutlierDetection>);

fn policy_fields(
    lb: &Option<objects::LoadBalancer>,
    pool: &Option<objects::ConnectionPool>,
    outlier: &Option<objects::OutlierDetection>,
    at: &str,
    r: &mut Report<'_>,
) -> PolicyFields {
    (
        lb.as_ref().and_then(|lb| load_balancer(lb, &format!("{at}.loadBalancer"), r)),
        pool.as_ref().and_then(|c| connection_pool(c, &format!("{at}.connectionPool"), r)),
        outlier.as_ref().map(|o| outlier_detection(o, &format!("{at}.outlierDetection"), r)),
    )
}

/// `portLevelSettings`: one policy per service port (it replaces the policy it sits in on that
/// port, without inheriting from it — an entry with no fields resets the port to defaults).
fn port_level(p: &objects::TrafficPolicy, at: &str, r: &mut Report<'_>) -> Vec<PortTrafficPolicy> {
    let mut out: Vec<PortTrafficPolicy> = Vec::new();
    for (i, entry) in p.port_level_settings.iter().enumerate() {
        let at = format!("{at}.portLevelSettings[{i}]");
        let number = entry.port.as_ref().and_then(|s| s.number);
        let Some(port) = number.and_then(port_number) else {
            let what = match number {
                None => "is missing".to_string(),
                Some(n) => format!("{n} is not a port number"),
            };
            r.error(
                codes::INVALID_VALUE,
                format!("{at}.port.number"),
                format!("{what}; the entry is dropped"),
            );
            continue;
        };
        if out.iter().any(|o| o.port == port) {
            r.error(
                codes::INVALID_VALUE,
                format!("{at}.port.number"),
                format!("port {port} has settings twice; the first are kept"),
            );
            continue;
        }
        let (load_balancer, connection_pool, outlier_detection) =
            policy_fields(&entry.load_balancer, &entry.connection_pool, &entry.outlier_detection, &at, r);
        out.push(PortTrafficPolicy { port, load_balancer, connection_pool, outlier_detection });
    }
    out
}

fn load_balancer(lb: &objects::LoadBalancer, at: &str, r: &mut Report<'_>) -> Option<LoadBalancer> {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        r.error(codes::INVALID_VALUE, at, "sets both simple and consistentHash; consistentHash is used");
    }
    if let Some(hash) = &lb.consistent_hash {
        let at = format!("{at}.consistentHash");
        let key = if let Some(header) = &hash.http_header_name {
            HashKey::HttpHeaderName(header.to_ascii_lowercase())
        } else if let Some(cookie) = &hash.http_cookie {
            if cookie.name.is_empty() {
                r.error(
                    codes::INVALID_VALUE,
                    format!("{at}.httpCookie.name"),
                    "is empty; the load balancer setting is ignored",
                );
                return None;
            }
            let ttl_ms = match cookie.ttl.as_deref().map(duration_ms) {
                None => None,
                Some(Ok(ms)) => Some(ms),
                Some(Err(e)) => {
                    r.error(
                        codes::INVALID_VALUE,
                        format!("{at}.httpCookie.ttl"),
                        format!("{e}; no cookie is generated for requests without one"),
                    );
                    None
                }
            };
            HashKey::HttpCookie(HashCookie { name: cookie.name.clone(), path: cookie.path.clone(), ttl_ms })
        } else if hash.use_source_ip == Some(true) {
            HashKey::UseSourceIp
        } else if let Some(name) = &hash.http_query_parameter_name {
            if name.is_empty() {
                r.error(
                    codes::INVALID_VALUE,
                    format!("{at}.httpQueryParameterName"),
                    "is empty; the load balancer setting is ignored",
                );
                return None;
            }
            HashKey::HttpQueryParameterName(name.clone())
        } else {
            r.error(codes::INVALID_VALUE, at, "names no hash key; the load balancer setting is ignored");
            return None;
        };
        return Some(LoadBalancer::ConsistentHash(key));
    }
    let simple = lb.simple.as_deref()?;
    let at = format!("{at}.simple");
    Some(LoadBalancer::Simple(match simple {
        "ROUND_ROBIN" => SimpleLb::RoundRobin,
        "LEAST_REQUEST" | "LEAST_CONN" => SimpleLb::LeastRequest,
        "RANDOM" => SimpleLb::Random,
        "PASSTHROUGH" | "UNSPECIFIED" => {
            r.warning(
                codes::UNSUPPORTED,
                at,
                format!("{simple} is not supported; ignored (the waypoint's default balancing applies)"),
            );
            return None;
        }
        other => {
            r.error(codes::INVALID_VALUE, at, format!("{other:?} is not a load balancer; ignored"));
            return None;
        }
    }))
}

/// Istio's limits: 0 (or unset) means "no limit", negative values are refused.
fn limit(value: Option<i64>, at: String, r: &mut Report<'_>) -> Option<u32> {
    match value? {
        0 => None,
        n => u32::try_from(n)
            .map_err(|_| r.error(codes::INVALID_VALUE, at, format!("{n} is not a count; no limit is set")))
            .ok(),
    }
}

fn connection_pool(c: &objects::ConnectionPool, at: &str, r: &mut Report<'_>) -> Option<ConnectionPool> {
    let http = c.http.clone().unwrap_or_default();
    report_unimplemented(c, at, r);
    let pool = ConnectionPool {
        max_connections: limit(
            c.tcp.as_ref().and_then(|t| t.max_connections),
            format!("{at}.tcp.maxConnections"),
            r,
        ),
        http1_max_pending_requests: limit(
            http.http1_max_pending_requests,
            format!("{at}.http.http1MaxPendingRequests"),
            r,
        ),
        http2_max_requests: limit(http.http2_max_requests, format!("{at}.http.http2MaxRequests"), r),
        max_requests_per_connection: limit(
            http.max_requests_per_connection,
            format!("{at}.http.maxRequestsPerConnection"),
            r,
        ),
        max_retries: limit(http.max_retries, format!("{at}.http.maxRetries"), r),
        max_concurrent_streams: limit(
            http.max_concurrent_streams,
            format!("{at}.http.maxConcurrentStreams"),
            r,
        ),
        connect_timeout_ms: c.tcp.as_ref().and_then(|t| t.connect_timeout.as_deref()).and_then(|text| {
            match duration_ms(text) {
                Ok(0) | Err(_) => {
                    let why =
                        "is not a positive duration (such as 10s or 500ms); the waypoint's default applies";
                    r.error(
                        codes::INVALID_VALUE,
                        format!("{at}.tcp.connectTimeout"),
                        format!("{text:?} {why}"),
                    );
                    None
                }
                Ok(ms) => Some(ms),
            }
        }),
        idle_timeout_ms: http.idle_timeout.as_deref().and_then(|text| match duration_ms(text) {
            Ok(ms) => Some(ms),
            Err(_) => {
                let why = "is not a duration (such as 1h, 30s, or 0s for never); the default of 1h applies";
                r.error(codes::INVALID_VALUE, format!("{at}.http.idleTimeout"), format!("{text:?} {why}"));
                None
            }
        }),
    };
    (pool != ConnectionPool::default()).then_some(pool)
}

/// Connection pool fields the waypoint does not act on: reported, so that none is lost without
/// a word.
fn report_unimplemented(c: &objects::ConnectionPool, at: &str, r: &mut Report<'_>) {
    if let Some(tcp) = &c.tcp {
        for (field, set) in [
            ("tcpKeepalive", tcp.tcp_keepalive.is_some()),
            ("maxConnectionDuration", tcp.max_connection_duration.is_some()),
            ("idleTimeout", tcp.idle_timeout.is_some()),
        ] {
            if set {
                r.warning(
                    codes::UNSUPPORTED,
                    format!("{at}.tcp.{field}"),
                    "is not implemented by waypoints; ignored",
                );
            }
        }
    }
    let upgrade = c.http.as_ref().and_then(|h| h.h2_upgrade_policy.as_deref());
    if upgrade == Some("UPGRADE") {
        r.warning(
            codes::UNSUPPORTED,
            format!("{at}.http.h2UpgradePolicy"),
            "UPGRADE is not implemented: the waypoint speaks the client's protocol to upstreams; ignored",
        );
    }
}

/// Istio's defaults: ejection after 5 consecutive 5xx (0 disables it), gateway errors not
/// counted unless set, a sweep every 10s, ejections of 30s times the count, at most 10% of
/// endpoints ejected, ejection active whatever the share of healthy endpoints.
fn outlier_detection(o: &objects::OutlierDetection, at: &str, r: &mut Report<'_>) -> OutlierDetection {
    let threshold = |value: Option<i64>, default: Option<u32>, field: &str, r: &mut Report<'_>| match value {
        None => default,
        Some(0) => None,
        Some(n) => u32::try_from(n).map(Some).unwrap_or_else(|_| {
            r.error(
                codes::INVALID_VALUE,
                format!("{at}.{field}"),
                format!("{n} is not a count; the default is used"),
            );
            default
        }),
    };
    let percent = |value: Option<i64>, default: u32, field: &str, r: &mut Report<'_>| match value {
        None => default,
        Some(n @ 0..=100) => n as u32,
        Some(n) => {
            r.error(
                codes::INVALID_VALUE,
                format!("{at}.{field}"),
                format!("{n} is not a percentage (0 to 100); {default} is used"),
            );
            default
        }
    };
    let duration =
        |value: Option<&str>, default: u64, field: &str, r: &mut Report<'_>| match value.map(duration_ms) {
            None | Some(Ok(0)) => default,
            Some(Ok(ms)) => ms,
            Some(Err(e)) => {
                r.error(codes::INVALID_VALUE, format!("{at}.{field}"), format!("{e}; {default}ms is used"));
                default
            }
        };
    OutlierDetection {
        consecutive_5xx_errors: threshold(o.consecutive_5xx_errors, Some(5), "consecutive5xxErrors", r),
        consecutive_gateway_errors: threshold(
            o.consecutive_gateway_errors,
            None,
            "consecutiveGatewayErrors",
            r,
        ),
        interval_ms: duration(o.interval.as_deref(), 10_000, "interval", r),
        base_ejection_time_ms: duration(o.base_ejection_time.as_deref(), 30_000, "baseEjectionTime", r),
        max_ejection_percent: percent(o.max_ejection_percent, 10, "maxEjectionPercent", r),
        min_health_percent: percent(o.min_health_percent, 0, "minHealthPercent", r),
    }
}
