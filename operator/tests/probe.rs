//! The chat-endpoint probe: outcomes reach the status and events, nothing is probed without a
//! ready replica, and the real HTTP client talks to a local server shaped like vlm-server.

mod cluster;
mod fixtures;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use cluster::{CAPTIONERS, Cluster, next_trigger};
use fixtures::{Answer, FakeChat};
use serde_json::{Value, json};
use vlm_operator::probe::{self, HyperChatClient, ProbeTarget, Verdict};

fn captioner(health: Value) -> Value {
    json!({
        "apiVersion": "captioning.dev/v1alpha1", "kind": "VlmCaptioner",
        "metadata": {"name": "cap", "namespace": "nv", "generation": 1},
        "spec": {
            "model": {"pvc": {"claimName": "weights"}},
            "auth": {"apiKeySecretRefs": [{"name": "ngc-api", "key": "NGC_API_KEY"}]},
            "healthCheck": health,
        },
    })
}

fn start(chat: Arc<FakeChat>, health: Value) -> (Arc<vlm_operator::Context>, Cluster) {
    let (ctx, cluster) = Cluster::start(chat);
    cluster.put(
        "v1/secrets",
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "ngc-api", "namespace": "nv"}, "data": {"NGC_API_KEY": "c2VjcmV0"}}),
    );
    cluster.put(
        "v1/persistentvolumeclaims",
        json!({"apiVersion": "v1",
        "kind": "PersistentVolumeClaim", "metadata": {"name": "weights", "namespace": "nv"}}),
    );
    cluster.put(CAPTIONERS, captioner(health));
    (ctx, cluster)
}

fn condition(cluster: &Cluster, t: &str) -> (String, String) {
    let c = cluster.get(CAPTIONERS, "nv", "cap").expect("captioner");
    let cond = c["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == t).cloned())
        .unwrap_or(Value::Null);
    (
        cond["status"].as_str().unwrap_or_default().into(),
        cond["reason"].as_str().unwrap_or_default().into(),
    )
}

fn chat_status(cluster: &Cluster) -> Value {
    cluster.get(CAPTIONERS, "nv", "cap").expect("captioner")["status"]["chat"].clone()
}

/// Reconciles, waits for the probe to report, reconciles again.
async fn probe_round(
    ctx: &Arc<vlm_operator::Context>,
    cluster: &Cluster,
    rx: &mut Rx,
    within: Duration,
) {
    cluster.settle(ctx, "nv", "cap", 4).await;
    let r = next_trigger(rx, within).await;
    assert_eq!(r, cluster::captioner_ref("nv", "cap"));
    cluster.settle(ctx, "nv", "cap", 4).await;
}

type Rx = tokio::sync::mpsc::UnboundedReceiver<
    kube::runtime::reflector::ObjectRef<vlm_operator::VlmCaptioner>,
>;

#[tokio::test]
async fn a_good_answer_makes_the_captioner_ready() {
    let chat =
        FakeChat::answering("  A red square on a white background, crossed by a blue line.  ");
    let (ctx, cluster) = start(chat.clone(), json!({}));
    let mut rx = ctx.prober.take_triggers().expect("triggers");

    // One pass (the fake answers at once, so a second pass could already see the answer).
    let c = cluster.captioner("nv", "cap").expect("captioner");
    vlm_operator::reconcile(Arc::new(c), ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(
        condition(&cluster, "ChatReady"),
        ("False".into(), "ChatProbePending".into())
    );
    assert_eq!(
        condition(&cluster, "Ready"),
        ("False".into(), "ChatNotReady".into())
    );

    next_trigger(&mut rx, Duration::from_secs(2)).await;
    cluster.settle(&ctx, "nv", "cap", 4).await;
    assert_eq!(
        condition(&cluster, "ChatReady"),
        ("True".into(), "ChatOk".into())
    );
    assert_eq!(
        condition(&cluster, "Ready"),
        ("True".into(), "AllReplicasReady".into())
    );
    let s = chat_status(&cluster);
    assert_eq!(s["result"], "Succeeded");
    assert!(s["lastSuccessTime"].is_string());
    assert!(s["latencyMs"].is_i64());
    let sample = s["sampleCaption"].as_str().expect("sample");
    assert!(
        sample.starts_with("A red square") && sample.chars().count() <= probe::SAMPLE_CHARS + 1
    );
    let events = cluster.event_reasons();
    assert!(
        events.contains(&"ChatOk".to_string()) && events.contains(&"Ready".to_string()),
        "{events:?}"
    );

    // What went on the wire: the Service URL, the first key as bearer, an nv-ingest body.
    let (url, bearer, body) = chat.requests.lock().expect("lock")[0].clone();
    assert_eq!(url, "http://cap.nv.svc:8000/v1/chat/completions");
    assert_eq!(bearer.as_deref(), Some("secret"));
    assert_eq!(body["model"], "nvidia/nemotron-nano-12b-v2-vl");
    assert_eq!(body["max_tokens"], 8);
    assert_eq!(chat.calls(), 1, "one probe per interval, not per reconcile");
}

#[tokio::test]
async fn a_failing_endpoint_is_reported_and_recovers() {
    let chat = FakeChat::with(Answer::Fail("HTTP 401: invalid API key".into()));
    let (ctx, cluster) = start(chat.clone(), json!({}));
    let mut rx = ctx.prober.take_triggers().expect("triggers");
    probe_round(&ctx, &cluster, &mut rx, Duration::from_secs(2)).await;
    assert_eq!(
        condition(&cluster, "ChatReady"),
        ("False".into(), "ChatProbeFailed".into())
    );
    assert_eq!(condition(&cluster, "Ready").0, "False");
    assert_eq!(
        chat_status(&cluster)["message"],
        "HTTP 401: invalid API key"
    );
    assert!(chat_status(&cluster)["lastSuccessTime"].is_null());
    assert!(
        cluster
            .event_reasons()
            .contains(&"ChatProbeFailed".to_string())
    );

    // The endpoint heals; a spec change (new prompt) probes again at once.
    *chat.answer.lock().expect("lock") = Answer::Caption("ok".into());
    let mut c = cluster.get(CAPTIONERS, "nv", "cap").expect("captioner");
    c["spec"]["captioning"] = json!({"prompt": "Describe:"});
    cluster.put(CAPTIONERS, c);
    probe_round(&ctx, &cluster, &mut rx, Duration::from_secs(2)).await;
    assert_eq!(
        condition(&cluster, "ChatReady"),
        ("True".into(), "ChatOk".into())
    );
    assert_eq!(condition(&cluster, "Ready").0, "True");
    assert_eq!(
        chat.requests.lock().expect("lock")[1].2["messages"][1]["content"][0]["text"],
        "Describe:"
    );
}

#[tokio::test]
async fn a_hanging_endpoint_times_out() {
    let (ctx, cluster) = start(FakeChat::with(Answer::Hang), json!({"timeoutSeconds": 1}));
    let mut rx = ctx.prober.take_triggers().expect("triggers");
    probe_round(&ctx, &cluster, &mut rx, Duration::from_secs(3)).await;
    assert_eq!(
        condition(&cluster, "ChatReady"),
        ("False".into(), "ChatProbeTimedOut".into())
    );
    assert_eq!(chat_status(&cluster)["result"], "TimedOut");
    assert_eq!(chat_status(&cluster)["message"], "no answer within 1s");
    assert!(
        cluster
            .event_reasons()
            .contains(&"ChatProbeTimedOut".to_string())
    );
}

#[tokio::test]
async fn no_probe_without_a_ready_replica() {
    let chat = FakeChat::answering("never");
    let (ctx, cluster) = start(chat.clone(), json!({}));
    cluster.lock().pods_ready = false;
    cluster.settle(&ctx, "nv", "cap", 4).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(chat.calls(), 0);
    assert_eq!(
        condition(&cluster, "ChatReady"),
        ("False".into(), "NoReadyReplicas".into())
    );
    assert_eq!(condition(&cluster, "Ready").1, "ReplicasNotReady");
}

#[tokio::test]
async fn disabled_probe_does_not_gate_ready() {
    let chat = FakeChat::answering("never");
    let (ctx, cluster) = start(chat.clone(), json!({"enabled": false}));
    cluster.settle(&ctx, "nv", "cap", 4).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(chat.calls(), 0);
    assert_eq!(
        condition(&cluster, "ChatReady"),
        ("True".into(), "ProbeDisabled".into())
    );
    assert_eq!(
        condition(&cluster, "Ready"),
        ("True".into(), "AllReplicasReady".into())
    );
}

/// A local server answering like vlm-server: checks the bearer and the request shape.
async fn vlm_server_like() -> String {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(|headers: HeaderMap, Json(body): Json<Value>| async move {
            if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer k1") {
                return (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"error": {"message": "invalid API key"}})),
                );
            }
            let image = &body["messages"][1]["content"][1]["image_url"]["url"];
            if !image
                .as_str()
                .is_some_and(|u| u.starts_with("data:image/png;base64,"))
            {
                return (StatusCode::BAD_REQUEST, Json(json!({"error": "no image"})));
            }
            (
                StatusCode::OK,
                Json(json!({
                    "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "length",
                        "message": {"role": "assistant", "content": "A red square"}}],
                    "usage": {"prompt_tokens": 300, "completion_tokens": 8, "total_tokens": 308},
                })),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    format!("http://{addr}/v1/chat/completions")
}

#[tokio::test]
async fn the_real_client_against_a_local_server() {
    let url = vlm_server_like().await;
    let c: vlm_operator::VlmCaptioner =
        serde_json::from_value(captioner(json!({}))).expect("captioner");
    let target = |bearer: &str| ProbeTarget {
        url: url.clone(),
        bearer: Some(bearer.into()),
        body: probe::request_body(&c).to_string(),
        interval: Duration::from_secs(60),
        timeout: Duration::from_secs(5),
    };
    let client = HyperChatClient::default();
    let ok = probe::run(&client, &target("k1"), None).await;
    assert_eq!(ok.verdict, Verdict::Succeeded, "{ok:?}");
    assert_eq!(ok.caption.as_deref(), Some("A red square"));
    let denied = probe::run(&client, &target("wrong"), None).await;
    assert_eq!(denied.verdict, Verdict::Failed);
    assert!(
        denied
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("HTTP 401")),
        "{denied:?}"
    );
    // Nothing listening: a failure, not a hang.
    let mut gone = target("k1");
    gone.url = "http://127.0.0.1:9/v1/chat/completions".into();
    assert_eq!(
        probe::run(&client, &gone, None).await.verdict,
        Verdict::Failed
    );
}
