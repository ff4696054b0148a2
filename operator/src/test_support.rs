//! A captioner as the apiserver returns it: defaults applied, uid and generation set.

use serde_json::json;

use crate::crd::VlmCaptioner;

pub fn captioner() -> VlmCaptioner {
    let obj = json!({
        "apiVersion": "captioning.dev/v1alpha1",
        "kind": "VlmCaptioner",
        "metadata": {
            "name": "cap", "namespace": "nv", "uid": "uid-1", "generation": 3,
        },
        "spec": {
            "model": { "pvc": { "claimName": "weights", "subPath": "nemotron" } },
            "auth": { "apiKeySecretRefs": [
                { "name": "ngc-api", "key": "NGC_API_KEY" },
                { "name": "extra", "key": "k" },
            ] },
            "server": { "maxConcurrentRequests": 16, "extraArgs": ["--log-level", "debug"] },
            "resources": { "cpu": "8", "memory": "48Gi" },
        },
    });
    match serde_json::from_value(obj) {
        Ok(c) => c,
        Err(e) => panic!("test captioner does not deserialize: {e}"),
    }
}
