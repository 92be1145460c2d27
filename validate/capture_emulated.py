"""An emulated device: a capture bundle written from refsd's own pipeline run
in an fp16 precision mode, to try ``refsd-validate certify`` without a phone
(and the fixture that the validator's tests derive bad devices from: the
validator must not care who produced a bundle).

    emulated_capture(model_dir, Request("a cat", steps=4, scheduler="ddim", height=64, width=64), "bundle/",
                     precision="f32_f16", ftz=True, rewrites="google")

The bundle declares ``runtime.name = "refsd-emulation"`` and ``device.name =
"refsd-emulated"``; its components are identified by refsd's name and version
(there are no files), and each model stage by the emulated precision.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Callable, Sequence

from refsd_validate.bundle import model_sha256, write_bundle
from refsd_validate.pipeline_capture import capture_document, pipeline_tensors

from refsd import __version__
from refsd.context import recording
from refsd.numerics import Precision
from refsd.pipeline import Pipeline, Request
from refsd.trace import MODELS


class _Prefixed(dict):
    """A recording that keeps only module outputs whose names start with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def __setitem__(self, key, value) -> None:
        if key.startswith(self.prefixes):
            super().__setitem__(key, value)


def emulated_capture(model_dir: str | Path, request: Request, out: str | Path, *, precision: str = "f32_f16",
                     ftz: bool = False, rewrites: str = "none", declare_ftz: bool | None = None,
                     intermediates: Sequence[str] = (), fault: Callable[[Pipeline], None] | None = None,
                     device_model: str | None = None) -> Path:
    """Write the bundle of ``request`` run under ``precision``/``ftz``/``rewrites``.
    ``declare_ftz``: what the capture says about FTZ (None: unknown, as most
    delegates do not report it). ``intermediates``: name prefixes of module
    outputs to include (``"unet/step_2/unet.mid_block"``); none by default.
    ``fault``: called with the loaded pipeline before the run, to emulate a
    faulty device (wrap a module's ``forward`` to inject a NaN or a bias):
    the fault then propagates through the rest of the run as on a device.
    ``device_model``: run under a measured GPU's fp16 kernels
    (``refsd.numerics.DEVICE_MODELS``, ``precision="f16"``) and declare the
    model stages as run on a ``gpu``."""
    if request.scheduler is None:
        raise ValueError("the request must name its scheduler (a bundle records it)")
    pipe = Pipeline(model_dir, precision=Precision(precision, ftz, device_model=device_model), rewrites=rewrites)
    if fault is not None:
        fault(pipe)
    rec = _Prefixed(tuple(intermediates))  # only what was asked: every layer's output of a real UNet is ~10 GB
    with recording(into=rec):
        result = pipe(request, progress=False)
    tensors = pipeline_tensors(pipe, request, result, request.scheduler)
    tensors.update(rec)
    capture = capture_document(
        tool=f"refsd {__version__} emulated device (refsd_validate.capture_emulated)",
        device={"name": "refsd-emulated", "soc": None, "gpu": None, "os": platform.platform()},
        runtime={"name": "refsd-emulation", "version": __version__,
                 "delegate": {"name": "emulated", "precision": precision, "ftz": declare_ftz,
                              "options": {"rewrites": rewrites, "ftz": ftz}}},
        model={"sha256": model_sha256(model_dir), "weights": "fp32", "rewrites": rewrites,
               "components": {c: {"format": "refsd-emulation", "name": "refsd", "version": __version__}
                              for c in MODELS}},
        stages={**{c: {"processor": "gpu" if device_model else "other", "precision": precision, "ftz": declare_ftz, "fast_math": False,
                       "runtime": "refsd emulation"} for c in MODELS},
                "guidance_scheduler": {"processor": "host", "precision": "f32", "ftz": None}},
        request=request, scheduler=request.scheduler)
    return write_bundle(out, capture, tensors)
