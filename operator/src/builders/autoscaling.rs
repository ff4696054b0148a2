//! HorizontalPodAutoscaler, PodDisruptionBudget and ServiceMonitor: scale and availability.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec,
    MetricIdentifier, MetricSpec, MetricTarget, PodsMetricSource,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::{child_meta, selector_labels};
use crate::crd::{AutoscalingSpec, VlmCaptioner};

/// The autoscaling block when it is on.
pub fn autoscaling(c: &VlmCaptioner) -> Option<&AutoscalingSpec> {
    c.spec.autoscaling.as_ref().filter(|a| a.enabled)
}

/// Scales the Deployment on the average per-pod queue depth the servers export.
pub fn hpa(c: &VlmCaptioner, a: &AutoscalingSpec) -> HorizontalPodAutoscaler {
    HorizontalPodAutoscaler {
        metadata: child_meta(c, c.name_any()),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: c.name_any(),
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Pods".into(),
                pods: Some(PodsMetricSource {
                    metric: MetricIdentifier {
                        name: a.metric_name.clone(),
                        selector: None,
                    },
                    target: MetricTarget {
                        type_: "AverageValue".into(),
                        average_value: Some(Quantity(a.target_queue_depth.to_string())),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            behavior: None,
        }),
        ..HorizontalPodAutoscaler::default()
    }
}

/// One voluntary disruption at a time when there are several replicas; with one replica
/// (often one GPU) nothing is promised, so a node drain is never blocked. Pods still loading
/// the model may always be evicted.
pub fn pdb(c: &VlmCaptioner) -> PodDisruptionBudget {
    let several = match autoscaling(c) {
        Some(a) => a.max_replicas > 1,
        None => c.spec.replicas > 1,
    };
    let (max_unavailable, min_available) = if several {
        (Some(IntOrString::Int(1)), None)
    } else {
        (None, Some(IntOrString::Int(0)))
    };
    PodDisruptionBudget {
        metadata: child_meta(c, c.name_any()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable,
            min_available,
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(c)),
                ..LabelSelector::default()
            }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
        }),
        ..PodDisruptionBudget::default()
    }
}

/// `monitoring.coreos.com/v1` `ServiceMonitor`; typed as a DynamicObject since the CRD is optional.
pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

/// Scrapes `/metrics` on the Service's `http` port.
pub fn service_monitor(c: &VlmCaptioner) -> DynamicObject {
    let sm = &c.spec.service_monitor;
    let mut meta = child_meta(c, c.name_any());
    let mut labels: BTreeMap<String, String> = meta.labels.take().unwrap_or_default();
    labels.extend(sm.labels.clone());
    meta.labels = Some(labels);
    let mut obj = DynamicObject::new(&c.name_any(), &service_monitor_resource());
    obj.metadata = meta;
    obj.data = json!({
        "spec": {
            "selector": {"matchLabels": selector_labels(c)},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": sm.interval}],
        }
    });
    obj
}
