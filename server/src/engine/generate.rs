//! Single-request generation: prefill the prompt, then decode token by token with the
//! cached state, sampling each token, until EOS, `max_tokens`, the context limit, or the
//! caller cancels from the per-token callback.

use candle_core::{Result, Tensor};

use super::FinishReason;
use super::sampling::{Sampler, SamplingParams};
use crate::model::nemotron_h::{LogitsFor, NemotronH};

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub sampling: SamplingParams,
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// Generation stops after emitting any of these ids (the stop id is included in `tokens`).
    pub eos_token_ids: Vec<u32>,
    /// Keep going past EOS (tests, benchmarks).
    pub ignore_eos: bool,
    /// Maximum prompt + completion tokens, if any (e.g. `max_position_embeddings`).
    pub max_total_tokens: Option<usize>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            sampling: SamplingParams::default(),
            max_tokens: 256,
            eos_token_ids: Vec::new(),
            ignore_eos: false,
            max_total_tokens: None,
        }
    }
}

/// What the per-token callback tells the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepControl {
    Continue,
    /// Stop now (client gone, stop string matched...).
    Cancel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOutput {
    /// Generated ids, including a final EOS id if one ended generation.
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
    /// True when the callback cancelled (then `finish_reason` is `Stop`).
    pub cancelled: bool,
}

/// Generate from prompt embeddings `prompt_embeds` [prompt_len, hidden] (the VL glue splices
/// image embeddings into them). `on_token(id, index)` sees every generated id as it is
/// produced, and can cancel.
pub fn generate(
    model: &NemotronH,
    prompt_embeds: &Tensor,
    params: &GenerateParams,
    mut on_token: impl FnMut(u32, usize) -> StepControl,
) -> Result<GenerateOutput> {
    let prompt_tokens = prompt_embeds.dim(0)?;
    if prompt_tokens == 0 {
        candle_core::bail!("generate: empty prompt");
    }
    if let Some(limit) = params.max_total_tokens
        && prompt_tokens >= limit
    {
        candle_core::bail!(
            "generate: prompt of {prompt_tokens} tokens leaves no room under the {limit}-token limit"
        );
    }
    let max_tokens = match params.max_total_tokens {
        Some(limit) => params.max_tokens.min(limit - prompt_tokens),
        None => params.max_tokens,
    };
    let mut sampler = Sampler::new(params.sampling.clone());
    // A one-slot pool: the sequence's Mamba states, allocated once for this generation.
    let pool = model.new_pool(1)?;
    let Some(mut state) = pool.acquire(Some(prompt_tokens + max_tokens))? else {
        candle_core::bail!("generate: a fresh one-slot state pool has no free slot");
    };
    let mut tokens = Vec::new();
    let finish = |tokens: Vec<u32>, finish_reason, cancelled| GenerateOutput {
        completion_tokens: tokens.len(),
        tokens,
        prompt_tokens,
        finish_reason,
        cancelled,
    };
    if max_tokens == 0 {
        return Ok(finish(tokens, FinishReason::Length, false));
    }
    // [1, vocab] f32 logits of the last prompt token.
    let mut logits = model.forward(
        prompt_embeds,
        &[prompt_tokens],
        &pool,
        &mut [&mut state],
        LogitsFor::LastToken,
    )?;
    loop {
        let row = logits.squeeze(0)?.to_vec1::<f32>()?;
        let id = sampler.sample(&row);
        tokens.push(id);
        let control = on_token(id, tokens.len() - 1);
        if control == StepControl::Cancel {
            return Ok(finish(tokens, FinishReason::Stop, true));
        }
        if !params.ignore_eos && params.eos_token_ids.contains(&id) {
            return Ok(finish(tokens, FinishReason::Stop, false));
        }
        if tokens.len() >= max_tokens {
            return Ok(finish(tokens, FinishReason::Length, false));
        }
        if id as usize >= model.vocab_size() {
            candle_core::bail!("generate: sampled id {id} outside the embedding table");
        }
        let ids = Tensor::new(&[id], model.device())?;
        logits = model.forward(
            &model.embed(&ids)?,
            &[1],
            &pool,
            &mut [&mut state],
            LogitsFor::LastToken,
        )?;
    }
}

/// [`generate`] from plain token ids (no images).
pub fn generate_from_ids(
    model: &NemotronH,
    prompt_ids: &[u32],
    params: &GenerateParams,
    on_token: impl FnMut(u32, usize) -> StepControl,
) -> Result<GenerateOutput> {
    if let Some(bad) = prompt_ids
        .iter()
        .find(|&&id| id as usize >= model.vocab_size())
    {
        candle_core::bail!(
            "generate: prompt id {bad} is outside the embedding table ({} rows)",
            model.vocab_size()
        );
    }
    let ids = Tensor::new(prompt_ids, model.device())?;
    generate(model, &model.embed(&ids)?, params, on_token)
}
