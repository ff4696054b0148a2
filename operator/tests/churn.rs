//! Churn: 200 captioners created, updated and deleted against the stateful fake apiserver.
//! Afterwards no child and no published object may be left, and every captioner must have
//! settled within a few reconciles (no hot loop).

mod cluster;
mod fixtures;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{CAPTIONERS, Cluster};
use fixtures::FakeChat;
use futures::future::join_all;
use serde_json::{Value, json};

const COUNT: usize = 200;
/// `CHURN_COUNT` overrides the count (e.g. for a quick local run).
fn count() -> usize {
    std::env::var("CHURN_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(COUNT)
}
/// Reconciles one change may take: finalizer, apply + status, a pass that sees nothing to do.
const MAX_PASSES: usize = 4;

fn captioner(i: usize) -> Value {
    json!({
        "apiVersion": "captioning.dev/v1alpha1", "kind": "VlmCaptioner",
        "metadata": {"name": format!("cap-{i}"), "namespace": "nv", "generation": 1},
        "spec": {
            "model": {"pvc": {"claimName": "weights"}},
            "auth": {"apiKeySecretRefs": [{"name": "ngc-api", "key": "NGC_API_KEY"}]},
            // Half wired into nv-ingest namespaces, half probed, a third autoscaled.
            "nvIngest": if i.is_multiple_of(2) {
                json!({"namespaces": ["ingest-a", "ingest-b"], "aliasName": format!("alias-{i}")})
            } else { Value::Null },
            "healthCheck": {"enabled": i % 2 == 1},
            "autoscaling": if i.is_multiple_of(3) {
                json!({"enabled": true, "maxReplicas": 3})
            } else { Value::Null },
        },
    })
}

async fn settle_all(ctx: &Arc<vlm_operator::Context>, cluster: &Cluster, n: usize) -> Vec<usize> {
    join_all((0..n).map(|i| {
        let (ctx, cluster) = (ctx.clone(), cluster.clone());
        async move {
            cluster
                .settle(&ctx, "nv", &format!("cap-{i}"), MAX_PASSES + 2)
                .await
        }
    }))
    .await
}

fn leftovers(cluster: &Cluster) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for coll in [
        CAPTIONERS,
        "apps/v1/deployments",
        "v1/services",
        "v1/configmaps",
        "v1/secrets",
        "policy/v1/poddisruptionbudgets",
        "autoscaling/v2/horizontalpodautoscalers",
    ] {
        let n = cluster
            .all(coll)
            .iter()
            .filter(|o| o["metadata"]["name"] != "ngc-api" && o["metadata"]["name"] != "weights")
            .count();
        if n > 0 {
            out.insert(coll.to_string(), n);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_captioners_leave_nothing_behind() {
    let n = count();
    let started = Instant::now();
    let (ctx, cluster) = Cluster::start(FakeChat::answering("A red square."));
    let mut triggers = ctx.prober.take_triggers().expect("triggers");
    cluster.put(
        "v1/secrets",
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "ngc-api", "namespace": "nv"}, "data": {"NGC_API_KEY": "a2V5"}}),
    );
    cluster.put(
        "v1/persistentvolumeclaims",
        json!({"apiVersion": "v1",
        "kind": "PersistentVolumeClaim", "metadata": {"name": "weights", "namespace": "nv"}}),
    );

    // Create.
    for i in 0..n {
        cluster.put(CAPTIONERS, captioner(i));
    }
    let created = settle_all(&ctx, &cluster, n).await;
    // Probe results arrive and re-trigger only the probed captioners, once each.
    let mut probed = 0;
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(500), triggers.recv()).await
    {
        cluster.settle(&ctx, "nv", &r.name, MAX_PASSES).await;
        probed += 1;
    }
    assert_eq!(probed, n / 2, "one trigger per probed captioner");
    let wired = |ns: &str| {
        cluster
            .all("v1/configmaps")
            .iter()
            .filter(|o| o["metadata"]["namespace"] == ns)
            .count()
    };
    assert_eq!((wired("ingest-a"), wired("ingest-b")), (n / 2, n / 2));
    let ready = (0..n)
        .filter(|i| {
            let c = cluster
                .get(CAPTIONERS, "nv", &format!("cap-{i}"))
                .expect("captioner");
            c["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
        .count();
    assert_eq!(ready, n);

    // Update: a new prompt everywhere, and the wired ones move from ingest-a to ingest-c.
    for i in 0..n {
        let mut c = cluster
            .get(CAPTIONERS, "nv", &format!("cap-{i}"))
            .expect("captioner");
        c["spec"]["captioning"] = json!({"prompt": "Describe the image:"});
        if i.is_multiple_of(2) {
            c["spec"]["nvIngest"]["namespaces"] = json!(["ingest-b", "ingest-c"]);
        }
        cluster.put(CAPTIONERS, c);
    }
    let updated = settle_all(&ctx, &cluster, n).await;
    assert_eq!((wired("ingest-a"), wired("ingest-c")), (0, n / 2));
    let cm = cluster
        .get("v1/configmaps", "ingest-c", "cap-0-nv-ingest")
        .expect("published");
    assert_eq!(cm["data"]["VLM_CAPTION_PROMPT"], "Describe the image:");

    // Delete.
    for i in 0..n {
        cluster.delete(CAPTIONERS, "nv", &format!("cap-{i}"));
    }
    let deleted = settle_all(&ctx, &cluster, n).await;
    assert!(
        leftovers(&cluster).is_empty(),
        "left behind: {:?}",
        leftovers(&cluster)
    );

    let max = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
    let total: usize = created
        .iter()
        .chain(&updated)
        .chain(&deleted)
        .sum::<usize>()
        + probed;
    let (requests, writes) = {
        let s = cluster.lock();
        (s.requests.len(), s.writes)
    };
    println!(
        "churn: {n} captioners, {total} reconciles ({} API requests, {} writes) in {:.2?}; \
         max passes per object: create {}, update {}, delete {}",
        requests,
        writes,
        started.elapsed(),
        max(&created),
        max(&updated),
        max(&deleted),
    );
    assert!(
        max(&created) <= MAX_PASSES && max(&updated) <= MAX_PASSES && max(&deleted) <= MAX_PASSES
    );
}
