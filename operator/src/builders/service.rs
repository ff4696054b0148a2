use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::{child_meta, selector_labels};
use crate::crd::{SERVICE_PORT, VlmCaptioner};

/// ClusterIP Service named after the captioner: port `http` 8000 → the container's port.
pub fn service(c: &VlmCaptioner) -> Service {
    Service {
        metadata: child_meta(c, c.name_any()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(c)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: SERVICE_PORT,
                target_port: Some(IntOrString::Int(c.spec.server.port)),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The chat-completions URL nv-ingest calls; the DNS name stays valid if the Service is recreated.
pub fn endpoint_url(c: &VlmCaptioner) -> String {
    format!(
        "http://{}.{}.svc.cluster.local:{}/v1/chat/completions",
        c.name_any(),
        c.namespace().unwrap_or_else(|| "default".into()),
        SERVICE_PORT
    )
}
