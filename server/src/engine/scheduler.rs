//! The continuous-batching loop that owns the model.
//!
//! Each step runs ONE packed forward pass over every running sequence: one
//! token for each sequence in decode, plus a chunk of the prompt of at most
//! one sequence in prefill, so a long image prompt delays running decodes by
//! at most one chunk. The Mamba states of all sequences live in one
//! [`StatePool`] allocated when the scheduler starts, one slot per running
//! sequence; a sequence holds its slot (and its own KV caches) from admission
//! to finish, and gives it back the moment the request ends or its client goes
//! away. The vision encoder runs once per admission round over the tiles of
//! every newly admitted request.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use tokio::sync::mpsc;

use super::budget::StateCost;
use super::prepare::PreparedRequest;
use super::sampling::Sampler;
use super::stop::StopMatcher;
use super::{EngineError, FinishReason, GenerationEvent, Usage};
use crate::api::metrics::{QUEUE_DEPTH, RUNNING_SEQUENCES, TILES};
use crate::model::nemotron_h::LogitsFor;
use crate::model::state::{SequenceState, SlotMonitor, StatePool};
use crate::model::vlm::NemotronVl;
use crate::prompt::{PromptTokenizer, StreamDecoder};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences generated at once: the state pool's slots.
    pub max_num_seqs: usize,
    /// Prompt tokens prefilled per step.
    pub prefill_chunk: usize,
    /// Tiles per vision forward pass (bounds activation memory).
    pub max_vision_tiles: usize,
    pub eos_token_ids: Vec<u32>,
    /// Bytes of KV cache that running sequences may reserve together (the
    /// state budget less the pool); `None`: only `max_num_seqs` limits.
    pub kv_budget: Option<usize>,
    pub state_cost: StateCost,
}

/// A prepared request waiting in the queue.
pub struct Job {
    pub request: PreparedRequest,
    pub events: mpsc::Sender<GenerationEvent>,
    pub enqueued: Instant,
}

struct Sequence {
    events: mpsc::Sender<GenerationEvent>,
    state: SequenceState,
    /// Prompt embeddings `[remaining, hidden]` not yet run through the model.
    pending: Option<Tensor>,
    prompt_len: usize,
    /// The token to feed at the next decode step.
    next_input: Option<u32>,
    generated: usize,
    max_tokens: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    ignore_eos: bool,
    /// KV-cache bytes reserved at admission, released when the sequence ends.
    reserved: usize,
}

/// How many tokens of a sequence go into this step.
enum Work {
    Decode(u32),
    Prefill { tokens: usize, last: bool },
}

pub struct Scheduler {
    model: Arc<NemotronVl>,
    tokenizer: Arc<PromptTokenizer>,
    config: SchedulerConfig,
    /// Mamba states of the running sequences, one slot each.
    pool: StatePool,
    running: Vec<Sequence>,
    waiting: VecDeque<Job>,
}

impl Scheduler {
    /// Allocates the state pool: `config.max_num_seqs` slots.
    pub fn new(
        model: Arc<NemotronVl>,
        tokenizer: Arc<PromptTokenizer>,
        config: SchedulerConfig,
    ) -> candle_core::Result<Self> {
        let pool = model.llm.new_pool(config.max_num_seqs.max(1))?;
        Ok(Scheduler {
            model,
            tokenizer,
            config,
            pool,
            running: Vec::new(),
            waiting: VecDeque::new(),
        })
    }

    /// Watches the state pool's slots from other threads.
    pub fn slot_monitor(&self) -> SlotMonitor {
        self.pool.monitor()
    }

    /// Serve jobs until the queue's senders are all gone and the work is done.
    pub fn run(mut self, mut queue: mpsc::Receiver<Job>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match queue.blocking_recv() {
                    Some(job) => self.waiting.push_back(job),
                    None => return,
                }
            }
            // Take only what can be admitted: the rest stays in the bounded
            // channel, whose fullness is what makes submit() answer 429.
            while self.running.len() + self.waiting.len() < self.config.max_num_seqs {
                match queue.try_recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => break,
                }
            }
            self.drop_cancelled();
            self.admit();
            metrics::gauge!(QUEUE_DEPTH).set((queue.len() + self.waiting.len()) as f64);
            metrics::gauge!(RUNNING_SEQUENCES).set(self.running.len() as f64);
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    /// Move waiting jobs into running sequences: encode their images in
    /// batches, splice them into the prompt embeddings, allocate state.
    fn admit(&mut self) {
        let mut admitted = Vec::new();
        let mut reserved: usize = self.running.iter().map(|s| s.reserved).sum();
        let slots = self.pool.capacity().min(self.config.max_num_seqs);
        while self.running.len() + admitted.len() < slots {
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            if job.events.is_closed() {
                continue;
            }
            let need = self.reservation(&job.request);
            if let Some(budget) = self.config.kv_budget {
                let alone = self.running.is_empty() && admitted.is_empty();
                // A request bigger than the whole budget still runs, alone.
                if reserved + need > budget && !alone {
                    self.waiting.push_front(job);
                    break;
                }
            }
            reserved += need;
            admitted.push(job);
        }
        if admitted.is_empty() {
            return;
        }
        let embeddings = self.encode_images(&admitted);
        for (job, images) in admitted.into_iter().zip(embeddings) {
            match images.and_then(|images| self.start_sequence(&job, images)) {
                Ok(seq) => self.running.push(seq),
                Err(e) => fail(&job.events, e),
            }
        }
    }

    /// Image embeddings per job (`None` for text-only jobs), computed in
    /// shared vision batches of at most `max_vision_tiles` tiles; a failure
    /// fails only the jobs of its batch.
    fn encode_images(&self, jobs: &[Job]) -> Vec<Result<Option<Tensor>, EngineError>> {
        let mut out: Vec<_> = jobs.iter().map(|_| Ok(None)).collect();
        let mut batch = Vec::new();
        let mut tiles = 0;
        for (j, job) in jobs.iter().enumerate() {
            let n = job.request.num_tiles();
            if n == 0 {
                continue;
            }
            if !batch.is_empty() && tiles + n > self.config.max_vision_tiles {
                self.encode_batch(jobs, &batch, &mut out);
                batch.clear();
                tiles = 0;
            }
            batch.push(j);
            tiles += n;
        }
        self.encode_batch(jobs, &batch, &mut out);
        out
    }

    fn encode_batch(
        &self,
        jobs: &[Job],
        batch: &[usize],
        out: &mut [Result<Option<Tensor>, EngineError>],
    ) {
        if batch.is_empty() {
            return;
        }
        let device = self.model.device();
        let encoded = batch
            .iter()
            .flat_map(|&j| &jobs[j].request.images)
            .map(|t| t.to_tensor(device, DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()
            .and_then(|tiles| Tensor::cat(&tiles, 0))
            .map_err(internal)
            .and_then(|tiles| self.model.encode_images(&tiles).map_err(internal));
        let per_tile = self.model.tokens_per_tile();
        let mut offset = 0;
        for &j in batch {
            let tiles = jobs[j].request.num_tiles();
            out[j] = match &encoded {
                Ok(all) => all
                    .narrow(0, offset * per_tile, tiles * per_tile)
                    .map(Some)
                    .map_err(internal),
                Err(e) => Err(e.clone()),
            };
            offset += tiles;
        }
        metrics::counter!(TILES).increment(offset as u64);
    }

    fn reservation(&self, request: &PreparedRequest) -> usize {
        self.config.state_cost.kv_for_tokens(max_len(request))
    }

    fn start_sequence(&self, job: &Job, images: Option<Tensor>) -> Result<Sequence, EngineError> {
        let request = &job.request;
        let embeds = self
            .model
            .embed_prompt(&request.prompt_ids, images.as_ref())
            .map_err(|e| EngineError::Internal(format!("{e:#}")))?;
        // A slot is free: admission keeps the running sequences under the pool's size.
        let state = self
            .pool
            .acquire(Some(max_len(request)))
            .map_err(internal)?
            .ok_or_else(|| internal("no free state slot"))?;
        Ok(Sequence {
            events: job.events.clone(),
            state,
            pending: Some(embeds),
            prompt_len: request.prompt_ids.len(),
            next_input: None,
            generated: 0,
            max_tokens: request.max_tokens,
            sampler: Sampler::new(request.sampling.clone()),
            decoder: StreamDecoder::default(),
            stops: StopMatcher::new(&request.stop),
            ignore_eos: request.ignore_eos,
            reserved: self.reservation(request),
        })
    }

    /// Sequences whose client went away give their slot back before any compute.
    fn drop_cancelled(&mut self) {
        self.running.retain(|s| !s.events.is_closed());
    }

    /// One packed forward pass, then sampling for every sequence that produced logits.
    fn step(&mut self) {
        self.drop_cancelled();
        if self.running.is_empty() {
            return;
        }
        let plan = self.plan();
        let logits = match self.forward(&plan) {
            Ok(logits) => logits,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed; failing the sequences in it");
                let mut in_plan = plan.iter().map(Option::is_some);
                self.running.retain(|s| {
                    let failed = in_plan.next().unwrap_or(false);
                    if failed {
                        fail(&s.events, e.clone());
                    }
                    !failed
                });
                return;
            }
        };
        let mut row = 0;
        let mut finished = Vec::new();
        for (i, work) in plan.into_iter().enumerate() {
            let Some(work) = work else { continue };
            let produces = matches!(work, Work::Decode(_) | Work::Prefill { last: true, .. });
            let logits_row = row;
            row += 1;
            if !produces {
                continue;
            }
            let token = logits
                .get(logits_row)
                .and_then(|r| r.to_vec1::<f32>())
                .map(|r| self.running[i].sampler.sample(&r));
            let done = match token {
                Ok(id) => self.accept(i, id),
                Err(e) => {
                    fail(&self.running[i].events, internal(e));
                    true
                }
            };
            if done {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            self.running.swap_remove(i);
        }
    }

    /// What each running sequence contributes to this step (`None`: nothing).
    fn plan(&self) -> Vec<Option<Work>> {
        let mut prefill_budget = self.config.prefill_chunk.max(1);
        self.running
            .iter()
            .map(|s| {
                if let Some(id) = s.next_input {
                    return Some(Work::Decode(id));
                }
                let remaining = s.pending.as_ref().map_or(0, |p| p.dim(0).unwrap_or(0));
                if remaining == 0 || prefill_budget == 0 {
                    return None;
                }
                let tokens = remaining.min(prefill_budget);
                prefill_budget -= tokens;
                Some(Work::Prefill {
                    tokens,
                    last: tokens == remaining,
                })
            })
            .collect()
    }

    fn forward(&mut self, plan: &[Option<Work>]) -> Result<Tensor, EngineError> {
        let llm = &self.model.llm;
        let mut pieces = Vec::new();
        let mut seq_lens = Vec::new();
        let decode_ids: Vec<u32> = plan
            .iter()
            .filter_map(|w| match w {
                Some(Work::Decode(id)) => Some(*id),
                _ => None,
            })
            .collect();
        let decode_embeds = if decode_ids.is_empty() {
            None
        } else {
            Some(
                llm.embed(&Tensor::new(decode_ids.as_slice(), llm.device()).map_err(internal)?)
                    .map_err(internal)?,
            )
        };
        let mut decode_row = 0;
        for (seq, work) in self.running.iter_mut().zip(plan) {
            match work {
                Some(Work::Decode(_)) => {
                    let e = decode_embeds.as_ref().expect("decode embeddings exist");
                    pieces.push(e.narrow(0, decode_row, 1).map_err(internal)?);
                    decode_row += 1;
                    seq_lens.push(1);
                }
                Some(Work::Prefill { tokens, .. }) => {
                    let pending = seq.pending.take().expect("prefill has pending embeddings");
                    let remaining = pending.dim(0).map_err(internal)?;
                    pieces.push(pending.narrow(0, 0, *tokens).map_err(internal)?);
                    if *tokens < remaining {
                        seq.pending = Some(
                            pending
                                .narrow(0, *tokens, remaining - tokens)
                                .map_err(internal)?,
                        );
                    }
                    seq_lens.push(*tokens);
                }
                None => {}
            }
        }
        let packed = Tensor::cat(&pieces, 0).map_err(internal)?;
        let mut states: Vec<&mut SequenceState> = self
            .running
            .iter_mut()
            .zip(plan)
            .filter(|(_, w)| w.is_some())
            .map(|(s, _)| &mut s.state)
            .collect();
        llm.forward(
            &packed,
            &seq_lens,
            &self.pool,
            &mut states,
            LogitsFor::LastToken,
        )
        .map_err(internal)
    }

    /// Record a sampled token; returns true when the sequence is finished.
    fn accept(&mut self, i: usize, id: u32) -> bool {
        let tokenizer = Arc::clone(&self.tokenizer);
        let seq = &mut self.running[i];
        let eos = !seq.ignore_eos && self.config.eos_token_ids.contains(&id);
        seq.generated += 1;
        let text = if eos {
            Ok(String::new())
        } else {
            seq.decoder.push(&tokenizer, id)
        };
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                fail(&seq.events, EngineError::Internal(e.to_string()));
                return true;
            }
        };
        let step = seq.stops.push(&text);
        send(&seq.events, step.emit);
        let reason = if step.stopped || eos {
            Some(FinishReason::Stop)
        } else if seq.generated >= seq.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        let Some(reason) = reason else {
            seq.next_input = Some(id);
            return false;
        };
        if !step.stopped {
            // Release what the decoder and the stop matcher still hold.
            let tail = seq.decoder.finish(&tokenizer).unwrap_or_default();
            let mut rest = seq.stops.push(&tail);
            if !rest.stopped {
                rest.emit.push_str(&seq.stops.finish());
            }
            send(&seq.events, rest.emit);
        }
        let _ = seq.events.try_send(GenerationEvent::Finished {
            reason,
            usage: Usage {
                prompt_tokens: seq.prompt_len,
                completion_tokens: seq.generated,
            },
        });
        true
    }
}

/// The most tokens a request's sequence can reach: what its KV caches may hold.
fn max_len(request: &PreparedRequest) -> usize {
    request.prompt_ids.len() + request.max_tokens
}

fn send(events: &mpsc::Sender<GenerationEvent>, text: String) {
    if !text.is_empty() {
        let _ = events.try_send(GenerationEvent::Delta(text));
    }
}

fn fail(events: &mpsc::Sender<GenerationEvent>, error: EngineError) {
    let _ = events.try_send(GenerationEvent::Failed(error));
}

fn internal(e: impl std::fmt::Display) -> EngineError {
    EngineError::Internal(e.to_string())
}
