//! Service behaviour: probes and descriptions, metrics, cancellation on
//! client disconnect, graceful shutdown.

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vlm_server::api::ApiConfig;

use common::*;

#[tokio::test]
async fn models_metadata_and_live() {
    let config = ApiConfig {
        aliases: vec!["vlm".into()],
        ..ApiConfig::default()
    };
    let server = TestServer::start(FakeEngine::echo(), config).await;
    let client = client();

    let models: Value = client
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    let first = &models["data"][0];
    assert_eq!(first["id"], MODEL);
    assert_eq!(first["object"], "model");
    assert_eq!(first["owned_by"], "nvidia");
    assert_eq!(first["max_model_len"], fake_engine::MAX_MODEL_LEN);
    assert_eq!(models["data"][1]["id"], "vlm");
    assert_eq!(models["data"][1]["root"], MODEL);

    let metadata: Value = client
        .get(server.url("/v1/metadata"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metadata["modelInfo"][0]["shortName"], MODEL);
    assert!(metadata["modelInfo"][0]["modelUrl"].is_string());
    assert!(metadata["version"].as_str().is_some_and(|v| !v.is_empty()));
    assert!(metadata["assetInfo"].is_array());

    let live = client
        .get(server.url("/v1/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let live: Value = live.json().await.unwrap();
    assert_eq!(live["object"], "health.response");
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let server = TestServer::echo().await;
    let client = client();
    let body = nv_ingest_body(&data_url(&png(8, 8, 3)));
    for _ in 0..2 {
        let response = nv_ingest_post(&client, &server.chat_url(), &body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let mut wrong = body.clone();
    wrong["model"] = json!("other");
    nv_ingest_post(&client, &server.chat_url(), &wrong)
        .send()
        .await
        .unwrap();
    client.get(server.url("/nope")).send().await.unwrap();

    let response = client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    for line in [
        r#"vlm_http_requests_total{route="/v1/chat/completions",status="200"} 2"#,
        r#"vlm_http_requests_total{route="/v1/chat/completions",status="404"} 1"#,
        r#"vlm_http_requests_total{route="unmatched",status="404"} 1"#,
        "vlm_images_total 2",
        "vlm_prompt_tokens_total 200",
        "vlm_requests_in_flight 0",
        "vlm_queue_depth 0",
        "vlm_running_sequences 0",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    for histogram in [
        "vlm_time_to_first_token_seconds_count 2",
        "vlm_e2e_request_latency_seconds_count 2",
        "vlm_http_request_duration_seconds_bucket{route=\"/v1/chat/completions\"",
    ] {
        assert!(text.contains(histogram), "missing {histogram:?} in\n{text}");
    }
}

#[tokio::test]
async fn client_disconnect_cancels_a_non_streaming_generation() {
    let engine = FakeEngine::new(Script::Endless {
        delay: Duration::from_millis(10),
    });
    let server = TestServer::start(engine, ApiConfig::default()).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let body = nv_ingest_body(&data_url(&png(8, 8, 4)));
    let err = nv_ingest_post(&impatient, &server.chat_url(), &body)
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let dropped = Instant::now();
    assert!(
        server
            .engine
            .wait_cancelled(1, Duration::from_secs(2))
            .await,
        "the engine never saw the receiver dropped"
    );
    assert!(dropped.elapsed() < Duration::from_secs(1));
    let text = client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("vlm_client_disconnects_total 1"), "{text}");
    assert!(text.contains("vlm_requests_in_flight 0"), "{text}");
}

#[tokio::test]
async fn client_disconnect_cancels_a_stream() {
    let engine = FakeEngine::new(Script::Endless {
        delay: Duration::from_millis(5),
    });
    let server = TestServer::start(engine, ApiConfig::default()).await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
    let mut response = client()
        .post(server.chat_url())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Read a little, then hang up.
    let first = response.chunk().await.unwrap().unwrap();
    assert!(
        std::str::from_utf8(&first)
            .unwrap()
            .contains("chat.completion.chunk")
    );
    drop(response);
    assert!(
        server
            .engine
            .wait_cancelled(1, Duration::from_secs(2))
            .await
    );
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let engine = FakeEngine::new(Script::Echo {
        delay: Duration::from_millis(40),
    });
    let mut server = TestServer::start(engine, ApiConfig::default()).await;
    let url = server.chat_url();
    let body = nv_ingest_body(&data_url(&png(8, 8, 5)));
    let in_flight = tokio::spawn(async move {
        let response = nv_ingest_post(&client(), &url, &body).send().await.unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().await.unwrap(),
        )
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.shutdown();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("echo: Caption")
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), &mut server.task).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    assert_eq!(server.engine.cancelled(), 0);
    // No new connections after shutdown.
    assert!(
        client()
            .get(server.url("/v1/health/live"))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn drain_is_bounded() {
    let engine = FakeEngine::new(Script::Endless {
        delay: Duration::from_millis(10),
    });
    let mut server =
        TestServer::start_with_drain(engine, ApiConfig::default(), Duration::from_millis(300))
            .await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
    let response = client()
        .post(server.chat_url())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let started = Instant::now();
    server.shutdown();
    let ended = tokio::time::timeout(Duration::from_secs(5), &mut server.task).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    drop(response);
}
