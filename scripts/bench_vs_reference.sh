#!/usr/bin/env bash
# Side-by-side CPU throughput, batch 1: this crate vs the transformers reference,
# on the same mid-size checkpoint (~100M parameters), same prompts, medians.
# Needs the fixture venv: pip install -r scripts/requirements-fixtures.txt
# Usage: scripts/bench_vs_reference.sh [PYTHON] [PROMPT_TOKENS] [DECODE_TOKENS] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
prompt=${2:-512}
decode=${3:-32}
runs=${4:-5}
ckpt=target/mid-checkpoint
[ -f "$ckpt/config.json" ] || "$py" scripts/make_checkpoint.py --preset mid --out "$ckpt"
cargo build --release -q -p vlm-server --example bench_model
rust=$(/usr/bin/time -f '%M' -o target/bench-rust-rss.txt \
  target/release/examples/bench_model --model "$ckpt" --prompt-tokens "$prompt" --decode-tokens "$decode" --runs "$runs")
ref=$("$py" scripts/bench_reference.py --model "$ckpt" --prompt-tokens "$prompt" --decode-tokens "$decode" --runs "$runs")
RUST="$rust" REF="$ref" RSS_KB=$(cat target/bench-rust-rss.txt) CKPT="$ckpt" "$py" - <<'PY'
import json, os, glob
rust, ref = json.loads(os.environ["RUST"]), json.loads(os.environ["REF"])
weights = sum(os.path.getsize(f) for f in glob.glob(os.environ["CKPT"] + "/*.safetensors"))
print(f"params {ref['params']/1e6:.1f}M, torch threads {ref['threads']}, {ref['runs']} runs, medians")
print("| prompt | metric | vlm-server tok/s | transformers tok/s | ratio |")
print("|---|---|---|---|---|")
for kind in ("text", "image"):
    for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        a, b = rust[kind][metric], ref[kind][metric]
        print(f"| {kind} ({rust[kind]['prompt_tokens']} tokens) | {metric.split('_')[0]} | {a:.1f} | {b:.1f} | {a/b:.2f}x |")
rss = int(os.environ["RSS_KB"]) * 1024
print(f"vlm-server peak RSS {rss/2**20:.0f} MiB; checkpoint (bf16) {weights/2**20:.0f} MiB; "
      f"f32 weights in memory {ref['params']*4/2**20:.0f} MiB")
PY
