//! NemotronH attention mixer (model.md §2.4): GQA, causal, no positional encoding,
//! scale 1/sqrt(head_dim), softmax in f32, with a per-sequence KV cache.

use candle_core::{CpuStorage, DType, Device, Module, Result, Storage, Tensor};
use candle_nn::VarBuilder;

use super::config::NemotronHConfig;
use super::cpu_math::{SCORES, dispatch, gemm_rows, softmax_in_place};
use super::linear::{Linear, OutPtr, par_ranges};
use super::state::{KvCache, cat_rows};
use crate::kernels;

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
    /// Use [`Attention::attend_cpu`] on CPU (tests turn it off to compare).
    fused_cpu: bool,
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
            fused_cpu: true,
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
        if self.fused_cpu && x.device().is_cpu() && q.dtype() == DType::F32 {
            let out = self.attend_cpu(&q, &k, &v, seq_lens, caches)?;
            return self.o_proj.forward(&out);
        }
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
            let raw = qg.matmul(&k_all.transpose(1, 2)?)?; // [kv, rep*len, L]
            if raw.device().is_cuda() && kernels::fused_enabled() {
                // Scale, causal mask and softmax in one kernel (no host-built mask).
                let causal = (len > 1).then_some((len, offset));
                let probs = kernels::scaled_softmax(
                    &raw.reshape((nkv * rep * len, total))?,
                    self.scale as f32,
                    causal,
                )?
                .reshape((nkv, rep * len, total))?;
                outs.push(heads_to_rows(&probs.matmul(&v_all)?, (nh, len, hd))?);
                start += len;
                continue;
            }
            let scores = (raw * self.scale)?.to_dtype(DType::F32)?;
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
            outs.push(heads_to_rows(&probs.matmul(&v_all)?, (nh, len, hd))?);
            start += len;
        }
        let out = cat_rows(outs)?;
        self.o_proj.forward(&out)
    }

    /// All packed tokens on CPU: `q` [T, heads·hd], `k`/`v` [T, kv·hd] f32, sequence i
    /// owning `seq_lens[i]` consecutive rows. Appends each sequence's K/V to its cache, then
    /// one pass over the tokens (in parallel) attends each query to the keys it may see
    /// (causal: its cached prefix and itself). Nothing of size tokens × keys is
    /// materialized: a 512-token prompt would need ~13 MB of scores per layer with candle
    /// ops (and a few copies), and at decode sizes their ~10 dispatches per sequence cost
    /// more than the math. Returns [T, heads·hd] f32.
    fn attend_cpu(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seq_lens: &[usize],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let tokens: usize = seq_lens.iter().sum();
        let mut kv_all = Vec::with_capacity(caches.len());
        // Work items: a block of one sequence's consecutive tokens, its sequence, its first
        // packed row and how many keys that row sees (each next row sees one more).
        let mut blocks = Vec::new();
        let mut start = 0;
        for (i, (&len, cache)) in seq_lens.iter().zip(caches.iter_mut()).enumerate() {
            let part = |t: &Tensor| {
                t.narrow(0, start, len)?
                    .reshape((len, nkv, hd))?
                    .transpose(0, 1)
            };
            let offset = cache.len();
            kv_all.push(cache.append(&part(k)?, &part(v)?)?); // [kv, L, hd] views
            for r0 in (0..len).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(len - r0);
                blocks.push(QueryBlock {
                    seq: i,
                    row: start + r0,
                    rows,
                    seen: offset + r0 + 1,
                });
            }
            start += len;
        }
        let q = q.contiguous()?;
        let (qg, ql) = q.storage_and_layout();
        let qv = cpu_f32(&qg)?;
        let qv = &qv[ql.start_offset()..ql.start_offset() + tokens * nh * hd];
        // Every cache's data, its first element and its per-head stride.
        let guards = kv_all
            .iter()
            .map(|(k, v)| {
                let (kg, kl) = k.storage_and_layout();
                let (vg, vl) = v.storage_and_layout();
                let ok = |s: &[usize]| s[1] == hd && s[2] == 1;
                if !ok(kl.stride()) || !ok(vl.stride()) {
                    candle_core::bail!("attention: unexpected KV cache layout");
                }
                Ok((
                    kg,
                    kl.start_offset(),
                    kl.stride()[0],
                    vg,
                    vl.start_offset(),
                    vl.stride()[0],
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let views = guards
            .iter()
            .map(|(kg, k0, ks, vg, v0, vs)| {
                Ok(CacheView {
                    k: &cpu_f32(kg)?[*k0..],
                    v: &cpu_f32(vg)?[*v0..],
                    k_head_stride: *ks,
                    v_head_stride: *vs,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = vec![0f32; tokens * nh * hd];
        let out_p = OutPtr(out.as_mut_ptr());
        let (scale, rep) = (self.scale as f32, nh / nkv);
        let work: usize = blocks
            .iter()
            .map(|b| b.rows * (b.seen + b.rows) * nh * hd)
            .sum();
        par_ranges(blocks.len(), work, |items| {
            SCORES.with_borrow_mut(|scores| {
                for b in &blocks[items] {
                    let c = &views[b.seq];
                    for h in 0..nh {
                        let g = h / rep;
                        let keys = b.seen + b.rows - 1; // seen by the block's last row
                        let kh = &c.k[g * c.k_head_stride..g * c.k_head_stride + keys * hd];
                        let vh = &c.v[g * c.v_head_stride..g * c.v_head_stride + keys * hd];
                        let q0 = b.row * nh * hd + h * hd;
                        if b.rows == 1 {
                            // SAFETY: this block's output rows are written by this worker only.
                            let o = unsafe { std::slice::from_raw_parts_mut(out_p.at(q0), hd) };
                            attend_row(&qv[q0..q0 + hd], kh, vh, scale, scores, o);
                        } else {
                            // SAFETY: as above; q rows b.row.. lie inside `qv`.
                            unsafe {
                                attend_block(
                                    &qv[q0..],
                                    nh * hd,
                                    kh,
                                    vh,
                                    hd,
                                    *b,
                                    scale,
                                    scores,
                                    out_p.at(q0),
                                )
                            };
                        }
                    }
                }
            })
        });
        drop(views);
        drop(guards);
        drop(qg);
        Tensor::from_vec(out, (tokens, nh * hd), q.device())
    }
}

/// Query rows per attention work item: at most QUERY_BLOCK · keys scores per thread.
const QUERY_BLOCK: usize = 32;

/// Consecutive query rows of one sequence: packed rows `row..row + rows`; row `row + r`
/// sees `seen + r` keys.
#[derive(Clone, Copy)]
struct QueryBlock {
    seq: usize,
    row: usize,
    rows: usize,
    seen: usize,
}

/// Causal attention of one head for a block of query rows, as two gemms with the softmax
/// between: `q` the block's first query (rows `q_stride` apart), `k`/`v` [keys, hd] with
/// keys = what the last row sees; each row's scores past its own last key are zeroed, so
/// it ignores the keys of later rows. Writes `out` rows `q_stride` apart.
///
/// # Safety
/// `q` holds `(b.rows − 1)·q_stride + hd` values; `out` is valid for the same extent and
/// written by this caller only.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_block(
    q: &[f32],
    q_stride: usize,
    k: &[f32],
    v: &[f32],
    hd: usize,
    b: QueryBlock,
    scale: f32,
    scores: &mut Vec<f32>,
    out: *mut f32,
) {
    let keys = b.seen + b.rows - 1;
    scores.clear();
    scores.resize(b.rows * keys, 0.0);
    // SAFETY (both): operands as documented; `scores` holds rows·keys values.
    unsafe {
        // s [rows, keys] = scale · q [rows, hd] · kᵀ [hd, keys]
        let dims = (b.rows, keys, hd);
        gemm_rows(
            dims,
            scores.as_mut_ptr(),
            keys,
            q.as_ptr(),
            q_stride,
            k.as_ptr(),
            (1, hd),
            scale,
        );
    }
    for (r, row) in scores.chunks_exact_mut(keys).enumerate() {
        let (live, masked) = row.split_at_mut(b.seen + r);
        softmax_in_place(live, 1.0);
        masked.fill(0.0);
    }
    unsafe {
        // out [rows, hd] = p [rows, keys] · v [keys, hd]
        let dims = (b.rows, hd, keys);
        gemm_rows(
            dims,
            out,
            q_stride,
            scores.as_ptr(),
            keys,
            v.as_ptr(),
            (hd, 1),
            1.0,
        );
    }
}

/// One sequence's K/V of one layer as borrowed data: head g's rows of `hd` values start at
/// `g * head_stride`.
struct CacheView<'a> {
    k: &'a [f32],
    v: &'a [f32],
    k_head_stride: usize,
    v_head_stride: usize,
}

dispatch! {
    /// One query head against its keys: `q` [hd], `k`/`v` [L, hd] row-major. Writes
    /// softmax(q·kᵀ·scale)·v into `out` [hd]; `scores` is scratch space.
    fn attend_row(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32]
    ) {
        let hd = q.len();
        scores.clear();
        scores.extend(k.chunks_exact(hd).map(|kr| dot(kr, q) * scale));
        softmax_in_place(scores, 1.0);
        out.fill(0.0);
        for (p, vr) in scores.iter().zip(v.chunks_exact(hd)) {
            for (o, x) in out.iter_mut().zip(vr) {
                *o += p * x;
            }
        }
    }
}

/// Σ a·b with independent lane accumulators, so the loop vectorizes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for j in 0..L {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + ar.iter().zip(br).map(|(x, y)| x * y).sum::<f32>()
}

fn cpu_f32(s: &Storage) -> Result<&[f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
        _ => candle_core::bail!("attention: expected CPU f32 data"),
    }
}

/// Attention output [kv, rep*len, hd] (= [heads, len, hd]) as token rows [len, heads*hd].
fn heads_to_rows(out: &Tensor, (nh, len, hd): (usize, usize, usize)) -> Result<Tensor> {
    out.reshape((nh, len, hd))?
        .transpose(0, 1)?
        .reshape((len, nh * hd))
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

    /// A 4-head, 2-KV-head attention layer with random weights, on CPU.
    fn tiny_attention() -> Result<(Attention, Device)> {
        let dev = Device::Cpu;
        let cfg: NemotronHConfig = serde_json::from_str(
            r#"{"hidden_size": 32, "intermediate_size": 8, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 8, "mamba_num_heads": 1,
                "mamba_head_dim": 1, "ssm_state_size": 1}"#,
        )
        .map_err(candle_core::Error::wrap)?;
        // The VarMap creates its variables as zeros (every output would be 0): fill them
        // with random BF16-exact values, then build the layer again from them.
        let vm = VarMap::new();
        Attention::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        for var in vm.all_vars() {
            let r = Tensor::randn(0f32, 0.5, var.shape(), &dev)?;
            var.set(&r.to_dtype(DType::BF16)?.to_dtype(var.dtype())?)?;
        }
        let attn = Attention::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        Ok((attn, dev))
    }

    #[test]
    fn decode_with_cache_matches_full_causal_attention() -> Result<()> {
        let (attn, dev) = tiny_attention()?;
        let t = 45; // two query blocks
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
        assert!(rel_err(&full, &r)? < 1e-5);

        // Prefill 3, then decode one token at a time (cache grows past its first capacity too).
        let mut c = KvCache::new();
        let mut parts = vec![attn.forward(&x.narrow(0, 0, 3)?, &[3], &mut [&mut c])?];
        for i in 3..t {
            parts.push(attn.forward(&x.narrow(0, i, 1)?, &[1], &mut [&mut c])?);
        }
        let inc = Tensor::cat(&parts, 0)?;
        assert!(rel_err(&inc, &full)? < 1e-5);
        assert_eq!(c.len(), t);
        Ok(())
    }

    #[test]
    fn fused_cpu_path_matches_the_per_sequence_path() -> Result<()> {
        let (fused, dev) = tiny_attention()?;
        let mut generic = fused.clone();
        generic.fused_cpu = false;
        // Three sequences with different cached lengths (one past a capacity doubling).
        let mut caches: Vec<KvCache> = Vec::new();
        for len in [1, 17, 5] {
            let mut c = KvCache::new();
            generic.forward(
                &Tensor::randn(0f32, 1.0, (len, 32), &dev)?,
                &[len],
                &mut [&mut c],
            )?;
            caches.push(c);
        }
        let mut copies = caches.clone();
        // Decode steps, then a mixed step: prefill chunks of several tokens packed with a
        // decode token, on top of the cached prefixes.
        for lens in [[1, 1, 1], [1, 1, 1], [4, 1, 9]] {
            let t: usize = lens.iter().sum();
            let x = Tensor::randn(0f32, 1.0, (t, 32), &dev)?;
            let mut a: Vec<&mut KvCache> = caches.iter_mut().collect();
            let mut b: Vec<&mut KvCache> = copies.iter_mut().collect();
            let yf = fused.forward(&x, &lens, &mut a)?;
            let yg = generic.forward(&x, &lens, &mut b)?;
            assert_eq!(yf.dims(), &[t, 32]);
            assert!(rel_err(&yf, &yg)? < 1e-5, "lens {lens:?}");
        }
        assert_eq!(caches[1].len(), 20);
        assert_eq!(caches[2].len(), 16);
        Ok(())
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Largest difference relative to the largest value of `b` (at least 1).
    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        Ok(max_abs(a, b)? / scale)
    }
}
