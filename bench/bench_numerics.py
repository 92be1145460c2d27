"""Numerics benchmarks: fp16 rounding and exception-monitor overhead.

    python bench/bench_numerics.py [--quick] [--runs N] [--threads] [--spatial S] [--tokens L]

(a) fp16 rounding of 4M float32 elements, three ways:
    refsd.numerics.round_f16 (bit manipulation on uint32 views),
    x.astype(np.float16).astype(np.float32) (NumPy's conversion loops), and
    np.copyto into preallocated float16 / float32 buffers (no allocation);
    on N(0, 1) * 1000 (values overflow fp16 and land in every binade) and plain N(0, 1).
(b) monitor overhead: a UNet-like op sequence (group_norm, silu, conv2d 3x3 on
    (2, S, S, 320); three linear projections, 8-head attention over L = 1024
    tokens and an output linear) in f32 and f32_f16, with and without
    ``monitoring()``; plain and monitored runs interleaved, median of N runs
    (default 5) after a warm-up, in wall time and in user CPU time.

Prints Markdown tables; the numbers in bench/README.md come from this script.
Not run in CI. About a minute on a 2-core VM.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

if __name__ == "__main__" and "--threads" not in sys.argv:
    # One BLAS thread by default: on a shared 2-core VM a second thread mostly
    # measures the neighbours. Must be set before NumPy loads its BLAS.
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from refsd import ops  # noqa: E402
from refsd.context import scope  # noqa: E402
from refsd.monitor import monitoring  # noqa: E402
from refsd.numerics import precision, round_f16  # noqa: E402


def _user_cpu() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def _median_ms(fn, runs: int) -> tuple[float, float]:
    """Median wall ms and median user-CPU ms over ``runs`` calls after a warm-up."""
    fn()  # warm-up (page faults, caches)
    wall, cpu = [], []
    for _ in range(runs):
        w0, c0 = time.perf_counter(), _user_cpu()
        fn()
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((_user_cpu() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def bench_rounding(n: int, runs: int) -> list[tuple[str, str, float, float]]:
    rng = np.random.default_rng(0)
    inputs = {
        "N(0,1)*1000": (rng.standard_normal(n) * 1000).astype(np.float32),
        "N(0,1)": rng.standard_normal(n).astype(np.float32),
    }
    h16 = np.empty(n, np.float16)
    o32 = np.empty(n, np.float32)

    def copyto(x):
        np.copyto(h16, x, casting="same_kind")
        np.copyto(o32, h16)
        return o32

    rows = []
    with np.errstate(over="ignore"):
        for label, x in inputs.items():
            ref = x.astype(np.float16).astype(np.float32)
            assert np.array_equal(round_f16(x).view(np.uint32), ref.view(np.uint32)), "round_f16 is not bit-exact"
            for name, fn in (
                ("round_f16", lambda: round_f16(x)),
                ("astype f16->f32", lambda: x.astype(np.float16).astype(np.float32)),
                ("np.copyto prealloc", lambda: copyto(x)),
            ):
                rows.append((label, name, *_median_ms(fn, runs)))
    return rows


def _unet_like(spatial: int, tokens: int):
    """A closure running one representative op sequence on fixed inputs."""
    rng = np.random.default_rng(1)
    c = 320
    x = rng.standard_normal((2, spatial, spatial, c)).astype(np.float32)
    w = (rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c)).astype(np.float32)
    b = np.zeros(c, np.float32)
    gamma, beta = np.ones(c, np.float32), np.zeros(c, np.float32)
    hs = rng.standard_normal((2, tokens, c)).astype(np.float32)
    wq, wk, wv, wo = ((rng.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32) for _ in range(4))

    def run():
        with scope("unet.down_blocks.0"):
            with scope("resnets.0"):
                with scope("norm1"):
                    h = ops.group_norm(x, gamma, beta, num_groups=32, eps=1e-5)
                h = ops.silu(h)
                with scope("conv1"):
                    h = ops.conv2d(h, w, b, padding=1)
            with scope("attentions.0.transformer_blocks.0.attn1"):
                with scope("to_q"):
                    q = ops.linear(hs, wq)
                with scope("to_k"):
                    k = ops.linear(hs, wk)
                with scope("to_v"):
                    v = ops.linear(hs, wv)
                a = ops.attention(q, k, v, heads=8)
                with scope("to_out.0"):
                    y = ops.linear(a, wo, b)
        return h, y

    return run


def bench_monitor(spatial: int, tokens: int, runs: int) -> list[tuple]:
    """Per mode: wall ms plain, monitored, overhead %; then the same in user CPU time.

    User CPU time is the steadier measure here: on this VM the run-to-run
    spread is almost all *system* time (first-touch page faults of the large
    attention tensors cost 0.1 s or 1 s depending on the host), identical in
    fault count for both variants."""
    run = _unet_like(spatial, tokens)
    rows = []
    for mode in ("f32", "f32_f16"):
        def plain(mode=mode):
            with precision(mode):
                run()

        def monitored(mode=mode):
            with monitoring(), precision(mode):
                run()

        wall = {plain: [], monitored: []}
        cpu = {plain: [], monitored: []}
        plain(), monitored()  # warm-up
        for _ in range(runs):  # interleaved, so drift on a shared machine hits both alike
            for fn in (plain, monitored):
                w0, c0 = time.perf_counter(), _user_cpu()
                fn()
                wall[fn].append((time.perf_counter() - w0) * 1e3)
                cpu[fn].append((_user_cpu() - c0) * 1e3)
        wp, wm = statistics.median(wall[plain]), statistics.median(wall[monitored])
        cp, cm = statistics.median(cpu[plain]), statistics.median(cpu[monitored])
        rows.append((mode, wp, wm, 100.0 * (wm - wp) / wp, cp, cm, 100.0 * (cm - cp) / cp))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="fp16 rounding and exception-monitor overhead benchmarks")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median reported)")
    ap.add_argument("--threads", action="store_true",
                    help="keep the BLAS default thread count (default: 1 thread, steadier on a shared VM)")
    ap.add_argument("--spatial", type=int, default=64, help="group_norm / conv input is (2, S, S, 320)")
    ap.add_argument("--tokens", type=int, default=1024, help="attention sequence length")
    args = ap.parse_args()
    n = 1 << 16 if args.quick else 4 * 1024 * 1024
    spatial, tokens = (8, 64) if args.quick else (args.spatial, args.tokens)

    print(f"BLAS threads: {os.environ.get('OPENBLAS_NUM_THREADS', 'library default')}\n")
    print(f"## fp16 rounding, {n / 2**20:g}M float32 elements, median of {args.runs} runs\n")
    print("| input | method | wall ms | speed vs astype (wall) | user-CPU ms | speed vs astype (user CPU) |")
    print("|---|---|---:|---:|---:|---:|")
    rows = bench_rounding(n, args.runs)
    base = {label: (w, c) for label, name, w, c in rows if name.startswith("astype")}
    for label, name, w, c in rows:
        bw, bc = base[label]
        print(f"| {label} | {name} | {w:.1f} | **{bw / w:.2f}x** | {c:.1f} | **{bc / c:.2f}x** |")

    print(f"\n## monitor overhead: group_norm + silu + conv2d 3x3 on (2, {spatial}, {spatial}, 320); "
          f"3 linear + attention (8 heads) + linear on (2, {tokens}, 320); median of {args.runs} interleaved runs\n")
    print("| mode | plain ms | monitored ms | overhead (wall) | plain user-CPU ms | monitored user-CPU ms "
          "| overhead (user CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, wp, wm, wpct, cp, cm, cpct in bench_monitor(spatial, tokens, args.runs):
        print(f"| {mode} | {wp:.1f} | {wm:.1f} | **{wpct:+.1f}%** | {cp:.1f} | {cm:.1f} | **{cpct:+.1f}%** |")


if __name__ == "__main__":
    main()
