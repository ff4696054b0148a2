use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};

use crate::metrics::Metrics;
use crate::probe::{ChatClient, HyperChatClient, Prober};
use crate::scope::Scope;

/// Shared by every reconcile: the API client, the event recorder, metrics, and the per-object
/// failure counts that drive the retry backoff.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub backoff: Backoff,
    /// Chat-endpoint probe tasks and their last outcomes.
    pub prober: Prober,
    /// Whether the ServiceMonitor API exists.
    pub service_monitors: Discovery,
    /// The namespaces the operator may touch; the nv-ingest wiring stays inside them.
    pub scope: Scope,
}

/// Probes in flight at once across all captioners.
pub const PROBE_CONCURRENCY: usize = 8;

impl Context {
    pub fn new(client: Client, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: "vlm-operator".into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics: Metrics,
            backoff: Backoff::default(),
            prober: Prober::new(Arc::new(HyperChatClient::default()), PROBE_CONCURRENCY),
            service_monitors: Discovery::default(),
            scope: Scope::Cluster,
        }
    }

    /// The same, limited to the watched namespaces (`--namespace`).
    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// The same, probing through `chat` (a fake in tests).
    pub fn with_chat_client(mut self, chat: Arc<dyn ChatClient>) -> Self {
        self.prober = Prober::new(chat, PROBE_CONCURRENCY);
        self
    }

    /// The same, with ServiceMonitor discovery settled (tests).
    pub fn with_service_monitors(self, present: bool) -> Self {
        self.service_monitors.set(present);
        self
    }
}

/// An optional API found by discovery, re-checked every few minutes so installing the
/// Prometheus Operator later is noticed without a restart.
#[derive(Debug, Default)]
pub struct Discovery {
    known: Mutex<Option<(bool, Option<Instant>)>>,
}

impl Discovery {
    const TTL: Duration = Duration::from_secs(300);

    /// `Some(present)` while fresh; `None` when discovery must run.
    pub fn get(&self) -> Option<bool> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        match *known {
            Some((present, None)) => Some(present),
            Some((present, Some(at))) if at.elapsed() < Self::TTL => Some(present),
            _ => None,
        }
    }

    /// Pins the answer for good (tests).
    pub fn set(&self, present: bool) {
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = Some((present, None));
    }

    pub fn found(&self, present: bool) {
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((present, Some(Instant::now())));
    }
}

/// Per-object exponential backoff: kube's `error_policy` is not told about successes, so the
/// counts live here and a successful reconcile clears them.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    pub const BASE: Duration = Duration::from_secs(5);
    pub const CAP: Duration = Duration::from_secs(300);

    /// Records one more failure of `key` and returns how long to wait: 5 s, 10 s, 20 s, ... 5 min.
    pub fn failed(&self, key: &str) -> Duration {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        Self::delay(*n)
    }

    pub fn succeeded(&self, key: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(key);
    }

    pub fn delay(failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
        Self::BASE.saturating_mul(factor).min(Self::CAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_object_up_to_the_cap_and_resets() {
        let b = Backoff::default();
        let secs: Vec<u64> = (0..8).map(|_| b.failed("ns/a").as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(
            b.failed("ns/b").as_secs(),
            5,
            "other objects keep their own count"
        );
        b.succeeded("ns/a");
        assert_eq!(b.failed("ns/a").as_secs(), 5);
        assert_eq!(Backoff::delay(u32::MAX), Backoff::CAP);
    }
}
