//! `spec.model.download` against a fake apiserver that answers like a cluster: the PVC and the
//! download Job come first, the Deployment only once the Job has succeeded.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::batch::v1::Job;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use vlm_operator::builders::download_job;
use vlm_operator::crd::VlmCaptioner;
use vlm_operator::{Context, reconcile};

const NS: &str = "nv";
const NAME: &str = "cap";

fn captioner() -> VlmCaptioner {
    serde_json::from_value(json!({
        "apiVersion": "captioning.dev/v1alpha1",
        "kind": "VlmCaptioner",
        "metadata": {"name": NAME, "namespace": NS, "uid": "uid-cap", "generation": 1},
        "spec": {"model": {"download": {"revision": "v1", "tokenSecretRef": {"name": "hf", "key": "token"}}}},
    }))
    .expect("fixture deserializes")
}

/// What the fake cluster holds when the reconcile runs.
#[derive(Clone)]
struct Cluster {
    pvc_exists: bool,
    job: Option<Job>,
    token_secret: bool,
}

#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    body: Value,
}

fn job_with(status: Value) -> Job {
    let c = captioner();
    let dl = c.spec.model.download.clone().expect("download source");
    let mut job = serde_json::to_value(download_job(&c, &dl)).expect("job serializes");
    job["status"] = status;
    serde_json::from_value(job).expect("job deserializes")
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found"}),
    )
}

/// Runs one reconcile against `cluster` and returns every call it made.
async fn reconcile_in(cluster: Cluster) -> Vec<Seen> {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx =
        Arc::new(Context::new(Client::new(service, "default"), None).with_service_monitors(false));
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().clone();
            let path = request.uri().path().to_string();
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (code, reply) = answer(&cluster, &method, &path, &body);
            seen.push(Seen { method, path, body });
            let response = Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&reply).unwrap_or_default()))
                .expect("response");
            send.send_response(response);
        }
        seen
    });
    reconcile(Arc::new(captioner()), ctx.clone())
        .await
        .expect("reconcile succeeds");
    drop(ctx);
    tokio::time::timeout(std::time::Duration::from_secs(2), server)
        .await
        .expect("the client goes away")
        .expect("mock server")
}

fn answer(cluster: &Cluster, method: &Method, path: &str, body: &Value) -> (StatusCode, Value) {
    let get = method == Method::GET;
    if get && path.ends_with("/secrets/hf") {
        if !cluster.token_secret {
            return not_found();
        }
        return (
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "hf", "namespace": NS}, "data": {"token": "aGY="}}),
        );
    }
    if get && path.contains("/persistentvolumeclaims/") {
        if !cluster.pvc_exists {
            return not_found();
        }
        return (
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "cap-model", "namespace": NS}}),
        );
    }
    if get && path.contains("/jobs/") {
        return match &cluster.job {
            Some(j) => (StatusCode::OK, serde_json::to_value(j).unwrap_or_default()),
            None => not_found(),
        };
    }
    if get || method == Method::DELETE {
        return not_found();
    }
    if method == Method::POST {
        return (StatusCode::CREATED, body.clone());
    }
    if path.ends_with("/status") {
        let mut c = serde_json::to_value(captioner()).unwrap_or_default();
        c["status"] = body["status"].clone();
        return (StatusCode::OK, c);
    }
    if path.contains("/deployments/") {
        let mut d = body.clone();
        d["metadata"]["generation"] = json!(1);
        d["status"] = json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1});
        return (StatusCode::OK, d);
    }
    (StatusCode::OK, body.clone())
}

fn find<'a>(seen: &'a [Seen], method: Method, part: &str) -> Option<&'a Seen> {
    seen.iter()
        .find(|s| s.method == method && s.path.contains(part))
}

fn event_reasons(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter(|s| s.method == Method::POST && s.path.ends_with("/events"))
        .map(|s| s.body["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn condition<'a>(seen: &'a [Seen], type_: &str) -> &'a Value {
    let status = find(seen, Method::PATCH, "/status").expect("a status patch");
    status.body["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn first_reconcile_creates_the_pvc_and_the_job_but_no_deployment() {
    let seen = reconcile_in(Cluster {
        pvc_exists: false,
        job: None,
        token_secret: true,
    })
    .await;

    let pvc = find(&seen, Method::POST, "/persistentvolumeclaims").expect("PVC created");
    assert_eq!(pvc.body["metadata"]["name"], "cap-model");
    assert_eq!(pvc.body["spec"]["accessModes"], json!(["ReadWriteOnce"]));
    assert_eq!(pvc.body["spec"]["resources"]["requests"]["storage"], "60Gi");
    assert!(
        pvc.body["metadata"]["ownerReferences"].is_null(),
        "the weights outlive the captioner"
    );

    let job = find(&seen, Method::POST, "/jobs").expect("Job created");
    assert_eq!(
        job.body["metadata"]["ownerReferences"][0]["kind"],
        "VlmCaptioner"
    );
    let pod = &job.body["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        container["args"],
        json!([
            "download",
            "--repo",
            "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16",
            "--revision",
            "v1",
            "--dir",
            "/model"
        ])
    );
    assert_eq!(container["env"][0]["name"], "HF_TOKEN");
    assert_eq!(
        container["env"][0]["valueFrom"]["secretKeyRef"],
        json!({"name": "hf", "key": "token", "optional": false})
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(
        pod["volumes"][0]["persistentVolumeClaim"],
        json!({"claimName": "cap-model", "readOnly": false})
    );
    assert_eq!(container["volumeMounts"][1]["mountPath"], "/tmp");
    assert_ne!(
        job.body["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"], "vlm-server",
        "the download pod must not match the Service selector"
    );

    assert!(
        find(&seen, Method::PATCH, "/deployments/").is_none(),
        "no Deployment before the weights are there"
    );
    let model_ready = condition(&seen, "ModelReady");
    assert_eq!(model_ready["status"], "False");
    assert_eq!(model_ready["reason"], "Downloading");
    assert_eq!(condition(&seen, "Progressing")["status"], "True");
    assert_eq!(condition(&seen, "Progressing")["reason"], "Downloading");
    assert_eq!(condition(&seen, "Degraded")["status"], "False");
    assert_eq!(condition(&seen, "Reconciling")["status"], "True");
    assert_eq!(condition(&seen, "Reconciling")["reason"], "Downloading");
    assert_eq!(condition(&seen, "Stalled")["status"], "False");
    // ModelReady's change is an event; a download is not a rollout.
    assert_eq!(event_reasons(&seen), ["Downloading"]);
}

#[tokio::test]
async fn a_running_job_is_left_alone() {
    let seen = reconcile_in(Cluster {
        pvc_exists: true,
        job: Some(job_with(json!({"active": 1}))),
        token_secret: true,
    })
    .await;
    assert!(find(&seen, Method::POST, "/").is_none_or(|s| s.path.contains("/events")));
    assert!(find(&seen, Method::DELETE, "/jobs/").is_none());
    assert!(find(&seen, Method::PATCH, "/deployments/").is_none());
    assert_eq!(condition(&seen, "ModelReady")["reason"], "Downloading");
}

#[tokio::test]
async fn a_succeeded_job_releases_the_deployment_with_a_read_only_mount() {
    let seen = reconcile_in(Cluster {
        pvc_exists: true,
        job: Some(job_with(
            json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}),
        )),
        token_secret: true,
    })
    .await;

    assert!(find(&seen, Method::POST, "/jobs").is_none(), "not re-run");
    assert!(find(&seen, Method::POST, "/persistentvolumeclaims").is_none());
    let d = find(&seen, Method::PATCH, "/deployments/").expect("Deployment applied");
    let pod = &d.body["spec"]["template"]["spec"];
    assert_eq!(d.body["spec"]["progressDeadlineSeconds"], 2400);
    assert_eq!(
        pod["containers"][0]["image"],
        concat!("vlm-server:", env!("CARGO_PKG_VERSION")),
        "no spec.image: the operator's default"
    );
    assert_eq!(
        pod["volumes"][0]["persistentVolumeClaim"],
        json!({"claimName": "cap-model", "readOnly": true})
    );
    assert_eq!(pod["containers"][0]["volumeMounts"][0]["readOnly"], true);
    let model_ready = condition(&seen, "ModelReady");
    assert_eq!(model_ready["status"], "True");
    assert_eq!(model_ready["reason"], "Downloaded");
    assert!(event_reasons(&seen).contains(&"Downloaded".to_string()));
}

#[tokio::test]
async fn a_failed_job_degrades_and_holds_the_deployment() {
    let seen = reconcile_in(Cluster {
        pvc_exists: true,
        job: Some(job_with(json!({"failed": 5, "conditions": [{"type": "Failed", "status": "True",
            "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}))),
        token_secret: true,
    })
    .await;

    assert!(find(&seen, Method::PATCH, "/deployments/").is_none());
    assert!(
        find(&seen, Method::DELETE, "/jobs/").is_none(),
        "same template: not retried blindly"
    );
    let degraded = condition(&seen, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "ModelDownloadFailed");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap_or_default()
            .contains("BackoffLimitExceeded")
    );
    assert_eq!(condition(&seen, "ModelReady")["status"], "False");
    let stalled = condition(&seen, "Stalled");
    assert_eq!(
        (stalled["status"].as_str(), stalled["reason"].as_str()),
        (Some("True"), Some("ModelDownloadFailed"))
    );
    assert_eq!(condition(&seen, "Reconciling")["status"], "False");
    // One Warning (through Degraded), not a second one for ModelReady.
    assert_eq!(event_reasons(&seen), ["ModelDownloadFailed"]);
}

#[tokio::test]
async fn a_job_for_another_revision_is_replaced() {
    let mut job = job_with(json!({"succeeded": 1}));
    job.metadata.annotations.get_or_insert_default().insert(
        "captioning.dev/model-source".into(),
        "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16@v0".into(),
    );
    let seen = reconcile_in(Cluster {
        pvc_exists: true,
        job: Some(job),
        token_secret: true,
    })
    .await;

    let delete = find(&seen, Method::DELETE, "/jobs/cap-model-download").expect("old Job deleted");
    assert_eq!(delete.body["propagationPolicy"], "Foreground");
    assert!(find(&seen, Method::PATCH, "/deployments/").is_none());
}

#[tokio::test]
async fn a_missing_token_secret_blocks_before_any_job() {
    let seen = reconcile_in(Cluster {
        pvc_exists: false,
        job: None,
        token_secret: false,
    })
    .await;

    assert!(find(&seen, Method::POST, "/jobs").is_none());
    assert!(find(&seen, Method::POST, "/persistentvolumeclaims").is_none());
    assert_eq!(
        condition(&seen, "Degraded")["reason"],
        "TokenSecretNotFound"
    );
}
