"""Bit-identity check for speed work on the fp16 emulation: one SD 2.1-base UNet
forward per precision / rewrite case, its output bytes and the monitor's full
report (events in order with counts, per-op call counts and max |y|) saved, or
compared against a saved run.

    python bench/f16_identity.py save  DIR --folder SD21_FOLDER [--size 16] [--cases ...]
    python bench/f16_identity.py check DIR --folder SD21_FOLDER [--size 16] [--cases ...]

``SD21_FOLDER``: a diffusers folder with ``unet/`` (``bench/bench_pipeline.py``
makes one). ``check`` exits non-zero on any difference. Not run in CI.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

CASES = {  # name -> (precision mode, ftz, rewrites)
    "f16": ("f16", False, "none"),
    "f16-google": ("f16", False, "google"),
    "f16-ftz": ("f16", True, "none"),
    "f32_f16": ("f32_f16", False, "none"),
    "f32_f16-google": ("f32_f16", False, "google"),
}


def run_case(folder: Path, size: int, case: str) -> dict:
    from refsd import weights
    from refsd.monitor import monitoring
    from refsd.numerics import Precision

    mode, ftz, rewrites = CASES[case]
    model = weights.load_unet(folder / "unet", precision=Precision(mode, ftz), rewrites=rewrites)
    rng = np.random.default_rng(0)
    ctx = rng.standard_normal((2, 77, 1024)).astype(np.float32)
    lat = rng.standard_normal((2, size, size, 4)).astype(np.float32)
    t0 = time.perf_counter()
    y = model(lat, 981, ctx)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    with monitoring() as mon:
        ym = model(lat, 981, ctx)
    t_mon = time.perf_counter() - t0
    rep = mon.report()
    events = [(e.seq, e.kind, e.path, e.op, e.primitive, e.stage, e.step, e.count, e.detail, e.severe)
              for e in rep.events]
    stats = sorted((k, s.calls, np.float64(s.max_abs).tobytes(), s.worst_step, sorted(s.counts.items()))
                   for k, s in mon.stats.items())
    return {"y": np.asarray(y, np.float32), "ym": np.asarray(ym, np.float32), "events": events, "stats": stats,
            "dropped": rep.dropped_events, "t_plain": t_plain, "t_mon": t_mon}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("action", choices=("save", "check"))
    p.add_argument("dir", type=Path)
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    bad = 0
    for case in args.cases:
        res = run_case(args.folder, args.size, case)
        path = args.dir / f"{case}-{args.size}.pkl"
        line = f"{case} @{args.size}: plain {res['t_plain']:.1f} s, monitored {res['t_mon']:.1f} s, " \
               f"{len(res['events'])} event rows, {sum(e[7] for e in res['events'])} counted"
        if args.action == "save":
            path.write_bytes(pickle.dumps(res))
            print(line, "-> saved", flush=True)
            continue
        ref = pickle.loads(path.read_bytes())
        diffs = [k for k in ("y", "ym") if not np.array_equal(ref[k].view(np.uint32), res[k].view(np.uint32))]
        diffs += [k for k in ("events", "stats", "dropped") if ref[k] != res[k]]
        bad += bool(diffs)
        print(line, f"(saved run: plain {ref['t_plain']:.1f} s, monitored {ref['t_mon']:.1f} s)",
              "IDENTICAL" if not diffs else f"DIFFERENT: {diffs}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
