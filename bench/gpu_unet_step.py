"""Step 0 of the tiny UNets on LiteRT's GPU in fp16, beside refsd's predictions.

    PYTHONPATH=$PWD .venv/bin/python bench/gpu_unet_step.py [--arch sd21,sd15] [--out DIR]

For each tiny seeded model (``refsd make-tiny``, seed 0): the UNet exported at
64x64 with the paper's rewrites (fp32 weights) runs once on the GPU in fp16
(``enforce_f32=False``) on the inputs of step 0 of a refsd float32 run (DDIM, 20
steps, the same prompt): latents, timestep, text-encoder states. refsd's UNet
runs on the same inputs in ``f32``, ``f32_f16``, ``f16`` and ``f16`` with
``device_model="litert-gpu"`` under the exception monitor. Printed per arch:
the relative error of each against refsd ``f32`` (``max|y - y32| / max|y32|``,
the GPU's included), each one's distance to the GPU's output (same scale) and
CPU seconds (monitor on, module outputs recorded), the severe events each predicts (the old ``f16`` model predicts a GroupNorm overflow
that the GPU does not show) and the ``precision`` events.

Three processes (tensorflow and ai_edge_litert cannot share one); reuses
``gpu_probes.gpu_run``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

PROMPT = "a lighthouse at dusk"
SIZE = 64
REWRITES = "paper"
MODES = {
    "f32_f16": {"mode": "f32_f16"},
    "f16": {"mode": "f16"},
    "f16 litert-gpu": {"mode": "f16", "device_model": "litert-gpu"},
}


class _Stop(Exception):
    pass


def prepare(work: Path, arch: str) -> None:
    """The tiny model and step 0's UNet inputs from a refsd f32 run."""
    from refsd.pipeline import Pipeline, Request
    from refsd.schedulers import make_scheduler
    from refsd.tiny import make_tiny

    model = make_tiny(work / "model", arch, seed=0)
    pipe = Pipeline(model, precision="f32", rewrites=REWRITES)
    req = Request(PROMPT, seed=0, steps=20, scheduler="ddim", height=SIZE, width=SIZE)
    got = {}

    def stop(i, trace):
        got.update(trace)
        raise _Stop

    try:
        pipe(req, progress=False, on_step=stop)
    except _Stop:
        pass
    t0 = make_scheduler("ddim", pipe.scheduler_config).set_timesteps(20)[0]
    x = got["scheduler/latents_init"]
    np.savez(work / "inputs.npz", sample=np.concatenate([x, x]), timestep=np.float32([t0]),
             encoder_hidden_states=got["text_encoder/hidden_states"])


def export(work: Path) -> None:
    from refsd.export.build import export as build

    build(work / "model", work / "tflite", weights="fp32", rewrites=REWRITES, height=SIZE, width=SIZE,
          components=("unet",), progress=False)


def run(work: Path) -> None:
    """The UNet on the GPU, once as exported and once with every module's
    output tensor appended to its outputs (the final output must not change)."""
    from gpu_probes import gpu_run, with_outputs

    with np.load(work / "inputs.npz") as z:
        inputs = {k: z[k] for k in z.files}
    y, full = gpu_run(work / "tflite" / "unet.tflite", inputs)
    np.save(work / "gpu.npy", y)
    (work / "accel").write_text("full" if full else "partial")
    tensors = json.loads((work / "tflite" / "refsd_export.json").read_text())["components"]["unet"]["tensors"]
    paths = [p for p, t in tensors.items() if t["tensor"] != "Identity"]
    data = with_outputs((work / "tflite" / "unet.tflite").read_bytes(), [tensors[p]["tensor"] for p in paths])
    (work / "unet_x.tflite").write_bytes(data)
    ys, _ = gpu_run(work / "unet_x.tflite", inputs, outputs=len(paths) + 1)
    if not np.array_equal(ys[0], y, equal_nan=True):
        print("warning: exposing intermediates changed the UNet's output", file=sys.stderr)
    np.savez(work / "gpu_modules.npz", **{p: a for p, a in zip(paths, ys[1:])})


def compare(work: Path) -> dict:
    from refsd.context import location, recording
    from refsd.models.options import ModelOptions
    from refsd.monitor import monitoring
    from refsd.numerics import Precision
    from refsd.weights import load_unet

    with np.load(work / "inputs.npz") as z:
        x, t, ctx = z["sample"], z["timestep"], z["encoder_hidden_states"]
    gpu = np.load(work / "gpu.npy")

    # The rewrites as exported: "paper" includes int8_weights, which a --weights fp32 export does not apply.
    rewrites = json.loads((work / "tflite" / "refsd_export.json").read_text())["rewrites"]

    def unet(p: Precision, modules: dict | None = None):
        model = load_unet(work / "model" / "unet", options=ModelOptions.make(precision=p, rewrites=rewrites))
        with monitoring() as mon, location("unet", 0), recording(modules):
            y = np.array(model(x, t[0], ctx))
        return y, mon.report()

    y32, _ = unet(Precision("f32"))
    y32 = y32.reshape(gpu.shape)
    scale = float(np.abs(y32).max())

    def err(y):
        y = y.reshape(gpu.shape)
        both = np.isfinite(y)
        return float(np.abs(y[both] - y32[both]).max(initial=0.0)) / scale, int((~both).sum())

    row = {"accel": (work / "accel").read_text(), "gpu": dict(zip(("rel_err", "nonfinite"), err(gpu)))}
    for name, kw in MODES.items():
        modules = {}
        t0 = time.process_time()
        y, rep = unet(Precision(**kw), modules)
        cpu_s = time.process_time() - t0
        if kw.get("device_model"):
            row["modules_vs_gpu"] = _module_divergence(work, modules)
        y = y.reshape(gpu.shape)
        e, nf = err(y)
        severe = [f"{ev.kind} {ev.where()} {ev.op}.{ev.primitive}" for ev in rep.events if ev.severe]
        hazards = [f"{ev.where()} {ev.op}.{ev.primitive}: {ev.detail}" for ev in rep.events if ev.kind == "precision"]
        to_gpu = float(np.abs(np.nan_to_num(y) - gpu).max()) / scale
        same = float(((y.view(np.uint32) == gpu.view(np.uint32)) | (np.isnan(y) & np.isnan(gpu))).mean())
        row[name] = {"rel_err": e, "nonfinite": nf, "to_gpu": to_gpu, "bit_identical": same, "cpu_s": cpu_s,
                     "severe": severe[:3], "n_severe": len(severe), "precision_events": hazards[:2]}
    return row


def _module_divergence(work: Path, modules: dict) -> list[tuple[str, float, float]]:
    """(module, max|ref - gpu| / max|gpu|, fraction bit-identical) per module
    output the GPU exposes, in refsd's execution order."""
    out = []
    with np.load(work / "gpu_modules.npz") as z:
        for key, ref in modules.items():
            path = key.split("/", 2)[-1]
            if path not in z.files:
                continue
            g = z[path]
            ref = np.asarray(ref, np.float32)
            if ref.shape[0] != g.shape[0]:  # the time embedding: refsd per batch item, the export once
                ref = ref[: g.shape[0]]
            ref = ref.reshape(g.shape)
            scale = float(np.abs(g).max()) or 1.0
            same = float((ref.view(np.uint32) == g.view(np.uint32)).mean())
            out.append((path, float(np.abs(ref - g).max()) / scale, same))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stages = {"prepare": lambda w, a: prepare(w, a), "export": lambda w, a: export(w), "run": lambda w, a: run(w)}
    if argv and argv[0] in stages:
        stages[argv[0]](Path(argv[1]), argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sd21,sd15")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="refsd_unet_step_"))
    rows = {}
    for arch in args.arch.split(","):
        work = out / arch
        work.mkdir(parents=True, exist_ok=True)
        for stage in stages:  # each in its own process
            subprocess.run([sys.executable, __file__, stage, str(work), arch], check=True,
                           stderr=None if stage == "prepare" else subprocess.DEVNULL)
        rows[arch] = compare(work)
        modules = rows[arch].pop("modules_vs_gpu")
        print(arch, json.dumps(rows[arch], indent=1))
        print("module outputs, device model vs GPU (relative max difference, bit-identical):")
        for path, d, same in modules:
            print(f"  {path:70s} {d:.2e} {same:7.1%}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
