//! Istio's HTTP metrics as a waypoint reports them (`reporter="waypoint"`):
//! `istio_requests_total` and `istio_request_duration_milliseconds` with the source and
//! destination workload, namespace, principal, version, service, protocol, response code,
//! gRPC status and flags, so the dashboards people already have work.

use std::{
    borrow::Cow,
    fmt::Write as _,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex, OnceLock},
};

use warren_core::{FastMap, FastSet, identity::SpiffeId, model::Workload};

/// Istio's default duration buckets (milliseconds).
const BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
    300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// One side of a request as the labels describe it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Side {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
}

impl Side {
    pub fn unknown() -> Self {
        let u = || "unknown".to_string();
        Side { workload: u(), namespace: u(), principal: u(), app: u(), version: u() }
    }

    pub fn of(workload: &Workload, trust_domain: &str) -> Self {
        let label = |k: &str| workload.labels.get(k).cloned();
        Side {
            workload: workload.name.clone(),
            namespace: workload.namespace.clone(),
            principal: workload.identity(trust_domain).to_string(),
            app: label("service.istio.io/canonical-name")
                .or_else(|| label("app"))
                .unwrap_or_else(|| workload.name.clone()),
            version: label("service.istio.io/canonical-revision")
                .or_else(|| label("version"))
                .unwrap_or_else(|| "latest".into()),
        }
    }

    pub fn from_identity(id: &SpiffeId) -> Self {
        Side { namespace: id.namespace.clone(), principal: id.to_string(), ..Side::unknown() }
    }
}

/// The destination service as the labels name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceLabels {
    /// The service's FQDN.
    pub hostname: String,
    pub name: String,
    pub namespace: String,
}

/// A label value interned by [`Metrics`]: equal values share one allocation, so a request
/// finds its series by comparing pointers instead of a dozen strings, and builds no strings.
/// Only [`Metrics`] makes them, which is what makes pointer equality value equality.
#[derive(Debug)]
pub struct Interned<T>(Arc<T>);

impl<T> Clone for Interned<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> std::ops::Deref for Interned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> PartialEq for Interned<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<T> Eq for Interned<T> {}

impl<T> Hash for Interned<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.0).hash(state);
    }
}

/// One value per content, for the life of the process (as the series that use them).
struct Interner<T>(Mutex<FastSet<Arc<T>>>);

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<T: Hash + Eq> Interner<T> {
    fn intern(&self, value: T) -> Interned<T> {
        let mut set = self.0.lock().expect("poisoned");
        if let Some(known) = set.get(&value) {
            return Interned(known.clone());
        }
        let new = Arc::new(value);
        set.insert(new.clone());
        Interned(new)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    pub source: Interned<Side>,
    pub destination: Interned<Side>,
    pub service: Interned<ServiceLabels>,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// A gRPC call's `grpc-status` (from the response headers or trailers); none for HTTP.
    pub grpc_response_status: Option<u8>,
    pub response_flags: Cow<'static, str>,
}

/// Istio's size buckets (bytes): powers of ten.
const BUCKETS_BYTES: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// A Prometheus histogram over fixed bounds.
#[derive(Default)]
struct Histogram {
    count: u64,
    sum: f64,
    buckets: Vec<u64>,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], value: f64) {
        if self.buckets.len() != bounds.len() {
            self.buckets = vec![0; bounds.len()];
        }
        self.count += 1;
        self.sum += value;
        for (slot, bound) in self.buckets.iter_mut().zip(bounds) {
            if value <= *bound {
                *slot += 1;
            }
        }
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        for (i, bound) in bounds.iter().enumerate() {
            let n = self.buckets.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Default)]
struct Series {
    count: u64,
    duration_ms: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

#[derive(Default)]
pub struct Metrics {
    series: Mutex<FastMap<RequestLabels, Arc<Mutex<Series>>>>,
    sides: Interner<Side>,
    services: Interner<ServiceLabels>,
    unknown: OnceLock<Interned<Side>>,
}

impl Metrics {
    /// One request, once its response has ended.
    pub fn record(&self, labels: RequestLabels, duration_ms: f64, request_bytes: u64, response_bytes: u64) {
        let mut series = self.series.lock().expect("poisoned");
        let mut s = series.entry(labels).or_default().lock().expect("poisoned");
        s.count += 1;
        s.duration_ms.observe(&BUCKETS_MS, duration_ms);
        s.request_bytes.observe(&BUCKETS_BYTES, request_bytes as f64);
        s.response_bytes.observe(&BUCKETS_BYTES, response_bytes as f64);
    }

    /// `side` as a label value (built once per workload and config version: see
    /// [`crate::state::Snapshot::metric_side`]).
    pub fn side(&self, side: Side) -> Interned<Side> {
        self.sides.intern(side)
    }

    pub fn unknown_side(&self) -> Interned<Side> {
        self.unknown.get_or_init(|| self.sides.intern(Side::unknown())).clone()
    }

    pub fn service(&self, service: &warren_core::model::Service) -> Interned<ServiceLabels> {
        self.services.intern(ServiceLabels {
            hostname: service.hostname(),
            name: service.name.clone(),
            namespace: service.namespace.clone(),
        })
    }

    pub fn total(&self) -> u64 {
        self.series.lock().expect("poisoned").values().map(|s| s.lock().expect("poisoned").count).sum()
    }

    pub fn render(&self) -> String {
        // Rendered label sets, sorted so that the page reads the same from scrape to scrape.
        let series: Vec<(String, Arc<Mutex<Series>>)> = {
            let map = self.series.lock().expect("poisoned");
            let mut rendered: Vec<_> =
                map.iter().map(|(labels, s)| (render_labels(labels), s.clone())).collect();
            rendered.sort_by(|a, b| a.0.cmp(&b.0));
            rendered
        };
        let mut out = String::new();
        out.push_str("# HELP istio_requests_total Requests handled by the waypoint.\n");
        out.push_str("# TYPE istio_requests_total counter\n");
        for (labels, s) in &series {
            let count = s.lock().expect("poisoned").count;
            let _ = writeln!(out, "istio_requests_total{{{labels}}} {count}");
        }
        type Pick = fn(&Series) -> &Histogram;
        let histograms: [(&str, &str, &[f64], Pick); 3] = [
            (
                "istio_request_duration_milliseconds",
                "Request duration to the response headers.",
                &BUCKETS_MS,
                |s| &s.duration_ms,
            ),
            ("istio_request_bytes", "Request body sizes.", &BUCKETS_BYTES, |s| &s.request_bytes),
            ("istio_response_bytes", "Response body sizes.", &BUCKETS_BYTES, |s| &s.response_bytes),
        ];
        for (name, help, bounds, pick) in histograms {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} histogram");
            for (labels, s) in &series {
                pick(&s.lock().expect("poisoned")).render(&mut out, name, labels, bounds);
            }
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn render_labels(l: &RequestLabels) -> String {
    let grpc_status = l.grpc_response_status.map(|c| c.to_string()).unwrap_or_default();
    let pairs: [(&str, &str); 21] = [
        ("reporter", "waypoint"),
        ("source_workload", &l.source.workload),
        ("source_workload_namespace", &l.source.namespace),
        ("source_principal", &l.source.principal),
        ("source_app", &l.source.app),
        ("source_canonical_service", &l.source.app),
        ("source_version", &l.source.version),
        ("destination_workload", &l.destination.workload),
        ("destination_workload_namespace", &l.destination.namespace),
        ("destination_principal", &l.destination.principal),
        ("destination_app", &l.destination.app),
        ("destination_canonical_service", &l.destination.app),
        ("destination_version", &l.destination.version),
        ("destination_service", &l.service.hostname),
        ("destination_service_name", &l.service.name),
        ("destination_service_namespace", &l.service.namespace),
        ("request_protocol", l.request_protocol),
        ("response_code", &l.response_code.to_string()),
        ("grpc_response_status", &grpc_status),
        ("response_flags", &l.response_flags),
        ("connection_security_policy", "mutual_tls"),
    ];
    pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A service with nothing but its name, for label tests.
    pub(crate) fn payment_service() -> warren_core::model::Service {
        warren_core::model::Service {
            name: "payment".into(),
            namespace: "shop".into(),
            vips: vec![],
            ports: vec![],
            endpoints: vec![],
            waypoint: None,
            waypoint_namespace: None,
        }
    }

    #[test]
    fn renders_istio_names_and_counts() {
        let m = Metrics::default();
        let service = payment_service();
        let labels = RequestLabels {
            source: m.unknown_side(),
            destination: m.side(Side { version: "v2".into(), ..Side::unknown() }),
            service: m.service(&service),
            request_protocol: "http",
            response_code: 200,
            grpc_response_status: None,
            response_flags: "-".into(),
        };
        m.record(labels.clone(), 3.0, 10, 0);
        m.record(labels.clone(), 700.0, 0, 2048);
        m.record(
            RequestLabels { request_protocol: "grpc", grpc_response_status: Some(14), ..labels },
            1.0,
            5,
            0,
        );
        let text = m.render();
        assert!(text.contains("istio_requests_total{reporter=\"waypoint\""), "{text}");
        assert!(text.contains("destination_version=\"v2\""));
        assert!(text.contains(
            "request_protocol=\"http\",response_code=\"200\",grpc_response_status=\"\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"} 2"
        ), "{text}");
        assert!(
            text.contains("request_protocol=\"grpc\",response_code=\"200\",grpc_response_status=\"14\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"} 1"),
            "{text}"
        );
        assert!(text.contains("le=\"5\"} 1"), "{text}");
        assert!(text.contains("le=\"1000\"} 2"));
        assert!(text.contains("istio_request_bytes_bucket{reporter=\"waypoint\""), "{text}");
        assert!(text.contains("istio_response_bytes_bucket{reporter=\"waypoint\""), "{text}");
        assert!(text.contains("le=\"10000\"} 1"), "{text}");
        assert_eq!(m.total(), 3);
    }

    #[test]
    fn equal_labels_interned_twice_are_one_series() {
        let m = Metrics::default();
        let service = payment_service();
        // As after a config reload: every value built and interned anew.
        let labels = |m: &Metrics| RequestLabels {
            source: m.side(Side { workload: "checkout".into(), ..Side::unknown() }),
            destination: m.unknown_side(),
            service: m.service(&service),
            request_protocol: "http",
            response_code: 503,
            grpc_response_status: None,
            response_flags: "UH".into(),
        };
        m.record(labels(&m), 1.0, 0, 0);
        m.record(labels(&m), 1.0, 0, 0);
        let text = m.render();
        assert_eq!(text.matches("istio_requests_total{").count(), 1, "{text}");
        assert!(text.contains("source_workload=\"checkout\""), "{text}");
        assert!(
            text.contains("response_flags=\"UH\",connection_security_policy=\"mutual_tls\"} 2"),
            "{text}"
        );
    }
}
