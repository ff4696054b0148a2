//! Reconcile metrics through the `metrics` facade; `main` installs the Prometheus recorder
//! (without one, as in tests, these are no-ops).

use std::time::Instant;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, histogram};

pub const RECONCILES: &str = "vlm_operator_reconciles_total";
pub const FAILURES: &str = "vlm_operator_reconcile_errors_total";
pub const DURATION: &str = "vlm_operator_reconcile_duration_seconds";
/// 1 while this replica holds the leader Lease (or runs without leader election).
pub const LEADER: &str = "vlm_operator_leader";
/// Histogram buckets for reconcile durations, in seconds.
pub const DURATION_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Clone, Debug, Default)]
pub struct Metrics;

impl Metrics {
    pub fn describe() {
        describe_counter!(RECONCILES, "Reconciles started");
        describe_counter!(FAILURES, "Reconciles that failed, by error kind");
        describe_histogram!(DURATION, metrics::Unit::Seconds, "Reconcile duration");
        describe_gauge!(LEADER, "1 while this replica is the leader");
    }

    /// Counts a reconcile and records its duration when the returned guard drops.
    pub fn reconcile_started(&self) -> ReconcileTimer {
        counter!(RECONCILES).increment(1);
        ReconcileTimer(Instant::now())
    }

    pub fn reconcile_failed(&self, kind: &'static str) {
        counter!(FAILURES, "error" => kind).increment(1);
    }
}

pub struct ReconcileTimer(Instant);

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        histogram!(DURATION).record(self.0.elapsed().as_secs_f64());
    }
}
