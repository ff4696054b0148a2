#!/usr/bin/env bash
# The GPU check in one command, for a GPU machine that builds nothing: it runs the binaries
# of gpu-bundle/ (made by scripts/gpu-bundle.sh on a build machine) and, if time allows,
# the transformers reference, then prints a summary table against the performance targets.
#
#   scripts/gpu-check.sh              # on the GPU machine (H100/H200), at most --budget s
#   scripts/gpu-check.sh --dry-run    # the same steps on CPU with small sizes (CPU bundle:
#                                     # scripts/gpu-bundle.sh --cpu; PYTHON=<python with torch>)
#   scripts/gpu-check.sh --steps golden,bench,profile   # a subset, in this order
#
# Steps, each with its own timeout: (a) kernel_check, (b) the golden tests
# (VLM_TEST_DEVICE=cuda), (c) bench_full on the full-size model with random weights,
# (d) scripts/bench_reference_gpu.py (transformers) when enough of the budget is left.
# Optional step `profile`: per phase (decode at batch 1 and 16, a 13-tile prefill, 13 vision
# tiles), the host's issue time against the GPU's, then one run under Nsight Compute with
# each kernel's duration summed by kernel name (profile.txt; the raw CSVs in ncu.tar.xz).
# `bench` also runs once with VLM_CUDA_EVENT_TRACKING=1, for the cost of cudarc's events.
# Outputs go to $OUT (else ./gpu-check-out): gpu-check.log, summary.txt, bench_full.json,
# bench_ref.json. Exit status 0 when every step that ran passed; the speed targets are
# reported, never enforced.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

dry_run=0
bundle=gpu-bundle
out=${OUT:-$repo/gpu-check-out}
budget=
steps=kernels,golden,bench,reference
python=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --bundle) bundle=$2; shift ;;
    --out) out=$2; shift ;;
    --budget) budget=$2; shift ;;
    --steps) steps=$2; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ "$dry_run" = 1 ]; then
  device=cpu
  budget=${budget:-1500}
  t_kernels=300 t_golden=400 t_bench=400 t_ref_min=60
  # Full widths, one layer of each kind, small batches: proves the steps, measures nothing.
  bench_args=(--pattern 'M*-' --vision-layers 1 --vocab 4096 --tiles 1,2 --batch 1,2
    --decode-steps 2 --decode-context 16 --vision-batch 1 --runs 1 --warmup 0)
  kernel_args=(--device cpu --quick)
else
  device=cuda
  budget=${budget:-480}
  t_kernels=90 t_golden=60 t_bench=210 t_ref_min=100
  bench_args=(--runs 5 --warmup 1)
  kernel_args=(--device cuda)
fi

mkdir -p "$out"
log=$out/gpu-check.log
: >"$log"
say() { echo "$*" | tee -a "$log"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vlm-gpu-check.XXXXXX")
cleanup() { [ -n "${linked:-}" ] && rm -f "$linked"; rm -rf "$work"; }
trap cleanup EXIT
results=$work/results.tsv
: >"$results"

# ---- setup -------------------------------------------------------------------------------
if [ ! -f "$bundle/bundle.tar.xz" ]; then
  say "gpu-check: no $bundle/bundle.tar.xz (make it with scripts/gpu-bundle.sh$([ $dry_run = 1 ] && echo ' --cpu'))"
  exit 2
fi
bin=$work/bin
mkdir -p "$bin"
if command -v xz >/dev/null; then
  tar -C "$bin" -xJf "$bundle/bundle.tar.xz"
else
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$bundle/bundle.tar.xz" "$bin"
fi
(cd "$bin" && sha256sum -c --quiet SHA256SUMS) || { say "gpu-check: bundle checksums differ"; exit 2; }
kind=$(sed -n 's/^kind=//p' "$bin/BUNDLE")
manifest_dir=$(sed -n 's/^manifest_dir=//p' "$bin/BUNDLE")
say "gpu-check: $device, budget ${budget}s, bundle $(sed -n 's/^git_rev=//p' "$bin/BUNDLE") ($kind build, $(sed -n 's/^built=//p' "$bin/BUNDLE"))"
if [ "$kind" != "$device" ]; then
  say "gpu-check: the bundle is a $kind build; this run needs a $device build"
  exit 2
fi

gpu_name=cpu
bandwidth=3.0
if [ "$device" = cuda ]; then
  # The CUDA 13 runtime libraries of the machine's torch (pip nvidia-* cu13 wheels).
  cu13=$("$python" - <<'EOF'
import glob, os, site, sys
roots = []
try:
    import nvidia
    roots += list(nvidia.__path__)
except ImportError:
    pass
roots += [os.path.join(p, "nvidia") for p in site.getsitepackages()]
for r in roots:
    lib = os.path.join(r, "cu13", "lib")
    if glob.glob(os.path.join(lib, "libcublas.so.13*")):
        print(lib)
        sys.exit(0)
sys.exit(1)
EOF
  ) || { say "gpu-check: no nvidia/cu13/lib with libcublas.so.13 found by $python"; exit 2; }
  export LD_LIBRARY_PATH=$cu13${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  nvidia-smi 2>&1 | tee -a "$log"
  gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  # Measured device-to-device copy rates on this workplace's machines (KINDS.md).
  case "$gpu_name" in *H200*) bandwidth=4.3 ;; esac
  for f in "$bin"/*; do
    [ -x "$f" ] || continue
    missing=$(ldd "$f" 2>/dev/null | grep 'not found')
    [ -n "$missing" ] && say "ldd $(basename "$f"): $missing"
  done
fi

# The golden tests read fixtures through the manifest path compiled into them.
if [ ! -e "$manifest_dir/tests/golden/golden.json" ]; then
  mkdir -p "$(dirname "$manifest_dir")" && ln -sfn "$repo/server" "$manifest_dir" \
    && linked=$manifest_dir && say "linked $manifest_dir -> $repo/server for the golden fixtures"
fi

# run_step NAME TIMEOUT CMD...: runs CMD under the smaller of TIMEOUT and the budget left.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS - 5))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    say "=== $name: skipped (budget spent)"
    printf '%s\tskipped\t0\n' "$name" >>"$results"
    return
  fi
  say "=== $name (timeout ${limit}s): $*"
  local t0=$SECONDS monitor=
  if [ "$device" = cuda ]; then  # GPU memory in use, every 0.5 s, for the summary's peak
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$work/$name.mem" 2>/dev/null &
    monitor=$!
  fi
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$work/$name.out" | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ -n "$monitor" ] && kill "$monitor" 2>/dev/null && wait "$monitor" 2>/dev/null
  say "=== $name: rc $rc in $((SECONDS - t0))s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$results"
}

want() { [[ ",$steps," == *",$1,"* ]]; }

# ---- (a) kernels -------------------------------------------------------------------------
if ! want kernels; then
  :
elif [ -x "$bin/kernel_check" ]; then
  run_step kernel_check "$t_kernels" "$bin/kernel_check" "${kernel_args[@]}"
else
  say "=== kernel_check: not in the bundle"
  printf 'kernel_check\tabsent\t0\n' >>"$results"
fi

# ---- (b) golden tests --------------------------------------------------------------------
want golden && for t in llm_golden vlm_golden vision_golden; do
  run_step "$t" "$t_golden" env VLM_TEST_DEVICE="$device" "$bin/$t"
done

# ---- (c) full-size benchmark -------------------------------------------------------------
rm -f "$out/bench_full.json" "$out/bench_ref.json"
if want bench; then
  run_step bench_full "$t_bench" "$bin/bench_full" --device "$device" --bandwidth-tbs "$bandwidth" \
    --json "$out/bench_full.json" "${bench_args[@]}"
  # The switches, each measured off against the run above (same machine, same run):
  # VLM_CUDA_FUSED=0: no fused kernels (add + RMSNorm, linear epilogues, attention softmax);
  # VLM_CUDA_GEMV=0: cuBLAS for the decode matmuls; VLM_CUDA_EVENT_TRACKING=1: cudarc's
  # per-allocation events back on; VLM_SSD_SCAN_E=16: the other prefill-scan layout.
  if [ "$device" = cuda ]; then
    for variant in \
        "unfused|VLM_CUDA_FUSED=0|--tiles 1,13 --vision-batch 13" \
        "cublas|VLM_CUDA_GEMV=0|--tiles 1 --vision-batch 1" \
        "events|VLM_CUDA_EVENT_TRACKING=1|--tiles 1 --vision-batch 1" \
        "scan16|VLM_SSD_SCAN_E=16|--batch 1 --tiles 13 --vision-batch 1"; do
      IFS='|' read -r vname venv vargs <<<"$variant"
      # shellcheck disable=SC2086  # vargs is a word list
      run_step "bench_$vname" "$t_bench" env "$venv" "$bin/bench_full" --device cuda \
        --bandwidth-tbs "$bandwidth" --json "$work/bench_$vname.json" $vargs --runs 5 --warmup 1
    done
  fi
fi

# ---- (d) transformers reference ----------------------------------------------------------
left=$((budget - SECONDS - 15))
want profile && left=$((left - 90))  # what the profile step needs after it
if ! want reference; then
  :
elif [ "$left" -ge "$t_ref_min" ]; then
  ref_args=(--device "$device" --json "$out/bench_ref.json" --time-budget $((left - 40)))
  [ "$dry_run" = 1 ] && ref_args+=(--pattern 'M*-' --vision-layers 1 --vocab 4096 --tiles 1,2
    --batch 1,2 --decode-steps 2 --decode-context 16 --vision-batch 1 --runs 1 --warmup 0)
  run_step reference "$left" env PYTHONUNBUFFERED=1 "$python" scripts/bench_reference_gpu.py "${ref_args[@]}"
else
  say "=== reference: skipped (${left}s of the budget left, needs ${t_ref_min}s)"
  printf 'reference\tskipped\t0\n' >>"$results"
fi

# ---- (e) profile ---------------------------------------------------------------------------
if want profile; then
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  mkdir -p "$work/ncu"
  for spec in decode:1 decode:16 prefill:1 vision:1; do
    phase=${spec%%:*} b=${spec##*:}
    name=$phase$([ "$b" != 1 ] && echo "$b")
    pargs=(--device "$device" --profile "$phase" --batch "$b")
    [ "$dry_run" = 1 ] && pargs+=(--pattern 'M*-' --vision-layers 1 --vocab 4096 --tiles 1
      --decode-context 16 --vision-batch 1) || pargs+=(--tiles 13 --vision-batch 13)
    run_step "host_$name" 60 "$bin/bench_full" "${pargs[@]}" --runs 7 --warmup 2
    if [ -n "$ncu" ] && [ "$b" = 1 ]; then
      run_step "ncu_$name" 100 "$ncu" --profile-from-start off --metrics gpu__time_duration.sum \
        --csv --page raw --clock-control none --cache-control none \
        --log-file "$work/ncu/$name.csv" "$bin/bench_full" "${pargs[@]}" --runs 1 --warmup 1
    fi
  done
  python3 - "$work" <<'PYEOF' | tee "$out/profile.txt" | tee -a "$log"
import csv, glob, os, re, sys
work = sys.argv[1]
for path in sorted(glob.glob(os.path.join(work, "ncu", "*.csv"))):
    name = os.path.basename(path)[:-4]
    host = open(os.path.join(work, f"host_{name}.out")).read() if os.path.exists(os.path.join(work, f"host_{name}.out")) else ""
    m = re.search(r"host issues it in ([\d.]+) ms, done after ([\d.]+) ms", host)
    rows = [l for l in open(path) if l.startswith('"')]
    if len(rows) < 2:
        print(f"{name}: no ncu rows"); continue
    table = list(csv.reader(rows))
    head = table[0]
    ki, ti = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
    by = {}
    for r in table[1:]:
        try:
            ns = float(r[ti].replace(",", ""))
        except ValueError:
            continue  # the units row
        k = re.sub(r"\(.*", "", r[ki])[:72]
        c, t = by.get(k, (0, 0.0))
        by[k] = (c + 1, t + ns)
    total = sum(t for _, t in by.values())
    count = sum(c for c, _ in by.values())
    print(f"\n== {name}: {count} kernels, {total / 1e6:.2f} ms of GPU time" + (
        f"; without the profiler the host issues it in {m.group(1)} ms and it is done after {m.group(2)} ms" if m else ""))
    print(f"| {'kernel':72} | calls | ms | share |")
    for k, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"| {k:72} | {c:5} | {t / 1e6:7.3f} | {100 * t / total:5.1f}% |")
PYEOF
  tar -C "$work" -cJf "$out/ncu.tar.xz" ncu 2>/dev/null
fi

# ---- summary -----------------------------------------------------------------------------
python3 - "$results" "$work" "$out" "$device" "$gpu_name" "$SECONDS" <<'EOF' | tee "$out/summary.txt" | tee -a "$log"
import json, os, re, sys
results, work, out, device, gpu, elapsed = sys.argv[1:]
dry = device == "cpu"

def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return {}

ours, ref = load("bench_full.json"), load("bench_ref.json")
def load_work(name):
    try:
        return json.load(open(os.path.join(work, name)))
    except (OSError, ValueError):
        return {}

def get(d, key, field):
    v = d.get(key, {})
    return v.get(field) if isinstance(v, dict) else None

def tail_of(name):
    try:
        text = open(os.path.join(work, name + ".out")).read()
    except OSError:
        return ""
    m = re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed", text)
    if m:
        return f"{sum(int(a) for a, _ in m)} passed, {sum(int(b) for _, b in m)} failed"
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1][:70] if lines else ""

def fmt(v, unit):
    return "-" if v is None else f"{v:.1f} {unit}"

rows, ok = [], True
for line in open(results):
    name, rc, secs = line.rstrip("\n").split("\t")
    if rc in ("skipped", "absent"):
        status = rc
    elif rc == "0":
        status = "PASS"
    else:
        status = "TIMEOUT" if rc in ("124", "137") else f"FAIL (rc {rc})"
        ok = False
    bench = {"bench_full": ours, "reference": ref}.get(name)
    if bench is None and name.startswith("bench_"):
        bench = load_work(name + ".json")
    if bench and get(bench, "decode_b1", "tok_s") is not None:
        key = "; ".join(f"{k} {fmt(get(bench, k, f), u)}" for k, f, u in
                        [("decode_b1", "tok_s", "tok/s"), ("decode_b16", "tok_s", "tok/s"),
                         ("ttft_1", "ms", "ms"), ("ttft_13", "ms", "ms")]
                        if get(bench, k, f) is not None)
    else:
        key = tail_of(name)  # test counts, or the last line (the error of a failed step)
    try:
        mib = [int(x) for x in open(os.path.join(work, name + ".mem")).read().split() if x.isdigit()]
        if mib:
            key += f" (GPU memory peak {max(mib) / 1024:.1f} GiB)"
    except OSError:
        pass
    rows.append((name, status, f"{secs} s", key))

def table(head, rows):
    w = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    for r in [head] + rows:
        print("| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |")

print()
print(f"== gpu-check summary: {device} ({gpu}), {elapsed} s ==")
table(("step", "result", "time", "key numbers"), rows)

# (label, bench key, field, unit, goal, higher is better)
targets = [
    ("decode batch 1", "decode_b1", "tok_s", "tok/s", 95, True),
    ("decode batch 16 (aggregate)", "decode_b16", "tok_s", "tok/s", 900, True),
    ("TTFT 1 tile", "ttft_1", "ms", "ms", 80, False),
    ("TTFT 13 tiles", "ttft_13", "ms", "ms", 400, False),
    ("vision (RADIO+projector)", "vision_projector", "tiles_s", "tiles/s", 60, True),
    ("vision (RADIO alone)", "vision", "tiles_s", "tiles/s", None, True),
]
trows = []
for label, key, field, unit, goal, higher in targets:
    o, r = get(ours, key, field), get(ref, key, field)
    if o is not None and r:
        ratio = f"{(o / r if higher else r / o):.2f}x"
    else:
        ratio = "-"
    if goal is None:
        goal_s, met = "-", "-"
    else:
        goal_s = f"{'>=' if higher else '<='} {goal} {unit}"
        if dry:
            met = "n/a (dry run)"
        else:
            met = "-" if o is None else ("yes" if (o >= goal if higher else o <= goal) else "NO")
    trows.append((label, goal_s, fmt(o, unit), fmt(r, unit), ratio, met))
floor = ours.get("floor", {}).get("b1_tok_s")
if floor:
    trows.append(("decode floor, batch 1", "-", fmt(floor, "tok/s"), "-", "-",
                  f"{ours['setup'].get('bandwidth_tbs')} TB/s"))
print()
table(("target", "goal", "ours", "transformers", "speedup", "met"), trows)
sys.exit(0 if ok else 1)
EOF
exit "${PIPESTATUS[0]}"
