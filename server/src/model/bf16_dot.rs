//! `out [m, n] (+)= act(x [m, k] · w [n, k]ᵀ + bias)` with both operands BF16 and f32
//! accumulation, on AVX-512 BF16 (`vdpbf16ps`: 32 products per instruction, twice as many
//! as an f32 FMA, and no widening of the weights).
//!
//! Used when the CPU matmul precision is BF16 ([`super::linear::CpuMatmul`]). The weights
//! and the activations are both k-contiguous, so each register tile takes dot products:
//! 6 weight rows × up to 4 activation rows, 24 accumulators of 16 lanes that are summed
//! once at the end of the row. Every product of two BF16 values is exact in f32; only the
//! order of the f32 additions differs from a scalar loop. The activations are rounded once
//! per call into the order the tiles read them, so a tile addresses all its rows from one
//! pointer (with a pointer per row, the loop ran out of general registers and spilled).
//!
//! Loop order, for prefill-sized inputs: the columns are split into blocks, one per work
//! item, whose weights fit in L2; a block walks the activation rows in chunks of
//! [`ROW_CHUNK`] (a chunk's BF16 rows stay in L2 too) and runs the epilogue on each chunk
//! while it is hot.

use half::bf16;

use super::cpu_math::{Activation, bias_act_rows};
use super::linear::{OutPtr, par_ranges};

/// Weight rows per register tile.
const TN: usize = 6;
/// Most activation rows per register tile.
const TM: usize = 4;
/// Activation rows per pass over a column block.
const ROW_CHUNK: usize = 64;
/// Most elements of a row per pass (a 6-row weight tile of 12 KiB).
const K_PIECE: usize = 1024;
/// Most weight bytes per column block (a share of a 1 MiB L2).
const BLOCK_BYTES: usize = 256 << 10;

/// Whether this CPU runs [`matmul`] (AVX-512 F, BW and BF16).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What is applied to each output element after the product.
#[derive(Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub act: Activation,
    /// Add to `out` instead of overwriting it (then `act` must be the identity).
    pub accumulate: bool,
}

/// `out [m, n] = act(bf16(x) · wᵀ + bias)`, or `out += bf16(x) · wᵀ + bias` with
/// `accumulate`, where `bf16(x)` rounds the activations to nearest even. Panics unless
/// [`available`] and the slices hold the shapes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    out: &mut [f32],
    epilogue: Epilogue,
) {
    assert!(available(), "bf16 dot products need AVX-512 BF16");
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    assert!(epilogue.bias.is_none_or(|b| b.len() == n));
    assert!(!epilogue.accumulate || epilogue.act == Activation::Identity);
    if m == 0 || n == 0 {
        return;
    }
    // Blocks of whole tiles, small enough for L2 and at least four per thread (the pool
    // hands them out one by one, so a thread descheduled on a busy machine does not hold
    // up the rest), unless that would make them smaller than a tile.
    let threads = candle_core::utils::barrier_pool().n_workers() + 1;
    let tiles = n.div_ceil(TN);
    let most = (BLOCK_BYTES / (2 * k.max(1)) / TN).max(1);
    let blocks = tiles.div_ceil(most).max(4 * threads).min(tiles);
    let per_block = tiles.div_ceil(blocks);
    let blocks = tiles.div_ceil(per_block);
    let packed = pack_rows(x, m, k);
    let kp = k.next_multiple_of(32);
    let dst = OutPtr(out.as_mut_ptr());
    let (xp, wp) = (Ptr(packed.as_ptr()), Ptr(w.as_ptr() as *const u16));
    // Long rows are taken in pieces, so that a tile's weight rows stay in L1 while every
    // row of a chunk passes (the later pieces add to the output).
    let pieces = k.div_ceil(K_PIECE);
    let piece = k.div_ceil(pieces).next_multiple_of(32).min(k);
    par_ranges(blocks, m * n * k, |items| {
        for b in items {
            let (c0, c1) = (b * per_block * TN, ((b + 1) * per_block * TN).min(n));
            for r0 in (0..m).step_by(ROW_CHUNK) {
                let r1 = (r0 + ROW_CHUNK).min(m);
                for k0 in (0..k).step_by(piece) {
                    for o0 in (c0..c1).step_by(TN) {
                        let mut t0 = r0;
                        while t0 < r1 {
                            let rows = TM.min(r1 - t0);
                            let tile = Tile {
                                x: xp.at(t0 * kp + k0 * rows),
                                w: wp.at(k0),
                                k,
                                len: piece.min(k - k0),
                                n,
                                o0,
                                cols: TN.min(n - o0),
                                out: dst.at(t0 * n),
                                accumulate: epilogue.accumulate || k0 > 0,
                            };
                            // SAFETY: `available` was asserted; rows t0..t0+rows of x and
                            // out and weight rows o0..o0+cols lie inside the slices (asserted
                            // above), and this block alone writes columns c0..c1.
                            #[cfg(target_arch = "x86_64")]
                            unsafe {
                                match rows {
                                    1 => tile.run::<1>(),
                                    2 => tile.run::<2>(),
                                    3 => tile.run::<3>(),
                                    _ => tile.run::<4>(),
                                }
                            }
                            t0 += rows;
                        }
                    }
                }
                if epilogue.bias.is_some() || epilogue.act != Activation::Identity {
                    let bias = epilogue.bias.map(|b| &b[c0..c1]);
                    for r in r0..r1 {
                        // SAFETY: row r, columns c0..c1 of out: this block's own elements.
                        let row =
                            unsafe { std::slice::from_raw_parts_mut(dst.at(r * n + c0), c1 - c0) };
                        bias_act_rows(row, bias, epilogue.act);
                    }
                }
            }
        }
    });
}

/// The activations rounded to BF16 in the order the tiles read them: for each tile of
/// [`TM`] rows (fewer in the last), k in steps of 32 (the last zero-padded), each step's
/// 32 values of every row of the tile back to back. A tile then reads all its rows from
/// one pointer at fixed offsets, and its step-`s` values sit at `t0·kp + s·32·rows`.
fn pack_rows(x: &[f32], m: usize, k: usize) -> Vec<u16> {
    let kp = k.next_multiple_of(32);
    let mut packed = vec![0u16; m * kp];
    let dst = PtrMut(packed.as_mut_ptr());
    par_ranges(m.div_ceil(TM), m * k, |tiles| {
        for tile in tiles {
            let t0 = tile * TM;
            let rows = TM.min(m - t0);
            for r in 0..rows {
                for s in 0..kp / 32 {
                    let (i, len) = (s * 32, 32.min(k - s * 32));
                    // SAFETY: `available` holds (checked by the caller); row t0 + r, elements
                    // i..i + len of x, and this tile's own 32 slots of `packed`.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        round_32(
                            x.as_ptr().add((t0 + r) * k + i),
                            len,
                            dst.at(t0 * kp + s * 32 * rows + r * 32),
                        )
                    }
                }
            }
        }
    });
    packed
}

/// Round `len <= 32` floats to BF16 (nearest even) into 32 slots, zero-filled past `len`.
///
/// # Safety
/// AVX-512 F, BW and BF16; `src` holds `len` floats and `dst` 32 slots.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn round_32(src: *const f32, len: usize, dst: *mut u16) {
    use std::arch::x86_64::*;
    let mask = if len >= 32 {
        u32::MAX
    } else {
        (1u32 << len) - 1
    };
    // SAFETY: masked-off lanes are not read; dst holds 32 slots.
    unsafe {
        let lo = _mm512_maskz_loadu_ps(mask as u16, src);
        let hi = _mm512_maskz_loadu_ps((mask >> 16) as u16, src.add(16));
        // The second operand fills the low half.
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst as *mut __m512i, v);
    }
}

#[derive(Clone, Copy)]
struct PtrMut(*mut u16);
// SAFETY: each worker writes its own row tiles of the packed buffer.
unsafe impl Send for PtrMut {}
unsafe impl Sync for PtrMut {}
impl PtrMut {
    fn at(&self, i: usize) -> *mut u16 {
        self.0.wrapping_add(i)
    }
}

#[derive(Clone, Copy)]
struct Ptr(*const u16);
// SAFETY: read-only inputs shared by the workers.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}
impl Ptr {
    // A method (not `.0`) so closures capture the whole Sync wrapper, not the raw field.
    fn at(&self, i: usize) -> *const u16 {
        self.0.wrapping_add(i)
    }
}

/// One register tile over `len` elements of each row: activation rows from `x` (packed by
/// [`pack_rows`], this tile's first step), weight rows `o0..o0 + cols` of `w` (k apart),
/// outputs from `out` (rows n apart, column o0 on); all BF16 bits but `out`.
struct Tile {
    x: *const u16,
    w: *const u16,
    k: usize,
    len: usize,
    n: usize,
    o0: usize,
    cols: usize,
    out: *mut f32,
    accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    /// # Safety
    /// AVX-512 F, BW and BF16; `R` activation rows and `cols` weight rows as described on
    /// [`Tile`].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn run<const R: usize>(&self) {
        use std::arch::x86_64::*;
        let (k, len) = (self.k, self.len);
        // A partial tile repeats its last weight row; those results are not stored.
        let wrow: [*const u16; TN] =
            std::array::from_fn(|j| self.w.wrapping_add((self.o0 + j.min(self.cols - 1)) * k));
        let mut acc = [[_mm512_setzero_ps(); TN]; R];
        // SAFETY (all loads): full weight loads read i..i + 32 <= len; the tail's masked
        // loads touch only the elements below len (masked-off lanes are not accessed); the
        // packed activations hold every step of 32 in full.
        unsafe {
            // One k step of 32: each weight slice is loaded once and meets every row.
            macro_rules! step {
                ($i:ident, $p:ident => $load:expr) => {{
                    // The next tile's weight rows, while this one computes.
                    for wr in &wrow {
                        _mm_prefetch::<_MM_HINT_T0>(wr.wrapping_add(TN * k + $i) as *const i8);
                    }
                    let wv: [__m512bh; TN] = std::array::from_fn(|j| {
                        let $p = wrow[j].add($i);
                        $load
                    });
                    // The packed rows are zero-padded: full loads, also in the tail.
                    let xs = self.x.add($i * R);
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        let xv: __m512bh =
                            std::mem::transmute(_mm512_loadu_si512(xs.add(r * 32) as *const __m512i));
                        for (a, wj) in acc_r.iter_mut().zip(&wv) {
                            *a = _mm512_dpbf16_ps(*a, xv, *wj);
                        }
                    }
                }};
            }
            let mut i = 0;
            while i + 32 <= len {
                step!(i, p => std::mem::transmute(_mm512_loadu_si512(p as *const __m512i)));
                i += 32;
            }
            if i < len {
                let mask: __mmask32 = (1u32 << (len - i)) - 1;
                step!(i, p => std::mem::transmute(_mm512_maskz_loadu_epi16(mask, p as *const i16)));
            }
            // Column j's accumulators of every row; rows beyond R sum zeros (the reduction
            // takes four vectors at a time).
            let by_col: [[__m512; 4]; TN] = std::array::from_fn(|j| {
                std::array::from_fn(|r| {
                    if r < R {
                        acc[r][j]
                    } else {
                        _mm512_setzero_ps()
                    }
                })
            });
            for (j, [a, b, c, d]) in by_col.into_iter().enumerate() {
                let sums = sum4(a, b, c, d);
                if j >= self.cols {
                    continue;
                }
                for (r, &s) in sums.iter().enumerate().take(R) {
                    let y = self.out.add(r * self.n + self.o0 + j);
                    *y = if self.accumulate { *y + s } else { s };
                }
            }
        }
    }
}

/// The lane sums of four vectors: a transposing add tree, about a third of the work of
/// four separate horizontal sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum4(
    a: std::arch::x86_64::__m512,
    b: std::arch::x86_64::__m512,
    c: std::arch::x86_64::__m512,
    d: std::arch::x86_64::__m512,
) -> [f32; 4] {
    use std::arch::x86_64::*;
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d.
    let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    // Per 128-bit lane: [Σa, Σb, Σc, Σd] of that lane's four elements.
    let abd = _mm512_castps_pd(ab);
    let cdd = _mm512_castps_pd(cd);
    let s = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)),
    );
    // Add the four 128-bit lanes.
    let s = _mm512_add_ps(s, _mm512_shuffle_f32x4::<0b01_00_11_10>(s, s));
    let s = _mm512_add_ps(s, _mm512_shuffle_f32x4::<0b10_11_00_01>(s, s));
    let mut out = [0f32; 4];
    // SAFETY: `out` holds 4 floats.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), _mm512_castps512_ps128(s)) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tile shape (1–4 rows, partial weight tiles, k tails, several row chunks and
    /// column blocks), each epilogue, against f64 sums of the same BF16 products.
    #[test]
    fn matches_f64_products() {
        if !available() {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return;
        }
        let mut rnd = super::super::cpu_math::uniform_rng(11);
        for (m, k, n) in [
            (1, 32, 6),
            (3, 40, 7),
            (4, 64, 12),
            (9, 77, 13),
            (16, 768, 50),
            (130, 33, 100),
            (5, 3000, 31),
            (7, 2100, 20),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(rnd())).collect();
            let bias: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let init: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
            for (act, with_bias, accumulate) in [
                (Activation::Identity, false, false),
                (Activation::Identity, true, true),
                (Activation::Relu2, true, false),
                (Activation::GeluErf, false, false),
            ] {
                let mut out = init.clone();
                let epilogue = Epilogue {
                    bias: with_bias.then_some(&bias[..]),
                    act,
                    accumulate,
                };
                matmul(&x, m, k, &w, n, &mut out, epilogue);
                for t in 0..m {
                    for o in 0..n {
                        let (mut dot, mut mag) = (0f64, 0f64);
                        for i in 0..k {
                            let xr = bf16::from_f32(x[t * k + i]).to_f64();
                            let p = xr * w[o * k + i].to_f64();
                            dot += p;
                            mag += p.abs();
                        }
                        if with_bias {
                            dot += bias[o] as f64;
                        }
                        if accumulate {
                            dot += init[t * n + o] as f64;
                        }
                        let want = match act {
                            Activation::Identity => dot,
                            Activation::Relu2 => dot.max(0.0).powi(2),
                            Activation::GeluErf => {
                                super::super::cpu_math::gelu_erf(dot as f32) as f64
                            }
                        };
                        let got = out[t * n + o] as f64;
                        // f32 sums of k exact products: error ≲ k·2⁻²⁴ of their magnitudes.
                        let tol = 1e-6 * (1.0 + mag + dot.abs()) * (1.0 + 2.0 * dot.abs());
                        assert!(
                            (got - want).abs() <= tol,
                            "m={m} k={k} n={n} ({t},{o}) {act:?}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
