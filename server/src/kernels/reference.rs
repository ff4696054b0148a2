//! Plain f64 implementations of the kernel math, straight from the definitions in model.md
//! §2.5: the ground truth that the tests and `examples/kernel_check.rs` compare the CPU twins
//! and the CUDA kernels against. Inputs are f32 (bf16 inputs are widened exactly first),
//! every slice is dense row-major, and nothing here is tuned for speed.

pub fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

pub fn softplus(v: f64) -> f64 {
    v.max(0.0) + (-v.abs()).exp().ln_1p()
}

/// dt = clamp(softplus(dt_raw + dt_bias), lo, hi).
pub fn dt(dt_raw: f32, dt_bias: f32, (lo, hi): (f32, f32)) -> f64 {
    softplus(dt_raw as f64 + dt_bias as f64).clamp(lo as f64, hi as f64)
}

/// Causal depthwise conv + bias + SiLU over `x` [L, C] continuing from `state` [K−1, C]
/// (`w` [K, C], row k multiplies input t−(K−1)+k). Returns (out [L, C], new state [K−1, C]).
pub fn conv1d(
    x: &[f32],
    c: usize,
    state: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
) -> (Vec<f64>, Vec<f32>) {
    let (l, k) = (x.len() / c, w.len() / c);
    let padded: Vec<f32> = state.iter().chain(x).copied().collect(); // [K−1+L, C]
    let mut out = vec![0f64; l * c];
    for t in 0..l {
        for ch in 0..c {
            let mut acc = bias.map_or(0.0, |b| b[ch] as f64);
            for j in 0..k {
                acc += w[j * c + ch] as f64 * padded[(t + j) * c + ch] as f64;
            }
            out[t * c + ch] = silu(acc);
        }
    }
    (out, padded[l * c..].to_vec())
}

/// Sizes of the SSM.
#[derive(Clone, Copy, Debug)]
pub struct SsmSizes {
    pub heads: usize,
    pub head_dim: usize,
    pub state: usize,
    pub groups: usize,
}

/// One decode step of one sequence: `state` [H, P, N], `x` [H·P], `b`/`c` [G·N], `dt` [H]
/// (see [`dt`]), `a`/`d` [H]. Returns (y [H·P] with the D skip, new state [H, P, N]).
#[allow(clippy::too_many_arguments)]
pub fn ssm_update(
    state: &[f32],
    x: &[f32],
    b: &[f32],
    c: &[f32],
    dt: &[f64],
    a: &[f32],
    d: &[f32],
    sz: SsmSizes,
) -> (Vec<f64>, Vec<f64>) {
    let (nh, p, n) = (sz.heads, sz.head_dim, sz.state);
    let hg = nh / sz.groups;
    let mut y = vec![0f64; nh * p];
    let mut s_new = vec![0f64; nh * p * n];
    for h in 0..nh {
        let g = h / hg;
        let da = (dt[h] * a[h] as f64).exp();
        for pi in 0..p {
            let xv = x[h * p + pi] as f64;
            let mut acc = 0.0;
            for j in 0..n {
                let i = (h * p + pi) * n + j;
                let v = da * state[i] as f64 + dt[h] * xv * b[g * n + j] as f64;
                s_new[i] = v;
                acc += v * c[g * n + j] as f64;
            }
            y[h * p + pi] = acc + d[h] as f64 * xv;
        }
    }
    (y, s_new)
}

/// The SSD recurrence for head `h` of one sequence: `x` [L, H, P], `dt` [L, H] (final dt),
/// `b`/`c` [L, G, N], `state` [P, N] (this head's initial state). Returns (y [L, P] without
/// the D skip, final state [P, N]).
#[allow(clippy::too_many_arguments)]
pub fn ssd_scan_head(
    h: usize,
    x: &[f32],
    dt: &[f32],
    a: f32,
    b: &[f32],
    c: &[f32],
    state: &[f32],
    sz: SsmSizes,
) -> (Vec<f64>, Vec<f64>) {
    let (nh, p, n, g) = (sz.heads, sz.head_dim, sz.state, sz.groups);
    let l = dt.len() / nh;
    let grp = h / (nh / g);
    let mut s: Vec<f64> = state.iter().map(|&v| v as f64).collect();
    let mut y = vec![0f64; l * p];
    for t in 0..l {
        let dtv = dt[t * nh + h] as f64;
        let da = (dtv * a as f64).exp();
        let bc = (t * g + grp) * n;
        for pi in 0..p {
            let dtx = dtv * x[(t * nh + h) * p + pi] as f64;
            let mut acc = 0.0;
            for j in 0..n {
                let v = da * s[pi * n + j] + dtx * b[bc + j] as f64;
                s[pi * n + j] = v;
                acc += v * c[bc + j] as f64;
            }
            y[t * p + pi] = acc;
        }
    }
    (y, s)
}

/// [`ssd_scan_head`] over all heads. Returns (y [L, H, P], final state [H, P, N]).
pub fn ssd_scan(
    x: &[f32],
    dt: &[f32],
    a: &[f32],
    b: &[f32],
    c: &[f32],
    state: &[f32],
    sz: SsmSizes,
) -> (Vec<f64>, Vec<f64>) {
    let (nh, p, n) = (sz.heads, sz.head_dim, sz.state);
    let l = dt.len() / nh;
    let mut y = vec![0f64; l * nh * p];
    let mut s_out = Vec::with_capacity(nh * p * n);
    for h in 0..nh {
        let s0 = &state[h * p * n..(h + 1) * p * n];
        let (yh, sh) = ssd_scan_head(h, x, dt, a[h], b, c, s0, sz);
        for t in 0..l {
            y[(t * nh + h) * p..(t * nh + h + 1) * p].copy_from_slice(&yh[t * p..(t + 1) * p]);
        }
        s_out.extend(sh);
    }
    (y, s_out)
}

/// Grouped gated RMSNorm of `y`/`z` [T, D]: g = y·silu(z); g / sqrt(mean_group(g²) + eps) · w.
pub fn gated_norm(y: &[f32], z: &[f32], w: &[f32], group_size: usize, eps: f32) -> Vec<f64> {
    let mut out = vec![0f64; y.len()];
    for (base, o) in (0..y.len())
        .step_by(group_size)
        .zip(out.chunks_mut(group_size))
    {
        let g: Vec<f64> = (base..base + group_size)
            .map(|i| y[i] as f64 * silu(z[i] as f64))
            .collect();
        let ms = g.iter().map(|v| v * v).sum::<f64>() / group_size as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        let d = w.len();
        for (j, (o, gv)) in o.iter_mut().zip(&g).enumerate() {
            *o = gv * inv * w[(base + j) % d] as f64;
        }
    }
    out
}

/// The residual add and RMSNorm of [`crate::kernels::add_rms_norm`] in f64, without the
/// roundings: (x + delta, w · s / sqrt(mean(s²) + eps)) per row of `dim`.
pub fn add_rms_norm(x: &[f32], delta: Option<&[f32]>, w: &[f32], eps: f32) -> (Vec<f64>, Vec<f64>) {
    let dim = w.len();
    let sum: Vec<f64> = match delta {
        Some(d) => x
            .iter()
            .zip(d)
            .map(|(&a, &b)| a as f64 + b as f64)
            .collect(),
        None => x.iter().map(|&a| a as f64).collect(),
    };
    let mut h = vec![0f64; sum.len()];
    for (row, out) in sum.chunks(dim).zip(h.chunks_mut(dim)) {
        let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / dim as f64 + eps as f64).sqrt();
        for ((o, v), wv) in out.iter_mut().zip(row).zip(w) {
            *o = v * inv * *wv as f64;
        }
    }
    (sum, h)
}

/// [`crate::kernels::bias_act`] in f64: `act(y + bias) + residual` over rows of `n`
/// (`act`: 0 identity, 1 ReLU², 2 exact-erf GELU).
pub fn bias_act(
    y: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    act: u8,
    residual: Option<&[f32]>,
) -> Vec<f64> {
    y.iter()
        .enumerate()
        .map(|(i, &v)| {
            let v = v as f64 + bias.map_or(0.0, |b| b[i % n] as f64);
            let v = match act {
                1 => v.max(0.0).powi(2),
                2 => 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2)),
                _ => v,
            };
            v + residual.map_or(0.0, |r| r[i] as f64)
        })
        .collect()
}

/// erf(x) to ~1e-13 (Abramowitz–Stegun 7.1.26 is too coarse for a reference): the series
/// for |x| < 3, else the asymptotic 1 − erfc.
fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 3.0 {
        // erf(a) = 2/√π Σ (−1)^k a^(2k+1) / (k! (2k+1))
        let (mut term, mut sum, mut k) = (a, a, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            k += 1.0;
            term *= -a * a / k;
            sum += term / (2.0 * k + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) ≈ e^(−a²)/(a√π) (1 − 1/(2a²) + 3/(4a⁴) − 15/(8a⁶))
        let a2 = a * a;
        let s = 1.0 - 1.0 / (2.0 * a2) + 3.0 / (4.0 * a2 * a2) - 15.0 / (8.0 * a2 * a2 * a2);
        1.0 - (-a2).exp() / (a * std::f64::consts::PI.sqrt()) * s
    };
    r.copysign(x)
}

/// [`crate::kernels::scaled_softmax`] in f64 over rows of `l`.
pub fn scaled_softmax(s: &[f32], l: usize, scale: f32, causal: Option<(usize, usize)>) -> Vec<f64> {
    let mut out = vec![0f64; s.len()];
    for (row, (sr, o)) in s.chunks(l).zip(out.chunks_mut(l)).enumerate() {
        let seen = causal.map_or(l, |(len, offset)| offset + row % len + 1);
        let x: Vec<f64> = sr[..seen]
            .iter()
            .map(|&v| v as f64 * scale as f64)
            .collect();
        let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = x.iter().map(|v| (v - m).exp()).sum();
        for (o, v) in o.iter_mut().zip(&x) {
            *o = (v - m).exp() / sum;
        }
    }
    out
}

/// `x Wᵀ` in f64: `x` [M, K], `w` [N, K] row-major; returns [M, N].
pub fn gemv(x: &[f32], w: &[f32], k: usize) -> Vec<f64> {
    x.chunks(k)
        .flat_map(|xr| {
            w.chunks(k)
                .map(move |wr| xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum())
        })
        .collect()
}

/// Max-norm relative error max|got − want| / max|want| (the reference's largest magnitude,
/// floored at 1e-30); a NaN or infinity in `got`, or a length mismatch, gives +inf, so it
/// never passes a bound.
pub fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let mut worst = 0f64;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        worst = worst.max((g as f64 - w).abs());
    }
    worst / scale
}
