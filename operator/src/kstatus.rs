//! The kstatus conditions, `Reconciling` and `Stalled`, derived from the others so that Flux,
//! `kpt live status` and anything else built on kstatus read a captioner without a custom
//! check. Both have abnormal-true polarity:
//!
//! - `Stalled=True`: the operator cannot progress until someone changes something (a missing
//!   Secret, key or PVC, a failed download, a progress deadline, a wiring conflict or a refused
//!   target, a failing chat probe). kstatus reports `Failed`.
//! - `Reconciling=True`: the operator is still working toward the spec (a rollout, a model
//!   download, the first chat probe). kstatus reports `InProgress`.
//! - Both False: settled (`Ready=True`, or scaled to zero). kstatus reports `Current`.
//!
//! kstatus takes the first of the two it finds True, so they are never both True. The mapping
//! is the same as the Argo CD health check's (`deploy/argocd/health.lua`): Degraded is
//! Stalled, Progressing is Reconciling, Healthy and Suspended are neither.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{VlmCaptioner, VlmCaptionerStatus};
use crate::overlay::{CHAT_READY, NV_INGEST_WIRED};
use crate::status::{DEGRADED, PROGRESSING, READY, condition, reason};

pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";

/// Appends `Reconciling` and `Stalled` to the status the other conditions describe.
pub fn set_conditions(c: &VlmCaptioner, status: &mut VlmCaptionerStatus, now: &Time) {
    let prev: &[Condition] = c
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let generation = c.metadata.generation;
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(prev, type_, ok, reason, message, generation, now)
    };
    status
        .conditions
        .retain(|c| c.type_ != RECONCILING && c.type_ != STALLED);

    let stalled = stalled_by(&status.conditions).map(|c| (c.reason.clone(), c.message.clone()));
    let reconciling = match stalled {
        Some(_) => None,
        None => reconciling_by(&status.conditions).map(|c| (c.reason.clone(), c.message.clone())),
    };
    let reconciling = match (reconciling, &stalled) {
        (Some((why, message)), _) => cond(RECONCILING, true, &why, message),
        (None, Some(_)) => cond(
            RECONCILING,
            false,
            reason::BLOCKED,
            "waiting for a change: see Stalled".into(),
        ),
        (None, None) => cond(
            RECONCILING,
            false,
            reason::RECONCILED,
            format!("generation {} is in place", generation.unwrap_or(0)),
        ),
    };
    let stalled = match stalled {
        Some((why, message)) => cond(STALLED, true, &why, message),
        None => cond(
            STALLED,
            false,
            reason::AS_EXPECTED,
            "nothing blocks progress".into(),
        ),
    };
    status.conditions.push(reconciling);
    status.conditions.push(stalled);
}

fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The condition that says what a person must fix, if any.
fn stalled_by(conditions: &[Condition]) -> Option<&Condition> {
    let with = |type_: &str, status: &str| find(conditions, type_).filter(|c| c.status == status);
    with(DEGRADED, "True")
        .or_else(|| with(NV_INGEST_WIRED, "False"))
        .or_else(|| {
            with(CHAT_READY, "False").filter(|c| {
                c.reason == reason::CHAT_PROBE_FAILED || c.reason == reason::CHAT_PROBE_TIMED_OUT
            })
        })
}

/// The condition that says what the operator is still waiting for, if anything.
fn reconciling_by(conditions: &[Condition]) -> Option<&Condition> {
    let ready = find(conditions, READY)?;
    if ready.status == "True" || ready.reason == reason::SCALED_TO_ZERO {
        return None;
    }
    // A rollout or a download says more than "not ready"; otherwise the replicas or the
    // first chat probe are what is pending.
    find(conditions, PROGRESSING)
        .filter(|p| p.status == "True")
        .or(Some(ready))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::test_support::captioner;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn c(type_: &str, ok: bool, why: &str) -> Condition {
        condition(
            &[],
            type_,
            ok,
            why,
            format!("{why} says so"),
            Some(3),
            &t(1),
        )
    }

    fn settled() -> Vec<Condition> {
        vec![
            c(READY, true, reason::ALL_REPLICAS_READY),
            c(PROGRESSING, false, reason::ROLLOUT_COMPLETE),
            c(DEGRADED, false, reason::AS_EXPECTED),
            c(CHAT_READY, true, reason::CHAT_OK),
        ]
    }

    fn with(mut conds: Vec<Condition>, replace: Condition) -> Vec<Condition> {
        conds.retain(|c| c.type_ != replace.type_);
        conds.push(replace);
        conds
    }

    /// (Reconciling, Stalled) as (status, reason).
    fn kstatus(conds: Vec<Condition>) -> [(String, String); 2] {
        let cap = captioner();
        let mut s = VlmCaptionerStatus {
            conditions: conds,
            ..VlmCaptionerStatus::default()
        };
        set_conditions(&cap, &mut s, &t(2));
        [RECONCILING, STALLED].map(|type_| {
            let c = find(&s.conditions, type_).unwrap();
            assert_eq!(c.observed_generation, Some(3));
            (c.status.clone(), c.reason.clone())
        })
    }

    fn pair(status: &str, why: &str) -> (String, String) {
        (status.into(), why.into())
    }

    #[test]
    fn settled_is_neither() {
        assert_eq!(
            kstatus(settled()),
            [
                pair("False", reason::RECONCILED),
                pair("False", reason::AS_EXPECTED)
            ]
        );
        let zero = with(settled(), c(READY, false, reason::SCALED_TO_ZERO));
        assert_eq!(kstatus(zero)[0], pair("False", reason::RECONCILED));
    }

    #[test]
    fn work_in_progress_is_reconciling_with_its_reason() {
        let rolling = with(
            with(settled(), c(READY, false, reason::REPLICAS_NOT_READY)),
            c(PROGRESSING, true, reason::ROLLING_OUT),
        );
        assert_eq!(
            kstatus(rolling),
            [
                pair("True", reason::ROLLING_OUT),
                pair("False", reason::AS_EXPECTED)
            ]
        );
        let downloading = with(
            with(settled(), c(READY, false, reason::REPLICAS_NOT_READY)),
            c(PROGRESSING, true, "Downloading"),
        );
        assert_eq!(kstatus(downloading)[0], pair("True", "Downloading"));
        // Replicas ready, the first chat probe still running.
        let pending = with(
            with(settled(), c(READY, false, reason::CHAT_NOT_READY)),
            c(CHAT_READY, false, reason::CHAT_PROBE_PENDING),
        );
        assert_eq!(kstatus(pending)[0], pair("True", reason::CHAT_NOT_READY));
    }

    #[test]
    fn what_needs_a_person_is_stalled_and_not_reconciling() {
        let blocked = |extra: Condition| {
            let conds = with(
                with(settled(), c(READY, false, reason::REPLICAS_NOT_READY)),
                c(PROGRESSING, false, &extra.reason),
            );
            kstatus(with(conds, extra))
        };
        for (cond, why) in [
            (
                c(DEGRADED, true, reason::SECRET_NOT_FOUND),
                reason::SECRET_NOT_FOUND,
            ),
            (
                c(DEGRADED, true, reason::PVC_NOT_FOUND),
                reason::PVC_NOT_FOUND,
            ),
            (
                c(DEGRADED, true, "ModelDownloadFailed"),
                "ModelDownloadFailed",
            ),
            (
                c(NV_INGEST_WIRED, false, reason::NV_INGEST_CONFLICT),
                reason::NV_INGEST_CONFLICT,
            ),
            (
                c(NV_INGEST_WIRED, false, reason::NAMESPACE_NOT_WATCHED),
                reason::NAMESPACE_NOT_WATCHED,
            ),
            (
                c(CHAT_READY, false, reason::CHAT_PROBE_FAILED),
                reason::CHAT_PROBE_FAILED,
            ),
        ] {
            assert_eq!(
                blocked(cond),
                [pair("False", reason::BLOCKED), pair("True", why)],
                "{why}"
            );
        }
        // A rollout in progress but a Secret gone: Stalled wins, never both True.
        let both = with(
            with(settled(), c(PROGRESSING, true, reason::ROLLING_OUT)),
            c(DEGRADED, true, reason::SECRET_KEY_NOT_FOUND),
        );
        assert_eq!(
            kstatus(both),
            [
                pair("False", reason::BLOCKED),
                pair("True", reason::SECRET_KEY_NOT_FOUND)
            ]
        );
    }

    #[test]
    fn messages_come_from_the_cause_and_times_move_only_on_flips() {
        let mut cap = captioner();
        let conds = with(settled(), c(DEGRADED, true, reason::PVC_NOT_FOUND));
        let mut first = VlmCaptionerStatus {
            conditions: conds.clone(),
            ..VlmCaptionerStatus::default()
        };
        set_conditions(&cap, &mut first, &t(10));
        let stalled = find(&first.conditions, STALLED).unwrap();
        assert_eq!(stalled.message, "PvcNotFound says so");
        assert_eq!(stalled.last_transition_time, t(10));

        cap.status = Some(first.clone());
        let mut again = VlmCaptionerStatus {
            conditions: conds,
            ..VlmCaptionerStatus::default()
        };
        set_conditions(&cap, &mut again, &t(20));
        assert_eq!(
            again, first,
            "nothing changed: an identical status, no write"
        );

        let mut healed = VlmCaptionerStatus {
            conditions: settled(),
            ..VlmCaptionerStatus::default()
        };
        set_conditions(&cap, &mut healed, &t(30));
        assert_eq!(
            find(&healed.conditions, STALLED)
                .unwrap()
                .last_transition_time,
            t(30)
        );
        assert_eq!(
            find(&healed.conditions, RECONCILING)
                .unwrap()
                .last_transition_time,
            t(10),
            "Reconciling stayed False"
        );
    }
}
