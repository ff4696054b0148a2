"""torch's nn.Linear on the shapes of server/examples/bench_matmul.rs (a measurement):
median time and GFLOP/s, BF16 weights and inputs (--dtype bfloat16) or f32.

python scripts/bench_matmul_reference.py --dtype bfloat16
"""
import argparse
import os
import time

import torch

SHAPES = [
    (512, 768, 3608), (512, 1536, 768), (512, 768, 3072), (512, 3072, 768), (512, 768, 768),
    (1032, 768, 2304), (1032, 768, 768), (1032, 768, 3072), (1032, 3072, 768),
    (1, 768, 3608), (16, 768, 3072),
]
RUNS = 31


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {args.dtype}, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        for m, k, n in SHAPES:
            layer = torch.nn.Linear(k, n, bias=False).to(dtype)
            x = torch.randn(m, k).to(dtype)
            times = []
            for _ in range(RUNS):
                start = time.perf_counter()
                layer(x)
                times.append(time.perf_counter() - start)
            median = sorted(times)[RUNS // 2]
            print(f"{m}x{k}x{n}: {median * 1e3:.3f} ms, {2 * m * k * n / median / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
