//! vlm-server: an OpenAI/NIM-compatible server for NVIDIA Nemotron Nano 12B v2 VL.
//!
//! Layers, data flowing one way: `api` (HTTP protocol, validation, auth,
//! streaming) → `engine` (queue, generation, sampling) → `model` (forward
//! passes), with `preprocess` (image decoding and tiling) and `prompt`
//! (chat template, tokenization, image-token splicing) feeding the model.

pub mod api;
pub mod device;
pub mod download;
pub mod engine;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod preprocess;
pub mod prompt;
