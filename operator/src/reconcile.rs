//! One pass of the control loop: read the inputs, apply the children, write the status.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{info, warn};

use crate::builders;
use crate::context::Context;
use crate::crd::{FIELD_MANAGER, VlmCaptioner, VlmCaptionerStatus};
use crate::error::{Error, Result};
use crate::inputs;
use crate::status::{self, Notice};

/// Requeue when all is well: a safety net, since every child and Secret change is watched.
const RESYNC: Duration = Duration::from_secs(300);
/// Requeue while blocked on something the user must create; PVCs are not watched.
const BLOCKED_RECHECK: Duration = Duration::from_secs(60);

pub async fn reconcile(c: Arc<VlmCaptioner>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    let name = c.name_any();
    let ns = c
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(name.clone()))?;

    let inputs = inputs::observe(&c, &ctx.client, &ns).await?;

    apply(&ctx, &ns, &builders::config_map(&c)).await?;
    apply(&ctx, &ns, &builders::service(&c)).await?;
    // While an input is missing, leave the running Deployment alone: a pod that cannot start
    // (missing key) must not replace one that serves.
    let deployment = match &inputs.problem {
        None => Some(apply(&ctx, &ns, &builders::deployment(&c, &inputs.secret_hash)).await?),
        Some(_) => Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&name)
            .await
            .map_err(|e| Error::kube("get", "Deployment", &name, e))?,
    };

    let new = status::desired_status(&c, inputs.problem.as_ref(), deployment.as_ref(), &now());
    if c.status.as_ref() != Some(&new) {
        patch_status(&ctx, &ns, &name, &new).await?;
        // Events only for transitions that are now recorded in the status.
        publish(&ctx, &c, &status::transitions(c.status.as_ref(), &new)).await;
    }

    ctx.backoff.succeeded(&key(&c));
    Ok(Action::requeue(if inputs.problem.is_some() {
        BLOCKED_RECHECK
    } else {
        RESYNC
    }))
}

/// Retries with per-object exponential backoff (5 s doubling to 5 min), never a hot loop.
pub fn error_policy(c: Arc<VlmCaptioner>, err: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff.failed(&key(&c));
    ctx.metrics.reconcile_failed(err.metric_label());
    warn!(captioner = %key(&c), error = %err, retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

/// Whole seconds, as the apiserver stores `metav1.Time`.
fn now() -> Time {
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
