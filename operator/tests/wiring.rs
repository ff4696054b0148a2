//! nv-ingest wiring against the stateful fake apiserver: publish into two namespaces, leave a
//! foreign object alone, prune a namespace that leaves the selector, clean up on deletion.

mod cluster;
mod fixtures;

use cluster::{CAPTIONERS, Cluster};
use fixtures::FakeChat;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::ObjectRef;
use serde_json::{Value, json};
use vlm_operator::scope::Scope;
use vlm_operator::wiring::owner_of;

const CM: &str = "v1/configmaps";
const SECRETS: &str = "v1/secrets";
const SERVICES: &str = "v1/services";
const ALIAS: &str = "nemotron-nano-12b-v2-vl";

fn captioner(nv_ingest: Value) -> Value {
    json!({
        "apiVersion": "captioning.dev/v1alpha1", "kind": "VlmCaptioner",
        "metadata": {"name": "cap", "namespace": "nv", "generation": 1},
        "spec": {
            "model": {"pvc": {"claimName": "weights"}},
            "auth": {"apiKeySecretRefs": [
                {"name": "ngc-api", "key": "NGC_API_KEY"}, {"name": "other", "key": "k"}]},
            "nvIngest": nv_ingest,
        },
    })
}

fn cluster_with(nv_ingest: Value) -> (std::sync::Arc<vlm_operator::Context>, Cluster) {
    cluster_in(Scope::Cluster, nv_ingest)
}

fn cluster_in(scope: Scope, nv_ingest: Value) -> (std::sync::Arc<vlm_operator::Context>, Cluster) {
    let (ctx, cluster) = Cluster::start_in(FakeChat::answering("A red square."), scope);
    cluster.put(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "ngc-api", "namespace": "nv"},
        "data": {"NGC_API_KEY": "Zmlyc3Qta2V5"}}),
    ); // "first-key"
    cluster.put(
        SECRETS,
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "other", "namespace": "nv"}, "data": {"k": "c2Vjb25k"}}),
    );
    cluster.put(
        "v1/persistentvolumeclaims",
        json!({"apiVersion": "v1",
        "kind": "PersistentVolumeClaim", "metadata": {"name": "weights", "namespace": "nv"}}),
    );
    cluster.put(CAPTIONERS, captioner(nv_ingest));
    (ctx, cluster)
}

fn owned_by_cap(o: &Value) -> bool {
    let l = &o["metadata"]["labels"];
    l["captioning.dev/owner-namespace"] == "nv"
        && l["captioning.dev/owner-name"] == "cap"
        && l["app.kubernetes.io/managed-by"] == "vlm-operator"
}

fn published_in(cluster: &Cluster, ns: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (coll, kind) in [
        (CM, "ConfigMap"),
        (SECRETS, "Secret"),
        (SERVICES, "Service"),
    ] {
        for o in cluster.all(coll) {
            if o["metadata"]["namespace"] == ns && owned_by_cap(&o) {
                out.push(format!(
                    "{kind}/{}",
                    o["metadata"]["name"].as_str().unwrap_or("")
                ));
            }
        }
    }
    out
}

fn status(cluster: &Cluster) -> Value {
    cluster.get(CAPTIONERS, "nv", "cap").expect("captioner")["status"].clone()
}

fn condition(cluster: &Cluster, t: &str) -> Value {
    status(cluster)["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == t).cloned())
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn publishes_into_two_namespaces() {
    let (ctx, cluster) = cluster_with(json!({"namespaces": ["ingest-a", "ingest-b"]}));
    let passes = cluster.settle(&ctx, "nv", "cap", 6).await;
    assert!(passes <= 4, "{passes} reconciles to settle");

    let c = cluster.get(CAPTIONERS, "nv", "cap").expect("captioner");
    assert_eq!(
        c["metadata"]["finalizers"],
        json!(["captioning.dev/nv-ingest-wiring"])
    );
    for ns in ["ingest-a", "ingest-b"] {
        assert_eq!(
            published_in(&cluster, ns),
            [
                "ConfigMap/cap-nv-ingest",
                "Secret/cap-nv-ingest",
                &format!("Service/{ALIAS}")
            ]
        );
        let cm = cluster.get(CM, ns, "cap-nv-ingest").expect("ConfigMap");
        assert_eq!(
            cm["data"]["VLM_CAPTION_ENDPOINT"],
            "http://cap.nv.svc.cluster.local:8000/v1/chat/completions"
        );
        assert!(
            cm["metadata"]["ownerReferences"].is_null(),
            "no cross-namespace owner refs"
        );
        let secret = cluster.get(SECRETS, ns, "cap-nv-ingest").expect("Secret");
        // base64 of the FIRST referenced key: the one nv-ingest sends.
        assert_eq!(secret["data"]["NGC_API_KEY"], "Zmlyc3Qta2V5");
        assert_eq!(secret["data"]["NVIDIA_API_KEY"], "Zmlyc3Qta2V5");
        let svc = cluster.get(SERVICES, ns, ALIAS).expect("alias");
        assert_eq!(svc["spec"]["type"], "ExternalName");
        assert_eq!(svc["spec"]["externalName"], "cap.nv.svc.cluster.local");
        assert_eq!(svc["spec"]["ports"][0]["port"], 8000);
    }
    assert_eq!(
        status(&cluster)["nvIngest"]["wiredNamespaces"],
        json!(["ingest-a", "ingest-b"])
    );
    let wired = condition(&cluster, "NvIngestWired");
    assert_eq!(
        (wired["status"].as_str(), wired["reason"].as_str()),
        (Some("True"), Some("Published"))
    );
}

#[tokio::test]
async fn a_foreign_object_is_never_overwritten() {
    let (ctx, cluster) = cluster_with(json!({"namespaces": ["ingest-a"]}));
    let foreign = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": ALIAS, "namespace": "ingest-a", "labels": {"app": "nim"}},
        "spec": {"type": "ClusterIP", "ports": [{"port": 8000}]}});
    cluster.put(SERVICES, foreign.clone());
    cluster.settle(&ctx, "nv", "cap", 6).await;

    let svc = cluster
        .get(SERVICES, "ingest-a", ALIAS)
        .expect("foreign Service");
    assert_eq!(svc["spec"], foreign["spec"], "left exactly as it was");
    assert_eq!(svc["metadata"]["labels"], json!({"app": "nim"}));
    assert_eq!(
        status(&cluster)["nvIngest"]["conflicts"],
        json!([format!("ingest-a/Service/{ALIAS}")])
    );
    assert!(status(&cluster)["nvIngest"]["wiredNamespaces"].is_null());
    let wired = condition(&cluster, "NvIngestWired");
    assert_eq!(wired["status"], "False");
    assert_eq!(wired["reason"], "NvIngestConflict");
    assert!(
        cluster
            .event_reasons()
            .contains(&"NvIngestConflict".to_string())
    );
    // The rest of the wiring is still published.
    assert_eq!(
        published_in(&cluster, "ingest-a"),
        ["ConfigMap/cap-nv-ingest", "Secret/cap-nv-ingest"]
    );
}

#[tokio::test]
async fn a_namespace_leaving_the_selector_is_cleaned_up() {
    let (ctx, cluster) = cluster_with(json!({
        "namespaceSelector": {"matchLabels": {"captioning.dev/nv-ingest": "true"}},
        "aliasService": false,
    }));
    cluster.namespace("ingest-a", json!({"captioning.dev/nv-ingest": "true"}));
    cluster.namespace("ingest-b", json!({"captioning.dev/nv-ingest": "true"}));
    cluster.namespace("unrelated", json!({}));
    cluster.settle(&ctx, "nv", "cap", 6).await;
    assert_eq!(
        published_in(&cluster, "ingest-b"),
        ["ConfigMap/cap-nv-ingest", "Secret/cap-nv-ingest"]
    );
    assert!(published_in(&cluster, "unrelated").is_empty());

    cluster.namespace("ingest-b", json!({}));
    cluster.settle(&ctx, "nv", "cap", 6).await;
    assert!(published_in(&cluster, "ingest-b").is_empty(), "pruned");
    assert_eq!(published_in(&cluster, "ingest-a").len(), 2, "kept");
    assert_eq!(
        status(&cluster)["nvIngest"]["wiredNamespaces"],
        json!(["ingest-a"])
    );
}

#[tokio::test]
async fn deletion_removes_everything_through_the_finalizer() {
    let (ctx, cluster) = cluster_with(json!({"namespaces": ["ingest-a", "ingest-b"]}));
    cluster.settle(&ctx, "nv", "cap", 6).await;
    // Someone else's object with our names in another namespace is not touched on cleanup.
    cluster.put(
        CM,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cap-nv-ingest", "namespace": "ingest-c"}}),
    );

    cluster.delete(CAPTIONERS, "nv", "cap");
    assert!(
        cluster.captioner("nv", "cap").is_some(),
        "held by the finalizer"
    );
    cluster.settle(&ctx, "nv", "cap", 4).await;

    assert!(
        cluster.captioner("nv", "cap").is_none(),
        "finalizer removed, object gone"
    );
    for ns in ["ingest-a", "ingest-b"] {
        assert!(
            published_in(&cluster, ns).is_empty(),
            "{ns} still has {:?}",
            published_in(&cluster, ns)
        );
    }
    assert!(cluster.get(CM, "ingest-c", "cap-nv-ingest").is_some());
    // The owned children went with the owner (garbage collection).
    assert!(cluster.get("apps/v1/deployments", "nv", "cap").is_none());
}

#[tokio::test]
async fn no_auth_means_no_secret_and_removing_nv_ingest_unpublishes() {
    let (ctx, cluster) = cluster_with(json!({"namespaces": ["ingest-a"]}));
    cluster.settle(&ctx, "nv", "cap", 6).await;
    let mut c = cluster.get(CAPTIONERS, "nv", "cap").expect("captioner");
    c["spec"]["auth"]["apiKeySecretRefs"] = json!([]);
    cluster.put(CAPTIONERS, c);
    cluster.settle(&ctx, "nv", "cap", 6).await;
    assert_eq!(
        published_in(&cluster, "ingest-a"),
        [
            "ConfigMap/cap-nv-ingest",
            format!("Service/{ALIAS}").as_str()
        ]
    );

    let mut c = cluster.get(CAPTIONERS, "nv", "cap").expect("captioner");
    c["spec"].as_object_mut().expect("spec").remove("nvIngest");
    cluster.put(CAPTIONERS, c);
    cluster.settle(&ctx, "nv", "cap", 6).await;
    assert!(published_in(&cluster, "ingest-a").is_empty());
    assert!(status(&cluster)["nvIngest"].is_null());
    assert!(condition(&cluster, "NvIngestWired").is_null());
}

#[tokio::test]
async fn a_missing_key_keeps_the_last_published_copy() {
    let (ctx, cluster) = cluster_with(json!({"namespaces": ["ingest-a"]}));
    cluster.settle(&ctx, "nv", "cap", 6).await;
    cluster.delete(SECRETS, "nv", "ngc-api");
    cluster.settle(&ctx, "nv", "cap", 6).await;
    let secret = cluster
        .get(SECRETS, "ingest-a", "cap-nv-ingest")
        .expect("kept");
    assert_eq!(secret["data"]["NGC_API_KEY"], "Zmlyc3Qta2V5");
    assert_eq!(condition(&cluster, "Degraded")["reason"], "SecretNotFound");
}

#[tokio::test]
async fn drift_on_a_published_object_wakes_its_owner_which_repairs_it() {
    let (ctx, cluster) = cluster_with(json!({"namespaces": ["ingest-a"]}));
    cluster.settle(&ctx, "nv", "cap", 6).await;
    // Someone edits the published ConfigMap and deletes the published Secret.
    let mut cm = cluster
        .get(CM, "ingest-a", "cap-nv-ingest")
        .expect("ConfigMap");
    cm["data"]["VLM_CAPTION_ENDPOINT"] = json!("http://elsewhere:8000/v1/chat/completions");
    cluster.put(CM, cm.clone());
    let secret = cluster
        .get(SECRETS, "ingest-a", "cap-nv-ingest")
        .expect("Secret");
    cluster.delete(SECRETS, "ingest-a", "cap-nv-ingest");

    // The watch events name the owner through the labels, whatever the namespace.
    for obj in [&cm, &secret] {
        let meta: ObjectMeta =
            serde_json::from_value(obj["metadata"].clone()).expect("metadata deserializes");
        assert_eq!(owner_of(&meta), Some(ObjectRef::new("cap").within("nv")));
    }
    let passes = cluster.settle(&ctx, "nv", "cap", 4).await;
    assert_eq!(passes, 2, "one repair, then nothing to do");
    let cm = cluster
        .get(CM, "ingest-a", "cap-nv-ingest")
        .expect("ConfigMap");
    assert_eq!(
        cm["data"]["VLM_CAPTION_ENDPOINT"],
        "http://cap.nv.svc.cluster.local:8000/v1/chat/completions"
    );
    let secret = cluster
        .get(SECRETS, "ingest-a", "cap-nv-ingest")
        .expect("re-published");
    assert_eq!(secret["data"]["NGC_API_KEY"], "Zmlyc3Qta2V5");
}

#[tokio::test]
async fn namespaced_mode_wires_only_watched_namespaces_and_refuses_a_selector() {
    let (ctx, cluster) = cluster_in(
        Scope::from_namespaces(["nv", "ingest-a"]),
        json!({
            "namespaces": ["ingest-a", "ingest-far"],
            "namespaceSelector": {"matchLabels": {"captioning.dev/nv-ingest": "true"}},
        }),
    );
    cluster.namespace("ingest-b", json!({"captioning.dev/nv-ingest": "true"}));
    let passes = cluster.settle(&ctx, "nv", "cap", 6).await;
    assert!(passes <= 4, "{passes} reconciles to settle");

    assert_eq!(
        published_in(&cluster, "ingest-a"),
        [
            "ConfigMap/cap-nv-ingest",
            "Secret/cap-nv-ingest",
            &format!("Service/{ALIAS}")
        ]
    );
    assert!(published_in(&cluster, "ingest-far").is_empty());
    assert!(published_in(&cluster, "ingest-b").is_empty());
    assert_eq!(
        status(&cluster)["nvIngest"]["wiredNamespaces"],
        json!(["ingest-a"])
    );
    let wired = condition(&cluster, "NvIngestWired");
    assert_eq!(wired["status"], "False");
    assert_eq!(wired["reason"], "NamespaceSelectorUnsupported");
    let message = wired["message"].as_str().unwrap_or_default();
    assert!(
        message
            .contains("spec.nvIngest.namespaceSelector needs the operator's all-namespaces mode")
            && message.contains("not wired: ingest-far")
            && message.contains("watches only ingest-a, nv"),
        "{message}"
    );
    let stalled = condition(&cluster, "Stalled");
    assert_eq!(
        (stalled["status"].as_str(), stalled["reason"].as_str()),
        (Some("True"), Some("NamespaceSelectorUnsupported"))
    );
    assert_eq!(condition(&cluster, "Reconciling")["status"], "False");
    assert!(
        cluster
            .event_reasons()
            .contains(&"NamespaceSelectorUnsupported".to_string())
    );
    // Nothing cluster-wide: a namespaced Role grants no such list.
    let cluster_wide = |path: &str| {
        let path = path.split('?').next().unwrap_or_default();
        [
            "/api/v1/namespaces",
            "/api/v1/configmaps",
            "/api/v1/secrets",
            "/api/v1/services",
        ]
        .contains(&path)
    };
    let requests = cluster.lock().requests.clone();
    assert!(
        requests.iter().all(|(_, p)| !cluster_wide(p)),
        "{requests:?}"
    );

    // Listing only watched namespaces settles it.
    let mut c = cluster.get(CAPTIONERS, "nv", "cap").expect("captioner");
    c["spec"]["nvIngest"] = json!({"namespaces": ["ingest-a"]});
    cluster.put(CAPTIONERS, c);
    cluster.settle(&ctx, "nv", "cap", 6).await;
    assert_eq!(condition(&cluster, "NvIngestWired")["reason"], "Published");
    assert_eq!(condition(&cluster, "Stalled")["status"], "False");

    // The finalizer cleans up within the watched namespaces too.
    cluster.delete(CAPTIONERS, "nv", "cap");
    cluster.settle(&ctx, "nv", "cap", 4).await;
    assert!(cluster.captioner("nv", "cap").is_none());
    assert!(published_in(&cluster, "ingest-a").is_empty());
    let requests = cluster.lock().requests.clone();
    assert!(
        requests.iter().all(|(_, p)| !cluster_wide(p)),
        "{requests:?}"
    );
}
