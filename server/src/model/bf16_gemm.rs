//! `C [m, n] = A [m, k] · B [k, n]` with both operands BF16 and f32 accumulation, on
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
//! The output is f32, or BF16 for a layer that only feeds another one ([`Store`]); A is
//! rounded from f32 or taken as it is from BF16 ([`PackedA::from_bf16`]).

use half::bf16;

use super::cpu_math::{Activation, dispatch};
use super::linear::par_ranges;

/// Output columns per panel: four vectors of 16 f32.
pub(crate) const NR: usize = 64;
/// Rows per register tile (with 4 column vectors: 24 of the 32 vector registers).
pub(crate) const MR: usize = 6;

/// Whether this CPU runs these kernels (AVX-512 F, BW, VL and BF16).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
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
/// an odd k), row after row. A tile reads its rows' pair `i` as one slot each. For an even
/// k this is a row-major BF16 matrix, so BF16 activations are used as they are.
pub(crate) struct PackedA<'a> {
    m: usize,
    k: usize,
    data: std::borrow::Cow<'a, [u32]>,
}

impl<'a> PackedA<'a> {
    /// The rows of a row-major BF16 matrix `x` [m, k]: borrowed when k is even and `x` is
    /// 4-byte aligned (the layouts are the same), else copied into pairs.
    pub(crate) fn from_bf16(x: &'a [bf16], m: usize, k: usize) -> Self {
        assert!(x.len() >= m * k);
        let pairs = k.div_ceil(2);
        if k.is_multiple_of(2) && (x.as_ptr() as usize).is_multiple_of(4) {
            // SAFETY: m·k BF16 values are m·k/2 32-bit slots, aligned as checked; every bit
            // pattern is a valid u32.
            let data = unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u32, m * pairs) };
            return PackedA {
                m,
                k,
                data: data.into(),
            };
        }
        let bits = |e: usize| x[e].to_bits() as u32;
        let data = (0..m * pairs)
            .map(|s| {
                let (r, i) = (s / pairs, s % pairs);
                let hi = if 2 * i + 1 < k {
                    bits(r * k + 2 * i + 1)
                } else {
                    0
                };
                pair(bits(r * k + 2 * i), hi)
            })
            .collect::<Vec<u32>>();
        PackedA {
            m,
            k,
            data: data.into(),
        }
    }

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
        PackedA {
            m,
            k,
            data: data.into(),
        }
    }

    pub(crate) fn tiles(&self) -> usize {
        self.m.div_ceil(MR)
    }

    /// The softmax numerators of score rows, as the A operand of `P · V`: row r of `s`
    /// (`k` floats, rows `k` apart) becomes `exp(scale · (s − max_r))` rounded to BF16, and
    /// `sums[r]` the f32 sum of the unrounded numerators. Dividing the product's rows by
    /// `sums` afterwards (as flash attention does) saves a pass over the probabilities.
    /// One pass for the max, one for exp, sum and rounding. Panics unless [`available`].
    pub(crate) fn softmax_numerators(
        s: &[f32],
        m: usize,
        k: usize,
        scale: f32,
        sums: &mut [f32],
    ) -> Self {
        assert!(available(), "bf16 dot products need AVX-512 BF16");
        assert!(s.len() >= m * k && sums.len() >= m);
        let pairs = k.div_ceil(2);
        let mut data: Vec<u32> = Vec::with_capacity(m * pairs);
        for (r, sum) in sums[..m].iter_mut().enumerate() {
            // SAFETY: available; row r's `pairs` slots lie inside the capacity.
            *sum = unsafe { exp_row(&s[r * k..][..k], scale, data.as_mut_ptr().add(r * pairs)) };
        }
        // SAFETY: every row wrote all of its slots.
        unsafe { data.set_len(m * pairs) };
        PackedA {
            m,
            k,
            data: data.into(),
        }
    }
}

/// `out` = pairs of `exp(scale · (row − max))` rounded to BF16 (a zero partner past the
/// end); returns the sum of the unrounded values.
///
/// # Safety
/// AVX-512 F, BW and BF16; `out` is valid for `row.len().div_ceil(2)` slots.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn exp_row(row: &[f32], scale: f32, out: *mut u32) -> f32 {
    use super::cpu_math::{exp, exp16};
    use std::arch::x86_64::*;
    let chunks = row.chunks_exact(16);
    let tail = chunks.remainder();
    // SAFETY: whole 16-float chunks of `row`.
    let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
    for c in chunks {
        mv = _mm512_max_ps(mv, unsafe { _mm512_loadu_ps(c.as_ptr()) });
    }
    let max = tail.iter().fold(_mm512_reduce_max_ps(mv), |a, &b| a.max(b));
    let whole = row.len() / 32;
    let (vmax, vscale) = (_mm512_set1_ps(max), _mm512_set1_ps(scale));
    let mut vsum = [_mm512_setzero_ps(); 2];
    for (i, c) in row.chunks_exact(32).enumerate() {
        // SAFETY: 32 floats of `row`; slots 16i..16i + 16 are inside `out`.
        unsafe {
            let e = [0, 16].map(|h| {
                let v = _mm512_loadu_ps(c.as_ptr().add(h));
                exp16(_mm512_mul_ps(_mm512_sub_ps(v, vmax), vscale))
            });
            vsum = [_mm512_add_ps(vsum[0], e[0]), _mm512_add_ps(vsum[1], e[1])];
            // The second operand fills the low half.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(e[1], e[0]));
            _mm512_storeu_si512(out.add(16 * i) as *mut __m512i, v);
        }
    }
    let mut sum = 0f32;
    let rest = &row[32 * whole..];
    for (i, two) in rest.chunks(2).enumerate() {
        let lo = exp((two[0] - max) * scale);
        let hi = two.get(1).map_or(0.0, |&v| exp((v - max) * scale));
        sum += lo + hi;
        let hi_bits = if two.len() == 2 { round_bf16(hi) } else { 0 };
        // SAFETY: slot 16·whole + i is inside `out`.
        unsafe { *out.add(16 * whole + i) = pair(round_bf16(lo), hi_bits) };
    }
    sum + _mm512_reduce_add_ps(_mm512_add_ps(vsum[0], vsum[1]))
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn exp_row(_: &[f32], _: f32, _: *mut u32) -> f32 {
    unreachable!("softmax_numerators checks available()")
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

/// `act` of 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn activate(v: std::arch::x86_64::__m512, act: Activation) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    match act {
        Activation::Identity => v,
        Activation::Relu2 => {
            let r = _mm512_max_ps(v, _mm512_setzero_ps());
            _mm512_mul_ps(r, r)
        }
        Activation::GeluErf => super::cpu_math::gelu16(v),
    }
}

/// Rows of A per work item of [`matmul`] (whole tiles).
const ROW_CHUNK: usize = 16 * MR;

/// What is applied to each output element after the product: `act(c + bias) + residual`.
#[derive(Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    /// One per column of B.
    pub bias: Option<&'a [f32]>,
    pub act: Activation,
    /// Laid out as the output (same origin and row stride): read, never written, so the
    /// residual stream needs no copy.
    pub residual: Option<&'a [f32]>,
}

impl Epilogue<'_> {
    /// Store the products as they are.
    pub(crate) const NONE: Epilogue<'static> = Epilogue {
        bias: None,
        act: Activation::Identity,
        residual: None,
    };
}

/// An output element of the kernel: how 16 f32 results are stored.
pub(crate) trait Store: Copy {
    /// Stores the `mask`ed lanes of `v` at `dst`.
    ///
    /// # Safety
    /// AVX-512 F, BW, VL and BF16; those lanes of `dst` are valid for writes.
    #[cfg(target_arch = "x86_64")]
    unsafe fn store16(
        dst: *mut Self,
        mask: std::arch::x86_64::__mmask16,
        v: std::arch::x86_64::__m512,
    );
}

impl Store for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn store16(
        dst: *mut f32,
        mask: std::arch::x86_64::__mmask16,
        v: std::arch::x86_64::__m512,
    ) {
        // SAFETY: as documented on the trait.
        unsafe { std::arch::x86_64::_mm512_mask_storeu_ps(dst, mask, v) }
    }
}

/// Rounded to nearest even, as [`PackedA::from_f32`] rounds the next layer's input.
impl Store for bf16 {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn store16(
        dst: *mut bf16,
        mask: std::arch::x86_64::__mmask16,
        v: std::arch::x86_64::__m512,
    ) {
        use std::arch::x86_64::*;
        // SAFETY: as documented on the trait; __m256bh and __m256i are the same 256 bits.
        unsafe {
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_mask_storeu_epi16(dst as *mut i16, mask, h);
        }
    }
}

/// `act(A · W + bias) + residual` as a new [m, n] buffer of f32 or (rounded) BF16, for the
/// activations `a` [m, k] and the packed weights `w` (a residual is [m, n] too). Not zeroed
/// first: every element is written once. Panics unless [`available`] and the slices hold
/// the shapes.
pub(crate) fn matmul<O: Store>(a: &PackedA, w: &PackedB, epilogue: Epilogue) -> Vec<O> {
    let (m, n) = (a.m, w.n);
    assert!(available(), "bf16 dot products need AVX-512 BF16");
    assert_eq!(a.k, w.k);
    assert!(epilogue.residual.is_none_or(|r| r.len() >= m * n));
    let len = m * n;
    let mut out: Vec<O> = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    let panels = w.panels();
    let chunks = m.div_ceil(ROW_CHUNK);
    let dst = StorePtr(out.as_mut_ptr());
    par_ranges(panels * chunks, m * n * a.k, |items| {
        for item in items {
            let (c, p) = (item / panels, item % panels);
            let tiles = c * ROW_CHUNK / MR..((c + 1) * ROW_CHUNK / MR).min(a.tiles());
            // SAFETY: available; the capacity holds [m, n], of which this item alone writes
            // the rows of chunk c and the columns of panel p.
            unsafe { gemm_block(a, tiles, w, p..p + 1, dst.at(0), n, epilogue) };
        }
    });
    // SAFETY: the tiles stored every element of every row < m and column < n.
    unsafe { out.set_len(len) };
    out
}

/// The output buffer, written by the workers in disjoint tiles.
struct StorePtr<O>(*mut O);
impl<O> Clone for StorePtr<O> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<O> Copy for StorePtr<O> {}
// SAFETY: each worker writes its own (row chunk, panel) blocks.
unsafe impl<O> Send for StorePtr<O> {}
unsafe impl<O> Sync for StorePtr<O> {}
impl<O> StorePtr<O> {
    // A method (not `.0`) so closures capture the whole Sync wrapper, not the raw field.
    fn at(&self, i: usize) -> *mut O {
        self.0.wrapping_add(i)
    }
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

/// `C[r][c] = Σ_i A[r][i]·B[i][c]` for A's row tiles `tiles` and B's column panels
/// `panels`, on the calling thread: `out` is C's element (0, 0), rows `ldc` apart. With
/// `epilogue` applied as each register tile is stored.
///
/// # Safety
/// [`available`]; `a.k == b.k`; the ranges lie inside A's tiles and B's panels; every C
/// element of those rows (< m) and columns (< n) is valid for writes, and no other thread
/// touches them during the call.
pub(crate) unsafe fn gemm_block<O: Store>(
    a: &PackedA,
    tiles: std::ops::Range<usize>,
    b: &PackedB,
    panels: std::ops::Range<usize>,
    out: *mut O,
    ldc: usize,
    epilogue: Epilogue,
) {
    debug_assert_eq!(a.k, b.k);
    assert!(epilogue.bias.is_none_or(|v| v.len() == b.n));
    assert!(
        epilogue
            .residual
            .is_none_or(|v| a.m == 0 || v.len() >= (a.m - 1) * ldc + b.n)
    );
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
                residual: epilogue
                    .residual
                    .map(|v| v.as_ptr().wrapping_add(t * MR * ldc + p * NR)),
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
struct Tile<'a, O> {
    a: *const u32,
    b: *const u32,
    pairs: usize,
    out: *mut O,
    ldc: usize,
    cols: usize,
    bias: Option<&'a [f32]>,
    act: Activation,
    /// This tile's element (0, 0) of the residual, rows `ldc` apart.
    residual: Option<*const f32>,
}

#[cfg(target_arch = "x86_64")]
impl<O: Store> Tile<'_, O> {
    /// # Safety
    /// AVX-512 F, BW and BF16; the pointers as described on [`gemm_block`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn run<const R: usize>(&self) {
        // SAFETY: forwarded from the caller. Two functions: when the product and the
        // epilogue shared one body, `acc` lived on the stack (zeroed by a memset per tile)
        // instead of in registers.
        unsafe {
            let acc = self.products::<R>();
            self.store::<R>(&acc);
        }
    }

    /// The tile's f32 products, accumulated in registers.
    ///
    /// # Safety
    /// As [`Tile::run`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[inline]
    unsafe fn products<const R: usize>(&self) -> [[std::arch::x86_64::__m512; 4]; R] {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        // SAFETY: A's R rows and B's panel hold `pairs` slots and steps of NR slots.
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
        }
        acc
    }

    /// The epilogue of each product, stored under the column mask.
    ///
    /// # Safety
    /// As [`Tile::run`]: the output rows < R and columns < cols are C's.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[inline(never)]
    unsafe fn store<const R: usize>(&self, acc: &[[std::arch::x86_64::__m512; 4]; R]) {
        use std::arch::x86_64::*;
        // SAFETY: as documented; bias and residual hold the same columns.
        unsafe {
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
                    if let Some(res) = self.residual {
                        let res = res.add(r * self.ldc + c0);
                        sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, res), sum);
                    }
                    O::store16(y, mask, sum);
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
            let (bias, init): (&'static [f32], &'static [f32]) = (bias.leak(), init.leak());
            let epi = |bias: Option<&'static [f32]>, act, residual| Epilogue {
                bias,
                act,
                residual,
            };
            for (packed, epilogue) in [
                (PackedB::from_weight_rows(&wb, n, k), Epilogue::NONE),
                (
                    PackedB::from_weight_rows(&wb, n, k),
                    epi(Some(bias), Activation::GeluErf, None),
                ),
                (
                    PackedB::from_f32_rows(&bt, k, n, k),
                    epi(Some(bias), Activation::Relu2, Some(init)),
                ),
                (
                    PackedB::from_f32_cols(&b_kn, n, k, n),
                    epi(None, Activation::Relu2, None),
                ),
            ] {
                // Every element is overwritten.
                let mut out = vec![f32::NAN; m * n];
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
                        let want = want + epilogue.residual.map_or(0.0, |v| v[t * n + o] as f64);
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
