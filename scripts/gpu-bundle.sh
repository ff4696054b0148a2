#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine, which builds nothing itself:
# vlm-server, the kernel_check and bench_full examples and the golden test binaries, built
# with `--features cuda`, stripped and packed into gpu-bundle/bundle.tar.xz (one xz stream:
# every binary carries the same ~32 MB of candle's sm_90a kernels, which the stream stores
# once). gpu-bundle/ is ignored by git; carry it to the GPU machine with the repository.
#
#   # the CUDA 13.0 toolchain (see README.md, "GPU build"):
#   export CUDA_HOME=<venv>/cuda-root CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000 \
#          NVCC=<venv>/cuda-root/bin/nvcc
#   scripts/gpu-bundle.sh            # CUDA bundle
#   scripts/gpu-bundle.sh --cpu      # CPU bundle, for `scripts/gpu-check.sh --dry-run`
#
# Honours CARGO_TARGET_DIR. Prints the bundle's size (the GPU machine takes at most 64 MiB
# of repository + carried files).
set -euo pipefail
cd "$(dirname "$0")/.."

features=(--features cuda)
kind=cuda
out=gpu-bundle
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) features=(); kind=cpu ;;
    --out) out=$2; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$kind" = cuda ] && [ -z "${CUDA_HOME:-}" ] && [ -z "${NVCC:-}" ]; then
  echo "gpu-bundle: set the CUDA build env first (CUDA_HOME, CUDA_COMPUTE_CAP=90, ...; README.md 'GPU build')" >&2
  exit 2
fi

examples=(bench_full)
[ -f server/examples/kernel_check.rs ] && examples+=(kernel_check) \
  || echo "gpu-bundle: server/examples/kernel_check.rs is absent; bundling without it" >&2
tests=(llm_golden vlm_golden vision_golden)

example_args=()
for e in "${examples[@]}"; do example_args+=(--example "$e"); done
test_args=()
for t in "${tests[@]}"; do test_args+=(--test "$t"); done

cargo build --release -p vlm-server "${features[@]}" --bin vlm-server "${example_args[@]}"
# Test binaries have hashed names: ask cargo where it put them.
json=$(mktemp)
cargo test --release -p vlm-server "${features[@]}" "${test_args[@]}" --no-run --message-format=json >"$json"

stage=$(mktemp -d)
trap 'rm -rf "$stage" "$json"' EXIT
python3 - "$json" "$stage" "${tests[@]}" <<'EOF'
import json, shutil, sys
path, stage, wanted = sys.argv[1], sys.argv[2], set(sys.argv[3:])
found = {}
for line in open(path):
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
            and "test" in msg["target"]["kind"] and msg["target"]["name"] in wanted:
        found[msg["target"]["name"]] = msg["executable"]
missing = wanted - set(found)
if missing:
    sys.exit(f"gpu-bundle: cargo reported no executable for {sorted(missing)}")
for name, exe in found.items():
    shutil.copy2(exe, f"{stage}/{name}")
EOF
target=${CARGO_TARGET_DIR:-target}
cp "$target/release/vlm-server" "$stage/"
for e in "${examples[@]}"; do cp "$target/release/examples/$e" "$stage/"; done
strip "$stage"/*

# The golden tests find their fixtures through the manifest path compiled into them;
# gpu-check.sh links that path to its checkout when the two differ.
{
  echo "kind=$kind"
  echo "manifest_dir=$PWD/server"
  echo "git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$stage/BUNDLE"
(cd "$stage" && sha256sum -- * >SHA256SUMS && ls -l)

mkdir -p "$out"
rm -f "$out/bundle.tar.xz"
# A dictionary larger than two binaries, so the second copy of the kernels is a back-reference.
tar -C "$stage" -cf - . | xz -T1 -9 --lzma2=preset=9,dict=192MiB >"$out/bundle.tar.xz"
cp "$stage/BUNDLE" "$out/BUNDLE"
size=$(stat -c %s "$out/bundle.tar.xz")
echo "gpu-bundle: $out/bundle.tar.xz $((size / 1048576)) MiB ($size bytes), $kind build, $(wc -l <"$stage/SHA256SUMS") files"
if [ "$size" -gt $((56 * 1048576)) ]; then
  echo "gpu-bundle: WARNING: over 56 MiB; with the repository it may not fit the 64 MiB carry limit" >&2
fi
