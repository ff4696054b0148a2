//! The HTTP layer: OpenAI/NIM protocol, validation, auth, streaming, limits.
//!
//! Routes (all JSON errors use the OpenAI error body):
//! - `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/metadata` —
//!   bearer auth when keys are configured;
//! - `GET /v1/health/live`, `GET /v1/health/ready`, `GET /metrics` — open,
//!   for probes and scrapers.

mod admission;
mod auth;
mod chat;
pub mod cli;
pub mod config;
mod error;
mod extract;
mod health;
mod images;
pub mod metrics;
mod protocol;
mod reasoning;
mod remote;
mod stream;
mod validate;

use std::future::{Future, IntoFuture};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef, MatchedPath, Request, State};
use axum::http::Uri;
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

pub use config::{ApiConfig, ApiKeys};
pub use error::ApiError;
pub use metrics::Metrics;

use crate::engine::Engine;
use admission::AdmissionGate;
use extract::BodyLimit;

/// How long `serve` waits for in-flight requests after the shutdown signal.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Shared by every handler.
pub struct AppState<E> {
    engine: Arc<E>,
    config: Arc<ApiConfig>,
    metrics: Metrics,
    /// `created` of the model cards.
    started_at: u64,
}

// Not derived: `E` itself need not be `Clone`.
impl<E> Clone for AppState<E> {
    fn clone(&self) -> Self {
        AppState {
            engine: Arc::clone(&self.engine),
            config: Arc::clone(&self.config),
            metrics: self.metrics.clone(),
            started_at: self.started_at,
        }
    }
}

impl<E> FromRef<AppState<E>> for BodyLimit {
    fn from_ref(state: &AppState<E>) -> Self {
        BodyLimit(state.config.max_body_bytes)
    }
}

/// All routes and layers, ready to `serve`.
pub fn router<E: Engine>(engine: Arc<E>, config: ApiConfig, metrics: Metrics) -> Router {
    let gate = Arc::new(AdmissionGate::new(
        config.max_in_flight,
        config.retry_after_secs,
        config.max_body_bytes,
        metrics.clone(),
    ));
    let keys = config.api_keys.clone();
    let body_limit = config.max_body_bytes;
    let state = AppState {
        engine,
        config: Arc::new(config),
        metrics: metrics.clone(),
        started_at: chat::unix_now(),
    };
    let authenticated = Router::new()
        .route(
            "/v1/chat/completions",
            post(chat::chat_completions::<E>).layer(middleware::from_fn_with_state(
                gate,
                admission::limit_in_flight,
            )),
        )
        .route("/v1/models", get(health::models::<E>))
        .route("/v1/metadata", get(health::metadata::<E>))
        .route_layer(middleware::from_fn_with_state(keys, auth::require_api_key));
    let open = Router::new()
        .route("/v1/health/live", get(health::live))
        .route("/v1/health/ready", get(health::ready::<E>))
        .route("/metrics", get(health::metrics::<E>));
    authenticated
        .merge(open)
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(
            ServiceBuilder::new()
                // Outermost first: keys never reach the trace logs.
                .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(PropagateRequestIdLayer::x_request_id())
                // Failures are logged once, with their cause, by `ApiError`; a 503 from
                // the readiness probe while the model loads is no error at all.
                .layer(
                    TraceLayer::new_for_http()
                        .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
                )
                .layer(CatchPanicLayer::custom(panic_response))
                .layer(middleware::from_fn_with_state(metrics, record_http_metrics))
                .layer(DefaultBodyLimit::max(body_limit)),
        )
        .with_state(state)
}

/// Serve until `shutdown` resolves, then drain in-flight requests for at most
/// [`DEFAULT_DRAIN_TIMEOUT`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_with_drain(listener, router, shutdown, DEFAULT_DRAIN_TIMEOUT).await
}

/// [`serve`] with an explicit drain bound.
pub async fn serve_with_drain(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> io::Result<()> {
    let (signalled_tx, mut signalled_rx) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: draining in-flight requests");
        let _ = signalled_tx.send(true);
    };
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(signal)
        .into_future();
    let deadline = async move {
        if signalled_rx.wait_for(|s| *s).await.is_err() {
            // The server ended first; `select!` is already done with us.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        result = server => result,
        () = deadline => {
            tracing::warn!(?drain, "drain timeout: dropping the remaining requests");
            Ok(())
        }
    }
}

/// Requests by route and status, and time to the response head.
async fn record_http_metrics(
    State(metrics): State<Metrics>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    // The route template, never the raw path: unknown paths share one label.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    metrics.http_request(&route, response.status().as_u16(), started.elapsed());
    response
}

async fn route_not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("the server hit a bug while handling this request").into_response()
}
