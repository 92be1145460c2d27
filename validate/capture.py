"""``refsd-validate capture``: run an export's .tflite files with LiteRT
through refsd's own pipeline loop and write a capture bundle.

The loop is ``refsd.pipeline.Pipeline`` itself (tokenizer, seeded initial
latents, scheduler, classifier-free guidance, boundary-tensor trace), with
its three models replaced by LiteRT runners: what the validator reruns
is then exactly what ran here, and only the models differ. Two runners share
that plumbing (``_LiteRTModel``): LiteRT's Interpreter (``--accelerator cpu``,
below) and LiteRT's GPU accelerator (``--accelerator gpu``,
``refsd_validate.capture_gpu``: adapter as reported, fp16 or fp32 kernels,
per-component fallback, native errors, which intermediates were observable).

Interpreters use LiteRT's builtin kernels without default delegates (no
XNNPACK), so every intermediate tensor is readable after ``invoke()``; the
bundle says so (``delegate: none``, precision ``f32``, device ``host``). With
``delegate=LIB.so`` an external delegate is loaded (``load_delegate``); its
precision cannot be read from the library, so the caller states it.

Intermediates (``intermediates=True``): every module output the export's
``refsd_export.json`` maps to a TFLite tensor, named as the reference names
it (``refsd.context.tensor_name``: ``unet/step_3/unet.mid_block``).
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from refsd_validate.bundle import model_sha256, write_bundle
from refsd_validate.pipeline_capture import capture_document, pipeline_tensors

from refsd.pipeline import Pipeline
from refsd.trace import MODELS

PRECISIONS = ("f32", "f32_f16", "f16")
ACCELERATORS = ("cpu", "gpu")


class _InterpreterRunner:
    """One exported component on LiteRT's Interpreter: ``run(feeds)`` -> (output,
    {module path: tensor} of every mapped module output when ``intermediates``)."""

    def __init__(self, path: Path, entry: dict, *, delegate, intermediates: bool) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: PLC0415

        delegates = [delegate] if delegate is not None else None
        try:
            self.interp = Interpreter(
                model_path=str(path), experimental_delegates=delegates,
                experimental_preserve_all_tensors=intermediates,
                experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: LiteRT cannot load it ({' '.join(str(e).split())})") from None
        self.inputs = {d["name"]: d["index"] for d in self.interp.get_input_details()}
        self.tensors = entry["tensors"] if intermediates else {}
        self.index = {d["name"]: d["index"] for d in self.interp.get_tensor_details()}

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        for key, arr in feeds.items():
            self.interp.set_tensor(self.inputs[key], arr)
        self.interp.invoke()
        found = {path: np.array(self.interp.get_tensor(self.index[info["tensor"]]))
                 for path, info in self.tensors.items()}
        # A quantized export can map a module to a tensor that still holds int8 values (a GATHER from an int8
        # table, before its DEQUANTIZE): not the module's float output, so not captured.
        found = {path: v for path, v in found.items() if v.dtype.kind == "f"}
        return np.array(self.interp.get_tensor(self.interp.get_output_details()[0]["index"])), found


class _LiteRTModel:
    """One exported component behind the interface ``Pipeline`` calls; ``runner``
    (the Interpreter's or the GPU accelerator's) runs it."""

    def __init__(self, name: str, entry: dict, runner) -> None:
        self.name = name
        self.entry = entry
        self.runner = runner
        self.captured: dict[str, np.ndarray] = {}
        self.not_observable: list[str] = []  # bundle names of module outputs the device did not materialise
        shapes = entry["inputs"]
        if "sample" in shapes:  # the UNet: Pipeline reads the latent channels from its config
            self.config = SimpleNamespace(in_channels=shapes["sample"]["shape"][-1])

    def _run(self, **feeds) -> np.ndarray:
        from refsd.context import tensor_name  # noqa: PLC0415

        arrays = {}
        for key, value in feeds.items():
            spec = self.entry["inputs"][key]
            arr = np.asarray(value, dtype=spec["dtype"])  # input_ids: int32, as exported
            if list(arr.shape) != spec["shape"]:
                raise ValueError(f"{self.name}: input {key} has shape {arr.shape}, the .tflite was exported for "
                                 f"{tuple(spec['shape'])}")
            arrays[key] = arr
        y, found = self.runner.run(arrays)
        for path, value in found.items():  # named at the pipeline's current stage and step
            if value is None:
                self.not_observable.append(tensor_name(path))
            else:
                self.captured[tensor_name(path)] = value
        return y

    # the calls Pipeline makes
    def __call__(self, *args):
        if self.name == "text_encoder":
            (ids,) = args
            return self._run(input_ids=ids)
        sample, timestep, context = args
        return self._run(sample=sample, timestep=np.reshape(timestep, (1,)), encoder_hidden_states=context)

    def decode_latents(self, latents):
        return self._run(latents=latents)


class _LiteRTPipeline(Pipeline):
    """refsd's pipeline whose stages get their models from ``models``; low-memory
    mode, so constructing it loads only the tokenizer and scheduler config."""

    def __init__(self, model_dir: Path, models: dict) -> None:
        super().__init__(model_dir, low_memory=True)
        self.models = models

    def model(self, name: str):
        return self.models[name]


def _check_delegate_library(path) -> None:
    """An external delegate exports LiteRT's plugin entry points. Checked here
    because ``load_delegate`` on any other library fails inside its own
    destructor, printing a traceback past our one-line error."""
    import ctypes  # noqa: PLC0415

    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise ValueError(f"{path}: cannot load the delegate ({' '.join(str(e).split())})") from None
    missing = [s for s in ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate") if not hasattr(lib, s)]
    if missing:
        raise ValueError(f"{path}: cannot load the delegate (not a TFLite external delegate: no {', '.join(missing)})")


def capture(tflite_dir, model_dir, request, out, *, delegate: str | None = None, intermediates: bool = False,
            delegate_precision: str | None = None, accelerator: str = "cpu", gpu_precision: str = "fp16",
            allow_cpu_fallback: bool = False, progress: bool = True) -> Path:
    """Run ``request`` (a ``refsd.pipeline.Request``) on the export in
    ``tflite_dir`` of the diffusers folder ``model_dir``; write the bundle
    directory ``out`` and return it.

    ``accelerator="cpu"``: LiteRT's Interpreter (builtin kernels, or ``delegate``).
    ``accelerator="gpu"``: LiteRT's GPU accelerator (``refsd_validate.capture_gpu``)
    in ``gpu_precision`` fp16 or fp32; a component that is not fully accelerated is
    refused unless ``allow_cpu_fallback``."""
    from refsd.export.build import read_manifest  # noqa: PLC0415
    from refsd.schedulers import default_scheduler_name  # noqa: PLC0415

    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {', '.join(ACCELERATORS)}, got {accelerator!r}")
    if accelerator == "gpu" and delegate is not None:
        raise ValueError("--delegate loads an Interpreter delegate; it does not combine with --accelerator gpu")
    tflite_dir, model_dir = Path(tflite_dir), Path(model_dir)
    manifest = read_manifest(tflite_dir)
    missing = [c for c in MODELS if c not in manifest.get("components", {})]
    if missing:
        raise ValueError(f"{tflite_dir}: the export has no {', '.join(missing)}")
    if model_sha256(model_dir) != manifest["model_sha256"]:
        raise ValueError(f"{model_dir} is not the model {tflite_dir} was exported from (model sha256 differs)")
    if (request.height, request.width) != (manifest["height"], manifest["width"]):
        raise ValueError(f"the .tflite files were exported for {manifest['height']}x{manifest['width']} images, "
                         f"the request asks for {request.height}x{request.width}")
    files = {}
    for name in MODELS:
        entry = manifest["components"][name]
        path = tflite_dir / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(2, "no such file", str(path))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            raise ValueError(f"{path}: sha256 differs from {tflite_dir / 'refsd_export.json'} (file replaced?)")
        files[name] = {"format": "tflite", "file": entry["file"], "sha256": digest}

    if accelerator == "gpu":
        from refsd_validate.capture_gpu import GpuModel, GpuSession  # noqa: PLC0415 (imports LiteRT)

        session = GpuSession(gpu_precision, allow_cpu_fallback)
        runners = {name: GpuModel(session, tflite_dir / manifest["components"][name]["file"],
                                  manifest["components"][name], intermediates=intermediates) for name in MODELS}
    else:
        loaded, delegate_info = _delegate(delegate, delegate_precision)
        runners = {name: _InterpreterRunner(tflite_dir / manifest["components"][name]["file"],
                                            manifest["components"][name], delegate=loaded,
                                            intermediates=intermediates) for name in MODELS}
    models = {name: _LiteRTModel(name, manifest["components"][name], runner) for name, runner in runners.items()}
    pipe = _LiteRTPipeline(model_dir, models)
    result = pipe(request, progress=progress)
    scheduler = request.scheduler or default_scheduler_name(pipe.scheduler_config)

    tensors = pipeline_tensors(pipe, request, result, scheduler)
    for m in models.values():
        tensors.update(m.captured)
    host = {"guidance_scheduler": {"processor": "host", "precision": "f32", "ftz": None,
                                   "runtime": "refsd (NumPy)"}}
    if accelerator == "gpu":
        runtime, stages, gpu_name = _gpu_declaration(session, runners, host)
    else:
        runtime = {"name": "ai-edge-litert", "version": _litert_version(), "delegate": delegate_info}
        stages = {**{c: {"processor": "cpu" if delegate is None else "other",
                         "precision": delegate_info["precision"], "ftz": delegate_info["ftz"],
                         "fast_math": delegate is not None,
                         "runtime": "LiteRT builtin kernels" if delegate is None else delegate_info["name"]}
                     for c in MODELS}, **host}
        gpu_name = None
    doc = capture_document(
        tool=f"refsd-validate capture (refsd {_version()})",
        device={"name": "host", "manufacturer": None, "soc": None, "gpu": gpu_name, "os": platform.platform(),
                "cpu": platform.machine() or None},
        runtime=runtime,
        model={"sha256": manifest["model_sha256"], "weights": manifest["weights"], "rewrites": manifest["rewrites"],
               "components": files},
        stages=stages, request=request, scheduler=scheduler)
    if accelerator == "gpu" and intermediates:
        doc["observability"] = {
            "not_observable": sorted(n for m in models.values() for n in m.not_observable),
            "method": "exposed module outputs filled with a sentinel before every GPU run: never written "
                      "(sentinel left), or all zeros where LiteRT's CPU interpreter on the same exposed "
                      "model and inputs (first run of each component) has an element >= 2**-14",
            "exposure_effect": {
                "measure": "max over runs of max|y_exposed - y| / max|y|: the final output of the model "
                           "with module outputs exposed against the unexposed model (which produced the "
                           "boundary tensors), same inputs, same GPU",
                **{name: runners[name].effect for name in MODELS}},
        }
    return write_bundle(out, doc, tensors)


def _delegate(delegate: str | None, delegate_precision: str | None):
    """(loaded Interpreter delegate or None, its ``runtime.delegate`` declaration)."""
    if delegate is None:
        return None, {"name": "none", "library": None, "precision": "f32", "ftz": None, "options": {}}
    if delegate_precision not in PRECISIONS:
        raise ValueError(f"with a delegate, state its precision (one of {', '.join(PRECISIONS)}): the bundle "
                         "records it and it cannot be read from the library")
    if not Path(delegate).is_file():
        raise FileNotFoundError(2, "no such delegate library", str(delegate))
    _check_delegate_library(delegate)
    from ai_edge_litert.interpreter import load_delegate  # noqa: PLC0415

    try:
        loaded = load_delegate(str(delegate))
    except (ValueError, RuntimeError, OSError) as e:
        raise ValueError(f"{delegate}: cannot load the delegate ({' '.join(str(e).split())})") from None
    return loaded, {"name": Path(delegate).stem, "library": str(delegate), "precision": delegate_precision,
                    "ftz": None, "options": {}}


def _gpu_declaration(session, runners: dict, host: dict):
    """(``runtime``, ``stages``, device GPU name) of a GPU capture, as LiteRT reported them."""
    reported = session.reported or {"adapter": None, "backend": "webgpu", "driver": None}
    backend = reported["backend"]
    accel = {"name": "litert-gpu", "backend": backend, "adapter": reported["adapter"],
             "driver": reported["driver"], "options": session.options_doc}
    # ``delegate`` repeats the precision for readers of the version-1 fields (the precision is the
    # accelerator's: fp16 or fp32 kernels; subnormal flushing is not reported: ftz null).
    delegate = {"name": "litert-gpu", "library": None, "precision": session.precision, "ftz": None,
                "options": session.options_doc}
    runtime = {"name": "ai-edge-litert", "version": _litert_version(), "delegate": delegate, "accelerator": accel}
    label = f"LiteRT GPU accelerator ({backend})"
    stages = {name: {"processor": "gpu", "precision": session.precision, "ftz": None, "fast_math": True,
                     "fully_accelerated": r.fully_accelerated, "fallback_ops": r.fallback_ops, "runtime": label}
              for name, r in runners.items()}
    return runtime, {**stages, **host}, reported["adapter"]


def _version() -> str:
    from refsd import __version__  # noqa: PLC0415

    return __version__


def _litert_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("ai-edge-litert")
    except PackageNotFoundError:  # pragma: no cover - imported above, so installed
        return "unknown"
