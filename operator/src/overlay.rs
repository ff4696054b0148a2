//! The integrations' part of the status: `ChatReady` (the chat-endpoint probe, which `Ready`
//! then requires), `NvIngestWired`, and their events. Pure, like `status.rs`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{ChatProbeStatus, VlmCaptioner, VlmCaptionerStatus};
use crate::probe::{Outcome, Verdict};
use crate::status::{Notice, READY, condition, reason};
use crate::wiring::Wiring;

pub const CHAT_READY: &str = "ChatReady";
pub const NV_INGEST_WIRED: &str = "NvIngestWired";

/// What the reconcile knows about the chat endpoint.
#[derive(Clone, Debug, PartialEq)]
pub enum Chat {
    Disabled,
    NoReadyReplicas,
    Last(Option<Outcome>),
}

/// Adds the integration conditions to the status `status::desired_status` computed.
pub fn overlay(
    c: &VlmCaptioner,
    status: &mut VlmCaptionerStatus,
    chat: &Chat,
    wiring: Option<Wiring>,
    now: &Time,
) {
    let generation = c.metadata.generation;
    let prev: Vec<Condition> = c
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(&prev, type_, ok, reason, message, generation, now)
    };

    let (ok, why, message) = match chat {
        Chat::Disabled => (
            true,
            reason::PROBE_DISABLED,
            "spec.healthCheck.enabled is false".to_string(),
        ),
        Chat::NoReadyReplicas => (
            false,
            reason::NO_READY_REPLICAS,
            "no ready replica to probe".into(),
        ),
        Chat::Last(None) => (
            false,
            reason::CHAT_PROBE_PENDING,
            "the first chat probe is running".into(),
        ),
        Chat::Last(Some(o)) => match o.verdict {
            Verdict::Succeeded => (
                true,
                reason::CHAT_OK,
                format!(
                    "POST /v1/chat/completions answered in {} ms",
                    o.latency.as_millis()
                ),
            ),
            Verdict::Failed => (
                false,
                reason::CHAT_PROBE_FAILED,
                o.message.clone().unwrap_or_default(),
            ),
            Verdict::TimedOut => (
                false,
                reason::CHAT_PROBE_TIMED_OUT,
                o.message.clone().unwrap_or_default(),
            ),
        },
    };
    let chat_cond = cond(CHAT_READY, ok, why, message.clone());

    // Ready needs a captioner that actually captions: all replicas ready *and* the probe OK.
    if !ok
        && let Some(ready) = status.conditions.iter_mut().find(|c| c.type_ == READY)
        && ready.status == "True"
    {
        *ready = cond(
            READY,
            false,
            reason::CHAT_NOT_READY,
            format!("chat probe: {message}"),
        );
    }
    status.conditions.push(chat_cond);

    if let Chat::Last(Some(o)) = chat {
        status.chat = Some(ChatProbeStatus {
            result: format!("{:?}", o.verdict),
            latency_ms: i64::try_from(o.latency.as_millis()).ok(),
            last_success_time: o.last_success.clone(),
            sample_caption: o.caption.clone(),
            message: o.message.clone(),
        });
    }

    if let Some(Wiring { status: w, refused }) = wiring {
        let conflicts = (!w.conflicts.is_empty())
            .then(|| format!("not ours, left alone: {}", w.conflicts.join(", ")));
        let wired = match (refused, conflicts) {
            // What the operator's scope refuses comes first: no retry will fix it.
            (Some(r), conflicts) => {
                let message = match conflicts {
                    Some(c) => format!("{}; {c}", r.message),
                    None => r.message,
                };
                cond(NV_INGEST_WIRED, false, r.reason, message)
            }
            (None, Some(c)) => cond(NV_INGEST_WIRED, false, reason::NV_INGEST_CONFLICT, c),
            (None, None) => cond(
                NV_INGEST_WIRED,
                true,
                reason::PUBLISHED,
                format!("published to {} namespace(s)", w.wired_namespaces.len()),
            ),
        };
        // Nothing configured and nothing left to clean: no condition at all.
        if c.spec.nv_ingest.is_some() || !w.wired_namespaces.is_empty() || !w.conflicts.is_empty() {
            status.conditions.push(wired);
        }
        status.nv_ingest =
            Some(w).filter(|w| !w.wired_namespaces.is_empty() || !w.conflicts.is_empty());
    }
}

fn find<'a>(s: Option<&'a VlmCaptionerStatus>, t: &str) -> Option<&'a Condition> {
    s.and_then(|s| s.conditions.iter().find(|c| c.type_ == t))
}

/// Events when the probe starts or stops succeeding, and when a wiring conflict appears.
pub fn transitions(old: Option<&VlmCaptionerStatus>, new: &VlmCaptionerStatus) -> Vec<Notice> {
    let mut notices = Vec::new();
    let key = |c: Option<&Condition>| c.map(|c| (c.status.clone(), c.reason.clone()));
    let (o, n) = (find(old, CHAT_READY), find(Some(new), CHAT_READY));
    if let Some(n) = n
        && key(o) != key(Some(n))
    {
        match n.reason.as_str() {
            reason::CHAT_OK => notices.push(Notice {
                warning: false,
                reason: reason::CHAT_OK.into(),
                note: n.message.clone(),
            }),
            reason::CHAT_PROBE_FAILED | reason::CHAT_PROBE_TIMED_OUT => notices.push(Notice {
                warning: true,
                reason: n.reason.clone(),
                note: n.message.clone(),
            }),
            _ => {}
        }
    }
    let (o, n) = (find(old, NV_INGEST_WIRED), find(Some(new), NV_INGEST_WIRED));
    if let Some(n) = n
        && n.status == "False"
        && (key(o) != key(Some(n)) || o.map(|o| &o.message) != Some(&n.message))
    {
        notices.push(Notice {
            warning: true,
            reason: n.reason.clone(),
            note: n.message.clone(),
        });
    }
    notices
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::crd::NvIngestStatus;
    use crate::status::{PROGRESSING, Problem};
    use crate::test_support::captioner;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn ready_status() -> VlmCaptionerStatus {
        let c = captioner();
        let ready = condition(
            &[],
            READY,
            true,
            reason::ALL_REPLICAS_READY,
            "1/1".into(),
            Some(3),
            &t(1),
        );
        let prog = condition(
            &[],
            PROGRESSING,
            false,
            reason::ROLLOUT_COMPLETE,
            "".into(),
            Some(3),
            &t(1),
        );
        VlmCaptionerStatus {
            observed_generation: c.metadata.generation,
            conditions: vec![ready, prog],
            ..VlmCaptionerStatus::default()
        }
    }

    fn outcome(verdict: Verdict) -> Outcome {
        Outcome {
            verdict,
            latency: Duration::from_millis(5),
            caption: None,
            message: Some("HTTP 500: boom".into()),
            last_success: None,
        }
    }

    fn get<'a>(s: &'a VlmCaptionerStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn a_failing_probe_takes_ready_down_and_says_why() {
        let c = captioner();
        let mut s = ready_status();
        overlay(
            &c,
            &mut s,
            &Chat::Last(Some(outcome(Verdict::Failed))),
            None,
            &t(2),
        );
        assert_eq!(get(&s, READY).status, "False");
        assert_eq!(get(&s, READY).reason, reason::CHAT_NOT_READY);
        assert_eq!(get(&s, READY).message, "chat probe: HTTP 500: boom");
        assert_eq!(get(&s, CHAT_READY).reason, reason::CHAT_PROBE_FAILED);
        assert_eq!(s.chat.as_ref().unwrap().result, "Failed");
        let n = transitions(Some(&ready_status()), &s);
        assert_eq!(n.len(), 1);
        assert!(n[0].warning && n[0].reason == reason::CHAT_PROBE_FAILED);
        // The same failure again: no new event.
        assert!(transitions(Some(&s), &s).is_empty());
    }

    #[test]
    fn disabled_or_ok_probes_leave_ready_alone() {
        let c = captioner();
        for chat in [
            Chat::Disabled,
            Chat::Last(Some(outcome(Verdict::Succeeded))),
        ] {
            let mut s = ready_status();
            overlay(&c, &mut s, &chat, None, &t(2));
            assert_eq!(get(&s, READY).status, "True", "{chat:?}");
            assert_eq!(get(&s, CHAT_READY).status, "True");
        }
        let mut s = ready_status();
        overlay(&c, &mut s, &Chat::Disabled, None, &t(2));
        assert!(s.nv_ingest.is_none());
        assert!(s.conditions.iter().all(|c| c.type_ != NV_INGEST_WIRED));
    }

    #[test]
    fn conflicts_make_nv_ingest_wired_false_with_an_event() {
        let mut c = captioner();
        c.spec.nv_ingest =
            serde_json::from_value(serde_json::json!({"namespaces": ["a"]})).unwrap();
        let mut s = ready_status();
        let w = Wiring {
            status: NvIngestStatus {
                wired_namespaces: vec![],
                conflicts: vec!["a/Service/nemotron-nano-12b-v2-vl".into()],
            },
            refused: None,
        };
        overlay(&c, &mut s, &Chat::Disabled, Some(w), &t(2));
        let wired = get(&s, NV_INGEST_WIRED);
        assert_eq!(
            (wired.status.as_str(), wired.reason.as_str()),
            ("False", reason::NV_INGEST_CONFLICT)
        );
        assert!(wired.message.contains("a/Service/nemotron-nano-12b-v2-vl"));
        let n = transitions(Some(&ready_status()), &s);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].reason, reason::NV_INGEST_CONFLICT);
    }

    #[test]
    fn a_refused_target_says_why_before_any_conflict() {
        let mut c = captioner();
        c.spec.nv_ingest =
            serde_json::from_value(serde_json::json!({"namespaces": ["a", "far"]})).unwrap();
        let mut s = ready_status();
        let w = Wiring {
            status: NvIngestStatus {
                wired_namespaces: vec![],
                conflicts: vec!["a/Service/x".into()],
            },
            refused: Some(Problem {
                reason: reason::NAMESPACE_NOT_WATCHED,
                message: "not wired: far".into(),
            }),
        };
        overlay(&c, &mut s, &Chat::Disabled, Some(w), &t(2));
        let wired = get(&s, NV_INGEST_WIRED);
        assert_eq!(
            (wired.status.as_str(), wired.reason.as_str()),
            ("False", reason::NAMESPACE_NOT_WATCHED)
        );
        assert_eq!(
            wired.message,
            "not wired: far; not ours, left alone: a/Service/x"
        );
        let n = transitions(Some(&ready_status()), &s);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].reason, reason::NAMESPACE_NOT_WATCHED);
    }
}
