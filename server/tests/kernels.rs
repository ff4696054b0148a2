//! The Mamba2 kernels' CPU twins (`vlm_server::kernels`) against the plain f64 reference
//! (`kernels::reference`) on random inputs: strided and bf16 operands, in-place pool updates
//! that touch only the named slots, decode steps that agree with prefill, and shape errors.

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vlm_server::kernels::{self, reference};

/// f32 operands: max-norm relative error bound against the f64 reference.
const F32_TOL: f64 = 1e-5;

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn uniform(r: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

fn tensor(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn rand_t(r: &mut StdRng, shape: &[usize]) -> Result<Tensor> {
    tensor(uniform(r, shape.iter().product(), -1.0, 1.0), shape)
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(values(t)?.into_iter().map(f32::to_bits).collect())
}

/// Columns `start..start + cols` of a random [rows, start + cols + 5] matrix in `dtype`: a
/// strided view like a slice of the in_proj output. Also returns its values as dense f32.
fn column_slice(
    r: &mut StdRng,
    rows: usize,
    start: usize,
    cols: usize,
    dtype: DType,
) -> Result<(Tensor, Vec<f32>)> {
    let wide = rand_t(r, &[rows, start + cols + 5])?.to_dtype(dtype)?;
    let view = wide.narrow(1, start, cols)?;
    assert!(!view.is_contiguous() || rows == 1);
    let dense = values(&view)?;
    Ok((view, dense))
}

fn slot_ids(ids: &[u32]) -> Result<Tensor> {
    Tensor::new(ids, &Device::Cpu)
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let err = reference::max_rel_err(got, want);
    assert!(err < tol, "{what}: max relative error {err:e} >= {tol:e}");
}

/// Slots not in `touched` are bit-identical before and after.
fn assert_untouched(before: &[u32], after: &[u32], slot_len: usize, touched: &[u32]) {
    for (s, (b, a)) in before
        .chunks(slot_len)
        .zip(after.chunks(slot_len))
        .enumerate()
    {
        if !touched.contains(&(s as u32)) {
            assert_eq!(b, a, "slot {s} was not named but changed");
        }
    }
}

#[test]
fn conv1d_update_matches_reference_and_touches_only_its_slots() -> Result<()> {
    let (num_slots, k, c) = (6, 4, 20);
    let ids = [4u32, 0, 2];
    for (seed, dtype, with_bias) in [
        (1, DType::F32, true),
        (2, DType::BF16, false),
        (3, DType::BF16, true),
    ] {
        let r = &mut rng(seed);
        let pool = rand_t(r, &[num_slots, k - 1, c])?;
        let before = values(&pool)?;
        let before_bits = bits(&pool)?;
        let (xbc, xv) = column_slice(r, ids.len(), 7, c, dtype)?;
        let (w, bias) = (rand_t(r, &[k, c])?, rand_t(r, &[c])?);
        let (wv, bv) = (values(&w)?, values(&bias)?);
        let bias_ref = with_bias.then_some(bv.as_slice());

        let out = kernels::conv1d_update(
            &pool,
            &xbc,
            &slot_ids(&ids)?,
            &w,
            with_bias.then_some(&bias),
        )?;
        assert_eq!(out.dims(), &[ids.len(), c]);
        assert_eq!(out.dtype(), DType::F32);
        let (out, after) = (values(&out)?, values(&pool)?);
        let slot_len = (k - 1) * c;
        for (row, &s) in ids.iter().enumerate() {
            let s = s as usize;
            let state = &before[s * slot_len..(s + 1) * slot_len];
            let (want, want_state) =
                reference::conv1d(&xv[row * c..(row + 1) * c], c, state, &wv, bias_ref);
            assert_close(
                "conv1d_update out",
                &out[row * c..(row + 1) * c],
                &want,
                F32_TOL,
            );
            assert_eq!(
                &after[s * slot_len..(s + 1) * slot_len],
                &want_state[..],
                "new conv state"
            );
        }
        assert_untouched(&before_bits, &bits(&pool)?, slot_len, &ids);
    }
    Ok(())
}

struct SsmCase {
    sizes: reference::SsmSizes,
    num_slots: usize,
}

#[test]
fn selective_state_update_matches_reference_and_touches_only_its_slots() -> Result<()> {
    let case = SsmCase {
        sizes: reference::SsmSizes {
            heads: 8,
            head_dim: 4,
            state: 16,
            groups: 2,
        },
        num_slots: 5,
    };
    let sz = case.sizes;
    let (h, p, n, g) = (sz.heads, sz.head_dim, sz.state, sz.groups);
    let ids = [1u32, 4, 2];
    let bsz = ids.len();
    let limits = [(0.0, f32::INFINITY), (0.05, 0.4)];
    for (seed, dt_dtype, limit) in [
        (4, DType::F32, limits[0]),
        (5, DType::BF16, limits[0]),
        (6, DType::F32, limits[1]),
    ] {
        let r = &mut rng(seed);
        let pool = rand_t(r, &[case.num_slots, h, p, n])?;
        let (before, before_bits) = (values(&pool)?, bits(&pool)?);
        // x | B | C as column slices of one conv output, dt_raw a slice of a wider matrix.
        let conv_out = rand_t(r, &[bsz, h * p + 2 * g * n])?;
        let x = conv_out.narrow(1, 0, h * p)?;
        let b = conv_out.narrow(1, h * p, g * n)?;
        let c = conv_out.narrow(1, h * p + g * n, g * n)?;
        let (dt_raw, dtv) = column_slice(r, bsz, 3, h, dt_dtype)?;
        let dt_bias = tensor(uniform(r, h, -3.0, 0.5), &[h])?;
        let a = tensor(
            uniform(r, h, 0.0, 2.7).iter().map(|v| -v.exp()).collect(),
            &[h],
        )?;
        let d = tensor(uniform(r, h, -1.0, 1.0), &[h])?;

        let y = kernels::selective_state_update(
            &pool,
            &x,
            &b,
            &c,
            &dt_raw,
            &dt_bias,
            &a,
            &d,
            limit,
            &slot_ids(&ids)?,
        )?;
        assert_eq!(y.dims(), &[bsz, h * p]);
        let (y, after) = (values(&y)?, values(&pool)?);
        let (xv, bv, cv) = (values(&x)?, values(&b)?, values(&c)?);
        let (dbv, av, dv) = (values(&dt_bias)?, values(&a)?, values(&d)?);
        let slot_len = h * p * n;
        for (row, &s) in ids.iter().enumerate() {
            let s = s as usize;
            let dt: Vec<f64> = (0..h)
                .map(|hi| reference::dt(dtv[row * h + hi], dbv[hi], limit))
                .collect();
            let (want_y, want_s) = reference::ssm_update(
                &before[s * slot_len..(s + 1) * slot_len],
                &xv[row * h * p..(row + 1) * h * p],
                &bv[row * g * n..(row + 1) * g * n],
                &cv[row * g * n..(row + 1) * g * n],
                &dt,
                &av,
                &dv,
                sz,
            );
            assert_close(
                "ssm y",
                &y[row * h * p..(row + 1) * h * p],
                &want_y,
                F32_TOL,
            );
            assert_close(
                "ssm state",
                &after[s * slot_len..(s + 1) * slot_len],
                &want_s,
                F32_TOL,
            );
        }
        assert_untouched(&before_bits, &bits(&pool)?, slot_len, &ids);
    }
    Ok(())
}

#[test]
fn gated_rms_norm_matches_reference() -> Result<()> {
    let (t, d, gs, eps) = (3, 24, 8, 1e-5);
    for (seed, z_dtype) in [(7, DType::F32), (8, DType::BF16)] {
        let r = &mut rng(seed);
        let (y, yv) = column_slice(r, t, 2, d, DType::F32)?;
        let (z, zv) = column_slice(r, t, 9, d, z_dtype)?;
        let w = rand_t(r, &[d])?;
        let out = kernels::gated_rms_norm(&y, &z, &w, gs, eps)?;
        assert_eq!(out.dims(), &[t, d]);
        let want = reference::gated_norm(&yv, &zv, &values(&w)?, gs, eps);
        assert_close("gated norm", &values(&out)?, &want, F32_TOL);
    }
    Ok(())
}

#[test]
fn conv1d_prefill_matches_reference() -> Result<()> {
    let (c, k) = (10, 4);
    // L < K−1 builds the new state from old state rows and inputs.
    for (seed, l, dtype, with_bias) in [
        (9, 9, DType::F32, true),
        (10, 2, DType::F32, false),
        (11, 1, DType::BF16, true),
        (12, 9, DType::BF16, false),
    ] {
        let r = &mut rng(seed);
        let (x, xv) = column_slice(r, l, 4, c, dtype)?;
        let state = rand_t(r, &[k - 1, c])?;
        let (w, bias) = (rand_t(r, &[k, c])?, rand_t(r, &[c])?);
        let bv = values(&bias)?;
        let (out, new_state) = kernels::conv1d_prefill(&x, &state, &w, with_bias.then_some(&bias))?;
        let (want, want_state) = reference::conv1d(
            &xv,
            c,
            &values(&state)?,
            &values(&w)?,
            with_bias.then_some(bv.as_slice()),
        );
        assert_eq!(out.dims(), &[l, c]);
        assert_close("conv1d_prefill out", &values(&out)?, &want, F32_TOL);
        assert_eq!(
            values(&new_state)?,
            want_state,
            "conv1d_prefill state, L = {l}"
        );
    }
    Ok(())
}

#[test]
fn ssd_scan_matches_reference() -> Result<()> {
    // Head dims under one vector, and over one with a tail; even and odd state sizes.
    let small = reference::SsmSizes {
        heads: 4,
        head_dim: 3,
        state: 8,
        groups: 2,
    };
    let wide = reference::SsmSizes {
        heads: 2,
        head_dim: 20,
        state: 7,
        groups: 1,
    };
    let cases = [(small, 13, 37, 8), (small, 14, 5, 8), (small, 15, 16, 16)];
    for (sz, seed, l, chunk) in cases
        .into_iter()
        .chain([(small, 16, 2, 1), (wide, 17, 9, 4)])
    {
        let (h, p, n, g) = (sz.heads, sz.head_dim, sz.state, sz.groups);
        let r = &mut rng(seed);
        let x = rand_t(r, &[l, h, p])?;
        let dt = tensor(uniform(r, l * h, 0.001, 0.5), &[l, h])?;
        let a = tensor(
            uniform(r, h, 0.0, 2.7).iter().map(|v| -v.exp()).collect(),
            &[h],
        )?;
        let (b, c) = (rand_t(r, &[l, g, n])?, rand_t(r, &[l, g, n])?);
        let s0 = rand_t(r, &[h, p, n])?;
        let (y, s) = kernels::ssd_scan(&x, &dt, &a, &b, &c, &s0, chunk)?;
        let (want_y, want_s) = reference::ssd_scan(
            &values(&x)?,
            &values(&dt)?,
            &values(&a)?,
            &values(&b)?,
            &values(&c)?,
            &values(&s0)?,
            sz,
        );
        assert_eq!((y.dims(), s.dims()), (&[l, h, p][..], &[h, p, n][..]));
        assert_close(&format!("ssd y, L = {l}"), &values(&y)?, &want_y, F32_TOL);
        assert_close(
            &format!("ssd state, L = {l}"),
            &values(&s)?,
            &want_s,
            F32_TOL,
        );
    }
    Ok(())
}

/// Decoding a sequence token by token through a pool slot gives what prefill gives at once.
#[test]
fn decode_steps_agree_with_prefill() -> Result<()> {
    let (l, c, k) = (6, 12, 4);
    let (h, p, n, g) = (4, 2, 4, 2);
    let r = &mut rng(17);
    let x = rand_t(r, &[l, c])?;
    let (w, bias) = (rand_t(r, &[k, c])?, rand_t(r, &[c])?);
    let conv_pool = Tensor::zeros((3, k - 1, c), DType::F32, &Device::Cpu)?;
    let (pre, pre_state) = kernels::conv1d_prefill(&x, &conv_pool.i(1)?, &w, Some(&bias))?;
    let slot = slot_ids(&[1])?;
    let mut steps = Vec::new();
    for t in 0..l {
        steps.push(kernels::conv1d_update(
            &conv_pool,
            &x.narrow(0, t, 1)?,
            &slot,
            &w,
            Some(&bias),
        )?);
    }
    let pre: Vec<f64> = values(&pre)?.iter().map(|&v| v as f64).collect();
    assert!(reference::max_rel_err(&values(&Tensor::cat(&steps, 0)?)?, &pre) < 1e-6);
    assert_eq!(values(&conv_pool.i(1)?)?, values(&pre_state)?);

    let xs = rand_t(r, &[l, h, p])?;
    let (b, cm) = (rand_t(r, &[l, g, n])?, rand_t(r, &[l, g, n])?);
    let dt_raw = rand_t(r, &[l, h])?;
    let zeros_h = Tensor::zeros(h, DType::F32, &Device::Cpu)?;
    let a = tensor(uniform(r, h, 0.5, 2.0).iter().map(|v| -v).collect(), &[h])?;
    let ssm_pool = rand_t(r, &[2, h, p, n])?;
    let s0 = ssm_pool.i(0)?.copy()?;
    // The prefill scan takes dt already softplus'ed (what the decode kernel computes).
    let dt_all: Vec<f32> = values(&dt_raw)?
        .iter()
        .map(|&v| reference::dt(v, 0.0, (0.0, f32::INFINITY)) as f32)
        .collect();
    let (y_pre, s_pre) = kernels::ssd_scan(&xs, &tensor(dt_all, &[l, h])?, &a, &b, &cm, &s0, 4)?;
    let mut ys = Vec::new();
    for t in 0..l {
        ys.push(kernels::selective_state_update(
            &ssm_pool,
            &xs.i(t)?.reshape((1, h * p))?,
            &b.i(t)?.reshape((1, g * n))?,
            &cm.i(t)?.reshape((1, g * n))?,
            &dt_raw.narrow(0, t, 1)?,
            &zeros_h,
            &a,
            &zeros_h, // no D skip: ssd_scan leaves it out
            (0.0, f32::INFINITY),
            &slot_ids(&[0])?,
        )?);
    }
    let y_steps = values(&Tensor::cat(&ys, 0)?)?;
    let y_pre: Vec<f64> = values(&y_pre)?.iter().map(|&v| v as f64).collect();
    assert!(reference::max_rel_err(&y_steps, &y_pre) < 1e-5);
    let s_pre: Vec<f64> = values(&s_pre)?.iter().map(|&v| v as f64).collect();
    assert!(reference::max_rel_err(&values(&ssm_pool.i(0)?)?, &s_pre) < 1e-5);
    Ok(())
}

#[test]
fn empty_batches_give_empty_outputs() -> Result<()> {
    let dev = Device::Cpu;
    let pool = Tensor::zeros((2, 3, 5), DType::F32, &dev)?;
    let none = Tensor::zeros(0, DType::U32, &dev)?;
    let out = kernels::conv1d_update(
        &pool,
        &Tensor::zeros((0, 5), DType::F32, &dev)?,
        &none,
        &Tensor::zeros((4, 5), DType::F32, &dev)?,
        None,
    )?;
    assert_eq!(out.dims(), &[0, 5]);
    Ok(())
}

#[test]
fn bad_shapes_dtypes_and_slots_are_errors() -> Result<()> {
    let r = &mut rng(18);
    let (k, c) = (4, 6);
    let pool = rand_t(r, &[3, k - 1, c])?;
    let xbc = rand_t(r, &[2, c])?;
    let w = rand_t(r, &[k, c])?;
    let bias = rand_t(r, &[c])?;
    let ids = slot_ids(&[0, 2])?;
    let upd = |pool: &Tensor, xbc: &Tensor, ids: &Tensor, w: &Tensor, bias: Option<&Tensor>| {
        kernels::conv1d_update(pool, xbc, ids, w, bias).is_err()
    };
    assert!(
        !upd(&pool, &xbc, &ids, &w, Some(&bias)),
        "the valid call must pass"
    );
    let before = bits(&pool)?;
    assert!(
        upd(&pool.to_dtype(DType::F64)?, &xbc, &ids, &w, None),
        "f64 pool"
    );
    assert!(
        upd(
            &rand_t(r, &[3, c, k - 1])?.transpose(1, 2)?,
            &xbc,
            &ids,
            &w,
            None
        ),
        "strided pool"
    );
    assert!(
        upd(&pool, &rand_t(r, &[2, c + 1])?, &ids, &w, None),
        "xbc width"
    );
    assert!(
        upd(&pool, &xbc.to_dtype(DType::F16)?, &ids, &w, None),
        "f16 xbc"
    );
    assert!(
        upd(&pool, &xbc, &ids.to_dtype(DType::I64)?, &w, None),
        "i64 slots"
    );
    assert!(upd(&pool, &xbc, &slot_ids(&[0])?, &w, None), "slot count");
    assert!(
        upd(&pool, &xbc, &slot_ids(&[0, 3])?, &w, None),
        "slot out of range"
    );
    assert!(
        upd(&pool, &xbc, &slot_ids(&[2, 2])?, &w, None),
        "repeated slot"
    );
    assert!(
        upd(&pool, &xbc, &ids, &rand_t(r, &[k + 1, c])?, None),
        "w taps"
    );
    assert!(
        upd(&pool, &xbc, &ids, &w, Some(&rand_t(r, &[c - 1])?)),
        "bias length"
    );
    assert!(
        upd(&pool, &pool.i(0)?.narrow(0, 0, 2)?, &ids, &w, None),
        "input aliases the pool"
    );
    assert_eq!(bits(&pool)?, before, "failed calls must not touch the pool");

    let (h, p, n, g) = (4, 2, 4, 2);
    let spool = rand_t(r, &[3, h, p, n])?;
    let x = rand_t(r, &[2, h * p])?;
    let bm = rand_t(r, &[2, g * n])?;
    let dt = rand_t(r, &[2, h])?;
    let hv = rand_t(r, &[h])?;
    let ssu = |pool: &Tensor, x: &Tensor, b: &Tensor, dt: &Tensor, a: &Tensor, lim: (f32, f32)| {
        kernels::selective_state_update(pool, x, b, b, dt, &hv, a, &hv, lim, &ids).is_err()
    };
    let inf = (0.0, f32::INFINITY);
    assert!(
        !ssu(&spool, &x, &bm, &dt, &hv, inf),
        "the valid call must pass"
    );
    assert!(ssu(&spool.i(0)?, &x, &bm, &dt, &hv, inf), "rank-3 pool");
    assert!(
        ssu(&spool, &x, &rand_t(r, &[2, g * n + 1])?, &dt, &hv, inf),
        "B not G·N"
    );
    assert!(
        ssu(&spool, &x, &rand_t(r, &[2, 3 * n])?, &dt, &hv, inf),
        "G not dividing H"
    );
    assert!(
        ssu(&spool, &rand_t(r, &[2, h * p - 1])?, &bm, &dt, &hv, inf),
        "x width"
    );
    assert!(
        ssu(&spool, &x, &bm, &rand_t(r, &[2, h + 1])?, &hv, inf),
        "dt width"
    );
    assert!(
        ssu(&spool, &x, &bm, &dt.to_dtype(DType::F16)?, &hv, inf),
        "f16 dt"
    );
    assert!(
        ssu(&spool, &x, &bm, &dt, &rand_t(r, &[h - 1])?, inf),
        "A length"
    );
    assert!(
        ssu(&spool, &x, &bm, &dt, &hv, (1.0, 0.5)),
        "dt_limit lo > hi"
    );
    assert!(
        ssu(&spool, &x.to_dtype(DType::BF16)?, &bm, &dt, &hv, inf),
        "bf16 x"
    );

    let y = rand_t(r, &[2, 8])?;
    let w8 = rand_t(r, &[8])?;
    assert!(kernels::gated_rms_norm(&y, &y, &w8, 4, 1e-5).is_ok());
    assert!(
        kernels::gated_rms_norm(&y, &y, &w8, 3, 1e-5).is_err(),
        "group size"
    );
    assert!(
        kernels::gated_rms_norm(&y, &y, &w8, 0, 1e-5).is_err(),
        "zero group size"
    );
    assert!(
        kernels::gated_rms_norm(&y, &rand_t(r, &[3, 8])?, &w8, 4, 1e-5).is_err(),
        "z rows"
    );
    assert!(
        kernels::gated_rms_norm(&y, &y, &rand_t(r, &[4])?, 4, 1e-5).is_err(),
        "w length"
    );
    assert!(
        kernels::gated_rms_norm(&y.to_dtype(DType::BF16)?, &y, &w8, 4, 1e-5).is_err(),
        "bf16 y"
    );

    let x = rand_t(r, &[5, c])?;
    let st = rand_t(r, &[k - 1, c])?;
    assert!(kernels::conv1d_prefill(&x, &st, &w, None).is_ok());
    assert!(
        kernels::conv1d_prefill(&x, &rand_t(r, &[k, c])?, &w, None).is_err(),
        "state rows"
    );
    assert!(
        kernels::conv1d_prefill(&x, &rand_t(r, &[0, c])?, &rand_t(r, &[1, c])?, None).is_err(),
        "K = 1"
    );
    assert!(
        kernels::conv1d_prefill(&x.to_dtype(DType::F16)?, &st, &w, None).is_err(),
        "f16 x"
    );
    assert!(
        kernels::conv1d_prefill(&x, &st, &w, Some(&w)).is_err(),
        "bias shape"
    );

    let l = 5;
    let xs = rand_t(r, &[l, h, p])?;
    let dtl = rand_t(r, &[l, h])?;
    let bl = rand_t(r, &[l, g, n])?;
    let s0 = rand_t(r, &[h, p, n])?;
    assert!(kernels::ssd_scan(&xs, &dtl, &hv, &bl, &bl, &s0, 4).is_ok());
    assert!(
        kernels::ssd_scan(&xs, &dtl, &hv, &rand_t(r, &[l + 1, g, n])?, &bl, &s0, 4).is_err(),
        "B length"
    );
    assert!(
        kernels::ssd_scan(&xs, &dtl, &hv, &bl, &bl, &s0, 0).is_err(),
        "chunk 0"
    );
    assert!(
        kernels::ssd_scan(&xs, &dtl, &hv, &bl, &bl, &rand_t(r, &[h, p, n + 1])?, 4).is_err(),
        "state"
    );
    assert!(
        kernels::ssd_scan(&xs, &dtl, &rand_t(r, &[h + 1])?, &bl, &bl, &s0, 4).is_err(),
        "A length"
    );
    assert!(
        kernels::ssd_scan(&xs.to_dtype(DType::BF16)?, &dtl, &hv, &bl, &bl, &s0, 4).is_err(),
        "bf16 x"
    );
    Ok(())
}
