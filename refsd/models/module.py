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
  (``ops._core.mark_stored``) so ops do not round it again.
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
from typing import Any, Iterator, Mapping

import numpy as np

from refsd.models.config_schema import config_schema
from refsd.models.rewrites import Rewrites
from refsd.monitor import record, scope
from refsd.numerics import Precision
from refsd.numerics import precision as _precision
from refsd.ops._core import mark_stored
from refsd.safe_io import check_schema, read_json


class WeightsError(ValueError):
    """A checkpoint that does not match the model (keys, shapes, format)."""


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class ModelOptions:
    """How a model runs, fixed at construction: op namespace, rewrites,
    precision mode, the GELU approximation of its GELU / GEGLU layers
    (``"none"`` = erf, as diffusers and transformers compute it), and
    ``weights_f16``: in fp16-storage modes, keep the (fp16-rounded) weights as
    float16 arrays, widened to float32 at each use: half the weight memory
    (the low-memory pipeline), same results, ~2 ns per weight per use."""

    ops: Any = None
    rewrites: Rewrites = dataclasses.field(default_factory=Rewrites)
    precision: Precision = dataclasses.field(default_factory=Precision)
    gelu_approximate: str = "none"
    weights_f16: bool = False

    @classmethod
    def make(cls, *, ops=None, rewrites="none", precision="f32", gelu_approximate: str = "none",
             weights_f16: bool = False, **rewrite_params) -> "ModelOptions":
        if ops is None:
            import refsd.ops as ops  # noqa: PLC0415 (the default namespace)
        p = precision if isinstance(precision, Precision) else Precision(precision)
        if gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got {gelu_approximate!r}")
        if weights_f16 and not p.storage16:
            raise ValueError(f"weights_f16 needs an fp16-storage precision mode (f32_f16 or f16), not {p.mode}")
        return cls(ops, Rewrites.parse(rewrites, **rewrite_params), p, gelu_approximate, weights_f16)


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
        p = self.opts.precision
        if p.storage16:
            arr = mark_stored(arr, ftz=p.ftz, f16=self.opts.weights_f16)
        elif arr.flags.writeable:
            arr = arr.view()
            arr.flags.writeable = False
        setattr(self, name, arr)


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
        for _, mod in self.named_modules():
            mod._opts = options
            for cname, child in mod.named_children():
                child._name = cname

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


class Linear(Module):
    """``torch.nn.Linear``: weight (out, in). ``fc_as_conv`` runs it as a 1x1
    Conv2D on (N, L, C) inputs; ``int8_weights`` dequantizes it at use."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, alt_shapes=()) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.declare("weight", (out_features, in_features), "linear", alt_shapes=alt_shapes)
        if bias:
            self.declare("bias", (out_features,), "vector")
        else:
            self.bias = None
        self.weight_q = self.weight_scale = None

    def _set_param(self, name, value, spec) -> None:
        super()._set_param(name, value, spec)
        if name == "weight":
            self.quantize()

    def quantize(self) -> None:
        """(Re)compute the int8 weights if ``int8_weights`` is on."""
        if "int8_weights" in self.rewrites and self.weight is not None:
            self.weight_q, self.weight_scale = self.ops.quantize_int8(self.weight, axis=0)

    def effective_weight(self) -> np.ndarray:
        if self.weight_q is not None:
            return self.ops.dequantize_int8(self.weight_q, self.weight_scale, axis=0)
        return self.weight

    def forward(self, x: np.ndarray) -> np.ndarray:
        w = self.effective_weight()
        if "fc_as_conv" in self.rewrites and np.ndim(x) == 3:
            return self.ops.fc_as_conv(x, w, self.bias)
        return self.ops.linear(x, w, self.bias)


class Conv2d(Module):
    """``torch.nn.Conv2d`` on NHWC activations, weights stored HWIO.

    Rewrites: ``serial_conv`` when the per-image activation exceeds the limit,
    else ``winograd`` for 3x3 stride-1; ``int8_weights`` dequantizes at use.
    ``in_keep`` (set by ``prune``) selects the input channels kept."""

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
        self.weight_q = self.weight_scale = None
        self.in_keep: np.ndarray | None = None

    def _set_param(self, name, value, spec) -> None:
        super()._set_param(name, value, spec)
        if name == "weight":
            self.quantize()

    def quantize(self) -> None:
        if "int8_weights" in self.rewrites and self.weight is not None:
            self.weight_q, self.weight_scale = self.ops.quantize_int8(self.weight, axis=-1)

    def effective_weight(self) -> np.ndarray:
        if self.weight_q is not None:
            return self.ops.dequantize_int8(self.weight_q, self.weight_scale, axis=-1)
        return self.weight

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
        w, b, ops, rw = self.effective_weight(), self.bias, self.ops, self.rewrites
        if "serial_conv" in rw:
            k, axis = self.serial_factor(np.shape(x))
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

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.ops.layer_norm(x, self.weight, self.bias, eps=self.eps)


class Embedding(Module):
    """``torch.nn.Embedding``: a (num, dim) table looked up by integer ids."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.declare("weight", (num_embeddings, dim), "embedding")

    def forward(self, ids: np.ndarray) -> np.ndarray:
        return self.ops.embedding(ids, self.weight)


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
