//! The waypoint's admin (127.0.0.1:15000: `/config_dump`, `/healthz/ready`), metrics (:15020)
//! and readiness (:15021) endpoints. Read-only.

use std::sync::{Arc, atomic::Ordering};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes};
use serde_json::json;
use tokio::net::TcpListener;
use warren_core::endpoints::{Endpoints, Limits, text, warn_line};

use crate::state::WaypointState;

pub async fn serve(listener: TcpListener, state: Arc<WaypointState>, endpoints: Endpoints) {
    warren_core::endpoints::serve(listener, endpoints.name(), Limits::default(), warn_line, move |req| {
        route(&state, endpoints, req)
    })
    .await
}

fn config_dump(state: &WaypointState) -> serde_json::Value {
    let snapshot = state.snapshot();
    let served: Vec<String> = snapshot
        .config
        .services
        .iter()
        .filter(|s| s.is_served_by(&state.config.namespace, &state.config.name))
        .map(|s| s.hostname())
        .collect();
    let me = (state.config.namespace.as_str(), state.config.name.as_str());
    let served_pods: Vec<String> = snapshot
        .config
        .workloads
        .iter()
        .filter(|w| {
            w.enrolled && w.waypoint.as_ref().is_some_and(|r| (r.namespace.as_str(), r.name.as_str()) == me)
        })
        .map(|w| w.to_string())
        .collect();
    let clusters: Vec<_> = state
        .clusters
        .all()
        .iter()
        .map(|c| json!({ "name": c.key.to_string(), "ejectedEndpoints": c.ejected() }))
        .collect();
    json!({
        "config": state.config,
        "identity": state.identity.to_string(),
        "servedServices": served,
        "servedPods": served_pods,
        "routing": snapshot.config.routing,
        "routeErrors": snapshot.routes.errors,
        "clusters": clusters,
        "hboneConnections": state.clusters.hbone.open_connections(),
        "hboneConnectionsOpened": state.clusters.hbone.connections_opened(),
        "openStreams": state.open_streams.load(Ordering::Relaxed),
        "certificates": state.certs.view(),
        "requests": state.metrics.total(),
        "configStream": *state.stream.lock().expect("poisoned"),
    })
}

fn route(
    state: &WaypointState,
    endpoints: Endpoints,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let ready = state.ready.load(Ordering::Relaxed);
    let (status, body) = match (endpoints, req.uri().path()) {
        (Endpoints::Admin, "/config_dump") => {
            (StatusCode::OK, serde_json::to_string_pretty(&config_dump(state)).unwrap_or_default() + "\n")
        }
        (Endpoints::Admin | Endpoints::Readiness, "/healthz/ready") if ready => {
            (StatusCode::OK, "ready\n".into())
        }
        (Endpoints::Admin | Endpoints::Readiness, "/healthz/ready") => {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
        }
        (Endpoints::Metrics, "/metrics" | "/stats/prometheus") => {
            (StatusCode::OK, state.metrics.render() + &state.handshakes.render_metrics())
        }
        (Endpoints::Admin, _) => (StatusCode::NOT_FOUND, "endpoints: /config_dump /healthz/ready\n".into()),
        (Endpoints::Metrics, _) => (StatusCode::NOT_FOUND, "endpoints: /metrics /stats/prometheus\n".into()),
        (Endpoints::Readiness, _) => (StatusCode::NOT_FOUND, "endpoints: /healthz/ready\n".into()),
    };
    text(status, body)
}
