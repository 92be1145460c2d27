"""What a certificate costs on the real SD 2.1-base architecture, as a ratio
against one diffusers fp32 pipeline run of the same request, in one run.

    python bench/bench_certify.py [--image 256] [--steps 10] [--threads 1]
                                  [--precisions f32_f16 f16 f16-gpu] [--bundles 3] [--no-fleet] [--cache DIR]

The model is bench_pipeline's random SD 2.1-base folder (diffusers' own
initialization, seed 0). Each declared precision gets an emulated device
bundle (``emulated_capture``, FTZ not declared: unknown, as most delegates
report it; ``f16-gpu``: fp16 under the ``litert-gpu`` device model, declared
on a gpu, so the calibration adds the device model's runs). Then, each in a fresh subprocess (so its peak RSS is its own):

- diffusers fp32, the whole pipeline of the same request (the unit);
- ``certify`` with a cold rerun cache, then the same bundle again (warm);
- for ``--bundles`` N > 1, N - 1 more devices of the same request and
  deployment (the same emulation with FTZ on; then devices with a +1 % UNet
  bias from step 1, which must be rejected) certified one by one after the
  first: each costs its own teacher-forced run only, the calibration runs
  come from the cache;
- ``certify-fleet`` of those N bundles on a Dask LocalCluster of 2 workers, or
  of 1 where two reruns do not fit in memory (``fleet.local_workers``), cold.

Prints a Markdown table; bench/README.md ("certification cost") records it.
"limit": the certificate's reruns times one pipeline's FLOPs (PyTorch's
FLOP counter on the diffusers run) at this machine's float32 GEMM peak, over
the unit: what the reruns would cost if every FLOP ran at the sgemm peak.
"resolution": the smallest gain error on the UNet output the certificate
rejects at every step (``Certificate.resolution``).
Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
if __name__ == "__main__":
    from blas_threads import set_blas_threads

    set_blas_threads(sys.argv[1:])

from bench_pipeline import ensure_folder  # noqa: E402

PROMPT = "a lighthouse at dusk, oil painting"


def _child(args) -> dict:
    """One timed job in this (fresh) process; returns seconds and peak RSS."""
    from refsd.pipeline import peak_rss_mb

    kind, rest = args._child[0], args._child[1:]
    t0 = time.perf_counter()
    extra = {}
    if kind == "diffusers":
        from bench_pipeline import run_diffusers

        run_diffusers(args.cache, args.steps, args.image, args.threads)
    elif kind == "flops":  # the same run under PyTorch's FLOP counter (not timed: the counter slows it)
        from torch.utils.flop_counter import FlopCounterMode

        from bench_pipeline import run_diffusers

        with FlopCounterMode(display=False) as counter:
            run_diffusers(args.cache, args.steps, args.image, args.threads)
        extra = {"flops": counter.get_total_flops()}
    elif kind == "certify":
        from refsd_validate.certify import certify

        cert = certify(rest[0], args.cache, cache_dir=rest[1], progress=True)
        extra = {"certified": cert.certified, "reruns": cert.provenance["rerun_cache"]["misses"],
                 "hits": cert.provenance["rerun_cache"]["hits"],
                 "worst_k": max(r.verdict.k_needed for r in cert.results),
                 "resolution": cert.resolution["gain_every_step"]}
    elif kind == "fleet":
        from refsd_validate.fleet import certify_fleet

        entries, counts = certify_fleet(rest[2:], args.cache, rest[0], cache_dir=rest[1], progress=True)
        extra = {"certified": all(e.certificate.certified for e in entries), **counts}
    return {"seconds": time.perf_counter() - t0, "peak_rss_gb": peak_rss_mb() / 1024, **extra}


def _run(args, *spec) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--cache", str(args.cache), "--image",
           str(args.image), "--steps", str(args.steps), "--_child", *map(str, spec)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def sgemm_peak(n: int = 2048, repeats: int = 5) -> float:
    """float32 GEMM FLOP/s of NumPy's BLAS here (the fastest of ``repeats``
    (n x n) @ (n x n) products)."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a
    best = min(_seconds(lambda: a @ a) for _ in range(repeats))
    return 2 * n**3 / best


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _biased_unet(pipe) -> None:
    """A faulty device: the UNet's output x 1.01 from step 1 on."""
    import numpy as np

    unet = pipe.components["unet"]
    forward, calls = unet.forward, []

    def biased(*a, **kw):
        calls.append(None)
        out = forward(*a, **kw)
        return out * np.float32(1.01) if len(calls) > 1 else out

    unet.forward = biased


def _bundle(folder: Path, out: Path, precision: str, args, *, ftz: bool = False, fault=None) -> Path:
    from refsd_validate.capture_emulated import emulated_capture

    from refsd.pipeline import Request

    req = Request(PROMPT, seed=0, steps=args.steps, guidance=7.5, scheduler="ddim", height=args.image,
                  width=args.image)
    gpu = precision == "f16-gpu"  # an fp16 GPU: LiteRT's GPU kernels as refsd models them, declared on a gpu
    return emulated_capture(folder, req, out, precision="f16" if gpu else precision, ftz=ftz, declare_ftz=None,
                            fault=fault, device_model="litert-gpu" if gpu else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", type=int, default=256, help="image size (default 256)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    p.add_argument("--threads", type=int, default=1, help="BLAS and PyTorch threads (default 1)")
    p.add_argument("--precisions", nargs="+", choices=("f32", "f32_f16", "f16", "f16-gpu"), default=["f32_f16", "f16"])
    p.add_argument("--bundles", type=int, default=3, help="devices of one request for the sharing rows (default 3)")
    p.add_argument("--no-fleet", action="store_true", help="skip the certify-fleet row (a second cold certificate)")
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "refsd" / "bench-sd21-base"
    p.add_argument("--cache", type=Path, default=default_cache, help=f"model folder (default {default_cache})")
    p.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(_child(args)))
        return 0

    folder = ensure_folder(args.cache)
    work = Path(tempfile.mkdtemp(prefix="refsd-bench-certify-"))
    rows = []
    try:
        print(f"diffusers fp32 pipeline, {args.image}x{args.image}, {args.steps} steps ...", flush=True)
        unit = _run(args, "diffusers")
        rows.append(("diffusers fp32 pipeline (the unit)", unit))
        for precision in args.precisions:
            print(f"bundles declared {precision} ...", flush=True)
            devices = [_bundle(folder, work / f"{precision}-0", precision, args)]
            if args.bundles > 1:
                devices.append(_bundle(folder, work / f"{precision}-1", precision, args, ftz=True))
            for i in range(2, args.bundles):
                devices.append(_bundle(folder, work / f"{precision}-{i}", precision, args, fault=_biased_unet))

            def row(name, *spec):
                rows.append((name, _run(args, *spec)))
                print(name, json.dumps(rows[-1][1]), flush=True)

            cache = work / f"cache-{precision}"
            row(f"certify {precision}, cold cache", "certify", devices[0], cache)
            row(f"certify {precision}, same bundle, warm cache", "certify", devices[0], cache)
            for i, d in enumerate(devices[1:], 1):
                row(f"certify {precision}, device {i + 1} of one request ({'FTZ' if i == 1 else '+1 % bias'}; "
                    "calibration cached)", "certify", d, cache)
            if len(devices) > 1 and not args.no_fleet:
                r = _run(args, "fleet", work / f"fleet-{precision}", work / f"fleet-cache-{precision}", *devices)
                # 2 workers asked; the local cluster starts fewer where two reruns do not fit in memory
                rows.append((f"certify-fleet {precision}, {len(devices)} bundles, {r['local_workers']} of 2 workers, "
                             "cold", r))
                print(rows[-1][0], json.dumps(r), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    flops = _run(args, "flops")["flops"]
    peak = sgemm_peak()
    limit = flops / peak  # one pipeline's products at the sgemm peak: a rerun cannot cost less
    base = unit["seconds"]
    print(f"\none pipeline: {flops / 1e12:.2f} TFLOP (PyTorch's counter); sgemm peak here {peak / 1e9:.0f} GFLOP/s "
          f"at {args.threads} thread(s): {limit:.1f} s per pipeline run, {limit / base:.2f} of diffusers' time")
    print(f"\nCertification cost, SD 2.1-base architecture, {args.image}x{args.image}, {args.steps} DDIM steps, "
          f"{args.threads} thread(s), FTZ not declared\n")
    print("| run | seconds | / diffusers pipeline | reruns (cache hits) | limit: reruns x FLOPs at peak | peak RSS GB | "
          "verdict, worst k | resolution |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for name, r in rows:
        reruns = f"{r['reruns']} ({r['hits']})" if "reruns" in r else (
            f"{r['reruns_run']} of {r['reruns_needed']}" if "reruns_run" in r else "")
        verdict = "" if "certified" not in r else ("certified" if r["certified"] else "NOT certified") + (
            f", {r['worst_k']:.2f}" if "worst_k" in r else "")
        res = f"{r['resolution']:.2%}" if "resolution" in r else ""
        runs = r.get("reruns", r.get("reruns_run"))
        bound = "" if runs is None else f"{runs * limit / base:.2f}"
        print(f"| {name} | {r['seconds']:.1f} | {r['seconds'] / base:.2f} | {reruns} | {bound} | "
              f"{r['peak_rss_gb']:.2f} | {verdict} | {res} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
