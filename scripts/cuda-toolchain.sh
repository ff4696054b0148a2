#!/usr/bin/env bash
# Installs a GPU-less CUDA 13.0 *build* toolchain from PyPI (NVIDIA's cuda-toolkit 13.0.2
# wheels) and lays out a CUDA root that candle-core[cuda] 0.11's build scripts (cudaforge,
# cudarc) accept: symlinks to the wheels' bin/include/nvvm, unversioned .so links, and a
# link-time stub libcuda.so (the driver library is not on PyPI).
#
#   scripts/cuda-toolchain.sh ~/.cache/cuda-build      # once, ~25 s, ~1.2 GB
#   export CUDA_HOME=~/.cache/cuda-build/cuda-root CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000 \
#          NVCC=~/.cache/cuda-build/cuda-root/bin/nvcc
#   cargo build --release -p vlm-server --features cuda
#
# Needs python3 with venv and gcc. The stub is named libcuda.so only (soname libcuda.so.1),
# so it can never shadow the real driver's libcuda.so.1 at run time.
set -euo pipefail
VENV=${1:?usage: cuda-toolchain.sh VENV_DIR}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# cuda-toolkit 13.0.2 is NVIDIA's meta-package; its extras pin a consistent 13.0 set.
# Do NOT pip install nvidia-cuda-nvcc alone: its own deps (nvvm, crt, runtime) are unpinned -> 13.5.
"$VENV/bin/pip" install -q "cuda-toolkit[nvcc,cudart,cccl,crt,nvvm,cublas,curand,nvrtc]==13.0.2"
N=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
CR="$VENV/cuda-root"
mkdir -p "$CR/lib64/stubs"
ln -sfn "$N/bin" "$CR/bin"          # nvcc, ptxas, fatbinary, nvlink, cudafe++
ln -sfn "$N/include" "$CR/include"  # cuda.h, cuda_fp16.h, crt/, cccl/ (cuda/std, cub, thrust)
ln -sfn "$N/nvvm" "$CR/nvvm"        # cicc + libdevice (nvcc.profile: $TOP/nvvm/bin)
# wheels ship only versioned sonames; the linker's -lcublas etc. need the unversioned names
for f in "$N"/lib/*.so.*; do
  b=$(basename "$f"); ln -sfn "$f" "$CR/lib64/$b"; ln -sfn "$b" "$CR/lib64/${b%%.so*}.so"
done
# libcuda (driver API) is not on PyPI: build a link-time stub, soname libcuda.so.1, every
# cu* entry point of cuda.h returning CUDA_ERROR_STUB_LIBRARY (34). Only the file name
# libcuda.so exists, so it can never shadow the real driver's libcuda.so.1 at run time.
tmp=$(mktemp -d)
for d in "" -D__CUDA_API_VERSION_INTERNAL -DCUDA_API_PER_THREAD_DEFAULT_STREAM; do
  gcc -E $d -I"$N/include" "$N/include/cuda.h"
done | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u \
  | awk '{print "int " $1 "(void) { return 34; }"}' > "$tmp/stub.c"
gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$CR/lib64/stubs/libcuda.so" "$tmp/stub.c" 2>/dev/null
rm -rf "$tmp"
"$CR/bin/nvcc" --version | tail -2
echo "CUDA root ready: $CR"
