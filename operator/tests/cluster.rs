//! A stateful fake apiserver behind the tower-test mock: an in-memory store that answers GET,
//! LIST (with label selectors), server-side apply, JSON patch (finalizers), status patches and
//! DELETE (with finalizers and owner-reference garbage collection), as the real one would for
//! the calls this operator makes. Used by the wiring, probe, scale and churn tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use serde_json::{Value, json};
use vlm_operator::crd::VlmCaptioner;
use vlm_operator::scope::Scope;
use vlm_operator::{Context, reconcile};

use crate::fixtures::FakeChat;

/// (collection, namespace or "", name)
type Key = (String, String, String);

#[derive(Default)]
pub struct State {
    pub objects: BTreeMap<Key, Value>,
    pub events: Vec<Value>,
    /// Every write that changed an object (no-op applies do not count).
    pub writes: u64,
    /// The same, by the captioner the object is or belongs to (what would wake its reconcile).
    pub writes_by: BTreeMap<String, u64>,
    pub requests: Vec<(Method, String)>,
    /// Bodies of server-side applies, in order.
    pub applied: Vec<Value>,
    /// Whether the fake Deployment controller reports the pods ready.
    pub pods_ready: bool,
    /// Whether `monitoring.coreos.com/v1` is served.
    pub service_monitor_api: bool,
    rv: u64,
    uid: u64,
}

#[derive(Clone)]
pub struct Cluster(pub Arc<Mutex<State>>);

pub const CAPTIONERS: &str = "captioning.dev/v1alpha1/vlmcaptioners";

impl Cluster {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A context talking to a fresh fake cluster; ServiceMonitor discovery is left to run.
    pub fn start(chat: Arc<FakeChat>) -> (Arc<Context>, Cluster) {
        Self::start_in(chat, Scope::Cluster)
    }

    /// The same, for an operator limited to `scope` (namespaced mode).
    pub fn start_in(chat: Arc<FakeChat>, scope: Scope) -> (Arc<Context>, Cluster) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let cluster = Cluster(Arc::new(Mutex::new(State {
            pods_ready: true,
            ..State::default()
        })));
        tokio::spawn(serve(handle, cluster.clone()));
        let ctx = Context::new(Client::new(service, "default"), None)
            .with_chat_client(chat)
            .with_scope(scope);
        (Arc::new(ctx), cluster)
    }

    pub fn put(&self, collection: &str, obj: Value) {
        let mut s = self.lock();
        let key = key_of(collection, &obj);
        let obj = s.stamp(obj, None);
        s.objects.insert(key, obj);
    }

    pub fn get(&self, collection: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(collection.into(), ns.into(), name.into()))
            .cloned()
    }

    pub fn captioner(&self, ns: &str, name: &str) -> Option<VlmCaptioner> {
        self.get(CAPTIONERS, ns, name)
            .map(|v| serde_json::from_value(v).expect("stored captioner deserializes"))
    }

    pub fn namespace(&self, name: &str, labels: Value) {
        self.put(
            "v1/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}),
        );
    }

    /// Objects of a collection, anywhere.
    pub fn all(&self, collection: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|(k, _)| k.0 == collection)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn event_reasons(&self) -> Vec<String> {
        self.lock()
            .events
            .iter()
            .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Deletes like `kubectl delete`: with a finalizer the object only gets a deletionTimestamp.
    pub fn delete(&self, collection: &str, ns: &str, name: &str) {
        self.lock()
            .delete(&(collection.into(), ns.into(), name.into()));
    }

    /// Reconciles as the controller would after each watch event: again while the last pass
    /// changed the captioner or anything else. Returns the number of passes.
    pub async fn settle(&self, ctx: &Arc<Context>, ns: &str, name: &str, max: usize) -> usize {
        for pass in 1..=max {
            let Some(c) = self.captioner(ns, name) else {
                return pass - 1;
            };
            let me = format!("{ns}/{name}");
            let writes = |s: &State| s.writes_by.get(&me).copied().unwrap_or(0);
            let before = writes(&self.lock());
            let action = reconcile(Arc::new(c), ctx.clone()).await;
            let after = writes(&self.lock());
            match action {
                Ok(a) if after == before && a != Action::await_change() => return pass,
                Ok(_) => {}
                Err(e) => panic!("reconcile of {ns}/{name} failed: {e}"),
            }
        }
        panic!("{ns}/{name} did not settle within {max} reconciles (hot loop?)");
    }
}

pub fn captioner_ref(ns: &str, name: &str) -> ObjectRef<VlmCaptioner> {
    ObjectRef::new(name).within(ns)
}

fn key_of(collection: &str, obj: &Value) -> Key {
    let m = &obj["metadata"];
    (
        collection.to_string(),
        m["namespace"].as_str().unwrap_or_default().to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

impl State {
    fn stamp(&mut self, mut obj: Value, old: Option<&Value>) -> Value {
        self.rv += 1;
        let m = &mut obj["metadata"];
        m["resourceVersion"] = json!(self.rv.to_string());
        match old {
            Some(o) => {
                m["uid"] = o["metadata"]["uid"].clone();
                m["creationTimestamp"] = o["metadata"]["creationTimestamp"].clone();
            }
            None => {
                if m["uid"].is_null() {
                    self.uid += 1;
                    m["uid"] = json!(format!("uid-{}", self.uid));
                }
                m["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
        }
        if m["generation"].is_null() {
            m["generation"] = json!(1);
        }
        obj
    }

    fn store(&mut self, key: Key, new: Value) -> Value {
        let old = self.objects.get(&key).cloned();
        if let Some(o) = &old
            && same(o, &new)
        {
            return o.clone();
        }
        let mut new = self.stamp(new, old.as_ref());
        if let Some(o) = &old {
            let gen_ = o["metadata"]["generation"].as_i64().unwrap_or(1);
            let bump = o.get("spec") != new.get("spec");
            new["metadata"]["generation"] = json!(if bump { gen_ + 1 } else { gen_ });
        }
        self.count_write(&key, &new);
        self.objects.insert(key, new.clone());
        new
    }

    fn count_write(&mut self, key: &Key, obj: &Value) {
        self.writes += 1;
        let m = &obj["metadata"];
        let owner = if key.0 == CAPTIONERS {
            Some(format!("{}/{}", key.1, key.2))
        } else if let Some(r) = m["ownerReferences"].as_array().and_then(|o| o.first()) {
            Some(format!(
                "{}/{}",
                key.1,
                r["name"].as_str().unwrap_or_default()
            ))
        } else {
            let l = &m["labels"];
            l["captioning.dev/owner-name"].as_str().map(|n| {
                format!(
                    "{}/{n}",
                    l["captioning.dev/owner-namespace"]
                        .as_str()
                        .unwrap_or_default()
                )
            })
        };
        if let Some(o) = owner {
            *self.writes_by.entry(o).or_default() += 1;
        }
    }

    fn delete(&mut self, key: &Key) -> Option<Value> {
        let obj = self.objects.get(key)?.clone();
        let finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if finalizers {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                let mut o = obj.clone();
                o["metadata"]["deletionTimestamp"] = json!("2026-01-02T00:00:00Z");
                return Some(self.store(key.clone(), o));
            }
            return Some(obj);
        }
        self.objects.remove(key);
        self.count_write(key, &obj);
        // Garbage collection of everything this object owned.
        let uid = obj["metadata"]["uid"].clone();
        let owned: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, v)| {
                v["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|r| r["uid"] == uid))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in owned {
            self.delete(&k);
        }
        Some(obj)
    }
}

/// Equal but for bookkeeping fields: a no-op apply.
fn same(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v["metadata"].as_object_mut() {
            for f in [
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "generation",
                "managedFields",
            ] {
                m.remove(f);
            }
        }
        v
    };
    strip(a) == strip(b)
}

struct Path {
    collection: String,
    ns: String,
    name: Option<String>,
    sub: Option<String>,
    /// `/apis/<group>/<version>` alone: discovery.
    discovery: bool,
}

fn parse(path: &str) -> Path {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = if segs[0] == "api" {
        (segs[1].to_string(), &segs[2..])
    } else {
        (
            format!("{}/{}", segs[1], segs.get(2).unwrap_or(&"")),
            &segs[3.min(segs.len())..],
        )
    };
    let mut p = Path {
        collection: String::new(),
        ns: String::new(),
        name: None,
        sub: None,
        discovery: rest.is_empty(),
    };
    match rest {
        [] => {}
        ["namespaces"] => p.collection = format!("{gv}/namespaces"),
        ["namespaces", n] => {
            p.collection = format!("{gv}/namespaces");
            p.name = Some(n.to_string());
        }
        ["namespaces", ns, plural, more @ ..] => {
            p.collection = format!("{gv}/{plural}");
            p.ns = ns.to_string();
            p.name = more.first().map(|s| s.to_string());
            p.sub = more.get(1).map(|s| s.to_string());
        }
        [plural, ..] => p.collection = format!("{gv}/{plural}"),
    }
    p
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn label_selector(query: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("labelSelector="))
        .map(percent_decode)
}

/// Equality-based selectors (`k=v`, `k==v`, `k!=v`, `k`), which is what the operator sends.
fn matches(selector: &str, labels: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k.trim()].as_str() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels[k.trim()].as_str() == Some(v.trim())
        } else {
            !labels[term.trim()].is_null()
        }
    })
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code,
        "reason": reason, "message": message})
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        status_body(404, "NotFound", "not found"),
    )
}

async fn serve(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    cluster: Cluster,
) {
    while let Some((request, send)) = handle.next_request().await {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or_default().to_string();
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let (status, reply) = {
            let mut s = cluster.lock();
            s.requests.push((method.clone(), format!("{path}?{query}")));
            answer(&mut s, &method, &path, &query, &content_type, body)
        };
        let response = Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&reply).unwrap_or_default()));
        if let Ok(r) = response {
            send.send_response(r);
        }
    }
}

fn answer(
    s: &mut State,
    method: &Method,
    path: &str,
    query: &str,
    content_type: &str,
    body: Value,
) -> (StatusCode, Value) {
    let p = parse(path);
    if p.discovery {
        return if path.contains("monitoring.coreos.com") && s.service_monitor_api {
            (
                StatusCode::OK,
                json!({"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": "monitoring.coreos.com/v1",
                "resources": [{"name": "servicemonitors", "singularName": "servicemonitor",
                    "namespaced": true, "kind": "ServiceMonitor", "verbs": ["get", "patch"]}]}),
            )
        } else {
            not_found()
        };
    }
    if p.collection.ends_with("/events") {
        if *method == Method::POST {
            s.events.push(body.clone());
        }
        return (StatusCode::CREATED, body);
    }
    let key = (
        p.collection.clone(),
        p.ns.clone(),
        p.name.clone().unwrap_or_default(),
    );
    match (method.clone(), &p.name) {
        (Method::GET, Some(_)) => match s.objects.get(&key) {
            Some(o) => (StatusCode::OK, o.clone()),
            None => not_found(),
        },
        (Method::GET, None) => {
            let sel = label_selector(query).unwrap_or_default();
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|(k, v)| {
                    k.0 == p.collection
                        && (p.ns.is_empty() || k.1 == p.ns)
                        && matches(&sel, &v["metadata"]["labels"])
                })
                .map(|(_, v)| v.clone())
                .collect();
            (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List",
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
            )
        }
        (Method::PATCH, Some(_)) if p.sub.as_deref() == Some("status") => {
            let Some(mut o) = s.objects.get(&key).cloned() else {
                return not_found();
            };
            o["status"] = body["status"].clone();
            (StatusCode::OK, s.store(key, o))
        }
        (Method::PATCH, Some(_)) if content_type.contains("json-patch") => {
            let Some(o) = s.objects.get(&key).cloned() else {
                return not_found();
            };
            match json_patch(o, &body) {
                Ok(o) => {
                    let gone = o["metadata"]["deletionTimestamp"].is_string()
                        && o["metadata"]["finalizers"]
                            .as_array()
                            .is_none_or(|f| f.is_empty());
                    let stored = s.store(key.clone(), o);
                    if gone {
                        s.delete(&key);
                    }
                    (StatusCode::OK, stored)
                }
                Err(e) => (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    status_body(422, "Invalid", &e),
                ),
            }
        }
        (Method::PATCH, Some(_)) if content_type.contains("apply-patch") => {
            s.applied.push(body.clone());
            let old = s.objects.get(&key).cloned();
            let mut new = body;
            if let Some(o) = &old {
                for f in ["finalizers", "deletionTimestamp", "ownerReferences"] {
                    if new["metadata"][f].is_null() && !o["metadata"][f].is_null() {
                        new["metadata"][f] = o["metadata"][f].clone();
                    }
                }
                if new.get("status").is_none() && o.get("status").is_some() {
                    new["status"] = o["status"].clone();
                }
                // Fields the applier does not own survive (e.g. replicas set by an HPA).
                if p.collection == "apps/v1/deployments" && new["spec"]["replicas"].is_null() {
                    new["spec"]["replicas"] = o["spec"]["replicas"].clone();
                }
            }
            if p.collection == "apps/v1/deployments" {
                let replicas = new["spec"]["replicas"].as_i64().unwrap_or(1);
                let ready = if s.pods_ready { replicas } else { 0 };
                let generation = old
                    .as_ref()
                    .and_then(|o| o["metadata"]["generation"].as_i64())
                    .unwrap_or(1);
                let bump = old
                    .as_ref()
                    .is_some_and(|o| o.get("spec") != new.get("spec"));
                let observed = if bump { generation + 1 } else { generation };
                new["status"] = json!({"observedGeneration": observed, "replicas": replicas,
                    "updatedReplicas": replicas, "readyReplicas": ready});
            }
            (StatusCode::OK, s.store(key, new))
        }
        (Method::DELETE, Some(_)) => match s.delete(&key) {
            Some(o) => (StatusCode::OK, o),
            None => not_found(),
        },
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            status_body(405, "MethodNotAllowed", &format!("{method} {path}")),
        ),
    }
}

/// The JSON-patch ops kube's finalizer helper sends: test, add, remove, replace.
fn json_patch(mut obj: Value, ops: &Value) -> Result<Value, String> {
    for op in ops.as_array().ok_or("not an array")? {
        let path = op["path"].as_str().ok_or("no path")?;
        let (parent, last) = path.rsplit_once('/').ok_or("bad path")?;
        let target = if parent.is_empty() {
            Some(&mut obj)
        } else {
            obj.pointer_mut(parent)
        };
        match op["op"].as_str() {
            Some("test") => {
                let cur = obj.pointer(path).cloned().unwrap_or(Value::Null);
                if cur != op["value"] {
                    return Err(format!("test failed at {path}"));
                }
            }
            Some("add") | Some("replace") => {
                let target = target.ok_or("no parent")?;
                if let Some(a) = target.as_array_mut() {
                    if last == "-" {
                        a.push(op["value"].clone());
                    } else {
                        let i: usize = last.parse().map_err(|_| "bad index")?;
                        a.insert(i.min(a.len()), op["value"].clone());
                    }
                } else {
                    target[last] = op["value"].clone();
                }
            }
            Some("remove") => {
                let target = target.ok_or("no parent")?;
                if let Some(a) = target.as_array_mut() {
                    let i: usize = last.parse().map_err(|_| "bad index")?;
                    if i < a.len() {
                        a.remove(i);
                    }
                } else if let Some(m) = target.as_object_mut() {
                    m.remove(last);
                }
            }
            other => return Err(format!("unsupported op {other:?}")),
        }
    }
    Ok(obj)
}

/// Waits for the next probe trigger (the prober's outcome changed).
pub async fn next_trigger(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<ObjectRef<VlmCaptioner>>,
    within: Duration,
) -> ObjectRef<VlmCaptioner> {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("a probe trigger in time")
        .expect("trigger channel open")
}
