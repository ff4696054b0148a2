//! The per-row CPU building blocks against the f64 reference, and the CUDA launch plans.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cpu;
use super::plan::{ScanPlan, UpdatePlan};
use super::reference::{self, SsmSizes};

fn uniform(r: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f64]) {
    let err = reference::max_rel_err(got, want);
    assert!(err < 1e-5, "{what}: max relative error {err:e}");
}

#[test]
fn ssm_update_row_matches_reference() {
    // N = 20: two 8-lane blocks plus a tail of 4.
    let sz = SsmSizes {
        heads: 6,
        head_dim: 3,
        state: 20,
        groups: 3,
    };
    let (h, p, n, g) = (sz.heads, sz.head_dim, sz.state, sz.groups);
    let r = &mut StdRng::seed_from_u64(1);
    let state0 = uniform(r, h * p * n, -1.0, 1.0);
    let (x, b, c) = (
        uniform(r, h * p, -1.0, 1.0),
        uniform(r, g * n, -1.0, 1.0),
        uniform(r, g * n, -1.0, 1.0),
    );
    let (mut dt_raw, dt_bias) = (uniform(r, h, -2.0, 2.0), uniform(r, h, -1.0, 1.0));
    (dt_raw[0], dt_raw[1]) = (-8.0, 8.0); // below and above the limit
    let (a, d) = (uniform(r, h, -4.0, -0.5), uniform(r, h, -1.0, 1.0));
    let limit = (0.1, 1.0); // clamps some heads on both sides
    let mut dt = vec![0f32; h];
    cpu::dt_row(&dt_raw, &dt_bias, limit, &mut dt);
    let dt_ref: Vec<f64> = (0..h)
        .map(|i| reference::dt(dt_raw[i], dt_bias[i], limit))
        .collect();
    assert_close("dt", &dt, &dt_ref);
    assert!(
        dt.contains(&0.1) && dt.contains(&1.0),
        "the limit should clamp"
    );

    let mut state = state0.clone();
    let mut y = vec![f32::NAN; h * p];
    cpu::ssm_update_row(&mut state, &x, &b, &c, &dt, &a, &d, g, &mut y);
    let (want_y, want_s) = reference::ssm_update(&state0, &x, &b, &c, &dt_ref, &a, &d, sz);
    assert_close("y", &y, &want_y);
    assert_close("state", &state, &want_s);
}

#[test]
fn conv_update_row_shifts_state_and_matches_reference() {
    let (k, c) = (4, 7);
    let r = &mut StdRng::seed_from_u64(2);
    let state0 = uniform(r, (k - 1) * c, -1.0, 1.0);
    let (x, w, bias) = (
        uniform(r, c, -1.0, 1.0),
        uniform(r, k * c, -1.0, 1.0),
        uniform(r, c, -1.0, 1.0),
    );
    let xb: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let xb_f32: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
    let mut state = state0.clone();
    let mut out = vec![f32::NAN; c];
    cpu::conv_update_row(&mut state, &xb, &w, Some(&bias), &mut out);
    let (want, want_state) = reference::conv1d(&xb_f32, c, &state0, &w, Some(&bias));
    assert_close("conv out", &out, &want);
    assert_eq!(state, want_state);
}

#[test]
fn gated_norm_row_matches_reference() {
    let (d, gs) = (40, 20); // groups of 20: two 8-lane blocks and a tail in the sum of squares
    let r = &mut StdRng::seed_from_u64(3);
    let (y, z, w) = (
        uniform(r, d, -2.0, 2.0),
        uniform(r, d, -2.0, 2.0),
        uniform(r, d, -1.0, 1.0),
    );
    let mut out = vec![f32::NAN; d];
    cpu::gated_norm_row(&y, &z, &w, gs, 1e-5, &mut out);
    assert_close(
        "gated norm",
        &out,
        &reference::gated_norm(&y, &z, &w, gs, 1e-5),
    );
}

#[test]
fn update_plan_covers_the_state_row() {
    // Full size: one float4 per lane.
    assert_eq!(UpdatePlan::new(128, 0), Some(UpdatePlan { v: 4, ni: 1 }));
    // A pool view starting off a 16-byte boundary falls back to scalar rows.
    assert_eq!(UpdatePlan::new(128, 2), Some(UpdatePlan { v: 1, ni: 4 }));
    assert_eq!(UpdatePlan::new(16, 0), Some(UpdatePlan { v: 4, ni: 1 }));
    assert_eq!(UpdatePlan::new(5, 0), Some(UpdatePlan { v: 1, ni: 1 }));
    assert_eq!(UpdatePlan::new(384, 0), Some(UpdatePlan { v: 4, ni: 4 }));
    assert_eq!(UpdatePlan::new(1024, 0), None);
    for n in 1..=512 {
        for off in [0, 1] {
            if let Some(pl) = UpdatePlan::new(n, off) {
                assert!(pl.ni * 32 * pl.v >= n, "N = {n} not covered by {pl:?}");
                assert!(pl.v == 1 || n % 4 == 0 && off % 4 == 0);
            }
        }
    }
}

#[test]
fn scan_plan_fits_the_block_and_shared_memory() {
    // Full size: 8 lanes of 16 elements per row, 20 rows (5 warps) per block.
    let full = ScanPlan::new(80, 128).expect("full-size plan");
    assert_eq!((full.e, full.s, full.r), (16, 8, 20));
    assert!(full.tch >= 32, "{full:?}");
    // The tiny test model: one lane per row.
    assert_eq!(
        ScanPlan::new(8, 16).map(|pl| (pl.e, pl.s, pl.r)),
        Some((16, 1, 8))
    );
    // N / E must be a power of two.
    assert_eq!(ScanPlan::new(8, 5), None);
    // A preferred E is taken when it fits, else the default.
    let e32 = ScanPlan::with_e(80, 128, Some(32)).expect("E = 32 fits");
    assert_eq!((e32.e, e32.s, e32.r), (32, 4, 40));
    assert_eq!(ScanPlan::with_e(80, 128, Some(5)), Some(full));
    assert_eq!(
        ScanPlan::with_e(80, 128, Some(2)),
        Some(full),
        "N / 2 = 64 lanes > 32"
    );
    for p in [1, 3, 8, 64, 80, 128] {
        for n in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] {
            let Some(pl) = ScanPlan::new(p, n) else {
                continue;
            };
            assert_eq!(pl.e * pl.s, n);
            assert!(pl.s.is_power_of_two() && pl.s <= 32);
            assert_eq!(p % pl.r, 0);
            assert!(pl.r * pl.s <= 256);
            assert!(pl.tch >= 1 && pl.smem_bytes() <= 48 * 1024, "{pl:?}");
        }
    }
}

#[test]
fn add_rms_norm_matches_reference_in_f32_and_bf16() {
    use candle_core::{DType, Device, Tensor};
    let (t, d) = (3, 40);
    let r = &mut StdRng::seed_from_u64(7);
    let (x, dl, w) = (
        uniform(r, t * d, -2.0, 2.0),
        uniform(r, t * d, -2.0, 2.0),
        uniform(r, d, 0.5, 1.5),
    );
    for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
        let dev = &Device::Cpu;
        let tensor = |v: &[f32], shape: &[usize]| {
            Tensor::from_slice(v, shape, dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let host = |v: &Tensor| -> Vec<f32> {
            v.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        // The reference gets the inputs as rounded to the dtype.
        let (xt, dt, wt) = (tensor(&x, &[t, d]), tensor(&dl, &[t, d]), tensor(&w, &[d]));
        for delta in [Some(&dt), None] {
            let (sum, h) = super::add_rms_norm(&xt, delta, &wt, 1e-5).unwrap();
            let dh = delta.map(host);
            let (want_sum, want_h) =
                reference::add_rms_norm(&host(&xt), dh.as_deref(), &host(&wt), 1e-5);
            for (what, got, want) in [("sum", host(&sum), want_sum), ("h", host(&h), want_h)] {
                let err = reference::max_rel_err(&got, &want);
                assert!(err < tol, "{dtype:?} {what}: max relative error {err:e}");
            }
        }
    }
}

/// Runs `f` on `dtype` copies of the inputs and compares with the f64 `want` of the inputs
/// as rounded to `dtype`.
fn on_cpu_as(
    dtype: candle_core::DType,
    inputs: &[(&[f32], &[usize])],
    f: impl Fn(&[candle_core::Tensor]) -> candle_core::Tensor,
    want: impl Fn(&[Vec<f32>]) -> Vec<f64>,
) -> f64 {
    use candle_core::{DType, Device, Tensor};
    let ts: Vec<Tensor> = inputs
        .iter()
        .map(|(v, shape)| {
            Tensor::from_slice(v, *shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        })
        .collect();
    let host = |t: &Tensor| -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let rounded: Vec<Vec<f32>> = ts.iter().map(host).collect();
    reference::max_rel_err(&host(&f(&ts)), &want(&rounded))
}

#[test]
fn bias_act_matches_reference() {
    use crate::model::linear::Activation;
    use candle_core::DType;
    let (r, n) = (5, 12);
    let rng = &mut StdRng::seed_from_u64(9);
    let (y, b, res) = (
        uniform(rng, r * n, -3.0, 3.0),
        uniform(rng, n, -1.0, 1.0),
        uniform(rng, r * n, -1.0, 1.0),
    );
    let inputs: [(&[f32], &[usize]); 3] = [(&y, &[r, n]), (&b, &[n]), (&res, &[r, n])];
    for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 2e-2)] {
        for (act, code) in [
            (Activation::Identity, 0),
            (Activation::Relu2, 1),
            (Activation::GeluErf, 2),
        ] {
            for (with_bias, with_res) in [(true, true), (false, false), (true, false)] {
                let err = on_cpu_as(
                    dtype,
                    &inputs,
                    |t| {
                        let bias = with_bias.then_some(&t[1]);
                        let resid = with_res.then_some(&t[2]);
                        super::bias_act(&t[0], bias, act, resid).unwrap()
                    },
                    |v| {
                        let bias = with_bias.then_some(v[1].as_slice());
                        let resid = with_res.then_some(v[2].as_slice());
                        reference::bias_act(&v[0], n, bias, code, resid)
                    },
                );
                assert!(
                    err < tol,
                    "{dtype:?} {act:?} bias {with_bias} residual {with_res}: {err:e}"
                );
            }
        }
    }
}

#[test]
fn scaled_softmax_matches_reference_causal_and_not() {
    use candle_core::DType;
    // 2 heads × a chunk of 3 queries at offset 4 (7 keys), and the same rows unmasked.
    let (len, offset, heads) = (3, 4, 2);
    let l = offset + len;
    let s = uniform(&mut StdRng::seed_from_u64(11), heads * len * l, -4.0, 4.0);
    let inputs: [(&[f32], &[usize]); 1] = [(&s, &[heads * len, l])];
    for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
        for causal in [Some((len, offset)), None] {
            let err = on_cpu_as(
                dtype,
                &inputs,
                |t| super::scaled_softmax(&t[0], 0.7, causal).unwrap(),
                |v| reference::scaled_softmax(&v[0], l, 0.7, causal),
            );
            assert!(err < tol, "{dtype:?} causal {causal:?}: {err:e}");
        }
    }
    // A chunk that does not fit its scores is an error, not a wrong answer.
    let t = candle_core::Tensor::zeros((6, 5), DType::F32, &candle_core::Device::Cpu).unwrap();
    assert!(super::scaled_softmax(&t, 1.0, Some((3, 4))).is_err());
}

#[test]
fn gemv_matches_reference() {
    use candle_core::DType;
    let (m, n, k) = (3, 20, 48);
    let r = &mut StdRng::seed_from_u64(13);
    let (x, w) = (uniform(r, m * k, -1.0, 1.0), uniform(r, n * k, -1.0, 1.0));
    let inputs: [(&[f32], &[usize]); 2] = [(&x, &[m, k]), (&w, &[n, k])];
    let err = on_cpu_as(
        DType::BF16,
        &inputs,
        |t| super::gemv(&t[0], &t[1]).unwrap(),
        |v| reference::gemv(&v[0], &v[1], k),
    );
    assert!(err < 1e-2, "max relative error {err:e}");
    let zeros = |shape: (usize, usize)| {
        candle_core::Tensor::zeros(shape, DType::BF16, &candle_core::Device::Cpu).unwrap()
    };
    let err = super::gemv(&zeros((2, 5)), &zeros((3, 4)));
    assert!(err.is_err(), "a K mismatch must be an error");
}
