//! Scale and availability: HPA and a Deployment without replicas under autoscaling, the PDB,
//! topology spread, and a ServiceMonitor only where its API is served.

mod cluster;
mod fixtures;

use cluster::{CAPTIONERS, Cluster};
use fixtures::FakeChat;
use serde_json::{Value, json};

fn start(spec_extra: Value) -> (std::sync::Arc<vlm_operator::Context>, Cluster) {
    let (ctx, cluster) = Cluster::start(FakeChat::answering("ok"));
    cluster.put(
        "v1/persistentvolumeclaims",
        json!({"apiVersion": "v1",
        "kind": "PersistentVolumeClaim", "metadata": {"name": "weights", "namespace": "nv"}}),
    );
    let mut spec =
        json!({"model": {"pvc": {"claimName": "weights"}}, "healthCheck": {"enabled": false}});
    for (k, v) in spec_extra.as_object().expect("object") {
        spec[k] = v.clone();
    }
    cluster.put(
        CAPTIONERS,
        json!({"apiVersion": "captioning.dev/v1alpha1", "kind": "VlmCaptioner",
        "metadata": {"name": "cap", "namespace": "nv", "generation": 1}, "spec": spec}),
    );
    (ctx, cluster)
}

fn applied_deployment(cluster: &Cluster) -> Value {
    cluster
        .lock()
        .applied
        .iter()
        .rev()
        .find(|b| b["kind"] == "Deployment")
        .cloned()
        .expect("a Deployment apply")
}

#[tokio::test]
async fn autoscaling_applies_an_hpa_and_leaves_replicas_to_it() {
    let (ctx, cluster) = start(json!({"replicas": 1, "autoscaling": {
        "enabled": true, "minReplicas": 1, "maxReplicas": 4, "targetQueueDepth": 6}}));
    cluster.settle(&ctx, "nv", "cap", 4).await;

    let hpa = cluster
        .get("autoscaling/v2/horizontalpodautoscalers", "nv", "cap")
        .expect("HPA");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"],
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "cap"})
    );
    assert_eq!(
        (
            hpa["spec"]["minReplicas"].as_i64(),
            hpa["spec"]["maxReplicas"].as_i64()
        ),
        (Some(1), Some(4))
    );
    let metric = &hpa["spec"]["metrics"][0];
    assert_eq!(metric["type"], "Pods");
    assert_eq!(metric["pods"]["metric"]["name"], "vlm_queue_depth");
    assert_eq!(
        metric["pods"]["target"],
        json!({"type": "AverageValue", "averageValue": "6"})
    );
    assert_eq!(
        hpa["metadata"]["ownerReferences"][0]["kind"],
        "VlmCaptioner"
    );
    assert!(
        applied_deployment(&cluster)["spec"]
            .get("replicas")
            .is_none(),
        "replicas belong to the HPA"
    );
    // Several replicas possible: one disruption at a time.
    let pdb = cluster
        .get("policy/v1/poddisruptionbudgets", "nv", "cap")
        .expect("PDB");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    // The HPA scaled to 3; a later reconcile must not take it back.
    let mut d = cluster
        .get("apps/v1/deployments", "nv", "cap")
        .expect("Deployment");
    d["spec"]["replicas"] = json!(3);
    cluster.put("apps/v1/deployments", d);
    cluster.settle(&ctx, "nv", "cap", 4).await;
    let d = cluster
        .get("apps/v1/deployments", "nv", "cap")
        .expect("Deployment");
    assert_eq!(d["spec"]["replicas"], 3);

    // Autoscaling off: the HPA goes, replicas come back.
    let mut c = cluster.get(CAPTIONERS, "nv", "cap").expect("captioner");
    c["spec"]["autoscaling"]["enabled"] = json!(false);
    cluster.put(CAPTIONERS, c);
    cluster.settle(&ctx, "nv", "cap", 4).await;
    assert!(
        cluster
            .get("autoscaling/v2/horizontalpodautoscalers", "nv", "cap")
            .is_none()
    );
    assert_eq!(applied_deployment(&cluster)["spec"]["replicas"], 1);
}

#[tokio::test]
async fn pdb_never_blocks_a_single_replica_and_pods_spread() {
    let (ctx, cluster) = start(json!({}));
    cluster.settle(&ctx, "nv", "cap", 4).await;
    let pdb = cluster
        .get("policy/v1/poddisruptionbudgets", "nv", "cap")
        .expect("PDB");
    assert_eq!(pdb["spec"]["minAvailable"], 0);
    assert!(pdb["spec"].get("maxUnavailable").is_none());
    assert_eq!(pdb["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
        "cap"
    );

    let spread =
        &applied_deployment(&cluster)["spec"]["template"]["spec"]["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(spread["whenUnsatisfiable"], "ScheduleAnyway");
    assert_eq!(spread["maxSkew"], 1);

    let mut c = cluster.get(CAPTIONERS, "nv", "cap").expect("captioner");
    c["spec"]["replicas"] = json!(2);
    cluster.put(CAPTIONERS, c);
    cluster.settle(&ctx, "nv", "cap", 4).await;
    let pdb = cluster
        .get("policy/v1/poddisruptionbudgets", "nv", "cap")
        .expect("PDB");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert!(
        pdb["spec"].get("minAvailable").is_none(),
        "SSA drops the field we no longer set"
    );
}

#[tokio::test]
async fn no_service_monitor_without_its_api() {
    let (ctx, cluster) = start(json!({}));
    cluster.settle(&ctx, "nv", "cap", 4).await;
    assert!(
        cluster
            .all("monitoring.coreos.com/v1/servicemonitors")
            .is_empty()
    );
    let discovery = cluster
        .lock()
        .requests
        .iter()
        .filter(|(_, p)| p.starts_with("/apis/monitoring.coreos.com/v1?"))
        .count();
    assert_eq!(discovery, 1, "discovered once, then cached");
}

#[tokio::test]
async fn service_monitor_when_its_api_is_served() {
    let (ctx, cluster) = start(json!({"serviceMonitor": {"labels": {"release": "kps"}}}));
    cluster.lock().service_monitor_api = true;
    cluster.settle(&ctx, "nv", "cap", 4).await;
    let sm = cluster
        .get("monitoring.coreos.com/v1/servicemonitors", "nv", "cap")
        .expect("ServiceMonitor");
    assert_eq!(sm["kind"], "ServiceMonitor");
    assert_eq!(sm["metadata"]["labels"]["release"], "kps");
    assert_eq!(sm["metadata"]["ownerReferences"][0]["kind"], "VlmCaptioner");
    assert_eq!(
        sm["spec"]["endpoints"],
        json!([{"port": "http", "path": "/metrics", "interval": "30s"}])
    );
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
        "cap"
    );
}
