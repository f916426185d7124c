//! Where an outbound connection goes, decided from its original destination alone: a pure
//! function over the workload index, so it is unit-tested without sockets.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use warren_core::model::{Service, Workload, WorkloadIndex};

#[derive(Clone, Debug, PartialEq)]
pub enum Route {
    /// HBONE to `peer`'s 15008 at `hbone_ip`, CONNECT `authority`.
    Hbone {
        authority: SocketAddr,
        hbone_ip: std::net::IpAddr,
        peer: Arc<Workload>,
        service: Option<Arc<Service>>,
    },
    /// Plain TCP to `dst` (a destination outside the mesh).
    Passthrough { dst: SocketAddr, service: Option<Arc<Service>> },
    /// Nobody to send it to: a service VIP with no endpoint, or a waypoint with no pod.
    Refused { service: Option<Arc<Service>>, reason: String },
}

/// Round-robin position per service (or waypoint), kept across config updates so a push
/// does not send the next connections back to the first endpoint; `prune` drops the positions
/// of services and waypoints that are gone, so the map stays as large as the mesh is now.
#[derive(Default)]
pub struct RoundRobin(Mutex<HashMap<String, usize>>);

impl RoundRobin {
    fn pick<'a, T>(&self, key: &str, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        let mut positions = self.0.lock().expect("poisoned");
        let n = match positions.get_mut(key) {
            Some(n) => n,
            None => positions.entry(key.to_string()).or_insert(0),
        };
        let item = &items[*n % items.len()];
        *n = n.wrapping_add(1);
        Some(item)
    }

    /// Forgets the positions of services and waypoints that `index` no longer has.
    pub fn prune(&self, index: &WorkloadIndex) {
        let live: HashSet<String> = index
            .services()
            .map(|s| s.hostname())
            .chain(index.waypoint_names().map(|(namespace, name)| waypoint_key(namespace, name)))
            .collect();
        self.0.lock().expect("poisoned").retain(|key, _| live.contains(key));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().expect("poisoned").len()
    }
}

fn waypoint_key(namespace: &str, name: &str) -> String {
    format!("waypoint/{namespace}/{name}")
}

pub fn resolve(index: &WorkloadIndex, original_dst: SocketAddr, rr: &RoundRobin) -> Route {
    let ip = original_dst.ip().to_canonical();
    if let Some(service) = index.service_by_vip(ip) {
        if let Some((namespace, waypoint)) = service.waypoint_ref() {
            // The waypoint sees the VIP:port the client asked for.
            let authority = SocketAddr::new(ip, original_dst.port());
            return via_waypoint(index, rr, (namespace, waypoint), authority, Some(service), || {
                format!("service {}", service.hostname())
            });
        }
        let endpoints = index.endpoints(service);
        let Some(endpoint) = rr.pick(&service.hostname(), &endpoints) else {
            let reason = format!("service {} has no ready endpoints", service.hostname());
            return Route::Refused { service: Some(service.clone()), reason };
        };
        let port = service.target_port(original_dst.port()).unwrap_or(original_dst.port());
        let dst = SocketAddr::new(endpoint.ip_like(ip).expect("filtered to workloads with IPs"), port);
        return to_workload(index, rr, endpoint, dst, Some(service));
    }
    match index.by_ip(ip) {
        Some(w) => to_workload(index, rr, w, SocketAddr::new(ip, original_dst.port()), None),
        None => Route::Passthrough { dst: SocketAddr::new(ip, original_dst.port()), service: None },
    }
}

/// To the pod `workload` at `dst`: through its own waypoint if it has one (Istio's workload
/// waypoints, for traffic to its IP, which the waypoint sees as the authority), else HBONE
/// straight to it if it is in the mesh, else plain TCP.
fn to_workload(
    index: &WorkloadIndex,
    rr: &RoundRobin,
    workload: &Arc<Workload>,
    dst: SocketAddr,
    service: Option<&Arc<Service>>,
) -> Route {
    if !workload.enrolled {
        return Route::Passthrough { dst, service: service.cloned() };
    }
    if let Some(waypoint) = &workload.waypoint {
        return via_waypoint(index, rr, (&waypoint.namespace, &waypoint.name), dst, service, || {
            format!("pod {workload}")
        });
    }
    Route::Hbone { authority: dst, hbone_ip: dst.ip(), peer: workload.clone(), service: service.cloned() }
}

/// HBONE to one of the waypoint's pods, CONNECT `authority`; `what` names the destination
/// when the waypoint has no pod to send it to.
fn via_waypoint(
    index: &WorkloadIndex,
    rr: &RoundRobin,
    (namespace, name): (&str, &str),
    authority: SocketAddr,
    service: Option<&Arc<Service>>,
    what: impl FnOnce() -> String,
) -> Route {
    let waypoints = index.waypoint(namespace, name);
    match rr.pick(&waypoint_key(namespace, name), waypoints) {
        Some(w) => Route::Hbone {
            authority,
            hbone_ip: w.ip_like(authority.ip()).expect("filtered to workloads with IPs"),
            peer: w.clone(),
            service: service.cloned(),
        },
        None => Route::Refused {
            service: service.cloned(),
            reason: format!(
                "{} uses waypoint {namespace}/{name}, which has no pod with an address (no Gateway \
                 {namespace}/{name}, or its pods are not running)",
                what()
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use warren_core::model::{NodeConfig, ServicePort, WAYPOINT_LABEL};

    use super::*;

    fn workload(uid: &str, ips: &[&str], enrolled: bool) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "shop".into(),
            service_account: "default".into(),
            node: "n".into(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            enrolled,
            labels: Default::default(),
            waypoint: None,
        }
    }

    fn service(endpoints: &[&str], waypoint: Option<&str>) -> Service {
        Service {
            name: "payment".into(),
            namespace: "shop".into(),
            vips: vec!["10.96.0.10".parse().unwrap(), "fd00:96::10".parse().unwrap()],
            ports: vec![ServicePort { port: 80, target_port: 8080 }],
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            waypoint: waypoint.map(str::to_string),
            waypoint_namespace: None,
        }
    }

    fn index(workloads: Vec<Workload>, services: Vec<Service>) -> WorkloadIndex {
        WorkloadIndex::new(&NodeConfig { workloads, services, ..Default::default() })
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_vip_spreads_over_its_endpoints_with_the_target_port() {
        let idx = index(
            vec![workload("a", &["10.1.0.1", "fd00:1::1"], true), workload("b", &["10.2.0.1"], false)],
            vec![service(&["a", "b", "gone"], None)],
        );
        let rr = RoundRobin::default();
        let first = resolve(&idx, addr("10.96.0.10:80"), &rr);
        let second = resolve(&idx, addr("10.96.0.10:80"), &rr);
        let third = resolve(&idx, addr("10.96.0.10:80"), &rr);
        assert!(
            matches!(&first, Route::Hbone { authority, hbone_ip, .. } if *authority == addr("10.1.0.1:8080") && hbone_ip.to_string() == "10.1.0.1")
        );
        assert!(
            matches!(&second, Route::Passthrough { dst, .. } if *dst == addr("10.2.0.1:8080")),
            "{second:?}"
        );
        assert_eq!(first, third, "round robin wraps");
        // The IPv6 VIP picks the endpoint's IPv6 address.
        let v6 = resolve(&idx, addr("[fd00:96::10]:80"), &RoundRobin::default());
        assert!(matches!(v6, Route::Hbone { authority, .. } if authority == addr("[fd00:1::1]:8080")));
    }

    #[test]
    fn no_endpoints_is_said_not_guessed() {
        let idx = index(vec![], vec![service(&[], None)]);
        assert!(matches!(
            resolve(&idx, addr("10.96.0.10:80"), &RoundRobin::default()),
            Route::Refused { reason, .. } if reason == "service payment.shop.svc.cluster.local has no ready endpoints"
        ));
    }

    #[test]
    fn a_service_with_a_waypoint_goes_to_the_waypoint_with_the_vip_as_authority() {
        let mut wp = workload("wp", &["10.3.0.1"], true);
        wp.labels.insert(WAYPOINT_LABEL.into(), "shop-waypoint".into());
        let idx =
            index(vec![wp, workload("a", &["10.1.0.1"], true)], vec![service(&["a"], Some("shop-waypoint"))]);
        match resolve(&idx, addr("10.96.0.10:80"), &RoundRobin::default()) {
            Route::Hbone { authority, hbone_ip, peer, .. } => {
                assert_eq!(authority, addr("10.96.0.10:80"));
                assert_eq!(hbone_ip.to_string(), "10.3.0.1");
                assert_eq!(peer.uid, "wp");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pod_with_a_workload_waypoint_is_reached_through_it_by_ip_and_through_its_services() {
        let mut wp = workload("wp", &["10.3.0.1"], false);
        wp.labels.insert(WAYPOINT_LABEL.into(), "db-waypoint".into());
        let mut db = workload("db-0", &["10.1.0.1"], true);
        db.waypoint =
            Some(warren_core::model::WaypointRef { namespace: "shop".into(), name: "db-waypoint".into() });
        let idx = index(vec![wp, db.clone()], vec![service(&["db-0"], None)]);
        let rr = RoundRobin::default();
        for (dst, authority) in [("10.1.0.1:5432", "10.1.0.1:5432"), ("10.96.0.10:80", "10.1.0.1:8080")] {
            match resolve(&idx, addr(dst), &rr) {
                Route::Hbone { authority: a, hbone_ip, peer, .. } => {
                    assert_eq!(a, addr(authority), "{dst}");
                    assert_eq!(
                        (hbone_ip.to_string().as_str(), peer.uid.as_str()),
                        ("10.3.0.1", "wp"),
                        "{dst}"
                    );
                }
                other => panic!("{dst}: {other:?}"),
            }
        }
        // Without a waypoint pod: refused, naming the pod and its waypoint.
        let idx = index(vec![db], vec![]);
        match resolve(&idx, addr("10.1.0.1:5432"), &rr) {
            Route::Refused { reason, .. } => {
                assert!(reason.starts_with("pod shop/db-0 uses waypoint shop/db-waypoint"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn round_robin_positions_outlive_a_config_update_but_not_their_service() {
        let mut wp = workload("wp", &["10.3.0.1"], true);
        wp.labels.insert(WAYPOINT_LABEL.into(), "shop-waypoint".into());
        let (a, b) = (workload("a", &["10.1.0.1"], true), workload("b", &["10.1.0.2"], true));
        let mut other = service(&["a"], Some("shop-waypoint"));
        other.name = "cart".into();
        other.vips = vec!["10.96.0.20".parse().unwrap()];
        let both = index(vec![wp, a.clone(), b.clone()], vec![service(&["a", "b"], None), other]);
        let rr = RoundRobin::default();
        let peer = |idx: &WorkloadIndex, dst: &str| match resolve(idx, addr(dst), &rr) {
            Route::Hbone { peer, .. } => peer.uid.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(peer(&both, "10.96.0.10:80"), "a");
        assert_eq!(peer(&both, "10.96.0.20:80"), "wp");
        assert_eq!(rr.len(), 2, "payment and the waypoint");
        // The same services in a new config: payment's next connection goes on to b.
        rr.prune(&both);
        assert_eq!(peer(&both, "10.96.0.10:80"), "b");
        // cart and its waypoint are gone: their position goes with them.
        let without_cart = index(vec![a, b], vec![service(&["a", "b"], None)]);
        rr.prune(&without_cart);
        assert_eq!(rr.len(), 1);
        assert_eq!(peer(&without_cart, "10.96.0.10:80"), "a");
    }

    #[test]
    fn pod_ips_go_direct_by_enrollment() {
        let idx =
            index(vec![workload("a", &["10.1.0.1"], true), workload("b", &["10.2.0.1"], false)], vec![]);
        let rr = RoundRobin::default();
        assert!(
            matches!(resolve(&idx, addr("10.1.0.1:9000"), &rr), Route::Hbone { authority, .. } if authority == addr("10.1.0.1:9000"))
        );
        assert!(matches!(resolve(&idx, addr("10.2.0.1:9000"), &rr), Route::Passthrough { .. }));
        assert!(matches!(resolve(&idx, addr("192.0.2.1:443"), &rr), Route::Passthrough { .. }));
    }
}
