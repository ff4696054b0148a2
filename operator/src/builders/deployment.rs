use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, HostPathVolumeSource, PersistentVolumeClaimVolumeSource, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::{child_meta, labels, selector_labels};
use crate::crd::VlmCaptioner;

pub const CONTAINER_NAME: &str = "vlm-server";
pub const MODEL_MOUNT_PATH: &str = "/model";
/// Pod-template annotation holding the sha256 of the referenced API keys: a rotation rolls pods.
pub const SECRET_HASH_ANNOTATION: &str = "captioning.dev/api-keys-sha256";
/// Env var `VLM_API_KEY_<i>` carries the i-th `auth.apiKeySecretRefs` entry.
pub const API_KEY_ENV_PREFIX: &str = "VLM_API_KEY_";

const READY_PATH: &str = "/v1/health/ready";
const LIVE_PATH: &str = "/v1/health/live";
// Loading ~26 GB of weights from a network volume can take many minutes: allow 30 min to start.
const STARTUP_PERIOD_S: i32 = 10;
const STARTUP_FAILURES: i32 = 180;
pub const PROGRESS_DEADLINE_S: i32 = 2400;
// A non-root UID the server image does not need to know about (read-only root fs, no home).
const RUN_AS_ID: i64 = 1000;

/// The server Deployment. `secret_hash` is the sha256 of the referenced API keys' values.
pub fn deployment(c: &VlmCaptioner, secret_hash: &str) -> Deployment {
    let template_meta = ObjectMeta {
        labels: Some(labels(c)),
        annotations: Some(BTreeMap::from([(
            SECRET_HASH_ANNOTATION.to_string(),
            secret_hash.to_string(),
        )])),
        ..ObjectMeta::default()
    };
    let sched = &c.spec.scheduling;
    let pod = PodSpec {
        containers: vec![container(c)],
        volumes: Some(volumes(c)),
        image_pull_secrets: super::image_pull_secrets(c),
        node_selector: (!sched.node_selector.is_empty()).then(|| sched.node_selector.clone()),
        tolerations: (!sched.tolerations.is_empty()).then(|| sched.tolerations.clone()),
        affinity: sched.affinity.clone(),
        runtime_class_name: sched.runtime_class_name.clone(),
        priority_class_name: sched.priority_class_name.clone(),
        security_context: Some(restricted_pod_security_context()),
        // Spread replicas over nodes when possible, but never leave one Pending for it.
        topology_spread_constraints: Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(c)),
                ..LabelSelector::default()
            }),
            ..TopologySpreadConstraint::default()
        }]),
        // The server never talks to the Kubernetes API.
        automount_service_account_token: Some(false),
        // Service links would put one env var per Service of the namespace into the container.
        enable_service_links: Some(false),
        ..PodSpec::default()
    };
    Deployment {
        metadata: child_meta(c, c.name_any()),
        spec: Some(DeploymentSpec {
            // With an HPA the replica count is its field: leaving it out of the apply means
            // server-side apply never takes it back.
            replicas: super::autoscaling(c).is_none().then_some(c.spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(c)),
                ..LabelSelector::default()
            },
            // maxSurge 0: a rollout frees a GPU before it asks for one, so a cluster with exactly
            // the GPUs in use never deadlocks with a surge pod stuck Pending.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(0)),
                    max_unavailable: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(template_meta),
                spec: Some(pod),
            },
            // Above the startup probe's 30 min: a slow 26 GB load is not ProgressDeadlineExceeded.
            progress_deadline_seconds: Some(PROGRESS_DEADLINE_S),
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// vLLM-style command line: `vlm-server serve /model --served-model-name ... --port ...`.
pub fn server_args(c: &VlmCaptioner) -> Vec<String> {
    let server = &c.spec.server;
    let mut args = vec![
        "serve".to_string(),
        MODEL_MOUNT_PATH.to_string(),
        "--served-model-name".to_string(),
        c.spec.served_model_name.clone(),
        "--port".to_string(),
        server.port.to_string(),
        "--max-tiles".to_string(),
        server.max_tiles.to_string(),
    ];
    if let Some(n) = server.max_concurrent_requests {
        args.extend(["--max-num-seqs".to_string(), n.to_string()]);
    }
    for i in 0..c.spec.auth.api_key_secret_refs.len() {
        args.extend(["--api-key-env".to_string(), api_key_env(i)]);
    }
    args.extend(server.extra_args.iter().cloned());
    args
}

fn api_key_env(i: usize) -> String {
    format!("{API_KEY_ENV_PREFIX}{i}")
}

fn container(c: &VlmCaptioner) -> Container {
    let spec = &c.spec;
    // Keys stay in their Secrets: the kubelet resolves them, the operator only references them.
    let mut env: Vec<EnvVar> = spec
        .auth
        .api_key_secret_refs
        .iter()
        .enumerate()
        .map(|(i, r)| EnvVar {
            name: api_key_env(i),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: r.name.clone(),
                    key: r.key.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        })
        .collect();
    env.extend(spec.server.extra_env.iter().cloned());

    let http_get = |path: &str| HTTPGetAction {
        path: Some(path.into()),
        port: IntOrString::String("http".into()),
        ..HTTPGetAction::default()
    };
    Container {
        name: CONTAINER_NAME.into(),
        image: Some(super::server_image(c)),
        image_pull_policy: Some(spec.image.pull_policy.as_str().into()),
        command: Some(vec!["vlm-server".into()]),
        args: Some(server_args(c)),
        env: (!env.is_empty()).then_some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: spec.server.port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(resources(c)),
        volume_mounts: Some(volume_mounts(c)),
        startup_probe: Some(Probe {
            http_get: Some(http_get(READY_PATH)),
            period_seconds: Some(STARTUP_PERIOD_S),
            failure_threshold: Some(STARTUP_FAILURES),
            timeout_seconds: Some(5),
            ..Probe::default()
        }),
        readiness_probe: Some(Probe {
            http_get: Some(http_get(READY_PATH)),
            period_seconds: Some(10),
            failure_threshold: Some(3),
            timeout_seconds: Some(5),
            ..Probe::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(http_get(LIVE_PATH)),
            period_seconds: Some(15),
            failure_threshold: Some(4),
            timeout_seconds: Some(5),
            ..Probe::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// GPUs as limits (extended resources cannot overcommit, requests default to limits);
/// CPU and memory as equal request and limit when given.
fn resources(c: &VlmCaptioner) -> ResourceRequirements {
    let r = &c.spec.resources;
    let mut limits = BTreeMap::from([(r.gpu_resource_name.clone(), Quantity(r.gpus.to_string()))]);
    let mut requests = BTreeMap::new();
    for (name, q) in [("cpu", &r.cpu), ("memory", &r.memory)] {
        if let Some(q) = q {
            limits.insert(name.to_string(), q.clone());
            requests.insert(name.to_string(), q.clone());
        }
    }
    ResourceRequirements {
        limits: Some(limits),
        requests: (!requests.is_empty()).then_some(requests),
        ..ResourceRequirements::default()
    }
}

fn volumes(c: &VlmCaptioner) -> Vec<Volume> {
    let model = &c.spec.model;
    let model_volume = match (&model.pvc, &model.host_path) {
        (Some(pvc), _) => Volume {
            name: "model".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc.claim_name.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        },
        (None, Some(host)) => Volume {
            name: "model".into(),
            host_path: Some(HostPathVolumeSource {
                path: host.path.clone(),
                type_: Some("Directory".into()),
            }),
            ..Volume::default()
        },
        // Filled by the download Job before the Deployment is applied.
        (None, None) if model.download.is_some() => Volume {
            name: "model".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: super::model_pvc_name(c),
                read_only: Some(true),
            }),
            ..Volume::default()
        },
        // The schema's CEL rule forbids this; an emptyDir makes the server fail loudly on an
        // empty model dir instead of the operator panicking.
        (None, None) => Volume {
            name: "model".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    };
    vec![
        model_volume,
        Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("2Gi".into())),
            }),
            ..Volume::default()
        },
        // The root filesystem is read-only; the server's scratch space goes here.
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ]
}

fn volume_mounts(c: &VlmCaptioner) -> Vec<VolumeMount> {
    let sub_path = c.spec.model.pvc.as_ref().and_then(|p| p.sub_path.clone());
    vec![
        VolumeMount {
            name: "model".into(),
            mount_path: MODEL_MOUNT_PATH.into(),
            sub_path,
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "dshm".into(),
            mount_path: "/dev/shm".into(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ]
}

/// Pod-level restricted settings shared by the server and the download Job:
/// a fixed non-root uid/gid, `fsGroup` so a fresh volume is writable, and the
/// runtime's default seccomp profile.
pub(crate) fn restricted_pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_ID),
        run_as_group: Some(RUN_AS_ID),
        fs_group: Some(RUN_AS_ID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}
