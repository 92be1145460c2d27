"""fp16 diffusers captures from each of PyTorch's CPU kernel paths, certified
(issue 28: the README's advice on declaring PyTorch fp16 must hold on every CPU).

    python bench/cpu_paths.py --out /tmp/cpu-paths [--arch sd21] [--seed 0] [--declared f32_f16]

For each ``ATEN_CPU_CAPABILITY`` (default, avx2, avx512; those this CPU runs:
PyTorch falls back to the best it has), ``examples/diffusers_capture.py``
captures the fp16 run in a fresh process with that setting, and the bundle is
certified as declared. Printed per path: the kernel path PyTorch reports, the
verdict, the worst k, and how far its boundary tensors are from the first
path's (elements that differ; the largest difference in fp16 unit roundoffs
of the tensor's peak, the least an f32_f16 peak floor allows), so a table
shows that the paths compute differently and still certify.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("default", "avx2", "avx512")
REQUEST = dict(prompt="a photo of an astronaut riding a horse on mars", negative_prompt="blurry", seed=3, steps=4,
               guidance=7.5, height=64, width=64)
CAPTURE = """
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("ex", sys.argv[1])
ex = importlib.util.module_from_spec(spec); spec.loader.exec_module(ex)
ex.capture(sys.argv[2], sys.argv[3], dtype="fp16", declare=sys.argv[4], **json.loads(sys.argv[5]))
print(torch.backends.cpu.get_cpu_capability())
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="sd21")
    ap.add_argument("--seed", type=int, default=0, help="make_tiny seed")
    ap.add_argument("--declared", default="f32_f16")
    a = ap.parse_args()

    from refsd_validate.certify import certify  # noqa: PLC0415
    from refsd_validate.reader import read_bundle  # noqa: PLC0415

    from refsd.tiny import make_tiny  # noqa: PLC0415
    from refsd.trace import boundary_names  # noqa: PLC0415

    model = a.out / f"{a.arch}-{a.seed}"
    if not (model / "model_index.json").exists():
        make_tiny(model, a.arch, seed=a.seed)
    rows, first = [], None
    for path in PATHS:
        bundle = a.out / f"bundle-{path}-{a.declared}"
        env = {**os.environ, "ATEN_CPU_CAPABILITY": path}
        proc = subprocess.run([sys.executable, "-c", CAPTURE, str(ROOT / "examples" / "diffusers_capture.py"),
                               str(model), str(bundle), a.declared, json.dumps(REQUEST)],
                              capture_output=True, text=True, env=env, check=True)
        ran = proc.stdout.strip().splitlines()[-1]
        tensors = read_bundle(bundle).tensors
        first = first or tensors
        names = boundary_names(REQUEST["steps"])
        differ = sum(int(np.count_nonzero(tensors[n] != first[n])) for n in names)
        # in fp16 unit roundoffs of the tensor's peak (the least an f32_f16 peak floor allows)
        units = max(float(np.abs(tensors[n] - first[n]).max() / (2.0**-11 * np.abs(first[n]).max())) for n in names)
        cert = certify(bundle, model, cache_dir=a.out / "cache").to_dict()
        worst = max(t["k_needed"] if isinstance(t["k_needed"], float) else float("inf") for t in cert["tensors"])
        rows.append(f"| {path} | {ran} | {a.declared} | {cert['verdict']} | {worst:.2f} | {differ} | {units:.2f} |")
        print(rows[-1], flush=True)
    table = ["| ATEN_CPU_CAPABILITY | PyTorch ran | declared | verdict | worst k | boundary elements differing from "
             "the first path | largest difference (fp16 unit roundoffs of the tensor's peak) |",
             "|---|---|---|---|---|---|---|", *rows]
    (a.out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
