use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;
use crate::crd::{HostPathSource, ModelSource};
use crate::test_support::captioner;

fn container(d: &k8s_openapi::api::apps::v1::Deployment) -> &Container {
    &d.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
}

#[test]
fn deployment_runs_the_server_with_vllm_style_args() {
    let d = deployment(&captioner(), "abc");
    let c = container(&d);
    assert_eq!(c.name, CONTAINER_NAME);
    assert_eq!(
        c.image.as_deref(),
        Some(concat!("vlm-server:", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(c.command.as_deref(), Some(&["vlm-server".to_string()][..]));
    let args = c.args.clone().unwrap();
    assert_eq!(
        args,
        [
            "serve",
            "/model",
            "--served-model-name",
            "nvidia/nemotron-nano-12b-v2-vl",
            "--port",
            "8000",
            "--max-tiles",
            "12",
            "--max-num-seqs",
            "16",
            "--api-key-env",
            "VLM_API_KEY_0",
            "--api-key-env",
            "VLM_API_KEY_1",
            "--log-level",
            "debug",
        ]
    );
}

#[test]
fn api_keys_come_from_secret_refs_never_values() {
    let d = deployment(&captioner(), "abc");
    let env = container(&d).env.clone().unwrap();
    assert_eq!(env.len(), 2);
    for (i, (secret, key)) in [("ngc-api", "NGC_API_KEY"), ("extra", "k")]
        .into_iter()
        .enumerate()
    {
        assert_eq!(env[i].name, format!("VLM_API_KEY_{i}"));
        assert!(env[i].value.is_none(), "a key value must never be inlined");
        let r = env[i]
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str()), (secret, key));
    }
    let json = serde_json::to_string(&d).unwrap();
    assert!(
        !json.contains("\"value\":"),
        "no literal env values expected: {json}"
    );
}

#[test]
fn no_auth_means_no_key_flags() {
    let mut c = captioner();
    c.spec.auth.api_key_secret_refs.clear();
    let d = deployment(&c, "abc");
    let ctr = container(&d);
    assert!(ctr.env.is_none());
    assert!(
        !ctr.args
            .as_ref()
            .unwrap()
            .iter()
            .any(|a| a == "--api-key-env")
    );
}

#[test]
fn deployment_has_gpu_limits_volumes_and_probes() {
    let d = deployment(&captioner(), "abc");
    let c = container(&d);
    let res = c.resources.as_ref().unwrap();
    let limits = res.limits.as_ref().unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    assert_eq!(limits["cpu"].0, "8");
    assert_eq!(limits["memory"].0, "48Gi");
    assert_eq!(res.requests.as_ref().unwrap()["memory"].0, "48Gi");
    assert!(
        !res.requests
            .as_ref()
            .unwrap()
            .contains_key("nvidia.com/gpu")
    );

    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let vols = pod.volumes.as_ref().unwrap();
    let pvc = vols[0].persistent_volume_claim.as_ref().unwrap();
    assert_eq!(
        (pvc.claim_name.as_str(), pvc.read_only),
        ("weights", Some(true))
    );
    assert_eq!(
        vols[1].empty_dir.as_ref().unwrap().medium.as_deref(),
        Some("Memory")
    );
    assert!(vols[2].empty_dir.is_some());
    let mounts = c.volume_mounts.as_ref().unwrap();
    assert_eq!(mounts[0].mount_path, MODEL_MOUNT_PATH);
    assert_eq!(mounts[0].read_only, Some(true));
    assert_eq!(mounts[0].sub_path.as_deref(), Some("nemotron"));
    assert_eq!(mounts[1].mount_path, "/dev/shm");
    assert_eq!(mounts[2].mount_path, "/tmp");

    let startup = c.startup_probe.as_ref().unwrap();
    let get = startup.http_get.as_ref().unwrap();
    assert_eq!(get.path.as_deref(), Some("/v1/health/ready"));
    assert_eq!(get.port, IntOrString::String("http".into()));
    let budget = startup.period_seconds.unwrap() * startup.failure_threshold.unwrap();
    assert!(
        budget >= 20 * 60,
        "startup budget {budget}s is too short for a 26 GB model"
    );
    let ready = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(ready.path.as_deref(), Some("/v1/health/ready"));
    let live = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/v1/health/live"));
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 8000);
}

#[test]
fn host_path_model_source_is_mounted_read_only() {
    let mut c = captioner();
    c.spec.model = ModelSource {
        pvc: None,
        host_path: Some(HostPathSource {
            path: "/models/nemotron".into(),
        }),
        download: None,
    };
    let d = deployment(&c, "abc");
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let hp = pod.volumes.as_ref().unwrap()[0].host_path.as_ref().unwrap();
    assert_eq!(hp.path, "/models/nemotron");
    let m = &container(&d).volume_mounts.as_ref().unwrap()[0];
    assert_eq!((m.read_only, m.sub_path.as_deref()), (Some(true), None));
}

#[test]
fn deployment_is_restricted_and_never_surges() {
    let d = deployment(&captioner(), "abc");
    let spec = d.spec.as_ref().unwrap();
    let ru = spec
        .strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    assert_eq!(ru.max_surge, Some(IntOrString::Int(0)));
    assert_eq!(ru.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(spec.replicas, Some(1));

    let pod = spec.template.spec.as_ref().unwrap();
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    let sc = container(&d).security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
}

#[test]
fn children_are_owned_and_labelled() {
    let c = captioner();
    let d = deployment(&c, "abc");
    let s = service(&c);
    let cm = config_map(&c);
    for meta in [&d.metadata, &s.metadata, &cm.metadata] {
        assert_eq!(meta.namespace.as_deref(), Some("nv"));
        let owners = meta.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "VlmCaptioner");
        assert_eq!(owners[0].api_version, "captioning.dev/v1alpha1");
        assert_eq!(owners[0].uid, "uid-1");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(
            meta.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"],
            MANAGED_BY
        );
    }
    let spec = d.spec.as_ref().unwrap();
    let selector = spec.selector.match_labels.as_ref().unwrap();
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    assert_eq!(s.spec.as_ref().unwrap().selector.as_ref(), Some(selector));
}

#[test]
fn scheduling_is_passed_through() {
    let mut c = captioner();
    c.spec.scheduling.node_selector.insert(
        "nvidia.com/gpu.product".into(),
        "NVIDIA-H100-80GB-HBM3".into(),
    );
    c.spec.scheduling.runtime_class_name = Some("nvidia".into());
    c.spec.scheduling.priority_class_name = Some("high".into());
    c.spec.image_pull_secrets = vec![crate::crd::LocalObjectName {
        name: "ngc-secret".into(),
    }];
    let d = deployment(&c, "abc");
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        pod.node_selector.as_ref().unwrap()["nvidia.com/gpu.product"],
        "NVIDIA-H100-80GB-HBM3"
    );
    assert_eq!(pod.runtime_class_name.as_deref(), Some("nvidia"));
    assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
    assert_eq!(
        pod.image_pull_secrets.as_ref().unwrap()[0].name,
        "ngc-secret"
    );
    assert_eq!(pod.automount_service_account_token, Some(false));
}

#[test]
fn secret_hash_lands_on_the_pod_template() {
    let a = deployment(&captioner(), "hash-a");
    let b = deployment(&captioner(), "hash-b");
    let ann = |d: &k8s_openapi::api::apps::v1::Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[SECRET_HASH_ANNOTATION]
            .clone()
    };
    assert_eq!(ann(&a), "hash-a");
    assert_eq!(ann(&b), "hash-b");
    // Only the template changes, so the Deployment rolls the pods.
    assert_eq!(a.metadata, b.metadata);
}

#[test]
fn service_exposes_http_8000_to_the_container_port() {
    let mut c = captioner();
    c.spec.server.port = 9000;
    let s = service(&c);
    let spec = s.spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    let port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("http"), 8000));
    assert_eq!(port.target_port, Some(IntOrString::Int(9000)));
    assert_eq!(s.metadata.name.as_deref(), Some("cap"));
}

#[test]
fn config_map_carries_the_nv_ingest_variables() {
    let mut c = captioner();
    c.spec.captioning.prompt = "Describe:".into();
    let cm = config_map(&c);
    assert_eq!(cm.metadata.name.as_deref(), Some("cap-nv-ingest"));
    let data = cm.data.unwrap();
    assert_eq!(
        data["VLM_CAPTION_ENDPOINT"],
        "http://cap.nv.svc.cluster.local:8000/v1/chat/completions"
    );
    assert_eq!(
        data["VLM_CAPTION_MODEL_NAME"],
        "nvidia/nemotron-nano-12b-v2-vl"
    );
    assert_eq!(data["VLM_CAPTION_PROMPT"], "Describe:");
    assert_eq!(data["VLM_CAPTION_SYSTEM_PROMPT"], "/no_think");
    assert_eq!(data.len(), 4, "no secrets in the ConfigMap");
}

#[test]
fn replicas_zero_is_kept() {
    let mut c = captioner();
    c.spec.replicas = 0;
    assert_eq!(deployment(&c, "x").spec.unwrap().replicas, Some(0));
}
