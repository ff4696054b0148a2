//! CPU kernels of the Mamba2 mixer: the decode step and the prefill over the state pool (in
//! place: no copies of the states), and the conv and gated RMSNorm of the candle-op path. The per-row math is shared
//! with the device kernels' CPU twins ([`crate::kernels`]).

use std::sync::Mutex;

use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Tensor};

use super::super::linear::{OutPtr, par_ranges};
use super::super::norm::GatedRmsNorm;
use super::super::state::MambaPool;
use super::{Mamba2, MambaDims};
use crate::kernels::cpu::{
    ScanInputs, conv_update_row, conv1d_prefill, dt_row, gated_norm_row, silu, ssd_scan_in_place,
    ssm_update_row,
};
use crate::kernels::{AnyRows, CpuF32, Rows};

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
    let weights = MixerWeights::new(m)?;
    let conv = ConvStep {
        p: weights.conv()?,
        out: Mutex::new(Vec::new()),
    };
    pool.conv.inplace_op3(&proj, slots, &conv)?;
    let xc = take(&conv.out);
    let ssm = SsmStep {
        p: weights.ssm()?,
        xc: &xc,
        out: Mutex::new(Vec::new()),
    };
    pool.ssm.inplace_op3(&proj, slots, &ssm)?;
    Tensor::from_vec(take(&ssm.out), (bsz, di), proj.device())
}

/// The prefill of one sequence on CPU: `proj` [L, di + cd + H] f32 (in_proj output); the
/// conv window and SSM state in pool row `slot` are advanced in place. Returns y [L, di] f32
/// after the D skip and the gated norm. Runs `piece` tokens at a time, so the temporaries
/// (conv and scan output, ~5 floats per channel) are those of one piece; the scan is
/// sequential in the tokens anyway.
pub(super) fn prefill(
    m: &Mamba2,
    proj: &Tensor,
    pool: &MambaPool,
    slot: u32,
    piece: usize,
) -> Result<Tensor> {
    let d = m.dims;
    let (di, cd) = (d.d_inner(), d.conv_dim());
    let l = proj.dim(0)?;
    let proj = proj.contiguous()?;
    if proj.dims() != [l, di + cd + d.heads] {
        candle_core::bail!("mamba prefill: in_proj output {:?}", proj.dims());
    }
    let slots = Tensor::new(&[slot], proj.device())?;
    let weights = MixerWeights::new(m)?;
    let mut y = vec![0f32; l * di];
    for (s, y_piece) in (0..l)
        .step_by(piece.max(1))
        .zip(y.chunks_mut(piece.max(1) * di))
    {
        let rows = proj.narrow(0, s, y_piece.len() / di)?;
        let conv = ConvPrefill {
            p: weights.conv()?,
            out: Mutex::new(Vec::new()),
        };
        pool.conv.inplace_op3(&rows, &slots, &conv)?;
        let xc = take(&conv.out);
        let scan = ScanPrefill {
            p: weights.ssm()?,
            xc: &xc,
            out: Mutex::new(y_piece),
        };
        pool.ssm.inplace_op3(&rows, &slots, &scan)?;
    }
    Tensor::from_vec(y, (l, di), proj.device())
}

/// In place on the conv pool: the prefill conv of one sequence's tokens
/// ([`conv1d_prefill`]), its window moved to their last K−1; keeps SiLU(conv) [T, cd].
struct ConvPrefill<'a> {
    p: ConvParams<'a>,
    out: Mutex<Vec<f32>>,
}

impl InplaceOp3 for ConvPrefill<'_> {
    fn name(&self) -> &'static str {
        "mamba-conv-prefill"
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
        let d = self.p.dims;
        let (di, cd) = (d.d_inner(), d.conv_dim());
        let (dp, win) = (di + cd + d.heads, (d.conv_kernel - 1) * cd);
        let (pool, pool_slots) = pool_data(pool, pool_l, win)?;
        let &[slot] = slot_rows(slots, slots_l, pool_slots)?.as_slice() else {
            candle_core::bail!("mamba prefill: one sequence at a time");
        };
        let t = proj_l.dims()[0];
        let proj = proj_data(proj, proj_l, t * dp)?;
        let window = &mut pool[slot * win..(slot + 1) * win];
        let xbc = AnyRows::F32(Rows::new(proj, di, dp, t, cd));
        let (out, new_window) = conv1d_prefill(xbc, window, self.p.w, self.p.b);
        window.copy_from_slice(&new_window);
        *self.out.lock().unwrap_or_else(|e| e.into_inner()) = out;
        Ok(())
    }
}

/// In place on the SSM pool: dt, the scan with the D skip ([`ssd_scan_in_place`]) and the
/// gated norm of one sequence's tokens, into `out` [T, di].
struct ScanPrefill<'a> {
    p: SsmParams<'a>,
    /// SiLU(conv) [T, cd] from [`ConvPrefill`].
    xc: &'a [f32],
    out: Mutex<&'a mut [f32]>,
}

impl InplaceOp3 for ScanPrefill<'_> {
    fn name(&self) -> &'static str {
        "mamba-scan-prefill"
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
        let d = self.p.dims;
        let (di, cd, nh) = (d.d_inner(), d.conv_dim(), d.heads);
        let (dp, gn, row) = (di + cd + nh, d.groups * d.state, nh * d.head_dim * d.state);
        let (pool, pool_slots) = pool_data(pool, pool_l, row)?;
        let &[slot] = slot_rows(slots, slots_l, pool_slots)?.as_slice() else {
            candle_core::bail!("mamba prefill: one sequence at a time");
        };
        let t = proj_l.dims()[0];
        let proj = proj_data(proj, proj_l, t * dp)?;
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if self.xc.len() != t * cd || out.len() != t * di {
            candle_core::bail!("mamba prefill: conv output or y does not match the tokens");
        }
        let mut dt = vec![0f32; t * nh];
        for (dt, p) in dt.chunks_exact_mut(nh).zip(proj.chunks_exact(dp)) {
            dt_row(&p[di + cd..], self.p.dt_bias, self.p.dt_limit, dt);
        }
        let inputs = ScanInputs {
            x: self.xc,
            x_stride: cd,
            b: &self.xc[di..],
            c: &self.xc[di + gn..],
            bc_stride: cd,
            dt: &dt,
            a: self.p.a,
            d: Some(self.p.d),
        };
        let mut ys = vec![0f32; t * di];
        let state = &mut pool[slot * row..(slot + 1) * row];
        ssd_scan_in_place(
            &inputs,
            state,
            &mut ys,
            (t, nh, d.head_dim, d.groups, d.state),
        );
        let out_p = OutPtr(out.as_mut_ptr());
        par_ranges(t, t * di * 4, |tokens| {
            for r in tokens {
                // SAFETY: row r of `out` is written by this worker only.
                let o = unsafe { std::slice::from_raw_parts_mut(out_p.at(r * di), di) };
                let z = &proj[r * dp..r * dp + di];
                gated_norm_row(
                    &ys[r * di..(r + 1) * di],
                    z,
                    self.p.norm_w,
                    self.p.group,
                    self.p.eps,
                    o,
                );
            }
        });
        Ok(())
    }
}

/// The mixer's small f32 tensors, borrowed for one call of [`decode`] or [`prefill`].
struct MixerWeights<'a> {
    m: &'a Mamba2,
    conv_w: CpuF32<'a>,
    conv_b: Option<CpuF32<'a>>,
    dt_bias: CpuF32<'a>,
    a: CpuF32<'a>,
    skip: CpuF32<'a>,
    norm_w: CpuF32<'a>,
}

impl<'a> MixerWeights<'a> {
    fn new(m: &'a Mamba2) -> Result<Self> {
        Ok(MixerWeights {
            m,
            conv_w: CpuF32::new(&m.conv_w)?,
            conv_b: m.conv_b.as_ref().map(CpuF32::new).transpose()?,
            dt_bias: CpuF32::new(&m.dt_bias)?,
            a: CpuF32::new(&m.a)?,
            skip: CpuF32::new(&m.d)?,
            norm_w: CpuF32::new(m.norm.weight())?,
        })
    }

    fn conv(&self) -> Result<ConvParams<'_>> {
        Ok(ConvParams {
            w: self.conv_w.slice()?,
            b: self.conv_b.as_ref().map(|b| b.slice()).transpose()?,
            dims: self.m.dims,
        })
    }

    fn ssm(&self) -> Result<SsmParams<'_>> {
        let (m, (lo, hi)) = (self.m, self.m.dt_limit);
        Ok(SsmParams {
            dt_bias: self.dt_bias.slice()?,
            a: self.a.slice()?,
            d: self.skip.slice()?,
            dt_limit: (lo as f32, hi as f32),
            norm_w: self.norm_w.slice()?,
            group: m.norm.group_size(),
            eps: m.norm.eps(),
            dims: m.dims,
        })
    }
}

/// What the conv ops read: the depthwise weights [K·cd] and bias.
struct ConvParams<'a> {
    w: &'a [f32],
    b: Option<&'a [f32]>,
    dims: MambaDims,
}

/// What the SSM ops read besides the conv output: dt's bias and limits, A, the D skip and
/// the gated norm.
struct SsmParams<'a> {
    dt_bias: &'a [f32],
    a: &'a [f32],
    d: &'a [f32],
    dt_limit: (f32, f32),
    norm_w: &'a [f32],
    group: usize,
    eps: f32,
    dims: MambaDims,
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

/// In place on the conv pool: [`conv_update_row`] for each sequence; keeps SiLU(conv) [B, cd].
struct ConvStep<'a> {
    p: ConvParams<'a>,
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
        let d = self.p.dims;
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
                conv_update_row(window, xbc, self.p.w, self.p.b, o);
            }
        });
        *self.out.lock().unwrap_or_else(|e| e.into_inner()) = out;
        Ok(())
    }
}

/// In place on the SSM pool: dt, [`ssm_update_row`] and [`gated_norm_row`] for each sequence;
/// keeps y [B, di].
struct SsmStep<'a> {
    p: SsmParams<'a>,
    /// SiLU(conv) [B, cd] from [`ConvStep`].
    xc: &'a [f32],
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
        let d = self.p.dims;
        let (di, cd, nh) = (d.d_inner(), d.conv_dim(), d.heads);
        let (dp, gn, row) = (di + cd + nh, d.groups * d.state, nh * d.head_dim * d.state);
        let (pool, pool_slots) = pool_data(pool, pool_l, row)?;
        let rows = slot_rows(slots, slots_l, pool_slots)?;
        let proj = proj_data(proj, proj_l, rows.len() * dp)?;
        if self.xc.len() != rows.len() * cd {
            candle_core::bail!("mamba decode: conv output does not match the batch");
        }
        let (lo, hi) = self.p.dt_limit;
        let mut out = vec![0f32; rows.len() * di];
        let (out_p, pool_p) = (OutPtr(out.as_mut_ptr()), OutPtr(pool.as_mut_ptr()));
        par_ranges(rows.len(), rows.len() * row * 3, |seqs| {
            let (mut dt, mut ys) = (vec![0f32; nh], vec![0f32; di]);
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
                dt_row(dt_raw, self.p.dt_bias, (lo, hi), &mut dt);
                let xc = &self.xc[bi * cd..(bi + 1) * cd];
                let (x, b, c) = (&xc[..di], &xc[di..di + gn], &xc[di + gn..]);
                ssm_update_row(state, x, b, c, &dt, self.p.a, self.p.d, d.groups, &mut ys);
                gated_norm_row(&ys, z, self.p.norm_w, self.p.group, self.p.eps, y);
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
            let z = &zv[z0 + r * zs..z0 + r * zs + d];
            gated_norm_row(&yv[r * d..(r + 1) * d], z, wv, gs, eps, o);
        }
    });
    drop(zg);
    Tensor::from_vec(out, (t, d), y.device())
}
