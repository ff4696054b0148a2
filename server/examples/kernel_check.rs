//! Checks every Mamba2 kernel (`vlm_server::kernels`) on fresh random inputs at the model's
//! full sizes (H=128, P=80, N=128, G=8, K=4, d_inner=10240, conv_dim=12288) against an f64
//! reference computed on the host, then times it (a measurement; nothing asserts a time).
//!
//! Error = max|got − ref| / max|ref| over the outputs and the updated pool slots; bound 1e-3
//! for f32 operands, 1e-2 when an operand is bf16; a NaN anywhere fails. Outputs are poisoned
//! with NaN before the kernels write them, and the pool slots a call does not name are NaN and
//! must stay bit-identical. Time = median over runs of (`reps` back-to-back calls, then a
//! device sync) / reps; GB/s = the bytes a call must move (state read + write, inputs,
//! outputs) / that time. Exit code 1 on any failure.
//!
//!   cargo run --release -p vlm-server --example kernel_check -- --device cpu --quick
//!   cargo run --release -p vlm-server --features cuda --example kernel_check -- --device cuda

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use clap::Parser;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use vlm_server::kernels::{self, reference};
use vlm_server::model::linear::Activation;

const H: usize = 128;
const P: usize = 80;
const N: usize = 128;
const G: usize = 8;
const K: usize = 4;
const DI: usize = H * P; // d_inner 10240
const GN: usize = G * N;
const CD: usize = DI + 2 * GN; // conv_dim 12288
const IN_DIM: usize = DI + CD + H; // in_proj output: z | xBC | dt
const CHUNK: usize = 128;
const EPS: f32 = 1e-5;

#[derive(Parser)]
struct Args {
    /// cpu or cuda
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prefill at L = 300 only and fewer timing runs (the CPU dry run).
    #[arg(long)]
    quick: bool,
    /// Timing samples per kernel (default: 20 on CUDA, 5 on CPU, 3 with --quick).
    #[arg(long)]
    runs: Option<usize>,
}

struct Ctx {
    dev: Device,
    seed: u64,
    runs: usize,
    /// Calls per timing sample.
    reps: usize,
}

struct Row {
    kernel: &'static str,
    shape: String,
    dtype: DType,
    err: f64,
    slots_ok: bool,
    median_us: f64,
    bytes: Option<usize>,
}

impl Row {
    fn tol(&self) -> f64 {
        if self.dtype == DType::BF16 {
            1e-2
        } else {
            1e-3
        }
    }

    fn pass(&self) -> bool {
        self.err < self.tol() && self.slots_ok
    }
}

fn main() {
    let args = Args::parse();
    let (runs, reps, dev) = match args.device.as_str() {
        "cpu" => (if args.quick { 3 } else { 5 }, 1, Device::Cpu),
        "cuda" => match vlm_server::device::cuda(0) {
            Ok(d) => (20, 10, d),
            Err(e) => fail(&format!("no CUDA device: {e}")),
        },
        other => fail(&format!("--device must be cpu or cuda, got {other}")),
    };
    let ctx = Ctx {
        dev,
        seed: args.seed,
        runs: args.runs.unwrap_or(runs),
        reps,
    };
    let lens: &[usize] = if args.quick { &[300] } else { &[300, 3300] };
    match run_all(&ctx, lens) {
        Ok(rows) => {
            print_table(&ctx, &rows);
            if rows.iter().any(|r| !r.pass()) {
                std::process::exit(1);
            }
        }
        Err(e) => fail(&format!("kernel_check: {e}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(1)
}

fn run_all(ctx: &Ctx, lens: &[usize]) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for b in [1, 16] {
        for dt in [DType::F32, DType::BF16] {
            rows.push(check_conv_update(ctx, b, dt)?);
            rows.push(check_ssm_update(ctx, b, dt)?);
            rows.push(check_gated_norm(ctx, b, dt)?);
            rows.push(check_add_norm(ctx, b, dt)?);
        }
    }
    // Every decode matmul shape of the full-size LLM (in_proj, out_proj, MLP up and down,
    // attention q/o and k/v, lm_head), 1 and 4 rows: the kernel and cuBLAS side by side.
    let gemv_shapes: &[(usize, usize)] = if ctx.dev.is_cuda() {
        &[
            (22656, 5120),
            (5120, 10240),
            (20480, 5120),
            (5120, 20480),
            (5120, 5120),
            (1024, 5120),
            (131072, 5120),
        ]
    } else {
        &[(1000, 512)] // the CPU dry run: the code path, not the sizes
    };
    for &(n, k) in gemv_shapes {
        for m in [1, 4] {
            rows.extend(check_gemv(ctx, m, n, k)?);
        }
    }
    for dt in [DType::F32, DType::BF16] {
        // The vision encoder's fc1 (bias, GELU) and fc2 (bias, residual) on 2 tiles, and
        // the LLM MLP's ReLU² at batch 16.
        rows.push(check_bias_act(
            ctx,
            (2 * 1025, 5120),
            Activation::GeluErf,
            true,
            false,
            dt,
        )?);
        rows.push(check_bias_act(
            ctx,
            (2 * 1025, 1280),
            Activation::Identity,
            true,
            true,
            dt,
        )?);
        rows.push(check_bias_act(
            ctx,
            (16, 20480),
            Activation::Relu2,
            false,
            false,
            dt,
        )?);
        // LLM prefill attention: 40 heads × a 300-query chunk after 100 cached tokens; RADIO:
        // 16 heads × 1025 tokens, unmasked.
        rows.push(check_softmax(ctx, (40 * 300, 400), Some((300, 100)), dt)?);
        rows.push(check_softmax(ctx, (16 * 1025, 1025), None, dt)?);
    }
    for &l in lens {
        for dt in [DType::F32, DType::BF16] {
            rows.push(check_conv_prefill(ctx, l, dt)?);
            rows.push(check_gated_norm(ctx, l, dt)?);
            rows.push(check_add_norm(ctx, l, dt)?);
        }
        rows.push(check_ssd_scan(ctx, l)?);
        if ctx.dev.is_cuda() && l > 1000 {
            // The other thread layouts of the scan kernel, to choose between them.
            for e in ["16", "8"] {
                // SAFETY: no other thread runs here (par_map's workers are joined).
                unsafe { std::env::set_var("VLM_SSD_SCAN_E", e) };
                let mut row = check_ssd_scan(ctx, l)?;
                row.shape += &format!(" E={e}");
                rows.push(row);
            }
            // SAFETY: as above.
            unsafe { std::env::remove_var("VLM_SSD_SCAN_E") };
        }
    }
    Ok(rows)
}

fn print_table(ctx: &Ctx, rows: &[Row]) {
    println!(
        "device {:?}, seed {}, time = median of {} runs x {} calls",
        ctx.dev.location(),
        ctx.seed,
        ctx.runs,
        ctx.reps
    );
    println!(
        "{:<24} {:<26} {:<5} {:>10} {:>6} {:>12} {:>8}",
        "kernel", "shape", "in", "max rel err", "result", "median us", "GB/s"
    );
    for r in rows {
        let gbps = r.bytes.map_or("-".to_string(), |b| {
            format!("{:.1}", b as f64 / r.median_us / 1e3)
        });
        let result = match (r.pass(), r.slots_ok) {
            (true, _) => "pass",
            (false, false) => "SLOTS",
            (false, true) => "FAIL",
        };
        println!(
            "{:<24} {:<26} {:<5} {:>10.2e} {:>6} {:>12.1} {:>8}",
            r.kernel,
            r.shape,
            format!("{:?}", r.dtype).to_lowercase(),
            r.err,
            result,
            r.median_us,
            gbps
        );
    }
    let failed = rows.iter().filter(|r| !r.pass()).count();
    println!("{} checks, {failed} failed", rows.len());
}

fn rng(ctx: &Ctx, tag: u64) -> StdRng {
    StdRng::seed_from_u64(ctx.seed.wrapping_mul(1_000_003).wrapping_add(tag))
}

fn uniform(r: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

/// A [rows, cols] random tensor on the device in `dtype`.
fn rand_dev(ctx: &Ctx, r: &mut StdRng, rows: usize, cols: usize, dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(uniform(r, rows * cols, -1.0, 1.0), (rows, cols), &ctx.dev)?.to_dtype(dtype)
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// dt_bias as in the checkpoint's init: softplus⁻¹ of dt in [0.001, 0.1] (log-uniform).
fn dt_bias(r: &mut StdRng) -> Vec<f32> {
    (0..H)
        .map(|_| {
            let dt = (r.random_range(0.001f32.ln()..0.1f32.ln())).exp();
            dt.exp_m1().ln()
        })
        .collect()
}

/// A = −exp(A_log), A_log = ln U(1, 16) as in the checkpoint's init.
fn a_heads(r: &mut StdRng) -> Vec<f32> {
    (0..H).map(|_| -r.random_range(1.0f32..16.0)).collect()
}

/// Distinct random slot ids and a pool whose other slots are NaN.
fn pool_with_slots(
    ctx: &Ctx,
    r: &mut StdRng,
    b: usize,
    slot_len: usize,
    shape: &[usize],
) -> Result<(Tensor, Vec<u32>, Vec<f32>)> {
    let num_slots = shape[0];
    let ids: Vec<u32> = sample(r, num_slots, b)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let mut pool = vec![f32::NAN; num_slots * slot_len];
    for &s in &ids {
        let s = s as usize;
        pool[s * slot_len..(s + 1) * slot_len].copy_from_slice(&uniform(r, slot_len, -1.0, 1.0));
    }
    Ok((Tensor::from_vec(pool.clone(), shape, &ctx.dev)?, ids, pool))
}

/// Untouched slots still hold exactly the NaN bits they started with.
fn untouched_ok(before: &[f32], after: &[f32], slot_len: usize, ids: &[u32]) -> bool {
    before
        .chunks(slot_len)
        .zip(after.chunks(slot_len))
        .enumerate()
        .filter(|(s, _)| !ids.contains(&(*s as u32)))
        .all(|(_, (b, a))| b.iter().zip(a).all(|(x, y)| x.to_bits() == y.to_bits()))
}

/// Median seconds per call: `ctx.runs` samples of `ctx.reps` calls and one device sync.
fn time(ctx: &Ctx, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    kernels::set_poison_outputs(false);
    f()?; // warm-up (PTX load on CUDA)
    ctx.dev.synchronize()?;
    let mut samples = Vec::with_capacity(ctx.runs);
    for _ in 0..ctx.runs {
        let t0 = Instant::now();
        for _ in 0..ctx.reps {
            f()?;
        }
        ctx.dev.synchronize()?;
        samples.push(t0.elapsed().as_secs_f64() / ctx.reps as f64);
    }
    kernels::set_poison_outputs(true);
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

fn esize(dtype: DType) -> usize {
    dtype.size_in_bytes()
}

fn check_conv_update(ctx: &Ctx, b: usize, dtype: DType) -> Result<Row> {
    kernels::set_poison_outputs(true);
    let r = &mut rng(ctx, 1 + b as u64 * 10 + (dtype == DType::BF16) as u64);
    let slot_len = (K - 1) * CD;
    let (pool, ids, before) = pool_with_slots(ctx, r, b, slot_len, &[2 * b + 3, K - 1, CD])?;
    let proj = rand_dev(ctx, r, b, IN_DIM, dtype)?;
    let xbc = proj.narrow(1, DI, CD)?;
    let w = rand_dev(ctx, r, K, CD, DType::F32)?;
    let bias = rand_dev(ctx, r, 1, CD, DType::F32)?.flatten_all()?;
    let slots = Tensor::new(ids.as_slice(), &ctx.dev)?;

    let out = host(&kernels::conv1d_update(
        &pool,
        &xbc,
        &slots,
        &w,
        Some(&bias),
    )?)?;
    let after = host(&pool)?;
    let (xv, wv, bv) = (host(&xbc)?, host(&w)?, host(&bias)?);
    let mut err = 0f64;
    for (row, &s) in ids.iter().enumerate() {
        let s = s as usize;
        let (want, want_state) = reference::conv1d(
            &xv[row * CD..(row + 1) * CD],
            CD,
            &before[s * slot_len..(s + 1) * slot_len],
            &wv,
            Some(&bv),
        );
        let want_state: Vec<f64> = want_state.iter().map(|&v| v as f64).collect();
        err = err
            .max(reference::max_rel_err(
                &out[row * CD..(row + 1) * CD],
                &want,
            ))
            .max(reference::max_rel_err(
                &after[s * slot_len..(s + 1) * slot_len],
                &want_state,
            ));
    }
    let slots_ok = untouched_ok(&before, &after, slot_len, &ids);
    let secs = time(ctx, || {
        kernels::conv1d_update(&pool, &xbc, &slots, &w, Some(&bias)).map(drop)
    })?;
    Ok(Row {
        kernel: "conv1d_update",
        shape: format!("B={b} C={CD} K={K}"),
        dtype,
        err,
        slots_ok,
        median_us: secs * 1e6,
        bytes: Some(b * (2 * slot_len * 4 + CD * esize(dtype) + CD * 4) + (K + 1) * CD * 4),
    })
}

fn check_ssm_update(ctx: &Ctx, b: usize, dtype: DType) -> Result<Row> {
    kernels::set_poison_outputs(true);
    let r = &mut rng(ctx, 2 + b as u64 * 10 + (dtype == DType::BF16) as u64);
    let slot_len = H * P * N;
    let (pool, ids, before) = pool_with_slots(ctx, r, b, slot_len, &[2 * b + 3, H, P, N])?;
    let conv_out = rand_dev(ctx, r, b, CD, DType::F32)?;
    let (x, bm, cm) = (
        conv_out.narrow(1, 0, DI)?,
        conv_out.narrow(1, DI, GN)?,
        conv_out.narrow(1, DI + GN, GN)?,
    );
    let proj = rand_dev(ctx, r, b, IN_DIM, dtype)?;
    let dt_raw = proj.narrow(1, DI + CD, H)?;
    let (dbv, av, dv) = (dt_bias(r), a_heads(r), uniform(r, H, -1.0, 1.0));
    let to_dev = |v: &[f32]| Tensor::new(v, &ctx.dev);
    let (dt_bias_t, a, d) = (to_dev(&dbv)?, to_dev(&av)?, to_dev(&dv)?);
    let slots = Tensor::new(ids.as_slice(), &ctx.dev)?;
    let limit = (0.0, f32::INFINITY);
    let call = || {
        kernels::selective_state_update(
            &pool, &x, &bm, &cm, &dt_raw, &dt_bias_t, &a, &d, limit, &slots,
        )
    };

    let y = host(&call()?)?;
    let after = host(&pool)?;
    let (xv, bv, cv, dtv) = (host(&x)?, host(&bm)?, host(&cm)?, host(&dt_raw)?);
    let sz = reference::SsmSizes {
        heads: H,
        head_dim: P,
        state: N,
        groups: G,
    };
    let errs = par_map(b, |row| {
        let s = ids[row] as usize;
        let dt: Vec<f64> = (0..H)
            .map(|h| reference::dt(dtv[row * H + h], dbv[h], limit))
            .collect();
        let (want_y, want_s) = reference::ssm_update(
            &before[s * slot_len..(s + 1) * slot_len],
            &xv[row * DI..(row + 1) * DI],
            &bv[row * GN..(row + 1) * GN],
            &cv[row * GN..(row + 1) * GN],
            &dt,
            &av,
            &dv,
            sz,
        );
        reference::max_rel_err(&y[row * DI..(row + 1) * DI], &want_y).max(reference::max_rel_err(
            &after[s * slot_len..(s + 1) * slot_len],
            &want_s,
        ))
    });
    let err = errs.into_iter().fold(0f64, f64::max);
    let slots_ok = untouched_ok(&before, &after, slot_len, &ids);
    let secs = time(ctx, || call().map(drop))?;
    Ok(Row {
        kernel: "selective_state_update",
        shape: format!("B={b} H={H} P={P} N={N}"),
        dtype,
        err,
        slots_ok,
        median_us: secs * 1e6,
        bytes: Some(
            b * (2 * slot_len * 4 + 2 * DI * 4 + 2 * GN * 4 + H * esize(dtype)) + 3 * H * 4,
        ),
    })
}

fn check_gated_norm(ctx: &Ctx, t: usize, dtype: DType) -> Result<Row> {
    kernels::set_poison_outputs(true);
    let r = &mut rng(ctx, 3 + t as u64 * 10 + (dtype == DType::BF16) as u64);
    let y = rand_dev(ctx, r, t, DI, DType::F32)?;
    let proj = rand_dev(ctx, r, t, IN_DIM, dtype)?;
    let z = proj.narrow(1, 0, DI)?;
    let w = rand_dev(ctx, r, 1, DI, DType::F32)?.flatten_all()?;
    let gs = DI / G;
    let out = host(&kernels::gated_rms_norm(&y, &z, &w, gs, EPS)?)?;
    let want = reference::gated_norm(&host(&y)?, &host(&z)?, &host(&w)?, gs, EPS);
    let err = reference::max_rel_err(&out, &want);
    let secs = time(ctx, || {
        kernels::gated_rms_norm(&y, &z, &w, gs, EPS).map(drop)
    })?;
    Ok(Row {
        kernel: "gated_rms_norm",
        shape: format!("T={t} D={DI} group={gs}"),
        dtype,
        err,
        slots_ok: true,
        median_us: secs * 1e6,
        bytes: Some(t * DI * (8 + esize(dtype)) + DI * 4),
    })
}

/// The residual add + RMSNorm between blocks, at the LLM's hidden size (outputs in `dtype`).
fn check_add_norm(ctx: &Ctx, t: usize, dtype: DType) -> Result<Row> {
    const HIDDEN: usize = 5120;
    kernels::set_poison_outputs(true);
    let r = &mut rng(ctx, 5 + t as u64 * 10 + (dtype == DType::BF16) as u64);
    let x = rand_dev(ctx, r, t, HIDDEN, dtype)?;
    let delta = rand_dev(ctx, r, t, HIDDEN, dtype)?;
    let w = rand_dev(ctx, r, 1, HIDDEN, dtype)?.flatten_all()?;
    let (sum, h) = kernels::add_rms_norm(&x, Some(&delta), &w, EPS)?;
    let (want_sum, want_h) =
        reference::add_rms_norm(&host(&x)?, Some(&host(&delta)?), &host(&w)?, EPS);
    let err = reference::max_rel_err(&host(&sum)?, &want_sum)
        .max(reference::max_rel_err(&host(&h)?, &want_h));
    let secs = time(ctx, || {
        kernels::add_rms_norm(&x, Some(&delta), &w, EPS).map(drop)
    })?;
    Ok(Row {
        kernel: "add_rms_norm",
        shape: format!("T={t} D={HIDDEN}"),
        dtype,
        err,
        slots_ok: true,
        median_us: secs * 1e6,
        bytes: Some((4 * t + 1) * HIDDEN * esize(dtype)),
    })
}

/// [`kernels::gemv`] and candle's matmul (cuBLAS) on the same BF16 operands.
fn check_gemv(ctx: &Ctx, m: usize, n: usize, k: usize) -> Result<Vec<Row>> {
    kernels::set_poison_outputs(true);
    let rg = &mut rng(ctx, 13 + n as u64 + k as u64 * 7 + m as u64);
    let x = rand_dev(ctx, rg, m, k, DType::BF16)?;
    let w = (rand_dev(ctx, rg, n, k, DType::BF16)? * 0.05)?;
    let want = reference::gemv(&host(&x)?, &host(&w)?, k);
    let bytes = Some((n * k + m * k + m * n) * 2);
    let mut out = Vec::new();
    for (name, f) in [
        (
            "gemv",
            &(|| kernels::gemv(&x, &w)) as &dyn Fn() -> Result<Tensor>,
        ),
        ("matmul (cuBLAS)", &|| x.matmul(&w.t()?)),
    ] {
        let err = reference::max_rel_err(&host(&f()?)?, &want);
        let secs = time(ctx, || f().map(drop))?;
        out.push(Row {
            kernel: name,
            shape: format!("M={m} N={n} K={k}"),
            dtype: DType::BF16,
            err,
            slots_ok: true,
            median_us: secs * 1e6,
            bytes,
        });
    }
    Ok(out)
}

fn check_bias_act(
    ctx: &Ctx,
    (r, n): (usize, usize),
    act: Activation,
    with_bias: bool,
    with_residual: bool,
    dtype: DType,
) -> Result<Row> {
    kernels::set_poison_outputs(true);
    let rg = &mut rng(ctx, 7 + r as u64 + n as u64 * 3 + act as u64);
    let y = (rand_dev(ctx, rg, r, n, dtype)? * 3.0)?;
    let bias = with_bias
        .then(|| rand_dev(ctx, rg, 1, n, dtype)?.flatten_all())
        .transpose()?;
    let res = with_residual
        .then(|| rand_dev(ctx, rg, r, n, dtype))
        .transpose()?;
    let call = || kernels::bias_act(&y, bias.as_ref(), act, res.as_ref());
    let got = host(&call()?)?;
    let (bh, rh) = (
        bias.as_ref().map(host).transpose()?,
        res.as_ref().map(host).transpose()?,
    );
    let want = reference::bias_act(&host(&y)?, n, bh.as_deref(), act as u8, rh.as_deref());
    let err = reference::max_rel_err(&got, &want);
    let secs = time(ctx, || call().map(drop))?;
    let passes = 2 + with_residual as usize;
    Ok(Row {
        kernel: "bias_act",
        shape: format!(
            "{r}x{n} {act:?}{}{}",
            if with_bias { "+b" } else { "" },
            if with_residual { "+r" } else { "" }
        ),
        dtype,
        err,
        slots_ok: true,
        median_us: secs * 1e6,
        bytes: Some(passes * r * n * esize(dtype)),
    })
}

fn check_softmax(
    ctx: &Ctx,
    (r, l): (usize, usize),
    causal: Option<(usize, usize)>,
    dtype: DType,
) -> Result<Row> {
    kernels::set_poison_outputs(true);
    let rg = &mut rng(ctx, 11 + r as u64 + l as u64);
    let s = (rand_dev(ctx, rg, r, l, dtype)? * 8.0)?;
    let scale = 0.088;
    let got = host(&kernels::scaled_softmax(&s, scale, causal)?)?;
    let want = reference::scaled_softmax(&host(&s)?, l, scale, causal);
    let err = reference::max_rel_err(&got, &want);
    let secs = time(ctx, || kernels::scaled_softmax(&s, scale, causal).map(drop))?;
    Ok(Row {
        kernel: "scaled_softmax",
        shape: format!("{r}x{l}{}", if causal.is_some() { " causal" } else { "" }),
        dtype,
        err,
        slots_ok: true,
        median_us: secs * 1e6,
        bytes: Some(2 * r * l * esize(dtype)),
    })
}

fn check_conv_prefill(ctx: &Ctx, l: usize, dtype: DType) -> Result<Row> {
    kernels::set_poison_outputs(true);
    let r = &mut rng(ctx, 4 + l as u64 * 10 + (dtype == DType::BF16) as u64);
    let proj = rand_dev(ctx, r, l, IN_DIM, dtype)?;
    let x = proj.narrow(1, DI, CD)?;
    let state = rand_dev(ctx, r, K - 1, CD, DType::F32)?;
    let w = rand_dev(ctx, r, K, CD, DType::F32)?;
    let bias = rand_dev(ctx, r, 1, CD, DType::F32)?.flatten_all()?;
    let (out, new_state) = kernels::conv1d_prefill(&x, &state, &w, Some(&bias))?;
    let (want, want_state) = reference::conv1d(
        &host(&x)?,
        CD,
        &host(&state)?,
        &host(&w)?,
        Some(&host(&bias)?),
    );
    let want_state: Vec<f64> = want_state.iter().map(|&v| v as f64).collect();
    let err = reference::max_rel_err(&host(&out)?, &want)
        .max(reference::max_rel_err(&host(&new_state)?, &want_state));
    let secs = time(ctx, || {
        kernels::conv1d_prefill(&x, &state, &w, Some(&bias)).map(drop)
    })?;
    Ok(Row {
        kernel: "conv1d_prefill",
        shape: format!("L={l} C={CD} K={K}"),
        dtype,
        err,
        slots_ok: true,
        median_us: secs * 1e6,
        bytes: Some(l * CD * (esize(dtype) + 4) + (2 * (K - 1) + K + 1) * CD * 4),
    })
}

fn check_ssd_scan(ctx: &Ctx, l: usize) -> Result<Row> {
    kernels::set_poison_outputs(true);
    let r = &mut rng(ctx, 5 + l as u64 * 10);
    let xv = uniform(r, l * DI, -1.0, 1.0);
    let (dbv, av) = (dt_bias(r), a_heads(r));
    let dtv: Vec<f32> = uniform(r, l * H, -1.0, 1.0)
        .iter()
        .enumerate()
        .map(|(i, &raw)| reference::dt(raw, dbv[i % H], (0.0, f32::INFINITY)) as f32)
        .collect();
    let (bv, cv) = (uniform(r, l * GN, -1.0, 1.0), uniform(r, l * GN, -1.0, 1.0));
    let s0 = uniform(r, H * P * N, -1.0, 1.0);
    let dev = &ctx.dev;
    let x = Tensor::from_slice(&xv, (l, H, P), dev)?;
    let dt = Tensor::from_slice(&dtv, (l, H), dev)?;
    let a = Tensor::from_slice(&av, H, dev)?;
    let b = Tensor::from_slice(&bv, (l, G, N), dev)?;
    let c = Tensor::from_slice(&cv, (l, G, N), dev)?;
    let state = Tensor::from_slice(&s0, (H, P, N), dev)?;
    let (y, s) = kernels::ssd_scan(&x, &dt, &a, &b, &c, &state, CHUNK)?;
    let (y, s) = (host(&y)?, host(&s)?);
    let sz = reference::SsmSizes {
        heads: H,
        head_dim: P,
        state: N,
        groups: G,
    };
    // f64 reference, one head per task.
    let heads = par_map(H, |h| {
        reference::ssd_scan_head(
            h,
            &xv,
            &dtv,
            av[h],
            &bv,
            &cv,
            &s0[h * P * N..(h + 1) * P * N],
            sz,
        )
    });
    let mut want_y = vec![0f64; l * DI];
    let mut want_s = Vec::with_capacity(H * P * N);
    for (h, (yh, sh)) in heads.into_iter().enumerate() {
        for t in 0..l {
            want_y[t * DI + h * P..t * DI + (h + 1) * P].copy_from_slice(&yh[t * P..(t + 1) * P]);
        }
        want_s.extend(sh);
    }
    let err = reference::max_rel_err(&y, &want_y).max(reference::max_rel_err(&s, &want_s));
    let secs = time(ctx, || {
        kernels::ssd_scan(&x, &dt, &a, &b, &c, &state, CHUNK).map(drop)
    })?;
    Ok(Row {
        kernel: "ssd_scan",
        shape: format!("L={l} H={H} P={P} N={N}"),
        dtype: DType::F32,
        err,
        slots_ok: true,
        median_us: secs * 1e6,
        bytes: None,
    })
}

/// `f(0..n)` on all cores (the f64 references at full size).
fn par_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |w| w.get())
        .min(n.max(1));
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let v = f(i);
                    *results[i].lock().expect("result lock") = Some(v);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .expect("result lock")
                .expect("every index ran")
        })
        .collect()
}
