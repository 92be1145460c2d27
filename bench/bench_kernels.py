"""Compiled kernels against their NumPy definitions, side by side in one run.

    python bench/bench_kernels.py [--threads 2] [--repeats 5]

- fp16 rounding (``round_f16``, with and without the monitor's statistics):
  nanoseconds per element of 50M float32 against a memcpy of the same array;
- the blocked f16 matmul (``ops._core.matmul`` under ``precision("f16")``,
  block 32) and the ``litert-gpu`` device model's sequential fp16 sum
  (block 1) on SD 2.1 UNet shapes at 32x32 latents, against the float32 GEMM of
  the same operands.

Both backends give the same bits (tests/test_kernels.py); this measures only
time, the best of ``--repeats``. Prints a Markdown table; bench/README.md
records the figures. Not run in CI.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from blas_threads import set_blas_threads

    set_blas_threads(sys.argv[1:])

import numpy as np  # noqa: E402

# (M, K, N): a 3x3 conv's im2col GEMM at 32x32 latents (batch 2), attention's projection, a
# down block's conv at 16x16.
SHAPES = [(2048, 2880, 320), (2048, 320, 320), (512, 5760, 640)]


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="BLAS and kernel threads (default 2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seq-rows", type=int, default=256, help="rows of the block-1 matmul rows (it is slow)")
    args = p.parse_args(argv)

    from refsd import kernels
    from refsd.numerics import precision, round_f16, round_f16_stats
    from refsd.ops import _core

    rng = np.random.default_rng(0)
    rows = []
    x = rng.standard_normal(50_000_000).astype(np.float32)
    out = np.empty_like(x)
    t_copy = best(lambda: np.copyto(out, x), args.repeats)
    rows.append(("memcpy, 50M float32", t_copy, None, "1.00 (memcpy)"))
    for name, fn in (("round_f16", lambda: round_f16(x)), ("round_f16_stats", lambda: round_f16_stats(x))):
        t = {}
        for b in ("numpy", "numba"):
            with kernels.using(b):
                t[b] = best(fn, args.repeats)
        rows.append((f"{name}, 50M", t["numpy"], t["numba"], f"{t['numba'] / t_copy:.2f} (memcpy)"))
    for m, k, n in SHAPES:
        a = round_f16(rng.standard_normal((m, k)).astype(np.float32) * 0.1)
        w = round_f16(rng.standard_normal((k, n)).astype(np.float32) * 0.05)
        t32 = best(lambda: a @ w, args.repeats)
        t = {}
        for b in ("numpy", "numba"):
            with kernels.using(b), precision("f16"):
                t[b] = best(lambda: _core.matmul(a, w), args.repeats)
        rows.append((f"f16 blocked matmul ({m}x{k})@({k}x{n})", t["numpy"], t["numba"],
                     f"{t['numba'] / t32:.2f} (f32 GEMM); definition {t['numpy'] / t32:.2f}"))
        ms = min(m, args.seq_rows)  # the block-1 definition is one GEMM per k: rows cut to keep it finishing
        a1 = a[:ms]
        t32s = best(lambda: a1 @ w, args.repeats)
        t = {}
        for b in ("numpy", "numba"):
            with kernels.using(b), precision("f16", device_model="litert-gpu"):
                t[b] = best(lambda: _core.matmul(a1, w), 1 if b == "numpy" else args.repeats)
        rows.append((f"litert-gpu sequential matmul ({ms}x{k})@({k}x{n})", t["numpy"], t["numba"],
                     f"{t['numba'] / t32s:.2f} (f32 GEMM); definition {t['numpy'] / t32s:.2f}"))
    print(f"\n{args.threads} thread(s)\n")
    print("| what | NumPy definition s | compiled s | definition / compiled | compiled / peer |")
    print("|---|---:|---:|---:|---|")
    for what, tn, tc, peer in rows:
        ratio = "" if tc is None else f"{tn / tc:.1f}"
        print(f"| {what} | {tn:.4f} | {'' if tc is None else f'{tc:.4f}'} | {ratio} | {peer} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
