//! Shared by the `api_*` tests: a real server on a loopback port in front of
//! a fake engine, and request builders.
#![allow(dead_code)]

pub mod fake_engine;

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vlm_server::api::{self, ApiConfig, Metrics};

#[allow(unused_imports)] // not every test file scripts the engine
pub use fake_engine::{FakeEngine, Script};

pub const MODEL: &str = "nvidia/nemotron-nano-12b-v2-vl";

pub struct TestServer {
    pub base: String,
    pub engine: Arc<FakeEngine>,
    pub metrics: Metrics,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(engine: FakeEngine, config: ApiConfig) -> Self {
        Self::start_with_drain(engine, config, Duration::from_secs(10)).await
    }

    pub async fn start_with_drain(engine: FakeEngine, config: ApiConfig, drain: Duration) -> Self {
        let engine = Arc::new(engine);
        let metrics = Metrics::new();
        let router = api::router(Arc::clone(&engine), config, metrics.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        };
        let task = tokio::spawn(api::serve_with_drain(listener, router, shutdown, drain));
        TestServer {
            base,
            engine,
            metrics,
            shutdown: Some(tx),
            task,
        }
    }

    pub async fn echo() -> Self {
        Self::start(FakeEngine::echo(), ApiConfig::default()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn chat_url(&self) -> String {
        self.url("/v1/chat/completions")
    }

    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a reqwest client")
}

/// A small RGB PNG whose pixels depend on `seed`.
pub fn png(width: u32, height: u32, seed: u8) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x as u8).wrapping_add(seed), y as u8, seed])
    });
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encode a PNG");
    out.into_inner()
}

pub fn data_url(bytes: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The request nv-ingest sends (contract §4), byte for byte in shape.
pub fn nv_ingest_body(image_url: &str) -> Value {
    json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "/no_think"},
            {"role": "user", "content": [
                {"type": "text", "text": "Caption the content of this image:"},
                {"type": "image_url", "image_url": {"url": image_url}}
            ]}
        ],
        "max_tokens": 512,
        "temperature": 1.0,
        "top_p": 1.0,
        "stream": false
    })
}

/// POST with the headers python-requests and nv-ingest send.
pub fn nv_ingest_post(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> reqwest::RequestBuilder {
    client
        .post(url)
        .header("accept", "application/json")
        .header("content-type", "application/json")
        .header("authorization", "Bearer ngcapikey")
        .header("user-agent", "python-requests/2.34.2")
        .body(body.to_string())
}

/// Assert the OpenAI error body shape and return the `error` object.
pub fn assert_error_body(body: &Value) -> &Value {
    let error = body
        .get("error")
        .unwrap_or_else(|| panic!("no 'error' in {body}"));
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(error.get("param").is_some(), "{body}");
    assert!(error.get("code").is_some(), "{body}");
    error
}

/// Send, then check the status and the error body; returns the `error` object.
pub async fn expect_error(request: reqwest::RequestBuilder, status: u16) -> Value {
    let response = request.send().await.expect("a response");
    assert_eq!(response.status().as_u16(), status);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let body: Value = response.json().await.expect("a JSON body");
    assert_error_body(&body).clone()
}
