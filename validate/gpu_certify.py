"""A model exported with fp16 weights, captured through LiteRT's GPU accelerator
in fp16, and certified: what ``refsd demo`` and ``refsd fp16-fix --verify-gpu``
both run when the machine has a GPU adapter.

The capture runs in a subprocess: LiteRT's GPU accelerator and TensorFlow
(imported here for the export) do not share a process."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from refsd.export.build import export
from refsd.pipeline import Request
from refsd_validate.certificate import Certificate
from refsd_validate.certify import certify
from refsd_validate.outputs import tflite_tensor_names, write_outputs

NO_ADAPTER = "found no GPU adapter"


@dataclass
class GpuRun:
    """``certificate`` None when the capture did not run: ``line`` says why, ``skipped``
    when only because this machine has no GPU adapter."""

    certificate: Certificate | None
    line: str
    skipped: bool
    tflite: Path
    bundle: Path
    certificate_dir: Path


def export_and_capture(model: Path, tflite: Path, bundle: Path, request: Request, *, rewrites: str,
                       gelu_approximate: str = "none", intermediates: bool = True) -> tuple[bool, str]:
    """Export ``model`` (fp16 weights, ``rewrites``) to ``tflite`` and capture ``request`` on the GPU
    in fp16 into ``bundle``: (captured, the capture's last stderr line when it failed)."""
    export(model, tflite, weights="fp16", rewrites=rewrites, height=request.height, width=request.width,
           gelu_approximate=gelu_approximate, progress=False)
    r = request
    cmd = [sys.executable, "-m", "refsd_validate", "capture", "--tflite", str(tflite), "--model", str(model),
           "--out", str(bundle), "--prompt", r.prompt, "--negative-prompt", r.negative_prompt, "--seed", str(r.seed),
           "--steps", str(r.steps), "--guidance", str(r.guidance), "--accelerator", "gpu", "--gpu-precision", "fp16",
           "--quiet"] + (["--intermediates"] if intermediates else []) + (["--scheduler", r.scheduler] if r.scheduler else [])
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        return False, run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"
    return True, ""


def capture_and_certify(model: Path, out: Path, request: Request, *, rewrites: str, gelu_approximate: str = "none",
                        cache_dir: Path | None = None, names: tuple[str, str, str] = (
                            "tflite_gpu", "capture_gpu", "certificate_gpu")) -> GpuRun:
    """``export_and_capture`` into ``out``/names[0] and names[1] (every intermediate), then certify
    into ``out``/names[2]."""
    tflite, bundle, cert_dir = (out / n for n in names)
    ok, line = export_and_capture(model, tflite, bundle, request, rewrites=rewrites, gelu_approximate=gelu_approximate)
    if not ok:
        return GpuRun(None, line, NO_ADAPTER in line, tflite, bundle, cert_dir)
    cert = certify(bundle, model, mode="both", cache_dir=cache_dir)
    write_outputs(cert, cert_dir, tflite_tensor_names(tflite))
    verdict = "CERTIFIED" if cert.certified else "NOT CERTIFIED"
    return GpuRun(cert, f"{verdict} (GPU fp16): {len(cert.results)} tensor checks; open {cert_dir}/report.html",
                  False, tflite, bundle, cert_dir)
