//! [`LocalEngine`]: the model in this process, behind the [`Engine`] trait.
//!
//! `start` returns at once so the HTTP server can answer liveness probes while
//! a large checkpoint loads; a dedicated OS thread loads the model, warms it
//! up, then runs the [`Scheduler`] loop. Requests are prepared (images decoded
//! and tiled, prompt tokenized) on the blocking pool before they are queued,
//! so bad input is refused without touching the model.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use tokio::sync::{mpsc, oneshot};

use super::budget::{StateCost, device_state_budget, pool_slots};
use super::prepare::Preparer;
use super::scheduler::{Job, Scheduler, SchedulerConfig};
use super::{ChatRequest, Engine, EngineError, Generation, ModelInfo};
use crate::model::config::{CheckpointConfig, parse_json_lenient};
use crate::model::linear::CpuMatmul;
use crate::model::nemotron_h::LogitsFor;
use crate::model::state::{SlotMonitor, SlotUsage};
use crate::model::vlm::NemotronVl;
use crate::preprocess::{ImageLimits, TilingConfig};
use crate::prompt::{ChatTemplate, ImageTokens, PromptTokenizer};

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub model_dir: PathBuf,
    pub device: Device,
    pub dtype: DType,
    pub max_num_seqs: usize,
    /// Requests waiting beyond the running ones; more get 429.
    pub max_queue: usize,
    /// `None`: the config's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    pub max_tiles: usize,
    pub prefill_chunk: usize,
    pub image_limits: ImageLimits,
    /// Bytes for sequence state: the Mamba state pool (allocated at start,
    /// at most `max_num_seqs` slots) plus the KV caches running sequences
    /// reserve. `None`: on CUDA a share of the memory free after loading the
    /// weights ([`super::budget::DEVICE_STATE_FRACTION`]), on CPU no byte limit.
    pub state_memory: Option<usize>,
    /// Precision of the activations in CPU matmuls with BF16 weights, for this engine's
    /// model thread.
    pub cpu_matmul: CpuMatmul,
}

pub struct LocalEngine {
    queue: mpsc::Sender<Job>,
    preparer: Arc<OnceLock<Preparer>>,
    ready: Arc<AtomicBool>,
    info: ModelInfo,
    slots: Arc<OnceLock<SlotMonitor>>,
}

impl LocalEngine {
    /// Read the config (fast, so flag errors surface now), then load the
    /// weights in the background. The receiver reports a failed load.
    pub fn start(options: EngineOptions) -> Result<(Arc<Self>, oneshot::Receiver<anyhow::Error>)> {
        let config = CheckpointConfig::load(&options.model_dir)?;
        let context = config.model.llm_config.max_position_embeddings;
        let max_model_len = match options.max_model_len {
            Some(n) => n,
            None => context,
        };
        let info = ModelInfo {
            max_model_len,
            max_tiles: options.max_tiles,
        };
        let (queue, jobs) = mpsc::channel(options.max_queue.max(1));
        let preparer = Arc::new(OnceLock::new());
        let ready = Arc::new(AtomicBool::new(false));
        let slots = Arc::new(OnceLock::new());
        let (failed_tx, failed_rx) = oneshot::channel();
        let worker = Worker {
            options,
            config,
            max_model_len,
            preparer: Arc::clone(&preparer),
            ready: Arc::clone(&ready),
            slots: Arc::clone(&slots),
        };
        std::thread::Builder::new()
            .name("vlm-engine".into())
            .spawn(move || {
                CpuMatmul::set_for_thread(worker.options.cpu_matmul);
                if let Err(e) = worker.run(jobs) {
                    tracing::error!(error = format!("{e:#}"), "the model failed to load");
                    let _ = failed_tx.send(e);
                }
            })
            .context("spawning the engine thread")?;
        Ok((
            Arc::new(LocalEngine {
                queue,
                preparer,
                ready,
                info,
                slots,
            }),
            failed_rx,
        ))
    }
}

impl LocalEngine {
    /// State-pool slots in use (`None` until the model is loaded). A slot is
    /// held from admission until the request finishes or is cancelled.
    pub fn slot_usage(&self) -> Option<SlotUsage> {
        self.slots.get().map(SlotMonitor::usage)
    }
}

impl Engine for LocalEngine {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    async fn submit(&self, request: ChatRequest) -> Result<Generation, EngineError> {
        if !self.is_ready() {
            return Err(EngineError::Unavailable(
                "the model is still loading".into(),
            ));
        }
        // Fail fast before decoding images when the queue is already full.
        if self.queue.capacity() == 0 {
            return Err(EngineError::Overloaded);
        }
        let preparer = Arc::clone(&self.preparer);
        let prepared = tokio::task::spawn_blocking(move || match preparer.get() {
            Some(p) => p.prepare(&request),
            None => Err(EngineError::Unavailable(
                "the model is still loading".into(),
            )),
        })
        .await
        .map_err(|e| EngineError::Internal(format!("request preparation panicked: {e}")))??;
        // At most one event per token plus a flush and the end: sends never block.
        let (events, receiver) = mpsc::channel(prepared.max_tokens + 4);
        let job = Job {
            request: prepared,
            events,
            enqueued: Instant::now(),
        };
        self.queue.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => EngineError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => {
                EngineError::Unavailable("the engine has stopped".into())
            }
        })?;
        Ok(Generation { events: receiver })
    }
}

/// Runs on the engine thread: load, warm up, serve.
struct Worker {
    options: EngineOptions,
    config: CheckpointConfig,
    max_model_len: usize,
    preparer: Arc<OnceLock<Preparer>>,
    ready: Arc<AtomicBool>,
    slots: Arc<OnceLock<SlotMonitor>>,
}

impl Worker {
    fn run(self, jobs: mpsc::Receiver<Job>) -> Result<()> {
        let dir = &self.options.model_dir;
        let started = Instant::now();
        let model = Arc::new(NemotronVl::load(
            dir,
            self.options.dtype,
            &self.options.device,
        )?);
        let cfg = &self.config.model;
        let tokens = ImageTokens {
            context: cfg.img_context_token.clone(),
            start: cfg.img_start_token.clone(),
            end: cfg.img_end_token.clone(),
        };
        let tokenizer = Arc::new(PromptTokenizer::load(
            dir,
            tokens,
            Some(cfg.img_context_token_id),
        )?);
        let config_json: serde_json::Value = parse_json_lenient(
            &std::fs::read_to_string(dir.join("config.json")).context("reading config.json")?,
        )?;
        let tiling = TilingConfig::from_config_json(&config_json, self.options.max_tiles)?;
        let template = ChatTemplate::load(dir)?;
        tracing::info!(
            template = %template.source_name,
            seconds = started.elapsed().as_secs_f32(),
            "model loaded"
        );
        // Measured before anything but the weights takes device memory.
        let budget = self
            .options
            .state_memory
            .or_else(|| device_state_budget(&self.options.device));
        warm_up(&model)?;
        let preparer = Preparer {
            tokenizer: Arc::clone(&tokenizer),
            template,
            tiling,
            limits: self.options.image_limits,
            tokens_per_tile: model.tokens_per_tile(),
            max_model_len: self.max_model_len,
        };
        let _ = self.preparer.set(preparer);
        let state_cost = StateCost::of(&cfg.llm_config, self.options.dtype.size_in_bytes());
        let max_num_seqs = self.options.max_num_seqs.max(1);
        let slots = pool_slots(max_num_seqs, budget, state_cost);
        let kv_budget = budget.map(|b| b.saturating_sub(slots * state_cost.fixed));
        tracing::info!(
            fixed_bytes = state_cost.fixed,
            kv_bytes_per_token = state_cost.per_token,
            budget = ?budget,
            slots,
            kv_budget = ?kv_budget,
            "sequence state"
        );
        if slots < max_num_seqs {
            tracing::warn!(
                slots,
                max_num_seqs,
                "the state budget holds fewer Mamba states than --max-num-seqs"
            );
        }
        if let Some(kv) = kv_budget
            && kv < state_cost.fixed
        {
            tracing::warn!(
                kv_tokens = kv / state_cost.per_token.max(1),
                "little room for KV caches beside the state pool; lower --max-num-seqs for more"
            );
        }
        let scheduler = Scheduler::new(
            model,
            tokenizer,
            SchedulerConfig {
                max_num_seqs: slots,
                prefill_chunk: self.options.prefill_chunk.max(1),
                max_vision_tiles: 4 * (self.options.max_tiles + 1),
                eos_token_ids: self.config.eos_token_ids.clone(),
                kv_budget,
                state_cost,
            },
        )
        .context("allocating the state pool")?;
        let _ = self.slots.set(scheduler.slot_monitor());
        self.ready.store(true, Ordering::Release);
        tracing::info!(seconds = started.elapsed().as_secs_f32(), "ready to serve");
        scheduler.run(jobs);
        Ok(())
    }
}

/// One vision tile and a two-token prompt through the model, so the first
/// request does not pay for lazy initialisation.
fn warm_up(model: &NemotronVl) -> Result<()> {
    let s = model.tile_size();
    let tile = Tensor::zeros((1, 3, s, s), DType::F32, model.device())?;
    model.encode_images(&tile).context("warm-up: vision")?;
    let embeds = model.embed_prompt(&[10, 11], None)?;
    let pool = model.llm.new_pool(1)?;
    let mut state = pool.acquire(None)?.context("warm-up: no state slot")?;
    model
        .llm
        .forward(
            &embeds,
            &[2],
            &pool,
            &mut [&mut state],
            LogitsFor::LastToken,
        )
        .context("warm-up: language model")?;
    Ok(())
}
