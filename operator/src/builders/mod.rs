//! Pure functions from a `VlmCaptioner` to the objects it owns; no client, no I/O.

mod autoscaling;
mod configmap;
mod deployment;
mod download_job;
mod image;
mod published;
mod pvc;
mod service;

pub use autoscaling::{autoscaling, hpa, pdb, service_monitor, service_monitor_resource};
pub use published::{
    MANAGED_BY_LABEL, OWNER_NAME_LABEL, OWNER_NAMESPACE_LABEL, alias_service, is_ours,
    owner_labels, owner_selector, published_config_map, published_secret, wiring_secret_name,
};

pub use configmap::{config_map, config_map_name};
pub use deployment::{
    API_KEY_ENV_PREFIX, CONTAINER_NAME, MODEL_MOUNT_PATH, SECRET_HASH_ANNOTATION, deployment,
};
pub use download_job::{
    BACKOFF_LIMIT, MODEL_SOURCE_ANNOTATION, TEMPLATE_HASH_ANNOTATION, download_job,
    download_job_name, model_source,
};
pub use image::{
    BUILTIN_SERVER_IMAGE, default_server_image, server_image, set_default_server_image,
};
pub use pvc::{model_pvc, model_pvc_name};
pub use service::{endpoint_url, service};

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::crd::VlmCaptioner;

/// Labels that select the server pods; stable for the life of the captioner.
pub fn selector_labels(c: &VlmCaptioner) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "vlm-server".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), c.name_any()),
    ])
}

/// Labels on every child; `managed-by` also narrows the operator's watches to its own children.
pub fn labels(c: &VlmCaptioner) -> BTreeMap<String, String> {
    let mut labels = selector_labels(c);
    labels.insert("app.kubernetes.io/component".into(), "captioner".into());
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());
    labels
}

/// Value of `app.kubernetes.io/managed-by` on the children.
pub const MANAGED_BY: &str = "vlm-operator";

/// Metadata of a child: name, namespace, labels and a controller owner reference, so the
/// garbage collector deletes children with the captioner and `Controller::owns` maps them back.
/// `spec.imagePullSecrets` as pod references; `None` when empty, so the field is not applied.
pub(crate) fn image_pull_secrets(
    c: &VlmCaptioner,
) -> Option<Vec<k8s_openapi::api::core::v1::LocalObjectReference>> {
    let secrets = &c.spec.image_pull_secrets;
    (!secrets.is_empty()).then(|| {
        secrets
            .iter()
            .map(|s| k8s_openapi::api::core::v1::LocalObjectReference {
                name: s.name.clone(),
            })
            .collect()
    })
}

fn child_meta(c: &VlmCaptioner, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: c.namespace(),
        labels: Some(labels(c)),
        owner_references: c.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

#[cfg(test)]
mod tests;
