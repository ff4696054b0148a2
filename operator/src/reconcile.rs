//! One pass of the control loop: read the inputs, apply the children, write the status.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::core::DynamicObject;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{self, Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{info, warn};

use crate::builders;
use crate::context::Context;
use crate::crd::{FIELD_MANAGER, SERVICE_PORT, VlmCaptioner, VlmCaptionerStatus};
use crate::download;
use crate::error::{Error, Result};
use crate::inputs::{self, Inputs};
use crate::kstatus;
use crate::overlay::{self, Chat};
use crate::probe::{self, ProbeTarget};
use crate::status::{self, Notice};
use crate::wiring;

/// Requeue when all is well: a safety net, since every child and Secret change is watched.
const RESYNC: Duration = Duration::from_secs(300);
/// Requeue while blocked on something the user must create; PVCs are not watched.
const BLOCKED_RECHECK: Duration = Duration::from_secs(60);

/// Keeps published nv-ingest objects (in other namespaces, so without owner references)
/// until they are removed.
pub const FINALIZER: &str = "captioning.dev/nv-ingest-wiring";

pub async fn reconcile(c: Arc<VlmCaptioner>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    let ns = c
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(c.name_any()))?;
    let action = if needs_finalizer(&c) {
        let api: Api<VlmCaptioner> = Api::namespaced(ctx.client.clone(), &ns);
        finalizer(&api, FINALIZER, c.clone(), |event| async {
            match event {
                FinalizerEvent::Apply(c) => apply_all(c, &ctx).await,
                FinalizerEvent::Cleanup(c) => cleanup(c, &ctx).await,
            }
        })
        .await
        .map_err(flatten)?
    } else if c.metadata.deletion_timestamp.is_some() {
        // Going away, nothing published: the garbage collector removes the children.
        ctx.prober.forget(&ObjectRef::from_obj(c.as_ref()));
        Action::await_change()
    } else {
        apply_all(c.clone(), &ctx).await?
    };
    ctx.backoff.succeeded(&key(&c));
    Ok(action)
}

/// The finalizer only matters while something may be published elsewhere.
fn needs_finalizer(c: &VlmCaptioner) -> bool {
    c.spec.nv_ingest.is_some() || c.finalizers().iter().any(|f| f == FINALIZER)
}

fn flatten(e: finalizer::Error<Error>) -> Error {
    match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    }
}

/// Removes what was published in other namespaces; the owned children go with the owner.
async fn cleanup(c: Arc<VlmCaptioner>, ctx: &Context) -> Result<Action> {
    wiring::remove_all(&c, &ctx.client, &ctx.scope).await?;
    ctx.prober.forget(&ObjectRef::from_obj(c.as_ref()));
    info!(captioner = %key(&c), "removed the nv-ingest wiring");
    Ok(Action::await_change())
}

async fn apply_all(c: Arc<VlmCaptioner>, ctx: &Context) -> Result<Action> {
    let name = c.name_any();
    let ns = c
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(name.clone()))?;

    let inputs = inputs::observe(&c, &ctx.client, &ns).await?;
    // With `spec.model.download`, the weights must be on the PVC before the server starts.
    let model = download::ensure(&c, &ctx.client, &ns).await?;
    let problem = inputs
        .problem
        .clone()
        .or_else(|| model.as_ref().and_then(|m| m.problem().cloned()));
    let hold = problem.is_some() || model.as_ref().is_some_and(|m| !m.is_ready());

    apply(ctx, &ns, &builders::config_map(&c)).await?;
    apply(ctx, &ns, &builders::service(&c)).await?;
    // While an input is missing, leave the running Deployment alone: a pod that cannot start
    // (missing key) must not replace one that serves.
    let deployment = match hold {
        false => Some(apply(ctx, &ns, &builders::deployment(&c, &inputs.secret_hash)).await?),
        true => Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&name)
            .await
            .map_err(|e| Error::kube("get", "Deployment", &name, e))?,
    };
    apply(ctx, &ns, &builders::pdb(&c)).await?;
    match builders::autoscaling(&c) {
        Some(a) => {
            apply(ctx, &ns, &builders::hpa(&c, a)).await?;
        }
        None => delete_if_exists::<HorizontalPodAutoscaler>(ctx, &ns, &name).await?,
    }
    service_monitor(ctx, &c, &ns).await?;

    let wiring = if needs_finalizer(&c) {
        wiring::sync(&c, &ctx.client, &ctx.scope, inputs.first_key.as_ref()).await?
    } else {
        None
    };
    let chat = chat(&c, ctx, &inputs, deployment.as_ref());

    let now = now();
    let mut new = status::desired_status(&c, problem.as_ref(), deployment.as_ref(), &now);
    download::set_conditions(&c, model.as_ref(), &mut new, &now);
    overlay::overlay(&c, &mut new, &chat, wiring, &now);
    kstatus::set_conditions(&c, &mut new, &now);
    if c.status.as_ref() != Some(&new) {
        patch_status(ctx, &ns, &name, &new).await?;
        // Events only for transitions that are now recorded in the status.
        let mut notices = status::transitions(c.status.as_ref(), &new);
        notices.extend(overlay::transitions(c.status.as_ref(), &new));
        notices.extend(download::transitions(c.status.as_ref(), &new));
        publish(ctx, &c, &notices).await;
    }

    Ok(Action::requeue(if hold { BLOCKED_RECHECK } else { RESYNC }))
}

/// Hands the probe target to the prober and reads its last outcome. No ready replica, no probe.
fn chat(c: &VlmCaptioner, ctx: &Context, inputs: &Inputs, d: Option<&Deployment>) -> Chat {
    let key = ObjectRef::from_obj(c);
    let hc = &c.spec.health_check;
    if !hc.enabled {
        ctx.prober.forget(&key);
        return Chat::Disabled;
    }
    let ready = d
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    if ready == 0 {
        ctx.prober.observe(key, None);
        return Chat::NoReadyReplicas;
    }
    let target = ProbeTarget {
        url: format!(
            "http://{}.{}.svc:{SERVICE_PORT}/v1/chat/completions",
            c.name_any(),
            c.namespace().unwrap_or_default()
        ),
        bearer: inputs.first_key.as_ref().map(|k| k.expose().to_string()),
        body: probe::request_body(c).to_string(),
        interval: Duration::from_secs(u64::try_from(hc.interval_seconds).unwrap_or(60).max(10)),
        timeout: Duration::from_secs(u64::try_from(hc.timeout_seconds).unwrap_or(30).max(1)),
    };
    Chat::Last(ctx.prober.observe(key, Some(target)))
}

/// Applies the ServiceMonitor when the Prometheus Operator's API exists; silent otherwise.
async fn service_monitor(ctx: &Context, c: &VlmCaptioner, ns: &str) -> Result<()> {
    let present = match ctx.service_monitors.get() {
        Some(p) => p,
        None => {
            let ar = builders::service_monitor_resource();
            match ctx.client.list_api_group_resources(&ar.api_version).await {
                Ok(list) => {
                    let p = list.resources.iter().any(|r| r.name == ar.plural);
                    ctx.service_monitors.found(p);
                    p
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    ctx.service_monitors.found(false);
                    false
                }
                // Unknown: try again next time, and do not fail the captioner for an extra.
                Err(e) => {
                    warn!(error = %e, "ServiceMonitor discovery failed");
                    false
                }
            }
        }
    };
    if !present {
        return Ok(());
    }
    let ar = builders::service_monitor_resource();
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
    let name = c.name_any();
    if c.spec.service_monitor.enabled {
        let sm = builders::service_monitor(c);
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&sm),
        )
        .await
        .map_err(|e| Error::kube("apply", "ServiceMonitor", &name, e))?;
    } else {
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::kube("delete", "ServiceMonitor", &name, e)),
        }
    }
    Ok(())
}

async fn delete_if_exists<K>(ctx: &Context, ns: &str, name: &str) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::kube("delete", &K::kind(&()), name, e)),
    }
}

/// Retries with per-object exponential backoff (5 s doubling to 5 min), never a hot loop.
pub fn error_policy(c: Arc<VlmCaptioner>, err: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff.failed(&key(&c));
    ctx.metrics.reconcile_failed(err.metric_label());
    warn!(captioner = %key(&c), error = %err, retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

/// Whole seconds, as the apiserver stores `metav1.Time`.
pub fn now() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

fn key(c: &VlmCaptioner) -> String {
    format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any())
}

/// Server-side apply with the operator's field manager; an unchanged object is a no-op on the server.
async fn apply<K>(ctx: &Context, ns: &str, obj: &K) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|e| Error::kube("apply", &K::kind(&()), &name, e))
}

async fn patch_status(
    ctx: &Context,
    ns: &str,
    name: &str,
    status: &VlmCaptionerStatus,
) -> Result<()> {
    let api: Api<VlmCaptioner> = Api::namespaced(ctx.client.clone(), ns);
    let body = json!({
        "apiVersion": VlmCaptioner::api_version(&()),
        "kind": VlmCaptioner::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|e| Error::kube("patch status", "VlmCaptioner", name, e))?;
    Ok(())
}

/// Events are best effort: failing to record one must not fail the reconcile.
async fn publish(ctx: &Context, c: &VlmCaptioner, notices: &[Notice]) {
    for n in notices {
        info!(captioner = %key(c), reason = %n.reason, note = %n.note, "transition");
        let event = Event {
            type_: if n.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: n.reason.clone(),
            note: Some(n.note.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &c.object_ref(&())).await {
            warn!(captioner = %key(c), error = %e, "could not publish event");
        }
    }
}
