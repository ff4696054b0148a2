//! CPU kernels of the Mamba2 mixer: the decode step over the state pool (in place, one
//! pass per sequence), the prefill conv and the gated RMSNorm. The per-row math lives in
//! small functions ([`conv_step_row`], [`ssm_step_row`], [`gated_norm_row`]) that other
//! backends' reference checks can share.

use std::sync::Mutex;

use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Tensor};

use super::super::linear::{OutPtr, par_ranges};
use super::super::norm::GatedRmsNorm;
use super::super::state::MambaPool;
use super::{Mamba2, MambaDims};

/// Conv step of one sequence. `window` [K−1, cd] is its conv state, oldest row first: it is
/// shifted by one row and `xbc` [cd] appended, in place. `out` [cd] = SiLU(Σ_j w[j]·row_j + b)
/// over the K rows [window; xbc], with `w` [K, cd].
pub(crate) fn conv_step_row(
    window: &mut [f32],
    xbc: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    out: &mut [f32],
) {
    let cd = xbc.len();
    let k = w.len() / cd;
    match b {
        Some(b) => out.copy_from_slice(b),
        None => out.fill(0.0),
    }
    for j in 0..k {
        let src = if j + 1 < k {
            &window[j * cd..(j + 1) * cd]
        } else {
            xbc
        };
        for ((o, s), w) in out.iter_mut().zip(src).zip(&w[j * cd..(j + 1) * cd]) {
            *o += s * w;
        }
    }
    out.iter_mut().for_each(|v| *v = silu(*v));
    if k > 1 {
        window.copy_within(cd.., 0);
        window[(k - 2) * cd..].copy_from_slice(xbc);
    }
}

/// SSM step of one sequence (model.md §2.5.6), in place on `state` [H, P, N]: for head h of
/// group g = h / (H/G), S_h = exp(dt_h·A_h)·S_h + dt_h·x_h ⊗ B_g and y_h = S_h·C_g + D_h·x_h.
/// `x` [H·P], `b`/`c` [G·N], `dt` [H] (after softplus), `a`/`d` [H]; writes `y` [H·P].
#[allow(clippy::too_many_arguments)]
pub(crate) fn ssm_step_row(
    state: &mut [f32],
    x: &[f32],
    b: &[f32],
    c: &[f32],
    dt: &[f32],
    a: &[f32],
    d: &[f32],
    dims: MambaDims,
    y: &mut [f32],
) {
    let (p, n) = (dims.head_dim, dims.state);
    let hg = dims.heads / dims.groups;
    for h in 0..dims.heads {
        let g = h / hg;
        let da = (dt[h] * a[h]).exp();
        let (bg, cg) = (&b[g * n..(g + 1) * n], &c[g * n..(g + 1) * n]);
        for pi in 0..p {
            let xv = x[h * p + pi];
            let s = &mut state[(h * p + pi) * n..(h * p + pi + 1) * n];
            y[h * p + pi] = decay_add_dot(s, bg, cg, da, dt[h] * xv) + d[h] * xv;
        }
    }
}

/// s = da·s + dtx·b in place; returns s·c. Independent lane accumulators let the loop
/// vectorize: with one serial chain of adds it did not, and this loop's share of a batch-16
/// decode step (mid checkpoint, CPU profile) halved with the lanes.
#[inline]
fn decay_add_dot(s: &mut [f32], b: &[f32], c: &[f32], da: f32, dtx: f32) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let mut sc = s.chunks_exact_mut(L);
    let (mut bc, mut cc) = (b.chunks_exact(L), c.chunks_exact(L));
    for ((sv, bv), cv) in (&mut sc).zip(&mut bc).zip(&mut cc) {
        for j in 0..L {
            let v = da * sv[j] + dtx * bv[j];
            sv[j] = v;
            acc[j] += v * cv[j];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for ((sv, bv), cv) in sc
        .into_remainder()
        .iter_mut()
        .zip(bc.remainder())
        .zip(cc.remainder())
    {
        *sv = da * *sv + dtx * bv;
        sum += *sv * cv;
    }
    sum
}

/// Grouped gated RMSNorm of one row, in place: g = y·SiLU(z), normalized over each group of
/// `group` values, times `w`.
pub(crate) fn gated_norm_row(y: &mut [f32], z: &[f32], w: &[f32], group: usize, eps: f32) {
    for (gy, gz) in y.chunks_mut(group).zip(z.chunks(group)) {
        let mut ss = 0f32;
        for (v, &zz) in gy.iter_mut().zip(gz) {
            *v *= silu(zz);
            ss += *v * *v;
        }
        let inv = 1.0 / (ss / group as f32 + eps).sqrt();
        gy.iter_mut().for_each(|v| *v *= inv);
    }
    for (v, w) in y.iter_mut().zip(w) {
        *v *= w;
    }
}

/// The decode step on CPU: `proj` [B, di + cd + H] f32 (in_proj output), `slots` [B] u32.
/// Reads and writes the sequences' pool rows in place (conv window, then SSM state) and
/// returns y [B, di] f32 after the gated norm. Sequences run in parallel.
pub(super) fn decode(
    m: &Mamba2,
    proj: &Tensor,
    pool: &MambaPool,
    slots: &Tensor,
) -> Result<Tensor> {
    let d = m.dims;
    let (di, cd) = (d.d_inner(), d.conv_dim());
    let bsz = slots.dim(0)?;
    let proj = proj.contiguous()?;
    if proj.dims() != [bsz, di + cd + d.heads] {
        candle_core::bail!(
            "mamba decode: in_proj output {:?} for {bsz} sequences",
            proj.dims()
        );
    }
    let conv_w = CpuF32::new(&m.conv_w)?;
    let conv_b = m.conv_b.as_ref().map(CpuF32::new).transpose()?;
    let conv = ConvStep {
        w: conv_w.slice()?,
        b: conv_b.as_ref().map(|b| b.slice()).transpose()?,
        dims: d,
        out: Mutex::new(Vec::new()),
    };
    pool.conv.inplace_op3(&proj, slots, &conv)?;
    let xc = take(&conv.out);
    let (dt_bias, a, skip) = (
        CpuF32::new(&m.dt_bias)?,
        CpuF32::new(&m.a)?,
        CpuF32::new(&m.d)?,
    );
    let norm_w = CpuF32::new(m.norm.weight())?;
    let ssm = SsmStep {
        xc: &xc,
        dt_bias: dt_bias.slice()?,
        a: a.slice()?,
        d: skip.slice()?,
        dt_limit: (m.dt_limit.0 as f32, m.dt_limit.1 as f32),
        norm_w: norm_w.slice()?,
        group: m.norm.group_size(),
        eps: m.norm.eps(),
        dims: d,
        out: Mutex::new(Vec::new()),
    };
    pool.ssm.inplace_op3(&proj, slots, &ssm)?;
    Tensor::from_vec(take(&ssm.out), (bsz, di), proj.device())
}

fn take(out: &Mutex<Vec<f32>>) -> Vec<f32> {
    std::mem::take(&mut *out.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The sequences' pool rows: `slots` as indices, each checked to be in range and distinct
/// (workers write the rows in parallel).
fn slot_rows(s: &CpuStorage, l: &Layout, pool_slots: usize) -> Result<Vec<usize>> {
    let (CpuStorage::U32(v), Some((start, end))) = (s, l.contiguous_offsets()) else {
        candle_core::bail!("mamba decode: slots must be a contiguous u32 tensor");
    };
    let rows: Vec<usize> = v[start..end].iter().map(|&i| i as usize).collect();
    let mut sorted = rows.clone();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) || sorted.last().is_some_and(|&i| i >= pool_slots) {
        candle_core::bail!("mamba decode: slots {rows:?} repeat or exceed the pool's {pool_slots}");
    }
    Ok(rows)
}

/// The pool's own data, checked to be the whole contiguous [slots, ...] f32 tensor.
fn pool_data<'a>(s: &'a mut CpuStorage, l: &Layout, row: usize) -> Result<(&'a mut [f32], usize)> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) if (end - start) % row == 0 => {
            Ok((&mut v[start..end], (end - start) / row))
        }
        _ => candle_core::bail!("mamba decode: the state pool must be contiguous f32"),
    }
}

/// Contiguous f32 rows of the in_proj output.
fn proj_data<'a>(s: &'a CpuStorage, l: &Layout, len: usize) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) if end - start == len => Ok(&v[start..end]),
        _ => candle_core::bail!("mamba decode: in_proj output must be contiguous f32"),
    }
}

/// In place on the conv pool: [`conv_step_row`] for each sequence; keeps SiLU(conv) [B, cd].
struct ConvStep<'a> {
    w: &'a [f32],
    b: Option<&'a [f32]>,
    dims: MambaDims,
    out: Mutex<Vec<f32>>,
}

impl InplaceOp3 for ConvStep<'_> {
    fn name(&self) -> &'static str {
        "mamba-conv-step"
    }

    fn cpu_fwd(
        &self,
        pool: &mut CpuStorage,
        pool_l: &Layout,
        proj: &CpuStorage,
        proj_l: &Layout,
        slots: &CpuStorage,
        slots_l: &Layout,
    ) -> Result<()> {
        let d = self.dims;
        let (di, cd) = (d.d_inner(), d.conv_dim());
        let (dp, win) = (di + cd + d.heads, (d.conv_kernel - 1) * cd);
        let (pool, pool_slots) = pool_data(pool, pool_l, win)?;
        let rows = slot_rows(slots, slots_l, pool_slots)?;
        let proj = proj_data(proj, proj_l, rows.len() * dp)?;
        let mut out = vec![0f32; rows.len() * cd];
        let (out_p, pool_p) = (OutPtr(out.as_mut_ptr()), OutPtr(pool.as_mut_ptr()));
        par_ranges(rows.len(), rows.len() * cd * d.conv_kernel, |seqs| {
            for bi in seqs {
                // SAFETY: the slots are distinct and in range (slot_rows), so sequence bi's
                // pool rows and output row are written by this worker only.
                let (window, o) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(pool_p.at(rows[bi] * win), win),
                        std::slice::from_raw_parts_mut(out_p.at(bi * cd), cd),
                    )
                };
                let xbc = &proj[bi * dp + di..bi * dp + di + cd];
                conv_step_row(window, xbc, self.w, self.b, o);
            }
        });
        *self.out.lock().unwrap_or_else(|e| e.into_inner()) = out;
        Ok(())
    }
}

/// In place on the SSM pool: dt, [`ssm_step_row`] and [`gated_norm_row`] for each sequence;
/// keeps y [B, di].
struct SsmStep<'a> {
    /// SiLU(conv) [B, cd] from [`ConvStep`].
    xc: &'a [f32],
    dt_bias: &'a [f32],
    a: &'a [f32],
    d: &'a [f32],
    dt_limit: (f32, f32),
    norm_w: &'a [f32],
    group: usize,
    eps: f32,
    dims: MambaDims,
    out: Mutex<Vec<f32>>,
}

impl InplaceOp3 for SsmStep<'_> {
    fn name(&self) -> &'static str {
        "mamba-ssm-step"
    }

    fn cpu_fwd(
        &self,
        pool: &mut CpuStorage,
        pool_l: &Layout,
        proj: &CpuStorage,
        proj_l: &Layout,
        slots: &CpuStorage,
        slots_l: &Layout,
    ) -> Result<()> {
        let d = self.dims;
        let (di, cd, nh) = (d.d_inner(), d.conv_dim(), d.heads);
        let (dp, gn, row) = (di + cd + nh, d.groups * d.state, nh * d.head_dim * d.state);
        let (pool, pool_slots) = pool_data(pool, pool_l, row)?;
        let rows = slot_rows(slots, slots_l, pool_slots)?;
        let proj = proj_data(proj, proj_l, rows.len() * dp)?;
        if self.xc.len() != rows.len() * cd {
            candle_core::bail!("mamba decode: conv output does not match the batch");
        }
        let (lo, hi) = self.dt_limit;
        let mut out = vec![0f32; rows.len() * di];
        let (out_p, pool_p) = (OutPtr(out.as_mut_ptr()), OutPtr(pool.as_mut_ptr()));
        par_ranges(rows.len(), rows.len() * row * 3, |seqs| {
            let mut dt = vec![0f32; nh];
            for bi in seqs {
                // SAFETY: as in ConvStep: distinct in-range slots, one worker per sequence.
                let (state, y) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(pool_p.at(rows[bi] * row), row),
                        std::slice::from_raw_parts_mut(out_p.at(bi * di), di),
                    )
                };
                let p = &proj[bi * dp..(bi + 1) * dp];
                let (z, dt_raw) = (&p[..di], &p[di + cd..]);
                for ((t, &raw), &bias) in dt.iter_mut().zip(dt_raw).zip(self.dt_bias) {
                    *t = softplus_f32(raw + bias).max(lo).min(hi);
                }
                let xc = &self.xc[bi * cd..(bi + 1) * cd];
                let (x, b, c) = (&xc[..di], &xc[di..di + gn], &xc[di + gn..]);
                ssm_step_row(state, x, b, c, &dt, self.a, self.d, d, y);
                gated_norm_row(y, z, self.norm_w, self.group, self.eps);
            }
        });
        *self.out.lock().unwrap_or_else(|e| e.into_inner()) = out;
        Ok(())
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

/// CPU causal depthwise conv + bias + SiLU in one pass (same math as [`super::causal_conv1d`]
/// followed by SiLU). `x`: [L, C] f32 (rows may be strided), `state`: [K−1, C].
/// Returns (SiLU(conv) [L, C], new state [K−1, C]).
pub(super) fn conv1d_silu_cpu(
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
pub(super) fn gated_norm_cpu(y: &Tensor, z: &Tensor, norm: &GatedRmsNorm) -> Result<Tensor> {
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
            o.copy_from_slice(&yv[r * d..(r + 1) * d]);
            gated_norm_row(o, &zv[z0 + r * zs..z0 + r * zs + d], wv, gs, eps);
        }
    });
    drop(zg);
    Tensor::from_vec(out, (t, d), y.device())
}

#[inline]
pub(crate) fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

#[inline]
pub(crate) fn softplus_f32(v: f32) -> f32 {
    v.max(0.0) + (-v.abs()).exp().ln_1p()
}

/// Borrowed f32 data of a contiguous CPU tensor.
pub(super) struct CpuF32<'a> {
    guard: candle_core::StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> CpuF32<'a> {
    pub(super) fn new(t: &'a Tensor) -> Result<Self> {
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

    pub(super) fn slice(&self) -> Result<&[f32]> {
        match &*self.guard {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
                Ok(&v[self.start..self.start + self.len])
            }
            _ => candle_core::bail!("mamba decode: expected CPU f32 data"),
        }
    }
}
