"""``refsd lint-gpu``: will the TFLite GPU delegate take every op of a .tflite?

TensorFlow's ``Analyzer(gpu_compatibility=True)`` reports everything
compatible, even BROADCAST_TO and rank-6 tensors, so the rules are ours,
read off the delegate's source (``tensorflow/lite/tools/versioning/
gpu_compatibility.cc``, ``CheckGpuDelegateCompatibility``, and
``delegates/gpu/common/model_builder.cc``) plus the failures Choi et al. 2023
report on real phones:

``unsupported-op``   the builtin op has no GPU kernel (BROADCAST_TO among them: what
                     GroupNorm on rank-5 tensors emits; the ``gn4d`` rewrite avoids it)
``rank``             a runtime tensor of rank > 4 (the delegate's tensors are BHWC)
``tensor-type``      a runtime tensor that is not float32 / float16 / int32 (``IsAllAllowedTensors``;
                     int32 index tensors run on LiteRT's GPU accelerator: the ``embedding_1d``
                     text encoder's RESHAPE and GATHER of its input ids are fully accelerated)
``hybrid-weights``   int8 weights on a float op (LiteRT's hybrid kernels): the delegate
                     reads constant weights as float32 / float16 only
``op-constraint``    an op-specific rule of ``CheckGpuDelegateCompatibility`` (MUL where
                     neither input covers the other, SLICE / STRIDED_SLICE outside rank 3-4,
                     MEAN / SUM / REDUCE_* with non-constant axes, GATHER with 2-D indices)
``fc-size``          FULLY_CONNECTED whose input holds more than ``max_fc_input`` elements
                     per image (the paper: 1x4096x320 failed; ``fc_as_conv`` fixes it)
``conv-size``        a CONV_2D with a kernel larger than 1x1 whose input or output holds more
                     than ``max_conv_activation`` elements per image (the paper: a 3x3 conv
                     1x32x32x1920 -> 640 failed; ``serial_conv`` fixes it, with the same
                     measure, so an export with ``serial_conv_limit=L`` passes
                     ``max_conv_activation=L`` wherever a split can meet L). 1x1 convs are
                     exempt: the paper's fully delegated UNet runs its FullyConnected layers
                     as 1x1 convs on activations up to 1x4096x2560 (10 Mi elements)

The two size limits are device properties the paper gives one failing case
each for, not a rule of the delegate's source: the defaults bracket those
cases (``DEFAULT_MAX_FC_INPUT`` = 1 Mi < 1x4096x320 = 1.25 Mi;
``DEFAULT_SERIAL_CONV_LIMIT`` = 1.5 Mi < 1x32x32x1920 = 1.875 Mi) and should be
set from your device's delegate log. "Per image" divides by the batch (axis 0),
so a batch-2 UNet is judged like the paper's batch-1 shapes.

The file is read with the flatbuffer schema LiteRT ships, without an
interpreter, memory-mapped (nothing is allocated, so a 2 GB UNet lints in a moment).
"""

from __future__ import annotations

import json
import mmap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from refsd.models.rewrites import DEFAULT_SERIAL_CONV_LIMIT
from refsd.safe_io import open_regular

DEFAULT_MAX_FC_INPUT = 1 << 20

# CheckGpuDelegateCompatibility's cases (gpu_compatibility.cc); CUSTOM ops are flagged
# (only a few named custom ops are supported and refsd exports none).
GPU_OPS = frozenset("""
ABS ADD ADD_N AVERAGE_POOL_2D BATCH_MATMUL CAST CONCATENATION CONV_2D COS CUMSUM DENSIFY DEPTHWISE_CONV_2D
DEPTH_TO_SPACE DEQUANTIZE DIV ELU EQUAL EXP FLOOR FLOOR_DIV FLOOR_MOD FULLY_CONNECTED GATHER GELU GREATER
GREATER_EQUAL HARD_SWISH LEAKY_RELU LESS LESS_EQUAL LOG LOGICAL_AND LOGISTIC LSTM MAXIMUM MAX_POOL_2D MEAN
MINIMUM MIRROR_PAD MUL NEG NOT_EQUAL ONE_HOT PACK PAD PADV2 POW PRELU QUANTIZE REDUCE_MAX REDUCE_MIN REDUCE_PROD
RELU RELU6 RELU_N1_TO_1 RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR RSQRT SELECT SELECT_V2 SIGN SIN SLICE
SOFTMAX SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE STRIDED_SLICE SUB SUM TANH TILE TRANSPOSE
TRANSPOSE_CONV
""".split())
_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
_REDUCE_AXES = ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD")


@dataclass(frozen=True)
class Limits:
    max_fc_input: int = DEFAULT_MAX_FC_INPUT
    max_conv_activation: int = DEFAULT_SERIAL_CONV_LIMIT

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"{k} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class Finding:
    op_index: int
    op: str
    rule: str
    message: str
    tensors: list = field(default_factory=list)  # names of the op's outputs (module paths in refsd exports)

    def line(self) -> str:
        where = self.tensors[0] if self.tensors else "?"
        return f"#{self.op_index} {self.op} [{self.rule}] {self.message}  ({where})"


@dataclass
class LintReport:
    model: str
    limits: Limits
    ops: int
    findings: list[Finding]

    @property
    def clean(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {"model": self.model, "limits": asdict(self.limits), "ops": self.ops, "clean": self.clean,
                "findings": [asdict(f) for f in self.findings]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        head = f"{self.model}: {self.ops} ops, "
        if self.clean:
            return head + "every op would be delegated to the GPU"
        return head + f"{len(self.findings)} finding(s)\n" + "\n".join(f.line() for f in self.findings)


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple
    dtype: str
    const: bool

    def per_image(self) -> int:
        n = int(np.prod(self.shape, dtype=np.int64))
        return n // self.shape[0] if len(self.shape) >= 2 and self.shape[0] > 0 else n

    def __str__(self) -> str:
        return "x".join(map(str, self.shape)) or "scalar"


def _read(path: Path):
    from ai_edge_litert import schema_py_generated as fb  # noqa: PLC0415

    from refsd.export.tflite_edit import read_model  # noqa: PLC0415

    # Memory-mapped, never read whole: constant buffers stay views of the file (a .tflite can be gigabytes),
    # and a file that is not a flatbuffer is refused on its first 8 bytes.
    with open_regular(path) as f:
        head = f.read(8)
        if len(head) < 8 or head[4:8] != b"TFL3":
            raise ValueError(f"{path}: not a .tflite file (no TFL3 flatbuffer identifier)")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        model = read_model(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    op_names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k.lower() for k, v in vars(fb.TensorType).items() if not k.startswith("_")}
    return model, op_names, type_names


def lint(path, limits: Limits | None = None) -> LintReport:
    """Lint the first subgraph of a .tflite file against the GPU delegate's rules."""
    path = Path(path)
    limits = limits or Limits()
    model, op_names, type_names = _read(path)
    try:
        return _lint(path, model, op_names, type_names, limits)
    except (IndexError, TypeError, AttributeError, KeyError) as e:  # a flatbuffer that parses but is not a model
        raise ValueError(f"{path}: corrupt .tflite ({type(e).__name__}: {e})") from None


def _lint(path: Path, model, op_names, type_names, limits: Limits) -> LintReport:
    graph = model.subgraphs[0]
    buffers = model.buffers
    tensors = []
    for t in graph.tensors:
        buf = buffers[t.buffer] if t.buffer is not None and t.buffer < len(buffers) else None
        const = buf is not None and (buf.data is not None and len(buf.data) > 0 or bool(getattr(buf, "size", 0)))
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        shape = tuple(int(s) for s in (t.shape if t.shape is not None else ()))
        tensors.append(_Tensor(name, shape, type_names.get(t.type, str(t.type)), const))
    findings: list[Finding] = []
    for i, op in enumerate(graph.operators or []):
        code = model.operatorCodes[op.opcodeIndex]
        name = op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), f"BUILTIN_{code.builtinCode}")
        ins = [tensors[j] for j in (op.inputs if op.inputs is not None else []) if j >= 0]
        outs = [tensors[j] for j in (op.outputs if op.outputs is not None else []) if j >= 0]
        for rule, msg in _check(name, ins, outs, limits, op.builtinOptions):
            findings.append(Finding(i, name, rule, msg, [t.name for t in outs]))
    return LintReport(str(path), limits, len(graph.operators or []), findings)


def _check(name: str, ins: list[_Tensor], outs: list[_Tensor], limits: Limits, options):
    runtime = [t for t in ins if not t.const] + outs
    if name not in GPU_OPS:
        why = (" (GroupNorm on rank-5 tensors emits it: the gn4d rewrite keeps every tensor at rank <= 4)"
               if name == "BROADCAST_TO" else "")
        yield "unsupported-op", f"{name} has no GPU delegate kernel{why}"
    high = [t for t in runtime if len(t.shape) > 4]
    if high:
        yield "rank", f"rank-{len(high[0].shape)} tensor {high[0]} (the GPU delegate handles rank <= 4)"
    bad = [t for t in runtime if t.dtype not in ("float32", "float16", "int32")]
    if bad:
        yield "tensor-type", (f"runtime tensor {bad[0].name or '?'} is {bad[0].dtype} "
                              "(GPU: float32/float16/int32 only)")
    if name in _WEIGHTED and len(ins) > 1 and ins[1].const and ins[1].dtype == "int8" and ins[0].dtype == "float32":
        yield "hybrid-weights", "int8 weights on a float input (hybrid kernel); the GPU delegate reads float " \
                                "weights only: dequantize to float16 for the GPU"
    yield from _op_constraints(name, ins)
    yield from _option_constraints(name, ins, outs, options)
    if name == "FULLY_CONNECTED" and ins and ins[0].per_image() > limits.max_fc_input:
        yield "fc-size", (f"input {ins[0]} has {ins[0].per_image()} elements per image > {limits.max_fc_input} "
                          "(fc_as_conv runs it as a 1x1 CONV_2D)")
    if name == "CONV_2D" and len(ins) > 1 and outs and ins[1].shape[1] * ins[1].shape[2] > 1:
        biggest = max(ins[0].per_image(), outs[0].per_image())
        if biggest > limits.max_conv_activation:
            yield "conv-size", (f"{ins[0]} -> {outs[0]}: {biggest} elements per image > "
                                f"{limits.max_conv_activation} (serial_conv splits it)")


def _op_constraints(name: str, ins: list[_Tensor]):
    if name == "MUL" and len(ins) == 2 and len(ins[0].shape) == len(ins[1].shape):
        a, b = ins[0].shape, ins[1].shape
        if any(x < y for x, y in zip(a, b)) and any(y < x for x, y in zip(a, b)):
            yield "op-constraint", f"MUL of {ins[0]} and {ins[1]}: neither input covers the other"
    if name in ("SLICE", "STRIDED_SLICE") and ins and len(ins[0].shape) not in (3, 4):
        yield "op-constraint", f"{name} on a rank-{len(ins[0].shape)} tensor (GPU: rank 3 or 4)"
    if name in _REDUCE_AXES and len(ins) > 1 and not (ins[1].const and ins[1].dtype == "int32"):
        yield "op-constraint", f"{name} needs constant int32 axes"
    if name == "GATHER" and len(ins) > 1 and len(ins[1].shape) != 1:
        yield "op-constraint", f"GATHER with rank-{len(ins[1].shape)} indices (GPU: 1-D int32 indices)"


_SIGN_BIT = 5  # ActivationFunctionType.SIGN_BIT, the one fused activation the delegate refuses


def _option_constraints(name: str, ins: list[_Tensor], outs: list[_Tensor], options):
    """The rules of CheckGpuDelegateCompatibility that read an op's builtin options."""
    if options is None:
        return
    if getattr(options, "fusedActivationFunction", None) == _SIGN_BIT:
        yield "op-constraint", f"{name} with a fused SIGN_BIT activation"
    if name == "SOFTMAX" and options.beta != 1:
        yield "op-constraint", f"SOFTMAX with beta {options.beta:g} (GPU: beta 1 only)"
    if name == "STRIDED_SLICE":
        masks = [m for m in ("ellipsisMask", "newAxisMask", "shrinkAxisMask") if getattr(options, m, 0)]
        if masks:
            yield "op-constraint", f"STRIDED_SLICE with {', '.join(masks)} (not supported by the GPU delegate)"
    if name == "FULLY_CONNECTED":
        if options.weightsFormat != 0:
            yield "op-constraint", "FULLY_CONNECTED with shuffled weights format (GPU: default format only)"
        if options.keepNumDims and ins and outs and len(ins[0].shape) != len(outs[0].shape):
            yield "op-constraint", "FULLY_CONNECTED keep_num_dims with input and output of different rank"
