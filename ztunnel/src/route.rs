//! Where an outbound connection goes, decided from its original destination alone: a pure
//! function over the workload index, so it is unit-tested without sockets.

use std::{
    collections::HashMap,
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
    /// A service VIP with nobody behind it.
    NoEndpoints { service: Arc<Service> },
}

/// Round-robin position per service (or waypoint).
#[derive(Default)]
pub struct RoundRobin(Mutex<HashMap<String, usize>>);

impl RoundRobin {
    fn pick<'a, T>(&self, key: &str, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        let mut positions = self.0.lock().expect("poisoned");
        let n = positions.entry(key.to_string()).or_insert(0);
        let item = &items[*n % items.len()];
        *n = n.wrapping_add(1);
        Some(item)
    }
}

pub fn resolve(index: &WorkloadIndex, original_dst: SocketAddr, rr: &RoundRobin) -> Route {
    let ip = original_dst.ip().to_canonical();
    if let Some(service) = index.service_by_vip(ip) {
        if let Some((namespace, waypoint)) = service.waypoint_ref() {
            // The waypoint sees the VIP:port the client asked for.
            let waypoints = index.waypoint(namespace, waypoint);
            return match rr.pick(&format!("waypoint/{namespace}/{waypoint}"), waypoints) {
                Some(w) => Route::Hbone {
                    authority: SocketAddr::new(ip, original_dst.port()),
                    hbone_ip: w.ip_like(ip).expect("filtered to workloads with IPs"),
                    peer: w.clone(),
                    service: Some(service.clone()),
                },
                None => Route::NoEndpoints { service: service.clone() },
            };
        }
        let endpoints = index.endpoints(service);
        let Some(endpoint) = rr.pick(&service.hostname(), &endpoints) else {
            return Route::NoEndpoints { service: service.clone() };
        };
        let port = service.target_port(original_dst.port()).unwrap_or(original_dst.port());
        let dst = SocketAddr::new(endpoint.ip_like(ip).expect("filtered to workloads with IPs"), port);
        return if endpoint.enrolled {
            Route::Hbone {
                authority: dst,
                hbone_ip: dst.ip(),
                peer: endpoint.clone(),
                service: Some(service.clone()),
            }
        } else {
            Route::Passthrough { dst, service: Some(service.clone()) }
        };
    }
    match index.by_ip(ip) {
        Some(w) if w.enrolled => Route::Hbone {
            authority: SocketAddr::new(ip, original_dst.port()),
            hbone_ip: ip,
            peer: w.clone(),
            service: None,
        },
        _ => Route::Passthrough { dst: SocketAddr::new(ip, original_dst.port()), service: None },
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
            Route::NoEndpoints { .. }
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
