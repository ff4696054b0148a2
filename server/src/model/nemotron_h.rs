//! NemotronH hybrid LLM (model.md §2): embeddings → 62 pre-norm residual blocks
//! (Mamba2 / attention / MLP per the config pattern) → norm_f → lm_head.
//!
//! The forward pass takes a batch of sequences packed back to back ([total_tokens, hidden]),
//! each a [`SequenceState`] whose Mamba states are a slot of a [`StatePool`]. Linear layers
//! run once over all packed tokens; the chunked scan and attention run per sequence on its
//! slice, and the decode steps (1 token per sequence) run the Mamba recurrence once for all
//! of them, in place on the pool.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::attention::Attention;
use super::checkpoint::Checkpoint;
use super::config::{LayerKind, NemotronHConfig};
use super::linear::Linear;
use super::mamba2::{Mamba2, MambaBatch};
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::state::{KvCache, LayerStateKind, SequenceState, StatePool};

/// Checkpoint prefix of the LLM inside the VL checkpoint.
pub const LLM_PREFIX: &str = "language_model";

/// Which positions to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// One row per sequence: its last token. [num_seqs, vocab]
    LastToken,
    /// Every packed token. [total_tokens, vocab]
    AllTokens,
}

#[derive(Debug, Clone)]
enum Mixer {
    Mamba(Mamba2),
    Attention(Attention),
    Mlp(Mlp),
}

#[derive(Debug, Clone)]
struct Block {
    norm: RmsNorm,
    mixer: Mixer,
}

#[derive(Debug, Clone)]
pub struct NemotronH {
    embeddings: Embedding,
    layers: Vec<Block>,
    norm_f: RmsNorm,
    lm_head: Linear,
    cfg: NemotronHConfig,
    vocab_rows: usize,
    dtype: DType,
    device: Device,
}

impl NemotronH {
    /// `vb` points at the LLM root (`language_model`), holding `backbone.*` and `lm_head`.
    pub fn new(cfg: &NemotronHConfig, vb: VarBuilder) -> Result<Self> {
        let hidden = cfg.hidden_size;
        let bb = vb.pp("backbone");
        // The table may have more rows than the tokenizer (added image tokens): trust the tensor.
        let emb = bb.pp("embeddings").get_unchecked("weight")?;
        let (vocab_rows, emb_hidden) = emb.dims2()?;
        if emb_hidden != hidden {
            candle_core::bail!(
                "tensor `{}` has shape {:?}, expected [rows, {hidden}]",
                format!("{}.backbone.embeddings.weight", vb.prefix()),
                emb.dims()
            );
        }
        let eps = cfg.layer_norm_epsilon;
        let mut layers = Vec::with_capacity(cfg.layers.len());
        for (i, kind) in cfg.layers.iter().enumerate() {
            let lvb = bb.pp("layers").pp(i);
            let mvb = lvb.pp("mixer");
            let mixer = match kind {
                LayerKind::Mamba => Mixer::Mamba(Mamba2::new(cfg, mvb)?),
                LayerKind::Attention => Mixer::Attention(Attention::new(cfg, mvb)?),
                LayerKind::Mlp => Mixer::Mlp(Mlp::new(cfg, mvb)?),
            };
            layers.push(Block {
                norm: RmsNorm::new(hidden, eps, lvb.pp("norm"))?,
                mixer,
            });
        }
        let lm_head = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            Linear::from_weight(emb.clone(), None)?
        } else {
            Linear::from_weight(vb.pp("lm_head").get((vocab_rows, hidden), "weight")?, None)?
        };
        Ok(NemotronH {
            embeddings: Embedding::new(emb, hidden),
            layers,
            norm_f: RmsNorm::new(hidden, eps, bb.pp("norm_f"))?,
            lm_head,
            cfg: cfg.clone(),
            vocab_rows,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Load from a checkpoint (tensors under [`LLM_PREFIX`]) onto `device` as `dtype`
    /// (F32 on CPU: candle has no BF16 CPU matmul).
    pub fn load(
        ckpt: &Checkpoint,
        cfg: &NemotronHConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::new(cfg, ckpt.var_builder(dtype, device).pp(LLM_PREFIX))
    }

    pub fn config(&self) -> &NemotronHConfig {
        &self.cfg
    }

    /// Rows of the embedding table (= logits width); may exceed the tokenizer's vocab.
    pub fn vocab_size(&self) -> usize {
        self.vocab_rows
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `ids`: [T] u32 → [T, hidden] in the model dtype. Ids must be < `vocab_size()`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embeddings.forward(ids)
    }

    /// A pool of Mamba states for up to `slots` sequences at once, allocated now.
    pub fn new_pool(&self, slots: usize) -> Result<StatePool> {
        let kinds: Vec<LayerStateKind> = self
            .layers
            .iter()
            .map(|b| match &b.mixer {
                Mixer::Mamba(m) => LayerStateKind::Mamba(m.dims()),
                Mixer::Attention(_) => LayerStateKind::Attention,
                Mixer::Mlp(_) => LayerStateKind::Stateless,
            })
            .collect();
        StatePool::new(&kinds, slots, &self.device)
    }

    /// Run `embeds` [total_tokens, hidden] — the sequences of `seq_lens` packed back to back —
    /// continuing each sequence from `states[i]` (its slot of `pool` and its KV caches, all
    /// updated in place). Returns f32 logits, [num_seqs, vocab] for `LastToken` or
    /// [total_tokens, vocab] for `AllTokens`.
    pub fn forward(
        &self,
        embeds: &Tensor,
        seq_lens: &[usize],
        pool: &StatePool,
        states: &mut [&mut SequenceState],
        logits: LogitsFor,
    ) -> Result<Tensor> {
        // On CPU this runs the pass inside candle's own warm rayon pool; outside it the gemm
        // calls stay on the calling thread (measured: no matmul parallelism at all).
        let out = self
            .device
            .with_context(|| self.forward_inner(embeds, seq_lens, pool, states, logits));
        if self.device.is_cpu() {
            crate::memory::release_after_pass(embeds.dim(0)?);
        }
        out
    }

    fn forward_inner(
        &self,
        embeds: &Tensor,
        seq_lens: &[usize],
        pool: &StatePool,
        states: &mut [&mut SequenceState],
        logits: LogitsFor,
    ) -> Result<Tensor> {
        let (total, hidden) = embeds.dims2()?;
        if hidden != self.cfg.hidden_size {
            candle_core::bail!(
                "forward: embeds have width {hidden}, expected {}",
                self.cfg.hidden_size
            );
        }
        if seq_lens.len() != states.len() || seq_lens.is_empty() {
            candle_core::bail!(
                "forward: {} sequence lengths for {} states",
                seq_lens.len(),
                states.len()
            );
        }
        if seq_lens.contains(&0) || seq_lens.iter().sum::<usize>() != total {
            candle_core::bail!(
                "forward: seq_lens {seq_lens:?} do not add up to {total} tokens (or contain 0)"
            );
        }
        if pool.num_layers() != self.layers.len() {
            candle_core::bail!(
                "forward: state pool has {} layers, model {}",
                pool.num_layers(),
                self.layers.len()
            );
        }
        let mut slots = Vec::with_capacity(states.len());
        for st in states.iter() {
            pool.check(st)?;
            if st.num_layers() != self.layers.len() {
                candle_core::bail!(
                    "forward: state has {} layers, model {}",
                    st.num_layers(),
                    self.layers.len()
                );
            }
            slots.push(st.slot());
        }
        let batch = MambaBatch::new(seq_lens, &slots, &self.device)?;
        let mut x = embeds.to_dtype(self.dtype)?;
        // The last block's output, added to the residual stream with the next block's norm.
        let mut delta: Option<Tensor> = None;
        for (i, block) in self.layers.iter().enumerate() {
            let (sum, h) = block.norm.add_forward(&x, delta.as_ref())?;
            x = sum;
            let out = match &block.mixer {
                Mixer::Mlp(m) => m.forward(&h)?,
                Mixer::Mamba(m) => {
                    let Some(layer_pool) = pool.mamba(i) else {
                        candle_core::bail!(
                            "forward: the state pool has no Mamba states for layer {i}"
                        );
                    };
                    m.forward(&h, &batch, layer_pool)?
                }
                Mixer::Attention(a) => {
                    let mut caches = states
                        .iter_mut()
                        .map(|s| {
                            s.kv_cache_mut(i).ok_or_else(|| {
                                candle_core::Error::Msg(format!(
                                    "state of layer {i} has no KV cache"
                                ))
                            })
                        })
                        .collect::<Result<Vec<&mut KvCache>>>()?;
                    a.forward(&h, seq_lens, &mut caches)?
                }
            };
            delta = Some(out);
        }
        if let Some(d) = delta {
            x = (x + d)?;
        }
        for (st, &len) in states.iter_mut().zip(seq_lens) {
            st.len += len;
        }
        let x = match logits {
            LogitsFor::AllTokens => x,
            LogitsFor::LastToken if seq_lens.len() == total => x,
            LogitsFor::LastToken => {
                let last: Vec<u32> = seq_lens
                    .iter()
                    .scan(0usize, |end, &l| {
                        *end += l;
                        Some((*end - 1) as u32)
                    })
                    .collect();
                let idx = Tensor::new(last.as_slice(), &self.device)?;
                x.index_select(&idx, 0)?
            }
        };
        self.lm_head
            .forward(&self.norm_f.forward(&x)?)?
            .to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::CheckpointConfig;
    use std::path::Path;

    fn tiny() -> NemotronH {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny");
        let cfg = CheckpointConfig::load(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        NemotronH::load(&ckpt, &cfg.model.llm_config, DType::F32, &Device::Cpu).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn batched_forward_matches_each_sequence_alone() {
        let model = tiny();
        let dev = Device::Cpu;
        let pool = model.new_pool(12).unwrap();
        // Lengths straddle the tiny model's chunk size (16).
        let lens = [5usize, 19, 1, 33];
        let ids: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(s, &l)| {
                (0..l)
                    .map(|i| ((i * 37 + s * 101 + 3) % 990) as u32)
                    .collect()
            })
            .collect();
        let alone: Vec<(Tensor, SequenceState)> = ids
            .iter()
            .map(|seq| {
                let mut st = pool.acquire(None).unwrap().unwrap();
                let emb = model
                    .embed(&Tensor::new(seq.as_slice(), &dev).unwrap())
                    .unwrap();
                let lg = model
                    .forward(
                        &emb,
                        &[seq.len()],
                        &pool,
                        &mut [&mut st],
                        LogitsFor::AllTokens,
                    )
                    .unwrap();
                (lg, st)
            })
            .collect();
        let flat: Vec<u32> = ids.concat();
        let emb = model
            .embed(&Tensor::new(flat.as_slice(), &dev).unwrap())
            .unwrap();
        let mut states: Vec<SequenceState> = lens
            .iter()
            .map(|_| pool.acquire(None).unwrap().unwrap())
            .collect();
        let mut refs: Vec<&mut SequenceState> = states.iter_mut().collect();
        let all = model
            .forward(&emb, &lens, &pool, &mut refs, LogitsFor::AllTokens)
            .unwrap();
        let mut start = 0;
        for (i, &l) in lens.iter().enumerate() {
            assert!(
                max_abs(&all.narrow(0, start, l).unwrap(), &alone[i].0) < 1e-4,
                "seq {i}"
            );
            start += l;
        }
        // LastToken rows are the last row of each sequence.
        let mut refs: Vec<&mut SequenceState> = states.iter_mut().collect();
        let step_ids = Tensor::new(&[7u32, 8, 9, 10], &dev).unwrap();
        let step = model
            .forward(
                &model.embed(&step_ids).unwrap(),
                &[1, 1, 1, 1],
                &pool,
                &mut refs,
                LogitsFor::LastToken,
            )
            .unwrap();
        // Batched decode step == each sequence's own decode step.
        for (i, (_, st)) in alone.iter().enumerate() {
            let mut st = pool.fork(st).unwrap().unwrap();
            let one = model
                .forward(
                    &model.embed(&step_ids.narrow(0, i, 1).unwrap()).unwrap(),
                    &[1],
                    &pool,
                    &mut [&mut st],
                    LogitsFor::LastToken,
                )
                .unwrap();
            assert!(
                max_abs(&step.narrow(0, i, 1).unwrap(), &one) < 1e-4,
                "decode seq {i}"
            );
            assert_eq!(st.len(), lens[i] + 1);
        }
        assert!(pool.usage().peak <= pool.capacity());
        // A state from another pool is refused.
        let other = model.new_pool(1).unwrap();
        let mut foreign = other.acquire(None).unwrap().unwrap();
        let one = model.embed(&Tensor::new(&[7u32], &dev).unwrap()).unwrap();
        assert!(
            model
                .forward(&one, &[1], &pool, &mut [&mut foreign], LogitsFor::LastToken)
                .is_err()
        );
    }
}
