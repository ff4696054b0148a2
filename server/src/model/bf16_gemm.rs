//! `C [m, n] (+)= A [m, k] · B [k, n]` with both operands BF16 and f32 accumulation, on
//! AVX-512 BF16 (`vdpbf16ps`: 32 products per instruction, twice an f32 FMA's).
//!
//! The outer-product form of a packed GEMM: `vdpbf16ps` multiplies pairs of adjacent
//! BF16 values, so B is packed once into panels of [`NR`] columns where each 32-bit slot
//! holds one column's two values of a contraction pair (2i, 2i+1), and A's rows are rounded
//! into the same pair slots. A register tile of [`MR`] rows then takes, per pair, four
//! 16-column vectors of B and one broadcast slot of each A row: 24 accumulators that
//! are the output elements themselves (no reductions at the end of a row, unlike dot
//! products of unpacked rows), stored with masks at the edges.
//!
//! Every product of two BF16 values is exact in f32; only the order of the f32 additions
//! differs from a scalar loop. Used for the linear layers' weights in the BF16 CPU matmul
//! mode ([`super::linear::CpuMatmul`]), packed once at load time, and for the vision
//! encoder's attention, whose keys and values are packed per call.

use half::bf16;

use super::cpu_math::{Activation, dispatch};
use super::linear::{OutPtr, par_ranges};

/// Output columns per panel: four vectors of 16 f32.
pub(crate) const NR: usize = 64;
/// Rows per register tile (with 4 column vectors: 24 of the 32 vector registers).
pub(crate) const MR: usize = 6;

/// Whether this CPU runs these kernels (AVX-512 F, BW and BF16).
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

/// BF16 bits of `v`, rounded to nearest even (NaN stays NaN): the rounding of
/// `vcvtne2ps2bf16` for every input the model produces.
#[inline(always)]
fn round_bf16(v: f32) -> u32 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    // Both sides computed, so that loops over it vectorize.
    if v.is_nan() {
        (b >> 16) | 0x40
    } else {
        rounded
    }
}

/// Two BF16 values as one slot, the first in the low half (the lower address).
#[inline(always)]
fn pair(lo: u32, hi: u32) -> u32 {
    lo | (hi << 16)
}

dispatch! {
    /// `out[j]` = (lo[j], hi[j]) rounded to BF16.
    fn round_pairs(lo: &[f32], hi: &[f32], out: &mut [u32]) {
        for ((o, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
            *o = pair(round_bf16(l), round_bf16(h));
        }
    }
}

/// The B operand, packed: panel `p` holds columns `p·NR..`, and in it contraction pair `i`
/// holds `NR` slots, one per column. Columns past `n` and the partner of an odd last
/// index are zero, so the kernel runs whole panels and pairs.
pub(crate) struct PackedB {
    k: usize,
    n: usize,
    data: Vec<u32>,
}

// Shapes only: the data is the size of the weights.
impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedB")
            .field("k", &self.k)
            .field("n", &self.n)
            .finish_non_exhaustive()
    }
}

impl PackedB {
    /// Contraction length.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Columns.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    fn pairs(&self) -> usize {
        self.k.div_ceil(2)
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// Packs `B[i][j] = slot(j, i)` where `slot(j, i)` gives column j's BF16 pair at
    /// contraction pair i; panels are filled in parallel.
    fn build(k: usize, n: usize, slot: impl Fn(usize, usize) -> u32 + Sync) -> Self {
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * pairs * NR];
        let dst = SlotPtr(data.as_mut_ptr());
        par_ranges(panels, pairs * NR * 4, |ps| {
            for p in ps {
                let cols = NR.min(n - p * NR);
                for i in 0..pairs {
                    for c in 0..cols {
                        // SAFETY: panel p's own slots, inside `data`.
                        unsafe { *dst.at((p * pairs + i) * NR + c) = slot(p * NR + c, i) };
                    }
                }
            }
        });
        PackedB { k, n, data }
    }

    /// From weight rows `w` [n, k] (so that `C = A · wᵀ`): a pair is two adjacent
    /// elements of one row.
    pub(crate) fn from_weight_rows(w: &[bf16], n: usize, k: usize) -> Self {
        assert!(w.len() >= n * k);
        let bits = |j: usize, e: usize| {
            if e < k {
                w[j * k + e].to_bits() as u32
            } else {
                0
            }
        };
        Self::build(k, n, |j, i| pair(bits(j, 2 * i), bits(j, 2 * i + 1)))
    }

    /// From f32 rows `src[j·stride + e]`, j < n, e < k, rounded to BF16 (attention keys:
    /// `C = Q · Kᵀ`).
    /// Packed on the calling thread (callers pack many at once).
    pub(crate) fn from_f32_rows(src: &[f32], stride: usize, n: usize, k: usize) -> Self {
        let (pairs, panels) = (k.div_ceil(2), n.div_ceil(NR));
        let mut data = vec![0u32; panels * pairs * NR];
        let mut row = vec![0u32; pairs];
        for j in 0..n {
            round_row(&src[j * stride..][..k], &mut row);
            let (p, c) = (j / NR, j % NR);
            for (i, &v) in row.iter().enumerate() {
                data[(p * pairs + i) * NR + c] = v;
            }
        }
        PackedB { k, n, data }
    }

    /// From f32 rows `src[e·stride + j]`, e < k, j < n, rounded to BF16 (attention values:
    /// `C = P · V`).
    /// Packed on the calling thread.
    pub(crate) fn from_f32_cols(src: &[f32], stride: usize, k: usize, n: usize) -> Self {
        let (pairs, panels) = (k.div_ceil(2), n.div_ceil(NR));
        let mut data = vec![0u32; panels * pairs * NR];
        let zeros = vec![0f32; n];
        for i in 0..pairs {
            let lo = &src[2 * i * stride..][..n];
            let hi = match 2 * i + 1 < k {
                true => &src[(2 * i + 1) * stride..][..n],
                false => &zeros[..],
            };
            for p in 0..panels {
                let cols = p * NR..(p * NR + NR).min(n);
                let out = &mut data[(p * pairs + i) * NR..][..cols.len()];
                round_pairs(&lo[cols.clone()], &hi[cols], out);
            }
        }
        PackedB { k, n, data }
    }
}

/// The A operand: its rows rounded to BF16, each padded to whole pairs (a zero partner for
/// an odd k), row after row. A tile reads its rows' pair `i` as one slot each.
pub(crate) struct PackedA {
    m: usize,
    k: usize,
    data: Vec<u32>,
}

impl PackedA {
    /// Rows `x[r·stride..][..k]`, r < m, rounded to BF16 (nearest even); rows are rounded
    /// in parallel when `parallel`.
    pub(crate) fn from_f32(x: &[f32], stride: usize, m: usize, k: usize, parallel: bool) -> Self {
        assert!(m == 0 || x.len() >= (m - 1) * stride + k);
        let pairs = k.div_ceil(2);
        let mut data = vec![0u32; m * pairs];
        let dst = SlotPtr(data.as_mut_ptr());
        let pack = |rows: std::ops::Range<usize>| {
            for r in rows {
                let src = &x[r * stride..][..k];
                // SAFETY: row r's own slots, inside `data`.
                let out = unsafe { std::slice::from_raw_parts_mut(dst.at(r * pairs), pairs) };
                round_row(src, out);
            }
        };
        if parallel {
            par_ranges(m, m * k * 2, pack);
        } else {
            pack(0..m);
        }
        PackedA { m, k, data }
    }

    pub(crate) fn tiles(&self) -> usize {
        self.m.div_ceil(MR)
    }
}

/// `src` rounded to BF16 pairs: `out[i]` = (src[2i], src[2i + 1]), zero past the end.
fn round_row(src: &[f32], out: &mut [u32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if available() {
        done = src.len() / 32 * 32;
        for (s, o) in src[..done].chunks_exact(32).zip(out.chunks_exact_mut(16)) {
            // SAFETY: available; 32 floats in, 16 slots out.
            unsafe { round_32(s.as_ptr(), o.as_mut_ptr()) };
        }
    }
    for (i, o) in out.iter_mut().enumerate().skip(done / 2) {
        let hi = src.get(2 * i + 1).map_or(0, |&v| round_bf16(v));
        *o = pair(round_bf16(src[2 * i]), hi);
    }
}

/// 32 floats rounded to BF16 (nearest even) into 16 pair slots.
///
/// # Safety
/// AVX-512 F, BW and BF16; `src` holds 32 floats and `dst` 16 slots.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn round_32(src: *const f32, dst: *mut u32) {
    use std::arch::x86_64::*;
    // SAFETY: as documented.
    unsafe {
        let lo = _mm512_loadu_ps(src);
        let hi = _mm512_loadu_ps(src.add(16));
        // The second operand fills the low half.
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst as *mut __m512i, v);
    }
}

/// `act` of 16 lanes (the scalar formulas, vectorized by the compiler in this context).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn activate(v: std::arch::x86_64::__m512, act: Activation) -> std::arch::x86_64::__m512 {
    use super::cpu_math::{gelu_erf, relu2};
    // SAFETY: __m512 and [f32; 16] have the same size; every bit pattern is valid in both.
    let mut lanes: [f32; 16] = unsafe { std::mem::transmute(v) };
    // A loop per arm: with a function pointer the calls were not inlined.
    match act {
        Activation::Identity => return v,
        Activation::Relu2 => lanes.iter_mut().for_each(|x| *x = relu2(*x)),
        Activation::GeluErf => lanes.iter_mut().for_each(|x| *x = gelu_erf(*x)),
    }
    unsafe { std::mem::transmute(lanes) }
}

/// Rows of A per work item of [`matmul`] (whole tiles).
const ROW_CHUNK: usize = 16 * MR;

/// What is applied to each output element after the product: `act(c + bias)`, added to
/// the output with `accumulate` (then `act` must be the identity), else stored.
#[derive(Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    /// One per column of B.
    pub bias: Option<&'a [f32]>,
    pub act: Activation,
    pub accumulate: bool,
}

impl Epilogue<'_> {
    /// Store the products as they are.
    pub(crate) const NONE: Epilogue<'static> = Epilogue {
        bias: None,
        act: Activation::Identity,
        accumulate: false,
    };
}

/// `out [m, n] = act(bf16(x) · W + bias)`, or `out += bf16(x) · W + bias` with
/// `accumulate`, for `x` [m, k] f32 and the packed weights `w`. Panics unless [`available`]
/// and the slices hold the shapes.
pub(crate) fn matmul(x: &[f32], m: usize, w: &PackedB, out: &mut [f32], epilogue: Epilogue) {
    assert!(out.len() >= m * w.n);
    // SAFETY: `out` holds [m, n] initialized elements.
    unsafe { run(x, m, w, out.as_mut_ptr(), epilogue) }
}

/// `act(bf16(x) · W + bias)` as a new [m, n] buffer, not zeroed first (every element is
/// written once).
pub(crate) fn matmul_new(
    x: &[f32],
    m: usize,
    w: &PackedB,
    bias: Option<&[f32]>,
    act: Activation,
) -> Vec<f32> {
    let len = m * w.n;
    let mut out = Vec::with_capacity(len);
    let epilogue = Epilogue {
        bias,
        act,
        accumulate: false,
    };
    // SAFETY: the capacity holds [m, n]; without `accumulate` nothing is read from it, and
    // the tiles store every element of every row < m and column < n before `set_len`.
    unsafe {
        run(x, m, w, out.as_mut_ptr(), epilogue);
        out.set_len(len);
    }
    out
}

/// [`matmul`] into `out` [m, n] (rows n apart). Work items are (panel, row chunk) pairs.
///
/// # Safety
/// `out` is valid for writes of [m, n], and for reads with `accumulate`.
unsafe fn run(x: &[f32], m: usize, w: &PackedB, out: *mut f32, epilogue: Epilogue) {
    let (k, n) = (w.k, w.n);
    assert!(available(), "bf16 dot products need AVX-512 BF16");
    assert!(x.len() >= m * k);
    if m == 0 || n == 0 {
        return;
    }
    let a = PackedA::from_f32(x, k, m, k, true);
    let panels = w.panels();
    let chunks = m.div_ceil(ROW_CHUNK);
    let dst = OutPtr(out);
    par_ranges(panels * chunks, m * n * k, |items| {
        for item in items {
            let (c, p) = (item / panels, item % panels);
            let tiles = c * ROW_CHUNK / MR..((c + 1) * ROW_CHUNK / MR).min(a.tiles());
            // SAFETY: available; this item alone writes rows of chunk c, columns of panel p.
            unsafe { gemm_block(&a, tiles, w, p..p + 1, dst.at(0), n, epilogue) };
        }
    });
}

#[derive(Clone, Copy)]
struct SlotPtr(*mut u32);
// SAFETY: each worker writes its own panels or tiles of the packed buffer.
unsafe impl Send for SlotPtr {}
unsafe impl Sync for SlotPtr {}
impl SlotPtr {
    // A method (not `.0`) so closures capture the whole Sync wrapper, not the raw field.
    fn at(&self, i: usize) -> *mut u32 {
        self.0.wrapping_add(i)
    }
}

/// `C[r][c] (+)= Σ_i A[r][i]·B[i][c]` for A's row tiles `tiles` and B's column panels
/// `panels`, on the calling thread: `out` is C's element (0, 0), rows `ldc` apart. With
/// `epilogue` applied as each register tile is stored.
///
/// # Safety
/// [`available`]; `a.k == b.k`; the ranges lie inside A's tiles and B's panels; every C
/// element of those rows (< m) and columns (< n) is valid for reads and writes, and no
/// other thread touches them during the call.
pub(crate) unsafe fn gemm_block(
    a: &PackedA,
    tiles: std::ops::Range<usize>,
    b: &PackedB,
    panels: std::ops::Range<usize>,
    out: *mut f32,
    ldc: usize,
    epilogue: Epilogue,
) {
    debug_assert_eq!(a.k, b.k);
    assert!(epilogue.bias.is_none_or(|v| v.len() == b.n));
    assert!(!epilogue.accumulate || epilogue.act == Activation::Identity);
    let pairs = b.pairs();
    for p in panels {
        let cols = NR.min(b.n - p * NR);
        let bp = b.data.as_ptr().wrapping_add(p * pairs * NR);
        for t in tiles.clone() {
            let rows = MR.min(a.m - t * MR);
            let tile = Tile {
                a: a.data.as_ptr().wrapping_add(t * MR * pairs),
                b: bp,
                pairs,
                out: out.wrapping_add(t * MR * ldc + p * NR),
                ldc,
                cols,
                bias: epilogue.bias.map(|v| &v[p * NR..p * NR + cols]),
                act: epilogue.act,
                accumulate: epilogue.accumulate,
            };
            // SAFETY: forwarded from the caller; the tile's rows and columns are inside C.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                match rows {
                    1 => tile.run::<1>(),
                    2 => tile.run::<2>(),
                    3 => tile.run::<3>(),
                    4 => tile.run::<4>(),
                    5 => tile.run::<5>(),
                    _ => tile.run::<6>(),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (tile, rows);
        }
    }
}

/// `C = A · B` over all of A's rows and B's columns, on the calling thread (`out` is C's
/// element (0, 0), rows `ldc` apart).
///
/// # Safety
/// As [`gemm_block`].
pub(crate) unsafe fn gemm(a: &PackedA, b: &PackedB, out: *mut f32, ldc: usize) {
    // SAFETY: forwarded from the caller.
    unsafe { gemm_block(a, 0..a.tiles(), b, 0..b.panels(), out, ldc, Epilogue::NONE) }
}

/// One register tile: `R` rows of A (`pairs` slots apart) against one B panel, and the
/// epilogue for its `cols` columns.
struct Tile<'a> {
    a: *const u32,
    b: *const u32,
    pairs: usize,
    out: *mut f32,
    ldc: usize,
    cols: usize,
    bias: Option<&'a [f32]>,
    act: Activation,
    accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
impl Tile<'_> {
    /// # Safety
    /// AVX-512 F, BW and BF16; the pointers as described on [`gemm_block`].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn run<const R: usize>(&self) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        // SAFETY: A's R rows and B's panel hold `pairs` slots and steps of NR slots; the output
        // rows < R and columns < cols are C's (caller).
        unsafe {
            for i in 0..self.pairs {
                let bp = self.b.add(i * NR);
                let bv: [__m512bh; 4] = std::array::from_fn(|v| {
                    std::mem::transmute(_mm512_loadu_si512(bp.add(16 * v) as *const __m512i))
                });
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let slot = *self.a.add(r * self.pairs + i);
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(slot as i32));
                    for (c, bv) in acc_r.iter_mut().zip(&bv) {
                        *c = _mm512_dpbf16_ps(*c, av, *bv);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (v, &sum) in acc_r.iter().enumerate() {
                    let c0 = 16 * v;
                    if c0 >= self.cols {
                        break;
                    }
                    let left = self.cols - c0;
                    let mask: __mmask16 = if left >= 16 { !0 } else { (1 << left) - 1 };
                    let y = self.out.add(r * self.ldc + c0);
                    let mut sum = sum;
                    if let Some(bias) = self.bias {
                        sum =
                            _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(c0)));
                    }
                    sum = activate(sum, self.act);
                    if self.accumulate {
                        sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, y), sum);
                    }
                    _mm512_mask_storeu_ps(y, mask, sum);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `C = A · B` against f64 sums of the same BF16 products, for every tile height, partial
    /// panels, odd k, the three packings of B, and each epilogue.
    #[test]
    fn matches_f64_products() {
        if !available() {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return;
        }
        let mut rnd = super::super::cpu_math::uniform_rng(11);
        let r = |v: f32| f32::from_bits(round_bf16(v) << 16) as f64;
        for (m, k, n) in [
            (1, 2, 1),
            (3, 41, 7),
            (6, 64, 64),
            (7, 77, 65),
            (13, 768, 50),
            (20, 33, 130),
            (5, 1500, 31),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            // B as rows of a [n, k] matrix (weights, keys) and as a [k, n] matrix (values).
            let bt: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let wb: Vec<bf16> = bt.iter().map(|&v| bf16::from_f32(v)).collect();
            let b_kn: Vec<f32> = (0..k * n).map(|e| bt[(e % n) * k + e / n]).collect();
            let init: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
            let bias: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let a = PackedA::from_f32(&x, k, m, k, true);
            let epi = |bias: Option<&'static [f32]>, act, accumulate| Epilogue {
                bias,
                act,
                accumulate,
            };
            let bias: &'static [f32] = bias.leak();
            for (packed, epilogue) in [
                (PackedB::from_weight_rows(&wb, n, k), Epilogue::NONE),
                (
                    PackedB::from_weight_rows(&wb, n, k),
                    epi(Some(bias), Activation::GeluErf, false),
                ),
                (
                    PackedB::from_f32_rows(&bt, k, n, k),
                    epi(Some(bias), Activation::Identity, true),
                ),
                (
                    PackedB::from_f32_cols(&b_kn, n, k, n),
                    epi(None, Activation::Relu2, false),
                ),
            ] {
                let mut out = init.clone();
                // SAFETY: available; out is [m, n] with ldc n.
                unsafe {
                    gemm_block(
                        &a,
                        0..a.tiles(),
                        &packed,
                        0..packed.panels(),
                        out.as_mut_ptr(),
                        n,
                        epilogue,
                    )
                };
                for t in 0..m {
                    for o in 0..n {
                        let (mut dot, mut mag) = (0f64, 0f64);
                        for i in 0..k {
                            let p = r(x[t * k + i]) * r(bt[o * k + i]);
                            dot += p;
                            mag += p.abs();
                        }
                        if let Some(b) = epilogue.bias {
                            dot += b[o] as f64;
                        }
                        let want = match epilogue.act {
                            Activation::Identity => dot,
                            Activation::Relu2 => dot.max(0.0).powi(2),
                            Activation::GeluErf => {
                                super::super::cpu_math::gelu_erf(dot as f32) as f64
                            }
                        };
                        let want = want
                            + if epilogue.accumulate {
                                init[t * n + o] as f64
                            } else {
                                0.0
                            };
                        let got = out[t * n + o] as f64;
                        // f32 sums of k exact products: error ≲ k·2⁻²⁴ of their magnitudes.
                        let tol = 1e-6 * (1.0 + mag + dot.abs()) * (1.0 + 2.0 * dot.abs());
                        assert!(
                            (got - want).abs() <= tol,
                            "m={m} k={k} n={n} ({t},{o}) {:?}: {got} vs {want}",
                            epilogue.act
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_is_nearest_even() {
        for v in [
            1.0f32,
            -2.5,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            3.4e38,
            1e-40,
            0.0,
        ] {
            assert_eq!(round_bf16(v), bf16::from_f32(v).to_bits() as u32, "{v}");
        }
        assert!(f32::from_bits(round_bf16(f32::NAN) << 16).is_nan());
    }
}
