//! `/healthz`, `/readyz` and `/metrics` for the kubelet and Prometheus.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

#[derive(Clone)]
pub struct HttpState {
    pub prometheus: PrometheusHandle,
    /// A standby replica, or a leader whose caches have synced.
    pub ready: Arc<AtomicBool>,
    /// Whether this replica holds the leader Lease (reported, not required, by `/readyz`).
    pub leader: Arc<AtomicBool>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Standbys are ready (a rolling update needs the new pod ready before the old leader goes);
/// a leader is ready once its caches have synced. The body says which.
async fn readyz(State(s): State<HttpState>) -> (StatusCode, &'static str) {
    let leader = s.leader.load(Ordering::Relaxed);
    match (s.ready.load(Ordering::Relaxed), leader) {
        (true, true) => (StatusCode::OK, "ready: leader"),
        (true, false) => (StatusCode::OK, "ready: standby"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "cache not synced"),
    }
}

async fn metrics(State(s): State<HttpState>) -> String {
    s.prometheus.render()
}

#[cfg(test)]
mod tests {
    use axum::body::{Body, to_bytes};
    use axum::http::Request;
    use metrics_exporter_prometheus::PrometheusBuilder;
    use tower::ServiceExt;

    use super::*;

    async fn get(app: &Router, path: &str) -> (StatusCode, String) {
        let req = Request::get(path).body(Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let body = to_bytes(res.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let prometheus = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!(crate::metrics::RECONCILES).increment(2);
        });
        let ready = Arc::new(AtomicBool::new(false));
        let leader = Arc::new(AtomicBool::new(false));
        let app = router(HttpState {
            prometheus,
            ready: ready.clone(),
            leader: leader.clone(),
        });

        assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get(&app, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        ready.store(true, Ordering::Relaxed);
        assert_eq!(
            get(&app, "/readyz").await,
            (StatusCode::OK, "ready: standby".into())
        );
        leader.store(true, Ordering::Relaxed);
        assert_eq!(
            get(&app, "/readyz").await,
            (StatusCode::OK, "ready: leader".into())
        );
        let (status, body) = get(&app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("vlm_operator_reconciles_total 2"), "{body}");
    }
}
