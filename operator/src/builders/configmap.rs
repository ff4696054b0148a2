use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;

use super::{child_meta, endpoint_url};
use crate::crd::VlmCaptioner;

pub fn config_map_name(c: &VlmCaptioner) -> String {
    format!("{}-nv-ingest", c.name_any())
}

/// The variables nv-ingest's `image_caption` stage reads, ready for `envFrom: configMapRef`.
/// No API key: nv-ingest already sends its `NGC_API_KEY`, and keys never leave Secrets.
pub fn config_map(c: &VlmCaptioner) -> ConfigMap {
    let data = BTreeMap::from([
        ("VLM_CAPTION_ENDPOINT".to_string(), endpoint_url(c)),
        (
            "VLM_CAPTION_MODEL_NAME".to_string(),
            c.spec.served_model_name.clone(),
        ),
        (
            "VLM_CAPTION_PROMPT".to_string(),
            c.spec.captioning.prompt.clone(),
        ),
        (
            "VLM_CAPTION_SYSTEM_PROMPT".to_string(),
            c.spec.captioning.system_prompt.clone(),
        ),
    ]);
    ConfigMap {
        metadata: child_meta(c, config_map_name(c)),
        data: Some(data),
        ..ConfigMap::default()
    }
}
