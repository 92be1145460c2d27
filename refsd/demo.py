"""``refsd demo``: the main job on the embedded default.

Writes a tiny seeded SD 2.1-architecture folder, runs the float16 exception
catalogue, generates an image with the golden reference (f32) and the same
request under fp16 emulation with the exception monitor, and writes what a
person wants to look at:

    OUT/tiny/                 the model (diffusers format)
    OUT/catalogue.json        the catalogue's cases and verdicts
    OUT/image_f32.png         the reference image
    OUT/image_<mode>.png      the same request in f32_f16 and f16 emulation
    OUT/compare.png           per mode a row: f32 | mode | |difference| x amplification (heatmap)
    OUT/fp16_report.json      the monitor's reports: first offending op, counts, headroom
    OUT/trace_f32.npz         every boundary tensor of the reference run
    OUT/tflite/               the model exported to .tflite (fc_as_conv, serial_conv, gn4d; fp32 weights)
    OUT/capture/              a capture bundle of LiteRT's interpreter running it (4 steps, intermediates)
    OUT/certificate/          certificate.json, report.html, Model Explorer node data
    OUT/tflite_gpu/           when a GPU adapter exists (LiteRT's GPU accelerator; lavapipe counts):
    OUT/capture_gpu/          the model exported for the GPU (fp16 weights, + embedding_1d), its fp16
    OUT/certificate_gpu/      GPU capture (2 steps, intermediates) and certificate

Exit 0 when the catalogue passes, the LiteRT interpreter capture is
certified and the GPU capture, if any, is certified too (fp16 events found in
the model are the report's findings, not a failure of the job), 1 otherwise.
Without a GPU adapter the GPU part is skipped with one line (README, "GPU
capture": the driver).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from refsd.catalogue import run_catalogue
from refsd.image import side_by_side, write_png
from refsd.monitor import Monitor
from refsd.pipeline import Pipeline, Request
from refsd.tiny import make_tiny

PROMPT = "a photo of an astronaut riding a horse on mars"


def run_demo(out: str | Path, *, arch: str = "sd21", seed: int = 0, steps: int = 20, size: int = 64,
             modes: tuple[str, ...] = ("f32_f16", "f16"), ftz: bool = False, rewrites: str = "none") -> int:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = make_tiny(out / "tiny", arch, seed=0)
    print(f"model: {model} (tiny {arch}, seeded)")

    cat = run_catalogue()
    (out / "catalogue.json").write_text(cat.to_json() + "\n")
    print("\n== float16 exception catalogue ==")
    print(cat.table())

    req = Request(PROMPT, seed=seed, steps=steps, scheduler="ddim", height=size, width=size)
    ref = Pipeline(model)(req)
    write_png(out / "image_f32.png", ref.image)
    np.savez(out / "trace_f32.npz", **{k.replace("/", "__"): v for k, v in ref.trace.items()})

    rows, summary = [], {}
    for mode in modes:
        test = Pipeline(model, precision=mode, ftz=ftz, rewrites=rewrites)(req, monitor=Monitor())
        tag = mode + ("_ftz" if ftz else "")
        write_png(out / f"image_{tag}.png", test.image)
        picture, gain = side_by_side(ref.image, test.image)
        rows.append(picture)
        finite = np.isfinite(test.image)
        diff = float(np.abs(ref.image - test.image)[finite].max(initial=0.0))
        bad = int((~finite).any(axis=-1).sum())
        summary[tag] = {"image_max_abs_diff_vs_f32": diff, "image_nonfinite_pixels": bad,
                        "report": test.report.to_dict()}
        print(f"\n== {tag} vs f32 on '{PROMPT}' ({steps} steps, {size}x{size}, rewrites {rewrites}) ==")
        print(test.report.table(max_events=8))
        print(f"image: max |f32 - {tag}| = {diff:.4f} over finite pixels, {bad} NaN/inf pixels "
              f"(difference shown x{gain:.0f})")
    gap = np.ones((8, rows[0].shape[1], 3), np.float32)
    write_png(out / "compare.png", np.concatenate([x for r in rows for x in (r, gap)][:-1], axis=0))
    doc = {"request": vars(req), "ftz": ftz, "rewrites": rewrites, "modes": summary}
    (out / "fp16_report.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out}/: compare.png (rows: {', '.join(summary)}; columns: f32 | mode | |difference|, "
          "NaN/inf magenta), image_*.png, fp16_report.json, catalogue.json, trace_f32.npz")
    certified = certify_device(model, out, size=size, steps=min(steps, 4))
    gpu_ok = certify_gpu(model, out, size=size, steps=min(steps, 2))
    return 0 if cat.ok and certified and gpu_ok else 1


DEVICE_REWRITES = "fc_as_conv,serial_conv,gn4d"


def certify_device(model: Path, out: Path, *, size: int, steps: int = 4) -> bool:
    """The validator's story on the tiny model: export to .tflite, capture a run
    with LiteRT's interpreter (every intermediate), certify it against the
    golden reference. Returns whether it was certified."""
    try:
        from refsd.export.build import export
        from refsd_validate.capture import capture
    except ImportError as e:  # the export extra is not installed
        print(f"\n== device certification skipped: {e.name} is missing (pip install -e '.[export]') ==")
        return True
    from refsd_validate.certify import certify
    from refsd_validate.outputs import tflite_tensor_names, write_outputs

    print(f"\n== device: export, LiteRT capture ({steps} steps, {size}x{size}), certification ==")
    # The paper's graph rewrites that compute the same function. gelu_clip is left out
    # on purpose: it turns this model's erf-GELU into tanh-GELU, which the validator
    # rightly refuses, localized to the first layer after a GELU.
    export(model, out / "tflite", weights="fp32", rewrites=DEVICE_REWRITES, height=size, width=size)
    req = Request(PROMPT, seed=0, steps=steps, scheduler="ddim", height=size, width=size)
    bundle = capture(out / "tflite", model, req, out / "capture", intermediates=True)
    cert = certify(bundle, model, mode="both", cache_dir=out / "cache")
    write_outputs(cert, out / "certificate", tflite_tensor_names(out / "tflite"))
    verdict = "CERTIFIED" if cert.certified else "NOT CERTIFIED"
    print(f"{verdict}: {len(cert.results)} tensor checks; open {out}/certificate/report.html "
          f"(certificate.json beside it)")
    return cert.certified


# The GPU export: DEVICE_REWRITES plus embedding_1d, without which the text encoder's GATHER
# falls back to the CPU. fp16 weights, as a phone would ship them.
GPU_REWRITES = DEVICE_REWRITES + ",embedding_1d"


def certify_gpu(model: Path, out: Path, *, size: int, steps: int = 4) -> bool:
    """The same story on LiteRT's GPU accelerator in fp16, when this machine has a
    GPU adapter; prints the verdict, or in one line why there is none. Returns
    False when the GPU capture failed (anything but "no adapter") or is not
    certified, else True. Two steps: the fp16 certificate's calibration includes
    refsd's model of the GPU's kernels, the slowest reruns. The capture runs in a
    subprocess (LiteRT's GPU accelerator and TensorFlow, imported for the export,
    do not share a process)."""
    try:
        from refsd_validate.gpu_certify import capture_and_certify
    except ImportError:  # already reported by certify_device
        return True
    print(f"\n== GPU: export (fp16 weights), LiteRT GPU capture (fp16, {steps} steps), certification ==")
    req = Request(PROMPT, seed=0, steps=steps, scheduler="ddim", height=size, width=size)
    run = capture_and_certify(model, out, req, rewrites=GPU_REWRITES, cache_dir=out / "cache")
    if run.certificate is None:
        print(f"GPU capture {'skipped' if run.skipped else 'failed'}: {run.line}")
        return run.skipped
    print(run.line)
    return run.certificate.certified
