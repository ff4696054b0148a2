//! The HTTP layer's own bound on chat requests in flight (queued + running):
//! over it, 429 with Retry-After — which nv-ingest retries — before any work.
//! The slot is held until the response body ends, so an SSE stream keeps it
//! while it streams.

use std::sync::Arc;

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use super::metrics::Metrics;

#[derive(Debug)]
pub struct AdmissionGate {
    semaphore: Arc<Semaphore>,
    capacity: usize,
    retry_after_secs: u64,
    /// How much of a refused request's body to read before answering.
    body_limit: usize,
    metrics: Metrics,
}

impl AdmissionGate {
    pub fn new(
        capacity: usize,
        retry_after_secs: u64,
        body_limit: usize,
        metrics: Metrics,
    ) -> Self {
        AdmissionGate {
            semaphore: Arc::new(Semaphore::new(capacity)),
            capacity,
            retry_after_secs,
            body_limit,
            metrics,
        }
    }

    fn try_admit(self: &Arc<Self>) -> Option<Slot> {
        let permit = Arc::clone(&self.semaphore).try_acquire_owned().ok()?;
        self.report();
        Some(Slot {
            permit: Some(permit),
            gate: Arc::clone(self),
        })
    }

    fn report(&self) {
        let busy = self.capacity - self.semaphore.available_permits();
        self.metrics.in_flight(busy);
    }
}

/// One admitted request; frees its place when dropped.
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    gate: Arc<AdmissionGate>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Release first, so the gauge counts without this request.
        drop(self.permit.take());
        self.gate.report();
    }
}

pub async fn limit_in_flight(
    State(gate): State<Arc<AdmissionGate>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(slot) = gate.try_admit() else {
        // Read the body first: answering while the client is still sending
        // would close the connection under it, and the client would see a
        // reset instead of the 429.
        let _ = axum::body::to_bytes(request.into_body(), gate.body_limit).await;
        return ApiError::overloaded(gate.retry_after_secs).into_response();
    };
    let (mut parts, body) = next.run(request).await.into_parts();
    // The wrapper below hides the body's length; keep it in the header so
    // JSON answers are not sent chunked.
    if let Some(length) = body.size_hint().exact() {
        parts
            .headers
            .insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    let body = body.into_data_stream().map(move |chunk| {
        let _held_until_the_body_ends = &slot;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}
