//! One node: a node netns with a bridge, and pods (a netns each) joined to it by veths, with
//! IPv4 and IPv6 addresses. Dropping it removes the namespaces (and with them the veths).

use std::net::IpAddr;

use warren_core::model::Workload;

use crate::{netns::Netns, unique_name};

pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub ipv4: IpAddr,
    pub ipv6: IpAddr,
}

impl Pod {
    /// The pod as a workload of `node` running as ServiceAccount `sa`.
    pub fn workload_as(&self, node: &str, enrolled: bool, sa: &str) -> Workload {
        Workload { service_account: sa.into(), ..self.workload(node, enrolled) }
    }

    /// The pod as a workload of `node`, enrolled or not.
    pub fn workload(&self, node: &str, enrolled: bool) -> Workload {
        Workload {
            uid: self.name.clone(),
            name: self.name.clone(),
            namespace: "default".into(),
            service_account: "default".into(),
            node: node.into(),
            ips: vec![self.ipv4, self.ipv6],
            enrolled,
            labels: Default::default(),
            waypoint: None,
        }
    }
}

pub struct Node {
    pub name: String,
    pub ns: Netns,
    /// 10.<a>.<b>.0/24 and fd00:<a>:<b>::/64, unique per node in this process.
    subnet: (u8, u8),
    next_host: u8,
}

/// A /24 (and /64) no other node or underlay of this process uses: 10.200-249.x.0/24, far
/// from anything the machine itself uses.
fn next_subnet() -> (u8, u8) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT_SUBNET: AtomicU32 = AtomicU32::new(0);
    let n = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed);
    (200 + (std::process::id() % 50) as u8, (n % 250) as u8)
}

/// Nodes joined by an underlay (a bridge in a netns of its own), with routes to each other's
/// pod subnets: the shape of a real cluster network.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// Each node's address on the underlay, by node index.
    pub underlay_ips: Vec<IpAddr>,
    underlay: Netns,
}

impl Cluster {
    pub fn new(node_count: usize) -> Self {
        Self::with_nodes((0..node_count).map(|_| Node::new()).collect())
    }

    /// Nodes with these names (ztunnel's `--node`, what pods' `nodeName` says); their network
    /// namespaces still get unique names.
    pub fn named(names: &[String]) -> Self {
        Self::with_nodes(names.iter().map(|n| Node::named(n)).collect())
    }

    fn with_nodes(nodes: Vec<Node>) -> Self {
        let (a, b) = next_subnet();
        let underlay = Netns::new(&unique_name("wu"));
        underlay.ip(&["link", "add", "br0", "type", "bridge"]);
        underlay.ip(&["link", "set", "br0", "up"]);
        let underlay_ip = |i: usize| (format!("10.{a}.{b}.{}", i + 2), format!("fd00:{a}:{b}::{}", i + 2));
        for (i, node) in nodes.iter().enumerate() {
            let link = format!("u{i}");
            underlay.ip(&[
                "link",
                "add",
                &link,
                "type",
                "veth",
                "peer",
                "name",
                "uplink",
                "netns",
                &node.ns.name,
            ]);
            underlay.ip(&["link", "set", &link, "master", "br0", "up"]);
            let (v4, v6) = underlay_ip(i);
            node.ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "uplink"]);
            node.ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "uplink", "nodad"]);
            node.ns.ip(&["link", "set", "uplink", "up"]);
            let forwarding =
                "echo 1 > /proc/sys/net/ipv4/ip_forward && echo 1 > /proc/sys/net/ipv6/conf/all/forwarding";
            crate::sh("ip", &["netns", "exec", &node.ns.name, "sh", "-c", forwarding]);
        }
        for (i, node) in nodes.iter().enumerate() {
            for (j, other) in nodes.iter().enumerate() {
                if i != j {
                    let (v4, v6) = underlay_ip(j);
                    let (oa, ob) = other.subnet;
                    node.ns.ip(&["route", "add", &format!("10.{oa}.{ob}.0/24"), "via", &v4]);
                    node.ns.ip(&["-6", "route", "add", &format!("fd00:{oa}:{ob}::/64"), "via", &v6]);
                }
            }
        }
        let underlay_ips =
            (0..nodes.len()).map(|i| underlay_ip(i).0.parse().expect("an IPv4 address")).collect();
        Cluster { nodes, underlay_ips, underlay }
    }

    /// Keeps the underlay alive as long as the cluster (its name, for debugging).
    pub fn underlay_name(&self) -> &str {
        &self.underlay.name
    }
}

impl Node {
    pub fn new() -> Self {
        Self::named(&unique_name("wn"))
    }

    pub fn named(name: &str) -> Self {
        let subnet = next_subnet();
        let name = name.to_string();
        let ns = Netns::new(&unique_name("wn"));
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["addr", "add", &format!("10.{}.{}.1/24", subnet.0, subnet.1), "dev", "br0"]);
        ns.ip(&["addr", "add", &format!("fd00:{}:{}::1/64", subnet.0, subnet.1), "dev", "br0", "nodad"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Node { name, ns, subnet, next_host: 2 }
    }

    /// The node's own address on its pod bridge.
    pub fn ipv4(&self) -> IpAddr {
        format!("10.{}.{}.1", self.subnet.0, self.subnet.1).parse().unwrap()
    }

    pub fn add_pod(&mut self) -> Pod {
        let host = self.next_host;
        self.next_host += 1;
        let name = unique_name("wp");
        let ns = Netns::new(&name);
        let (a, b) = self.subnet;
        let ipv4: IpAddr = format!("10.{a}.{b}.{host}").parse().unwrap();
        let ipv6: IpAddr = format!("fd00:{a}:{b}::{host}").parse().unwrap();
        // The node end is named after the pod netns (unique, and short enough).
        self.ns.ip(&["link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", &ns.name]);
        self.ns.ip(&["link", "set", &name, "master", "br0", "up"]);
        ns.ip(&["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"]);
        ns.ip(&["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "default", "via", &format!("10.{a}.{b}.1")]);
        ns.ip(&["-6", "route", "add", "default", "via", &format!("fd00:{a}:{b}::1")]);
        Pod { name, ns, ipv4, ipv6 }
    }
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}
