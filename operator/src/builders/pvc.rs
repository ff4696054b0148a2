//! The PersistentVolumeClaim that `spec.model.download` fills.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements,
};
use kube::ResourceExt;

use super::child_meta;
use crate::crd::{DownloadSource, VlmCaptioner};

/// `<name>-model`.
pub fn model_pvc_name(c: &VlmCaptioner) -> String {
    format!("{}-model", c.name_any())
}

/// Not owned: like NIMCache PVCs (`helm.sh/resource-policy: keep`), the ~26 GB outlive the
/// captioner, so re-creating it (a GitOps re-sync, a rename back) reuses them; the download Job
/// then finds its `.complete` marker and exits at once. Delete the claim to free the space.
pub fn model_pvc(c: &VlmCaptioner, dl: &DownloadSource) -> PersistentVolumeClaim {
    let mut metadata = child_meta(c, model_pvc_name(c));
    metadata.owner_references = None;
    let access_modes = if dl.access_modes.is_empty() {
        vec!["ReadWriteOnce".to_string()]
    } else {
        dl.access_modes
            .iter()
            .map(|m| m.as_str().to_string())
            .collect()
    };
    PersistentVolumeClaim {
        metadata,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(access_modes),
            storage_class_name: dl.storage_class_name.clone(),
            volume_mode: Some("Filesystem".into()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), dl.size.clone())])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}
