//! The `VlmCaptioner` custom resource: its Rust types are the single source of the CRD schema
//! (`vlm-operator crd` prints it; `crds/vlmcaptioner.yaml` is the committed copy).
//!
//! Validation lives in the schema so the apiserver refuses bad objects with a readable message:
//! OpenAPI bounds for numbers and lengths, CEL (`x-kubernetes-validations`) for everything a
//! person would otherwise only learn about from a crash-looping pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod integrations;
mod model_download;
pub use integrations::{
    AutoscalingSpec, ChatProbeStatus, HealthCheckSpec, NvIngestSpec, NvIngestStatus,
    ServiceMonitorSpec,
};
pub use model_download::{AccessMode, DownloadSource};

/// The field manager for every server-side apply this operator makes.
pub const FIELD_MANAGER: &str = "vlm-operator";
/// Port of the Service (nv-ingest's NIM convention), whatever port the container listens on.
pub const SERVICE_PORT: i32 = 8000;

// CEL regexes are RE2; `\\` in a Rust raw string is one backslash in the CEL string literal.
const DNS1123_SUBDOMAIN: &str =
    "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')";

/// A Nemotron Nano 12B v2 VL captioning service: a `vlm-server` Deployment, its Service, and a
/// ConfigMap that nv-ingest loads with `envFrom`.
// Several printer columns share `type_ = "string"`, which clippy mistakes for a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "captioning.dev",
    version = "v1alpha1",
    kind = "VlmCaptioner",
    plural = "vlmcaptioners",
    shortname = "vlmcap",
    namespaced,
    status = "VlmCaptionerStatus",
    derive = "PartialEq",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Ready Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.servedModelName"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VlmCaptionerSpec {
    /// Model id the server answers to; nv-ingest sends it as `model` (VLM_CAPTION_MODEL_NAME).
    #[serde(default = "default_served_model_name")]
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("self.size() > 0").message("servedModelName must not be empty"))]
    #[x_kube(validation = Rule::new("!self.matches('\\\\s')").message("servedModelName must not contain spaces"))]
    pub served_model_name: String,

    /// The vlm-server container image.
    #[serde(default)]
    pub image: ImageSpec,

    /// Secrets (in this namespace) used to pull the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<LocalObjectName>,

    /// Where the model weights are; mounted read-only at `/model`.
    pub model: ModelSource,

    /// Number of server pods (each takes `resources.gpus` GPUs).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 64))]
    pub replicas: i32,

    /// GPUs, CPU and memory per pod.
    #[serde(default)]
    pub resources: ResourceSpec,

    /// Where the pods may run.
    #[serde(default)]
    pub scheduling: SchedulingSpec,

    /// Bearer-token authentication; no keys means no auth.
    #[serde(default)]
    pub auth: AuthSpec,

    /// vlm-server settings.
    #[serde(default)]
    pub server: ServerSpec,

    /// Defaults published to nv-ingest in the `<name>-nv-ingest` ConfigMap.
    #[serde(default)]
    pub captioning: CaptioningSpec,

    /// Publish the wiring into nv-ingest's namespaces (ConfigMap, Secret, Service alias).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nv_ingest: Option<NvIngestSpec>,

    /// Periodic chat-completions probe through the Service.
    #[serde(default)]
    pub health_check: HealthCheckSpec,

    /// A HorizontalPodAutoscaler on the queue depth; `replicas` is then left to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// Prometheus Operator ServiceMonitor (made only when its CRD is installed).
    #[serde(default)]
    pub service_monitor: ServiceMonitorSpec,
}

/// Unset parts come from the operator's default server image (`VLM_DEFAULT_SERVER_IMAGE`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ImageSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub repository: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub tag: Option<String>,
    pub pull_policy: PullPolicy,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// A reference to an object in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LocalObjectName {
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(DNS1123_SUBDOMAIN).message("name must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"))]
    pub name: String,
}

/// Exactly one source of model weights (a directory holding `config.json` and safetensors).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.pvc) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) + (has(self.download) ? 1 : 0) == 1").message("exactly one of model.pvc, model.hostPath or model.download must be set"))]
pub struct ModelSource {
    /// An existing PersistentVolumeClaim in this namespace, mounted read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
    /// A directory on the node (node-bound; prefer `pvc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathSource>,
    /// Download from the Hugging Face Hub into a PVC the operator creates, before the server starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadSource>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(DNS1123_SUBDOMAIN).message("claimName must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"))]
    pub claim_name: String,
    /// Directory inside the volume that holds the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.matches('(^|/)\\\\.\\\\.(/|$)')").message("subPath must be a relative path without '..'"))]
    pub sub_path: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HostPathSource {
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("hostPath.path must be an absolute path"))]
    pub path: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ResourceSpec {
    /// GPUs per pod.
    #[schemars(range(min = 1, max = 8))]
    pub gpus: i32,
    /// Extended resource name of the GPU (e.g. a MIG profile `nvidia.com/mig-3g.40gb`).
    #[schemars(length(min = 1, max = 253))]
    pub gpu_resource_name: String,
    /// CPU request and limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory request and limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

impl Default for ResourceSpec {
    fn default() -> Self {
        Self {
            gpus: 1,
            gpu_resource_name: "nvidia.com/gpu".into(),
            cpu: None,
            memory: None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct SchedulingSpec {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// e.g. `nvidia` when the node's default container runtime is not the NVIDIA one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthSpec {
    /// The server accepts a request bearing any of these keys. nv-ingest's own `ngc-api` Secret
    /// (key `NGC_API_KEY`) can be listed as is, since nv-ingest sends that key.
    #[schemars(length(max = 16))]
    pub api_key_secret_refs: Vec<SecretKeyRef>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretKeyRef {
    /// Secret name, in the captioner's namespace.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(DNS1123_SUBDOMAIN).message("name must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"))]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[-._a-zA-Z0-9]+$')").message("key must be a valid Secret key: letters, digits, '-', '_' and '.'"))]
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerSpec {
    /// Container port the server listens on.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Requests decoded concurrently (`--max-num-seqs`); the server's default when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_concurrent_requests: Option<i32>,
    /// Upper bound on 512x512 image tiles per image (`--max-tiles`).
    #[schemars(range(min = 1, max = 12))]
    pub max_tiles: i32,
    /// Appended to the server's arguments as is.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub extra_args: Vec<String>,
    /// Extra container environment.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_env: Vec<EnvVar>,
}

impl Default for ServerSpec {
    fn default() -> Self {
        Self {
            port: 8000,
            max_concurrent_requests: None,
            max_tiles: 12,
            extra_args: Vec::new(),
            extra_env: Vec::new(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct CaptioningSpec {
    /// User prompt nv-ingest sends with each image (VLM_CAPTION_PROMPT).
    pub prompt: String,
    /// System prompt (VLM_CAPTION_SYSTEM_PROMPT); `/no_think` keeps reasoning out of captions.
    pub system_prompt: String,
}

impl Default for CaptioningSpec {
    fn default() -> Self {
        Self {
            prompt: "Caption the content of this image:".into(),
            system_prompt: "/no_think".into(),
        }
    }
}

fn default_served_model_name() -> String {
    "nvidia/nemotron-nano-12b-v2-vl".into()
}

fn default_replicas() -> i32 {
    1
}

/// Observed state, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VlmCaptionerStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`, the kstatus pair `Reconciling` and `Stalled`, and
    /// `ModelReady`, `ChatReady`, `NvIngestWired` where they apply.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// In-cluster chat-completions URL (VLM_CAPTION_ENDPOINT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Namespaces wired for nv-ingest, and conflicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nv_ingest: Option<NvIngestStatus>,
    /// The last chat-endpoint probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatProbeStatus>,
}

/// A list-map keyed by `type`, so server-side apply merges conditions one by one.
fn conditions_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "properties": {
                "lastTransitionTime": { "format": "date-time", "type": "string" },
                "message": { "type": "string" },
                "observedGeneration": { "type": "integer", "format": "int64" },
                "reason": { "type": "string" },
                "status": { "type": "string" },
                "type": { "type": "string" }
            },
            "required": ["lastTransitionTime", "message", "reason", "status", "type"],
        },
    })
}

impl VlmCaptioner {
    /// The CRD as YAML, exactly as committed in `crds/vlmcaptioner.yaml`.
    pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(&Self::crd())
    }
}
