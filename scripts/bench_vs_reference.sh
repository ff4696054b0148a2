#!/usr/bin/env bash
# Side-by-side CPU throughput, batch 1: this crate vs the transformers reference,
# on the same mid-size checkpoint (~100M parameters), same prompts, medians.
# Needs the fixture venv: pip install -r scripts/requirements-fixtures.txt
# Usage: scripts/bench_vs_reference.sh [PYTHON] [PROMPT_TOKENS] [DECODE_TOKENS] [RUNS] [PRECISION]
# PRECISION: f32 (default: f32 activations here, float32 transformers) or bf16 (BF16 matmul
# inputs here, --cpu-matmul bf16; every module in bfloat16 in transformers).
# Honors CARGO_TARGET_DIR. Peak RSS is /usr/bin/time's maximum resident set size of the
# whole bench_model process (load included), compared with the checkpoint's bytes as stored
# and with the same weights in f32.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
prompt=${2:-512}
decode=${3:-32}
runs=${4:-5}
precision=${5:-f32}
case "$precision" in
  f32) torch_dtype=float32 ;;
  bf16) torch_dtype=bfloat16 ;;
  *) echo "PRECISION must be f32 or bf16" >&2; exit 2 ;;
esac
ckpt=target/mid-checkpoint
target_dir=${CARGO_TARGET_DIR:-target}
[ -f "$ckpt/config.json" ] || "$py" scripts/make_checkpoint.py --preset mid --out "$ckpt"
cargo build --release -q -p vlm-server --example bench_model
rss_file=$(mktemp)
trap 'rm -f "$rss_file"' EXIT
rust=$(VLM_CPU_MATMUL=$precision /usr/bin/time -f '%M' -o "$rss_file" \
  "$target_dir/release/examples/bench_model" --model "$ckpt" --prompt-tokens "$prompt" --decode-tokens "$decode" --runs "$runs")
ref=$("$py" scripts/bench_reference.py --model "$ckpt" --prompt-tokens "$prompt" --decode-tokens "$decode" --runs "$runs" --dtype "$torch_dtype")
RUST="$rust" REF="$ref" RSS_KB=$(cat "$rss_file") CKPT="$ckpt" "$py" - <<'PY'
import json, os, glob
rust, ref = json.loads(os.environ["RUST"]), json.loads(os.environ["REF"])
weights = sum(os.path.getsize(f) for f in glob.glob(os.environ["CKPT"] + "/*.safetensors"))
print(f"params {ref['params']/1e6:.1f}M, torch threads {ref['threads']}, {ref['runs']} runs, medians; {ref['reference']}")
print("| prompt | metric | vlm-server tok/s | transformers tok/s | ratio |")
print("|---|---|---|---|---|")
for kind in ("text", "image"):
    for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        a, b = rust[kind][metric], ref[kind][metric]
        print(f"| {kind} ({rust[kind]['prompt_tokens']} tokens) | {metric.split('_')[0]} | {a:.1f} | {b:.1f} | {a/b:.2f}x |")
a, b = rust["image"]["vision_s_median"], ref["image"]["vision_s_median"]
print(f"vision encoder + projector, one tile: {a:.3f} s vs {b:.3f} s ({b/a:.2f}x)")
rss, f32 = int(os.environ["RSS_KB"]) * 1024, ref["params"] * 4
print(f"vlm-server peak RSS {rss/2**20:.0f} MiB = {rss/weights:.2f}x the checkpoint "
      f"({weights/2**20:.0f} MiB as stored, bf16) = {rss/f32:.2f}x the f32 weights ({f32/2**20:.0f} MiB)")
PY
