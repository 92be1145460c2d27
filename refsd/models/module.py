"""A small module system whose attribute tree *is* the checkpoint's key tree
(tinygrad / nanoGPT style): ``unet.down_blocks[1].attentions[0].proj_in.weight``
is the tensor ``down_blocks.1.attentions.0.proj_in.weight`` of the checkpoint.

* Children are attributes (a ``Module`` or a list of them, ``None`` for list
  slots without parameters such as ``ff.net.1``, a dropout).
* Parameters are declared with their checkpoint shape, so a model enumerates
  ``named_parameter_shapes()`` without weights (``refsd make-tiny`` uses it)
  and loads a flat dict strictly: every missing key, unexpected key and shape
  mismatch is reported in one ``WeightsError``.
* Loading converts once: conv OIHW -> HWIO, fp16 / bf16 -> float32 arrays, and
  in fp16-storage precision modes rounds each weight to fp16 once
  (``ops.mark_stored``) so ops do not round it again.
* Then the root model makes the weights those *as deployed* (``RootModel.deploy``):
  pruning (rewrite ``prune``), and the storage of ``ModelOptions.weights``
  (fp16 / bf16 rounding, or int8 values and per-channel scales with the kernels
  that run them, ``int8_kernels``).
* Calling a child runs its ``forward`` under ``refsd.monitor.scope(<attribute
  name>)``: every op reports under its module path, e.g.
  ``unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2``.
* Ops are reached only through ``self.ops``, the namespace handed to the root
  model (``refsd.ops`` by default), so another executor can pass its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np

from refsd.context import record, scope
from refsd.models.config_schema import config_schema
from refsd.models.rewrites import Rewrites
from refsd.numerics import U_F16, Precision, round_f16
from refsd.numerics import precision as _precision
from refsd.ops import mark_stored
from refsd.safe_io import check_schema, read_json


class WeightsError(ValueError):
    """A checkpoint that does not match the model (keys, shapes, format)."""


# ---------------------------------------------------------------- options


WEIGHT_STORAGE = ("fp32", "fp16", "bf16", "int8")
INT8_KERNELS = ("dequantize", "hybrid")
# The TFLite converter leaves weights of fewer elements float (its dynamic-range quantizer's
# minimum; measured on the tiny exports: 1024-element weights int8, an 864-element conv float).
INT8_MIN_ELEMENTS = 1024


class Int8Weight(NamedTuple):
    """One int8 weight as deployed, in refsd's layout (Linear (out, in), Conv2d
    HWIO, Embedding (num, dim)): ``q`` int8 and ``scale`` float32, per output
    channel (out,), per tensor (1,), or for a conv the converter received split
    over input channels (``serial_conv``) one row per part, (parts, out): each
    part was quantized on its own. ``asymmetric``: the hybrid
    FULLY_CONNECTED's ``asymmetric_quantize_inputs`` option. ``fold``: the
    module path (relative to the root model) of a LayerNorm whose affine the
    converter folded into this weight (``q * scale ~ W * gamma``), whose output
    is then the normalized input alone; ``bias`` is then the folded bias
    (``b + W @ beta``) as the .tflite stores it."""

    q: np.ndarray
    scale: np.ndarray
    asymmetric: bool = True
    fold: str | None = None
    bias: np.ndarray | None = None


@dataclass(frozen=True)
class ModelOptions:
    """How a model runs, fixed at construction: op namespace, rewrites,
    precision mode, the GELU approximation of its GELU / GEGLU layers
    (``"none"`` = erf, as diffusers and transformers compute it), and
    ``weights_f16``: in fp16-storage modes, keep the (fp16-rounded) weights as
    float16 arrays, widened to float32 at each use: half the weight memory
    (the low-memory pipeline), same results, ~2 ns per weight per use.

    Weights as deployed, independent of the precision mode:

    * ``weights="fp32"``: as loaded (in fp16-storage modes rounded to fp16 once,
      as the device stores every tensor).
    * ``"fp16"`` / ``"bf16"``: every parameter (conv and linear weights, biases,
      norm weights, embedding tables) rounded once at load, to nearest even,
      also in precision f32. That is the set the TFLite converter stores as
      float16 with ``refsd export --weights fp16`` (every float constant of the
      tiny exports is FLOAT16 + DEQUANTIZE); bf16 rounds the same set.
    * ``"int8"``: what ``Optimize.DEFAULT`` stores: Linear and Conv2d weights
      of at least ``INT8_MIN_ELEMENTS`` elements symmetric per output channel
      (``ops.quantize_int8``, bit for bit the converter's values), and the
      token embedding table (a GATHER of runtime ids) per tensor; biases, norm
      weights and smaller weights stay float. ``int8_values``: {component
      (``text_encoder`` / ``unet`` / ``vae``): {checkpoint key: ``Int8Weight``
      or ``(q, scale)``}} read from the deployed .tflite
      (``refsd.export.tflite_weights.read_int8_weights``) replaces refsd's own
      quantization: then exactly the weights listed are int8, and LayerNorm
      affines the converter folded into a weight are folded here too.
      ``int8_kernels``: ``"dequantize"`` (weights dequantized at use, as GPU
      delegates do: ``ops.dequantize_int8``) or ``"hybrid"`` (LiteRT CPU's
      hybrid kernels, which also quantize activations: ``ops.hybrid``). The
      ``int8_weights`` rewrite is ``weights="int8", int8_kernels="dequantize"``.

    ``weight_jitter`` (a validator calibration variant, fp16 / bf16 weights):
    each weight is rounded from its value moved by a pseudo-random +-1 unit
    roundoff, so about half land on the other neighbour. A converter stores
    folded constants (``fp16(W * gamma)`` of a LayerNorm folded into the next
    layer, scalar products) where refsd rounds each tensor alone: a correct
    deployment's fp16 weights may each be the other neighbour (measured: the
    tiny text encoder's fp16 export is 1.1e-3 from refsd's per-tensor rounding).
    """

    ops: Any = None
    rewrites: Rewrites = dataclasses.field(default_factory=Rewrites)
    precision: Precision = dataclasses.field(default_factory=Precision)
    gelu_approximate: str = "none"
    weights_f16: bool = False
    weights: str = "fp32"
    int8_kernels: str = "dequantize"
    int8_values: Mapping[str, Mapping[str, Any]] | None = dataclasses.field(default=None, compare=False)
    weight_jitter: bool = False

    @classmethod
    def make(cls, *, ops=None, rewrites="none", precision="f32", gelu_approximate: str = "none",
             weights_f16: bool = False, weights: str = "fp32", int8_kernels: str = "dequantize",
             int8_values: Mapping | None = None, weight_jitter: bool = False, **rewrite_params) -> "ModelOptions":
        if ops is None:
            import refsd.ops as ops  # noqa: PLC0415 (the default namespace)
        p = precision if isinstance(precision, Precision) else Precision(precision)
        if gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got {gelu_approximate!r}")
        if weights_f16 and not p.storage16:
            raise ValueError(f"weights_f16 needs an fp16-storage precision mode (f32_f16 or f16), not {p.mode}")
        if weights not in WEIGHT_STORAGE:
            raise ValueError(f"unknown weights {weights!r}: expected one of {', '.join(WEIGHT_STORAGE)}")
        if int8_kernels not in INT8_KERNELS:
            raise ValueError(f"unknown int8_kernels {int8_kernels!r}: expected one of {', '.join(INT8_KERNELS)}")
        rw = Rewrites.parse(rewrites, **rewrite_params)
        if "int8_weights" in rw:
            if weights not in ("fp32", "int8"):
                raise ValueError(f"rewrite int8_weights stores weights as int8; it contradicts weights={weights!r}")
            weights = "int8"
        if int8_values is not None:
            if weights != "int8":
                raise ValueError(f"int8_values given with weights={weights!r}: they need weights='int8'")
            bad = sorted(set(int8_values) - {"text_encoder", "unet", "vae"})
            if bad:
                raise ValueError(f"int8_values: unknown component {bad[0]!r} (expected text_encoder, unet, vae)")
        if weight_jitter and weights not in ("fp16", "bf16"):
            raise ValueError(f"weight_jitter moves fp16 / bf16 weights; weights={weights!r} has none")
        return cls(ops, rw, p, gelu_approximate, weights_f16, weights, int8_kernels, int8_values, weight_jitter)


def _jitter(arr: np.ndarray, u: float) -> np.ndarray:
    """``arr * (1 + s u)`` with a fixed pseudo-random sign ``s`` per element (see ``weight_jitter``)."""
    signs = np.random.default_rng(arr.size).integers(0, 2, arr.size, dtype=np.int8).reshape(arr.shape)
    return (arr * np.where(signs == 1, np.float32(1 + u), np.float32(1 - u))).astype(np.float32)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    u = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    return u.view(np.float32)


# ---------------------------------------------------------------- modules


@dataclass(frozen=True)
class ParamSpec:
    """A declared tensor: its shape *in the checkpoint* and how it is stored.

    ``layout``: ``linear`` (out, in), kept; ``conv`` (O, I, KH, KW), stored HWIO;
    ``vector`` / ``embedding``, kept; ``buffer``: accepted, shape-checked and
    ignored (``position_ids``). ``optional`` tensors may be absent.
    ``alt_shapes``: other accepted checkpoint shapes (legacy layouts)."""

    shape: tuple
    layout: str
    optional: bool = False
    alt_shapes: tuple = ()


class Module:
    """Base of every layer and block. Subclasses declare parameters with
    ``self.declare`` and children as attributes, and implement ``forward``."""

    def __init__(self) -> None:
        self._specs: dict[str, ParamSpec] = {}
        self._name = ""
        self._opts: ModelOptions | None = None

    # -- declaration and traversal

    def declare(self, name: str, shape, layout: str, *, optional: bool = False, alt_shapes=()) -> None:
        assert layout in ("linear", "conv", "vector", "embedding", "buffer"), layout
        self._specs[name] = ParamSpec(tuple(int(s) for s in shape), layout, optional,
                                      tuple(tuple(s) for s in alt_shapes))
        setattr(self, name, None)

    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        for key, value in vars(self).items():
            if key.startswith("_"):
                continue
            if isinstance(value, Module):
                yield key, value
            elif isinstance(value, (list, tuple)) and any(isinstance(m, Module) for m in value):
                for i, m in enumerate(value):
                    if isinstance(m, Module):
                        yield f"{key}.{i}", m

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def _param_table(self) -> dict[str, tuple["Module", str, ParamSpec]]:
        table = {}
        for path, mod in self.named_modules():
            for pname, spec in mod._specs.items():
                table[f"{path}.{pname}" if path else pname] = (mod, pname, spec)
        return table

    def parameter_specs(self) -> list[tuple[str, ParamSpec]]:
        """(checkpoint key, ``ParamSpec``) of every declared tensor, buffers included."""
        return [(k, spec) for k, (_, _, spec) in self._param_table().items()]

    def named_parameter_shapes(self) -> list[tuple[str, tuple]]:
        """(checkpoint key, checkpoint shape) of every parameter, in model order
        (buffers and optional tensors excluded)."""
        return [(k, spec.shape) for k, (_, _, spec) in self._param_table().items()
                if spec.layout != "buffer" and not spec.optional]

    def named_parameters(self) -> Iterator[tuple[str, np.ndarray]]:
        """(checkpoint key, array as stored in the model: conv weights HWIO)."""
        for k, (mod, pname, spec) in self._param_table().items():
            value = getattr(mod, pname)
            if spec.layout != "buffer" and value is not None:
                yield k, value

    # -- running

    @property
    def opts(self) -> ModelOptions:
        if self._opts is None:
            raise RuntimeError(f"{type(self).__name__} is not part of a root model (no options bound)")
        return self._opts

    @property
    def ops(self):
        return self.opts.ops

    @property
    def rewrites(self) -> Rewrites:
        return self.opts.rewrites

    def __call__(self, *args, **kwargs):
        with scope(self._name) as path:
            out = self.forward(*args, **kwargs)
        record(path, out)
        return out

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- loading

    def _remap_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Hook for checkpoint dialects (legacy key names); default: none."""
        return state

    def load_state_dict(self, state: Mapping[str, Any], *, source: str | None = None) -> None:
        """Load a flat {key: array} strictly. One ``WeightsError`` lists every
        missing key, unexpected key and shape mismatch (``source`` names the
        checkpoint in the message)."""
        state = self._remap_state(dict(state))
        table = self._param_table()
        missing = [k for k, (_, _, spec) in table.items() if k not in state and not spec.optional]
        unexpected = sorted(k for k in state if k not in table)
        mismatched = []
        for k, (_, _, spec) in table.items():
            if k in state:
                shape = tuple(np.shape(state[k]))
                if shape != spec.shape and shape not in spec.alt_shapes:
                    mismatched.append((k, shape, spec.shape))
        if missing or unexpected or mismatched:
            raise WeightsError(_mismatch_message(type(self).__name__, source, missing, unexpected, mismatched))
        for k, (mod, pname, spec) in table.items():
            if k in state and spec.layout != "buffer":
                mod._set_param(pname, state[k], spec)
                if not np.may_share_memory(getattr(mod, pname), state[k]):
                    _drop_mapped_pages(state[k])

    def _set_param(self, name: str, value, spec: ParamSpec) -> None:
        arr = _as_float32(value)
        if spec.layout == "conv":
            arr = np.ascontiguousarray(arr.transpose(2, 3, 1, 0))  # OIHW -> HWIO
        elif spec.layout == "linear" and arr.ndim == 4:
            arr = arr.reshape(arr.shape[:2])  # legacy 1x1-conv-shaped linear
        setattr(self, name, self._store(arr, name))

    def _store(self, arr: np.ndarray, name: str = "") -> np.ndarray:
        """A float32 parameter as the model holds it: rounded once to fp16 / bf16
        under ``weights="fp16"`` / ``"bf16"`` (nearest even, subnormals kept, as
        the converter rounds), then to fp16 in fp16-storage modes (registered
        with ``mark_stored``); read-only."""
        stored_as = self.opts.weights
        if stored_as in ("fp16", "bf16") and self.opts.weight_jitter:
            arr = _jitter(arr, U_F16 if stored_as == "fp16" else 2.0**-8)
        if stored_as == "fp16":
            arr = round_f16(arr)
        elif stored_as == "bf16":
            arr = round_bf16(arr)
        p = self.opts.precision
        if p.storage16:
            return mark_stored(arr, ftz=p.ftz, f16=self.opts.weights_f16)
        if arr.flags.writeable:
            arr = arr.view()
            arr.flags.writeable = False
        return arr


def _drop_mapped_pages(src: np.ndarray) -> None:
    """Once a model holds its own converted copy of a memory-mapped checkpoint
    tensor, drop the tensor's mapped pages: pages a process has read count in
    its RSS while mapped, so a converting load (conv transposes, fp16
    rounding) would otherwise peak at checkpoint size + model size. The page
    cache keeps them; a later read of a neighbouring tensor just faults again."""
    base = src
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, mmap.mmap) or not src.flags.c_contiguous or src.nbytes == 0:
        return
    page = mmap.PAGESIZE
    origin = np.frombuffer(base, np.uint8, count=1).ctypes.data
    lo = (src.ctypes.data - origin) // page * page
    hi = min(len(base), -(-(src.ctypes.data - origin + src.nbytes) // page) * page)
    base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _as_float32(value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == np.float32:
        return arr
    if arr.dtype.kind != "f":
        raise WeightsError(f"expected a floating-point tensor, got dtype {arr.dtype}")
    return arr.astype(np.float32)


def _mismatch_message(model: str, source, missing, unexpected, mismatched, limit: int = 25) -> str:
    def listing(items):
        items = list(items)
        shown = items[:limit]
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return "".join(f"\n    {s}" for s in shown) + more

    lines = [f"{source or 'checkpoint'} does not match {model}:"]
    if missing:
        lines.append(f"  {len(missing)} missing key{'s' * (len(missing) != 1)}:{listing(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key{'s' * (len(unexpected) != 1)}:{listing(unexpected)}")
    if mismatched:
        rows = [f"{k}: checkpoint {tuple(a)}, model expects {tuple(b)}" for k, a, b in mismatched]
        lines.append(f"  {len(mismatched)} shape mismatch{'es' * (len(mismatched) != 1)}:{listing(rows)}")
    if missing and unexpected:
        lines.append("  (missing and unexpected keys together usually mean a config.json that does not "
                     "belong to these weights, or a different checkpoint dialect)")
    return "\n".join(lines)


class RootModel(Module):
    """A loadable model (text encoder, UNet, VAE): owns the options, names
    the module tree, and runs its entry points under its precision mode and
    its root scope (``text_encoder``, ``unet``, ``vae``)."""

    def _finish(self, name: str, options: ModelOptions) -> None:
        self._name = name
        self._opts = options
        for path, mod in self.named_modules():
            mod._opts = options
            mod._path = path
            for cname, child in mod.named_children():
                child._name = cname

    def load_state_dict(self, state: Mapping[str, Any], *, source: str | None = None) -> None:
        """``Module.load_state_dict``, then ``deploy``."""
        super().load_state_dict(state, source=source)
        self.deploy()

    def deploy(self) -> None:
        """Make the loaded weights those deployed: prune (rewrite ``prune``:
        ``refsd.models.prune`` with the rewrite's amount and minimum), then int8
        storage (``ModelOptions.weights``): each weight quantized, or given by
        ``int8_values`` for this component (every key must name an int8-capable
        weight of the right shape: a ``WeightsError`` lists those that do not)."""
        rw = self.rewrites
        if "prune" in rw:
            from refsd.models.prune import prune  # noqa: PLC0415 (prune builds on this module)

            prune(self, amount=rw.prune_amount, min_weights=rw.prune_min_weights)
        values = dict((self.opts.int8_values or {}).get(self._name, {}))
        layers = {f"{path}.weight": mod for path, mod in self.named_modules() if isinstance(mod, _DeployedWeight)}
        unknown = sorted(set(values) - set(layers))
        if unknown:
            raise WeightsError(f"int8_values for {self._name}: {len(unknown)} key(s) name no Linear, Conv2d or "
                               f"Embedding weight: {', '.join(unknown[:10])}")
        norms = dict(self.named_modules())
        for mod in norms.values():
            if isinstance(mod, LayerNorm):
                mod.affine_folded = False
        for key, mod in layers.items():
            mod.deploy(values.get(key), given=bool(values))
            fold = mod.int8.fold if mod.int8 is not None else None
            if fold is not None:
                if not isinstance(norms.get(fold), LayerNorm):
                    raise WeightsError(f"int8_values for {self._name}: {key} folds {fold!r}, not a LayerNorm")
                norms[fold].affine_folded = True

    @property
    def precision(self) -> Precision:
        return self.opts.precision

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with _precision(self.opts.precision), scope(self._name):
            yield

    def __call__(self, *args, **kwargs):
        with self.running():
            out = self.forward(*args, **kwargs)
        record(self._name, out)
        return out

    def run_graph(self, *inputs):
        """``graph(*inputs)`` under the model's precision and root scope, its
        output recorded: what calling the model does after its NumPy input
        checks, for an executor whose tensors are not NumPy arrays (``refsd.export``)."""
        with self.running():
            out = self.graph(*inputs)
        record(self._name, out)
        return out

    def parameter_count(self) -> int:
        return int(sum(np.prod(s) for _, s in self.named_parameter_shapes()))


# ---------------------------------------------------------------- layers


class _DeployedWeight(Module):
    """A layer whose ``weight`` may be deployed as int8 (``ModelOptions.weights``):
    Linear and Conv2d (per output channel, axis ``_axis`` of the stored weight)
    and Embedding (per tensor). ``int8`` holds the deployed ``Int8Weight`` or None.

    Under ``weights="int8"`` a weight large enough to be quantized is kept as
    loaded, float32 (not rounded to fp16 in fp16-storage modes): the converter
    quantizes the float32 checkpoint, so refsd does too."""

    _axis: int | None = 0

    def __init__(self) -> None:
        super().__init__()
        self.int8: Int8Weight | None = None

    def _int8_eligible(self, arr: np.ndarray) -> bool:
        return arr.size >= INT8_MIN_ELEMENTS

    def _store(self, arr: np.ndarray, name: str = "") -> np.ndarray:
        if name == "weight" and self.opts.weights == "int8" and self._int8_eligible(arr):
            arr = arr.view()
            arr.flags.writeable = False
            return arr
        return super()._store(arr, name)

    def deploy(self, value=None, *, given: bool = False) -> None:
        """Set ``int8`` from ``value`` (an ``Int8Weight`` or ``(q, scale)`` in
        refsd's layout, checked against the weight), or quantize the weight with
        ``ops.quantize_int8`` when it is eligible and no values were ``given`` for
        the model; nothing unless ``weights="int8"``."""
        self.int8 = None
        if self.opts.weights != "int8" or self.weight is None:
            return
        if value is None:
            if given and self._int8_eligible(self.weight):
                # The deployed model keeps this eligible weight float: store it as floats are stored.
                self.weight = super()._store(self.weight)
            if given or not self._int8_eligible(self.weight):
                return
            value = Int8Weight(*self.ops.quantize_int8(self.weight, axis=self._axis))
        value = value if isinstance(value, Int8Weight) else Int8Weight(*value)
        q, scale = self._own_layout(np.asarray(value.q)), np.asarray(value.scale, np.float32)
        want = (1,) if self._axis is None else (self.weight.shape[self._axis],)
        if q.dtype != np.int8 or q.shape != self.weight.shape or not self._scales_fit(scale, want):
            raise WeightsError(f"{self._path}.weight: int8 values {q.dtype} {q.shape} with scales {scale.shape} do "
                               f"not match the weight {self.weight.shape} (scales {want})")
        self.int8 = value._replace(q=q, scale=scale)

    def _scales_fit(self, scale: np.ndarray, want: tuple) -> bool:
        return scale.shape in (want, (1,))

    def _own_layout(self, q: np.ndarray) -> np.ndarray:
        return q

    def _bias(self):
        """The bias as deployed: the converter's folded one where a LayerNorm was folded in."""
        d = self.int8
        return self.bias if d is None or d.bias is None else np.asarray(d.bias, np.float32)

    def _hybrid(self) -> bool:
        return self.int8 is not None and self.opts.int8_kernels == "hybrid"

    def effective_weight(self):
        """The weight a float kernel uses: ``ops.dequantize_int8`` at use, or the float weight."""
        d = self.int8
        if d is None:
            return self.weight
        return self.ops.dequantize_int8(d.q, d.scale, axis=None if d.scale.shape == (1,) else self._axis)


class Linear(_DeployedWeight):
    """``torch.nn.Linear``: weight (out, in). ``fc_as_conv`` runs it as a 1x1
    Conv2D on (N, L, C) inputs. int8 weights (``ModelOptions.weights``):
    dequantized at use, or LiteRT CPU's hybrid FULLY_CONNECTED
    (``ops.linear_hybrid_int8``; ``ops.fc_as_conv_hybrid_int8`` under
    ``fc_as_conv``, where the graph has a hybrid CONV_2D)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, alt_shapes=()) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.declare("weight", (out_features, in_features), "linear", alt_shapes=alt_shapes)
        if bias:
            self.declare("bias", (out_features,), "vector")
        else:
            self.bias = None

    def _own_layout(self, q: np.ndarray) -> np.ndarray:
        # A 1x1 conv HWIO (1, 1, in, out): the weight of an FC exported as a conv (fc_as_conv).
        return np.ascontiguousarray(q[0, 0].T) if q.ndim == 4 and q.shape[:2] == (1, 1) else q

    def forward(self, x: np.ndarray) -> np.ndarray:
        ops, b = self.ops, self._bias()
        as_conv = "fc_as_conv" in self.rewrites and np.ndim(x) == 3
        if self._hybrid():
            d = self.int8
            if as_conv:
                return ops.fc_as_conv_hybrid_int8(x, d.q, d.scale, b)
            return ops.linear_hybrid_int8(x, d.q, d.scale, b, asymmetric=d.asymmetric)
        w = self.effective_weight()
        if as_conv:
            return ops.fc_as_conv(x, w, b)
        return ops.linear(x, w, b)


class Conv2d(_DeployedWeight):
    """``torch.nn.Conv2d`` on NHWC activations, weights stored HWIO.

    Rewrites: ``serial_conv`` when the per-image activation exceeds the limit,
    else ``winograd`` for 3x3 stride-1. int8 weights: dequantized at use, or
    LiteRT CPU's hybrid CONV_2D (``ops.conv2d_hybrid_int8``, which replaces
    ``winograd``). A conv split over input channels has int8 scales per part,
    (parts, Cout), as the converter quantizes each part's weight on its own
    (read from the .tflite, or quantized here from the float weight), and runs
    ``ops.serial_conv_hybrid_int8`` under hybrid kernels; an output split keeps
    the whole conv's per-channel scales and, hybrid, equals one conv (every
    part quantizes the same input). ``in_keep`` (set by ``prune``) selects the
    input channels kept."""

    _axis = -1

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding=0, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.declare("weight", (out_channels, in_channels, kernel_size, kernel_size), "conv")
        if bias:
            self.declare("bias", (out_channels,), "vector")
        else:
            self.bias = None
        self.in_keep: np.ndarray | None = None

    def _set_param(self, name, value, spec) -> None:
        if name == "weight":
            self.in_keep = None  # a fresh, unpruned weight
        super()._set_param(name, value, spec)

    def _scales_fit(self, scale: np.ndarray, want: tuple) -> bool:
        parts = scale.shape[0] if scale.ndim == 2 else 0
        return super()._scales_fit(scale, want) or (parts > 1 and scale.shape[1:] == want
                                                     and self.weight.shape[2] % parts == 0)

    def deploy(self, value=None, *, given: bool = False) -> None:
        super().deploy(value, given=given)
        self._parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _int8_split(self, factor: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, scales (factor, Cout)) of the input split into ``factor`` parts: the
        deployed per-part scales, or each part of the float weight quantized on its
        own (``ops.quantize_int8``, cached), as the converter quantizes the parts."""
        d = self.int8
        if d.scale.ndim == 2:
            if d.scale.shape[0] != factor:
                raise ValueError(f"{self._path}: the deployed weights are split in {d.scale.shape[0]} parts, "
                                 f"serial_conv splits this conv in {factor} (serial_conv_limit differs?)")
            return d.q, d.scale
        if factor not in self._parts:
            c = self.weight.shape[2] // factor
            split = [self.ops.quantize_int8(self.weight[:, :, i * c:(i + 1) * c], axis=-1) for i in range(factor)]
            self._parts[factor] = (np.concatenate([q for q, _ in split], axis=2), np.stack([s for _, s in split]))
        return self._parts[factor]

    def effective_weight(self):
        d = self.int8
        return self._dequantized_split(d.q, d.scale) if d is not None and d.scale.ndim == 2 else super().effective_weight()

    def _dequantized_split(self, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
        c = q.shape[2] // scale.shape[0]
        return np.concatenate([self.ops.dequantize_int8(q[:, :, i * c:(i + 1) * c], s, axis=-1)
                               for i, s in enumerate(scale)], axis=2)

    def serial_factor(self, x_shape) -> tuple[int, str]:
        """(factor, axis) ``serial_conv`` would use for this input: factor 1 if
        within the limit or if no split of either axis can meet it."""
        rw = self.rewrites
        w_shape = (self.kernel_size, self.kernel_size, x_shape[-1], self.out_channels)
        one = (1,) + tuple(x_shape[1:])  # the limit is per image
        axes = (rw.serial_conv_axis,) + tuple(a for a in ("input", "output") if a != rw.serial_conv_axis)
        for axis in axes:
            try:
                k = self.ops.serial_conv_factor(one, w_shape, limit=rw.serial_conv_limit, axis=axis,
                                                stride=self.stride, padding=self.padding)
            except ValueError:
                continue
            return k, axis
        return 1, rw.serial_conv_axis

    def forward(self, x: np.ndarray) -> np.ndarray:
        if self.in_keep is not None:
            x = x[..., self.in_keep]
        b, ops, rw, d = self._bias(), self.ops, self.rewrites, self.int8
        k, axis = self.serial_factor(np.shape(x)) if "serial_conv" in rw else (1, None)
        split_int8 = d is not None and (d.scale.ndim == 2 or (k > 1 and axis == "input"))
        if self._hybrid():
            if split_int8:
                q, scale = self._int8_split(k)
                return ops.serial_conv_hybrid_int8(x, q, scale, b, stride=self.stride, padding=self.padding)
            return ops.conv2d_hybrid_int8(x, d.q, d.scale, b, stride=self.stride, padding=self.padding)
        w = self._dequantized_split(*self._int8_split(k)) if split_int8 else self.effective_weight()
        if k > 1:
            return ops.serial_conv(x, w, b, factor=k, axis=axis, stride=self.stride, padding=self.padding)
        if "winograd" in rw and self.kernel_size == 3 and self.stride == 1:
            return ops.conv2d_winograd(x, w, b, padding=self.padding, tile=rw.winograd_tile)
        return ops.conv2d(x, w, b, stride=self.stride, padding=self.padding)


class GroupNorm(Module):
    """``torch.nn.GroupNorm`` on NHWC; ``gn4d`` / ``group_norm_fused`` rewrites."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_groups} groups do not divide {num_channels} channels")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.declare("weight", (num_channels,), "vector")
        self.declare("bias", (num_channels,), "vector")

    def forward(self, x: np.ndarray) -> np.ndarray:
        rw = self.rewrites
        fn = self.ops.group_norm
        if "gn4d" in rw:
            fn = self.ops.gn4d
        elif "group_norm_fused" in rw:
            fn = self.ops.group_norm_fused
        return fn(x, self.weight, self.bias, num_groups=self.num_groups, eps=self.eps)


class LayerNorm(Module):
    """``torch.nn.LayerNorm`` over the last axis."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.declare("weight", (dim,), "vector")
        self.declare("bias", (dim,), "vector")
        # Set by ``RootModel.deploy`` when the deployed graph folded this affine into the next
        # layer's int8 weights (``Int8Weight.fold``): the output is then the normalized input.
        self.affine_folded = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        if self.affine_folded:
            return self.ops.layer_norm(x, None, None, eps=self.eps)
        return self.ops.layer_norm(x, self.weight, self.bias, eps=self.eps)


class Embedding(_DeployedWeight):
    """``torch.nn.Embedding``: a (num, dim) table looked up by integer ids.

    int8 weights: the converter quantizes a table looked up by runtime ids per
    tensor (GATHER on int8, then DEQUANTIZE: the rows as float32 ``q * scale``);
    a lookup of constant ids (``constant_ids``, CLIP's positions) is folded into
    a float constant instead. The dequantized table is computed once at deploy."""

    _axis = None

    def __init__(self, num_embeddings: int, dim: int, *, constant_ids: bool = False) -> None:
        super().__init__()
        self.num_embeddings, self.dim, self.constant_ids = num_embeddings, dim, constant_ids
        self.declare("weight", (num_embeddings, dim), "embedding")
        self._table = None

    def _int8_eligible(self, arr: np.ndarray) -> bool:
        return not self.constant_ids and super()._int8_eligible(arr)

    def deploy(self, value=None, *, given: bool = False) -> None:
        super().deploy(value, given=given)
        d = self.int8
        self._table = None if d is None else Module._store(self, d.q.astype(np.float32) * d.scale)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        return self.ops.embedding(ids, self.weight if self._table is None else self._table)


def gelu_op(module: Module, *, gated: bool, approximate: str | None = None):
    """The GELU (or GEGLU gate) a module runs, by rewrite and approximation
    (``approximate`` fixed by the checkpoint, else the model option): ``f(x)``."""
    ops, rw = module.ops, module.rewrites
    approx = approximate or module.opts.gelu_approximate
    if "gelu_clip" in rw:
        fn = ops.geglu_clip if gated else ops.gelu_clip
        return lambda x: fn(x, M=rw.gelu_clip_M)
    if "gelu_fused" in rw:
        fn = ops.geglu_fused if gated else ops.gelu_fused
        return lambda x: fn(x, approximate=approx)
    fn = ops.geglu if gated else ops.gelu
    return lambda x: fn(x, approximate=approx)


def attention_op(module: Module):
    """The attention op a module runs, by rewrite: ``f(q, k, v, **kw)``."""
    ops, rw = module.ops, module.rewrites
    if "flash_attention" in rw:
        return lambda q, k, v, **kw: ops.flash_attention(q, k, v, tile=rw.flash_tile, **kw)
    if "softmax_partial_fused" in rw:
        return ops.softmax_partial_fused
    return ops.attention


def activation(module: Module, name: str, fn, x: np.ndarray) -> np.ndarray:
    """Run a parameterless activation under ``scope(name)`` (the attribute
    name diffusers gives it: ``nonlinearity``, ``conv_act``, ``act``)."""
    with scope(name):
        return fn(x)


# ---------------------------------------------------------------- configs


def config_from_dict(cls, d: Mapping[str, Any], *, required: tuple[str, ...] = (), source: str = "config"):
    """A frozen config dataclass from a ``config.json`` dict: keys the
    dataclass does not have are ignored, ``required`` keys must be present,
    lists become tuples."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{source}: missing required key{'s' * (len(missing) != 1)} {', '.join(missing)}")
    check_schema(d, config_schema(cls), source)
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: _freeze(v) for k, v in d.items() if k in names}
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def _freeze(v):
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def read_config(path: str | os.PathLike) -> dict:
    """A JSON object from a config file, read strictly (``refsd.safe_io.read_json``)."""
    doc = read_json(path, error=WeightsError)
    if not isinstance(doc, dict):
        raise WeightsError(f"{path}: expected a JSON object, got a JSON {type(doc).__name__}")
    return doc
