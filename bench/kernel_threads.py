"""Do compiled kernels and OpenBLAS get in each other's way? One f16 UNet-shaped
matmul (BLAS partial products alternating with the compiled running sum) and
the litert-gpu sequential matmul, timed at each (BLAS threads, kernel threads)
pair, each pair in a fresh process (both libraries read their thread counts at
load).

    python bench/kernel_threads.py [--repeats 5]

Prints a Markdown table of the best of ``--repeats``; bench/README.md records
the figures. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, time, numpy as np
from refsd import kernels
from refsd.numerics import precision, round_f16
from refsd.ops import _core
kernels.compiled()
rng = np.random.default_rng(0)
a = round_f16(rng.standard_normal((2048, 2880)).astype(np.float32) * 0.1)
w = round_f16(rng.standard_normal((2880, 320)).astype(np.float32) * 0.05)
def best(fn, r):
    fn(); ts = []
    for _ in range(r):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return min(ts)
r = int(REPEATS)
out = {"gemm": best(lambda: a @ w, r)}
with precision("f16"):
    out["f16"] = best(lambda: _core.matmul(a, w), r)
with precision("f16", device_model="litert-gpu"):
    out["gpu"] = best(lambda: _core.matmul(a[:256], w), r)
x = rng.standard_normal(20_000_000).astype(np.float32)
out["round"] = best(lambda: round_f16(x), r)
print(json.dumps(out))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    rows = []
    for blas, kern in ((1, 1), (2, 1), (1, 2), (2, 2)):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": str(blas), "OMP_NUM_THREADS": str(blas),
               "NUMBA_NUM_THREADS": str(kern)}
        res = subprocess.run([sys.executable, "-c", CHILD.replace("REPEATS", str(args.repeats))], env=env,
                             check=True, capture_output=True, text=True)
        rows.append((blas, kern, json.loads(res.stdout.strip().splitlines()[-1])))
        print(f"BLAS {blas}, kernels {kern}: {rows[-1][2]}", flush=True)
    print("\n| BLAS threads | kernel threads | f32 GEMM s | f16 blocked matmul s | / GEMM | litert-gpu matmul "
          "(256 rows) s | round_f16 20M s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for blas, kern, r in rows:
        print(f"| {blas} | {kern} | {r['gemm']:.4f} | {r['f16']:.4f} | {r['f16'] / r['gemm']:.2f} | {r['gpu']:.4f} | "
              f"{r['round']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
