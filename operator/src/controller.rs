//! Wires the reconcile into a kube `Controller`: the captioners, their children, and the
//! Secrets they reference.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::collections::BTreeMap;

use futures::{Future, FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::builders::MANAGED_BY;
use crate::context::Context;
use crate::crd::VlmCaptioner;
use crate::inputs::references_secret;
use crate::reconcile::{error_policy, reconcile};
use crate::wiring::selects_namespace;

/// Which namespaces to watch, and how many captioners to reconcile at once.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Empty: every namespace (cluster-wide RBAC). Otherwise only these (namespaced RBAC).
    pub namespaces: Vec<String>,
    pub concurrency: u16,
    pub instance: Option<String>,
}

impl Options {
    /// One watch scope per namespace, or `None` for all namespaces.
    pub fn scopes(&self) -> Vec<Option<String>> {
        let mut namespaces: Vec<String> = self
            .namespaces
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        namespaces.sort();
        namespaces.dedup();
        if namespaces.is_empty() {
            vec![None]
        } else {
            namespaces.into_iter().map(Some).collect()
        }
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
    let ctx = Arc::new(Context::new(client.clone(), opts.instance.clone()));
    let shutdown = shutdown.shared();
    let scopes = opts.scopes();

    // Probe outcomes arrive on one channel: route each to its namespace's controller.
    let mut routes = BTreeMap::new();
    let mut triggers = Vec::new();
    for scope in &scopes {
        let (tx, rx) = mpsc::unbounded_channel::<ObjectRef<VlmCaptioner>>();
        routes.insert(scope.clone(), tx);
        triggers.push(rx);
    }
    if let Some(mut rx) = ctx.prober.take_triggers() {
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                let route = routes.get(&r.namespace).or_else(|| routes.get(&None));
                if let Some(tx) = route {
                    let _ = tx.send(r);
                }
            }
        });
    }

    let mut stores = Vec::new();
    let mut controllers = Vec::new();
    for (scope, triggers) in scopes.into_iter().zip(triggers) {
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
            triggers,
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
    info!("controller stopped");
}

async fn run_scope(
    controller: Controller<VlmCaptioner>,
    client: Client,
    scope: Option<String>,
    probe_triggers: mpsc::UnboundedReceiver<ObjectRef<VlmCaptioner>>,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let ns = scope.as_deref();
    let store = controller.store();
    let children =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    // A chat probe whose outcome changed re-reconciles its captioner.
    let probe_triggers = futures::stream::unfold(probe_triggers, |mut rx| async move {
        rx.recv().await.map(|r| (r, rx))
    });
    let mut controller = controller.reconcile_on(probe_triggers);
    // nv-ingest namespaces chosen by label: a namespace appearing or relabelled re-wires.
    // Namespaces are cluster-scoped, so only in the all-namespaces mode.
    if ns.is_none() {
        let ns_store = store.clone();
        controller = controller.watches(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default().any_semantic(),
            move |n| captioners_for_namespace(&ns_store, &n),
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
        assert_eq!(all.scopes(), [None]);
        let listed = Options {
            namespaces: vec!["b".into(), " a ".into(), "b".into(), "".into()],
            ..Options::default()
        };
        assert_eq!(listed.scopes(), [Some("a".into()), Some("b".into())]);
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
