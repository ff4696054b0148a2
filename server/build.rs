//! Compiles `kernels/*.cu` to PTX (embedded by `src/kernels/cuda.rs`) for `--features cuda`.
//! CPU builds skip this and need no CUDA toolchain.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=NVCC_CCBIN");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    // Plain sm_XX PTX (not sm_90a): the driver JITs it for this GPU and newer ones.
    let cap: String = env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "90".into())
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let mut sources: Vec<PathBuf> = fs::read_dir("kernels")
        .expect("server/kernels/ is missing")
        .map(|e| e.expect("reading server/kernels/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        compile_ptx(&nvcc, &cap, src, &out);
    }
}

fn compile_ptx(nvcc: &str, cap: &str, src: &Path, out: &Path) {
    let stem = src.file_stem().expect("kernel file name").to_string_lossy();
    let ptx = out.join(format!("{stem}.ptx"));
    let mut cmd = Command::new(nvcc);
    cmd.args(["-ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}")]);
    if let Ok(ccbin) = env::var("NVCC_CCBIN") {
        cmd.args(["-ccbin", &ccbin, "-allow-unsupported-compiler"]);
    }
    let status = cmd
        .arg("-o")
        .arg(&ptx)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("cannot run `{nvcc}` (set NVCC or put nvcc on PATH): {e}"));
    assert!(status.success(), "nvcc failed on {}", src.display());
}
