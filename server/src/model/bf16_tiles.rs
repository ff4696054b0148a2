//! `out [m, n] (+)= x [m, k] · w [n, k]ᵀ` for a few activation rows (a decode batch) and
//! BF16 weights, with AVX-512: register tiles of up to 4 activation rows × 6 weight rows.
//!
//! A batched decode step is one such product per linear layer. Widening the weights to f32
//! for a general gemm costs a write and a read of twice the weight bytes per step, more
//! than the product itself at these sizes; a per-row dot product re-reads (and re-widens)
//! each weight row once per few activation rows and is bound by loads. Here each 16-wide
//! slice of 6 weight rows is widened once into registers (BF16 → f32 is a 16-bit shift)
//! and meets 4 activation rows: 24 independent FMA chains in 24 of the 32 registers, so the
//! loop runs at the FMA units' rate whenever the batch has 4 rows or more.

use half::bf16;

use super::linear::{OutPtr, par_ranges};

/// Weight rows per register tile.
const TN: usize = 6;
/// Most activation rows per register tile.
const TM: usize = 4;

/// Whether this CPU runs [`matmul`].
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out [m, n] = x [m, k] · w [n, k]ᵀ`, or `out += …` with `accumulate`. Each output element
/// is written exactly once. Panics unless [`available`] and the slices hold the shapes.
pub(crate) fn matmul(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    assert!(available(), "bf16 tiles need AVX-512F");
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let out = OutPtr(out.as_mut_ptr());
    let (xp, wp) = (XPtr(x.as_ptr()), WPtr(w.as_ptr() as *const u16));
    par_ranges(n.div_ceil(TN), m * n * k, |tiles| {
        for tile in tiles {
            let o0 = tile * TN;
            let cols = TN.min(n - o0);
            let mut t0 = 0;
            while t0 < m {
                let rows = TM.min(m - t0);
                let job = Tile {
                    x: xp.at(t0 * k),
                    w: wp.get(),
                    k,
                    n,
                    o0,
                    cols,
                    out: out.at(t0 * n),
                    accumulate,
                };
                // SAFETY: AVX-512F checked above; rows t0..t0+rows of x and out, weight
                // rows o0..o0+cols lie inside the slices (asserted), and this tile's output
                // elements are written by this worker only.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match rows {
                        1 => job.run::<1>(),
                        2 => job.run::<2>(),
                        3 => job.run::<3>(),
                        _ => job.run::<4>(),
                    }
                }
                t0 += rows;
            }
        }
    });
}

#[derive(Clone, Copy)]
struct XPtr(*const f32);
// SAFETY: read-only input shared by the workers.
unsafe impl Send for XPtr {}
unsafe impl Sync for XPtr {}
impl XPtr {
    fn at(&self, i: usize) -> *const f32 {
        self.0.wrapping_add(i)
    }
}

#[derive(Clone, Copy)]
struct WPtr(*const u16);
// SAFETY: read-only input shared by the workers.
unsafe impl Send for WPtr {}
unsafe impl Sync for WPtr {}
impl WPtr {
    fn get(&self) -> *const u16 {
        self.0
    }
}

/// One register tile: activation rows from `x` (k apart), weight rows `o0..o0 + cols` of
/// `w` ([n, k] BF16 bits), outputs from `out` (rows n apart, column o0 on).
struct Tile {
    x: *const f32,
    w: *const u16,
    k: usize,
    n: usize,
    o0: usize,
    cols: usize,
    out: *mut f32,
    accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    /// # Safety
    /// AVX-512F; `R` activation rows and `cols` weight rows as described on [`Tile`].
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const R: usize>(&self) {
        use std::arch::x86_64::*;
        let k = self.k;
        // A partial tile repeats its last weight row; those results are not stored.
        let wrow: [*const u16; TN] =
            std::array::from_fn(|j| self.w.wrapping_add((self.o0 + j.min(self.cols - 1)) * k));
        let mut acc = [[_mm512_setzero_ps(); TN]; R];
        let k16 = k - k % 16;
        let mut i = 0;
        // SAFETY (all loads): i + 16 <= k16 <= k, inside each row.
        unsafe {
            while i < k16 {
                let wv: [__m512; TN] = std::array::from_fn(|j| {
                    let bits = _mm256_loadu_si256(wrow[j].add(i) as *const __m256i);
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
                });
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(self.x.add(r * k + i));
                    for (a, wj) in acc_r.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(xv, *wj, *a);
                    }
                }
                i += 16;
            }
            // Reduce all TN sums with constant indices (a loop bounded by `cols` would keep
            // the accumulators addressable, i.e. stored to the stack every iteration).
            for (r, acc_r) in acc.iter().enumerate() {
                let sums: [f32; TN] = std::array::from_fn(|j| _mm512_reduce_add_ps(acc_r[j]));
                for (j, mut s) in sums.into_iter().enumerate().take(self.cols) {
                    for t in k16..k {
                        let wt = f32::from_bits((*wrow[j].add(t) as u32) << 16);
                        s += wt * *self.x.add(r * k + t);
                    }
                    let y = self.out.add(r * self.n + self.o0 + j);
                    *y = if self.accumulate { *y + s } else { s };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tile shape (1–4 rows, partial weight tiles, a k tail) against f64 sums.
    #[test]
    fn matches_f64_products() {
        if !available() {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        let mut rnd = super::super::cpu_math::uniform_rng(7);
        for (m, k, n) in [
            (1, 16, 6),
            (3, 40, 7),
            (4, 64, 12),
            (9, 77, 13),
            (16, 768, 50),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(rnd())).collect();
            let init: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
            for accumulate in [false, true] {
                let mut out = init.clone();
                matmul(&x, m, k, &w, n, &mut out, accumulate);
                for t in 0..m {
                    for o in 0..n {
                        let dot: f64 = (0..k)
                            .map(|i| x[t * k + i] as f64 * w[o * k + i].to_f64())
                            .sum();
                        let want = dot
                            + if accumulate {
                                init[t * n + o] as f64
                            } else {
                                0.0
                            };
                        let got = out[t * n + o] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "m={m} k={k} n={n} ({t},{o}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
