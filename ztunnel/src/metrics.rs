//! Prometheus metrics with Istio's names and labels, so existing dashboards and alerts work:
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total` (response direction, server to client) and
//! `istio_tcp_received_bytes_total` (request direction), reported by the source side
//! (`reporter="source"`) and the destination side (`reporter="destination"`).

use std::{collections::BTreeMap, fmt::Write as _, sync::Mutex};

use warren_core::{identity::SpiffeId, model::Workload};

/// `connection_security_policy` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Security {
    MutualTls,
    None,
    Unknown,
}

impl Security {
    fn as_str(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::None => "none",
            Security::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reporter {
    Source,
    Destination,
}

/// One side of a connection as the labels describe it.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

impl Peer {
    pub fn of(workload: &Workload, trust_domain: &str) -> Self {
        let label = |k: &str| workload.labels.get(k).cloned();
        Peer {
            workload: workload.name.clone(),
            namespace: workload.namespace.clone(),
            principal: workload.identity(trust_domain).to_string(),
            canonical_service: label("service.istio.io/canonical-name")
                .or_else(|| label("app"))
                .unwrap_or_else(|| workload.name.clone()),
            canonical_revision: label("service.istio.io/canonical-revision")
                .or_else(|| label("version"))
                .unwrap_or_else(|| "latest".into()),
        }
    }

    /// What is known of a peer from its certificate alone.
    pub fn from_identity(id: &SpiffeId) -> Self {
        Peer { namespace: id.namespace.clone(), principal: id.to_string(), ..Self::unknown() }
    }

    pub fn unknown() -> Self {
        let u = || "unknown".to_string();
        Peer {
            workload: u(),
            namespace: u(),
            principal: u(),
            canonical_service: u(),
            canonical_revision: u(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    /// `destination_service`: the host the client asked for (the service name, or the IP).
    pub destination_service: String,
    pub security: Security,
    /// Envoy-style response flags: `-` for none, `UF` upstream connect failure, `UAEX`
    /// denied by policy.
    pub response_flags: &'static str,
}

#[derive(Default, Clone, Copy)]
struct Counters {
    opened: u64,
    closed: u64,
    sent: u64,
    received: u64,
}

/// A metric family: name, help text, and which counter it shows.
type Family = (&'static str, &'static str, fn(&Counters) -> u64);

#[derive(Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<ConnectionLabels, Counters>>,
}

impl Metrics {
    pub fn opened(&self, labels: &ConnectionLabels) {
        self.series.lock().expect("poisoned").entry(labels.clone()).or_default().opened += 1;
    }

    /// A connection refused or failed before any byte moved: opened and closed at once, under
    /// its failure flag.
    pub fn failed(&self, labels: &ConnectionLabels) {
        self.opened(labels);
        self.closed(labels, 0, 0);
    }

    /// `sent`: server to client; `received`: client to server.
    pub fn closed(&self, labels: &ConnectionLabels, sent: u64, received: u64) {
        let mut series = self.series.lock().expect("poisoned");
        let c = series.entry(labels.clone()).or_default();
        c.closed += 1;
        c.sent += sent;
        c.received += received;
    }

    /// Connections opened and not yet closed (each counted once per reporting side).
    pub fn open_connections(&self) -> u64 {
        let series = self.series.lock().expect("poisoned");
        series.values().map(|c| c.opened.saturating_sub(c.closed)).sum()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let series = self.series.lock().expect("poisoned");
        let mut out = String::new();
        let families: [Family; 4] = [
            ("istio_tcp_connections_opened_total", "Total TCP connections opened", |c| c.opened),
            ("istio_tcp_connections_closed_total", "Total TCP connections closed", |c| c.closed),
            ("istio_tcp_sent_bytes_total", "Bytes sent during response (server to client)", |c| c.sent),
            ("istio_tcp_received_bytes_total", "Bytes received during request (client to server)", |c| {
                c.received
            }),
        ];
        for (name, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, counters) in series.iter() {
                let _ = writeln!(out, "{name}{{{}}} {}", render_labels(labels), value(counters));
            }
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn render_labels(l: &ConnectionLabels) -> String {
    let reporter = match l.reporter {
        Reporter::Source => "source",
        Reporter::Destination => "destination",
    };
    let (s, d) = (&l.source, &l.destination);
    let pairs: [(&str, &str); 20] = [
        ("reporter", reporter),
        ("source_workload", &s.workload),
        ("source_workload_namespace", &s.namespace),
        ("source_principal", &s.principal),
        ("source_app", &s.canonical_service),
        ("source_version", &s.canonical_revision),
        ("source_canonical_service", &s.canonical_service),
        ("source_canonical_revision", &s.canonical_revision),
        ("source_cluster", "Kubernetes"),
        ("destination_workload", &d.workload),
        ("destination_workload_namespace", &d.namespace),
        ("destination_principal", &d.principal),
        ("destination_app", &d.canonical_service),
        ("destination_version", &d.canonical_revision),
        ("destination_service", &l.destination_service),
        ("destination_canonical_service", &d.canonical_service),
        ("destination_canonical_revision", &d.canonical_revision),
        ("destination_cluster", "Kubernetes"),
        ("request_protocol", "tcp"),
        ("response_flags", l.response_flags),
    ];
    let mut out = String::new();
    for (k, v) in pairs {
        let _ = write!(out, "{k}=\"{}\",", escape(v));
    }
    let _ = write!(out, "connection_security_policy=\"{}\"", l.security.as_str());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_istio_names_and_labels() {
        let m = Metrics::default();
        let labels = ConnectionLabels {
            reporter: Reporter::Destination,
            source: Peer::from_identity(&"spiffe://cluster.local/ns/shop/sa/checkout".parse().unwrap()),
            destination: Peer::unknown(),
            destination_service: "10.0.0.1".into(),
            security: Security::MutualTls,
            response_flags: "-",
        };
        m.opened(&labels);
        m.closed(&labels, 100, 7);
        let text = m.render();
        assert!(text.contains("# TYPE istio_tcp_sent_bytes_total counter"));
        let sent = text.lines().find(|l| l.starts_with("istio_tcp_sent_bytes_total{")).unwrap();
        assert!(sent.ends_with(" 100"), "{sent}");
        assert!(sent.contains("reporter=\"destination\""));
        assert!(sent.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/checkout\""));
        assert!(sent.contains("connection_security_policy=\"mutual_tls\""));
        assert!(text.lines().any(|l| l.starts_with("istio_tcp_received_bytes_total{") && l.ends_with(" 7")));
    }
}
