//! Probes and descriptions: NIM health, OpenAI model list, NIM metadata,
//! Prometheus text.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use super::AppState;
use super::protocol::{HealthResponse, Metadata, ModelCard, ModelInfoEntry, ModelList};
use crate::engine::Engine;

/// 200 while the process can answer at all.
pub async fn live() -> Json<HealthResponse> {
    Json(HealthResponse {
        object: "health.response",
        message: "Service is live.",
        status: "live",
    })
}

/// 503 until the engine has loaded and warmed up the model.
pub async fn ready<E: Engine>(State(state): State<AppState<E>>) -> impl IntoResponse {
    if state.engine.is_ready() {
        let body = HealthResponse {
            object: "health.response",
            message: "Service is ready.",
            status: "ready",
        };
        (StatusCode::OK, Json(body))
    } else {
        let body = HealthResponse {
            object: "health.response",
            message: "Service is not ready.",
            status: "not_ready",
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(body))
    }
}

pub async fn models<E: Engine>(State(state): State<AppState<E>>) -> Json<ModelList> {
    let config = &state.config;
    let max_model_len = state.engine.info().max_model_len;
    let card = |id: &str| ModelCard {
        id: id.to_owned(),
        object: "model",
        created: state.started_at,
        owned_by: "nvidia",
        root: config.served_model_name.clone(),
        parent: None,
        max_model_len,
    };
    let data = std::iter::once(&config.served_model_name)
        .chain(&config.aliases)
        .map(|id| card(id))
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}

pub async fn metadata<E: Engine>(State(state): State<AppState<E>>) -> Json<Metadata> {
    let config = &state.config;
    Json(Metadata {
        version: config.version.clone(),
        model_info: vec![ModelInfoEntry {
            model_url: config.model_url.clone(),
            short_name: config.served_model_name.clone(),
        }],
        asset_info: Vec::new(),
        license_info: serde_json::json!({}),
        repository_override: String::new(),
    })
}

pub async fn metrics<E: Engine>(State(state): State<AppState<E>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
