//! Throughput of the CPU `Linear` layer alone (a measurement, not a test), on the mid-size
//! checkpoint's prefill and decode shapes, with random BF16 weights: median time and
//! GFLOP/s per [m, k] × [k, n] product, output allocation and activation rounding
//! included. `scripts/bench_matmul_reference.py` times torch's `nn.Linear` on the same
//! shapes; run both on the same machine, one after the other.
//!
//! VLM_CPU_MATMUL=bf16 cargo run --release -p vlm-server --example bench_matmul

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use vlm_server::model::linear::{CpuMatmul, Linear};

/// (m, k, n): Mamba in_proj and out_proj, MLP up and down, attention o_proj at 512 prompt
/// tokens; the vision encoder's qkv, proj, fc1 and fc2 on one tile; batch-1 and batch-16
/// decode.
const SHAPES: &[(usize, usize, usize)] = &[
    (512, 768, 3608),
    (512, 1536, 768),
    (512, 768, 3072),
    (512, 3072, 768),
    (512, 768, 768),
    (1032, 768, 2304),
    (1032, 768, 768),
    (1032, 768, 3072),
    (1032, 3072, 768),
    (1, 768, 3608),
    (16, 768, 3072),
];
const RUNS: usize = 31;

fn main() -> candle_core::Result<()> {
    vlm_server::memory::tune_allocator();
    let dev = Device::Cpu;
    println!("mode {:?}", CpuMatmul::current());
    for &(m, k, n) in SHAPES {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?.to_dtype(DType::BF16)?;
        let layer = Linear::from_weight(w, None)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let mut times: Vec<f64> = (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(layer.forward(&x)?);
                Ok(t.elapsed().as_secs_f64())
            })
            .collect::<candle_core::Result<_>>()?;
        times.sort_by(f64::total_cmp);
        let median = times[RUNS / 2];
        let gflops = 2.0 * (m * k * n) as f64 / median / 1e9;
        println!("{m}x{k}x{n}: {:.3} ms, {gflops:.0} GFLOP/s", median * 1e3);
    }
    Ok(())
}
