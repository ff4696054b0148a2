//! NemotronH Mamba2 mixer (model.md §2.5): in_proj → causal depthwise conv + SiLU → SSD
//! (chunked for prefill, single-step recurrence for decode) → grouped gated RMSNorm →
//! out_proj. Everything after in_proj runs in f32; the SSM state is f32.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::NemotronHConfig;
use super::linear::Linear;
use super::norm::GatedRmsNorm;
use super::state::{MambaPool, MambaState, cat_rows};
use crate::kernels;

/// CPU kernels, including the per-row decode math other backends can check against.
pub(crate) mod cpu;

#[derive(Debug, Clone)]
pub struct Mamba2 {
    in_proj: Linear,
    out_proj: Linear,
    /// Depthwise conv taps, [K, conv_dim] f32: row k multiplies input t−(K−1)+k.
    conv_w: Tensor,
    /// [conv_dim] f32.
    conv_b: Option<Tensor>,
    /// [heads] f32.
    dt_bias: Tensor,
    /// A = −exp(A_log), [heads] f32, precomputed at load.
    a: Tensor,
    /// D skip, [heads, 1] f32.
    d: Tensor,
    norm: GatedRmsNorm,
    /// Upper-triangular ones [Q, Q] (cumsum as a matmul) and the causal mask [Q, Q]
    /// (0 on/below the diagonal, −inf above), cut to the chunk length as needed.
    triu: Tensor,
    mask: Tensor,
    dims: MambaDims,
    dt_limit: (f64, f64),
    /// On CPU in f32, decode through the fused step ([`cpu::decode`]) and prefill through
    /// the kernels' CPU twins (a token scan: no [L, L] intermediates); tests turn it off.
    fused_cpu: bool,
    /// Run decode and prefill through [`crate::kernels`] (on CUDA; tests also on CPU, where
    /// the kernels' CPU twins run).
    device_kernels: bool,
}

/// Most tokens of one sequence the CPU prefill runs through conv, scan and norm at a time.
const CPU_PREFILL_PIECE: usize = 128;

/// Mamba2 sizes.
#[derive(Debug, Clone, Copy)]
pub struct MambaDims {
    pub heads: usize,
    pub head_dim: usize,
    pub state: usize,
    pub groups: usize,
    pub conv_kernel: usize,
    pub chunk: usize,
}

impl MambaDims {
    pub fn from_config(cfg: &NemotronHConfig) -> Self {
        MambaDims {
            heads: cfg.mamba_num_heads,
            head_dim: cfg.mamba_head_dim,
            state: cfg.ssm_state_size,
            groups: cfg.n_groups,
            conv_kernel: cfg.conv_kernel,
            chunk: cfg.chunk_size,
        }
    }
    pub fn d_inner(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn conv_dim(&self) -> usize {
        self.d_inner() + 2 * self.groups * self.state
    }
}

impl Mamba2 {
    pub fn new(cfg: &NemotronHConfig, vb: VarBuilder) -> Result<Self> {
        let dims = MambaDims::from_config(cfg);
        let (h, di, cd, k) = (
            cfg.hidden_size,
            dims.d_inner(),
            dims.conv_dim(),
            dims.conv_kernel,
        );
        let in_dim = di + cd + dims.heads; // z | xBC | dt
        let f32vb = vb.to_dtype(DType::F32);
        let conv_w = f32vb
            .get((cd, 1, k), "conv1d.weight")?
            .reshape((cd, k))?
            .t()?
            .contiguous()?;
        let conv_b = if cfg.use_conv_bias {
            Some(f32vb.get(cd, "conv1d.bias")?)
        } else {
            None
        };
        let a = f32vb.get(dims.heads, "A_log")?.exp()?.neg()?;
        let dev = vb.device();
        let q = dims.chunk;
        Ok(Mamba2 {
            in_proj: Linear::new(h, in_dim, cfg.use_bias, vb.pp("in_proj"))?,
            out_proj: Linear::new(di, h, cfg.use_bias, vb.pp("out_proj"))?,
            conv_w,
            conv_b,
            dt_bias: f32vb.get(dims.heads, "dt_bias")?,
            a,
            d: f32vb.get(dims.heads, "D")?.reshape((dims.heads, 1))?,
            norm: GatedRmsNorm::new(
                di,
                di / dims.groups,
                cfg.layer_norm_epsilon,
                f32vb.pp("norm"),
            )?,
            triu: Tensor::triu2(q, DType::F32, dev)?,
            mask: causal_log_mask(q, dev)?,
            dims,
            dt_limit: cfg.time_step_limit,
            fused_cpu: true,
            device_kernels: vb.device().is_cuda(),
        })
    }

    pub fn dims(&self) -> MambaDims {
        self.dims
    }

    /// `x`: [T, hidden] (normalized block input), the sequences of `batch` packed back to
    /// back; their states are rows of `pool` (updated in place). Returns [T, hidden].
    pub fn forward(&self, x: &Tensor, batch: &MambaBatch, pool: &MambaPool) -> Result<Tensor> {
        let proj = self.in_proj.forward(x)?; // [T, di + cd + H]
        let y = match &batch.decode {
            DecodeRows::All => self.decode_step(&proj, pool, &batch.slots_t)?,
            mixed => {
                let y_dec = match mixed {
                    DecodeRows::Some { rows, slots } => {
                        Some(self.decode_step(&proj.index_select(rows, 0)?, pool, slots)?)
                    }
                    _ => None,
                };
                let (mut parts, mut start, mut j) = (Vec::new(), 0, 0);
                for (&len, &slot) in batch.seq_lens.iter().zip(&batch.slots) {
                    if len == 1
                        && let Some(y_dec) = &y_dec
                    {
                        parts.push(y_dec.narrow(0, j, 1)?);
                        j += 1;
                    } else {
                        parts.push(self.prefill(&proj.narrow(0, start, len)?, pool, slot)?);
                    }
                    start += len;
                }
                cat_rows(parts)?
            }
        }; // [T, di] f32
        self.out_proj.forward(&y.to_dtype(x.dtype())?)
    }

    /// The decode step of B sequences of one token each — the per-layer entry a device
    /// backend replaces. `proj`: [B, di + cd + H] in_proj output (model dtype), `slots`: [B]
    /// u32 pool rows (distinct). Advances each slot's conv window and SSM state in place and
    /// returns y [B, di] f32 after the gated RMSNorm (out_proj not applied).
    pub fn decode_step(&self, proj: &Tensor, pool: &MambaPool, slots: &Tensor) -> Result<Tensor> {
        if self.fused_cpu_applies(proj) {
            cpu::decode(self, proj, pool, slots)
        } else if self.device_kernels {
            self.decode_kernels(proj, pool, slots)
        } else {
            self.decode_generic(proj, pool, slots)
        }
    }

    fn fused_cpu_applies(&self, proj: &Tensor) -> bool {
        self.fused_cpu && proj.device().is_cpu() && proj.dtype() == DType::F32
    }

    /// [`Mamba2::decode_step`] with the device kernels of [`crate::kernels`]: the conv
    /// window and the SSM state are updated in place in the slots' pool rows, reading the
    /// in_proj output (model dtype) without copies.
    fn decode_kernels(&self, proj: &Tensor, pool: &MambaPool, slots: &Tensor) -> Result<Tensor> {
        let d = self.dims;
        let (di, cd, gn) = (d.d_inner(), d.conv_dim(), d.groups * d.state);
        let xc = kernels::conv1d_update(
            &pool.conv,
            &proj.narrow(1, di, cd)?,
            slots,
            &self.conv_w,
            self.conv_b.as_ref(),
        )?; // [B, cd] f32, SiLU applied
        let y = kernels::selective_state_update(
            &pool.ssm,
            &xc.narrow(1, 0, di)?,
            &xc.narrow(1, di, gn)?,
            &xc.narrow(1, di + gn, gn)?,
            &proj.narrow(1, di + cd, d.heads)?,
            &self.dt_bias,
            &self.a,
            &self.d.reshape(d.heads)?,
            (self.dt_limit.0 as f32, self.dt_limit.1 as f32),
            slots,
        )?;
        self.kernel_norm(&y, &proj.narrow(1, 0, di)?)
    }

    /// Gated RMSNorm through [`kernels::gated_rms_norm`].
    fn kernel_norm(&self, y: &Tensor, z: &Tensor) -> Result<Tensor> {
        kernels::gated_rms_norm(
            y,
            z,
            self.norm.weight(),
            self.norm.group_size(),
            self.norm.eps(),
        )
    }

    /// dt = softplus(dt_raw + dt_bias), clamped only to a non-trivial time_step_limit.
    fn dt(&self, dt_raw: &Tensor) -> Result<Tensor> {
        let dt = softplus(&dt_raw.to_dtype(DType::F32)?.broadcast_add(&self.dt_bias)?)?;
        let (lo, hi) = self.dt_limit;
        let dt = if lo > 0.0 { dt.maximum(lo as f32)? } else { dt };
        if hi.is_finite() {
            dt.minimum(hi as f32)
        } else {
            Ok(dt)
        }
    }

    /// (z, xBC f32, dt f32) of in_proj output rows.
    fn split_proj(&self, proj: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (di, cd) = (self.dims.d_inner(), self.dims.conv_dim());
        Ok((
            proj.narrow(1, 0, di)?,
            proj.narrow(1, di, cd)?.to_dtype(DType::F32)?,
            self.dt(&proj.narrow(1, di + cd, self.dims.heads)?)?,
        ))
    }

    /// Gated RMSNorm of y [T, di] f32 with z [T, di].
    fn gated_norm(&self, y: &Tensor, z: &Tensor) -> Result<Tensor> {
        if y.device().is_cpu() && z.dtype() == DType::F32 {
            cpu::gated_norm_cpu(y, z, &self.norm)
        } else {
            self.norm.forward(y, z)
        }
    }

    /// One sequence, several tokens: `proj` [L, di + cd + H]. Its state in `slot` is
    /// advanced in place on CPU; elsewhere it is copied out, run through the chunked scan and
    /// written back. Returns y [L, di] f32.
    fn prefill(&self, proj: &Tensor, pool: &MambaPool, slot: u32) -> Result<Tensor> {
        if self.fused_cpu_applies(proj) {
            return cpu::prefill(self, proj, pool, slot, CPU_PREFILL_PIECE);
        }
        self.prefill_one(proj, pool, slot)
    }

    /// [`Mamba2::prefill`] through the device kernels or the candle-op path.
    fn prefill_one(&self, proj: &Tensor, pool: &MambaPool, slot: u32) -> Result<Tensor> {
        if self.device_kernels {
            return self.prefill_kernels(proj, pool, slot);
        }
        let d = self.dims;
        let l = proj.dim(0)?;
        let (z, xbc, dt) = self.split_proj(proj)?;
        let st = pool.read(slot as usize)?;
        let (xbc, conv) = if xbc.device().is_cpu() {
            cpu::conv1d_silu_cpu(&xbc, &st.conv, &self.conv_w, self.conv_b.as_ref())?
        } else {
            let (y, conv) = causal_conv1d(&xbc, &st.conv, &self.conv_w, self.conv_b.as_ref())?;
            (candle_nn::ops::silu(&y)?, conv)
        };
        let (x, b, c) = split_xbc(&xbc, d)?; // [L,H,P], [L,G,N], [L,G,N]
        let (y, ssm) = ssd_chunked(
            &x, &b, &c, &dt, &self.a, &st.ssm, d.chunk, &self.triu, &self.mask,
        )?;
        pool.write(slot as usize, &MambaState { conv, ssm })?;
        let y = (y + x.broadcast_mul(&self.d)?)?; // D skip
        self.gated_norm(&y.reshape((l, d.d_inner()))?, &z)
    }

    /// [`Mamba2::prefill`] with the device kernels: conv and scan read the in_proj output and
    /// the slot's state, which is written back in place.
    fn prefill_kernels(&self, proj: &Tensor, pool: &MambaPool, slot: u32) -> Result<Tensor> {
        let d = self.dims;
        let (l, di, cd) = (proj.dim(0)?, d.d_inner(), d.conv_dim());
        let st = pool.read(slot as usize)?;
        let (xc, conv) = kernels::conv1d_prefill(
            &proj.narrow(1, di, cd)?,
            &st.conv,
            &self.conv_w,
            self.conv_b.as_ref(),
        )?;
        let dt = self.dt(&proj.narrow(1, di + cd, d.heads)?)?; // [L, H] f32
        let (x, b, c) = split_xbc(&xc, d)?;
        let (y, ssm) = kernels::ssd_scan(
            &x.contiguous()?,
            &dt,
            &self.a,
            &b.contiguous()?,
            &c.contiguous()?,
            &st.ssm,
            d.chunk,
        )?;
        pool.write(slot as usize, &MambaState { conv, ssm })?;
        let y = (y + x.broadcast_mul(&self.d)?)?; // D skip
        self.kernel_norm(&y.reshape((l, di))?, &proj.narrow(1, 0, di)?)
    }

    /// [`Mamba2::decode_step`] with candle ops on any device: gather the slots' states,
    /// run the recurrence once for the batch, scatter the new states back in place.
    fn decode_generic(&self, proj: &Tensor, pool: &MambaPool, slots: &Tensor) -> Result<Tensor> {
        let d = self.dims;
        let bsz = slots.dim(0)?;
        let (z, xbc, dt) = self.split_proj(proj)?;
        let conv = pool.conv.index_select(slots, 0)?; // [B, K-1, cd]
        let ssm = pool.ssm.index_select(slots, 0)?; // [B, H, P, N]
        // Conv over the window [B, K, cd]: K multiply-adds along the window axis.
        let window = Tensor::cat(&[&conv, &xbc.unsqueeze(1)?], 1)?;
        let mut xc = window.broadcast_mul(&self.conv_w)?.sum(1)?;
        if let Some(bias) = &self.conv_b {
            xc = xc.broadcast_add(bias)?;
        }
        let xc = candle_nn::ops::silu(&xc)?;
        let (x, b, c) = split_xbc(&xc, d)?;
        let (y, ssm) = ssm_step(&x, &b, &c, &dt, &self.a, &ssm)?;
        let y = (y + x.broadcast_mul(&self.d)?)?;
        scatter_rows(&pool.conv, slots, &window.narrow(1, 1, d.conv_kernel - 1)?)?;
        scatter_rows(&pool.ssm, slots, &ssm)?;
        self.gated_norm(&y.reshape((bsz, d.d_inner()))?, &z)
    }
}

/// `pool[slots[i]] = rows[i]` in place, for a contiguous pool [S, ...] and rows [B, ...].
/// candle's scatter takes one index per element, so this materializes a [B, row] u32 index
/// (as large as the rows themselves): fine for the generic path, which a device kernel that
/// updates the slots in place replaces.
fn scatter_rows(pool: &Tensor, slots: &Tensor, rows: &Tensor) -> Result<()> {
    let (s, b) = (pool.dim(0)?, slots.dim(0)?);
    let row = pool.elem_count() / s;
    // scatter_set wants one index per element (contiguous), the slot repeated along the row.
    let index = slots
        .reshape((b, 1))?
        .broadcast_as((b, row))?
        .contiguous()?;
    pool.reshape((s, row))?
        .scatter_set(&index, &rows.contiguous()?.reshape((b, row))?, 0)
}

/// Which packed rows are decode steps (one token) in a forward pass.
#[derive(Debug)]
enum DecodeRows {
    /// Every sequence decodes: the whole batch is one decode step.
    All,
    /// No sequence decodes.
    None,
    /// Some do: their packed rows [D] u32 and slots [D] u32 on the device.
    Some { rows: Tensor, slots: Tensor },
}

/// The packed batch as the Mamba layers see it, built once per forward pass.
#[derive(Debug)]
pub struct MambaBatch {
    seq_lens: Vec<usize>,
    slots: Vec<u32>,
    /// `slots` on the device, [B] u32.
    slots_t: Tensor,
    decode: DecodeRows,
}

impl MambaBatch {
    /// Sequence i has `seq_lens[i]` packed tokens and its state in pool row `slots[i]`.
    pub fn new(seq_lens: &[usize], slots: &[u32], dev: &Device) -> Result<Self> {
        if seq_lens.len() != slots.len() {
            candle_core::bail!(
                "{} sequence lengths for {} slots",
                seq_lens.len(),
                slots.len()
            );
        }
        let (mut rows, mut dec_slots, mut start) = (Vec::new(), Vec::new(), 0u32);
        for (&len, &slot) in seq_lens.iter().zip(slots) {
            if len == 1 {
                rows.push(start);
                dec_slots.push(slot);
            }
            start += len as u32;
        }
        let decode = if rows.len() == seq_lens.len() {
            DecodeRows::All
        } else if rows.is_empty() {
            DecodeRows::None
        } else {
            DecodeRows::Some {
                rows: Tensor::new(rows.as_slice(), dev)?,
                slots: Tensor::new(dec_slots.as_slice(), dev)?,
            }
        };
        Ok(MambaBatch {
            seq_lens: seq_lens.to_vec(),
            slots: slots.to_vec(),
            slots_t: Tensor::new(slots, dev)?,
            decode,
        })
    }
}

/// Matmul of possibly strided views: candle's CPU gemm takes any row/column strides, the
/// CUDA path wants leading dimensions it can hand to cuBLAS, so copy there.
fn mm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() {
        a.matmul(b)
    } else {
        a.contiguous()?.matmul(&b.contiguous()?)
    }
}

/// softplus(x) = max(x, 0) + log(1 + exp(−|x|)) (stable for large |x|).
fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?
}

/// [Q, Q]: 0 where s <= l, −inf where s > l.
fn causal_log_mask(q: usize, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..q)
        .flat_map(|l| (0..q).map(move |s| if s > l { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (q, q), dev)
}

/// Split post-conv `xBC` [T, conv_dim] into x [T, H, P], B [T, G, N], C [T, G, N].
fn split_xbc(xbc: &Tensor, d: MambaDims) -> Result<(Tensor, Tensor, Tensor)> {
    let t = xbc.dim(0)?;
    let (di, gn) = (d.d_inner(), d.groups * d.state);
    let x = xbc.narrow(1, 0, di)?.reshape((t, d.heads, d.head_dim))?;
    let b = xbc.narrow(1, di, gn)?.reshape((t, d.groups, d.state))?;
    let c = xbc
        .narrow(1, di + gn, gn)?
        .reshape((t, d.groups, d.state))?;
    Ok((x, b, c))
}

/// Causal depthwise conv1d over one sequence, continuing from `state`.
/// `x`: [L, C] pre-conv inputs, `state`: [K−1, C] (previous inputs, oldest first),
/// `w`: [K, C], `b`: [C]. Returns (conv output before activation [L, C], new state [K−1, C]).
/// Done as K shifted multiply-adds: candle's grouped conv1d would run one conv per channel.
pub fn causal_conv1d(
    x: &Tensor,
    state: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (l, _) = x.dims2()?;
    let k = w.dim(0)?;
    let padded = Tensor::cat(&[state, x], 0)?; // [K-1+L, C]
    let mut acc = padded.narrow(0, 0, l)?.broadcast_mul(&w.get(0)?)?;
    for j in 1..k {
        acc = (acc + padded.narrow(0, j, l)?.broadcast_mul(&w.get(j)?)?)?;
    }
    if let Some(b) = b {
        acc = acc.broadcast_add(b)?;
    }
    // Copy so the state does not keep the whole padded input alive.
    let new_state = padded.narrow(0, l, k - 1)?.copy()?;
    Ok((acc, new_state))
}

/// Chunked SSD scan (model.md §2.5.7) for one sequence, all f32.
/// `x`: [L, H, P], `b`/`c`: [L, G, N], `dt`: [L, H], `a`: [H] (= −exp(A_log)),
/// `state`: [H, P, N] initial state. Head h uses group h / (H/G).
/// Returns (y [L, H, P] without the D skip, final state [H, P, N]).
/// `triu`/`mask` are [Q', Q'] with Q' >= chunk (see [`Mamba2`]). The last chunk is simply
/// shorter instead of zero-padded (the result is identical).
/// Also used on CPU: a token-by-token scan with the state in L1 measured 2× slower (31.7 vs
/// 15–18 ms for 512 tokens of one `mid`-preset layer, 1 thread).
#[allow(clippy::too_many_arguments)]
pub fn ssd_chunked(
    x: &Tensor,
    b: &Tensor,
    c: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    state: &Tensor,
    chunk: usize,
    triu: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (l, h, p) = x.dims3()?;
    let (_, g, n) = b.dims3()?;
    let hg = h / g;
    let dtx = x.broadcast_mul(&dt.unsqueeze(2)?)?; // [L, H, P]
    let da = dt.broadcast_mul(a)?; // [L, H]
    let mut state = state.clone();
    let mut ys = Vec::with_capacity(l.div_ceil(chunk));
    let mut s0 = 0;
    while s0 < l {
        let q = chunk.min(l - s0);
        let triu_q = triu.narrow(0, 0, q)?.narrow(1, 0, q)?;
        let mask_q = mask.narrow(0, 0, q)?.narrow(1, 0, q)?;
        // Cumulative log-decay inside the chunk: acum[h, l] = Σ_{s<=l} dt_s·A_h. [H, q]
        let acum = mm(&da.narrow(0, s0, q)?.t()?, &triu_q)?;
        let dtx_c = dtx.narrow(0, s0, q)?; // [q, H, P]
        let bc = b.narrow(0, s0, q)?.transpose(0, 1)?; // [G, q, N]
        let cc = c.narrow(0, s0, q)?.transpose(0, 1)?; // [G, q, N]

        // Intra-chunk: Y_diag[l] = Σ_{s<=l} (C_l·B_s) exp(acum_l − acum_s) dt_s x_s.
        let decay = acum
            .unsqueeze(2)?
            .broadcast_sub(&acum.unsqueeze(1)?)?
            .broadcast_add(&mask_q)?
            .exp()?; // [H, q(l), q(s)]
        let cb = mm(&cc, &bc.transpose(1, 2)?)?; // [G, q, q]
        let m = decay
            .reshape((g, hg, q, q))?
            .broadcast_mul(&cb.unsqueeze(1)?)?
            .reshape((h, q, q))?;
        let y_diag = mm(&m, &dtx_c.transpose(0, 1)?)?; // [H, q, P]

        // Contribution of the incoming state: Y_off[l] = exp(acum_l) · (C_l · S_prev).
        let s_g = state.reshape((g, hg * p, n))?;
        let out_decay = acum
            .exp()?
            .reshape((g, hg, q))?
            .transpose(1, 2)?
            .unsqueeze(3)?; // [G, q, hg, 1]
        let y_off = mm(&cc, &s_g.transpose(1, 2)?)?
            .reshape((g, q, hg, p))? // [G, q, hg, P]
            .broadcast_mul(&out_decay)?
            .permute((1, 0, 2, 3))?
            .reshape((q, h, p))?;
        ys.push((y_diag.transpose(0, 1)? + y_off)?); // [q, H, P]

        // State at the chunk end: exp(acum_last) S_prev + Σ_s exp(acum_last − acum_s) dt_s x_s ⊗ B_s.
        let last = acum.narrow(1, q - 1, 1)?; // [H, 1]
        let w_s = last.broadcast_sub(&acum)?.exp()?; // [H, q]
        let xw = dtx_c
            .permute((1, 2, 0))?
            .broadcast_mul(&w_s.unsqueeze(1)?)?; // [H, P, q]
        let s_new = mm(&xw.reshape((g, hg * p, q))?, &bc)?.reshape((h, p, n))?;
        state = (state.broadcast_mul(&last.exp()?.unsqueeze(2)?)? + s_new)?;
        s0 += q;
    }
    let y = cat_rows(ys)?;
    Ok((y, state))
}

/// [`ssd_chunked`] with its helper matrices built for `chunk` (tests, benchmarks).
pub fn ssd_chunked_for(
    x: &Tensor,
    b: &Tensor,
    c: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    state: &Tensor,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    let dev = x.device();
    let triu = Tensor::triu2(chunk, DType::F32, dev)?;
    let mask = causal_log_mask(chunk, dev)?;
    ssd_chunked(x, b, c, dt, a, state, chunk, &triu, &mask)
}

/// One recurrence step (model.md §2.5.6) for B sequences, all f32.
/// `x`: [B, H, P], `b`/`c`: [B, G, N], `dt`: [B, H], `a`: [H], `state`: [B, H, P, N].
/// Returns (y [B, H, P] without the D skip, new state [B, H, P, N]).
pub fn ssm_step(
    x: &Tensor,
    b: &Tensor,
    c: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    state: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (bsz, h, p) = x.dims3()?;
    let (_, g, n) = b.dims3()?;
    let hg = h / g;
    let da = dt.broadcast_mul(a)?.exp()?.reshape((bsz, h, 1, 1))?;
    let dtx = x.broadcast_mul(&dt.unsqueeze(D::Minus1)?)?; // [B, H, P]
    // dt x ⊗ B with B shared by the hg heads of a group: [B, G, hg, P, N]
    let dbx = dtx
        .reshape((bsz, g, hg, p, 1))?
        .broadcast_mul(&b.reshape((bsz, g, 1, 1, n))?)?
        .reshape((bsz, h, p, n))?;
    let state = (state.broadcast_mul(&da)? + dbx)?;
    // y = S · C per group: [B, G, hg*P, N] @ [B, G, N, 1]
    let y = state
        .reshape((bsz, g, hg * p, n))?
        .matmul(&c.reshape((bsz, g, n, 1))?)?
        .reshape((bsz, h, p))?;
    Ok((y, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    struct Inputs {
        x: Tensor,
        b: Tensor,
        c: Tensor,
        dt: Tensor,
        a: Tensor,
        s0: Tensor,
    }

    fn inputs(l: usize, h: usize, p: usize, g: usize, n: usize, dev: &Device) -> Result<Inputs> {
        Ok(Inputs {
            x: Tensor::randn(0f32, 1.0, (l, h, p), dev)?,
            b: Tensor::randn(0f32, 1.0, (l, g, n), dev)?,
            c: Tensor::randn(0f32, 1.0, (l, g, n), dev)?,
            dt: softplus(&Tensor::randn(0f32, 1.0, (l, h), dev)?)?,
            a: Tensor::rand(0.5f32, 2.0, h, dev)?.neg()?,
            s0: Tensor::randn(0f32, 1.0, (h, p, n), dev)?,
        })
    }

    #[test]
    fn chunked_ssd_matches_step_recurrence() -> Result<()> {
        let dev = Device::Cpu;
        let (h, p, g, n) = (6, 4, 3, 5);
        for (l, chunk) in [(37, 8), (16, 16), (5, 8), (2, 1)] {
            let i = inputs(l, h, p, g, n, &dev)?;
            let triu = Tensor::triu2(chunk, DType::F32, &dev)?;
            let mask = causal_log_mask(chunk, &dev)?;
            let (y, s) = ssd_chunked(&i.x, &i.b, &i.c, &i.dt, &i.a, &i.s0, chunk, &triu, &mask)?;
            let mut st = i.s0.unsqueeze(0)?;
            let mut ys = Vec::new();
            for t in 0..l {
                let (yt, s2) = ssm_step(
                    &i.x.narrow(0, t, 1)?,
                    &i.b.narrow(0, t, 1)?,
                    &i.c.narrow(0, t, 1)?,
                    &i.dt.narrow(0, t, 1)?,
                    &i.a,
                    &st,
                )?;
                st = s2;
                ys.push(yt);
            }
            let y_ref = Tensor::cat(&ys, 0)?;
            let scale = y_ref
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?
                .max(1.0);
            assert!(
                max_abs(&y, &y_ref)? / scale < 1e-4,
                "y mismatch l={l} chunk={chunk}"
            );
            assert!(
                max_abs(&s, &st.squeeze(0)?)? < 1e-4,
                "state mismatch l={l} chunk={chunk}"
            );
        }
        Ok(())
    }

    #[test]
    fn step_matches_scalar_formula() -> Result<()> {
        let dev = Device::Cpu;
        let (h, p, g, n) = (4, 2, 2, 3);
        let i = inputs(1, h, p, g, n, &dev)?;
        let (y, s) = ssm_step(&i.x, &i.b, &i.c, &i.dt, &i.a, &i.s0.unsqueeze(0)?)?;
        let (x, b, c) = (
            i.x.to_vec3::<f32>()?,
            i.b.to_vec3::<f32>()?,
            i.c.to_vec3::<f32>()?,
        );
        let (dt, a, s0) = (
            i.dt.to_vec2::<f32>()?,
            i.a.to_vec1::<f32>()?,
            i.s0.to_vec3::<f32>()?,
        );
        let (y, s) = (y.to_vec3::<f32>()?, s.squeeze(0)?.to_vec3::<f32>()?);
        for hh in 0..h {
            let gg = hh / (h / g);
            let da = (dt[0][hh] * a[hh]).exp();
            for pp in 0..p {
                let mut yy = 0.0;
                for nn in 0..n {
                    let want = da * s0[hh][pp][nn] + dt[0][hh] * x[0][hh][pp] * b[0][gg][nn];
                    assert!((s[hh][pp][nn] - want).abs() < 1e-5);
                    yy += want * c[0][gg][nn];
                }
                assert!((y[0][hh][pp] - yy).abs() < 1e-4);
            }
        }
        Ok(())
    }

    /// Two pools with the same random states, slots 0..5.
    fn random_pools(d: MambaDims, dev: &Device) -> Result<(MambaPool, MambaPool)> {
        let a = MambaPool::zeros(5, d, dev)?;
        let b = MambaPool::zeros(5, d, dev)?;
        for s in 0..5 {
            let st = MambaState {
                conv: Tensor::randn(0f32, 1.0, (d.conv_kernel - 1, d.conv_dim()), dev)?,
                ssm: Tensor::randn(0f32, 1.0, (d.heads, d.head_dim, d.state), dev)?,
            };
            a.write(s, &st)?;
            b.write(s, &st)?;
        }
        Ok((a, b))
    }

    #[test]
    fn fused_cpu_matches_generic_path_on_the_pool() -> Result<()> {
        use crate::model::checkpoint::Checkpoint;
        use crate::model::config::CheckpointConfig;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny");
        let cfg = CheckpointConfig::load(&dir).map_err(candle_core::Error::wrap)?;
        let ckpt = Checkpoint::open(&dir).map_err(candle_core::Error::wrap)?;
        let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
        let fused = Mamba2::new(
            &cfg.model.llm_config,
            vb.pp("language_model.backbone.layers.0.mixer"),
        )?;
        let mut generic = fused.clone();
        generic.fused_cpu = false;
        let dev = Device::Cpu;
        let hidden = cfg.model.llm_config.hidden_size;
        let (pf, pg) = random_pools(fused.dims, &dev)?;
        // Out-of-order slots; slot 1 belongs to nobody and must not change.
        let untouched = pf.read(1)?;
        let slots = [3u32, 0, 4];
        let decode = MambaBatch::new(&[1, 1, 1], &slots, &dev)?;
        // A mixed step: slot 0 prefills 5 tokens while the others decode; then a prompt
        // longer than two CPU prefill pieces (the state carries across them).
        let mixed = MambaBatch::new(&[1, 5, 1], &slots, &dev)?;
        let long = 2 * CPU_PREFILL_PIECE + 7;
        let long_mixed = MambaBatch::new(&[1, long, 1], &slots, &dev)?;
        let schedule = [
            (&decode, 3),
            (&mixed, 7),
            (&decode, 3),
            (&long_mixed, long + 2),
            (&decode, 3),
        ];
        for (step, (batch, t)) in schedule.into_iter().enumerate() {
            let x = Tensor::randn(0f32, 1.0, (t, hidden), &dev)?;
            let yf = fused.forward(&x, batch, &pf)?;
            let yg = generic.forward(&x, batch, &pg)?;
            assert!(max_abs(&yf, &yg)? < 1e-4, "step {step}");
        }
        for s in 0..5 {
            let (a, b) = (pf.read(s)?, pg.read(s)?);
            assert!(max_abs(&a.ssm, &b.ssm)? < 1e-4, "ssm of slot {s}");
            assert!(max_abs(&a.conv, &b.conv)? < 1e-6, "conv of slot {s}");
        }
        let now = pf.read(1)?;
        assert_eq!(
            max_abs(&now.ssm, &untouched.ssm)? + max_abs(&now.conv, &untouched.conv)?,
            0.0
        );
        // A repeated or out-of-range slot is refused, not raced on.
        let x = Tensor::randn(0f32, 1.0, (2, hidden), &dev)?;
        for bad in [[2u32, 2], [0, 5]] {
            let batch = MambaBatch::new(&[1, 1], &bad, &dev)?;
            assert!(fused.forward(&x, &batch, &pf).is_err(), "{bad:?}");
        }
        Ok(())
    }

    /// The kernel path (CPU twins here; the CUDA kernels on a GPU) against the candle-op path.
    #[test]
    fn kernel_path_matches_generic_path_on_the_pool() -> Result<()> {
        use crate::model::checkpoint::Checkpoint;
        use crate::model::config::CheckpointConfig;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny");
        let cfg = CheckpointConfig::load(&dir).map_err(candle_core::Error::wrap)?;
        let ckpt = Checkpoint::open(&dir).map_err(candle_core::Error::wrap)?;
        let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
        let mut generic = Mamba2::new(
            &cfg.model.llm_config,
            vb.pp("language_model.backbone.layers.0.mixer"),
        )?;
        generic.fused_cpu = false;
        let mut kernel = generic.clone();
        kernel.device_kernels = true;
        let dev = Device::Cpu;
        let hidden = cfg.model.llm_config.hidden_size;
        let (pk, pg) = random_pools(generic.dims, &dev)?;
        let slots = [3u32, 0, 4];
        let decode = MambaBatch::new(&[1, 1, 1], &slots, &dev)?;
        let mixed = MambaBatch::new(&[1, 9, 1], &slots, &dev)?;
        for (step, (batch, t)) in [(&mixed, 11), (&decode, 3), (&decode, 3)]
            .into_iter()
            .enumerate()
        {
            let x = Tensor::randn(0f32, 1.0, (t, hidden), &dev)?;
            let yk = kernel.forward(&x, batch, &pk)?;
            let yg = generic.forward(&x, batch, &pg)?;
            assert!(max_abs(&yk, &yg)? < 1e-4, "step {step}");
        }
        for s in 0..5 {
            let (a, b) = (pk.read(s)?, pg.read(s)?);
            assert!(max_abs(&a.ssm, &b.ssm)? < 1e-4, "ssm of slot {s}");
            assert!(max_abs(&a.conv, &b.conv)? < 1e-6, "conv of slot {s}");
        }
        Ok(())
    }

    #[test]
    fn pooled_decode_matches_the_scalar_recurrence() -> Result<()> {
        use crate::kernels::cpu::{conv_update_row as conv_step_row, ssm_update_row};
        // One sequence, tiny sizes: the row kernels against ssm_step / causal_conv1d.
        let dev = Device::Cpu;
        let d = MambaDims {
            heads: 4,
            head_dim: 3,
            state: 5,
            groups: 2,
            conv_kernel: 4,
            chunk: 8,
        };
        let cd = d.conv_dim();
        let mut window: Vec<f32> = (0..3 * cd).map(|i| (i as f32 * 0.37).sin()).collect();
        let xbc: Vec<f32> = (0..cd).map(|i| (i as f32 * 0.11).cos()).collect();
        let w: Vec<f32> = (0..4 * cd).map(|i| (i as f32 * 0.07).sin()).collect();
        let mut xc = vec![0f32; cd];
        let (y_ref, st_ref) = causal_conv1d(
            &Tensor::from_slice(&xbc, (1, cd), &dev)?,
            &Tensor::from_slice(&window, (3, cd), &dev)?,
            &Tensor::from_slice(&w, (4, cd), &dev)?,
            None,
        )?;
        conv_step_row(&mut window, &xbc, &w, None, &mut xc);
        let xc_t = Tensor::from_slice(&xc, (1, cd), &dev)?;
        assert!(max_abs(&xc_t, &candle_nn::ops::silu(&y_ref)?)? < 1e-6);
        assert!(max_abs(&Tensor::from_slice(&window, (3, cd), &dev)?, &st_ref)? == 0.0);

        let (x, b, c) = split_xbc(&xc_t, d)?;
        let dt = Tensor::new(&[[0.3f32, 0.7, 1.1, 0.2]], &dev)?;
        let a = Tensor::new(&[-0.5f32, -1.0, -2.0, -0.1], &dev)?;
        let skip = [0.5f32, 1.0, -1.0, 2.0];
        let s0 = Tensor::randn(0f32, 1.0, (1, 4, 3, 5), &dev)?;
        let (y_ref, s_ref) = ssm_step(&x, &b, &c, &dt, &a, &s0)?;
        let y_ref = (y_ref + x.broadcast_mul(&Tensor::new(&skip, &dev)?.reshape((1, 4, 1))?)?)?;
        let mut state = s0.flatten_all()?.to_vec1::<f32>()?;
        let mut y = vec![0f32; 12];
        let di = d.d_inner();
        ssm_update_row(
            &mut state,
            &xc[..di],
            &xc[di..di + 10],
            &xc[di + 10..],
            &dt.flatten_all()?.to_vec1::<f32>()?,
            &a.to_vec1::<f32>()?,
            &skip,
            d.groups,
            &mut y,
        );
        assert!(max_abs(&Tensor::from_slice(&y, (1, 4, 3), &dev)?, &y_ref)? < 1e-5);
        assert!(max_abs(&Tensor::from_slice(&state, (1, 4, 3, 5), &dev)?, &s_ref)? < 1e-5);
        Ok(())
    }

    #[test]
    fn cpu_conv_and_norm_kernels_match_generic_ops() -> Result<()> {
        use super::cpu::{conv1d_silu_cpu, gated_norm_cpu};
        let dev = Device::Cpu;
        let (l, c, k) = (7, 6, 4);
        // A column slice of a wider matrix, like xBC inside the in_proj output.
        let wide = Tensor::randn(0f32, 1.0, (l, c + 5), &dev)?;
        let x = wide.narrow(1, 2, c)?;
        let w = Tensor::randn(0f32, 1.0, (k, c), &dev)?;
        let b = Tensor::randn(0f32, 1.0, c, &dev)?;
        let s0 = Tensor::randn(0f32, 1.0, (k - 1, c), &dev)?;
        let (y_ref, st_ref) = causal_conv1d(&x, &s0, &w, Some(&b))?;
        let (y, st) = conv1d_silu_cpu(&x, &s0, &w, Some(&b))?;
        assert!(max_abs(&y, &candle_nn::ops::silu(&y_ref)?)? < 1e-5);
        assert!(max_abs(&st, &st_ref)? < 1e-7);
        let (y2, st2) = conv1d_silu_cpu(&x.narrow(0, 0, 2)?, &s0, &w, None)?;
        let (y2r, st2r) = causal_conv1d(&x.narrow(0, 0, 2)?, &s0, &w, None)?;
        assert!(max_abs(&y2, &candle_nn::ops::silu(&y2r)?)? < 1e-5);
        assert!(max_abs(&st2, &st2r)? < 1e-7);

        let d = 8;
        let vb = VarBuilder::from_tensors(
            std::collections::HashMap::from([(
                "weight".to_string(),
                Tensor::randn(0f32, 1.0, d, &dev)?,
            )]),
            DType::F32,
            &dev,
        );
        let norm = GatedRmsNorm::new(d, 4, 1e-5, vb)?;
        let y = Tensor::randn(0f32, 1.0, (3, d), &dev)?;
        let z = Tensor::randn(0f32, 1.0, (3, d + 3), &dev)?.narrow(1, 1, d)?;
        assert!(max_abs(&gated_norm_cpu(&y, &z, &norm)?, &norm.forward(&y, &z)?)? < 1e-5);
        Ok(())
    }

    #[test]
    fn conv_prefill_with_state_matches_steps() -> Result<()> {
        let dev = Device::Cpu;
        let (l, ch, k) = (9, 5, 4);
        let x = Tensor::randn(0f32, 1.0, (l, ch), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (k, ch), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, ch, &dev)?;
        let state0 = Tensor::randn(0f32, 1.0, (k - 1, ch), &dev)?;
        // Two prefill calls (4 + 5 tokens) vs one token at a time.
        let (y1, s1) = causal_conv1d(&x.narrow(0, 0, 4)?, &state0, &w, Some(&bias))?;
        let (y2, s2) = causal_conv1d(&x.narrow(0, 4, 5)?, &s1, &w, Some(&bias))?;
        let y_pre = Tensor::cat(&[y1, y2], 0)?;
        let mut st = state0.clone();
        let mut ys = Vec::new();
        for t in 0..l {
            let (yt, s) = causal_conv1d(&x.narrow(0, t, 1)?, &st, &w, Some(&bias))?;
            st = s;
            ys.push(yt);
        }
        assert!(max_abs(&y_pre, &Tensor::cat(&ys, 0)?)? < 1e-5);
        assert!(max_abs(&s2, &st)? < 1e-6);
        // Explicit formula for t = 0: taps over [state0 rows 0..3, x0].
        let (xv, wv, sv, bv) = (
            x.to_vec2::<f32>()?,
            w.to_vec2::<f32>()?,
            state0.to_vec2::<f32>()?,
            bias.to_vec1::<f32>()?,
        );
        let yv = y_pre.to_vec2::<f32>()?;
        for cc in 0..ch {
            let want = bv[cc]
                + sv[0][cc] * wv[0][cc]
                + sv[1][cc] * wv[1][cc]
                + sv[2][cc] * wv[2][cc]
                + xv[0][cc] * wv[3][cc];
            assert!((yv[0][cc] - want).abs() < 1e-5);
        }
        Ok(())
    }
}
