//! Reconciles 500 captioners against the fake apiserver of the tests and prints the total time
//! and the per-object median. Not a test: timings depend on the machine.
//!
//!   cargo run --release -p vlm-operator --example reconcile_bench [-- COUNT]

#[path = "../tests/fixtures.rs"]
mod fixtures;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vlm_operator::reconcile;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let count: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 500,
    };
    let (ctx, handle) = fixtures::bench_context();
    let calls = Arc::new(AtomicUsize::new(0));
    let server = tokio::spawn(fixtures::serve_everything(handle, calls.clone()));

    let captioners: Vec<_> = (0..count)
        .map(|i| Arc::new(fixtures::captioner(&format!("cap-{i}"))))
        .collect();
    let mut per_object: Vec<Duration> = Vec::with_capacity(count);
    let start = Instant::now();
    for c in &captioners {
        let t = Instant::now();
        reconcile(c.clone(), ctx.clone()).await?;
        per_object.push(t.elapsed());
    }
    let total = start.elapsed();
    server.abort();

    per_object.sort();
    let pct = |p: f64| per_object[((per_object.len() - 1) as f64 * p).round() as usize];
    let calls = calls.load(Ordering::Relaxed);
    println!(
        "reconciled {count} new captioners with {calls} API calls ({:.1} per object)",
        calls as f64 / count as f64
    );
    println!("total   {:>10.2?}", total);
    println!("median  {:>10.2?} per object", pct(0.5));
    println!("p90     {:>10.2?} per object", pct(0.9));
    println!("max     {:>10.2?} per object", pct(1.0));
    Ok(())
}
