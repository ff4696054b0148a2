//! Publishes the nv-ingest wiring into the target namespaces and removes it from namespaces
//! that left the selection. An object that exists but is not ours is reported, never touched.
//! Everything stays inside the operator's scope: in namespaced mode only watched namespaces
//! are wired, and a namespace selector (which needs a cluster-wide namespace list) is refused.

use std::collections::BTreeSet;
use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::builders::{
    MANAGED_BY, MANAGED_BY_LABEL, OWNER_NAME_LABEL, OWNER_NAMESPACE_LABEL, alias_service, is_ours,
    owner_selector, published_config_map, published_secret, wiring_secret_name,
};
use crate::crd::{FIELD_MANAGER, NvIngestStatus, VlmCaptioner};
use crate::error::{Error, Result};
use crate::inputs::ApiKey;
use crate::scope::Scope;
use crate::status::{Problem, reason};

/// What one sync did: the status to report, and the part of the spec the operator's scope
/// does not allow (namespaced mode).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Wiring {
    pub status: NvIngestStatus,
    pub refused: Option<Problem>,
}

/// The namespaces to wire, and why some asked for are not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    pub namespaces: BTreeSet<String>,
    pub refused: Option<Problem>,
}

/// Namespaces named in `spec.nvIngest.namespaces` plus those matching its selector, within
/// `scope`.
pub async fn target_namespaces(
    c: &VlmCaptioner,
    client: &Client,
    scope: &Scope,
) -> Result<Targets> {
    let Some(spec) = &c.spec.nv_ingest else {
        return Ok(Targets::default());
    };
    let (mut namespaces, outside): (BTreeSet<String>, BTreeSet<String>) = spec
        .namespaces
        .iter()
        .cloned()
        .partition(|n| scope.contains(n));
    let mut refused = Vec::new();
    if let Some(sel) = spec.namespace_selector.as_ref().filter(|s| !is_empty(s)) {
        match scope {
            Scope::Cluster => {
                let selector =
                    Selector::try_from(sel.clone()).map_err(|e| Error::Selector(e.to_string()))?;
                let api: Api<Namespace> = Api::all(client.clone());
                let list = api
                    .list_metadata(&ListParams::default().labels_from(&selector))
                    .await
                    .map_err(|e| Error::kube("list", "Namespace", "", e))?;
                namespaces.extend(list.items.into_iter().map(|n| n.name_any()));
            }
            // Selecting namespaces by label needs a cluster-wide namespace list (and watch),
            // which a namespaced operator is not granted.
            Scope::Namespaces(_) => refused.push(Problem {
                reason: reason::NAMESPACE_SELECTOR_UNSUPPORTED,
                message: format!(
                    "spec.nvIngest.namespaceSelector needs the operator's all-namespaces mode; \
                     this operator watches only {}: list the target namespaces in \
                     spec.nvIngest.namespaces instead",
                    scope.describe()
                ),
            }),
        }
    }
    if !outside.is_empty() {
        refused.push(Problem {
            reason: reason::NAMESPACE_NOT_WATCHED,
            message: format!(
                "not wired: {} (the operator watches only {}; add them to its --namespace list)",
                outside.into_iter().collect::<Vec<_>>().join(", "),
                scope.describe()
            ),
        });
    }
    Ok(Targets {
        namespaces,
        refused: crate::inputs::merge(refused),
    })
}

/// An empty selector would match every namespace: treated as "none" rather than spraying
/// Secrets across the cluster.
fn is_empty(sel: &LabelSelector) -> bool {
    sel.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && sel.match_expressions.as_ref().is_none_or(|e| e.is_empty())
}

/// The captioner a published object belongs to, read from its ownership labels: how an event
/// on a copy in another namespace finds its way back to the owner's reconcile.
pub fn owner_of(meta: &ObjectMeta) -> Option<ObjectRef<VlmCaptioner>> {
    let labels = meta.labels.as_ref()?;
    if labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY) {
        return None;
    }
    let ns = labels.get(OWNER_NAMESPACE_LABEL)?;
    let name = labels.get(OWNER_NAME_LABEL)?;
    Some(ObjectRef::new(name).within(ns))
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
    scope: &Scope,
    first_key: Option<&ApiKey>,
) -> Result<Option<Wiring>> {
    let own_ns = c.namespace().unwrap_or_default();
    let Targets {
        namespaces: targets,
        refused,
    } = target_namespaces(c, client, scope).await?;
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

    prune::<ConfigMap>(c, client, scope, &wanted).await?;
    prune::<Secret>(c, client, scope, &wanted).await?;
    prune::<Service>(c, client, scope, &wanted).await?;
    Ok(spec.map(|_| Wiring { status, refused }))
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

/// Deletes this captioner's published objects of one kind, within `scope`, that are not in
/// `wanted`.
async fn prune<K>(
    c: &VlmCaptioner,
    client: &Client,
    scope: &Scope,
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
    for api in scope.apis::<K>(client) {
        let list = api
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

/// Deletes everything this captioner published within `scope` (the finalizer's cleanup).
pub async fn remove_all(c: &VlmCaptioner, client: &Client, scope: &Scope) -> Result<()> {
    let none = BTreeSet::new();
    prune::<ConfigMap>(c, client, scope, &none).await?;
    prune::<Secret>(c, client, scope, &none).await?;
    prune::<Service>(c, client, scope, &none).await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::test_support::captioner;

    fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.into());
        ns.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        );
        ns
    }

    #[test]
    fn a_namespace_event_concerns_captioners_that_list_select_or_wired_it() {
        let mut c = captioner();
        assert!(!selects_namespace(&c, &namespace("a", &[])), "no nvIngest");
        c.spec.nv_ingest = serde_json::from_value(json!({
            "namespaces": ["listed"],
            "namespaceSelector": {"matchLabels": {"captioning.dev/nv-ingest": "true"}},
        }))
        .unwrap();
        assert!(selects_namespace(&c, &namespace("listed", &[])));
        let label = [("captioning.dev/nv-ingest", "true")];
        assert!(selects_namespace(&c, &namespace("joined", &label)));
        assert!(!selects_namespace(&c, &namespace("unrelated", &[])));
        // A namespace that lost the label matters while it still holds our wiring.
        c.status = Some(crate::crd::VlmCaptionerStatus {
            nv_ingest: Some(NvIngestStatus {
                wired_namespaces: vec!["left".into()],
                conflicts: vec![],
            }),
            ..Default::default()
        });
        assert!(selects_namespace(&c, &namespace("left", &[])));
    }

    #[test]
    fn only_labels_we_set_name_an_owner() {
        let meta = |labels: &[(&str, &str)]| ObjectMeta {
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        };
        let ours = [
            (OWNER_NAMESPACE_LABEL, "nv"),
            (OWNER_NAME_LABEL, "cap"),
            (MANAGED_BY_LABEL, MANAGED_BY),
        ];
        assert_eq!(
            owner_of(&meta(&ours)),
            Some(ObjectRef::new("cap").within("nv"))
        );
        assert_eq!(owner_of(&meta(&ours[..2])), None, "not managed by us");
        assert_eq!(owner_of(&meta(&ours[1..])), None, "no owner namespace");
        assert_eq!(owner_of(&ObjectMeta::default()), None);
    }
}
