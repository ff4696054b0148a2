//! Pure functions from a `VlmCaptioner` to the objects it owns; no client, no I/O.

mod configmap;
mod deployment;
mod service;

pub use configmap::{config_map, config_map_name};
pub use deployment::{
    API_KEY_ENV_PREFIX, CONTAINER_NAME, MODEL_MOUNT_PATH, SECRET_HASH_ANNOTATION, deployment,
};
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
