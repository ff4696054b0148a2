//! NemotronH attention mixer (model.md §2.4): GQA, causal, no positional encoding,
//! scale 1/sqrt(head_dim), softmax in f32, with a per-sequence KV cache.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::NemotronHConfig;
use super::linear::Linear;
use super::state::{KvCache, cat_rows};

#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    pub fn new(cfg: &NemotronHConfig, vb: VarBuilder) -> Result<Self> {
        let (h, nh, nkv, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.attn_head_dim(),
        );
        let bias = cfg.attention_bias;
        Ok(Attention {
            q_proj: Linear::new(h, nh * hd, bias, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, nkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, nkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: Linear::new(nh * hd, h, bias, vb.pp("o_proj"))?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            scale: 1.0 / (hd as f64).sqrt(),
        })
    }

    /// `x`: [T, hidden], the sequences of `seq_lens` packed back to back; `caches[i]` is
    /// sequence i's cache for this layer (appended to). Returns [T, hidden].
    pub fn forward(
        &self,
        x: &Tensor,
        seq_lens: &[usize],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let rep = nh / nkv;
        // Projections run once over all packed tokens.
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        let mut outs = Vec::with_capacity(seq_lens.len());
        let mut start = 0;
        for (&len, cache) in seq_lens.iter().zip(caches.iter_mut()) {
            let offset = cache.len();
            // [len, heads*hd] -> [heads, len, hd]
            let qs = q
                .narrow(0, start, len)?
                .reshape((len, nh, hd))?
                .transpose(0, 1)?;
            let ks = k
                .narrow(0, start, len)?
                .reshape((len, nkv, hd))?
                .transpose(0, 1)?;
            let vs = v
                .narrow(0, start, len)?
                .reshape((len, nkv, hd))?
                .transpose(0, 1)?;
            let (k_all, v_all) = cache.append(&ks, &vs)?; // [kv, L, hd]
            let total = offset + len;
            // Query head h uses kv head h / rep: group the rep query heads of a kv head
            // into the rows of one matmul. [kv, rep*len, hd]
            let qg = qs.contiguous()?.reshape((nkv, rep * len, hd))?;
            let scores = (qg.matmul(&k_all.transpose(1, 2)?)? * self.scale)?; // [kv, rep*len, L]
            let scores = scores.to_dtype(DType::F32)?;
            let scores = if len > 1 {
                let mask = causal_mask(len, offset, x.device())?; // [len, L]
                scores
                    .reshape((nkv, rep, len, total))?
                    .broadcast_add(&mask)?
                    .reshape((nkv, rep * len, total))?
            } else {
                scores
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v_all.dtype())?;
            let out = probs.matmul(&v_all)?; // [kv, rep*len, hd] = [heads, len, hd]
            let out = out
                .reshape((nh, len, hd))?
                .transpose(0, 1)?
                .reshape((len, nh * hd))?;
            outs.push(out);
            start += len;
        }
        let out = cat_rows(outs)?;
        self.o_proj.forward(&out)
    }
}

/// [len, offset+len] additive mask: query i (absolute offset+i) sees keys j <= offset+i.
fn causal_mask(len: usize, offset: usize, dev: &Device) -> Result<Tensor> {
    let total = offset + len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (len, total), dev)
}

/// Reference full causal attention for tests: q [nh, T, hd], k/v [nkv, T, hd].
#[cfg(test)]
pub(crate) fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (nh, t, _) = q.dims3()?;
    let nkv = k.dim(0)?;
    let rep = nh / nkv;
    let mut heads = Vec::new();
    for h in 0..nh {
        let qh = q.get(h)?;
        let kh = k.get(h / rep)?;
        let vh = v.get(h / rep)?;
        let s = (qh.matmul(&kh.t()?)? * scale)?.broadcast_add(&causal_mask(t, 0, q.device())?)?;
        let p = candle_nn::ops::softmax(&s, candle_core::D::Minus1)?;
        heads.push(p.matmul(&vh)?);
    }
    Tensor::stack(&heads, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    #[test]
    fn decode_with_cache_matches_full_causal_attention() -> Result<()> {
        let dev = Device::Cpu;
        let cfg: NemotronHConfig = serde_json::from_str(
            r#"{"hidden_size": 32, "intermediate_size": 8, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 8, "mamba_num_heads": 1,
                "mamba_head_dim": 1, "ssm_state_size": 1}"#,
        )
        .map_err(candle_core::Error::wrap)?;
        let vm = VarMap::new();
        let attn = Attention::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        let t = 21;
        let x = Tensor::randn(0f32, 1.0, (t, 32), &dev)?;

        // Full prefill in one call.
        let mut c_full = KvCache::new();
        let full = attn.forward(&x, &[t], &mut [&mut c_full])?;

        // Explicit reference.
        let q = attn
            .q_proj
            .forward(&x)?
            .reshape((t, 4, 8))?
            .transpose(0, 1)?
            .contiguous()?;
        let k = attn
            .k_proj
            .forward(&x)?
            .reshape((t, 2, 8))?
            .transpose(0, 1)?
            .contiguous()?;
        let v = attn
            .v_proj
            .forward(&x)?
            .reshape((t, 2, 8))?
            .transpose(0, 1)?
            .contiguous()?;
        let r = reference_attention(&q, &k, &v, attn.scale)?
            .transpose(0, 1)?
            .reshape((t, 32))?;
        let r = attn.o_proj.forward(&r)?;
        assert!(max_abs(&full, &r)? < 1e-5);

        // Prefill 3, then decode one token at a time (cache grows past its first capacity too).
        let mut c = KvCache::new();
        let mut parts = vec![attn.forward(&x.narrow(0, 0, 3)?, &[3], &mut [&mut c])?];
        for i in 3..t {
            parts.push(attn.forward(&x.narrow(0, i, 1)?, &[1], &mut [&mut c])?);
        }
        let inc = Tensor::cat(&parts, 0)?;
        assert!(max_abs(&inc, &full)? < 1e-5);
        assert_eq!(c.len(), t);
        Ok(())
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }
}
