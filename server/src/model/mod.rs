//! model
pub mod attention;
mod bf16_gemm;
mod bf16_tiles;
pub mod checkpoint;
pub mod config;
pub(crate) mod cpu_math;
pub mod linear;
pub mod mamba2;
pub mod mlp;
pub mod nemotron_h;
pub mod norm;
pub mod projector;
pub mod radio;
pub mod random;
pub mod state;
pub mod vlm;
