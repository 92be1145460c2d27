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
* Calling a child runs its ``forward`` under ``refsd.context.scope(<attribute
  name>)``: every op reports under its module path, e.g.
  ``unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2``.
* Ops are reached only through ``self.ops``, the namespace handed to the root
  model (``refsd.ops`` by default), so another executor can pass its own;
  which op a layer runs under the model's rewrites is chosen in
  ``refsd.models.rewrites``.

Beside it: ``refsd.models.options`` (``ModelOptions``), ``refsd.models.loading``
(the strict check and the conversion of checkpoint tensors),
``refsd.models.config`` (config dataclasses from ``config.json``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from refsd.context import record, scope
from refsd.models.loading import (
    ParamSpec,
    WeightsError,
    check_state,
    checkpoint_array,
    deployed_float,
    drop_mapped_pages,
    read_only,
    store_float,
)
from refsd.models.options import INT8_MIN_ELEMENTS, Int8Weight, ModelOptions
from refsd.models.prune import prune
from refsd.models.rewrites import (
    Rewrites,
    conv_hybrid_op,
    conv_op,
    group_norm_op,
    linear_hybrid_op,
    linear_op,
    norm_eps,
    serial_conv_split,
)
from refsd.numerics import Precision, current_settings, run_settings
from refsd.numerics import precision as _precision


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
            if self.rewrites.fix("fp32", path) is not None:
                # An fp32 sub-model: its inputs arrive as the fp16 graph stored them, and its
                # output is stored as fp16 by the ops that read it.
                with _precision("f32"):
                    out = self.forward(*args, **kwargs)
            else:
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
        state = self.check_state_dict(state, source=source)
        table = self._param_table()
        for k, (mod, pname, spec) in table.items():
            if k in state and spec.layout != "buffer":
                mod._set_param(pname, state[k], spec)
                if not np.may_share_memory(getattr(mod, pname), state[k]):
                    drop_mapped_pages(state[k])

    def check_state_dict(self, state: Mapping[str, Any], *, source: str | None = None) -> dict[str, Any]:
        """What ``load_state_dict`` refuses, checked without loading (nothing
        copied): returns the state in this model's key names."""
        state = self._remap_state(dict(state))
        table = self._param_table()
        check_state(type(self).__name__, {k: spec for k, (_, _, spec) in table.items()}, state, source)
        return state

    def _set_param(self, name: str, value, spec: ParamSpec) -> None:
        setattr(self, name, self._store(checkpoint_array(value, spec), name))

    def _store(self, arr: np.ndarray, name: str = "") -> np.ndarray:
        """A float32 parameter as the model holds it (``loading.store_float``);
        a module marked ``keep_deployed`` under a device model that folds it
        (``fold_norm_into_conv``) also keeps the value as deployed (``deployed``)."""
        if getattr(self, "keep_deployed", False):
            device = self.opts.precision.device
            if device is not None and device.fold_norm_into_conv and name:
                self.__dict__.setdefault("_deployed", {})[name] = read_only(deployed_float(arr, self.opts))
        return store_float(arr, self.opts)

    def deployed(self, name: str) -> np.ndarray | None:
        """Parameter ``name`` as the deployment stores it (float32, before the
        precision mode's rounding) where kept (``keep_deployed``), else as held."""
        kept = self.__dict__.get("_deployed", {})
        return kept[name] if name in kept else getattr(self, name)


class RootModel(Module):
    """A loadable model (text encoder, UNet, VAE): owns the options, names
    the module tree, and runs its entry points under its run settings and
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
        """The model's settings (``ModelOptions.settings``; a recording of the
        caller goes on) and its root scope."""
        with run_settings(self.opts.settings, recorder=current_settings().recorder), scope(self._name):
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
            return read_only(arr)
        return super()._store(arr, name)

    def _quantize(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(q, scale) of a float weight (or part of one) as the converter quantizes it:
        ``ops.quantize_int8`` per output channel (axis ``_axis``), or per tensor."""
        return self.ops.quantize_int8(w, axis=self._axis)

    def set_weight(self, arr: np.ndarray) -> None:
        """Replace the float weight (refsd's layout, e.g. a pruned one): stored as
        the loader stores a weight, then deployed again (re-quantized under
        ``weights="int8"``)."""
        self.weight = self._store(arr, "weight")
        self.deploy()

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
                self.weight = store_float(self.weight, self.opts)
            if given or not self._int8_eligible(self.weight):
                return
            value = Int8Weight(*self._quantize(self.weight))
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
        b = self._bias()
        if self._hybrid():
            return linear_hybrid_op(self, np.ndim(x))(x, self.int8, b)
        return linear_op(self, np.ndim(x))(x, self.effective_weight(), b)


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
            split = [self._quantize(self.weight[:, :, i * c:(i + 1) * c]) for i in range(factor)]
            self._parts[factor] = (np.concatenate([q for q, _ in split], axis=2), np.stack([s for _, s in split]))
        return self._parts[factor]

    def effective_weight(self):
        d = self.int8
        return self._dequantized_split(d.q, d.scale) if d is not None and d.scale.ndim == 2 else super().effective_weight()

    def _dequantized_split(self, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
        c = q.shape[2] // scale.shape[0]
        return np.concatenate([self.ops.dequantize_int8(q[:, :, i * c:(i + 1) * c], s, axis=-1)
                               for i, s in enumerate(scale)], axis=2)

    def prune_inputs(self, keep: np.ndarray) -> None:
        """Keep only the input channels ``keep`` (indices into the current
        weight's input channels; ``refsd.models.prune``): the weight loses the
        others and ``in_keep`` gathers the kept ones from the full input."""
        w = np.asarray(self.weight)
        base = np.arange(w.shape[2]) if self.in_keep is None else self.in_keep
        self.set_weight(np.ascontiguousarray(w[:, :, keep, :]))
        self.in_keep = base[keep]

    def can_fold(self) -> bool:
        """A per-input-channel affine before this conv can be folded into its
        float weight and bias (a 1x1 float conv, unpruned)."""
        return self.kernel_size == 1 and self.int8 is None and self.in_keep is None

    def _folded(self, scale: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) with ``x * scale + shift`` folded in, float32, from the
        values as deployed (``deployed``: a converter folds the .tflite's
        constants): ``w[.., i, o] * scale[i]`` and ``b[o] + sum_i shift[i] w[0, 0, i, o]``."""
        w = np.asarray(self.deployed("weight"), np.float32)
        s, t = np.asarray(scale, np.float32), np.asarray(shift, np.float32)
        bias = self.deployed("bias")
        b = np.zeros(w.shape[-1], np.float32) if bias is None else np.asarray(bias, np.float32)
        return w * s[:, None], b + t @ w[0, 0]

    def forward(self, x: np.ndarray, fold: tuple | None = None) -> np.ndarray:
        """``fold``: (scale, shift) of a per-channel affine the caller left out,
        folded into the weight and bias (``can_fold`` convs only), as LiteRT's
        GPU accelerator does to a GroupNorm's gamma and beta before a 1x1 conv."""
        if fold is not None:
            if not self.can_fold():
                raise ValueError(f"{self._path}: only a 1x1 float conv can take a folded affine")
            w, b = self._folded(*fold)
            return conv_op(self, 1, None)(x, w, b)
        if self.in_keep is not None:
            x = x[..., self.in_keep]
        b, d = self._bias(), self.int8
        k, axis = serial_conv_split(self, np.shape(x))
        split_int8 = d is not None and (d.scale.ndim == 2 or (k > 1 and axis == "input"))
        if self._hybrid():
            q, scale = self._int8_split(k) if split_int8 else (d.q, d.scale)
            return conv_hybrid_op(self, split_int8)(x, q, scale, b)
        w = self._dequantized_split(*self._int8_split(k)) if split_int8 else self.effective_weight()
        return conv_op(self, k, axis)(x, w, b)


class GroupNorm(Module):
    """``torch.nn.GroupNorm`` on NHWC; ``gn4d`` / ``group_norm_fused`` rewrites."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_groups} groups do not divide {num_channels} channels")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.declare("weight", (num_channels,), "vector")
        self.declare("bias", (num_channels,), "vector")

    def forward(self, x: np.ndarray, affine: bool = True) -> np.ndarray:
        """``affine=False``: without gamma and beta (folded into the next conv)."""
        fn = group_norm_op(self)
        w, b = (self.weight, self.bias) if affine else (None, None)
        return fn(x, w, b, num_groups=self.num_groups, eps=norm_eps(self))


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
        eps = norm_eps(self)
        if self.affine_folded:
            return self.ops.layer_norm(x, None, None, eps=eps)
        return self.ops.layer_norm(x, self.weight, self.bias, eps=eps)


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
        self._table = None if d is None else store_float(d.q.astype(np.float32) * d.scale, self.opts)

    def table(self) -> np.ndarray:
        """The table as looked up: the weight, or the dequantized int8 table."""
        return self.weight if self._table is None else self._table

    def forward(self, ids: np.ndarray) -> np.ndarray:
        return self.ops.embedding(ids, self.table())


def activation(module: Module, name: str, fn, x: np.ndarray) -> np.ndarray:
    """Run a parameterless activation under ``scope(name)`` (the attribute
    name diffusers gives it: ``nonlinearity``, ``conv_act``, ``act``)."""
    with scope(name):
        return fn(x)
