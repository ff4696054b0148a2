//! Prometheus metrics, rendered at `GET /metrics`.
//!
//! Each [`Metrics`] owns its own registry, so tests can build many routers.
//! The server process calls [`Metrics::install_global`] once, so that the
//! engine's plain `metrics::gauge!`/`counter!` calls land in the same registry.
//!
//! Names (the engine side records the ones marked *engine*):
//! - `vlm_http_requests_total{route,status}` — counter, every HTTP request.
//! - `vlm_http_request_duration_seconds{route}` — histogram, until the response
//!   head (for SSE that is about the time to first token).
//! - `vlm_e2e_request_latency_seconds` — histogram, chat request to last token.
//! - `vlm_time_to_first_token_seconds` — histogram.
//! - `vlm_prompt_tokens_total`, `vlm_completion_tokens_total` — counters.
//! - `vlm_images_total` — counter, images in accepted chat requests.
//! - `vlm_requests_in_flight` — gauge, chat requests admitted at the HTTP layer.
//! - `vlm_client_disconnects_total` — counter, generations cancelled because
//!   the client went away.
//! - *engine* `vlm_queue_depth` — gauge, requests waiting for a sequence slot.
//! - *engine* `vlm_running_sequences` — gauge, sequences being generated.
//! - *engine* `vlm_tiles_total` — counter, image tiles encoded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

pub const HTTP_REQUESTS: &str = "vlm_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "vlm_http_request_duration_seconds";
pub const E2E_LATENCY: &str = "vlm_e2e_request_latency_seconds";
pub const TIME_TO_FIRST_TOKEN: &str = "vlm_time_to_first_token_seconds";
pub const PROMPT_TOKENS: &str = "vlm_prompt_tokens_total";
pub const COMPLETION_TOKENS: &str = "vlm_completion_tokens_total";
pub const IMAGES: &str = "vlm_images_total";
pub const REQUESTS_IN_FLIGHT: &str = "vlm_requests_in_flight";
pub const CLIENT_DISCONNECTS: &str = "vlm_client_disconnects_total";
pub const QUEUE_DEPTH: &str = "vlm_queue_depth";
pub const RUNNING_SEQUENCES: &str = "vlm_running_sequences";
pub const TILES: &str = "vlm_tiles_total";

/// Latency buckets (seconds): captions take from well under a second to
/// tens of seconds; nv-ingest gives up at 120 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// Histogram samples are buffered until a scrape folds them into buckets;
/// fold them every this many requests too, in case nobody scrapes.
const UPKEEP_EVERY: u64 = 1024;

#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    requests_seen: Arc<AtomicU64>,
}

#[derive(Debug, thiserror::Error)]
#[error("a global metrics recorder is already installed")]
pub struct AlreadyInstalled;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = Arc::new(builder.build_recorder());
        let handle = recorder.handle();
        let metrics = Metrics {
            recorder,
            handle,
            requests_seen: Arc::default(),
        };
        metrics.describe();
        metrics
    }

    /// Route the process-wide `metrics` macros (the engine's) to this registry.
    /// Works once per process.
    pub fn install_global(&self) -> Result<(), AlreadyInstalled> {
        metrics::set_global_recorder(Arc::clone(&self.recorder)).map_err(|_| AlreadyInstalled)
    }

    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drain histogram samples into their buckets; keeps memory bounded
    /// between scrapes.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    fn record<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(self.recorder.as_ref(), f)
    }

    pub(crate) fn http_request(&self, route: &str, status: u16, elapsed: Duration) {
        let (route, status) = (route.to_owned(), status.to_string());
        self.record(|| {
            counter!(HTTP_REQUESTS, "route" => route.clone(), "status" => status).increment(1);
            histogram!(HTTP_REQUEST_DURATION, "route" => route).record(elapsed.as_secs_f64());
        });
        if self.requests_seen.fetch_add(1, Ordering::Relaxed) % UPKEEP_EVERY == UPKEEP_EVERY - 1 {
            self.run_upkeep();
        }
    }

    pub(crate) fn request_admitted(&self, images: usize) {
        self.record(|| counter!(IMAGES).increment(images as u64));
    }

    pub(crate) fn in_flight(&self, count: usize) {
        self.record(|| gauge!(REQUESTS_IN_FLIGHT).set(count as f64));
    }

    pub(crate) fn first_token(&self, elapsed: Duration) {
        self.record(|| histogram!(TIME_TO_FIRST_TOKEN).record(elapsed.as_secs_f64()));
    }

    pub(crate) fn finished(&self, usage: crate::engine::Usage, elapsed: Duration) {
        self.record(|| {
            counter!(PROMPT_TOKENS).increment(usage.prompt_tokens as u64);
            counter!(COMPLETION_TOKENS).increment(usage.completion_tokens as u64);
            histogram!(E2E_LATENCY).record(elapsed.as_secs_f64());
        });
    }

    pub(crate) fn client_disconnected(&self) {
        self.record(|| counter!(CLIENT_DISCONNECTS).increment(1));
    }

    /// Help texts, and zero values so every series exists from the first scrape.
    fn describe(&self) {
        use metrics::{describe_counter, describe_gauge, describe_histogram};
        self.record(|| {
            describe_counter!(HTTP_REQUESTS, "HTTP requests by route and status");
            describe_histogram!(
                HTTP_REQUEST_DURATION,
                metrics::Unit::Seconds,
                "Time to the response head by route"
            );
            describe_histogram!(
                E2E_LATENCY,
                metrics::Unit::Seconds,
                "Chat completion time, request to last token"
            );
            describe_histogram!(
                TIME_TO_FIRST_TOKEN,
                metrics::Unit::Seconds,
                "Time to the first generated token"
            );
            describe_counter!(PROMPT_TOKENS, "Prompt tokens processed");
            describe_counter!(COMPLETION_TOKENS, "Tokens generated");
            describe_counter!(IMAGES, "Images in accepted chat requests");
            describe_gauge!(
                REQUESTS_IN_FLIGHT,
                "Chat requests admitted at the HTTP layer"
            );
            describe_counter!(
                CLIENT_DISCONNECTS,
                "Generations cancelled by a client disconnect"
            );
            describe_gauge!(QUEUE_DEPTH, "Requests waiting for a sequence slot");
            describe_gauge!(RUNNING_SEQUENCES, "Sequences being generated");
            describe_counter!(TILES, "Image tiles encoded");
            for name in [
                PROMPT_TOKENS,
                COMPLETION_TOKENS,
                IMAGES,
                CLIENT_DISCONNECTS,
                TILES,
            ] {
                counter!(name).absolute(0);
            }
            for name in [REQUESTS_IN_FLIGHT, QUEUE_DEPTH, RUNNING_SEQUENCES] {
                gauge!(name).set(0.0);
            }
        });
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_are_independent_and_render_text() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.http_request("/v1/chat/completions", 200, Duration::from_millis(30));
        let text = a.render();
        assert!(
            text.contains(
                r#"vlm_http_requests_total{route="/v1/chat/completions",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("vlm_http_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("vlm_queue_depth 0"), "{text}");
        assert!(!b.render().contains("status=\"200\""));
    }
}
