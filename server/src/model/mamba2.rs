//! NemotronH Mamba2 mixer (model.md §2.5): in_proj → causal depthwise conv + SiLU → SSD
//! (chunked for prefill, single-step recurrence for decode) → grouped gated RMSNorm →
//! out_proj. Everything after in_proj runs in f32; the SSM state is f32.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::NemotronHConfig;
use super::linear::Linear;
use super::linear::{OutPtr, par_ranges};
use super::norm::GatedRmsNorm;
use super::state::{MambaState, cat_rows};

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
    /// Use [`Mamba2::decode_cpu`] for all-decode batches on CPU (tests turn it off).
    fused_cpu_decode: bool,
}

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
            fused_cpu_decode: true,
        })
    }

    pub fn dims(&self) -> MambaDims {
        self.dims
    }

    pub fn zero_state(&self, dev: &Device) -> Result<MambaState> {
        let d = self.dims;
        MambaState::zeros(
            d.conv_kernel,
            d.conv_dim(),
            d.heads,
            d.head_dim,
            d.state,
            dev,
        )
    }

    /// `x`: [T, hidden] (normalized block input), sequences packed back to back;
    /// `states[i]` is sequence i's state for this layer (updated). Returns [T, hidden].
    pub fn forward(
        &self,
        x: &Tensor,
        seq_lens: &[usize],
        states: &mut [&mut MambaState],
    ) -> Result<Tensor> {
        let d = self.dims;
        let (di, cd) = (d.d_inner(), d.conv_dim());
        let proj = self.in_proj.forward(x)?; // [T, di + cd + H]
        if self.fused_cpu_decode
            && seq_lens.iter().all(|&l| l == 1)
            && proj.device().is_cpu()
            && proj.dtype() == DType::F32
        {
            // Decode on CPU: conv, SSM step and gated norm in one pass per sequence.
            let y = self.decode_cpu(&proj, states)?;
            return self.out_proj.forward(&y);
        }
        let z = proj.narrow(1, 0, di)?;
        let xbc = proj.narrow(1, di, cd)?.to_dtype(DType::F32)?;
        let dt = self.dt(&proj.narrow(1, di + cd, d.heads)?)?; // [T, H] f32

        let y = if seq_lens.iter().all(|&l| l == 1) {
            self.decode(&xbc, &dt, states)?
        } else {
            let mut ys = Vec::with_capacity(seq_lens.len());
            let mut start = 0;
            for (&len, st) in seq_lens.iter().zip(states.iter_mut()) {
                let xbc_s = xbc.narrow(0, start, len)?;
                let dt_s = dt.narrow(0, start, len)?;
                ys.push(if len == 1 {
                    self.decode(&xbc_s, &dt_s, std::slice::from_mut(st))?
                } else {
                    self.prefill(&xbc_s, &dt_s, st)?
                });
                start += len;
            }
            cat_rows(ys)?
        }; // [T, di] f32
        let y = if y.device().is_cpu() && z.dtype() == DType::F32 {
            gated_norm_cpu(&y, &z, &self.norm)?
        } else {
            self.norm.forward(&y, &z)?
        };
        self.out_proj.forward(&y.to_dtype(x.dtype())?)
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

    /// One sequence, several tokens. `xbc`: [L, conv_dim] f32, `dt`: [L, H]. Returns y [L, di].
    fn prefill(&self, xbc: &Tensor, dt: &Tensor, st: &mut MambaState) -> Result<Tensor> {
        let d = self.dims;
        let l = xbc.dim(0)?;
        let (xbc, conv) = if xbc.device().is_cpu() {
            conv1d_silu_cpu(xbc, &st.conv, &self.conv_w, self.conv_b.as_ref())?
        } else {
            let (y, conv) = causal_conv1d(xbc, &st.conv, &self.conv_w, self.conv_b.as_ref())?;
            (candle_nn::ops::silu(&y)?, conv)
        };
        st.conv = conv;
        let (x, b, c) = split_xbc(&xbc, d)?; // [L,H,P], [L,G,N], [L,G,N]
        let (y, ssm) = ssd_chunked(
            &x, &b, &c, dt, &self.a, &st.ssm, d.chunk, &self.triu, &self.mask,
        )?;
        st.ssm = ssm;
        let y = (y + x.broadcast_mul(&self.d)?)?; // D skip
        y.reshape((l, d.d_inner()))
    }

    /// One token for each of B sequences. `xbc`: [B, conv_dim] f32, `dt`: [B, H].
    /// The states are stacked so the recurrence runs once for the batch. Returns y [B, di].
    fn decode(&self, xbc: &Tensor, dt: &Tensor, states: &mut [&mut MambaState]) -> Result<Tensor> {
        let d = self.dims;
        let bsz = states.len();
        let stack = |f: &dyn Fn(&MambaState) -> &Tensor| -> Result<Tensor> {
            if bsz == 1 {
                f(states[0]).unsqueeze(0)
            } else {
                Tensor::stack(&states.iter().map(|s| f(s)).collect::<Vec<_>>(), 0)
            }
        };
        let conv = stack(&|s| &s.conv)?; // [B, K-1, cd]
        let ssm = stack(&|s| &s.ssm)?; // [B, H, P, N]
        // Conv over the window [B, K, cd]: K multiply-adds along the window axis.
        let window = Tensor::cat(&[&conv, &xbc.unsqueeze(1)?], 1)?;
        let mut xc = window.broadcast_mul(&self.conv_w)?.sum(1)?;
        if let Some(bias) = &self.conv_b {
            xc = xc.broadcast_add(bias)?;
        }
        let xc = candle_nn::ops::silu(&xc)?;
        let (x, b, c) = split_xbc(&xc, d)?;
        let (y, ssm) = ssm_step(&x, &b, &c, dt, &self.a, &ssm)?;
        let y = (y + x.broadcast_mul(&self.d)?)?;
        let new_conv = window.narrow(1, 1, d.conv_kernel - 1)?;
        for (i, st) in states.iter_mut().enumerate() {
            st.conv = new_conv.get(i)?;
            st.ssm = ssm.get(i)?;
        }
        y.reshape((bsz, d.d_inner()))
    }
}

impl Mamba2 {
    /// CPU decode step for B sequences of one token: `proj` [B, di + cd + H] f32 (in_proj
    /// output). Does conv + SiLU, dt, the SSM recurrence with D skip and the gated RMSNorm in
    /// one pass over each sequence's state (the generic path needs ~30 candle ops per layer,
    /// whose dispatch costs more than the math at decode sizes). Sequences run in parallel.
    /// Returns [B, di] f32; the new states are rows of shared [B, ...] buffers.
    fn decode_cpu(&self, proj: &Tensor, states: &mut [&mut MambaState]) -> Result<Tensor> {
        let d = self.dims;
        let (di, cd, nh, p, n, k) = (
            d.d_inner(),
            d.conv_dim(),
            d.heads,
            d.head_dim,
            d.state,
            d.conv_kernel,
        );
        let (gn, hg) = (d.groups * n, nh / d.groups);
        let (bsz, dp) = (states.len(), di + cd + nh);
        let (conv_len, ssm_len) = ((k - 1) * cd, nh * p * n);
        let proj = proj.contiguous()?;
        let proj_v = CpuF32::new(&proj)?;
        let proj_v = proj_v.slice()?;
        if proj_v.len() != bsz * dp {
            candle_core::bail!(
                "mamba decode: in_proj output has {} values, expected {}",
                proj_v.len(),
                bsz * dp
            );
        }
        let conv_w = CpuF32::new(&self.conv_w)?; // [K, cd]
        let conv_w = conv_w.slice()?;
        let conv_b = self.conv_b.as_ref().map(CpuF32::new).transpose()?;
        let conv_b = conv_b.as_ref().map(|b| b.slice()).transpose()?;
        let (dt_bias, a, dskip) = (
            CpuF32::new(&self.dt_bias)?,
            CpuF32::new(&self.a)?,
            CpuF32::new(&self.d)?,
        );
        let (dt_bias, a, dskip) = (dt_bias.slice()?, a.slice()?, dskip.slice()?);
        let norm_w = CpuF32::new(self.norm.weight())?;
        let norm_w = norm_w.slice()?;
        let (gs, eps) = (self.norm.group_size(), self.norm.eps());
        let (lo, hi) = (self.dt_limit.0 as f32, self.dt_limit.1 as f32);

        // Borrow every sequence's old state (the guards stay on this thread).
        let conv_ts = states
            .iter()
            .map(|s| s.conv.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let ssm_ts = states
            .iter()
            .map(|s| s.ssm.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let conv_vs = conv_ts
            .iter()
            .map(CpuF32::new)
            .collect::<Result<Vec<_>>>()?;
        let ssm_vs = ssm_ts.iter().map(CpuF32::new).collect::<Result<Vec<_>>>()?;
        let conv_old = conv_vs
            .iter()
            .map(|v| v.slice())
            .collect::<Result<Vec<_>>>()?;
        let ssm_old = ssm_vs
            .iter()
            .map(|v| v.slice())
            .collect::<Result<Vec<_>>>()?;
        if conv_old.iter().any(|c| c.len() != conv_len)
            || ssm_old.iter().any(|s| s.len() != ssm_len)
        {
            candle_core::bail!("mamba decode: a sequence state has the wrong size");
        }

        let mut out = vec![0f32; bsz * di];
        let mut conv_new = vec![0f32; bsz * conv_len];
        let mut ssm_new = vec![0f32; bsz * ssm_len];
        let (out_p, conv_p, ssm_p) = (
            OutPtr(out.as_mut_ptr()),
            OutPtr(conv_new.as_mut_ptr()),
            OutPtr(ssm_new.as_mut_ptr()),
        );
        par_ranges(bsz, bsz * ssm_len * 3, |seqs| {
            let mut xc = vec![0f32; cd];
            for bi in seqs {
                // SAFETY: sequence bi's rows of the three outputs are written by this worker only.
                let (y, cs_new, s_new) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(out_p.at(bi * di), di),
                        std::slice::from_raw_parts_mut(conv_p.at(bi * conv_len), conv_len),
                        std::slice::from_raw_parts_mut(ssm_p.at(bi * ssm_len), ssm_len),
                    )
                };
                let row = &proj_v[bi * dp..(bi + 1) * dp];
                let (z, xbc, dt_raw) = (&row[..di], &row[di..di + cd], &row[di + cd..]);
                let (cs, s_old) = (conv_old[bi], ssm_old[bi]);
                // Conv over [state rows (oldest first), new input], bias, SiLU.
                for c in 0..cd {
                    let mut acc = conv_b.map_or(0.0, |b| b[c]);
                    for j in 0..k {
                        let v = if j + 1 < k { cs[j * cd + c] } else { xbc[c] };
                        acc += conv_w[j * cd + c] * v;
                    }
                    xc[c] = silu(acc);
                }
                // New conv state: the last K-1 inputs.
                if k > 1 {
                    cs_new[..conv_len - cd].copy_from_slice(&cs[cd..]);
                    cs_new[conv_len - cd..].copy_from_slice(xbc);
                }
                let (x, bm, cm) = (&xc[..di], &xc[di..di + gn], &xc[di + gn..]);
                // SSM step per head: S = exp(dt A) S + dt x ⊗ B_g;  y = S C_g + D x.
                for h in 0..nh {
                    let g = h / hg;
                    let dt = softplus_f32(dt_raw[h] + dt_bias[h]).max(lo).min(hi);
                    let da = (dt * a[h]).exp();
                    let (bg, cg) = (&bm[g * n..(g + 1) * n], &cm[g * n..(g + 1) * n]);
                    for pi in 0..p {
                        let xv = x[h * p + pi];
                        let dtx = dt * xv;
                        let base = (h * p + pi) * n;
                        let (so, sn) = (&s_old[base..base + n], &mut s_new[base..base + n]);
                        let mut acc = 0f32;
                        for j in 0..n {
                            let v = da * so[j] + dtx * bg[j];
                            sn[j] = v;
                            acc += v * cg[j];
                        }
                        y[h * p + pi] = acc + dskip[h] * xv;
                    }
                }
                // Gated RMSNorm: g = y·silu(z), normalized per group of `gs`, times the weight.
                for (gy, gz) in y.chunks_mut(gs).zip(z.chunks(gs)) {
                    let mut ss = 0f32;
                    for (v, &zz) in gy.iter_mut().zip(gz) {
                        *v *= silu(zz);
                        ss += *v * *v;
                    }
                    let r = 1.0 / (ss / gs as f32 + eps).sqrt();
                    gy.iter_mut().for_each(|v| *v *= r);
                }
                for (v, w) in y.iter_mut().zip(norm_w) {
                    *v *= w;
                }
            }
        });
        let dev = proj.device();
        let conv_all = Tensor::from_vec(conv_new, (bsz, k - 1, cd), dev)?;
        let ssm_all = Tensor::from_vec(ssm_new, (bsz, nh, p, n), dev)?;
        for (bi, st) in states.iter_mut().enumerate() {
            st.conv = conv_all.get(bi)?;
            st.ssm = ssm_all.get(bi)?;
        }
        Tensor::from_vec(out, (bsz, di), dev)
    }
}

/// Row-major f32 data of a 2-D CPU tensor whose rows may be strided (e.g. a column slice of
/// the in_proj output): (data from the first element, row stride).
fn rows_f32(t: &Tensor) -> Result<(candle_core::StorageRef<'_>, usize, usize)> {
    let (guard, layout) = t.storage_and_layout();
    let stride = layout.stride();
    if t.rank() != 2 || (stride[1] != 1 && t.dim(1)? > 1) {
        candle_core::bail!("expected a 2-D tensor with unit column stride, got {layout:?}");
    }
    Ok((guard, layout.start_offset(), stride[0]))
}

fn storage_f32(guard: &candle_core::Storage) -> Result<&[f32]> {
    match guard {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => Ok(v),
        _ => candle_core::bail!("expected CPU f32 data"),
    }
}

/// CPU causal depthwise conv + bias + SiLU in one pass (same math as [`causal_conv1d`]
/// followed by SiLU). `x`: [L, C] f32 (rows may be strided), `state`: [K−1, C].
/// Returns (SiLU(conv) [L, C], new state [K−1, C]).
fn conv1d_silu_cpu(
    x: &Tensor,
    state: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (l, c) = x.dims2()?;
    let k = w.dim(0)?;
    let state = state.contiguous()?;
    let (xg, x0, xs) = rows_f32(x)?;
    let xv = storage_f32(&xg)?;
    let sv = CpuF32::new(&state)?;
    let sv = sv.slice()?;
    let wv = CpuF32::new(w)?;
    let wv = wv.slice()?;
    let bv = b.map(CpuF32::new).transpose()?;
    let bv = bv.as_ref().map(|b| b.slice()).transpose()?;
    // Row i of the padded input [state; x], i in 0..K-1+L.
    let row = |i: usize| -> &[f32] {
        if i + 1 < k {
            &sv[i * c..(i + 1) * c]
        } else {
            &xv[x0 + (i + 1 - k) * xs..x0 + (i + 1 - k) * xs + c]
        }
    };
    let mut out = vec![0f32; l * c];
    let outp = OutPtr(out.as_mut_ptr());
    par_ranges(l, l * c * k, |rows| {
        for t in rows {
            // SAFETY: row t of `out` is written by this worker only.
            let o = unsafe { std::slice::from_raw_parts_mut(outp.at(t * c), c) };
            match bv {
                Some(bv) => o.copy_from_slice(bv),
                None => o.fill(0.0),
            }
            for j in 0..k {
                let (src, wj) = (row(t + j), &wv[j * c..(j + 1) * c]);
                for ((o, s), w) in o.iter_mut().zip(src).zip(wj) {
                    *o += s * w;
                }
            }
            o.iter_mut().for_each(|v| *v = silu(*v));
        }
    });
    let mut new_state = Vec::with_capacity((k - 1) * c);
    for i in l..l + k - 1 {
        new_state.extend_from_slice(row(i));
    }
    drop(xg);
    let dev = x.device();
    Ok((
        Tensor::from_vec(out, (l, c), dev)?,
        Tensor::from_vec(new_state, (k - 1, c), dev)?,
    ))
}

/// CPU grouped gated RMSNorm (same math as [`GatedRmsNorm::forward`]) in one pass.
/// `y`: [T, d] f32, `z`: [T, d] f32 (rows may be strided). Returns [T, d] f32.
fn gated_norm_cpu(y: &Tensor, z: &Tensor, norm: &GatedRmsNorm) -> Result<Tensor> {
    let (t, d) = y.dims2()?;
    let y = y.contiguous()?;
    let yv = CpuF32::new(&y)?;
    let yv = yv.slice()?;
    let (zg, z0, zs) = rows_f32(z)?;
    let zv = storage_f32(&zg)?;
    let wv = CpuF32::new(norm.weight())?;
    let wv = wv.slice()?;
    let (gs, eps) = (norm.group_size(), norm.eps());
    let mut out = vec![0f32; t * d];
    let outp = OutPtr(out.as_mut_ptr());
    par_ranges(t, t * d * 4, |rows| {
        for r in rows {
            // SAFETY: row r of `out` is written by this worker only.
            let o = unsafe { std::slice::from_raw_parts_mut(outp.at(r * d), d) };
            let (yr, zr) = (&yv[r * d..(r + 1) * d], &zv[z0 + r * zs..z0 + r * zs + d]);
            for ((og, yg), zg) in o.chunks_mut(gs).zip(yr.chunks(gs)).zip(zr.chunks(gs)) {
                let mut ss = 0f32;
                for ((o, &yy), &zz) in og.iter_mut().zip(yg).zip(zg) {
                    *o = yy * silu(zz);
                    ss += *o * *o;
                }
                let inv = 1.0 / (ss / gs as f32 + eps).sqrt();
                og.iter_mut().for_each(|v| *v *= inv);
            }
            for (v, w) in o.iter_mut().zip(wv) {
                *v *= w;
            }
        }
    });
    drop(zg);
    Tensor::from_vec(out, (t, d), y.device())
}

#[inline]
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

#[inline]
fn softplus_f32(v: f32) -> f32 {
    v.max(0.0) + (-v.abs()).exp().ln_1p()
}

/// Borrowed f32 data of a contiguous CPU tensor.
struct CpuF32<'a> {
    guard: candle_core::StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> CpuF32<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        if !t.is_contiguous() {
            candle_core::bail!(
                "mamba decode: expected a contiguous tensor, got {:?}",
                t.layout()
            );
        }
        let (guard, layout) = t.storage_and_layout();
        Ok(CpuF32 {
            start: layout.start_offset(),
            len: t.elem_count(),
            guard,
        })
    }

    fn slice(&self) -> Result<&[f32]> {
        match &*self.guard {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
                Ok(&v[self.start..self.start + self.len])
            }
            _ => candle_core::bail!("mamba decode: expected CPU f32 data"),
        }
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

    #[test]
    fn fused_cpu_decode_matches_generic_path() -> Result<()> {
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
        generic.fused_cpu_decode = false;
        let dev = Device::Cpu;
        let d = fused.dims;
        let mk = || -> Result<MambaState> {
            Ok(MambaState {
                conv: Tensor::randn(0f32, 1.0, (d.conv_kernel - 1, d.conv_dim()), &dev)?,
                ssm: Tensor::randn(0f32, 1.0, (d.heads, d.head_dim, d.state), &dev)?,
            })
        };
        let (mut a1, mut a2) = (mk()?, mk()?);
        let (mut b1, mut b2) = (a1.clone(), a2.clone());
        let x = Tensor::randn(0f32, 1.0, (2, cfg.model.llm_config.hidden_size), &dev)?;
        for _ in 0..3 {
            let yf = fused.forward(&x, &[1, 1], &mut [&mut a1, &mut a2])?;
            let yg = generic.forward(&x, &[1, 1], &mut [&mut b1, &mut b2])?;
            assert!(max_abs(&yf, &yg)? < 1e-4);
        }
        assert!(max_abs(&a1.ssm, &b1.ssm)? < 1e-4 && max_abs(&a2.conv, &b2.conv)? < 1e-6);
        Ok(())
    }

    #[test]
    fn cpu_conv_and_norm_kernels_match_generic_ops() -> Result<()> {
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
