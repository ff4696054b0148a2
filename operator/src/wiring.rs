//! Publishes the nv-ingest wiring into the target namespaces and removes it from namespaces
//! that left the selection. An object that exists but is not ours is reported, never touched.

use std::collections::BTreeSet;
use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::builders::{
    alias_service, is_ours, owner_selector, published_config_map, published_secret,
    wiring_secret_name,
};
use crate::crd::{FIELD_MANAGER, NvIngestStatus, VlmCaptioner};
use crate::error::{Error, Result};
use crate::inputs::ApiKey;

/// Namespaces named in `spec.nvIngest.namespaces` plus those matching its selector.
pub async fn target_namespaces(c: &VlmCaptioner, client: &Client) -> Result<BTreeSet<String>> {
    let Some(spec) = &c.spec.nv_ingest else {
        return Ok(BTreeSet::new());
    };
    let mut targets: BTreeSet<String> = spec.namespaces.iter().cloned().collect();
    if let Some(sel) = &spec.namespace_selector {
        // An empty selector would match every namespace: treat it as "none" rather than
        // spraying Secrets across the cluster.
        let empty = sel.match_labels.as_ref().is_none_or(|m| m.is_empty())
            && sel.match_expressions.as_ref().is_none_or(|e| e.is_empty());
        if !empty {
            let selector =
                Selector::try_from(sel.clone()).map_err(|e| Error::Selector(e.to_string()))?;
            let api: Api<Namespace> = Api::all(client.clone());
            let list = api
                .list_metadata(&ListParams::default().labels_from(&selector))
                .await
                .map_err(|e| Error::kube("list", "Namespace", "", e))?;
            targets.extend(list.items.into_iter().map(|n| n.name_any()));
        }
    }
    Ok(targets)
}

/// Which namespace event concerns this captioner: a listed one, or one its selector matches.
pub fn selects_namespace(c: &VlmCaptioner, ns: &Namespace) -> bool {
    let Some(spec) = &c.spec.nv_ingest else {
        return false;
    };
    let name = ns.name_any();
    if spec.namespaces.contains(&name) {
        return true;
    }
    let Some(sel) = &spec.namespace_selector else {
        return false;
    };
    // A namespace that stopped matching matters too: whether it was wired is in the status.
    let wired = c
        .status
        .as_ref()
        .and_then(|s| s.nv_ingest.as_ref())
        .is_some_and(|w| w.wired_namespaces.contains(&name));
    let labels = ns.labels();
    wired || Selector::try_from(sel.clone()).is_ok_and(|s| s.matches(labels))
}

/// Applies the wiring into every target namespace, then deletes whatever of ours is no longer
/// wanted (a namespace left the selection, auth or the alias was turned off, a rename).
pub async fn sync(
    c: &VlmCaptioner,
    client: &Client,
    first_key: Option<&ApiKey>,
) -> Result<Option<NvIngestStatus>> {
    let own_ns = c.namespace().unwrap_or_default();
    let targets = target_namespaces(c, client).await?;
    let spec = c.spec.nv_ingest.as_ref();
    let mut status = NvIngestStatus::default();
    let mut wanted: BTreeSet<(String, String)> = BTreeSet::new();

    for ns in &targets {
        let mut conflicts = Vec::new();
        // The captioner's own namespace already has the owned ConfigMap of the same name.
        if ns != &own_ns {
            let cm = published_config_map(c, ns);
            apply_one(c, client, ns, cm, &mut wanted, &mut conflicts).await?;
        }
        match first_key {
            Some(k) => {
                let secret = published_secret(c, ns, k.expose());
                apply_one(c, client, ns, secret, &mut wanted, &mut conflicts).await?;
            }
            // Auth is on but the key is missing (reported as Degraded): keep the last good
            // copy, since nv-ingest pods that load it would not start without it.
            None if !c.spec.auth.api_key_secret_refs.is_empty() => {
                wanted.insert((format!("Secret/{ns}"), wiring_secret_name(c)));
            }
            None => {}
        }
        if let Some(s) = spec.filter(|s| s.alias_service) {
            // In its own namespace the captioner's real Service may already carry the name.
            if !(ns == &own_ns && s.alias_name == c.name_any()) {
                let svc = alias_service(c, ns, &s.alias_name);
                apply_one(c, client, ns, svc, &mut wanted, &mut conflicts).await?;
            }
        }
        if conflicts.is_empty() {
            status.wired_namespaces.push(ns.clone());
        }
        status.conflicts.extend(conflicts);
    }

    prune::<ConfigMap>(c, client, &wanted).await?;
    prune::<Secret>(c, client, &wanted).await?;
    prune::<Service>(c, client, &wanted).await?;
    Ok(spec.map(|_| status))
}

/// Applies `obj` unless a foreign object holds its name.
async fn apply_one<K>(
    c: &VlmCaptioner,
    client: &Client,
    ns: &str,
    obj: K,
    wanted: &mut BTreeSet<(String, String)>,
    conflicts: &mut Vec<String>,
) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let kind = K::kind(&());
    let name = obj.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let existing = api
        .get_metadata_opt(&name)
        .await
        .map_err(|e| Error::kube("get", &kind, &name, e))?;
    if existing.is_some_and(|e| !is_ours(c, &e.metadata)) {
        conflicts.push(format!("{ns}/{kind}/{name}"));
        return Ok(());
    }
    wanted.insert((format!("{kind}/{ns}"), name.clone()));
    let res = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await;
    match res {
        Ok(_) => Ok(()),
        // The namespace does not exist (yet): nothing to wire there, not an error.
        Err(kube::Error::Api(s)) if s.code == 404 => {
            conflicts.push(format!("{ns}: namespace not found"));
            Ok(())
        }
        Err(e) => Err(Error::kube("apply", &kind, &name, e)),
    }
}

/// Deletes this captioner's published objects of one kind that are not in `wanted`.
async fn prune<K>(
    c: &VlmCaptioner,
    client: &Client,
    wanted: &BTreeSet<(String, String)>,
) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let kind = K::kind(&());
    let lp = ListParams::default().labels(&owner_selector(c));
    let list = Api::<K>::all(client.clone())
        .list_metadata(&lp)
        .await
        .map_err(|e| Error::kube("list", &kind, "", e))?;
    for obj in list.items.iter().filter(|o| is_ours(c, &o.metadata)) {
        let ns = obj.namespace().unwrap_or_default();
        if !wanted.contains(&(format!("{kind}/{ns}"), obj.name_any())) {
            delete(
                &Api::<K>::namespaced(client.clone(), &ns),
                &kind,
                &obj.name_any(),
            )
            .await?;
        }
    }
    Ok(())
}

async fn delete<K>(api: &Api<K>, kind: &str, name: &str) -> Result<()>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::kube("delete", kind, name, e)),
    }
}

/// Deletes everything this captioner published, wherever it is (the finalizer's cleanup).
pub async fn remove_all(c: &VlmCaptioner, client: &Client) -> Result<()> {
    let none = BTreeSet::new();
    prune::<ConfigMap>(c, client, &none).await?;
    prune::<Secret>(c, client, &none).await?;
    prune::<Service>(c, client, &none).await
}
