//! The nv-ingest wiring published into other namespaces. Owner references cannot cross
//! namespaces, so these carry ownership labels instead and a finalizer removes them.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use super::{MANAGED_BY, config_map, config_map_name};
use crate::crd::{SERVICE_PORT, VlmCaptioner};

pub const OWNER_NAMESPACE_LABEL: &str = "captioning.dev/owner-namespace";
pub const OWNER_NAME_LABEL: &str = "captioning.dev/owner-name";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Labels that mark a published object as this captioner's.
pub fn owner_labels(c: &VlmCaptioner) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            OWNER_NAMESPACE_LABEL.to_string(),
            c.namespace().unwrap_or_default(),
        ),
        (OWNER_NAME_LABEL.to_string(), c.name_any()),
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (
            "app.kubernetes.io/component".into(),
            "nv-ingest-wiring".into(),
        ),
    ])
}

/// The label selector of everything this captioner published.
pub fn owner_selector(c: &VlmCaptioner) -> String {
    format!(
        "{OWNER_NAMESPACE_LABEL}={},{OWNER_NAME_LABEL}={}",
        c.namespace().unwrap_or_default(),
        c.name_any()
    )
}

/// True when `meta` carries this captioner's ownership labels; anything else is not ours.
pub fn is_ours(c: &VlmCaptioner, meta: &ObjectMeta) -> bool {
    let labels = meta.labels.as_ref();
    let get = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    get(OWNER_NAMESPACE_LABEL) == c.namespace().as_deref()
        && get(OWNER_NAME_LABEL) == Some(c.name_any().as_str())
        && get(MANAGED_BY_LABEL) == Some(MANAGED_BY)
}

fn meta(c: &VlmCaptioner, name: String, ns: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(ns.to_string()),
        labels: Some(owner_labels(c)),
        ..ObjectMeta::default()
    }
}

/// Name of the published Secret (for nv-ingest's `extraEnvVarsSecret` / `envFrom`).
pub fn wiring_secret_name(c: &VlmCaptioner) -> String {
    format!("{}-nv-ingest", c.name_any())
}

/// The env ConfigMap, copied into `ns`.
pub fn published_config_map(c: &VlmCaptioner, ns: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(c, config_map_name(c), ns),
        data: config_map(c).data,
        ..ConfigMap::default()
    }
}

/// `NGC_API_KEY` and `NVIDIA_API_KEY`, both the first referenced key: what nv-ingest sends.
pub fn published_secret(c: &VlmCaptioner, ns: &str, key: &str) -> Secret {
    let value = ByteString(key.as_bytes().to_vec());
    Secret {
        metadata: meta(c, wiring_secret_name(c), ns),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            ("NGC_API_KEY".to_string(), value.clone()),
            ("NVIDIA_API_KEY".to_string(), value),
        ])),
        ..Secret::default()
    }
}

/// An ExternalName alias: nv-ingest's default `http://<alias>:8000/...` resolves to the
/// captioner's Service. ExternalName does not remap ports, hence the Service's fixed 8000.
pub fn alias_service(c: &VlmCaptioner, ns: &str, alias: &str) -> Service {
    Service {
        metadata: meta(c, alias.to_string(), ns),
        spec: Some(ServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some(format!(
                "{}.{}.svc.cluster.local",
                c.name_any(),
                c.namespace().unwrap_or_default()
            )),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: SERVICE_PORT,
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}
