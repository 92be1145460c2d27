"""The capture's GPU runner: LiteRT's GPU accelerator through ``CompiledModel``.

``ai-edge-litert`` ships ``libLiteRtWebGpuAccelerator.so``: WebGPU (Dawn) on
whatever Vulkan driver the machine has (a phone's or workstation's GPU, or
Mesa's lavapipe on a CPU-only machine). Nothing here names a device: the
adapter and backend are read from what LiteRT logs.

What LiteRT says only on native stderr (fd 2; some lines on fd 1) is read by
capturing both descriptors around model creation and every run
(``NativeLog``): the adapter it selected, the ops that fell back to the CPU
(``fallback_ops``), and errors (``native_errors``): a shader that fails to
compile is only logged there and its output is silently zeros, so any error
line fails the capture.

Intermediates: ``CompiledModel`` cannot preserve every tensor, so module
outputs are made extra outputs of a second, *exposed* copy of each model
(``refsd.export.tflite_edit.expose_tensors``). The unexposed model produces
the boundary tensors the pipeline runs on (the deployment as shipped); the
exposed copy runs on the same inputs for the intermediates, and how far its
final output moved is the ``exposure_effect``. A tensor the GPU fused away is
never written, or written as zeros, while the model still reports being fully
accelerated; such tensors are *not observable* and are not stored:

- every exposed output buffer is filled with a sentinel before every run; one
  that still holds only the sentinel afterwards was never written;
- on a component's first run (fusion is decided when the model is compiled,
  so it is the same on every run), LiteRT's CPU interpreter runs the exposed
  model on the same inputs: a tensor the GPU returns as all zeros while the
  CPU's has an element of magnitude >= 2**-14 (fp16's smallest normal, which
  no fp16 rounding or flush sends to zero) was not materialised.

Both tests are exact (no tolerance): on the tiny exports the largest honest
fp16 error of an intermediate is 0.18 of its max (time_proj at t = 751),
while fused-away tensors read back exactly zero or untouched.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

# --gpu-precision -> the precision the bundle declares (schema names): enforce_f32=False runs
# fp16 storage and fp16 arithmetic (measured: one multiply or add is bit-identical to np.float16).
GPU_PRECISIONS = {"fp16": "f16", "fp32": "f32"}
# An fp16 value this large survives any fp16 rounding or flush to zero (fp16's smallest normal).
_NONZERO_IN_FP16 = 2.0**-14
# Written into exposed output buffers before each run; a buffer still holding only this was not written.
_SENTINEL = np.float32(-1.2345678e-4)


class NativeLog:
    """Redirect file descriptors 1 and 2 to a temporary file for the ``with``
    block (native code writes there, not to ``sys.stderr``); ``text`` after."""

    def __enter__(self) -> "NativeLog":
        sys.stdout.flush()
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = [os.dup(1), os.dup(2)]
        os.dup2(self._file.fileno(), 1)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()


_ADAPTER = re.compile(r"Selected adapter: (?P<name>.*?), arch=(?P<arch>[^,]*), vendor=(?P<vendor>[^,]*), "
                      r"backend=(?P<backend>[^,]*), adapterType=(?P<type>.*)$", re.M)
_FALLBACK_HEAD = "Following operations are not supported by GPU delegate:"
_FALLBACK_END = re.compile(r"operations will run on the GPU|operations will run on the CPU")
# Error lines: glog severity E (``E0000 00:00:...``), LiteRT's ``ERROR:`` prefix, and Dawn / Tint
# shader diagnostics (``Error while parsing WGSL``), wherever they sit in the line.
_ERROR = re.compile(r"^(E\d{4} |ERROR: )|WGSL|Tint error|shader.*(fail|error)", re.I)
# Harmless lines that match: the fallback report (handled by ``fallback_ops``) and its
# "N operations will run on the GPU" tail.
_NOT_ERRORS = (_FALLBACK_HEAD, "operations will run on")


def adapter_info(text: str) -> dict | None:
    """{"adapter", "backend", "driver"} from LiteRT's ``Selected adapter:`` line,
    as reported (Dawn logs no driver version: ``driver`` holds what it says of
    the vendor and adapter type), or None when no such line was logged."""
    m = _ADAPTER.search(text)
    if m is None:
        return None
    return {"adapter": m["name"].strip(), "backend": f"webgpu/{m['backend'].strip().lower()}",
            "driver": f"vendor={m['vendor'].strip()}, arch={m['arch'].strip()}, adapterType={m['type'].strip()}"}


def fallback_ops(text: str) -> list[str]:
    """The ops LiteRT's GPU delegate refused, as it lists them (``OP: reason``)."""
    ops, inside = [], False
    for line in text.splitlines():
        if _FALLBACK_HEAD in line:
            inside = True
        elif inside and _FALLBACK_END.search(line):
            inside = False
        elif inside and line.strip():
            ops.append(line.strip().rstrip(":").strip())
    return ops


def native_errors(text: str) -> list[str]:
    """Error lines of a native log, other than the fallback report and the
    lines inside it (fallback is judged by ``is_fully_accelerated``)."""
    fallback = set(fallback_ops(text))
    return [line.strip() for line in text.splitlines()
            if _ERROR.search(line) and not any(s in line for s in _NOT_ERRORS)
            and line.strip().rstrip(":").strip() not in fallback]


def _one_line(what: str, errors: list[str]) -> str:
    first = " ".join(errors[0].split())
    more = f" (+{len(errors) - 1} more error line(s))" if len(errors) > 1 else ""
    return f"{what}: LiteRT's GPU accelerator logged an error: {first}{more}"


class GpuSession:
    """What every component's compiled model shares: one LiteRT environment, the
    options as passed, and what the accelerator reported about itself."""

    def __init__(self, precision: str, allow_cpu_fallback: bool) -> None:
        from ai_edge_litert import compiled_model as cm  # noqa: PLC0415
        from ai_edge_litert.compiled_model import (  # noqa: PLC0415
            CompiledModel,
            Environment,
            EnvironmentOptions,
            GpuOptions,
            HardwareAccelerator,
            Options,
        )

        if precision not in GPU_PRECISIONS:
            raise ValueError(f"--gpu-precision must be one of {', '.join(GPU_PRECISIONS)}, got {precision!r}")
        self.precision = GPU_PRECISIONS[precision]
        self.allow_cpu_fallback = allow_cpu_fallback
        gpu = GpuOptions(enforce_f32=precision == "fp32")
        # GPU|CPU always: a strict GPU-only model fails to compile with nothing but a native
        # log; compiling with fallback and then refusing names the ops that fell back.
        self.options = Options(hardware_accelerators=HardwareAccelerator.GPU | HardwareAccelerator.CPU,
                               gpu_options=gpu)
        self.options_doc = {"hardware_accelerators": "GPU|CPU", "gpu_options": dataclasses.asdict(gpu)}
        self._compiled_model = CompiledModel
        with NativeLog() as log:
            # LiteRT finds libLiteRtWebGpuAccelerator.so in the runtime path: the wheel's folder.
            self.environment = Environment.create(
                options=EnvironmentOptions(runtime_path=os.path.dirname(os.path.abspath(cm.__file__))))
        self.reported: dict | None = adapter_info(log.text)

    def compile(self, data: bytes, what: str):
        """(compiled model, its fallback ops); a native error, no adapter, or (unless
        allowed) a CPU fallback raises ValueError with one line naming ``what``."""
        with NativeLog() as log:
            try:
                model = self._compiled_model.from_buffer(data, environment=self.environment, options=self.options)
            except RuntimeError:
                model = None
        self.reported = self.reported or adapter_info(log.text)
        errors = native_errors(log.text)
        if model is None or errors:
            if "No adapters found" in log.text:
                raise ValueError(f"{what}: LiteRT's GPU accelerator found no GPU adapter (no usable Vulkan "
                                 "driver: see README, 'GPU capture')")
            raise ValueError(_one_line(what, errors or ["the model could not be compiled"]))
        ops = fallback_ops(log.text)
        if not model.is_fully_accelerated() and not self.allow_cpu_fallback:
            listed = "; ".join(ops) or "not listed by LiteRT"
            raise ValueError(f"{what}: not fully accelerated on the GPU ({len(ops)} op(s) fall back to the CPU: "
                             f"{listed}); pass --allow-cpu-fallback to capture anyway")
        return model, ops


class _Compiled:
    """One compiled model with its buffers, run on named float / int feeds."""

    def __init__(self, session: GpuSession, data: bytes, what: str) -> None:
        self.what = what
        self.model, self.fallback_ops = session.compile(data, what)
        self.fully_accelerated = bool(self.model.is_fully_accelerated())
        self.input_names = self.model.get_signature_by_index(0)["inputs"]
        self.inputs = self.model.create_input_buffers(0)
        self.outputs = self.model.create_output_buffers(0)
        self.shapes = [tuple(b.get_tensor_details()["shape"]) for b in self.outputs]

    def run(self, feeds: dict[str, np.ndarray], *, sentinel: bool = False) -> list[np.ndarray]:
        outs = None
        with NativeLog() as log:
            for buf, name in zip(self.inputs, self.input_names):
                buf.write(np.ascontiguousarray(feeds[name]))
            if sentinel:
                for buf, shape in zip(self.outputs, self.shapes):
                    buf.write(np.full(shape, _SENTINEL, np.float32))
            try:
                self.model.run_by_index(0, self.inputs, self.outputs)
                outs = [buf.read(int(np.prod(shape)), np.float32).reshape(shape)
                        for buf, shape in zip(self.outputs, self.shapes)]
            except RuntimeError:  # its message is only a source location; the cause is in the log
                pass
        errors = native_errors(log.text)
        if outs is None or errors:
            raise ValueError(_one_line(self.what, errors or ["the run failed"]))
        return outs


def not_materialised(gpu: np.ndarray, cpu: np.ndarray | None) -> bool:
    """The exact tests of the module docstring: never written (sentinel left), or
    all zeros where the CPU's value has an element fp16 cannot send to zero."""
    if np.all(gpu == _SENTINEL):
        return True
    return cpu is not None and not np.any(gpu) and float(np.abs(cpu).max(initial=0.0)) >= _NONZERO_IN_FP16


class GpuModel:
    """``capture``'s model runner for one component on the GPU (the interface of
    ``refsd_validate.capture``'s runners: ``run(feeds) -> (output, {path: tensor})``)."""

    def __init__(self, session: GpuSession, path: Path, entry: dict, *, intermediates: bool) -> None:
        from refsd.export.tflite_edit import expose_tensors  # noqa: PLC0415

        data = path.read_bytes()
        self.plain = _Compiled(session, data, str(path))
        self.paths = list(entry["tensors"]) if intermediates else []
        self.exposed = self.positions = None
        self.not_observable: set[str] = set()
        self.effect = 0.0  # max over runs of max|y_exposed - y_plain| / max|y_plain|
        self._checked = False
        if self.paths:
            exposed, self.positions = expose_tensors(data, [entry["tensors"][p]["tensor"] for p in self.paths])
            self.exposed_bytes = exposed
            self.exposed = _Compiled(session, exposed, f"{path} (module outputs exposed)")

    @property
    def fully_accelerated(self) -> bool:
        return self.plain.fully_accelerated and (self.exposed is None or self.exposed.fully_accelerated)

    @property
    def fallback_ops(self) -> list[str]:
        return self.plain.fallback_ops

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
        y = self.plain.run(feeds)[0]
        if self.exposed is None:
            return y, {}
        outs = self.exposed.run(feeds, sentinel=True)
        scale = float(np.abs(y).max(initial=0.0))
        change = float(np.abs(outs[0].astype(np.float64) - y).max(initial=0.0))
        self.effect = max(self.effect, change / scale if scale else change)
        cpu = None if self._checked else _cpu_outputs(self.exposed_bytes, feeds)
        self._checked = True
        found = {}  # None: exposed but not materialised (the caller lists it, stores nothing)
        for path, pos in zip(self.paths, self.positions):
            if path in self.not_observable or not_materialised(outs[pos], None if cpu is None else cpu[pos]):
                self.not_observable.add(path)
                found[path] = None
            else:
                found[path] = outs[pos]
        return y, found


def _cpu_outputs(data: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of ``data`` run by LiteRT's builtin CPU kernels (no XNNPACK)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: PLC0415

    with NativeLog():  # LiteRT logs its environment's set-up and teardown natively
        interp = Interpreter(model_content=data,
                             experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        interp.allocate_tensors()
        for d in interp.get_input_details():
            interp.set_tensor(d["index"], feeds[d["name"]])
        interp.invoke()
        outs = [np.array(interp.get_tensor(d["index"])) for d in interp.get_output_details()]
        del interp
    return outs
