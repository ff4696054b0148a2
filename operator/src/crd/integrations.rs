//! Spec and status of the integrations around the server: nv-ingest wiring, the chat-endpoint
//! probe, autoscaling and Prometheus scraping.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

const DNS1123_LABEL: &str = "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')";

/// Where to publish the nv-ingest wiring (env ConfigMap, API-key Secret, Service alias).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NvIngestSpec {
    /// Namespaces that run nv-ingest. A namespaced operator wires only those it watches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.all(n, n.size() <= 63 && n.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))").message("namespaces must be DNS-1123 labels"))]
    pub namespaces: Vec<String>,
    /// Also every namespace whose labels match. Needs the operator's all-namespaces mode; a
    /// namespaced operator refuses it (`NvIngestWired=False/NamespaceSelectorUnsupported`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Publish an ExternalName Service so nv-ingest's default endpoint
    /// `http://<aliasName>:8000/v1/chat/completions` reaches this captioner unchanged.
    #[serde(default = "default_true")]
    pub alias_service: bool,
    /// Name of the alias Service.
    #[serde(default = "default_alias_name")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new(DNS1123_LABEL).message("aliasName must be a DNS-1123 label: lowercase letters, digits and '-'"))]
    pub alias_name: String,
}

/// The operator's own end-to-end check: a real captioning request to the Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct HealthCheckSpec {
    /// When true, `Ready` also requires the last chat probe to have succeeded.
    pub enabled: bool,
    /// Seconds between probes (a little jitter is added).
    #[schemars(range(min = 10, max = 86400))]
    pub interval_seconds: i32,
    /// Seconds a probe may take.
    #[schemars(range(min = 1, max = 600))]
    pub timeout_seconds: i32,
}

impl Default for HealthCheckSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_seconds: 60,
            timeout_seconds: 30,
        }
    }
}

/// A HorizontalPodAutoscaler on the server's queue depth (a Pods metric).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.maxReplicas >= self.minReplicas").message("autoscaling.maxReplicas must be >= autoscaling.minReplicas"))]
pub struct AutoscalingSpec {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 64))]
    pub min_replicas: i32,
    #[schemars(range(min = 1, max = 64))]
    pub max_replicas: i32,
    /// Pods metric, as a metrics adapter (e.g. prometheus-adapter) exposes it.
    #[serde(default = "default_metric")]
    #[schemars(length(min = 1, max = 253))]
    pub metric_name: String,
    /// Average value of the metric per pod the HPA aims for (requests waiting per server).
    #[serde(default = "default_queue_depth")]
    #[schemars(range(min = 1, max = 10000))]
    pub target_queue_depth: i32,
}

/// A Prometheus Operator ServiceMonitor for the server's `/metrics`, made only when the
/// `monitoring.coreos.com/v1` API exists.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceMonitorSpec {
    pub enabled: bool,
    /// Extra labels, e.g. the `release` label your Prometheus selects on.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[schemars(length(min = 1, max = 16))]
    pub interval: String,
}

impl Default for ServiceMonitorSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            labels: BTreeMap::new(),
            interval: "30s".into(),
        }
    }
}

/// Where the wiring was published, and what blocked it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NvIngestStatus {
    /// Namespaces holding the complete wiring, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wired_namespaces: Vec<String>,
    /// `namespace/Kind/name` of objects that exist but are not ours, so were left alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
}

/// The last chat-endpoint probe.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatProbeStatus {
    /// `Succeeded`, `Failed` or `TimedOut`.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<Time>,
    /// The start of the caption the server returned (truncated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_caption: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_one() -> i32 {
    1
}

fn default_alias_name() -> String {
    "nemotron-nano-12b-v2-vl".into()
}

fn default_metric() -> String {
    "vlm_queue_depth".into()
}

fn default_queue_depth() -> i32 {
    4
}
