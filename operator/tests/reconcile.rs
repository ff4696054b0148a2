//! Reconcile against a fake apiserver: each test reads "given this object, the operator makes
//! exactly these API calls".

mod fixtures;

use std::sync::Arc;
use std::time::Duration;

use fixtures::{
    NAME, NS, Pods, SECRET, SECRET_KEY, Scenario, Seen, captioner, secret, status_patch,
    test_context, timeout_after_1s,
};
use http::Method;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use vlm_operator::builders::SECRET_HASH_ANNOTATION;
use vlm_operator::crd::{VlmCaptioner, VlmCaptionerStatus};
use vlm_operator::inputs::hash_keys;
use vlm_operator::{error_policy, reconcile};

fn status_of(seen: &[Seen]) -> VlmCaptionerStatus {
    serde_json::from_value(status_patch(seen).body["status"].clone()).expect("status deserializes")
}

fn hash_annotation(seen: &[Seen]) -> String {
    let d = seen
        .iter()
        .find(|s| s.uri.contains("/deployments/"))
        .expect("a Deployment apply");
    d.body["spec"]["template"]["metadata"]["annotations"][SECRET_HASH_ANNOTATION]
        .as_str()
        .expect("hash annotation")
        .to_string()
}

fn with_status(status: VlmCaptionerStatus) -> Arc<VlmCaptioner> {
    let mut c = captioner(NAME);
    c.status = Some(status);
    Arc::new(c)
}

/// First reconcile of a new captioner, returning the status it wrote.
async fn first_reconcile() -> VlmCaptionerStatus {
    let (ctx, server) = test_context();
    let mock = server.run(Scenario::Reconcile {
        secret: secret(SECRET_KEY, "key-1"),
        pods: Pods::Starting,
        events: vec!["RollingOut"],
        status_patch: true,
    });
    reconcile(Arc::new(captioner(NAME)), ctx)
        .await
        .expect("reconcile succeeds");
    status_of(&timeout_after_1s(mock).await)
}

#[tokio::test]
async fn new_captioner_applies_children_and_reports_progressing() {
    let (ctx, server) = test_context();
    let mock = server.run(Scenario::Reconcile {
        secret: secret(SECRET_KEY, "key-1"),
        pods: Pods::Starting,
        events: vec!["RollingOut"],
        status_patch: true,
    });
    let action = reconcile(Arc::new(captioner(NAME)), ctx)
        .await
        .expect("reconcile succeeds");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    let seen = timeout_after_1s(mock).await;

    let methods: Vec<&Method> = seen.iter().map(|s| &s.method).collect();
    assert_eq!(
        methods,
        [
            &Method::GET,
            &Method::GET,
            &Method::PATCH,
            &Method::PATCH,
            &Method::PATCH,
            &Method::PATCH,
            &Method::DELETE,
            &Method::PATCH,
            &Method::POST
        ]
    );
    assert_eq!(
        hash_annotation(&seen),
        hash_keys(&[(SECRET, SECRET_KEY, b"key-1")])
    );
    // The key itself never appears in anything the operator writes.
    assert!(seen.iter().all(|s| !s.body.to_string().contains("key-1")));

    let patch = status_patch(&seen);
    assert_eq!(patch.status_condition("Ready")["status"], "False");
    assert_eq!(
        patch.status_condition("Ready")["reason"],
        "ReplicasNotReady"
    );
    assert_eq!(patch.status_condition("Progressing")["status"], "True");
    assert_eq!(patch.status_condition("Degraded")["status"], "False");
    // kstatus: in progress, not failed.
    assert_eq!(patch.status_condition("Reconciling")["status"], "True");
    assert_eq!(
        patch.status_condition("Reconciling")["reason"],
        "RollingOut"
    );
    assert_eq!(patch.status_condition("Stalled")["status"], "False");
    assert_eq!(patch.body["status"]["observedGeneration"], 1);
    assert_eq!(patch.status_condition("Ready")["observedGeneration"], 1);
    assert_eq!(
        patch.body["status"]["endpoint"],
        "http://cap.nv.svc.cluster.local:8000/v1/chat/completions"
    );
}

#[tokio::test]
async fn unchanged_captioner_writes_no_status_and_no_events() {
    let status = first_reconcile().await;
    let (ctx, server) = test_context();
    let mock = server.run(Scenario::Reconcile {
        secret: secret(SECRET_KEY, "key-1"),
        pods: Pods::Starting,
        events: vec![],
        status_patch: false,
    });
    reconcile(with_status(status), ctx)
        .await
        .expect("reconcile succeeds");
    let seen = timeout_after_1s(mock).await;
    // Only the reads, the four idempotent applies and the HPA clean-up.
    assert_eq!(seen.len(), 7);
    assert!(seen.iter().all(|s| !s.uri.contains("/status")));
}

#[tokio::test]
async fn missing_secret_degrades_and_keeps_the_running_deployment() {
    let (ctx, server) = test_context();
    let mock = server.run(Scenario::Blocked {
        secret: None,
        events: vec!["SecretNotFound"],
    });
    let action = reconcile(Arc::new(captioner(NAME)), ctx)
        .await
        .expect("a missing Secret is not an error");
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    let seen = timeout_after_1s(mock).await;
    assert!(
        !seen
            .iter()
            .any(|s| s.method == Method::PATCH && s.uri.contains("/deployments/")),
        "the Deployment must not be applied without its Secret"
    );
    let patch = status_patch(&seen);
    let degraded = patch.status_condition("Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "SecretNotFound");
    assert_eq!(
        degraded["message"],
        "Secret \"ngc-api\" (spec.auth.apiKeySecretRefs[0]) not found in namespace \"nv\""
    );
    assert_eq!(patch.status_condition("Ready")["status"], "False");
    assert_eq!(
        patch.status_condition("Progressing")["reason"],
        "SecretNotFound"
    );
    // kstatus: failed until someone creates the Secret; never also reconciling.
    let stalled = patch.status_condition("Stalled");
    assert_eq!(
        (&stalled["status"], &stalled["reason"], &stalled["message"]),
        (
            &degraded["status"],
            &degraded["reason"],
            &degraded["message"]
        )
    );
    assert_eq!(patch.status_condition("Reconciling")["status"], "False");
    assert_eq!(patch.status_condition("Reconciling")["reason"], "Blocked");
}

#[tokio::test]
async fn missing_key_in_secret_degrades() {
    let (ctx, server) = test_context();
    let mock = server.run(Scenario::Blocked {
        secret: Some(secret("OTHER_KEY", "x")),
        events: vec!["SecretKeyNotFound"],
    });
    reconcile(Arc::new(captioner(NAME)), ctx)
        .await
        .expect("a missing key is not an error");
    let seen = timeout_after_1s(mock).await;
    let degraded = status_patch(&seen).status_condition("Degraded").clone();
    assert_eq!(degraded["reason"], "SecretKeyNotFound");
    assert_eq!(
        degraded["message"],
        "Secret \"ngc-api\" has no key \"NGC_API_KEY\" (spec.auth.apiKeySecretRefs[0])"
    );
}

#[tokio::test]
async fn deployment_becoming_ready_sets_ready_true() {
    let status = first_reconcile().await;
    let (ctx, server) = test_context();
    // The chat probe already answered (see tests/probe.rs for the probe itself).
    ctx.prober
        .record(ObjectRef::new(NAME).within(NS), fixtures::probe_ok());
    let mock = server.run(Scenario::Reconcile {
        secret: secret(SECRET_KEY, "key-1"),
        pods: Pods::Ready,
        events: vec!["Ready", "ChatOk"],
        status_patch: true,
    });
    reconcile(with_status(status.clone()), ctx)
        .await
        .expect("reconcile succeeds");
    let new = status_of(&timeout_after_1s(mock).await);
    let get = |s: &VlmCaptionerStatus, t: &str| {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .cloned()
            .expect("condition")
    };
    assert_eq!(get(&new, "Ready").status, "True");
    assert_eq!(get(&new, "Ready").reason, "AllReplicasReady");
    assert_eq!(get(&new, "Progressing").status, "False");
    assert_eq!(new.ready_replicas, Some(1));
    // kstatus: current.
    assert_eq!(get(&new, "Reconciling").status, "False");
    assert_eq!(get(&new, "Reconciling").reason, "Reconciled");
    assert_eq!(get(&new, "Stalled").status, "False");
    assert_eq!(
        get(&new, "Stalled").last_transition_time,
        get(&status, "Stalled").last_transition_time,
        "Stalled stayed False"
    );
    // Degraded did not flip, so its transition time is kept.
    assert_eq!(
        get(&new, "Degraded").last_transition_time,
        get(&status, "Degraded").last_transition_time
    );
}

#[tokio::test]
async fn secret_rotation_changes_the_pod_template_hash() {
    let status = first_reconcile().await;
    let mut hashes = Vec::new();
    for key in ["key-1", "key-2"] {
        let (ctx, server) = test_context();
        let mock = server.run(Scenario::Reconcile {
            secret: secret(SECRET_KEY, key),
            pods: Pods::Starting,
            events: vec![],
            status_patch: false,
        });
        reconcile(with_status(status.clone()), ctx)
            .await
            .expect("reconcile succeeds");
        hashes.push(hash_annotation(&timeout_after_1s(mock).await));
    }
    assert_ne!(hashes[0], hashes[1], "a rotated key must roll the pods");
    assert_eq!(hashes[1], hash_keys(&[(SECRET, SECRET_KEY, b"key-2")]));
}

#[tokio::test]
async fn api_errors_back_off_per_object() {
    let (ctx, server) = test_context();
    let mock = server.run(Scenario::ApplyFails);
    let c = Arc::new(captioner(NAME));
    let err = reconcile(c.clone(), ctx.clone())
        .await
        .expect_err("apply fails");
    assert!(
        err.to_string()
            .contains("apply ConfigMap \"cap-nv-ingest\""),
        "{err}"
    );
    timeout_after_1s(mock).await;
    let delays: Vec<Action> = (0..3)
        .map(|_| error_policy(c.clone(), &err, ctx.clone()))
        .collect();
    assert_eq!(
        delays,
        [5, 10, 20].map(|s| Action::requeue(Duration::from_secs(s)))
    );
    // Another captioner starts from the base delay.
    let other = Arc::new(captioner("other"));
    assert_eq!(
        error_policy(other, &err, ctx),
        Action::requeue(Duration::from_secs(5))
    );
}
