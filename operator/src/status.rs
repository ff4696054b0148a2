//! Status as a pure function of what the reconcile observed, and the events worth telling a
//! person about. `lastTransitionTime` moves only when a condition's status flips, so an
//! unchanged world yields an identical status and no write.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::builders::endpoint_url;
use crate::crd::{VlmCaptioner, VlmCaptionerStatus};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// Condition reasons (documented in `docs/operator.md`).
pub mod reason {
    pub const ALL_REPLICAS_READY: &str = "AllReplicasReady";
    pub const REPLICAS_NOT_READY: &str = "ReplicasNotReady";
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
    pub const AS_EXPECTED: &str = "AsExpected";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const SECRET_KEY_NOT_FOUND: &str = "SecretKeyNotFound";
    pub const PVC_NOT_FOUND: &str = "PvcNotFound";
    pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
    pub const RECOVERED: &str = "Recovered";
    pub const NOT_READY: &str = "NotReady";
    // The chat-endpoint probe (`ChatReady`; see `overlay.rs`).
    pub const CHAT_OK: &str = "ChatOk";
    pub const CHAT_PROBE_FAILED: &str = "ChatProbeFailed";
    pub const CHAT_PROBE_TIMED_OUT: &str = "ChatProbeTimedOut";
    pub const CHAT_PROBE_PENDING: &str = "ChatProbePending";
    pub const NO_READY_REPLICAS: &str = "NoReadyReplicas";
    pub const PROBE_DISABLED: &str = "ProbeDisabled";
    pub const CHAT_NOT_READY: &str = "ChatNotReady";
    // nv-ingest wiring (`NvIngestWired`).
    pub const PUBLISHED: &str = "Published";
    pub const NV_INGEST_CONFLICT: &str = "NvIngestConflict";
    pub const NAMESPACE_SELECTOR_UNSUPPORTED: &str = "NamespaceSelectorUnsupported";
    pub const NAMESPACE_NOT_WATCHED: &str = "NamespaceNotWatched";
    // kstatus (`Reconciling`, `Stalled`; see `kstatus.rs`). `Stalled=True` and
    // `Reconciling=True` copy the reason of the condition that causes them.
    pub const RECONCILED: &str = "Reconciled";
    pub const BLOCKED: &str = "Blocked";
}

/// Something the user has to fix before the server can run (a missing Secret, key or PVC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// An event to publish: only on transitions, never on every reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

/// Rollout progress read from the Deployment the apiserver returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Rollout {
    replicas: i32,
    ready: i32,
    done: bool,
    deadline_exceeded: bool,
}

fn rollout(d: Option<&Deployment>, desired: i32) -> Rollout {
    let Some(d) = d else {
        return Rollout::default();
    };
    let Some(s) = d.status.as_ref() else {
        return Rollout::default();
    };
    let replicas = s.replicas.unwrap_or(0);
    let ready = s.ready_replicas.unwrap_or(0);
    let updated = s.updated_replicas.unwrap_or(0);
    // The Deployment controller must have seen the latest template before its counts mean anything.
    let observed = d.metadata.generation.unwrap_or(0) <= s.observed_generation.unwrap_or(0);
    let deadline_exceeded = s.conditions.iter().flatten().any(|c| {
        c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    Rollout {
        replicas,
        ready,
        done: observed && updated >= desired && replicas == desired && ready >= desired,
        deadline_exceeded,
    }
}

/// The status this reconcile should leave on the object.
pub fn desired_status(
    c: &VlmCaptioner,
    problem: Option<&Problem>,
    deployment: Option<&Deployment>,
    now: &Time,
) -> VlmCaptionerStatus {
    let generation = c.metadata.generation;
    let desired = c.spec.replicas;
    let r = rollout(deployment, desired);
    let prev: &[Condition] = c
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(prev, type_, ok, reason, message, generation, now)
    };

    let ready = if desired == 0 {
        cond(
            READY,
            false,
            reason::SCALED_TO_ZERO,
            "spec.replicas is 0".into(),
        )
    } else if r.done {
        cond(
            READY,
            true,
            reason::ALL_REPLICAS_READY,
            format!("{}/{desired} replicas ready", r.ready),
        )
    } else {
        cond(
            READY,
            false,
            reason::REPLICAS_NOT_READY,
            format!(
                "{}/{desired} replicas ready (the model can take minutes to load)",
                r.ready
            ),
        )
    };

    let progressing = match problem {
        Some(p) => cond(
            PROGRESSING,
            false,
            p.reason,
            format!("rollout blocked: {}", p.message),
        ),
        None if r.done || desired == 0 => cond(
            PROGRESSING,
            false,
            reason::ROLLOUT_COMPLETE,
            "the Deployment is up to date".into(),
        ),
        None => cond(
            PROGRESSING,
            true,
            reason::ROLLING_OUT,
            format!("{} of {desired} replicas ready", r.ready),
        ),
    };

    let degraded = match problem {
        Some(p) => cond(DEGRADED, true, p.reason, p.message.clone()),
        None if r.deadline_exceeded => cond(
            DEGRADED,
            true,
            reason::PROGRESS_DEADLINE_EXCEEDED,
            "the Deployment exceeded its progress deadline; check the pods' events and logs".into(),
        ),
        None => cond(
            DEGRADED,
            false,
            reason::AS_EXPECTED,
            "all inputs found".into(),
        ),
    };

    VlmCaptionerStatus {
        observed_generation: generation,
        conditions: vec![ready, progressing, degraded],
        replicas: Some(r.replicas),
        ready_replicas: Some(r.ready),
        endpoint: Some(endpoint_url(c)),
        ..VlmCaptionerStatus::default()
    }
}

/// A condition that keeps its previous `lastTransitionTime` unless its status flips.
pub(crate) fn condition(
    prev: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

fn find<'a>(s: Option<&'a VlmCaptionerStatus>, type_: &str) -> Option<&'a Condition> {
    s.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

fn is_true(c: Option<&Condition>) -> bool {
    c.is_some_and(|c| c.status == "True")
}

/// Events for the transitions between two statuses: a new or changed degradation, recovery,
/// becoming ready or unready, and the start of a rollout.
pub fn transitions(old: Option<&VlmCaptionerStatus>, new: &VlmCaptionerStatus) -> Vec<Notice> {
    let mut notices = Vec::new();
    let (old_deg, new_deg) = (find(old, DEGRADED), find(Some(new), DEGRADED));
    match (is_true(old_deg), new_deg) {
        (_, Some(n))
            if n.status == "True"
                && old_deg.map(|o| (&o.status, &o.reason)) != Some((&n.status, &n.reason)) =>
        {
            notices.push(Notice {
                warning: true,
                reason: n.reason.clone(),
                note: n.message.clone(),
            })
        }
        (true, Some(n)) if n.status == "False" => notices.push(Notice {
            warning: false,
            reason: reason::RECOVERED.into(),
            note: "all referenced Secrets and the model volume are present".into(),
        }),
        _ => {}
    }
    // A model download also sets Progressing (and has its own event); a rollout is RollingOut.
    let rolling_out =
        |c: Option<&Condition>| is_true(c) && c.is_some_and(|c| c.reason == reason::ROLLING_OUT);
    let (old_prog, new_prog) = (find(old, PROGRESSING), find(Some(new), PROGRESSING));
    if !rolling_out(old_prog) && rolling_out(new_prog) {
        notices.push(Notice {
            warning: false,
            reason: reason::ROLLING_OUT.into(),
            note: format!(
                "rolling out generation {}",
                new.observed_generation.unwrap_or(0)
            ),
        });
    }
    let (old_ready, new_ready) = (find(old, READY), find(Some(new), READY));
    match (is_true(old_ready), new_ready) {
        (false, Some(n)) if n.status == "True" => notices.push(Notice {
            warning: false,
            reason: READY.into(),
            note: n.message.clone(),
        }),
        (true, Some(n)) if n.status == "False" => notices.push(Notice {
            warning: true,
            reason: reason::NOT_READY.into(),
            note: n.message.clone(),
        }),
        _ => {}
    }
    notices
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::test_support::captioner;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn deployment(ready: i32, generation: i64, observed: i64) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.generation = Some(generation);
        d.status = Some(DeploymentStatus {
            replicas: Some(1),
            ready_replicas: Some(ready),
            updated_replicas: Some(1),
            observed_generation: Some(observed),
            ..DeploymentStatus::default()
        });
        d
    }

    fn get<'a>(s: &'a VlmCaptionerStatus, type_: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn new_rollout_is_progressing_not_ready() {
        let c = captioner();
        let s = desired_status(&c, None, Some(&deployment(0, 1, 1)), &t(100));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(get(&s, READY).status, "False");
        assert_eq!(get(&s, READY).reason, reason::REPLICAS_NOT_READY);
        assert_eq!(get(&s, PROGRESSING).status, "True");
        assert_eq!(get(&s, DEGRADED).status, "False");
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
        assert_eq!(
            s.endpoint.as_deref(),
            Some("http://cap.nv.svc.cluster.local:8000/v1/chat/completions")
        );
        assert_eq!((s.replicas, s.ready_replicas), (Some(1), Some(0)));
    }

    #[test]
    fn ready_when_every_replica_is_ready_and_updated() {
        let c = captioner();
        let s = desired_status(&c, None, Some(&deployment(1, 2, 2)), &t(100));
        assert_eq!(get(&s, READY).status, "True");
        assert_eq!(get(&s, READY).reason, reason::ALL_REPLICAS_READY);
        assert_eq!(get(&s, PROGRESSING).status, "False");
        // A template the Deployment controller has not seen yet is not ready.
        let s = desired_status(&c, None, Some(&deployment(1, 3, 2)), &t(100));
        assert_eq!(get(&s, READY).status, "False");
    }

    #[test]
    fn transition_time_moves_only_on_flips() {
        let mut c = captioner();
        let first = desired_status(&c, None, Some(&deployment(0, 1, 1)), &t(100));
        c.status = Some(first.clone());
        let same = desired_status(&c, None, Some(&deployment(0, 1, 1)), &t(200));
        assert_eq!(
            same, first,
            "nothing changed, so the status must be identical"
        );
        let flipped = desired_status(&c, None, Some(&deployment(1, 1, 1)), &t(300));
        assert_eq!(get(&flipped, READY).last_transition_time, t(300));
        assert_eq!(get(&flipped, DEGRADED).last_transition_time, t(100));
    }

    #[test]
    fn problems_degrade() {
        let c = captioner();
        let p = Problem {
            reason: reason::SECRET_NOT_FOUND,
            message: "Secret \"x\" not found".into(),
        };
        let s = desired_status(&c, Some(&p), None, &t(1));
        assert_eq!(get(&s, DEGRADED).status, "True");
        assert_eq!(get(&s, DEGRADED).reason, reason::SECRET_NOT_FOUND);
        assert_eq!(get(&s, DEGRADED).message, "Secret \"x\" not found");
        assert_eq!(get(&s, PROGRESSING).status, "False");
        assert_eq!(get(&s, READY).status, "False");
    }

    #[test]
    fn progress_deadline_degrades() {
        let c = captioner();
        let mut d = deployment(0, 1, 1);
        if let Some(s) = d.status.as_mut() {
            s.conditions = Some(vec![DeploymentCondition {
                type_: "Progressing".into(),
                status: "False".into(),
                reason: Some("ProgressDeadlineExceeded".into()),
                ..DeploymentCondition::default()
            }]);
        }
        let s = desired_status(&c, None, Some(&d), &t(1));
        assert_eq!(get(&s, DEGRADED).reason, reason::PROGRESS_DEADLINE_EXCEEDED);
    }

    #[test]
    fn scaled_to_zero_is_settled() {
        let mut c = captioner();
        c.spec.replicas = 0;
        let mut d = deployment(0, 1, 1);
        if let Some(s) = d.status.as_mut() {
            s.replicas = Some(0);
            s.updated_replicas = Some(0);
        }
        let s = desired_status(&c, None, Some(&d), &t(1));
        assert_eq!(get(&s, READY).reason, reason::SCALED_TO_ZERO);
        assert_eq!(get(&s, PROGRESSING).status, "False");
    }

    #[test]
    fn events_only_on_transitions() {
        let mut c = captioner();
        let rolling = desired_status(&c, None, Some(&deployment(0, 1, 1)), &t(1));
        let n = transitions(None, &rolling);
        assert_eq!(
            n.iter().map(|n| n.reason.as_str()).collect::<Vec<_>>(),
            [reason::ROLLING_OUT]
        );
        assert!(transitions(Some(&rolling), &rolling).is_empty());

        c.status = Some(rolling.clone());
        let ready = desired_status(&c, None, Some(&deployment(1, 1, 1)), &t(2));
        let n = transitions(Some(&rolling), &ready);
        assert_eq!(
            n,
            [Notice {
                warning: false,
                reason: READY.into(),
                note: "1/1 replicas ready".into()
            }]
        );

        c.status = Some(ready.clone());
        let p = Problem {
            reason: reason::PVC_NOT_FOUND,
            message: "gone".into(),
        };
        let degraded = desired_status(&c, Some(&p), Some(&deployment(1, 1, 1)), &t(3));
        let n = transitions(Some(&ready), &degraded);
        assert_eq!(
            n,
            [Notice {
                warning: true,
                reason: reason::PVC_NOT_FOUND.into(),
                note: "gone".into()
            }]
        );
        assert!(transitions(Some(&degraded), &degraded).is_empty());

        c.status = Some(degraded.clone());
        let healed = desired_status(&c, None, Some(&deployment(1, 1, 1)), &t(4));
        let n = transitions(Some(&degraded), &healed);
        assert_eq!(n.len(), 1);
        assert_eq!(
            (n[0].warning, n[0].reason.as_str()),
            (false, reason::RECOVERED)
        );
    }
}
