//! The continuous-batching engine on the tiny checkpoint: batched results equal
//! one-at-a-time results, cancellation frees slots, a full queue is refused.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use vlm_server::engine::local::{EngineOptions, LocalEngine};
use vlm_server::engine::{
    ChatMessage, ChatRequest, ContentPart, Engine, EngineError, FinishReason, GenerationEvent,
    Role, SamplingParams,
};
use vlm_server::model::linear::CpuMatmul;
use vlm_server::preprocess::ImageLimits;

fn options(max_num_seqs: usize, max_queue: usize, prefill_chunk: usize) -> EngineOptions {
    EngineOptions {
        model_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny"),
        device: Device::Cpu,
        dtype: DType::F32,
        max_num_seqs,
        max_queue,
        max_model_len: Some(4096),
        max_tiles: 12,
        prefill_chunk,
        image_limits: ImageLimits::default(),
        state_memory: None,
        cpu_matmul: CpuMatmul::F32,
    }
}

async fn start(options: EngineOptions) -> Arc<LocalEngine> {
    let (engine, _failed) = LocalEngine::start(options).unwrap();
    for _ in 0..500 {
        if engine.is_ready() {
            return engine;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("engine not ready");
}

fn image(name: &str) -> ContentPart {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/images")
        .join(name);
    ContentPart::Image(Arc::new(std::fs::read(path).unwrap()))
}

/// Mixed prompts: text only, one image, two images, different lengths.
fn requests() -> Vec<ChatRequest> {
    let text = |t: &str| ContentPart::Text(t.to_owned());
    let prompts: Vec<Vec<ContentPart>> = vec![
        vec![
            text("Caption the content of this image:"),
            image("wide_200x100.png"),
        ],
        vec![text(
            "Hello, how are you today? Tell me about the weather /no_think",
        )],
        vec![
            image("grid_128x96.png"),
            text("Describe"),
            image("tall_60x180.png"),
        ],
        vec![text(
            "A longer text prompt that spans more than one prefill chunk of the tiny model, to exercise chunked prefill while other sequences decode.",
        )],
        vec![image("grad_64x64.png"), text("What is this?")],
        vec![image("shapes_128x128.png")],
    ];
    prompts
        .into_iter()
        .enumerate()
        .map(|(i, parts)| ChatRequest {
            messages: vec![
                ChatMessage {
                    role: Role::System,
                    parts: vec![text("/no_think")],
                },
                ChatMessage {
                    role: Role::User,
                    parts,
                },
            ],
            sampling: SamplingParams::default(),
            max_tokens: 12 + 3 * i,
            stop: Vec::new(),
            max_tiles: None,
            ignore_eos: false,
        })
        .collect()
}

async fn collect(engine: &LocalEngine, request: ChatRequest) -> (String, FinishReason, usize) {
    let mut generation = engine.submit(request).await.unwrap();
    let mut text = String::new();
    while let Some(event) = generation.events.recv().await {
        match event {
            GenerationEvent::Delta(t) => text.push_str(&t),
            GenerationEvent::Finished { reason, usage } => {
                return (text, reason, usage.completion_tokens);
            }
            GenerationEvent::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    panic!("stream ended without Finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_results_equal_one_at_a_time() {
    batched_equals_one_at_a_time(CpuMatmul::F32).await;
}

/// The same with BF16 matmul inputs, where one row and several rows take different
/// kernels (a matrix-vector product and the BF16 dot-product tiles).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_results_equal_one_at_a_time_with_bf16_matmuls() {
    batched_equals_one_at_a_time(CpuMatmul::Bf16).await;
}

async fn batched_equals_one_at_a_time(matmul: CpuMatmul) {
    let with = |o: EngineOptions| EngineOptions {
        cpu_matmul: matmul,
        ..o
    };
    let alone = start(with(options(1, 64, 512))).await;
    let mut expected = Vec::new();
    for r in requests() {
        expected.push(collect(&alone, r).await);
    }
    // Small prefill chunks so prefills interleave with running decodes;
    // staggered arrivals so sequences join a batch mid-flight.
    let batched = start(with(options(8, 64, 7))).await;
    let mut handles = Vec::new();
    for (i, r) in requests().into_iter().enumerate() {
        let engine = Arc::clone(&batched);
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3 * i as u64)).await;
            collect(&engine, r).await
        }));
    }
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.await.unwrap();
        assert_eq!(got, expected[i], "request {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_receiver_frees_its_slot() {
    let engine = start(options(1, 4, 512)).await;
    let mut long = requests().remove(1);
    long.max_tokens = 100_000;
    let generation = engine.submit(long).await.unwrap();
    drop(generation); // the client went away
    // With one slot, this only finishes if the cancelled sequence was freed.
    let r = requests().remove(0);
    let done = tokio::time::timeout(Duration::from_secs(30), collect(&engine, r)).await;
    assert!(done.is_ok(), "the slot was not freed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_refused_with_overloaded() {
    let engine = start(options(1, 1, 512)).await;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..6 {
        let mut r = requests().remove(1);
        r.max_tokens = 100_000;
        match engine.submit(r).await {
            Ok(g) => held.push(g),
            Err(EngineError::Overloaded) => refused += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    // One running, at most one queued (plus one the scheduler may hold).
    assert!(held.len() <= 3, "{} accepted", held.len());
    assert!(refused >= 3, "{refused} refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_fail_before_queueing() {
    let engine = start(options(2, 4, 512)).await;
    let mut r = requests().remove(0);
    r.messages[1].parts[1] = ContentPart::Image(Arc::new(b"not an image".to_vec()));
    match engine.submit(r).await {
        Err(EngineError::InvalidRequest { param, .. }) => {
            assert_eq!(param.as_deref(), Some("messages[1].content[1]"))
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a bad image was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_the_context_is_refused_clearly() {
    let mut opts = options(2, 4, 512);
    opts.max_model_len = Some(60);
    let engine = start(opts).await;
    // 13 + 4 tiles of four tokens each, plus text: over 60 tokens.
    let mut r = requests().remove(2);
    r.max_tokens = 8;
    match engine.submit(r).await {
        Err(EngineError::InvalidRequest { message, .. }) => {
            assert!(message.contains("context"), "{message}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("an over-long prompt was accepted"),
    }
    // max_tokens beyond the remaining context is clamped, not refused.
    let mut short = requests().remove(1);
    short.max_tokens = 10_000;
    short.ignore_eos = true;
    let (_, reason, completion) = collect(&engine, short).await;
    assert_eq!(reason, FinishReason::Length);
    assert!(
        completion <= 60 - 44,
        "{completion} tokens after a 44-token prompt in a 60-token context"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_budget_makes_requests_wait_not_fail() {
    let long = || {
        let mut r = requests().remove(1);
        r.max_tokens = 100_000; // clamped to the 4096-token context
        r.ignore_eos = true;
        r
    };
    // Room for exactly one full-context sequence of the tiny model.
    let cfg = vlm_server::model::config::CheckpointConfig::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny"),
    )
    .unwrap();
    let cost = vlm_server::engine::budget::StateCost::of(&cfg.model.llm_config, 4);
    let mut opts = options(8, 8, 512);
    opts.state_memory = Some(cost.for_tokens(4096));
    let engine = start(opts).await;

    let running = engine.submit(long()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let short = Arc::clone(&engine);
    let waiting = tokio::spawn(async move { collect(&short, requests().remove(0)).await });
    // It does not fit beside the long one: it waits (a batch slot is free, memory is not)...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "admitted beyond the state budget");
    // ...and runs as soon as the long one goes away.
    drop(running);
    let done = tokio::time::timeout(Duration::from_secs(30), waiting).await;
    assert!(done.is_ok(), "the waiting request never ran");
}

/// Poll `cond` every few milliseconds for up to `limit`.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cond()
}

/// A request that would run for a very long time unless cancelled.
fn endless() -> ChatRequest {
    let mut r = requests().remove(1);
    r.max_tokens = 100_000;
    r.ignore_eos = true;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_frees_its_slot_at_once() {
    let mut opts = options(2, 4, 512);
    opts.max_model_len = Some(131_072);
    let engine = start(opts).await;
    let usage = || engine.slot_usage().expect("loaded");
    assert_eq!((usage().capacity, usage().in_use), (2, 0));
    let mut generation = engine.submit(endless()).await.unwrap();
    // It is running once it streams text.
    let first = generation.events.recv().await;
    assert!(
        matches!(first, Some(GenerationEvent::Delta(_))),
        "{first:?}"
    );
    assert_eq!(usage().in_use, 1);
    drop(generation);
    // ~100k tokens from finishing: only the cancellation can free the slot in time.
    assert!(
        eventually(Duration::from_secs(10), || usage().in_use == 0).await,
        "the cancelled request still holds its slot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_reused_zeroed_and_never_exceed_the_pool() {
    // Each request alone on a fresh engine: its slot starts from a never-used pool.
    let mut expected = Vec::new();
    for r in requests() {
        let fresh = start(options(1, 4, 512)).await;
        expected.push(collect(&fresh, r).await);
    }
    let engine = start(options(2, 64, 7)).await;
    // Dirty both slots: two long generations, cancelled mid-way.
    let mut dirty = Vec::new();
    for _ in 0..2 {
        let mut g = engine.submit(endless()).await.unwrap();
        for _ in 0..5 {
            g.events.recv().await;
        }
        dirty.push(g);
    }
    drop(dirty);
    // Six requests through two reused slots, arriving while others run.
    let mut handles = Vec::new();
    for (i, r) in requests().into_iter().enumerate() {
        let engine = Arc::clone(&engine);
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2 * i as u64)).await;
            collect(&engine, r).await
        }));
    }
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await.unwrap(), expected[i], "request {i}");
    }
    let usage = engine.slot_usage().expect("loaded");
    assert_eq!(usage.capacity, 2);
    assert_eq!(usage.peak, 2, "both slots were used");
    assert!(
        eventually(Duration::from_secs(5), || engine
            .slot_usage()
            .unwrap()
            .in_use
            == 0)
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_budget_sizes_the_pool() {
    let cfg = vlm_server::model::config::CheckpointConfig::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny"),
    )
    .unwrap();
    let cost = vlm_server::engine::budget::StateCost::of(&cfg.model.llm_config, 4);
    // Room for three Mamba states and a little KV (max_num_seqs 8): a pool of three, and
    // requests whose KV does not fit beside others run one at a time, but they all run.
    let mut opts = options(8, 16, 512);
    opts.state_memory = Some(3 * cost.fixed + cost.fixed / 2);
    let engine = start(opts).await;
    assert_eq!(engine.slot_usage().unwrap().capacity, 3);
    let mut handles = Vec::new();
    for r in requests() {
        let engine = Arc::clone(&engine);
        handles.push(tokio::spawn(async move { collect(&engine, r).await }));
    }
    for h in handles {
        h.await.unwrap();
    }
}
