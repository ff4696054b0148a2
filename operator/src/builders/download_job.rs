//! The Job that runs `vlm-server download` into the model PVC. Idempotent: the server exits at
//! once when the volume's `.complete` marker names the same repo and revision.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, ResourceRequirements,
    SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::{MANAGED_BY, child_meta, model_pvc_name, server_image};
use crate::crd::{DownloadSource, VlmCaptioner};

/// `repo@revision` the Job fetches: a different value means a different snapshot, a new Job.
pub const MODEL_SOURCE_ANNOTATION: &str = "captioning.dev/model-source";
/// sha256 of the Job's pod template: a failed Job whose template changed (say, a token Secret
/// fixed) is replaced; a succeeded one is kept.
pub const TEMPLATE_HASH_ANNOTATION: &str = "captioning.dev/template-sha256";
/// Pod failures before the Job is `Failed`.
pub const BACKOFF_LIMIT: i32 = 4;
const MOUNT: &str = "/model";
/// `<name>-model-download`.
pub fn download_job_name(c: &VlmCaptioner) -> String {
    format!("{}-model-download", c.name_any())
}

pub fn model_source(dl: &DownloadSource) -> String {
    format!("{}@{}", dl.repo, dl.revision)
}

pub fn download_job(c: &VlmCaptioner, dl: &DownloadSource) -> Job {
    // Not the server's selector labels: the download pod must never become a Service endpoint.
    let labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "vlm-model-download".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), c.name_any()),
        (
            "app.kubernetes.io/component".to_string(),
            "model-download".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
    ]);
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        }),
        spec: Some(pod(c, dl)),
    };
    let hash = serde_json::to_vec(&template)
        .map(|b| format!("{:x}", Sha256::digest(b)))
        .unwrap_or_default();
    let mut meta = child_meta(c, download_job_name(c));
    meta.labels = Some(labels);
    meta.annotations = Some(BTreeMap::from([
        (MODEL_SOURCE_ANNOTATION.to_string(), model_source(dl)),
        (TEMPLATE_HASH_ANNOTATION.to_string(), hash),
    ]));
    Job {
        metadata: meta,
        spec: Some(JobSpec {
            backoff_limit: Some(BACKOFF_LIMIT),
            template,
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}

fn pod(c: &VlmCaptioner, dl: &DownloadSource) -> PodSpec {
    let sched = &c.spec.scheduling;
    let env = dl.token_secret_ref.as_ref().map(|r| {
        vec![EnvVar {
            name: "HF_TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: r.name.clone(),
                    key: r.key.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]
    });
    let container = Container {
        name: "download".into(),
        image: Some(server_image(c)),
        image_pull_policy: Some(c.spec.image.pull_policy.as_str().into()),
        command: Some(vec!["vlm-server".into()]),
        args: Some(vec![
            "download".into(),
            "--repo".into(),
            dl.repo.clone(),
            "--revision".into(),
            dl.revision.clone(),
            "--dir".into(),
            MOUNT.into(),
        ]),
        env,
        volume_mounts: Some(vec![
            VolumeMount {
                name: "model".into(),
                mount_path: MOUNT.into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..VolumeMount::default()
            },
        ]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("500m".into())),
                ("memory".to_string(), Quantity("256Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("1Gi".into()),
            )])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    PodSpec {
        containers: vec![container],
        // Failures are counted by the Job's backoffLimit, one pod each.
        restart_policy: Some("Never".into()),
        volumes: Some(vec![
            Volume {
                name: "model".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: model_pvc_name(c),
                    read_only: Some(false),
                }),
                ..Volume::default()
            },
            Volume {
                name: "tmp".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
        ]),
        image_pull_secrets: super::image_pull_secrets(c),
        // Same placement as the server: a zonal volume binds where its first pod runs.
        node_selector: (!sched.node_selector.is_empty()).then(|| sched.node_selector.clone()),
        tolerations: (!sched.tolerations.is_empty()).then(|| sched.tolerations.clone()),
        affinity: sched.affinity.clone(),
        security_context: Some(super::deployment::restricted_pod_security_context()),
        ..PodSpec::default()
    }
}
