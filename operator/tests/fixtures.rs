//! A fake apiserver for reconcile tests (the controller-rs `fixtures.rs` pattern): a `Scenario`
//! is the exact list of API calls the operator must make for a given object, each checked for
//! method, path (with field manager) and body, and answered like the apiserver would.
#![allow(dead_code)] // shared by the tests and the benchmark, which use different parts

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use vlm_operator::Context;
use vlm_operator::crd::VlmCaptioner;
use vlm_operator::probe::{ChatClient, Outcome, ProbeTarget, Verdict};

pub const NS: &str = "nv";
pub const NAME: &str = "cap";
pub const SECRET: &str = "ngc-api";
pub const SECRET_KEY: &str = "NGC_API_KEY";
pub const PVC: &str = "weights";
const APPLY: &str = "?&force=true&fieldManager=vlm-operator";

/// A captioner as the apiserver returns it, referencing one key of nv-ingest's `ngc-api` Secret.
pub fn captioner(name: &str) -> VlmCaptioner {
    let obj = json!({
        "apiVersion": "captioning.dev/v1alpha1",
        "kind": "VlmCaptioner",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
        "spec": {
            "model": {"pvc": {"claimName": PVC}},
            "auth": {"apiKeySecretRefs": [{"name": SECRET, "key": SECRET_KEY}]},
        },
    });
    serde_json::from_value(obj).expect("fixture captioner deserializes")
}

pub fn secret(key: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(SECRET.into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            key.to_string(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

pub fn test_context() -> (Arc<Context>, ApiServerVerifier) {
    test_context_with(FakeChat::answering("A red square on white."))
}

/// A context whose chat probe goes to `chat`, on a cluster without the ServiceMonitor API.
pub fn test_context_with(chat: Arc<FakeChat>) -> (Arc<Context>, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context::new(client, None)
        .with_service_monitors(false)
        .with_chat_client(chat);
    (Arc::new(ctx), ApiServerVerifier(handle))
}

/// A successful probe, as the prober records it.
pub fn probe_ok() -> Outcome {
    Outcome {
        verdict: Verdict::Succeeded,
        latency: Duration::from_millis(120),
        caption: Some("A red square on white.".into()),
        message: None,
        last_success: Some(Time(Timestamp::from_second(1_700_000_000).expect("time"))),
    }
}

/// What the fake chat endpoint does.
#[derive(Clone, Debug)]
pub enum Answer {
    Caption(String),
    Fail(String),
    /// Never answers: the probe times out.
    Hang,
}

/// A chat endpoint that answers as told and records what it was sent.
pub struct FakeChat {
    pub answer: Mutex<Answer>,
    pub requests: Mutex<Vec<(String, Option<String>, Value)>>,
}

impl FakeChat {
    pub fn answering(caption: &str) -> Arc<Self> {
        Self::with(Answer::Caption(caption.into()))
    }

    pub fn with(answer: Answer) -> Arc<Self> {
        Arc::new(Self {
            answer: Mutex::new(answer),
            requests: Mutex::new(Vec::new()),
        })
    }

    pub fn calls(&self) -> usize {
        self.requests.lock().expect("lock").len()
    }
}

impl ChatClient for FakeChat {
    fn post(&self, t: &ProbeTarget) -> BoxFuture<'static, Result<String, String>> {
        let body = serde_json::from_str(&t.body).unwrap_or(Value::Null);
        self.requests
            .lock()
            .expect("lock")
            .push((t.url.clone(), t.bearer.clone(), body));
        match self.answer.lock().expect("lock").clone() {
            Answer::Caption(c) => Box::pin(async move { Ok(c) }),
            Answer::Fail(e) => Box::pin(async move { Err(e) }),
            Answer::Hang => Box::pin(futures::future::pending()),
        }
    }
}

/// How the fake Deployment controller has progressed when the operator applies the Deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pods {
    Starting,
    Ready,
}

/// Given this object, the operator makes exactly these calls.
pub enum Scenario {
    /// All inputs present: read Secret and PVC, apply ConfigMap, Service, Deployment, then the
    /// events for any transitions and a status patch only if the status changed.
    Reconcile {
        secret: Secret,
        pods: Pods,
        events: Vec<&'static str>,
        status_patch: bool,
    },
    /// The Secret (`None`) or its key is missing: ConfigMap and Service are applied, the
    /// Deployment is only read, a Warning event is published and the status says Degraded.
    Blocked {
        secret: Option<Secret>,
        events: Vec<&'static str>,
    },
    /// The apiserver fails the first apply; nothing else is attempted.
    ApplyFails,
}

/// A request the fake apiserver saw, for assertions after the fact.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub body: Value,
}

/// The status patch among the calls.
pub fn status_patch(seen: &[Seen]) -> &Seen {
    seen.iter()
        .find(|s| s.uri.contains("/status?"))
        .expect("a status patch")
}

impl Seen {
    pub fn status_condition(&self, type_: &str) -> &Value {
        self.body["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
            .unwrap_or(&Value::Null)
    }
}

pub struct ApiServerVerifier(tower_test::mock::Handle<Request<Body>, Response<Body>>);

/// Fails the test if the scenario is not completed within a second.
pub async fn timeout_after_1s(handle: tokio::task::JoinHandle<Vec<Seen>>) -> Vec<Seen> {
    tokio::time::timeout(Duration::from_secs(1), handle)
        .await
        .expect("timeout on mock apiserver")
        .expect("scenario succeeded")
}

fn path(kind_path: &str, name: &str) -> String {
    format!("{kind_path}/namespaces/{NS}/{name}")
}

impl ApiServerVerifier {
    /// Plays the scenario, then returns what it saw. After the last expected call the handle is
    /// dropped, so any extra call fails the reconcile with a closed-service error.
    pub fn run(self, scenario: Scenario) -> tokio::task::JoinHandle<Vec<Seen>> {
        tokio::spawn(async move {
            let mut s = Session {
                handle: self.0,
                seen: Vec::new(),
            };
            match scenario {
                Scenario::Reconcile {
                    secret,
                    pods,
                    events,
                    status_patch,
                } => {
                    s.get_secret(Some(secret)).await;
                    s.get_pvc().await;
                    s.apply_config_map().await;
                    s.apply_service().await;
                    s.apply_deployment(pods).await;
                    s.apply_pdb().await;
                    s.delete_hpa().await;
                    if status_patch {
                        s.patch_status().await;
                    }
                    for reason in events {
                        s.event(reason).await;
                    }
                }
                Scenario::Blocked { secret, events } => {
                    s.get_secret(secret).await;
                    s.get_pvc().await;
                    s.apply_config_map().await;
                    s.apply_service().await;
                    s.expect(
                        Method::GET,
                        path("/apis/apps/v1", "deployments/cap"),
                        |_| not_found("deployments.apps \"cap\""),
                    )
                    .await;
                    s.apply_pdb().await;
                    s.delete_hpa().await;
                    s.patch_status().await;
                    for reason in events {
                        s.event(reason).await;
                    }
                }
                Scenario::ApplyFails => {
                    s.get_secret(Some(secret(SECRET_KEY, "k"))).await;
                    s.get_pvc().await;
                    let uri = format!("{}{APPLY}", path("/api/v1", "configmaps/cap-nv-ingest"));
                    s.expect(Method::PATCH, uri, |_| {
                        (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            status_body(500, "InternalError", "etcd is down"),
                        )
                    })
                    .await;
                }
            }
            s.seen
        })
    }
}

struct Session {
    handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    seen: Vec<Seen>,
}

impl Session {
    /// Expects the next request to be `method uri`, answers it with `respond(body)`.
    async fn expect(
        &mut self,
        method: Method,
        uri: String,
        respond: impl FnOnce(&Value) -> (StatusCode, Value),
    ) {
        let (request, send) = self
            .handle
            .next_request()
            .await
            .expect("service not called");
        assert_eq!(request.method(), method, "method of {}", request.uri());
        assert_eq!(request.uri().to_string(), uri);
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("request body is JSON")
        };
        let (status, reply) = respond(&body);
        self.seen.push(Seen { method, uri, body });
        let response = Response::builder()
            .status(status)
            .body(Body::from(
                serde_json::to_vec(&reply).expect("reply serializes"),
            ))
            .expect("response builds");
        send.send_response(response);
    }

    async fn get_secret(&mut self, secret: Option<Secret>) {
        let uri = path("/api/v1", &format!("secrets/{SECRET}"));
        self.expect(Method::GET, uri, move |_| match secret {
            Some(s) => (
                StatusCode::OK,
                serde_json::to_value(s).expect("secret serializes"),
            ),
            None => not_found("secrets \"ngc-api\""),
        })
        .await;
    }

    async fn get_pvc(&mut self) {
        let uri = path("/api/v1", &format!("persistentvolumeclaims/{PVC}"));
        self.expect(Method::GET, uri, |_| {
            let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": PVC, "namespace": NS}, "spec": {}});
            (StatusCode::OK, pvc)
        })
        .await;
    }

    async fn apply_config_map(&mut self) {
        let uri = format!("{}{APPLY}", path("/api/v1", "configmaps/cap-nv-ingest"));
        self.expect(Method::PATCH, uri, |b| {
            assert_eq!(b["kind"], "ConfigMap");
            assert_eq!(
                b["data"]["VLM_CAPTION_ENDPOINT"],
                "http://cap.nv.svc.cluster.local:8000/v1/chat/completions"
            );
            assert_owned(b);
            (StatusCode::OK, b.clone())
        })
        .await;
    }

    async fn apply_service(&mut self) {
        let uri = format!("{}{APPLY}", path("/api/v1", "services/cap"));
        self.expect(Method::PATCH, uri, |b| {
            assert_eq!(b["kind"], "Service");
            assert_eq!(b["spec"]["ports"][0]["port"], 8000);
            assert_owned(b);
            (StatusCode::OK, b.clone())
        })
        .await;
    }

    async fn apply_deployment(&mut self, pods: Pods) {
        let uri = format!("{}{APPLY}", path("/apis/apps/v1", "deployments/cap"));
        self.expect(Method::PATCH, uri, move |b| {
            assert_eq!(b["kind"], "Deployment");
            assert_owned(b);
            let env = &b["spec"]["template"]["spec"]["containers"][0]["env"][0];
            assert_eq!(env["name"], "VLM_API_KEY_0");
            assert_eq!(
                env["valueFrom"]["secretKeyRef"],
                json!({"name": SECRET, "key": SECRET_KEY, "optional": false})
            );
            (StatusCode::OK, deployment_reply(b, pods))
        })
        .await;
    }

    async fn apply_pdb(&mut self) {
        let uri = format!(
            "{}{APPLY}",
            path("/apis/policy/v1", "poddisruptionbudgets/cap")
        );
        self.expect(Method::PATCH, uri, |b| {
            assert_eq!(b["kind"], "PodDisruptionBudget");
            assert_eq!(
                b["spec"]["minAvailable"], 0,
                "one replica: drains are never blocked"
            );
            assert_owned(b);
            (StatusCode::OK, b.clone())
        })
        .await;
    }

    /// Autoscaling is off: a leftover HPA is deleted (here there is none).
    async fn delete_hpa(&mut self) {
        let uri = path("/apis/autoscaling/v2", "horizontalpodautoscalers/cap?");
        self.expect(Method::DELETE, uri, |_| {
            not_found("horizontalpodautoscalers.autoscaling \"cap\"")
        })
        .await;
    }

    async fn event(&mut self, reason: &'static str) {
        let uri = format!("/apis/events.k8s.io/v1/namespaces/{NS}/events?");
        self.expect(Method::POST, uri, move |b| {
            assert_eq!(b["reason"], reason, "event {b}");
            assert_eq!(b["regarding"]["kind"], "VlmCaptioner");
            assert_eq!(b["reportingController"], "vlm-operator");
            (StatusCode::CREATED, b.clone())
        })
        .await;
    }

    async fn patch_status(&mut self) {
        let uri = format!(
            "/apis/captioning.dev/v1alpha1/namespaces/{NS}/vlmcaptioners/{NAME}/status{APPLY}"
        );
        self.expect(Method::PATCH, uri, |b| {
            assert_eq!(b["apiVersion"], "captioning.dev/v1alpha1");
            assert_eq!(b["kind"], "VlmCaptioner");
            let mut reply = serde_json::to_value(captioner(NAME)).expect("captioner serializes");
            reply["status"] = b["status"].clone();
            (StatusCode::OK, reply)
        })
        .await;
    }
}

fn assert_owned(b: &Value) {
    let owner = &b["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "VlmCaptioner", "owner of {}", b["kind"]);
    assert_eq!(owner["controller"], true);
    assert_eq!(b["metadata"]["namespace"], NS);
}

/// The applied Deployment as the apiserver returns it, with the status the pods have reached.
pub fn deployment_reply(applied: &Value, pods: Pods) -> Value {
    let mut d = applied.clone();
    d["metadata"]["generation"] = json!(1);
    let ready = i32::from(pods == Pods::Ready);
    d["status"] = json!({
        "observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": ready,
    });
    d
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
        "code": code, "reason": reason, "message": message})
}

fn not_found(what: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        status_body(404, "NotFound", &format!("{what} not found")),
    )
}

/// Answers any number of calls like a healthy cluster (for the benchmark, not for assertions).
pub async fn serve_everything(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
) {
    while let Some((request, send)) = handle.next_request().await {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let method = request.method().clone();
        let uri = request.uri().path().to_string();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if method == Method::DELETE {
            let (status, body) = not_found("object");
            if let Ok(r) = Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).unwrap_or_default()))
            {
                send.send_response(r);
            }
            continue;
        }
        let reply = if method == Method::GET && uri.contains("/secrets/") {
            serde_json::to_value(secret(SECRET_KEY, "k")).unwrap_or_default()
        } else if method == Method::GET {
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": PVC}})
        } else if uri.contains("/deployments/") {
            deployment_reply(&body, Pods::Ready)
        } else if uri.ends_with("/status") {
            let name = uri.rsplit('/').nth(1).unwrap_or(NAME);
            let mut c = serde_json::to_value(captioner(name)).unwrap_or_default();
            c["status"] = body["status"].clone();
            c
        } else {
            body
        };
        let response =
            Response::builder().body(Body::from(serde_json::to_vec(&reply).unwrap_or_default()));
        if let Ok(r) = response {
            send.send_response(r);
        }
    }
}

pub fn bench_context() -> (
    Arc<Context>,
    tower_test::mock::Handle<Request<Body>, Response<Body>>,
) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = Context::new(Client::new(service, "default"), None)
        .with_service_monitors(false)
        .with_chat_client(FakeChat::answering("A red square on white."));
    (Arc::new(ctx), handle)
}
