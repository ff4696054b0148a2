#!/usr/bin/env bash
# Side-by-side CPU throughput, batch 1: this crate vs the transformers reference,
# on the same mid-size checkpoint (~100M parameters), same prompts, medians.
# Needs the fixture venv: pip install -r scripts/requirements-fixtures.txt
# Usage: scripts/bench_vs_reference.sh [PYTHON] [PROMPT_TOKENS] [DECODE_TOKENS] [RUNS] [PRECISION] [ROUNDS]
# PRECISION: f32 (default: f32 activations here, float32 transformers) or bf16 (BF16 matmul
# inputs here, --cpu-matmul bf16; every module in bfloat16 in transformers).
# ROUNDS (default 3): the two sides run alternately, ROUNDS times each, RUNS timed runs per
# round, so that a busy spell of a shared machine hits both. Reported: per metric, the median
# over rounds of each side's median, and the median of the per-round ratios (ours against
# the reference run right after it), with the range of those ratios.
# Honors CARGO_TARGET_DIR. Peak RSS is /usr/bin/time's maximum resident set size of the
# whole bench_model process (load included; the largest over rounds), compared with the
# checkpoint's bytes as stored and with the same weights in f32.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
prompt=${2:-512}
decode=${3:-32}
runs=${4:-5}
precision=${5:-f32}
rounds=${6:-3}
case "$precision" in
  f32) torch_dtype=float32 ;;
  bf16) torch_dtype=bfloat16 ;;
  *) echo "PRECISION must be f32 or bf16" >&2; exit 2 ;;
esac
ckpt=target/mid-checkpoint
target_dir=${CARGO_TARGET_DIR:-target}
[ -f "$ckpt/config.json" ] || "$py" scripts/make_checkpoint.py --preset mid --out "$ckpt"
cargo build --release -q -p vlm-server --example bench_model
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for r in $(seq "$rounds"); do
  VLM_CPU_MATMUL=$precision /usr/bin/time -f '%M' -o "$work/rss.$r" \
    "$target_dir/release/examples/bench_model" --model "$ckpt" --prompt-tokens "$prompt" \
    --decode-tokens "$decode" --runs "$runs" > "$work/rust.$r"
  "$py" scripts/bench_reference.py --model "$ckpt" --prompt-tokens "$prompt" \
    --decode-tokens "$decode" --runs "$runs" --dtype "$torch_dtype" > "$work/ref.$r"
done
WORK="$work" ROUNDS="$rounds" CKPT="$ckpt" "$py" - <<'PY'
import glob, json, os, statistics
work, rounds = os.environ["WORK"], int(os.environ["ROUNDS"])
load = lambda side: [json.load(open(f"{work}/{side}.{r}")) for r in range(1, rounds + 1)]
rust, ref = load("rust"), load("ref")
med = statistics.median
weights = sum(os.path.getsize(f) for f in glob.glob(os.environ["CKPT"] + "/*.safetensors"))
print(f"params {ref[0]['params']/1e6:.1f}M, torch threads {ref[0]['threads']}, {rounds} alternating "
      f"rounds of {ref[0]['runs']} runs; medians over rounds; {ref[0]['reference']}")
print("| prompt | metric | vlm-server tok/s | transformers tok/s | ratio (median of rounds) | ratio range |")
print("|---|---|---|---|---|---|")
def row(label, ours, theirs):
    ratios = [a / b for a, b in zip(ours, theirs)]
    print(f"| {label} | {med(ours):.1f} | {med(theirs):.1f} | {med(ratios):.2f}x | "
          f"{min(ratios):.2f}x to {max(ratios):.2f}x |")
for kind in ("text", "image"):
    for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        row(f"{kind} ({rust[0][kind]['prompt_tokens']} tokens) | {metric.split('_')[0]}",
            [x[kind][metric] for x in rust], [x[kind][metric] for x in ref])
ours = [x["image"]["vision_s_median"] for x in rust]
theirs = [x["image"]["vision_s_median"] for x in ref]
ratios = [b / a for a, b in zip(ours, theirs)]
print(f"vision encoder + projector, one tile: {med(ours):.3f} s vs {med(theirs):.3f} s "
      f"({med(ratios):.2f}x, rounds {min(ratios):.2f}x to {max(ratios):.2f}x)")
rss = max(int(open(f).read().split()[-1]) for f in glob.glob(f"{work}/rss.*")) * 1024
f32 = ref[0]["params"] * 4
print(f"vlm-server peak RSS {rss/2**20:.0f} MiB = {rss/weights:.2f}x the checkpoint "
      f"({weights/2**20:.0f} MiB as stored, bf16) = {rss/f32:.2f}x the f32 weights ({f32/2**20:.0f} MiB)")
PY
