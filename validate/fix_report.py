"""``refsd fp16-fix --verify-gpu``: the recipe's fixed model exported with fp16
weights, captured through LiteRT's GPU accelerator in fp16, certified, and one
offline HTML page (``fp16_fix.html``) with the images before and after, the
events the fixes remove and the certificate."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from refsd.export.build import GRAPH_REWRITES
from refsd.image import encode_png, psnr, to_image
from refsd.models.rewrites import Rewrites
from refsd.pipeline import Request
from refsd.trace import IMAGE
from refsd_validate.gpu_certify import GpuRun, capture_and_certify, export_and_capture
from refsd_validate.reader import read_bundle

# Equivalence rewrites the GPU accelerator needs to run every component (README, "GPU capture":
# without them the text encoder's GATHER and the rank-5 GroupNorms fall back to the CPU).
GPU_GRAPH = ("gn4d", "embedding_1d")


def gpu_rewrites(recipe: dict, *, fixed: bool = True) -> Rewrites:
    """The recipe's rewrite string (``fixed``) or its deployment's as declared, as a GPU export
    takes it: its graph rewrites, ``GPU_GRAPH`` added, ``gn_fused`` fixes dropped (a kernel;
    ``refsd.export.build.graph_rewrites``)."""
    rw = Rewrites.parse(recipe["rewrites"] if fixed else recipe["deployment"]["rewrites"])
    names = [n for n in rw if n in GRAPH_REWRITES] + [n for n in GPU_GRAPH if n not in rw]
    return Rewrites.parse(names, fixes=tuple(f for f in rw.fixes if f.kind != "gn_fused"),
                          serial_conv_limit=rw.serial_conv_limit, prune_amount=rw.prune_amount,
                          prune_min_weights=rw.prune_min_weights)


def verify_on_gpu(model: Path, out: Path, recipe: dict, images: dict[str, np.ndarray]) -> GpuRun:
    """The deployment as declared captured on the GPU (its image: the break on real kernels),
    then the fixed model exported, captured and certified (``capture_and_certify``; an fp32 fix
    is refused by the export: one .tflite has no per-op precision), then ``out``/fp16_fix.html.
    ``images``: the emulation's ``reference``, ``before`` and ``after`` images."""
    req = Request(**recipe["request"])
    gelu = recipe["deployment"]["gelu_approximate"]
    declared = gpu_rewrites(recipe, fixed=False)
    ok, _ = export_and_capture(model, out / "tflite_declared_gpu", out / "capture_declared_gpu", req,
                               rewrites=str(declared), gelu_approximate=gelu, intermediates=False)
    gpu_before = to_image(read_bundle(out / "capture_declared_gpu").tensors[IMAGE][0]) if ok else None
    run = capture_and_certify(model, out, req, rewrites=str(gpu_rewrites(recipe)), gelu_approximate=gelu,
                              cache_dir=out / "cache",
                              names=("tflite_fixed_gpu", "capture_fixed_gpu", "certificate_fixed_gpu"))
    (out / "fp16_fix.html").write_text(render(recipe, {**images, "gpu_before": gpu_before}, run), encoding="utf-8")
    return run


def _png(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")


def _finite_db(v: float) -> float | str | None:
    return None if math.isnan(v) else ("inf" if math.isinf(v) else v)


def _db(v) -> str:
    return "n/a (non-finite image)" if v is None else (v if isinstance(v, str) else f"{v:.1f} dB")


def render(recipe: dict, images: dict[str, np.ndarray], run: GpuRun) -> str:
    e = html.escape
    ref = images["reference"]
    shown = [("f32 reference", ref, None),
             ("before: the deployment as declared (emulation)", images["before"], recipe["before"]["psnr_db"]),
             ("after: with the recipe (emulation)", images["after"], (recipe["after"] or {}).get("psnr_db"))]
    if images.get("gpu_before") is not None:
        shown.append(("before: as declared on LiteRT's GPU, fp16", images["gpu_before"],
                      _finite_db(psnr(ref, images["gpu_before"]))))
    cert = run.certificate
    if cert is not None and "device" in cert.images:
        gpu = to_image(cert.images["device"])
        shown.append(("after: with the recipe on LiteRT's GPU, fp16", gpu, _finite_db(psnr(ref, gpu))))
    figs = "".join(f'<figure><img src="{_png(img)}" width="{4 * img.shape[1]}" style="image-rendering:pixelated">'
                   f"<figcaption>{e(title)}" + ("" if db is None and title.startswith("f32") else
                                                f"<br>PSNR vs f32: {e(_db(db))}") + "</figcaption></figure>"
                   for title, img, db in shown)
    rows = "".join(
        f"<tr><td><code>{e(f['token'])}</code></td><td>{e(f['level'])}</td>"
        f"<td>{e(f['why']['kind'])} {e(f['why']['op'])}/{e(f['why']['primitive'])} at "
        f"<code>{e(f['why']['path'])}</code>" + ("" if f["why"]["step"] is None else f" step {f['why']['step']}")
        + f"</td><td>{e(f['cost'])}</td></tr>" for f in recipe["fixes"])
    if cert is None:
        verdict = f"<p>GPU capture {'skipped' if run.skipped else 'failed'}: {e(run.line)}</p>"
    else:
        first = cert.first_failure
        verdict = (f"<p><b>{'CERTIFIED' if cert.certified else 'NOT CERTIFIED'}</b>: {len(cert.results)} tensor "
                   f"checks of the GPU capture against the fixed model's reference"
                   + ("" if first is None else f"; first failure <code>{e(first.name)}</code> ({e(first.mode)})")
                   + f'. Full report: <a href="{e(run.certificate_dir.name)}/report.html">'
                   f"{e(run.certificate_dir.name)}/report.html</a>.</p>")
    d = recipe["deployment"]
    mode = d["precision"] + (" ftz" if d["ftz"] else "") + (f" {d['device_model']}" if d["device_model"] else "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>refsd fp16-fix</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}figure{{display:inline-block;margin:0 1em 1em 0}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}}
</style></head><body>
<h1>fp16 fix: {e(recipe['status'])}</h1>
<p>Deployment: {e(mode)}, rewrites <code>{e(d['rewrites'])}</code>, GELU {e(d['gelu_approximate'])}.
Request: <code>{e(recipe['request']['prompt'])}</code>, seed {recipe['request']['seed']},
{recipe['request']['steps']} steps, {recipe['request']['width']}x{recipe['request']['height']}.
Bound: PSNR &ge; {recipe['min_psnr_db']:g} dB against f32 and no severe fp16 event.</p>
<p>Before: {recipe['before']['severe_events']} severe events. After:
{'n/a' if recipe['after'] is None else recipe['after']['severe_events']} severe events.
The GPU export: fp16 weights, rewrites <code>{e(str(gpu_rewrites(recipe)))}</code>.</p>
{figs}
<h2>Fixes: the events they remove, their cost</h2>
<table><tr><th>fix</th><th>level</th><th>removes</th><th>cost</th></tr>{rows or '<tr><td colspan=4>none</td></tr>'}</table>
<h2>Certificate (LiteRT GPU accelerator, fp16)</h2>
{verdict}
</body></html>
"""
