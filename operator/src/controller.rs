//! Wires the reconcile into a kube `Controller`: the captioners, their children, the Secrets
//! they reference, the nv-ingest copies they published and the namespaces they select.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{Future, FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::builders::{MANAGED_BY, OWNER_NAME_LABEL};
use crate::context::Context;
use crate::crd::VlmCaptioner;
use crate::inputs::references_secret;
use crate::reconcile::{error_policy, reconcile};
use crate::scope::Scope;
use crate::wiring::{owner_of, selects_namespace};

/// Which namespaces to watch, and how many captioners to reconcile at once.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Empty: every namespace (cluster-wide RBAC). Otherwise only these (namespaced RBAC).
    pub namespaces: Vec<String>,
    pub concurrency: u16,
    pub instance: Option<String>,
}

impl Options {
    pub fn scope(&self) -> Scope {
        Scope::from_namespaces(&self.namespaces)
    }
}

type Requests = mpsc::UnboundedReceiver<ObjectRef<VlmCaptioner>>;

/// Delivers reconcile requests that come from outside a controller's own watches (probe
/// outcomes, events on published objects) to the controller whose scope holds the captioner:
/// a controller can only reconcile what is in its own cache.
#[derive(Clone, Debug)]
pub struct Router(Arc<BTreeMap<Option<String>, mpsc::UnboundedSender<ObjectRef<VlmCaptioner>>>>);

impl Router {
    /// One route per watch scope (`None`: all namespaces), and the receiving end of each.
    pub fn new(scopes: &[Option<String>]) -> (Self, Vec<Requests>) {
        let mut routes = BTreeMap::new();
        let mut receivers = Vec::new();
        for scope in scopes {
            let (tx, rx) = mpsc::unbounded_channel();
            routes.insert(scope.clone(), tx);
            receivers.push(rx);
        }
        (Self(Arc::new(routes)), receivers)
    }

    /// False when no controller watches the captioner's namespace (the request is dropped).
    pub fn send(&self, r: ObjectRef<VlmCaptioner>) -> bool {
        let route = self.0.get(&r.namespace).or_else(|| self.0.get(&None));
        route.is_some_and(|tx| tx.send(r).is_ok())
    }
}

/// Runs until `shutdown` resolves; sets `ready` once every captioner cache has synced.
/// A list-watch cannot span a chosen set of namespaces, so each listed namespace gets its own
/// controller (and caches); they share the context.
pub async fn run(
    client: Client,
    opts: Options,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let scope = opts.scope();
    let ctx =
        Arc::new(Context::new(client.clone(), opts.instance.clone()).with_scope(scope.clone()));
    let shutdown = shutdown.shared();
    let scopes = scope.watch_scopes();

    let (router, requests) = Router::new(&scopes);
    if let Some(mut rx) = ctx.prober.take_triggers() {
        let router = router.clone();
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                router.send(r);
            }
        });
    }
    // The nv-ingest copies live in other namespaces than their owner, maybe in another
    // scope's (namespaced mode), so their events go through the router.
    let mut published = Vec::new();
    for ns in scopes.iter().map(Option::as_deref) {
        published.push(tokio::spawn(watch_published(
            api::<PartialObjectMeta<ConfigMap>>(&client, ns),
            router.clone(),
        )));
        published.push(tokio::spawn(watch_published(
            api::<PartialObjectMeta<Secret>>(&client, ns),
            router.clone(),
        )));
        published.push(tokio::spawn(watch_published(
            api::<PartialObjectMeta<Service>>(&client, ns),
            router.clone(),
        )));
    }
    drop(router);

    let mut stores = Vec::new();
    let mut controllers = Vec::new();
    for (scope, requests) in scopes.into_iter().zip(requests) {
        let controller = Controller::new(
            api::<VlmCaptioner>(&client, scope.as_deref()),
            watcher::Config::default().any_semantic(),
        )
        .with_config(ControllerConfig::default().concurrency(opts.concurrency));
        stores.push(controller.store());
        controllers.push(run_scope(
            controller,
            client.clone(),
            scope,
            requests,
            ctx.clone(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(async move {
        let synced = futures::future::join_all(stores.iter().map(|s| s.wait_until_ready())).await;
        if synced.iter().all(Result::is_ok) {
            ready.store(true, Ordering::Relaxed);
            info!("captioner cache synced");
        }
    });
    futures::future::join_all(controllers).await;
    for task in published {
        task.abort();
    }
    info!("controller stopped");
}

/// Wakes the owner of a published nv-ingest object when the object changes or goes away, so
/// drift or a deletion is repaired at once rather than at the next resync. Metadata only, and
/// only objects carrying the ownership label.
pub async fn watch_published<K>(api: Api<PartialObjectMeta<K>>, router: Router)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let config = watcher::Config::default().labels(OWNER_NAME_LABEL);
    let mut events = watcher(api, config)
        .default_backoff()
        .touched_objects()
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(meta) => {
                if let Some(owner) = owner_of(&meta.metadata) {
                    router.send(owner);
                }
            }
            Err(e) => warn!(error = %e, kind = %K::kind(&()), "published-object watch"),
        }
    }
}

async fn run_scope(
    controller: Controller<VlmCaptioner>,
    client: Client,
    scope: Option<String>,
    requests: Requests,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let ns = scope.as_deref();
    let store = controller.store();
    let children =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    // Routed requests: a chat probe whose outcome changed, a published object that changed.
    let requests = futures::stream::unfold(requests, |mut rx| async move {
        rx.recv().await.map(|r| (r, rx))
    });
    let mut controller = controller.reconcile_on(requests);
    // nv-ingest namespaces chosen by label: a namespace appearing or relabelled re-wires.
    // Namespaces are cluster-scoped, so only in the all-namespaces mode (a namespaced operator
    // refuses `namespaceSelector`). Metadata only: names and labels are all that matter.
    if ns.is_none() {
        let ns_store = store.clone();
        controller = controller.watches(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            watcher::Config::default().any_semantic(),
            move |meta| {
                let namespace = Namespace {
                    metadata: meta.metadata,
                    ..Namespace::default()
                };
                captioners_for_namespace(&ns_store, &namespace)
            },
        );
    }
    // Secrets by metadata only: no cache of every Secret's data; the reconcile GETs the few
    // it references.
    // (kube 5: an `Api<PartialObjectMeta<K>>` watch is a metadata-only watch.)
    let secret_store = store.clone();

    controller
        .owns(api::<Deployment>(&client, ns), children.clone())
        .owns(api::<Service>(&client, ns), children.clone())
        .owns(api::<ConfigMap>(&client, ns), children.clone())
        .owns(api::<Job>(&client, ns), children)
        .watches(
            api::<PartialObjectMeta<Secret>>(&client, ns),
            watcher::Config::default(),
            move |meta| {
                let secret = Secret {
                    metadata: meta.metadata,
                    ..Secret::default()
                };
                captioners_for_secret(&secret_store, &secret)
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => debug!(captioner = %obj, "reconciled"),
                Err(e) => warn!(error = %e, "controller"),
            }
        })
        .await;
}

/// Captioners that list or select a namespace (or had wired it).
pub fn captioners_for_namespace(
    store: &Store<VlmCaptioner>,
    ns: &Namespace,
) -> Vec<ObjectRef<VlmCaptioner>> {
    store
        .state()
        .iter()
        .filter(|c| selects_namespace(c, ns))
        .map(|c| ObjectRef::from_obj(c.as_ref()))
        .collect()
}

/// A Secret change re-reconciles every captioner that references it (e.g. a key rotation).
pub fn captioners_for_secret(
    store: &Store<VlmCaptioner>,
    secret: &Secret,
) -> Vec<ObjectRef<VlmCaptioner>> {
    store
        .state()
        .iter()
        .filter(|c| references_secret(c, secret))
        .map(|c| ObjectRef::from_obj(c.as_ref()))
        .collect()
}

/// `Api::namespaced` for a listed namespace, `Api::all` otherwise.
pub fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Secret;
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    use super::*;
    use crate::test_support::captioner;

    fn secret(ns: &str, name: &str) -> Secret {
        let mut s = Secret::default();
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        s
    }

    #[test]
    fn scopes_are_all_namespaces_or_each_listed_one() {
        let all = Options::default();
        assert_eq!(all.scope().watch_scopes(), [None]);
        let listed = Options {
            namespaces: vec!["b".into(), " a ".into(), "b".into(), "".into()],
            ..Options::default()
        };
        assert_eq!(
            listed.scope().watch_scopes(),
            [Some("a".into()), Some("b".into())]
        );
    }

    #[test]
    fn the_router_delivers_to_the_scope_holding_the_captioner() {
        let (router, mut rx) = Router::new(&[Some("a".into()), Some("b".into())]);
        assert!(router.send(ObjectRef::new("cap").within("b")));
        assert!(!router.send(ObjectRef::new("cap").within("elsewhere")));
        assert!(rx[0].try_recv().is_err());
        assert_eq!(
            rx[1].try_recv().ok(),
            Some(ObjectRef::new("cap").within("b"))
        );
        assert!(rx[1].try_recv().is_err(), "the unknown one was dropped");

        let (all, mut rx) = Router::new(&[None]);
        assert!(all.send(ObjectRef::new("cap").within("anywhere")));
        assert_eq!(
            rx[0].try_recv().ok(),
            Some(ObjectRef::new("cap").within("anywhere"))
        );
    }

    /// The published-object watch lists by the ownership label, metadata only, and wakes the
    /// owner its labels name (here in another scope than the object).
    #[tokio::test]
    async fn a_published_object_event_wakes_its_owner() {
        let (svc, mut handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = Client::new(svc, "default");
        let (router, mut rx) = Router::new(&[Some("nv".into()), Some("ingest-a".into())]);
        let watch = tokio::spawn(watch_published(
            api::<PartialObjectMeta<ConfigMap>>(&client, Some("ingest-a")),
            router,
        ));
        let (req, send) = handle.next_request().await.expect("the initial list");
        let uri = req.uri().to_string();
        assert!(
            uri.starts_with("/api/v1/namespaces/ingest-a/configmaps?"),
            "{uri}"
        );
        assert!(
            uri.contains("labelSelector=captioning.dev%2Fowner-name"),
            "{uri}"
        );
        let accept = req.headers().get(http::header::ACCEPT).cloned();
        assert!(
            accept
                .and_then(|a| a.to_str().ok().map(str::to_string))
                .is_some_and(|a| a.contains("as=PartialObjectMetadataList")),
            "metadata only"
        );
        let meta = |name: &str, labels: serde_json::Value| {
            serde_json::json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                "metadata": {"name": name, "namespace": "ingest-a", "resourceVersion": "5",
                    "labels": labels}})
        };
        let list = serde_json::json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
            "metadata": {"resourceVersion": "5"},
            "items": [
                meta("cap-nv-ingest", serde_json::json!({
                    "captioning.dev/owner-namespace": "nv",
                    "captioning.dev/owner-name": "cap",
                    "app.kubernetes.io/managed-by": "vlm-operator"})),
                // An owner-name label, but not managed by us: wakes nobody.
                meta("lookalike", serde_json::json!({
                    "captioning.dev/owner-namespace": "nv",
                    "captioning.dev/owner-name": "other"})),
            ],
        });
        send.send_response(
            http::Response::builder()
                .body(kube::client::Body::from(
                    serde_json::to_vec(&list).expect("list serializes"),
                ))
                .expect("response"),
        );
        let woken = tokio::time::timeout(std::time::Duration::from_secs(1), rx[0].recv())
            .await
            .expect("a reconcile request in time");
        assert_eq!(woken, Some(ObjectRef::new("cap").within("nv")));
        // The watch that follows the list is left unanswered.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(rx[0].try_recv().is_err(), "the lookalike woke nobody");
        assert!(rx[1].try_recv().is_err());
        watch.abort();
    }

    #[tokio::test]
    async fn apis_are_scoped_to_the_namespace() {
        let (svc, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = Client::new(svc, "default");
        let all: Api<Secret> = api(&client, None);
        assert_eq!(all.resource_url(), "/api/v1/secrets");
        let one: Api<Secret> = api(&client, Some("team-a"));
        assert_eq!(one.resource_url(), "/api/v1/namespaces/team-a/secrets");
        let caps: Api<VlmCaptioner> = api(&client, Some("team-a"));
        assert_eq!(
            caps.resource_url(),
            "/apis/captioning.dev/v1alpha1/namespaces/team-a/vlmcaptioners"
        );
    }

    #[tokio::test]
    async fn the_secret_watch_asks_for_metadata_only() {
        let (svc, mut handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = Client::new(svc, "default");
        let server = tokio::spawn(async move {
            let (req, _send) = handle.next_request().await.expect("a request");
            let accept = req.headers().get(http::header::ACCEPT).cloned();
            (req.uri().path().to_string(), accept)
        });
        let secrets: Api<PartialObjectMeta<Secret>> = api(&client, Some("team-a"));
        let _ = secrets.list(&Default::default()).await;
        let (path, accept) = server.await.expect("mock");
        assert_eq!(path, "/api/v1/namespaces/team-a/secrets");
        let accept = accept.expect("an Accept header");
        assert!(
            accept
                .to_str()
                .unwrap_or_default()
                .contains("as=PartialObjectMetadataList"),
            "{accept:?}"
        );
    }

    #[test]
    fn a_secret_maps_to_the_captioners_that_reference_it() {
        let (store, mut writer) = reflector::store::<VlmCaptioner>();
        let mut other_ns = captioner();
        other_ns.metadata.namespace = Some("elsewhere".into());
        other_ns.metadata.name = Some("cap2".into());
        let mut no_auth = captioner();
        no_auth.metadata.name = Some("cap3".into());
        no_auth.spec.auth.api_key_secret_refs.clear();
        for c in [captioner(), other_ns, no_auth] {
            writer.apply_watcher_event(&Event::Apply(c));
        }
        let hits = captioners_for_secret(&store, &secret("nv", "ngc-api"));
        assert_eq!(hits, [ObjectRef::new("cap").within("nv")]);
        assert_eq!(
            captioners_for_secret(&store, &secret("nv", "extra")).len(),
            1
        );
        assert!(captioners_for_secret(&store, &secret("nv", "unrelated")).is_empty());
    }
}
