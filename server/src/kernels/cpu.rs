//! CPU twins of the CUDA kernels (same math, f32 accumulation). The per-row functions are
//! the building blocks: the batch drivers below run them over rows in parallel, and a fused
//! CPU decode step can call them on one sequence's slices directly.

use candle_core::{Result, bail};
use half::bf16;

use super::access::{AnyRows, Rows};
use crate::model::cpu_math::{dispatch, exp, sum_squares};
use crate::model::linear::{OutPtr, par_ranges};

/// An input element converted to f32.
pub(crate) trait Elem: Copy + Send + Sync {
    fn f32(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// `v·sigmoid(v)`, with the branch-free exp so that loops over rows vectorize.
#[inline(always)]
pub(crate) fn silu(v: f32) -> f32 {
    v / (1.0 + exp(-v))
}

/// softplus(v) = max(v, 0) + log1p(exp(−|v|)) (no overflow for large |v|).
#[inline]
pub(crate) fn softplus(v: f32) -> f32 {
    v.max(0.0) + (-v.abs()).exp().ln_1p()
}

/// dt = clamp(softplus(dt_raw + dt_bias), lo, hi) for one token's heads.
pub(crate) fn dt_row<T: Elem>(dt_raw: &[T], dt_bias: &[f32], limit: (f32, f32), out: &mut [f32]) {
    for ((o, r), b) in out.iter_mut().zip(dt_raw).zip(dt_bias) {
        *o = softplus(r.f32() + b).max(limit.0).min(limit.1);
    }
}

/// `acc[c] += w[c] * x[c]`.
#[inline(always)]
fn axpy<T: Elem>(acc: &mut [f32], x: &[T], w: &[f32]) {
    for ((a, x), w) in acc.iter_mut().zip(x).zip(w) {
        *a += w * x.f32();
    }
}

dispatch! {
    /// Decode conv of one sequence: `state` [(K−1)·C] (oldest input row first) is shifted in
    /// place to end with `x` [C]; `out` [C] = SiLU(bias + Σ_k w[k]·input_k). `w` is [K·C].
    fn conv_update_row<T: Elem>(
        state: &mut [f32],
        x: &[T],
        w: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let c = x.len();
        let k = w.len() / c;
        match bias {
            Some(b) => out.copy_from_slice(b),
            None => out.fill(0.0),
        }
        for j in 0..k - 1 {
            axpy(out, &state[j * c..(j + 1) * c], &w[j * c..(j + 1) * c]);
        }
        axpy(out, x, &w[(k - 1) * c..]);
        out.iter_mut().for_each(|v| *v = silu(*v));
        state.copy_within(c.., 0);
        for (s, x) in state[(k - 2) * c..].iter_mut().zip(x) {
            *s = x.f32();
        }
    }
}

dispatch! {
    /// Prefill conv output for token `t`: `out` [C] = SiLU(bias + Σ_k w[k]·padded[t + k]), where
    /// padded = [state; x] (`state` [(K−1)·C], `x` rows of C).
    fn conv_prefill_row<T: Elem>(
        t: usize,
        state: &[f32],
        x: Rows<'_, T>,
        w: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let c = x.cols;
        let k = w.len() / c;
        match bias {
            Some(b) => out.copy_from_slice(b),
            None => out.fill(0.0),
        }
        for j in 0..k {
            let (i, wj) = (t + j, &w[j * c..(j + 1) * c]);
            if i + 1 < k {
                axpy(out, &state[i * c..(i + 1) * c], wj);
            } else {
                axpy(out, x.row(i + 1 - k), wj);
            }
        }
        out.iter_mut().for_each(|v| *v = silu(*v));
    }
}

dispatch! {
    /// One head's decode step: `state` [P·N] in place, `x` [P], `b`/`c` [N] (the head's
    /// group), `dt` already softplus'ed and clamped. S ← exp(dt·a)·S + dt·x⊗B;
    /// y = S·C + d·x  [P].
    #[allow(clippy::too_many_arguments)]
    fn ssm_update_head(
        state: &mut [f32],
        x: &[f32],
        b: &[f32],
        c: &[f32],
        dt: f32,
        a: f32,
        d: f32,
        y: &mut [f32]
    ) {
        let n = b.len();
        let da = (dt * a).exp();
        let (b8, b_tail) = b.as_chunks::<LANES>();
        let (c8, c_tail) = c.as_chunks::<LANES>();
        for ((srow, &xv), yv) in state.chunks_exact_mut(n).zip(x).zip(y.iter_mut()) {
            let dtx = dt * xv;
            // LANES independent partial sums: a single accumulator would serialize the row
            // on the add latency and keep the loop from vectorizing.
            let mut acc = [0f32; LANES];
            let (s8, s_tail) = srow.as_chunks_mut::<LANES>();
            for ((s, bv), cv) in s8.iter_mut().zip(b8).zip(c8) {
                for i in 0..LANES {
                    let v = da * s[i] + dtx * bv[i];
                    s[i] = v;
                    acc[i] += v * cv[i];
                }
            }
            let mut total: f32 = acc.iter().sum();
            for ((s, bv), cv) in s_tail.iter_mut().zip(b_tail).zip(c_tail) {
                let v = da * *s + dtx * bv;
                *s = v;
                total += v * cv;
            }
            *yv = total + d * xv;
        }
    }
}

/// Partial sums per lane in the CPU reductions.
const LANES: usize = 8;

/// One sequence's decode step over all heads: `state` [H·P·N] in place, `x` [H·P], `b`/`c`
/// [G·N], `dt` [H] (see [`dt_row`]), `a`/`d` [H]; head h uses group h / (H/G). `y` [H·P].
/// The fused CPU decode step of the model uses it (the batch driver here works per head).
#[allow(clippy::too_many_arguments)]
pub(crate) fn ssm_update_row(
    state: &mut [f32],
    x: &[f32],
    b: &[f32],
    c: &[f32],
    dt: &[f32],
    a: &[f32],
    d: &[f32],
    groups: usize,
    y: &mut [f32],
) {
    let h = dt.len();
    let (p, n) = (x.len() / h, b.len() / groups);
    let hg = h / groups;
    for hi in 0..h {
        let g = hi / hg;
        ssm_update_head(
            &mut state[hi * p * n..(hi + 1) * p * n],
            &x[hi * p..(hi + 1) * p],
            &b[g * n..(g + 1) * n],
            &c[g * n..(g + 1) * n],
            dt[hi],
            a[hi],
            d[hi],
            &mut y[hi * p..(hi + 1) * p],
        );
    }
}

dispatch! {
    /// Grouped gated RMSNorm of one row: g = y·silu(z); out = g / sqrt(mean_group(g²) + eps) · w.
    fn gated_norm_row<T: Elem>(
        y: &[f32],
        z: &[T],
        w: &[f32],
        group_size: usize,
        eps: f32,
        out: &mut [f32],
    ) {
        let chunks = out
            .chunks_mut(group_size)
            .zip(y.chunks(group_size))
            .zip(z.chunks(group_size))
            .zip(w.chunks(group_size));
        for (((o, y), z), w) in chunks {
            for ((o, &yv), zv) in o.iter_mut().zip(y).zip(z) {
                *o = yv * silu(zv.f32());
            }
            let ss = sum_squares(o);
            let inv = 1.0 / (ss / group_size as f32 + eps).sqrt();
            for (o, w) in o.iter_mut().zip(w) {
                *o *= inv * w;
            }
        }
    }
}

/// An output buffer: NaN-filled when poisoning is on (so unwritten elements show).
pub(crate) fn out_vec(n: usize) -> Vec<f32> {
    if super::poison_outputs() {
        vec![f32::NAN; n]
    } else {
        vec![0.0; n]
    }
}

/// Slot ids must index the pool and be distinct (rows of one batch update disjoint slots).
fn check_slots(name: &str, slots: &[u32], pool_len: usize, slot_len: usize) -> Result<()> {
    if slot_len == 0 || !pool_len.is_multiple_of(slot_len) {
        bail!("{name}: a pool of {pool_len} values does not hold slots of {slot_len}");
    }
    let num_slots = pool_len / slot_len;
    let mut seen = vec![false; num_slots];
    for &s in slots {
        let s = s as usize;
        if s >= num_slots {
            bail!("{name}: slot id {s} out of range for a pool of {num_slots} slots");
        }
        if std::mem::replace(&mut seen[s], true) {
            bail!("{name}: slot id {s} appears twice in one batch");
        }
    }
    Ok(())
}

/// Batched decode conv over a slot pool `pool` [slots, K−1, C]; returns [B, C].
pub(crate) fn conv1d_update(
    pool: &mut [f32],
    slots: &[u32],
    xbc: AnyRows<'_>,
    w: &[f32],
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    fn run<T: Elem>(
        pool: &mut [f32],
        slots: &[u32],
        xbc: Rows<'_, T>,
        w: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let c = xbc.cols;
        let slot_len = w.len() - c; // (K−1)·C
        check_slots("conv1d_update", slots, pool.len(), slot_len)?;
        let mut out = out_vec(slots.len() * c);
        let (out_p, pool_p) = (OutPtr(out.as_mut_ptr()), OutPtr(pool.as_mut_ptr()));
        par_ranges(slots.len(), slots.len() * w.len(), |rows| {
            for b in rows {
                let s = slots[b] as usize;
                // SAFETY: slot ids are distinct and in range, so each worker owns its slots'
                // state and its rows of `out`.
                let (state, o) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(pool_p.at(s * slot_len), slot_len),
                        std::slice::from_raw_parts_mut(out_p.at(b * c), c),
                    )
                };
                conv_update_row(state, xbc.row(b), w, bias, o);
            }
        });
        Ok(out)
    }
    match xbc {
        AnyRows::F32(x) => run(pool, slots, x, w, bias),
        AnyRows::BF16(x) => run(pool, slots, x, w, bias),
    }
}

/// Sizes of a selective state update.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SsmDims {
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) state: usize,
    pub(crate) groups: usize,
}

/// Per-head parameters of a selective state update, all [H].
pub(crate) struct SsmParams<'a> {
    pub(crate) dt_bias: &'a [f32],
    pub(crate) a: &'a [f32],
    pub(crate) d: &'a [f32],
    pub(crate) dt_limit: (f32, f32),
}

/// Batched decode SSM step over a slot pool `pool` [slots, H, P, N]; returns y [B, H·P].
/// Parallel over (sequence, head) pairs, so one sequence uses every core too.
pub(crate) fn selective_state_update(
    pool: &mut [f32],
    slots: &[u32],
    (x, b, c): (Rows<'_, f32>, Rows<'_, f32>, Rows<'_, f32>),
    dt_raw: AnyRows<'_>,
    prm: &SsmParams<'_>,
    dm: SsmDims,
) -> Result<Vec<f32>> {
    fn run<T: Elem>(
        pool: &mut [f32],
        slots: &[u32],
        (x, b, c): (Rows<'_, f32>, Rows<'_, f32>, Rows<'_, f32>),
        dt_raw: Rows<'_, T>,
        prm: &SsmParams<'_>,
        dm: SsmDims,
    ) -> Result<Vec<f32>> {
        let (nh, p, n) = (dm.heads, dm.head_dim, dm.state);
        let (head_len, hg) = (p * n, nh / dm.groups);
        check_slots("selective_state_update", slots, pool.len(), nh * head_len)?;
        let bsz = slots.len();
        let mut y = out_vec(bsz * nh * p);
        let (y_p, pool_p) = (OutPtr(y.as_mut_ptr()), OutPtr(pool.as_mut_ptr()));
        par_ranges(bsz * nh, bsz * nh * head_len * 3, |units| {
            for u in units {
                let (bi, h) = (u / nh, u % nh);
                let g = h / hg;
                let s = slots[bi] as usize;
                let mut dt = [0f32];
                dt_row(
                    &dt_raw.row(bi)[h..h + 1],
                    &prm.dt_bias[h..h + 1],
                    prm.dt_limit,
                    &mut dt,
                );
                // SAFETY: (slot, head) pairs are distinct (distinct slots), so each unit owns
                // its state block and its P outputs.
                let (state, yo) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(
                            pool_p.at((s * nh + h) * head_len),
                            head_len,
                        ),
                        std::slice::from_raw_parts_mut(y_p.at(u * p), p),
                    )
                };
                ssm_update_head(
                    state,
                    &x.row(bi)[h * p..(h + 1) * p],
                    &b.row(bi)[g * n..(g + 1) * n],
                    &c.row(bi)[g * n..(g + 1) * n],
                    dt[0],
                    prm.a[h],
                    prm.d[h],
                    yo,
                );
            }
        });
        Ok(y)
    }
    match dt_raw {
        AnyRows::F32(r) => run(pool, slots, (x, b, c), r, prm, dm),
        AnyRows::BF16(r) => run(pool, slots, (x, b, c), r, prm, dm),
    }
}

/// Gated RMSNorm over rows [T, D]; returns [T, D]. Parallel over (row, group) pairs.
pub(crate) fn gated_rms_norm(
    y: Rows<'_, f32>,
    z: AnyRows<'_>,
    w: &[f32],
    group_size: usize,
    eps: f32,
) -> Vec<f32> {
    fn run<T: Elem>(y: Rows<'_, f32>, z: Rows<'_, T>, w: &[f32], gs: usize, eps: f32) -> Vec<f32> {
        let (t, d) = (y.rows, y.cols);
        let groups = d / gs;
        let mut out = out_vec(t * d);
        let out_p = OutPtr(out.as_mut_ptr());
        par_ranges(t * groups, t * d * 4, |units| {
            for u in units {
                let (r, g) = (u / groups, u % groups);
                let cols = g * gs..(g + 1) * gs;
                // SAFETY: each (row, group) unit is written by one worker only.
                let o = unsafe { std::slice::from_raw_parts_mut(out_p.at(r * d + g * gs), gs) };
                let (yr, zr) = (&y.row(r)[cols.clone()], &z.row(r)[cols.clone()]);
                gated_norm_row(yr, zr, &w[cols], gs, eps, o);
            }
        });
        out
    }
    match z {
        AnyRows::F32(z) => run(y, z, w, group_size, eps),
        AnyRows::BF16(z) => run(y, z, w, group_size, eps),
    }
}

/// Prefill SSD of one sequence as a scan over its tokens: the decode recurrence applied
/// token by token per head, heads in parallel. About the chunked SSD's work (4·L·H·P·N
/// flops) but no [L, L] or per-chunk intermediates: the CPU prefill's memory stays that of
/// its inputs and outputs. `x` [L·H·P], `dt` [L·H] (see [`dt_row`]), `a` [H], `b`/`c`
/// [L·G·N], `state` [H·P·N] (initial); head h uses group h / (H/G). Returns (y [L·H·P]
/// without the D skip, final state [H·P·N]).
///
/// Each head's state is scanned transposed, [N][P]: then `y = Σ_n C[n]·S[n]` and the update
/// `S[n] = exp(dt·a)·S[n] + dt·B[n]·x` are vector operations along P with C[n] and B[n]
/// broadcast, where the [P][N] layout needs a horizontal sum per output element.
#[allow(clippy::too_many_arguments)]
pub(crate) fn ssd_scan(
    x: &[f32],
    dt: &[f32],
    a: &[f32],
    b: &[f32],
    c: &[f32],
    state: &[f32],
    (l, h, p, g, n): (usize, usize, usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let mut y = out_vec(l * h * p);
    let mut new_state = state.to_vec();
    let inputs = ScanInputs {
        x,
        x_stride: h * p,
        b,
        c,
        bc_stride: g * n,
        dt,
        a,
        d: None,
    };
    ssd_scan_in_place(&inputs, &mut new_state, &mut y, (l, h, p, g, n));
    (y, new_state)
}

/// The inputs of [`ssd_scan_in_place`]. Token t's x is `x[t·x_stride..]` ([H, P]), its B and
/// C `b[t·bc_stride..]` and `c[t·bc_stride..]` ([G, N]), so they can be column slices of one
/// buffer (the conv output).
pub(crate) struct ScanInputs<'a> {
    pub x: &'a [f32],
    pub x_stride: usize,
    pub b: &'a [f32],
    pub c: &'a [f32],
    pub bc_stride: usize,
    /// [L, H], softplus'ed.
    pub dt: &'a [f32],
    /// [H].
    pub a: &'a [f32],
    /// The D skip [H]: `y += D·x` when given.
    pub d: Option<&'a [f32]>,
}

/// [`ssd_scan`] on the state [H, P, N] in place, into `y` [L, H, P]. Heads run in parallel.
pub(crate) fn ssd_scan_in_place(
    inp: &ScanInputs<'_>,
    state: &mut [f32],
    y: &mut [f32],
    (l, h, p, g, n): (usize, usize, usize, usize, usize),
) {
    assert!(state.len() == h * p * n && y.len() >= l * h * p && inp.dt.len() >= l * h);
    if l > 0 {
        assert!(inp.x.len() >= (l - 1) * inp.x_stride + h * p);
        let bc_len = (l - 1) * inp.bc_stride + g * n;
        assert!(inp.b.len() >= bc_len && inp.c.len() >= bc_len);
    }
    let (y_p, s_p) = (OutPtr(y.as_mut_ptr()), OutPtr(state.as_mut_ptr()));
    let heads_per_group = h / g;
    // P padded to whole vectors of 16: the padding lanes of x are zero, so their states
    // stay zero.
    let pp = p.next_multiple_of(16);
    par_ranges(h, 4 * l * h * p * n, |heads| {
        let (mut st, mut dtb) = (vec![0f32; n * pp], vec![0f32; n]);
        for hi in heads {
            let gi = hi / heads_per_group;
            // SAFETY: head hi's state is written by this worker only.
            let s = unsafe { std::slice::from_raw_parts_mut(s_p.at(hi * p * n), p * n) };
            for (pi, srow) in s.chunks_exact(n).enumerate() {
                for (ni, &v) in srow.iter().enumerate() {
                    st[ni * pp + pi] = v;
                }
            }
            for t in 0..l {
                let dt = inp.dt[t * h + hi];
                let bc = t * inp.bc_stride + gi * n..t * inp.bc_stride + (gi + 1) * n;
                for (d, &bv) in dtb.iter_mut().zip(&inp.b[bc.clone()]) {
                    *d = dt * bv;
                }
                let x0 = t * inp.x_stride + hi * p;
                let step = ScanStep {
                    x: &inp.x[x0..x0 + p],
                    dt_b: &dtb,
                    c: &inp.c[bc],
                    da: (dt * inp.a[hi]).exp(),
                    d: inp.d.map_or(0.0, |d| d[hi]),
                };
                // SAFETY: token t's row of head hi in y belongs to this worker.
                let yr = unsafe { std::slice::from_raw_parts_mut(y_p.at((t * h + hi) * p), p) };
                step.run(&mut st, pp, yr);
            }
            for (pi, srow) in s.chunks_exact_mut(n).enumerate() {
                for (ni, v) in srow.iter_mut().enumerate() {
                    *v = st[ni * pp + pi];
                }
            }
        }
    });
}

/// One token of one head for [`ssd_scan`], on the transposed state `st` [N][pp].
struct ScanStep<'a> {
    /// [P].
    x: &'a [f32],
    /// dt·B [N].
    dt_b: &'a [f32],
    /// [N].
    c: &'a [f32],
    /// exp(dt·a).
    da: f32,
    /// The D skip (0 for none).
    d: f32,
}

impl ScanStep<'_> {
    fn run(&self, st: &mut [f32], pp: usize, y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected; `st` holds N rows of pp (a multiple of 16).
            return unsafe { self.run_avx512(st, pp, y) };
        }
        let p = self.x.len();
        for (yv, &xv) in y.iter_mut().zip(self.x) {
            *yv = self.d * xv;
        }
        for ((srow, &db), &cn) in st.chunks_exact_mut(pp).zip(self.dt_b).zip(self.c) {
            for ((s, &xv), yv) in srow[..p].iter_mut().zip(self.x).zip(y.iter_mut()) {
                *s = self.da * *s + db * xv;
                *yv += cn * *s;
            }
        }
    }

    /// # Safety
    /// AVX-512 F; `st` holds N rows of `pp` floats, `pp` a multiple of 16 and >= P.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, st: &mut [f32], pp: usize, y: &mut [f32]) {
        use std::arch::x86_64::*;
        let p = self.x.len();
        assert!(st.len() >= self.c.len() * pp && pp >= p && y.len() >= p);
        let da = _mm512_set1_ps(self.da);
        for v in (0..p).step_by(16) {
            let left = p - v;
            let mask: __mmask16 = if left >= 16 { !0 } else { (1 << left) - 1 };
            // SAFETY: lanes v..v + 16 of every row are inside `st` (pp >= v + 16); x and y
            // are accessed under the mask of their p elements.
            unsafe {
                let xv = _mm512_maskz_loadu_ps(mask, self.x.as_ptr().add(v));
                // One state row: S[n] = da·S[n] + dt·B[n]·x; returns acc + C[n]·S[n].
                let row = |sp: *mut f32, db: f32, cn: f32, acc: __m512| {
                    let bx = _mm512_mul_ps(_mm512_set1_ps(db), xv);
                    let s = _mm512_fmadd_ps(da, _mm512_loadu_ps(sp), bx);
                    _mm512_storeu_ps(sp, s);
                    _mm512_fmadd_ps(_mm512_set1_ps(cn), s, acc)
                };
                // Two accumulators: half the dependency chain through y. One starts at D·x.
                let mut y0 = _mm512_mul_ps(_mm512_set1_ps(self.d), xv);
                let mut y1 = _mm512_setzero_ps();
                let mut sp = st.as_mut_ptr().add(v);
                let mut pairs = self.dt_b.chunks_exact(2).zip(self.c.chunks_exact(2));
                for (db, cn) in &mut pairs {
                    y0 = row(sp, db[0], cn[0], y0);
                    y1 = row(sp.add(pp), db[1], cn[1], y1);
                    sp = sp.add(2 * pp);
                }
                if let (Some(&db), Some(&cn)) = (
                    self.dt_b.chunks_exact(2).remainder().first(),
                    self.c.chunks_exact(2).remainder().first(),
                ) {
                    y0 = row(sp, db, cn, y0);
                }
                _mm512_mask_storeu_ps(y.as_mut_ptr().add(v), mask, _mm512_add_ps(y0, y1));
            }
        }
    }
}

/// Prefill conv of one sequence: `x` rows [L, C], `state` [(K−1)·C]. Returns (SiLU(conv)
/// [L·C], new state [(K−1)·C] = the last K−1 rows of [state; x]).
pub(crate) fn conv1d_prefill(
    x: AnyRows<'_>,
    state: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    fn run<T: Elem>(
        x: Rows<'_, T>,
        state: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
    ) -> (Vec<f32>, Vec<f32>) {
        let (l, c) = (x.rows, x.cols);
        let k = w.len() / c;
        let mut out = out_vec(l * c);
        let out_p = OutPtr(out.as_mut_ptr());
        par_ranges(l, l * c * k, |rows| {
            for t in rows {
                // SAFETY: row t of `out` is written by this worker only.
                let o = unsafe { std::slice::from_raw_parts_mut(out_p.at(t * c), c) };
                conv_prefill_row(t, state, x, w, bias, o);
            }
        });
        // New state: padded rows L..L+K−1 of [state; x].
        let mut new_state = Vec::with_capacity((k - 1) * c);
        for i in l..l + k - 1 {
            if i + 1 < k {
                new_state.extend_from_slice(&state[i * c..(i + 1) * c]);
            } else {
                new_state.extend(x.row(i + 1 - k).iter().map(|v| v.f32()));
            }
        }
        (out, new_state)
    }
    match x {
        AnyRows::F32(x) => run(x, state, w, bias),
        AnyRows::BF16(x) => run(x, state, w, bias),
    }
}
