//! The CRD: committed copy up to date, structural, with the intended defaults and rules; the CEL
//! rules evaluated (by kube-cel, the engine behind kube's `cel` feature) on good and bad objects;
//! and the sample `crds/captioner.yaml` accepted.

use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::{Value, json};
use vlm_operator::crd::{PullPolicy, VlmCaptioner, VlmCaptionerSpec};

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

fn crd() -> CustomResourceDefinition {
    VlmCaptioner::crd()
}

/// The `openAPIV3Schema` of the only version.
fn schema() -> Value {
    let crd = crd();
    let v = &crd.spec.versions[0];
    let s = v
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref());
    serde_json::to_value(s.expect("the CRD has a schema")).expect("schema serializes")
}

#[test]
fn committed_crd_matches_the_rust_types() {
    let path = repo_file("crds/vlmcaptioner.yaml");
    let committed = std::fs::read_to_string(&path).expect("crds/vlmcaptioner.yaml exists");
    let generated = VlmCaptioner::crd_yaml().expect("CRD serializes");
    assert!(
        committed == generated,
        "crds/vlmcaptioner.yaml is stale; regenerate it with\n  cargo run -p vlm-operator -- crd > crds/vlmcaptioner.yaml"
    );
}

#[test]
fn names_scope_subresource_and_columns() {
    let crd = crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("vlmcaptioners.captioning.dev")
    );
    assert_eq!(crd.spec.group, "captioning.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.kind, "VlmCaptioner");
    assert_eq!(crd.spec.names.plural, "vlmcaptioners");
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["vlmcap".to_string()][..])
    );
    assert_eq!(crd.spec.versions.len(), 1);
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v.served && v.storage);
    assert!(
        v.subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some()
    );
    let cols: Vec<(&str, &str)> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.as_str(), c.json_path.as_str()))
        .collect();
    assert_eq!(
        cols,
        [
            ("Ready", ".status.conditions[?(@.type==\"Ready\")].status"),
            ("Ready Replicas", ".status.readyReplicas"),
            ("Model", ".spec.servedModelName"),
            ("Endpoint", ".status.endpoint"),
            ("Age", ".metadata.creationTimestamp"),
        ]
    );
}

/// Structural schema: every node typed (or int-or-string), no `$ref`, and no `oneOf`/`anyOf`/
/// `allOf`/`not`, which the apiserver only allows in restricted forms.
#[test]
fn schema_is_structural() {
    fn walk(path: &str, s: &Value, problems: &mut Vec<String>) {
        let Some(obj) = s.as_object() else { return };
        for k in [
            "$ref",
            "oneOf",
            "anyOf",
            "allOf",
            "not",
            "definitions",
            "$defs",
        ] {
            if obj.contains_key(k) {
                problems.push(format!("{path}: has {k}"));
            }
        }
        let typed = obj.contains_key("type")
            || obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
            || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        if !typed {
            problems.push(format!("{path}: no type"));
        }
        if obj.contains_key("properties") && obj.get("type") != Some(&json!("object")) {
            problems.push(format!("{path}: properties without type object"));
        }
        for (name, sub) in obj
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            walk(&format!("{path}.{name}"), sub, problems);
        }
        if let Some(items) = obj.get("items") {
            walk(&format!("{path}[]"), items, problems);
        }
        if let Some(ap @ Value::Object(_)) = obj.get("additionalProperties") {
            walk(&format!("{path}{{}}"), ap, problems);
        }
    }
    let mut problems = Vec::new();
    walk("", &schema(), &mut problems);
    assert!(
        problems.is_empty(),
        "non-structural schema:\n{}",
        problems.join("\n")
    );
}

fn at<'a>(s: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(s, |s, p| match *p {
        "[]" => &s["items"],
        name => &s["properties"][name],
    })
}

#[test]
fn defaults_and_bounds_are_in_the_schema() {
    let s = schema();
    let spec = |p: &[&str]| at(&s, &[&["spec"], p].concat()).clone();
    assert_eq!(
        spec(&["servedModelName"])["default"],
        "nvidia/nemotron-nano-12b-v2-vl"
    );
    assert_eq!(spec(&["replicas"])["default"], 1);
    assert_eq!(spec(&["replicas"])["minimum"], 0.0);
    assert_eq!(spec(&["replicas"])["maximum"], 64.0);
    assert_eq!(spec(&["resources", "gpus"])["default"], 1);
    assert_eq!(spec(&["resources", "gpus"])["minimum"], 1.0);
    assert_eq!(spec(&["resources", "gpus"])["maximum"], 8.0);
    assert_eq!(
        spec(&["resources", "gpuResourceName"])["default"],
        "nvidia.com/gpu"
    );
    assert_eq!(spec(&["server", "port"])["default"], 8000);
    assert_eq!(spec(&["server", "port"])["minimum"], 1.0);
    assert_eq!(spec(&["server", "port"])["maximum"], 65535.0);
    assert_eq!(spec(&["server", "maxTiles"])["default"], 12);
    assert_eq!(
        spec(&["captioning", "prompt"])["default"],
        "Caption the content of this image:"
    );
    assert_eq!(
        spec(&["captioning", "systemPrompt"])["default"],
        "/no_think"
    );
    assert_eq!(
        spec(&["image", "pullPolicy"])["enum"],
        json!(["Always", "IfNotPresent", "Never"])
    );
    assert_eq!(at(&s, &["spec"])["required"], json!(["model"]));
    let conditions = at(&s, &["status", "conditions"]);
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
}

#[test]
fn minimal_spec_deserializes_with_defaults() {
    let spec: VlmCaptionerSpec =
        serde_json::from_value(json!({"model": {"hostPath": {"path": "/models/n"}}}))
            .expect("minimal spec");
    assert_eq!(spec.served_model_name, "nvidia/nemotron-nano-12b-v2-vl");
    assert_eq!(spec.replicas, 1);
    assert_eq!(spec.resources.gpus, 1);
    assert_eq!(spec.resources.gpu_resource_name, "nvidia.com/gpu");
    assert_eq!(spec.server.port, 8000);
    assert_eq!(spec.server.max_tiles, 12);
    assert_eq!(spec.server.max_concurrent_requests, None);
    assert_eq!(spec.image.pull_policy, PullPolicy::IfNotPresent);
    assert!(
        spec.auth.api_key_secret_refs.is_empty(),
        "no keys = no auth"
    );
    assert_eq!(spec.captioning.prompt, "Caption the content of this image:");
    assert_eq!(spec.captioning.system_prompt, "/no_think");
}

/// Every CEL rule as (schema path, rule, message).
fn rules() -> Vec<(String, String, String)> {
    fn walk(path: &str, s: &Value, out: &mut Vec<(String, String, String)>) {
        for r in s
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.push((
                path.to_string(),
                r["rule"].as_str().unwrap_or("").into(),
                r["message"].as_str().unwrap_or("").into(),
            ));
        }
        for (name, sub) in s
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            walk(&format!("{path}.{name}"), sub, out);
        }
        if let Some(items) = s.get("items") {
            walk(&format!("{path}[]"), items, out);
        }
    }
    let mut out = Vec::new();
    walk("", &schema(), &mut out);
    out
}

#[test]
fn cel_rules_are_present_and_read_right() {
    let dns = r"self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')";
    let rules = rules();
    let find = |path: &str| -> Vec<(&str, &str)> {
        rules
            .iter()
            .filter(|r| r.0 == path)
            .map(|r| (r.1.as_str(), r.2.as_str()))
            .collect()
    };
    assert_eq!(
        find(".spec.model"),
        [(
            "(has(self.pvc) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) + (has(self.download) ? 1 : 0) == 1",
            "exactly one of model.pvc, model.hostPath or model.download must be set"
        )]
    );
    assert_eq!(
        find(".spec.servedModelName"),
        [
            ("self.size() > 0", "servedModelName must not be empty"),
            (
                r"!self.matches('\\s')",
                "servedModelName must not contain spaces"
            ),
        ]
    );
    for path in [
        ".spec.model.pvc.claimName",
        ".spec.auth.apiKeySecretRefs[].name",
        ".spec.imagePullSecrets[].name",
    ] {
        let found = find(path);
        assert_eq!(found.len(), 1, "{path}");
        assert_eq!(found[0].0, dns, "{path}");
        assert!(found[0].1.contains("DNS-1123"), "{path}: {}", found[0].1);
    }
    assert_eq!(
        find(".spec.auth.apiKeySecretRefs[].key")[0].0,
        "self.matches('^[-._a-zA-Z0-9]+$')"
    );
    assert_eq!(
        find(".spec.model.hostPath.path")[0].0,
        "self.startsWith('/')"
    );
    assert_eq!(find(".spec.model.pvc.subPath").len(), 1);
    assert_eq!(
        find(".spec.model.download.tokenSecretRef.name")[0].0,
        dns,
        "the download token reference is checked like the API key ones"
    );
    assert_eq!(find(".spec.model.download.repo").len(), 1);
    assert_eq!(rules.len(), 15, "unexpected rules: {rules:#?}");
    // Every rule has a message a person can act on.
    assert!(rules.iter().all(|r| r.2.len() > 10));
}

#[test]
fn cel_rules_compile() {
    let compiled = kube_cel::compile_schema(&schema());
    assert!(
        !compiled.has_errors(),
        "CEL compile errors: {:?}",
        compiled.compilation_errors()
    );
}

// -- validation of whole objects -------------------------------------------------------------

/// The OpenAPI part the apiserver enforces besides CEL: bounds, lengths, enums, required.
fn openapi_errors(schema: &Value, value: &Value, path: &str, errs: &mut Vec<String>) {
    let num = |k: &str| schema.get(k).and_then(Value::as_f64);
    if let Some(n) = value.as_f64()
        && (num("minimum").is_some_and(|m| n < m) || num("maximum").is_some_and(|m| n > m))
    {
        errs.push(format!("{path}: {n} out of range"));
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as f64;
        if num("minLength").is_some_and(|m| len < m) || num("maxLength").is_some_and(|m| len > m) {
            errs.push(format!("{path}: bad length"));
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        errs.push(format!("{path}: {value} not in enum"));
    }
    if let Some(arr) = value.as_array() {
        if num("maxItems").is_some_and(|m| arr.len() as f64 > m) {
            errs.push(format!("{path}: too many items"));
        }
        for (i, v) in arr.iter().enumerate() {
            openapi_errors(&schema["items"], v, &format!("{path}[{i}]"), errs);
        }
    }
    if let Some(obj) = value.as_object() {
        let required = schema.get("required").and_then(Value::as_array);
        for req in required.into_iter().flatten().filter_map(Value::as_str) {
            if !obj.contains_key(req) {
                errs.push(format!("{path}.{req}: required"));
            }
        }
        for (k, v) in obj {
            if let Some(sub) = schema.get("properties").and_then(|p| p.get(k)) {
                openapi_errors(sub, v, &format!("{path}.{k}"), errs);
            }
        }
    }
}

/// What the apiserver would say about `obj` (defaults applied first, as on admission).
fn validate(obj: &Value) -> Vec<String> {
    let schema = schema();
    let defaulted = kube_cel::apply_defaults(&schema, obj);
    let mut errs = Vec::new();
    openapi_errors(&schema, &defaulted, "", &mut errs);
    if let Err(cel) = kube_cel::validate(&schema, obj, None) {
        errs.extend(cel.iter().map(|e| e.to_string()));
    }
    errs
}

fn object(spec: Value) -> Value {
    json!({
        "apiVersion": "captioning.dev/v1alpha1",
        "kind": "VlmCaptioner",
        "metadata": {"name": "cap", "namespace": "nv"},
        "spec": spec,
    })
}

fn good_spec() -> Value {
    json!({
        "model": {"pvc": {"claimName": "weights", "subPath": "models/nemotron"}},
        "auth": {"apiKeySecretRefs": [{"name": "ngc-api", "key": "NGC_API_KEY"}]},
        "imagePullSecrets": [{"name": "ngc-secret"}],
    })
}

#[test]
fn good_objects_pass() {
    assert_eq!(validate(&object(good_spec())), Vec::<String>::new());
    let host = json!({"model": {"hostPath": {"path": "/models/nemotron"}}, "replicas": 0});
    assert_eq!(validate(&object(host)), Vec::<String>::new());
    let download = json!({"model": {"download": {"revision": "v1.0"}}});
    assert_eq!(validate(&object(download)), Vec::<String>::new());
}

#[test]
fn bad_objects_are_refused_with_readable_messages() {
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "both sources",
            json!({"model": {"pvc": {"claimName": "w"}, "hostPath": {"path": "/m"}}}),
            "exactly one of model.pvc, model.hostPath or model.download",
        ),
        (
            "pvc and download",
            json!({"model": {"pvc": {"claimName": "w"}, "download": {}}}),
            "exactly one of model.pvc, model.hostPath or model.download",
        ),
        (
            "no source",
            json!({"model": {}}),
            "exactly one of model.pvc, model.hostPath or model.download",
        ),
        (
            "download repo without owner",
            json!({"model": {"download": {"repo": "nemotron"}}}),
            "repo must be <owner>/<name>",
        ),
        (
            "empty model name",
            json!({"servedModelName": ""}),
            "servedModelName must not be empty",
        ),
        (
            "spaced model name",
            json!({"servedModelName": "my model"}),
            "servedModelName must not contain spaces",
        ),
        (
            "bad claim name",
            json!({"model": {"pvc": {"claimName": "Weights_1"}}}),
            "claimName must be a DNS-1123 subdomain",
        ),
        (
            "escaping subPath",
            json!({"model": {"pvc": {"claimName": "w", "subPath": "../etc"}}}),
            "subPath must be a relative path",
        ),
        (
            "absolute subPath",
            json!({"model": {"pvc": {"claimName": "w", "subPath": "/etc"}}}),
            "subPath must be a relative path",
        ),
        (
            "relative hostPath",
            json!({"model": {"hostPath": {"path": "models"}}}),
            "hostPath.path must be an absolute path",
        ),
        (
            "bad secret name",
            json!({"auth": {"apiKeySecretRefs": [{"name": "NGC API", "key": "k"}]}}),
            "name must be a DNS-1123 subdomain",
        ),
        (
            "bad secret key",
            json!({"auth": {"apiKeySecretRefs": [{"name": "ngc-api", "key": "a/b"}]}}),
            "key must be a valid Secret key",
        ),
        (
            "bad pull secret",
            json!({"imagePullSecrets": [{"name": "-x"}]}),
            "name must be a DNS-1123 subdomain",
        ),
        (
            "too many replicas",
            json!({"replicas": 65}),
            ".spec.replicas: 65 out of range",
        ),
        (
            "negative replicas",
            json!({"replicas": -1}),
            ".spec.replicas: -1 out of range",
        ),
        (
            "zero gpus",
            json!({"resources": {"gpus": 0}}),
            ".spec.resources.gpus: 0 out of range",
        ),
        (
            "nine gpus",
            json!({"resources": {"gpus": 9}}),
            ".spec.resources.gpus: 9 out of range",
        ),
        (
            "port zero",
            json!({"server": {"port": 0}}),
            ".spec.server.port: 0 out of range",
        ),
        (
            "port too high",
            json!({"server": {"port": 70000}}),
            ".spec.server.port: 70000 out of range",
        ),
        (
            "too many tiles",
            json!({"server": {"maxTiles": 13}}),
            ".spec.server.maxTiles: 13 out of range",
        ),
        (
            "bad pull policy",
            json!({"image": {"pullPolicy": "Sometimes"}}),
            "not in enum",
        ),
    ];
    for (what, patch, expected) in cases {
        let mut spec = good_spec();
        merge(&mut spec, &patch);
        let errs = validate(&object(spec));
        assert!(
            errs.iter().any(|e| e.contains(expected)),
            "{what}: expected {expected:?} in {errs:?}"
        );
    }
    let no_model = validate(&object(json!({})));
    assert!(
        no_model.iter().any(|e| e.contains(".spec.model: required")),
        "{no_model:?}"
    );
}

/// JSON merge patch (RFC 7386), enough for building bad samples from a good one.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else if k == "model" {
                    t.insert(k.clone(), v.clone());
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

#[test]
fn sample_captioner_deserializes_and_validates() {
    let path = repo_file("crds/captioner.yaml");
    let text = std::fs::read_to_string(&path).expect("crds/captioner.yaml exists");
    let value: Value = serde_yaml::from_str(&text).expect("sample is YAML");
    assert_eq!(validate(&value), Vec::<String>::new());
    let c: VlmCaptioner =
        serde_yaml::from_str(&text).expect("sample deserializes into VlmCaptioner");
    let pvc = c.spec.model.pvc.as_ref().expect("sample uses a PVC");
    assert!(c.spec.model.host_path.is_none());
    assert!(!pvc.claim_name.is_empty());
    let refs = &c.spec.auth.api_key_secret_refs;
    assert_eq!(refs.len(), 1);
    assert_eq!(
        (refs[0].name.as_str(), refs[0].key.as_str()),
        ("ngc-api", "NGC_API_KEY")
    );
    assert_eq!(c.spec.served_model_name, "nvidia/nemotron-nano-12b-v2-vl");
}

#[test]
fn integrations_validate_with_readable_messages() {
    let good = json!({
        "model": {"pvc": {"claimName": "w"}},
        "nvIngest": {"namespaces": ["nv-ingest"], "namespaceSelector": {"matchLabels": {"a": "b"}}},
        "healthCheck": {"intervalSeconds": 30, "timeoutSeconds": 10},
        "autoscaling": {"enabled": true, "minReplicas": 1, "maxReplicas": 4},
        "serviceMonitor": {"labels": {"release": "kps"}},
    });
    assert_eq!(validate(&object(good)), Vec::<String>::new());
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "max below min",
            json!({"autoscaling": {"enabled": true, "minReplicas": 3, "maxReplicas": 2}}),
            "autoscaling.maxReplicas must be >= autoscaling.minReplicas",
        ),
        (
            "bad namespace",
            json!({"nvIngest": {"namespaces": ["Not_A_Namespace"]}}),
            "namespaces must be DNS-1123 labels",
        ),
        (
            "bad alias",
            json!({"nvIngest": {"aliasName": "nemotron.nano"}}),
            "aliasName must be a DNS-1123 label",
        ),
        (
            "probe too often",
            json!({"healthCheck": {"intervalSeconds": 1}}),
            "intervalSeconds",
        ),
    ];
    for (what, patch, expected) in cases {
        let mut spec = json!({"model": {"pvc": {"claimName": "w"}}});
        merge(&mut spec, &patch);
        let errs = validate(&object(spec));
        assert!(
            errs.iter().any(|e| e.contains(expected)),
            "{what}: expected {expected:?} in {errs:?}"
        );
    }
    // Defaults the apiserver fills in.
    let c: VlmCaptioner = serde_json::from_value(object(json!({
        "model": {"pvc": {"claimName": "w"}}, "nvIngest": {}, "autoscaling": {"maxReplicas": 2},
    })))
    .expect("deserializes");
    let nv = c.spec.nv_ingest.expect("nvIngest");
    assert!(nv.alias_service);
    assert_eq!(nv.alias_name, "nemotron-nano-12b-v2-vl");
    assert!(c.spec.health_check.enabled);
    assert_eq!(
        (
            c.spec.health_check.interval_seconds,
            c.spec.health_check.timeout_seconds
        ),
        (60, 30)
    );
    let a = c.spec.autoscaling.expect("autoscaling");
    assert_eq!(
        (a.enabled, a.min_replicas, a.metric_name.as_str()),
        (false, 1, "vlm_queue_depth")
    );
}
