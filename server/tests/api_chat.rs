//! Chat completions over real HTTP against the fake engine: the nv-ingest
//! request, reasoning, SSE streaming, and many concurrent clients.

mod common;

use std::collections::HashSet;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use vlm_server::api::ApiConfig;
use vlm_server::engine::{ContentPart, EngineError, FinishReason, Role};

use common::fake_engine::echo_answer;
use common::*;

#[tokio::test]
async fn nv_ingest_request_gets_one_string_caption() {
    let server = TestServer::echo().await;
    let image = png(64, 48, 7);
    let response = nv_ingest_post(
        &client(),
        &server.chat_url(),
        &nv_ingest_body(&data_url(&image)),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    assert!(response.headers().contains_key("content-length"));
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: Value = response.json().await.unwrap();

    assert!(
        body["id"].as_str().unwrap().starts_with("chatcmpl-"),
        "{body}"
    );
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(body["model"], MODEL);
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1, "{body}");
    let expected = format!(
        "echo: Caption the content of this image: images=1 bytes={}",
        image.len()
    );
    assert_eq!(choices[0]["message"]["role"], "assistant");
    assert_eq!(choices[0]["message"]["content"], expected.as_str());
    assert!(
        choices[0]["message"].get("reasoning_content").is_none(),
        "{body}"
    );
    assert_eq!(choices[0]["finish_reason"], "stop");
    let usage = &body["usage"];
    let words = expected.split(' ').count() as u64;
    assert_eq!(usage["prompt_tokens"], 100);
    assert_eq!(usage["completion_tokens"], words);
    assert_eq!(usage["total_tokens"], 100 + words);

    // What the engine received: the decoded PNG in place, nv-ingest's sampling.
    let request = server.engine.last_request();
    assert_eq!(request.messages[0].role, Role::System);
    match &request.messages[1].parts[..] {
        [ContentPart::Text(text), ContentPart::Image(bytes)] => {
            assert_eq!(text, "Caption the content of this image:");
            assert_eq!(bytes.as_slice(), image.as_slice());
        }
        parts => panic!("unexpected parts {parts:?}"),
    }
    assert_eq!(request.max_tokens, 512);
    assert_eq!(
        (request.sampling.temperature, request.sampling.top_p),
        (1.0, 1.0)
    );
    assert!(request.stop.is_empty());
}

#[tokio::test]
async fn think_splits_reasoning_from_content() {
    let server = TestServer::echo().await;
    let mut body = nv_ingest_body(&data_url(&png(8, 8, 1)));
    body["messages"][0]["content"] = json!("/think");
    let body: Value = client()
        .post(server.chat_url())
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let message = &body["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "Let me look at it.");
    let content = message["content"].as_str().unwrap();
    assert!(content.starts_with("echo: Caption"), "{content:?}");
}

#[tokio::test]
async fn empty_generation_is_an_empty_string_not_null() {
    let engine = FakeEngine::new(Script::Deltas(Vec::new(), FinishReason::Stop));
    let server = TestServer::start(engine, ApiConfig::default()).await;
    let body: Value = client()
        .post(server.chat_url())
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "");
    // No `max_tokens`: the engine gets the context length and clamps it.
    assert_eq!(
        server.engine.last_request().max_tokens,
        fake_engine::MAX_MODEL_LEN
    );
}

#[tokio::test]
async fn sampling_parameters_reach_the_engine() {
    let server = TestServer::echo().await;
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 20,
        "seed": 42, "stop": ["x", "y"], "n": 1, "max_tiles": 3, "ignore_eos": true,
        "frequency_penalty": 0.0, "logit_bias": null, "user": "ignored"
    });
    let response = client()
        .post(server.chat_url())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request = server.engine.last_request();
    assert_eq!(request.max_tokens, 7);
    assert_eq!(request.sampling.temperature, 0.0);
    assert_eq!(request.sampling.top_p, 0.5);
    assert_eq!(request.sampling.top_k, 20);
    assert_eq!(request.sampling.seed, Some(42));
    assert_eq!(request.stop, ["x", "y"]);
    assert_eq!(request.max_tiles, Some(3));
    assert!(request.ignore_eos);
}

#[tokio::test]
async fn alias_is_served_under_the_served_name() {
    let config = ApiConfig {
        aliases: vec!["vlm".into()],
        ..ApiConfig::default()
    };
    let server = TestServer::start(FakeEngine::echo(), config).await;
    let body: Value = client()
        .post(server.chat_url())
        .json(&json!({"model": "vlm", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["model"], MODEL);
}

/// Parse an SSE response with a real SSE parser; returns the JSON chunks and
/// whether `[DONE]` closed the stream.
async fn sse_chunks(response: reqwest::Response) -> (Vec<Value>, bool) {
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut events = response.bytes_stream().eventsource();
    let mut chunks = Vec::new();
    let mut done = false;
    while let Some(event) = events.next().await {
        let event = event.expect("a well-formed SSE event");
        assert!(!done, "data after [DONE]: {}", event.data);
        if event.data == "[DONE]" {
            done = true;
        } else {
            chunks.push(serde_json::from_str(&event.data).expect("JSON chunk"));
        }
    }
    (chunks, done)
}

fn delta_text(chunks: &[Value], field: &str) -> String {
    chunks
        .iter()
        .filter_map(|c| {
            c["choices"].get(0)?["delta"][field]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn streaming_sends_role_content_finish_usage_done() {
    let server = TestServer::echo().await;
    let mut body = nv_ingest_body(&data_url(&png(8, 8, 2)));
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = client()
        .post(server.chat_url())
        .json(&body)
        .send()
        .await
        .unwrap();
    let (chunks, done) = sse_chunks(response).await;
    assert!(done, "no [DONE]");

    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], MODEL);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let expected = echo_answer(&server.engine.last_request());
    assert_eq!(delta_text(&chunks, "content"), expected);
    assert_eq!(delta_text(&chunks, "reasoning_content"), "");
    // Several content chunks, one word each.
    let content_chunks = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        })
        .count();
    assert_eq!(content_chunks, expected.split(' ').count());

    let (usage_chunk, rest) = chunks.split_last().unwrap();
    let finish = rest.last().unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert!(
        rest[..rest.len() - 1]
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );
    assert_eq!(usage_chunk["choices"], json!([]));
    let words = expected.split(' ').count() as u64;
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 100, "completion_tokens": words, "total_tokens": 100 + words})
    );
}

#[tokio::test]
async fn streaming_without_usage_and_with_reasoning() {
    let server = TestServer::echo().await;
    let body = json!({
        "model": MODEL, "stream": true,
        "messages": [{"role": "user", "content": "Describe /think"}]
    });
    let response = client()
        .post(server.chat_url())
        .json(&body)
        .send()
        .await
        .unwrap();
    let (chunks, done) = sse_chunks(response).await;
    assert!(done);
    assert!(
        chunks
            .iter()
            .all(|c| c.get("usage").is_none_or(Value::is_null)),
        "{chunks:?}"
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    assert_eq!(
        delta_text(&chunks, "reasoning_content"),
        "Let me look at it."
    );
    let content = delta_text(&chunks, "content");
    assert_eq!(content, "echo: Describe /think images=0 bytes=0");
    // Reasoning strictly before content.
    let first_content = chunks
        .iter()
        .position(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        })
        .unwrap();
    let last_reasoning = chunks
        .iter()
        .rposition(|c| c["choices"][0]["delta"]["reasoning_content"].is_string())
        .unwrap();
    assert!(last_reasoning < first_content);
}

#[tokio::test]
async fn streaming_length_finish_reason() {
    let deltas = vec!["a".to_string(), "b".to_string()];
    let engine = FakeEngine::new(Script::Deltas(deltas, FinishReason::Length));
    let server = TestServer::start(engine, ApiConfig::default()).await;
    let body = json!({"stream": true, "messages": [{"role": "user", "content": "hi /no_think"}]});
    let (chunks, done) = sse_chunks(
        client()
            .post(server.chat_url())
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(done);
    assert_eq!(delta_text(&chunks, "content"), "ab");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test]
async fn failure_mid_stream_sends_an_error_event_then_done() {
    let deltas = vec!["partial ".to_string(), "caption".to_string()];
    let engine = FakeEngine::new(Script::DeltasThenFail(
        deltas,
        EngineError::Internal("device lost".into()),
    ));
    let server = TestServer::start(engine, ApiConfig::default()).await;
    let body = json!({"stream": true, "messages": [{"role": "user", "content": "hi /no_think"}]});
    let (chunks, done) = sse_chunks(
        client()
            .post(server.chat_url())
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(done);
    assert_eq!(delta_text(&chunks, "content"), "partial caption");
    let error = assert_error_body(chunks.last().unwrap());
    assert_eq!(error["message"], "device lost");
    assert_eq!(error["code"], "internal_error");

    // Without streaming the same failure is a plain 500 (retried by nv-ingest).
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    expect_error(client().post(server.chat_url()).json(&body), 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_clients_get_their_own_answers() {
    let engine = FakeEngine::new(Script::Echo {
        delay: std::time::Duration::from_millis(2),
    });
    let server = TestServer::start(engine, ApiConfig::default()).await;
    let url = server.chat_url();
    let tasks: Vec<_> = (0..64u8)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                // Each client its own connection, as python-requests does.
                let client = client();
                let image = png(16, 16, i);
                let mut body = nv_ingest_body(&data_url(&image));
                body["messages"][1]["content"][0]["text"] = json!(format!("client {i}"));
                body["stream"] = json!(i % 2 == 1);
                let response = nv_ingest_post(&client, &url, &body).send().await.unwrap();
                assert_eq!(response.status(), 200);
                let content = if i % 2 == 1 {
                    let (chunks, done) = sse_chunks(response).await;
                    assert!(done);
                    delta_text(&chunks, "content")
                } else {
                    let body: Value = response.json().await.unwrap();
                    assert_eq!(body["choices"].as_array().unwrap().len(), 1);
                    body["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                };
                assert_eq!(
                    content,
                    format!("echo: client {i} images=1 bytes={}", image.len())
                );
                content
            })
        })
        .collect();
    let mut answers = HashSet::new();
    for task in tasks {
        answers.insert(task.await.expect("client task"));
    }
    assert_eq!(answers.len(), 64);
    assert_eq!(server.engine.completed(), 64);
    assert_eq!(server.engine.cancelled(), 0);
}
