//! `--allow-remote-images`: http(s) image URLs are fetched (bounded in size)
//! and reach the engine as bytes; failures are 400s that name the image.

mod common;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use common::*;
use vlm_server::api::ApiConfig;

/// A loopback HTTP server with a PNG, a missing file and an oversized file.
async fn image_host(png: Vec<u8>, big: usize) -> String {
    let app = Router::new()
        .route("/cat.png", get(move || async move { png.clone() }))
        .route("/big.png", get(move || async move { vec![7u8; big] }))
        .route("/empty.png", get(|| async { Vec::<u8>::new() }))
        .route(
            "/missing.png",
            get(|| async { (StatusCode::NOT_FOUND, "no such image") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

async fn remote_server(max_body_bytes: usize) -> TestServer {
    let config = ApiConfig {
        allow_remote_images: true,
        max_body_bytes,
        ..ApiConfig::default()
    };
    TestServer::start(FakeEngine::echo(), config).await
}

#[tokio::test]
async fn remote_image_bytes_reach_the_engine() {
    let png = png(64, 48, 3);
    let host = image_host(png.clone(), 0).await;
    let server = remote_server(1 << 20).await;
    let body = nv_ingest_body(&format!("{host}/cat.png"));
    let response = nv_ingest_post(&client(), &server.chat_url(), &body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let json: serde_json::Value = response.json().await.unwrap();
    let content = json["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        content.contains("images=1") && content.contains(&format!("bytes={}", png.len())),
        "{content}"
    );
}

#[tokio::test]
async fn failed_fetches_are_400s_naming_the_image() {
    let host = image_host(png(8, 8, 1), 4096).await;
    let server = remote_server(1024).await;
    let cases = [
        ("missing.png", "HTTP 404"),
        ("big.png", "larger than the limit of 1024 bytes"),
        ("empty.png", "empty"),
    ];
    for (path, wanted) in cases {
        let body = nv_ingest_body(&format!("{host}/{path}"));
        let error = expect_error(nv_ingest_post(&client(), &server.chat_url(), &body), 400).await;
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(wanted), "{path}: {message}");
        assert_eq!(error["param"], "messages[1].content[1].image_url");
    }
    // Nothing listens on port 9 of loopback: a connection error, not a hang.
    let body = nv_ingest_body("http://127.0.0.1:9/x.png");
    let error = expect_error(nv_ingest_post(&client(), &server.chat_url(), &body), 400).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("Could not fetch the image URL"),
        "{error}"
    );
}
