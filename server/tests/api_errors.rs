//! The error table: every refusal has the right status (nv-ingest acts on the
//! status alone: 4xx fails the job, 429/5xx are retried) and the OpenAI error
//! body; 429 and 503 carry Retry-After.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use vlm_server::api::{ApiConfig, ApiKeys};
use vlm_server::engine::EngineError;

use common::*;

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

async fn post_raw(server: &TestServer, body: &str, status: u16) -> Value {
    let request = client()
        .post(server.chat_url())
        .header("content-type", "application/json")
        .body(body.to_owned());
    expect_error(request, status).await
}

async fn post_json(server: &TestServer, body: &Value, status: u16) -> Value {
    post_raw(server, &body.to_string(), status).await
}

#[tokio::test]
async fn malformed_json_and_wrong_types_are_400_naming_the_field() {
    let server = TestServer::echo().await;
    for (body, param) in [
        (r#"{"model": "x", "messages": ["#, None),
        ("not json at all", None),
        ("", None),
        (r#"{"messages": 5}"#, Some("messages")),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "x"}"#,
            Some("max_tokens"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": 7}]}"#,
            Some("messages[0].content"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}"#,
            Some("stream"),
        ),
        (r#"{"model": "m"}"#, None),
        ("[1, 2]", None),
    ] {
        let error = post_raw(&server, body, 400).await;
        assert_eq!(error["type"], "invalid_request_error", "{body}");
        assert_eq!(error["param"].as_str(), param, "{body}: {error}");
    }
    assert!(server.engine.submitted.lock().unwrap().is_empty());
}

#[tokio::test]
async fn bad_images_are_400_naming_the_part() {
    let server = TestServer::echo().await;
    let param = "messages[1].content[1].image_url";
    for (url, needle) in [
        ("data:image/png;base64,%%%not-base64%%%", "base64"),
        ("data:image/png;base64,", "empty"),
        ("https://example.com/cat.png", "Remote image URLs"),
        ("ftp://example.com/cat.png", "Unsupported image URL"),
    ] {
        let error = post_json(&server, &nv_ingest_body(url), 400).await;
        assert_eq!(error["param"], param, "{url}");
        assert!(
            error["message"].as_str().unwrap().contains(needle),
            "{url}: {error}"
        );
    }
    // Decodable base64, but not an image: the engine refuses it, and the 400
    // carries the engine's message and parameter.
    let not_an_image = data_url(b"%PDF-1.7 this is not an image");
    let error = post_json(&server, &nv_ingest_body(&not_an_image), 400).await;
    assert_eq!(error["param"], "messages[1].content[1]");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("unsupported image format")
    );
}

#[tokio::test]
async fn request_shape_errors() {
    let server = TestServer::echo().await;
    let image = json!({"type": "image_url", "image_url": {"url": data_url(&png(4, 4, 0))}});
    for (body, status, param) in [
        (
            json!({"model": "gpt-4o", "messages": [user("hi")]}),
            404,
            "model",
        ),
        (json!({"messages": [user("hi")], "n": 2}), 400, "n"),
        (
            json!({"messages": [{"role": "user", "content": [image, image, image, image, image]}]}),
            400,
            "messages",
        ),
        (json!({"messages": []}), 400, "messages"),
        (
            json!({"messages": [{"role": "tool", "content": "42", "tool_call_id": "a"}]}),
            400,
            "messages[0].role",
        ),
        (
            json!({"messages": [user("hi")], "temperature": 3}),
            400,
            "temperature",
        ),
        (
            json!({"messages": [user("hi")], "top_p": 1.5}),
            400,
            "top_p",
        ),
        (
            json!({"messages": [user("hi")], "max_tokens": -5}),
            400,
            "max_tokens",
        ),
        (
            json!({"messages": [user("hi")], "stop": ["a", "b", "c", "d", "e"]}),
            400,
            "stop",
        ),
    ] {
        let error = post_json(&server, &body, status).await;
        assert_eq!(error["param"], param, "{body}: {error}");
    }
    let error = post_json(
        &server,
        &json!({"model": "gpt-4o", "messages": [user("hi")]}),
        404,
    )
    .await;
    assert_eq!(error["code"], "model_not_found");
    // Four images are fine.
    let four = json!({"messages": [{"role": "user", "content": [image, image, image, image]}]});
    let response = client()
        .post(server.chat_url())
        .json(&four)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn oversized_body_is_413_and_large_images_pass() {
    let config = ApiConfig {
        max_body_bytes: 1 << 20,
        ..ApiConfig::default()
    };
    let server = TestServer::start(FakeEngine::echo(), config).await;
    let mut big = b"\x89PNG\r\n\x1a\n".to_vec();
    big.resize(2 << 20, 0x55);
    let error = post_json(&server, &nv_ingest_body(&data_url(&big)), 413).await;
    assert_eq!(error["code"], "request_too_large");

    // The default limit takes the multi-MB PNGs nv-ingest produces (contract §5).
    let server = TestServer::echo().await;
    let mut image = b"\x89PNG\r\n\x1a\n".to_vec();
    image.resize(9 << 20, 0x42);
    let response = nv_ingest_post(
        &client(),
        &server.chat_url(),
        &nv_ingest_body(&data_url(&image)),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(server.engine.last_request().messages[1].parts.len(), 2);
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let server = TestServer::echo().await;
    // nv-ingest with an endpoint missing its path POSTs to `/` (contract §4).
    expect_error(client().post(server.url("/")).body("{}"), 404).await;
    expect_error(client().get(server.chat_url()), 405).await;
}

#[tokio::test]
async fn keys_configured_require_a_matching_bearer() {
    let config = ApiConfig {
        api_keys: ApiKeys::new(["key-one", "key-two"]),
        ..ApiConfig::default()
    };
    let server = TestServer::start(FakeEngine::echo(), config).await;
    let body = nv_ingest_body(&data_url(&png(4, 4, 1)));
    let client = client();
    for auth in [
        None,
        Some("Bearer ngcapikey"),
        Some("Bearer key-on"),
        Some("Basic key-one"),
        Some("Bearer "),
    ] {
        let mut request = client.post(server.chat_url()).json(&body);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let error = expect_error(request, 401).await;
        assert_eq!(error["code"], "invalid_api_key", "{auth:?}");
    }
    for path in ["/v1/models", "/v1/metadata"] {
        expect_error(client.get(server.url(path)), 401).await;
    }
    for key in ["key-one", "key-two"] {
        let response = client
            .post(server.chat_url())
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // Probes stay open.
    for path in ["/v1/health/live", "/v1/health/ready", "/metrics"] {
        assert_eq!(
            client.get(server.url(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }
}

#[tokio::test]
async fn no_keys_configured_accepts_any_bearer_or_none() {
    let server = TestServer::echo().await;
    let body = json!({"messages": [user("hi")]});
    for auth in [
        None,
        Some("Bearer ngcapikey"),
        Some("Bearer anything"),
        Some("garbage"),
    ] {
        let mut request = client().post(server.chat_url()).json(&body);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        assert_eq!(request.send().await.unwrap().status(), 200, "{auth:?}");
    }
}

fn retry_after(response: &reqwest::Response) -> u64 {
    response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn engine_errors_map_to_statuses() {
    for (error, status) in [
        (EngineError::Overloaded, 429),
        (EngineError::Unavailable("shutting down".into()), 503),
        (EngineError::Internal("device lost".into()), 500),
        (
            EngineError::invalid("prompt too long", Some("messages")),
            400,
        ),
    ] {
        for script in [
            Script::Refuse(error.clone()),
            Script::FailAfterAdmit(error.clone()),
        ] {
            for stream in [false, true] {
                let server =
                    TestServer::start(FakeEngine::new(script.clone()), ApiConfig::default()).await;
                let body = json!({"messages": [user("hi")], "stream": stream});
                let response = client()
                    .post(server.chat_url())
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    response.status().as_u16(),
                    status,
                    "{error:?} {script:?} stream={stream}"
                );
                if status == 429 || status == 503 {
                    assert!(retry_after(&response) >= 1);
                }
                let body: Value = response.json().await.unwrap();
                assert_error_body(&body);
            }
        }
    }
}

#[tokio::test]
async fn http_layer_admission_bound_is_429_with_retry_after() {
    let config = ApiConfig {
        max_in_flight: 2,
        retry_after_secs: 3,
        ..ApiConfig::default()
    };
    let engine = FakeEngine::new(Script::Endless {
        delay: Duration::from_millis(20),
    });
    let server = TestServer::start(engine, config).await;
    let body = json!({"messages": [user("hi")], "stream": true});
    let first = client()
        .post(server.chat_url())
        .json(&body)
        .send()
        .await
        .unwrap();
    let second = client()
        .post(server.chat_url())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = client()
        .post(server.chat_url())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), 429);
    assert_eq!(retry_after(&third), 3);
    assert_error_body(&third.json().await.unwrap());
    // Closing a stream frees its slot.
    drop(first);
    assert!(
        server
            .engine
            .wait_cancelled(1, Duration::from_secs(5))
            .await
    );
    let mut admitted = false;
    for _ in 0..50 {
        let retry = client()
            .post(server.chat_url())
            .json(&body)
            .send()
            .await
            .unwrap();
        if retry.status() == 200 {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted);
}

#[tokio::test]
async fn not_ready_is_503_on_ready_and_chat() {
    let engine = FakeEngine::echo();
    engine.set_ready(false);
    let server = TestServer::start(engine, ApiConfig::default()).await;
    let response = client()
        .get(server.url("/v1/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "health.response");
    assert_eq!(body["status"], "not_ready");
    let live = client()
        .get(server.url("/v1/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);

    let response = client()
        .post(server.chat_url())
        .json(&json!({"messages": [user("hi")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(retry_after(&response) >= 1);
    assert_error_body(&response.json().await.unwrap());

    server.engine.set_ready(true);
    let response = client()
        .get(server.url("/v1/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"object": "health.response", "message": "Service is ready.", "status": "ready"})
    );
}
