//! Continuous-batching benchmark (a measurement, not a test): aggregate decode
//! tokens/s and requests/s at several concurrencies, each against serving the
//! same requests one at a time, in one run (medians of alternating runs).
//!
//! cargo run --release -p vlm-server --example bench_engine -- \
//!     --model target/mid-checkpoint --concurrency 1,4,16,64 --max-tokens 16
//!
//! `--step-batches 1,4,16,64` first times the model's decode step alone at those
//! batch sizes (no scheduler, sampling or streaming): the ceiling the engine's
//! aggregate decode throughput can reach.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use vlm_server::engine::local::{EngineOptions, LocalEngine};
use vlm_server::engine::{
    ChatMessage, ChatRequest, ContentPart, Engine, GenerationEvent, Role, SamplingParams,
};
use vlm_server::model::linear::CpuMatmul;
use vlm_server::model::nemotron_h::{LogitsFor, NemotronH};
use vlm_server::model::state::SequenceState;
use vlm_server::model::vlm::NemotronVl;
use vlm_server::preprocess::ImageLimits;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Generated tokens per request (EOS ignored, so every request decodes this many).
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Requests per level (default: the concurrency, at least 4).
    #[arg(long)]
    requests: Option<usize>,
    /// An image to put in every prompt (default: text only).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Alternating batched / one-at-a-time runs per level; medians are reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Batch sizes at which to time the bare model decode step first (none: skip).
    #[arg(long, value_delimiter = ',')]
    step_batches: Vec<usize>,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Only the model decode step (`--step-batches`), not the engine.
    #[arg(long)]
    steps_only: bool,
}

/// CPU time of this process so far (all threads), from Linux's per-thread schedstat, in
/// seconds: on a shared machine it does not count the time other processes held the cores.
fn process_cpu_seconds() -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 * 1e-9)
}

/// (median wall seconds, mean CPU seconds) of one decode step of `batch` sequences, each
/// after a 32-token prompt.
fn time_decode_step(llm: &NemotronH, batch: usize, steps: usize) -> (f64, Option<f64>) {
    let dev = llm.device();
    let pool = llm.new_pool(batch).expect("state pool");
    let mut states: Vec<SequenceState> = (0..batch)
        .map(|_| pool.acquire(None).expect("zeroed").expect("a free slot"))
        .collect();
    for (i, st) in states.iter_mut().enumerate() {
        let ids: Vec<u32> = (0..32).map(|t| ((t * 31 + i * 7) % 1000) as u32).collect();
        let embeds = llm
            .embed(&Tensor::new(ids.as_slice(), dev).unwrap())
            .unwrap();
        llm.forward(&embeds, &[32], &pool, &mut [st], LogitsFor::LastToken)
            .expect("prefill");
    }
    let ids: Vec<u32> = (0..batch as u32).map(|i| 100 + i).collect();
    let embeds = llm
        .embed(&Tensor::new(ids.as_slice(), dev).unwrap())
        .unwrap();
    let lens = vec![1; batch];
    let mut times = Vec::new();
    let mut cpu0 = None;
    for _ in 0..steps.max(1) + 1 {
        let mut refs: Vec<&mut SequenceState> = states.iter_mut().collect();
        let t0 = Instant::now();
        llm.forward(&embeds, &lens, &pool, &mut refs, LogitsFor::LastToken)
            .expect("decode step")
            .to_vec2::<f32>()
            .expect("logits");
        times.push(t0.elapsed().as_secs_f64());
        // The first step is a warm-up.
        cpu0 = cpu0.or_else(process_cpu_seconds);
    }
    times.remove(0);
    let cpu = process_cpu_seconds()
        .zip(cpu0)
        .map(|(t1, t0)| (t1 - t0) / times.len() as f64);
    (median(&mut times), cpu)
}

fn bench_steps(model: &std::path::Path, batches: &[usize], steps: usize) {
    let vl = NemotronVl::load(model, DType::F32, &Device::Cpu).expect("model loads");
    println!(
        "| batch | decode step ms | tokens/s | vs batch {0} | CPU ms/step (all threads) | tokens per CPU s, vs batch {0} |",
        batches[0]
    );
    println!("|---|---|---|---|---|---|");
    let (mut base, mut cpu_base) = (None, None);
    for &b in batches {
        let (s, cpu) = time_decode_step(&vl.llm, b, steps);
        let tps = b as f64 / s;
        let base = *base.get_or_insert(tps);
        let (cpu_ms, cpu_ratio) = match cpu {
            Some(c) => {
                let per_cpu = b as f64 / c;
                let first = *cpu_base.get_or_insert(per_cpu);
                (
                    format!("{:.2}", c * 1e3),
                    format!("{:.2}x", per_cpu / first),
                )
            }
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {b} | {:.2} | {tps:.1} | {:.2}x | {cpu_ms} | {cpu_ratio} |",
            s * 1e3,
            tps / base
        );
    }
    println!();
}

struct Level {
    seconds: f64,
    completion_tokens: usize,
    latencies: Vec<f64>,
}

fn request(i: usize, max_tokens: usize, image: Option<&Arc<Vec<u8>>>) -> ChatRequest {
    let mut parts = vec![ContentPart::Text(format!(
        "Request {i}: describe the quarterly report in detail, section by section."
    ))];
    if let Some(bytes) = image {
        parts.insert(0, ContentPart::Image(Arc::clone(bytes)));
    }
    ChatRequest {
        messages: vec![
            ChatMessage {
                role: Role::System,
                parts: vec![ContentPart::Text("/no_think".into())],
            },
            ChatMessage {
                role: Role::User,
                parts,
            },
        ],
        sampling: SamplingParams::default(),
        max_tokens,
        stop: Vec::new(),
        max_tiles: Some(1),
        ignore_eos: true,
    }
}

async fn run_level(
    engine: Arc<LocalEngine>,
    clients: usize,
    requests: usize,
    max_tokens: usize,
    image: Option<Arc<Vec<u8>>>,
) -> Level {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..clients {
        let (engine, next, image) = (Arc::clone(&engine), Arc::clone(&next), image.clone());
        handles.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return done;
                }
                let t0 = Instant::now();
                let mut generation = engine
                    .submit(request(i, max_tokens, image.as_ref()))
                    .await
                    .expect("submit");
                while let Some(event) = generation.events.recv().await {
                    match event {
                        GenerationEvent::Delta(_) => {}
                        GenerationEvent::Finished { usage, .. } => {
                            done.push((t0.elapsed().as_secs_f64(), usage.completion_tokens));
                            break;
                        }
                        GenerationEvent::Failed(e) => panic!("{e}"),
                    }
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    let mut completion_tokens = 0;
    for h in handles {
        for (latency, tokens) in h.await.expect("client task") {
            latencies.push(latency);
            completion_tokens += tokens;
        }
    }
    Level {
        seconds: started.elapsed().as_secs_f64(),
        completion_tokens,
        latencies,
    }
}

async fn start(model: &std::path::Path, max_num_seqs: usize) -> Arc<LocalEngine> {
    let (engine, _failed) = LocalEngine::start(EngineOptions {
        model_dir: model.to_path_buf(),
        device: Device::Cpu,
        dtype: DType::F32,
        max_num_seqs,
        max_queue: 1024,
        max_model_len: Some(8192),
        max_tiles: 1,
        prefill_chunk: 512,
        image_limits: ImageLimits::default(),
        state_memory: None,
        cpu_matmul: CpuMatmul::current(),
    })
    .expect("engine starts");
    while !engine.is_ready() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    engine
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // As the server does: before the runtime's threads exist.
    vlm_server::memory::tune_allocator();
    tokio::runtime::Runtime::new()
        .expect("tokio runtime")
        .block_on(run(Args::parse()));
}

async fn run(args: Args) {
    if !args.step_batches.is_empty() {
        bench_steps(&args.model, &args.step_batches, args.steps);
    }
    if args.steps_only {
        return;
    }
    let image = args
        .image
        .as_ref()
        .map(|p| Arc::new(std::fs::read(p).expect("reading the image")));
    let sequential = start(&args.model, 1).await;
    println!(
        "| concurrency | requests | batched tok/s | one-at-a-time tok/s | ratio | batched req/s | one-at-a-time req/s | batched p50 latency s | one-at-a-time p50 latency s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &c in &args.concurrency {
        let n = args.requests.unwrap_or(c.max(4));
        let batched_engine = start(&args.model, c).await;
        // Alternate the two so drift in machine load hits both alike.
        let (mut batched, mut alone) = (Vec::new(), Vec::new());
        for _ in 0..args.repeat.max(1) {
            let engine = Arc::clone(&batched_engine);
            batched.push(run_level(engine, c, n, args.max_tokens, image.clone()).await);
            let engine = Arc::clone(&sequential);
            alone.push(run_level(engine, c, n, args.max_tokens, image.clone()).await);
        }
        let tps = |runs: &[Level]| {
            let mut v: Vec<f64> = runs
                .iter()
                .map(|l| l.completion_tokens as f64 / l.seconds)
                .collect();
            median(&mut v)
        };
        let rps = |runs: &[Level]| {
            let mut v: Vec<f64> = runs.iter().map(|l| n as f64 / l.seconds).collect();
            median(&mut v)
        };
        let p50 = |runs: &mut [Level]| {
            let mut v: Vec<f64> = runs.iter_mut().map(|l| median(&mut l.latencies)).collect();
            median(&mut v)
        };
        println!(
            "| {c} | {n} | {:.1} | {:.1} | {:.2}x | {:.2} | {:.2} | {:.2} | {:.2} |",
            tps(&batched),
            tps(&alone),
            tps(&batched) / tps(&alone),
            rps(&batched),
            rps(&alone),
            p50(&mut batched),
            p50(&mut alone),
        );
    }
}
