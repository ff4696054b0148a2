//! `spec.model.download`: weights fetched from the Hugging Face Hub into a PVC the operator makes.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::SecretKeyRef;

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DownloadSource {
    /// Hugging Face Hub repository.
    #[serde(default = "default_repo")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][-._A-Za-z0-9]*/[A-Za-z0-9][-._A-Za-z0-9]*$')").message("repo must be <owner>/<name>"))]
    pub repo: String,
    /// Branch, tag or commit; pin a commit for reproducible rollouts.
    #[serde(default = "default_revision")]
    #[schemars(length(min = 1, max = 256))]
    pub revision: String,
    /// Hub access token (gated or private repos), passed to the download as `HF_TOKEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
    /// Size of the PersistentVolumeClaim `<name>-model` the operator creates (BF16 weights: ~26 GB).
    #[serde(default = "default_size")]
    pub size: Quantity,
    /// StorageClass of that claim; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
    /// Access modes of that claim (default `ReadWriteOnce`; `ReadWriteMany` lets replicas on
    /// several nodes share it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub access_modes: Vec<AccessMode>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessMode {
    ReadWriteOnce,
    ReadWriteOncePod,
    ReadWriteMany,
}

impl AccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::ReadWriteOnce => "ReadWriteOnce",
            AccessMode::ReadWriteOncePod => "ReadWriteOncePod",
            AccessMode::ReadWriteMany => "ReadWriteMany",
        }
    }
}

impl Default for DownloadSource {
    fn default() -> Self {
        Self {
            repo: default_repo(),
            revision: default_revision(),
            token_secret_ref: None,
            size: default_size(),
            storage_class_name: None,
            access_modes: Vec::new(),
        }
    }
}

fn default_repo() -> String {
    "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16".into()
}

fn default_revision() -> String {
    "main".into()
}

fn default_size() -> Quantity {
    Quantity("60Gi".into())
}
