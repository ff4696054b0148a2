//! `spec.model.download`: the model PVC and the download Job that must finish before the server
//! Deployment is applied, and the `ModelReady` condition that reports them.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{DeleteParams, PostParams, PropagationPolicy};
use kube::{Api, Client, ResourceExt};

use crate::builders::{
    MODEL_SOURCE_ANNOTATION, TEMPLATE_HASH_ANNOTATION, download_job, download_job_name, model_pvc,
    model_pvc_name, model_source,
};
use crate::crd::{DownloadSource, VlmCaptioner, VlmCaptionerStatus};
use crate::error::{Error, Result};
use crate::status::{self, Notice, PROGRESSING, Problem};

pub const MODEL_READY: &str = "ModelReady";

pub mod reason {
    pub const DOWNLOADED: &str = "Downloaded";
    pub const DOWNLOADING: &str = "Downloading";
    pub const DOWNLOAD_FAILED: &str = "ModelDownloadFailed";
    pub const TOKEN_SECRET_NOT_FOUND: &str = "TokenSecretNotFound";
}

/// Where the weights stand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelState {
    Ready(String),
    /// The Job is running (or about to): hold the Deployment, report Progressing.
    Downloading(String),
    /// Failed, or blocked on something the user must fix: hold the Deployment, report Degraded.
    Failed(Problem),
}

impl ModelState {
    pub fn is_ready(&self) -> bool {
        matches!(self, ModelState::Ready(_))
    }

    pub fn problem(&self) -> Option<&Problem> {
        match self {
            ModelState::Failed(p) => Some(p),
            _ => None,
        }
    }
}

/// Makes the PVC and the Job as needed and reads the Job's outcome; `None` without
/// `spec.model.download`.
pub async fn ensure(c: &VlmCaptioner, client: &Client, ns: &str) -> Result<Option<ModelState>> {
    let Some(dl) = &c.spec.model.download else {
        return Ok(None);
    };
    if let Some(problem) = token_problem(dl, client, ns).await? {
        return Ok(Some(ModelState::Failed(problem)));
    }

    // Create only: a PVC's spec is immutable but for a size increase, and the claim outlives
    // spec edits that would not fit it.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvc_name = model_pvc_name(c);
    if pvcs
        .get_opt(&pvc_name)
        .await
        .map_err(|e| Error::kube("get", "PersistentVolumeClaim", &pvc_name, e))?
        .is_none()
    {
        create(&pvcs, &model_pvc(c, dl), "PersistentVolumeClaim").await?;
    }

    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let name = download_job_name(c);
    let desired = download_job(c, dl);
    let Some(job) = jobs
        .get_opt(&name)
        .await
        .map_err(|e| Error::kube("get", "Job", &name, e))?
    else {
        create(&jobs, &desired, "Job").await?;
        return Ok(Some(ModelState::Downloading(format!(
            "started Job {name:?} to download {}",
            model_source(dl)
        ))));
    };
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Some(ModelState::Downloading(format!(
            "waiting for the previous Job {name:?} to go away"
        ))));
    }
    let outcome = job_outcome(&job);
    // A Job's pod template is immutable: replace it when the snapshot changed, or when it failed
    // and its template changed since (a retry with the fix); a succeeded Job is never re-run.
    let source_changed = annotation(&job, MODEL_SOURCE_ANNOTATION) != Some(model_source(dl));
    let retry = matches!(outcome, JobOutcome::Failed(..))
        && annotation(&job, TEMPLATE_HASH_ANNOTATION)
            != annotation(&desired, TEMPLATE_HASH_ANNOTATION);
    if source_changed || retry {
        // Foreground: the old pod must stop writing before a new one starts.
        let dp = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Foreground),
            ..DeleteParams::default()
        };
        match jobs.delete(&name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::kube("delete", "Job", &name, e)),
        }
        return Ok(Some(ModelState::Downloading(format!(
            "replacing Job {name:?} to download {}",
            model_source(dl)
        ))));
    }
    Ok(Some(match outcome {
        JobOutcome::Succeeded => ModelState::Ready(format!(
            "{} is on PersistentVolumeClaim {pvc_name:?}",
            model_source(dl)
        )),
        JobOutcome::Failed(why, message) => ModelState::Failed(Problem {
            reason: reason::DOWNLOAD_FAILED,
            message: format!(
                "Job {name:?} failed ({why}: {message}); see `kubectl logs job/{name}`; fix the cause and delete the Job to retry"
            ),
        }),
        JobOutcome::Running => {
            ModelState::Downloading(format!("Job {name:?} is downloading {}", model_source(dl)))
        }
    }))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Running,
    Succeeded,
    Failed(String, String),
}

/// `Complete`/`Failed` conditions (set once `backoffLimit` is exhausted), else `succeeded`.
pub fn job_outcome(job: &Job) -> JobOutcome {
    let Some(status) = &job.status else {
        return JobOutcome::Running;
    };
    for c in status.conditions.iter().flatten() {
        if c.status != "True" {
            continue;
        }
        match c.type_.as_str() {
            "Complete" => return JobOutcome::Succeeded,
            "Failed" => {
                return JobOutcome::Failed(
                    c.reason.clone().unwrap_or_else(|| "Failed".into()),
                    c.message.clone().unwrap_or_default(),
                );
            }
            _ => {}
        }
    }
    if status.succeeded.unwrap_or(0) > 0 {
        JobOutcome::Succeeded
    } else {
        JobOutcome::Running
    }
}

/// A missing token Secret or key would leave the pod in CreateContainerConfigError forever,
/// uncounted by the Job: report it instead of creating the Job.
async fn token_problem(dl: &DownloadSource, client: &Client, ns: &str) -> Result<Option<Problem>> {
    let Some(r) = &dl.token_secret_ref else {
        return Ok(None);
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = secrets
        .get_opt(&r.name)
        .await
        .map_err(|e| Error::kube("get", "Secret", &r.name, e))?;
    let message = match secret {
        None => format!(
            "Secret {:?} (spec.model.download.tokenSecretRef) not found in namespace {ns:?}",
            r.name
        ),
        Some(s) if !s.data.as_ref().is_some_and(|d| d.contains_key(&r.key)) => format!(
            "Secret {:?} has no key {:?} (spec.model.download.tokenSecretRef)",
            r.name, r.key
        ),
        Some(_) => return Ok(None),
    };
    Ok(Some(Problem {
        reason: reason::TOKEN_SECRET_NOT_FOUND,
        message,
    }))
}

fn annotation<K: ResourceExt>(obj: &K, key: &str) -> Option<String> {
    obj.annotations().get(key).cloned()
}

async fn create<K>(api: &Api<K>, obj: &K, kind: &str) -> Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        // A concurrent reconcile (or an earlier, unobserved one) made it: fine.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(Error::kube("create", kind, &name, e)),
    }
}

/// Adds `ModelReady`, and while downloading says so in `Progressing` (the Deployment is held).
pub fn set_conditions(
    c: &VlmCaptioner,
    state: Option<&ModelState>,
    new: &mut VlmCaptionerStatus,
    now: &Time,
) {
    let Some(state) = state else {
        return;
    };
    let prev: &[Condition] = c
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let generation = c.metadata.generation;
    let (ok, why, message) = match state {
        ModelState::Ready(m) => (true, reason::DOWNLOADED, m.clone()),
        ModelState::Downloading(m) => (false, reason::DOWNLOADING, m.clone()),
        ModelState::Failed(p) => (false, p.reason, p.message.clone()),
    };
    let model_ready =
        status::condition(prev, MODEL_READY, ok, why, message.clone(), generation, now);
    new.conditions.retain(|c| c.type_ != MODEL_READY);
    new.conditions.push(model_ready);
    if let ModelState::Downloading(_) = state
        && let Some(p) = new.conditions.iter_mut().find(|c| c.type_ == PROGRESSING)
    {
        *p = status::condition(
            prev,
            PROGRESSING,
            true,
            reason::DOWNLOADING,
            message,
            generation,
            now,
        );
    }
}

/// Events when `ModelReady` changes: `Downloading` when a download starts (or starts over),
/// `Downloaded` when the weights are in place. A failed or blocked download is already a
/// Warning with the same reason, through `Degraded`.
pub fn transitions(old: Option<&VlmCaptionerStatus>, new: &VlmCaptionerStatus) -> Vec<Notice> {
    let find = |s: Option<&VlmCaptionerStatus>| {
        s.and_then(|s| s.conditions.iter().find(|c| c.type_ == MODEL_READY))
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    let (Some((status, why, note)), old) = (find(Some(new)), find(old)) else {
        return Vec::new();
    };
    if old.is_some_and(|(s, r, _)| (s, r) == (status.clone(), why.clone())) {
        return Vec::new();
    }
    match why.as_str() {
        reason::DOWNLOADED | reason::DOWNLOADING => vec![Notice {
            warning: false,
            reason: why,
            note,
        }],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn with_model(state: &ModelState, prev: Option<&VlmCaptionerStatus>) -> VlmCaptionerStatus {
        let mut c: VlmCaptioner = serde_json::from_value(serde_json::json!({
            "apiVersion": "captioning.dev/v1alpha1", "kind": "VlmCaptioner",
            "metadata": {"name": "cap", "namespace": "nv", "generation": 1},
            "spec": {"model": {"download": {}}},
        }))
        .unwrap();
        c.status = prev.cloned();
        let mut new = VlmCaptionerStatus::default();
        let now = Time(Timestamp::from_second(1).unwrap());
        set_conditions(&c, Some(state), &mut new, &now);
        new
    }

    #[test]
    fn model_ready_changes_are_events_once() {
        let reasons = |n: Vec<Notice>| n.into_iter().map(|n| n.reason).collect::<Vec<_>>();
        let started = with_model(&ModelState::Downloading("started".into()), None);
        assert_eq!(reasons(transitions(None, &started)), [reason::DOWNLOADING]);
        // Still downloading, in other words: no new event.
        let running = with_model(&ModelState::Downloading("running".into()), Some(&started));
        assert!(transitions(Some(&started), &running).is_empty());
        let done = with_model(&ModelState::Ready("on the PVC".into()), Some(&running));
        let n = transitions(Some(&running), &done);
        assert_eq!(
            n,
            [Notice {
                warning: false,
                reason: reason::DOWNLOADED.into(),
                note: "on the PVC".into()
            }]
        );
        assert!(transitions(Some(&done), &done).is_empty());
        // A new revision starts over.
        let again = with_model(&ModelState::Downloading("replacing".into()), Some(&done));
        assert_eq!(
            reasons(transitions(Some(&done), &again)),
            [reason::DOWNLOADING]
        );
        // Failures are reported through Degraded's Warning, not twice.
        let failed = with_model(
            &ModelState::Failed(Problem {
                reason: reason::DOWNLOAD_FAILED,
                message: "boom".into(),
            }),
            Some(&again),
        );
        assert!(transitions(Some(&again), &failed).is_empty());
    }

    fn job(status: JobStatus) -> Job {
        Job {
            status: Some(status),
            ..Job::default()
        }
    }

    fn cond(type_: &str, reason: &str) -> JobCondition {
        JobCondition {
            type_: type_.into(),
            status: "True".into(),
            reason: Some(reason.into()),
            message: Some("m".into()),
            ..JobCondition::default()
        }
    }

    #[test]
    fn job_outcomes() {
        assert_eq!(job_outcome(&Job::default()), JobOutcome::Running);
        assert_eq!(
            job_outcome(&job(JobStatus {
                active: Some(1),
                failed: Some(2),
                ..JobStatus::default()
            })),
            JobOutcome::Running,
            "failed pods below the backoff limit are retried"
        );
        assert_eq!(
            job_outcome(&job(JobStatus {
                conditions: Some(vec![cond("Complete", "")]),
                ..JobStatus::default()
            })),
            JobOutcome::Succeeded
        );
        assert_eq!(
            job_outcome(&job(JobStatus {
                conditions: Some(vec![cond("Failed", "BackoffLimitExceeded")]),
                ..JobStatus::default()
            })),
            JobOutcome::Failed("BackoffLimitExceeded".into(), "m".into())
        );
    }
}
