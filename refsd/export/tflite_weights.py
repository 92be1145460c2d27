"""Read the int8 weights of a deployed export back from its .tflite files.

``read_int8_weights(folder)`` -> {component: {checkpoint key: ``Int8Weight``}},
what ``ModelOptions.make(weights="int8", int8_values=...)`` takes, so the
reference reruns the values and per-channel scales stored on the device instead
of its own quantization.

The flatbuffer is read with the schema module the ai-edge-litert wheel ships
(``ai_edge_litert.schema_py_generated``): no interpreter, no TensorFlow. Every
int8 constant that is the weight of a FULLY_CONNECTED or CONV_2D (input 1) or
the table of a GATHER (input 0) is mapped to its layer by name: ``refsd
export`` builds each module's ops in a TF name scope equal to the module path,
so the constant is named ``<path>/MatMul`` (a Linear), ``<path>/Conv2D`` (a
Conv2d, or a Linear under ``fc_as_conv``) or ``<path>/GatherV2/params`` (an
Embedding). A name joining several ops with ';' is a constant the converter
folded: ``<norm>/mul_2;<path>/MatMul`` is ``W * gamma`` of the LayerNorm
``<norm>`` (its scale folded into the next layer's weight, its shift into the
bias, which is then read too). Layouts are converted to refsd's: FC (out, in)
kept, conv OHWI -> HWIO (a Linear exported as a 1x1 conv under ``fc_as_conv``
comes as (1, 1, in, out), which ``Linear`` accepts).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from refsd.models.loading import WeightsError
from refsd.models.options import Int8Weight

# TF op name (after the module's scope) of the layer that owns a weight constant.
_OWNER_OPS = ("MatMul", "Conv2D", "GatherV2")


def _schema():
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415 (optional extra)

    return schema


def _buffer(model, raw: bytes, index: int) -> bytes:
    """A constant's bytes: inline, or (files over 2 GB) at an offset of the file."""
    buf = model.buffers[index]
    if buf.data is not None and len(buf.data):
        return np.asarray(buf.data, np.uint8).tobytes()
    if buf.offset > 1:
        return raw[buf.offset: buf.offset + buf.size]
    return b""


def _owner(name: str, component: str) -> tuple[str, str, str | None]:
    """(layer path, owner op, folded norm path or None) of a weight constant's
    TFLite name, paths relative to the component's root."""
    prefix = component + "."
    layer = op = fold = None
    for part in name.split(";"):
        scope, _, rest = part.partition("/")
        if not scope.startswith(prefix):
            continue
        # TF and the converter make names unique with suffixes: MatMul_1, Conv2D1, mul_2
        head = re.fullmatch(r"(MatMul|Conv2D|GatherV2|mul)(?:_?\d+)?", rest.split("/")[0])
        head = head.group(1) if head else ""
        if head in _OWNER_OPS and layer is None:
            layer, op = scope[len(prefix):], head
        elif head == "mul":  # the folded LayerNorm's gamma multiply
            fold = scope[len(prefix):]
    if layer is None:
        raise WeightsError(f"int8 constant {name!r}: no layer scope ({', '.join(_OWNER_OPS)}) in its name")
    return layer, op, fold


def read_int8_tflite(path, component: str) -> dict[str, Int8Weight]:
    """{checkpoint key: ``Int8Weight``} of one component's .tflite."""
    schema = _schema()
    raw = Path(path).read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(raw, 0))
    ops_by_code = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    graph = model.subgraphs[0]
    found: dict[str, list] = {}  # key -> [(part number, input tensor, Int8Weight)]
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        kind = ops_by_code[max(code.builtinCode, code.deprecatedBuiltinCode)]
        slot = {"FULLY_CONNECTED": 1, "CONV_2D": 1, "GATHER": 0}.get(kind)
        if slot is None or len(op.inputs) <= slot:
            continue
        t = graph.tensors[op.inputs[slot]]
        if t.type != schema.TensorType.INT8:
            continue
        name = t.name.decode()
        data = _buffer(model, raw, t.buffer)
        if not data:
            continue  # a runtime int8 tensor, not a weight
        q = np.frombuffer(data, np.int8).reshape([int(s) for s in t.shape])
        quant = t.quantization
        scale = np.asarray(quant.scale, np.float32)
        if quant.zeroPoint is not None and np.any(np.asarray(quant.zeroPoint) != 0):
            raise WeightsError(f"{path}: int8 weight {name!r} has a non-zero zero point (not symmetric)")
        layer, _, fold = _owner(name, component)
        if kind == "GATHER":
            if scale.size != 1:
                raise WeightsError(f"{path}: GATHER table {name!r} is quantized per channel")
        elif quant.quantizedDimension != 0 or scale.size not in (1, q.shape[0]):
            raise WeightsError(f"{path}: {name!r} is not quantized per output channel (axis 0)")
        if kind == "CONV_2D":
            # OHWI -> HWIO; under fc_as_conv a Linear's weight is a 1x1 conv (Linear.deploy takes it)
            q = np.ascontiguousarray(q.transpose(1, 2, 3, 0))
        asymmetric = True  # CONV_2D's hybrid kernel quantizes its input asymmetrically, always
        if kind == "FULLY_CONNECTED":
            asymmetric = bool(op.builtinOptions.asymmetricQuantizeInputs)
        bias = None
        if fold is not None:
            if len(op.inputs) < 3 or op.inputs[2] < 0:
                raise WeightsError(f"{path}: {name!r} folds {fold} but its op has no bias")
            b = graph.tensors[op.inputs[2]]
            bias = np.frombuffer(_buffer(model, raw, b.buffer), np.float32).copy()
        part = re.search(r"/Conv2D_(\d+)", name)
        parts = found.setdefault(f"{layer}.weight", [])
        if not any(p[1] == op.inputs[0] and np.array_equal(p[2].q, q) for p in parts):  # not the same op twice
            parts.append((int(part.group(1)) if part else 0, op.inputs[0], Int8Weight(q, scale, asymmetric, fold, bias)))
    return {key: _join(key, parts) for key, parts in found.items()}


def _join(key: str, parts: list) -> Int8Weight:
    """One weight from the CONV_2D parts ``serial_conv`` made of it (TF names them
    ``Conv2D``, ``Conv2D_1``, ... in part order). Output-split parts read the same
    input: their per-output-channel scales are the whole conv's, concatenated.
    Input-split parts read slices: each part has its own per-channel scales, so
    the scales become (parts, Cout), which ``Conv2d`` runs part by part."""
    if len(parts) == 1:
        return parts[0][2]
    parts = sorted(parts, key=lambda p: p[0])
    weights = [w for _, _, w in parts]
    if any(w.q.ndim != 4 or w.fold is not None for w in weights) or len({p[0] for p in parts}) < len(parts):
        raise WeightsError(f"{key}: several int8 constants that are not the parts of a serialized conv")
    first = weights[0]
    if len({p[1] for p in parts}) == 1:  # one input: split over output channels
        return first._replace(q=np.concatenate([w.q for w in weights], axis=3),
                              scale=np.concatenate([w.scale for w in weights]))
    return first._replace(q=np.concatenate([w.q for w in weights], axis=2), scale=np.stack([w.scale for w in weights]))


def read_int8_weights(folder) -> dict[str, dict[str, Int8Weight]]:
    """{component: {checkpoint key: ``Int8Weight``}} of an export folder
    (``refsd_export.json`` + .tflite), for ``ModelOptions.make(weights="int8",
    int8_values=...)``. An export whose weights are not int8 is refused."""
    from refsd.export.build import read_manifest  # noqa: PLC0415

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("weights") != "int8":
        raise ValueError(f"{folder}: the export stores weights {manifest.get('weights')!r}, not int8")
    return {name: read_int8_tflite(folder / entry["file"], name) for name, entry in manifest["components"].items()}
