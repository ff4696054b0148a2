//! Elementwise f32 math for the CPU hot loops (softmax, GELU, ReLU²), written branch-free so
//! that loops over slices vectorize, plus the run-time dispatch that compiles those loops for
//! AVX-512 / AVX2 when the CPU has them. libm's scalar `expf`/`erff` were a tenth of the
//! vision encoder's time.

/// `exp(x)` for `x <= 88` (inputs here are `<= 0`: softmax, `exp(-x²)`): Cephes' expf
/// (2^n · polynomial on |r| <= ln2/2), relative error about 2e-7 (tested below).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest with the 1.5·2^23 trick: integer ops on the bits of `t` vectorize,
    // a float → int cast does not (Rust's saturating `as`).
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // t's low mantissa bits hold n (|n| <= 127) as an offset from MAGIC's bits.
    let scale = f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    // Below the clamp the true value is < 2^-125: flush to 0 (softmax of -inf is 0).
    if x < -87.0 { 0.0 } else { y * scale }
}

/// [`exp`] of 16 lanes, with FMAs and `vscalefps` for the 2^n: the same reduction and
/// polynomial in a third of the instructions of the compiler's vectorization of [`exp`]
/// (which has no FMA contraction). For the BF16 attention's softmax.
///
/// # Safety
/// AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = _mm512_set1_ps;
    let xc = _mm512_min_ps(_mm512_max_ps(x, c(-87.0)), c(88.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(xc, c(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, c(0.693_359_4), xc);
    let r = _mm512_fnmadd_ps(n, c(-2.121_944_4e-4), r);
    let mut p = c(1.987_569_1e-4);
    for k in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, c(k));
    }
    let y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, c(1.0)));
    // As in `exp`: below the clamp (and for NaN) the result is 0.
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, c(-87.0));
    _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, n))
}

/// `erf(x)`, Abramowitz–Stegun 7.1.26 (absolute error < 1.5e-7, < 1e-6 with f32
/// rounding): the formula PyTorch's vectorized CPU `erf`, and so its exact GELU, uses.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (0.327_591_1 * a + 1.0);
    let mut r = 1.061_405_4 * t - 1.453_152;
    r = r * t + 1.421_413_8;
    r = r * t - 0.284_496_74;
    r = r * t + 0.254_829_6;
    let y = 1.0 - r * t * exp(-a * a);
    y.copysign(x)
}

/// Exact-erf GELU: `x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// [`gelu_erf`] of 16 lanes with FMAs and [`exp16`] (the linear layers' epilogue).
///
/// # Safety
/// AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn gelu16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = _mm512_set1_ps;
    let u = _mm512_mul_ps(x, c(std::f32::consts::FRAC_1_SQRT_2));
    let a = _mm512_abs_ps(u);
    let t = _mm512_div_ps(c(1.0), _mm512_fmadd_ps(c(0.327_591_1), a, c(1.0)));
    let mut r = _mm512_fmadd_ps(c(1.061_405_4), t, c(-1.453_152));
    for k in [1.421_413_8, -0.284_496_74, 0.254_829_6] {
        r = _mm512_fmadd_ps(r, t, c(k));
    }
    let e = exp16(_mm512_sub_ps(c(0.0), _mm512_mul_ps(a, a)));
    // |erf(u)| = 1 − r·t·e; 1 + erf(u) = 1 ± that, by the sign of u.
    let erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(r, t), e, c(1.0));
    let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(u, c(0.0));
    let erf = _mm512_mask_sub_ps(erf_abs, negative, c(0.0), erf_abs);
    _mm512_mul_ps(_mm512_mul_ps(c(0.5), x), _mm512_add_ps(c(1.0), erf))
}

/// `relu(x)²`.
#[inline(always)]
pub fn relu2(x: f32) -> f32 {
    let r = x.max(0.0);
    r * r
}

/// Compile `$body` (a block using the slice arguments, optionally generic over one type)
/// three times: AVX-512, AVX2+FMA and baseline, and pick one at run time. The element functions above are `inline(always)`, so
/// they are compiled with the features of the copy that calls them.
macro_rules! dispatch {
    ($(#[$meta:meta])* fn $name:ident $(<$g:ident: $bound:path>)? ($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        pub fn $name $(<$g: $bound>)? ($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn avx512 $(<$g: $bound>)? ($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2 $(<$g: $bound>)? ($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the features were detected at run time.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}

pub(crate) use dispatch;

thread_local! {
    /// Attention scores of one work item (a tile's or a sequence's query block), per pool
    /// thread, reused across calls.
    pub(crate) static SCORES: std::cell::RefCell<Vec<f32>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// `dst [m, n] = scale · lhs [m, k] · rhs [k, n]` on the calling thread (callers run many
/// of these in parallel). `dst` and `lhs` are row-major with the given row strides; rhs
/// element (i, j) is at `rhs + i·rhs_rs + j·rhs_cs`.
///
/// # Safety
/// Every operand element addressed this way must be valid, and `dst`'s written only here.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rows(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    scale: f32,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs,
            1,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// What to apply to each output element of a linear layer, after the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu2,
    GeluErf,
}

dispatch! {
    /// `out[r][c] = act(out[r][c] + bias[c])` over whole rows of `bias.len()` (any width
    /// without a bias).
    fn bias_act_rows(out: &mut [f32], bias: Option<&[f32]>, act: Activation) {
        match bias {
            Some(b) => {
                for row in out.chunks_exact_mut(b.len()) {
                    match act {
                        Activation::Identity => row.iter_mut().zip(b).for_each(|(v, b)| *v += b),
                        Activation::Relu2 => {
                            row.iter_mut().zip(b).for_each(|(v, b)| *v = relu2(*v + b))
                        }
                        Activation::GeluErf => {
                            row.iter_mut().zip(b).for_each(|(v, b)| *v = gelu_erf(*v + b))
                        }
                    }
                }
            }
            None => match act {
                Activation::Identity => {}
                Activation::Relu2 => out.iter_mut().for_each(|v| *v = relu2(*v)),
                Activation::GeluErf => out.iter_mut().for_each(|v| *v = gelu_erf(*v)),
            },
        }
    }
}

dispatch! {
    /// Softmax of one row scaled by `scale` (> 0), in place: `softmax(scale · row)`.
    fn softmax_in_place(row: &mut [f32], scale: f32) {
        // 16 independent lanes so the reductions vectorize without reassociation flags.
        const L: usize = 16;
        let mut m = [f32::NEG_INFINITY; L];
        let chunks = row.chunks_exact(L);
        let tail = chunks.remainder();
        for c in chunks {
            for j in 0..L {
                m[j] = m[j].max(c[j]);
            }
        }
        let max = tail.iter().chain(&m).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut s = [0f32; L];
        let mut chunks = row.chunks_exact_mut(L);
        for c in &mut chunks {
            for j in 0..L {
                c[j] = exp((c[j] - max) * scale);
                s[j] += c[j];
            }
        }
        let mut sum: f32 = 0.0;
        for v in chunks.into_remainder() {
            *v = exp((*v - max) * scale);
            sum += *v;
        }
        let inv = 1.0 / (sum + s.iter().sum::<f32>());
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

dispatch! {
    /// RMSNorm of one row: `out = x / sqrt(mean(x²) + eps) · w`.
    fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let inv = 1.0 / (sum_squares(x) / x.len() as f32 + eps).sqrt();
        for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
            *o = x * inv * w;
        }
    }
}

dispatch! {
    /// LayerNorm of one row: `out = (x − mean) / sqrt(var + eps) · w + b` (two passes for
    /// the variance).
    fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
        let n = x.len() as f32;
        let mean = lane_sum(x) / n;
        for (o, x) in out.iter_mut().zip(x) {
            *o = x - mean;
        }
        let inv = 1.0 / (sum_squares(out) / n + eps).sqrt();
        for ((o, w), b) in out.iter_mut().zip(w).zip(b) {
            *o = *o * inv * w + b;
        }
    }
}

/// `Σ v²` in 16 lanes (vectorizes without reassociation flags).
#[inline(always)]
pub(crate) fn sum_squares(v: &[f32]) -> f32 {
    let (v16, tail) = v.as_chunks::<16>();
    let mut acc = [0f32; 16];
    for x in v16 {
        for i in 0..16 {
            acc[i] += x[i] * x[i];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|x| x * x).sum::<f32>()
}

/// `Σ v` in 16 lanes.
#[inline(always)]
fn lane_sum(v: &[f32]) -> f32 {
    let (v16, tail) = v.as_chunks::<16>();
    let mut acc = [0f32; 16];
    for x in v16 {
        for i in 0..16 {
            acc[i] += x[i];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

dispatch! {
    /// Widen bf16 to f32 (exact: the bf16 bits are the high half of the f32).
    fn bf16_to_f32(src: &[half::bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
}

/// A seeded generator of uniform values in [-1, 1) for the kernel tests (a 64-bit LCG).
#[cfg(test)]
pub(crate) fn uniform_rng(mut seed: u64) -> impl FnMut() -> f32 {
    move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
            x += 0.001_7;
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    /// `f` on 16 lanes (the caller checked AVX-512 F).
    #[cfg(target_arch = "x86_64")]
    fn on_lanes(
        f: unsafe fn(std::arch::x86_64::__m512) -> std::arch::x86_64::__m512,
        lanes: [f32; 16],
    ) -> [f32; 16] {
        use std::arch::x86_64::__m512;
        // SAFETY: AVX-512 F was detected; __m512 and [f32; 16] have the same size.
        unsafe {
            let v = std::mem::transmute::<[f32; 16], __m512>(lanes);
            std::mem::transmute::<__m512, [f32; 16]>(f(v))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp16_matches_exp() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let mut xs: Vec<f32> = (0..110_000).map(|i| -90.0 + i as f32 * 0.001_63).collect();
        xs.extend([f32::NEG_INFINITY, -87.0, -86.99, 0.0, 88.0, 1e-30]);
        for chunk in xs.chunks(16) {
            let mut lanes = [0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let got = on_lanes(exp16, lanes);
            for (&x, &y) in chunk.iter().zip(&got) {
                let want = exp(x);
                assert!(
                    (y - want).abs() <= 4e-7 * want,
                    "exp16({x}) = {y}, exp gives {want}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn gelu16_matches_gelu_erf() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let xs: Vec<f32> = (0..40_000).map(|i| -20.0 + i as f32 * 0.001).collect();
        for chunk in xs.chunks(16) {
            let mut lanes = [0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let got = on_lanes(gelu16, lanes);
            for (&x, &y) in chunk.iter().zip(&got) {
                let want = gelu_erf(x);
                let tol = 2e-7 * (1.0 + x.abs());
                assert!(
                    (y - want).abs() <= tol,
                    "gelu16({x}) = {y}, gelu_erf gives {want}"
                );
            }
        }
    }

    #[test]
    fn erf_and_gelu_are_accurate() {
        // A&S 7.1.26 is within 1.5e-7 of erf; f32 evaluation adds rounding on top.
        fn erf64(x: f64) -> f64 {
            // Taylor series, converges fast for |x| <= 4 in f64.
            let mut term = x;
            let mut sum = x;
            let x2 = x * x;
            for n in 1..200 {
                term *= -x2 / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        }
        let mut x = -4.0f32;
        while x <= 4.0 {
            let e = erf(x) as f64 - erf64(x as f64);
            assert!(e.abs() < 1e-6, "erf({x}) off by {e}");
            let g = gelu_erf(x) as f64;
            let gw = 0.5 * x as f64 * (1.0 + erf64(x as f64 / 2f64.sqrt()));
            assert!(
                (g - gw).abs() < 1e-6 * (1.0 + gw.abs()),
                "gelu({x}) = {g}, want {gw}"
            );
            x += 0.003_1;
        }
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    #[test]
    fn softmax_matches_formula() {
        for (len, scale) in [
            (1usize, 1.0f32),
            (5, 1.0),
            (16, 0.125),
            (37, 1.0),
            (100, 0.3),
        ] {
            let mut row: Vec<f32> = (0..len).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            if len > 1 {
                row[len / 2] = f32::NEG_INFINITY;
            }
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e = |v: f32| (((v - max) * scale) as f64).exp();
            let den: f64 = row.iter().map(|&v| e(v)).sum();
            let want: Vec<f64> = row.iter().map(|&v| e(v) / den).collect();
            softmax_in_place(&mut row, scale);
            for (g, w) in row.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-6, "len {len}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn bias_and_activations() {
        let mut out = vec![-1.0f32, 0.5, 2.0, -3.0, 0.0, 1.0];
        let bias = [0.5f32, -0.5, 1.0];
        bias_act_rows(&mut out, Some(&bias), Activation::Relu2);
        assert_eq!(out, vec![0.0, 0.0, 9.0, 0.0, 0.0, 4.0]);
        let mut out = vec![1.0f32, -2.0];
        bias_act_rows(&mut out, None, Activation::GeluErf);
        assert!((out[0] - 0.841_344_7).abs() < 1e-6 && (out[1] + 0.045_500_26).abs() < 1e-6);
        let src = [half::bf16::from_f32(1.5), half::bf16::from_f32(-0.25)];
        let mut dst = [0f32; 2];
        bf16_to_f32(&src, &mut dst);
        assert_eq!(dst, [1.5, -0.25]);
    }
}
