//! Wires the reconcile into a kube `Controller`: the captioners, their children, and the
//! Secrets they reference.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{Future, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::builders::MANAGED_BY;
use crate::context::Context;
use crate::crd::VlmCaptioner;
use crate::inputs::references_secret;
use crate::reconcile::{error_policy, reconcile};

/// Which namespaces to watch, and how many captioners to reconcile at once.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub namespace: Option<String>,
    pub concurrency: u16,
    pub instance: Option<String>,
}

/// Runs until `shutdown` resolves; sets `ready` once the captioner cache has synced.
pub async fn run(
    client: Client,
    opts: Options,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let ctx = Arc::new(Context::new(client.clone(), opts.instance.clone()));
    let children =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));

    let controller = Controller::new(
        api::<VlmCaptioner>(&client, &opts),
        watcher::Config::default().any_semantic(),
    )
    .with_config(ControllerConfig::default().concurrency(opts.concurrency));
    let store = controller.store();
    let mapper_store = store.clone();
    tokio::spawn(async move {
        if store.wait_until_ready().await.is_ok() {
            ready.store(true, Ordering::Relaxed);
            info!("captioner cache synced");
        }
    });

    controller
        .owns(api::<Deployment>(&client, &opts), children.clone())
        .owns(api::<Service>(&client, &opts), children.clone())
        .owns(api::<ConfigMap>(&client, &opts), children)
        .watches(
            api::<Secret>(&client, &opts),
            watcher::Config::default(),
            move |secret| captioners_for_secret(&mapper_store, &secret),
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
    info!("controller stopped");
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

fn api<K>(client: &Client, opts: &Options) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    match &opts.namespace {
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
