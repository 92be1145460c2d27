"""Which graph rewrites a model runs with, chosen at construction.

A rewrite set is a preset name, an explicit comma list, or a ``Rewrites``::

    Rewrites.parse("none")
    Rewrites.parse("paper")                       # Choi et al. 2023 (Squeezing ...)
    Rewrites.parse("google")                      # Chen et al. 2023 (Speed is all you need)
    Rewrites.parse("gn4d,fc_as_conv", serial_conv_limit=1 << 20)
    Rewrites.parse("paper,prune=0.25:30000")      # + pruning (amount 0.25, convs of >= 30000 weights)

Names and what a model does with them (``OPS``: the ops of ``refsd.ops`` each
rewrite runs, each beside the op it replaces there, ``refsd.ops.REWRITES``):

==========================  ==================================================================
``fc_as_conv``              every FullyConnected on (N, L, C) runs as Reshape -> 1x1 Conv2D -> Reshape
``serial_conv``             a Conv2D whose per-image activation exceeds ``serial_conv_limit``
                            elements runs input-serialized with the smallest factor that meets
                            the limit (``ops.serial_conv_factor``); output serialization if the
                            input split cannot; unchanged if neither can
``gn4d``                    GroupNorm with every tensor at rank <= 4
``gelu_clip``               tanh-GELU (and GEGLU's gate) with its input clipped to [-M, M]. It
                            rewrites *tanh*-GELU: on an erf-GELU model it also switches the
                            approximation, so compare it against ``gelu_approximate="tanh"``
``embedding_1d``            the text encoder's token lookup as one GATHER with 1-D indices (ids
                            flattened, rows reshaped back): the GPU delegate gathers only with 1-D
                            indices, so without it the text encoder never runs fully on the GPU
``int8_weights``            conv / linear weights symmetric per-output-channel int8,
                            dequantized at use (changes the model: measured, not equal). The same
                            implementation as ``ModelOptions.make(weights="int8",
                            int8_kernels="dequantize")``: the rewrite name is that option
``prune``                   structured L1-norm pruning of the input channels of large convs
                            (``refsd.models.prune``), applied by the loader after loading: it
                            changes the weights (measured, not equal). Token ``prune`` (amount
                            ``prune_amount`` 0.25, convs of >= ``prune_min_weights`` = 4M
                            weights), ``prune=AMOUNT`` or ``prune=AMOUNT:MIN_WEIGHTS``; ``str()``
                            writes the token back, so a bundle's rewrite string reproduces it
``softmax_partial_fused``   attention storing only the row max and row sum
``flash_attention``         tiled attention with online softmax (tile ``flash_tile``)
``winograd``                3x3 stride-1 convs by Winograd F(``winograd_tile`` x tile, 3x3)
``gelu_fused``              GELU / GEGLU as one float32 kernel (same approximation as the model)
``group_norm_fused``        GroupNorm as one float32 kernel
``KIND@PATH[=VALUE]``       a fix to one module and those under it (``refsd.models.fixes``:
                            ``gelu_clip``, ``eps``, ``mask``, ``gn_fused``, ``scale_qk``, ``fp32``), as
                            ``refsd fp16-fix`` writes them into a recipe
==========================  ==================================================================

Which op a layer runs is chosen here, in one place (``gelu_op``, ``attention_op``,
``linear_op``, ``group_norm_op``, ``embedding_op``, ``conv_op`` and the int8 hybrid
kernels' ``linear_hybrid_op`` / ``conv_hybrid_op``): the layers in
``refsd.models.module`` ask, and run what they are given.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

import numpy as np

from refsd.context import current_path
from refsd.models.fixes import Fix, find

# name -> preset membership is documented above; order here is the canonical print order.
NAMES = (
    "fc_as_conv", "serial_conv", "gn4d", "gelu_clip", "embedding_1d", "int8_weights", "prune",
    "softmax_partial_fused", "flash_attention", "winograd", "gelu_fused", "group_norm_fused",
)
# rewrite name -> the ops of ``refsd.ops`` it runs instead of the originals (``refsd.ops.REWRITES``
# maps each of these ops to the op it replaces). ``int8_weights`` and ``prune`` change weights, not ops.
OPS = {
    "fc_as_conv": ("fc_as_conv",),
    "serial_conv": ("serial_conv",),
    "gn4d": ("gn4d",),
    "gelu_clip": ("gelu_clip", "geglu_clip"),
    "embedding_1d": ("embedding_1d",),
    "int8_weights": (),
    "prune": (),
    "softmax_partial_fused": ("softmax_partial_fused",),
    "flash_attention": ("flash_attention",),
    "winograd": ("conv2d_winograd",),
    "gelu_fused": ("gelu_fused", "geglu_fused"),
    "group_norm_fused": ("group_norm_fused",),
}
PRESETS = {
    "none": (),
    # ``embedding_1d`` is not from the paper (it reports only UNet delegation): refsd adds it so
    # that a ``paper`` export runs all three components on the GPU.
    "paper": ("fc_as_conv", "serial_conv", "gn4d", "gelu_clip", "embedding_1d", "int8_weights"),
    "google": ("softmax_partial_fused", "winograd", "gelu_fused", "group_norm_fused"),
}
# Rewrites that compute the same function as the original graph (up to rounding):
# a model with any of these stays within the f32 bound of the plain model.
# ``gelu_clip`` is one against tanh-GELU; ``int8_weights`` and ``prune`` change the weights.
EQUIVALENCE = tuple(n for n in NAMES if n not in ("int8_weights", "prune"))
# Pairs that replace the same op: at most one of each.
EXCLUSIVE = (
    ("gn4d", "group_norm_fused"),
    ("softmax_partial_fused", "flash_attention"),
    ("gelu_clip", "gelu_fused"),
)

# Per-image activation limit (elements) for ``serial_conv``. The paper's conv that
# failed GPU delegation, 1x32x32x1920 -> 1x32x32x640, is 1.97 Mi elements at its
# input; 1.5 Mi sits below it. It is a proxy, not the delegate's real rule: SD 1.x /
# 2.x also run larger convs at 64x64 that the paper does not report failing (the
# up_blocks.2 upsampler conv, 64x64x640 = 2.5 Mi; up_blocks.3's first resnet conv on
# the 64x64x960 concat = 3.75 Mi), and this limit splits those too. Real delegate
# limits depend on the GPU and backend: set yours (``serial_conv_limit``).
DEFAULT_SERIAL_CONV_LIMIT = 1_572_864
# ``prune`` defaults: a quarter of the input channels of SD's largest convs (3x3 at 1280 channels,
# 14.7M weights, and the 1920/2560 -> 640/1280 convs of the up path).
DEFAULT_PRUNE_AMOUNT = 0.25
DEFAULT_PRUNE_MIN_WEIGHTS = 4_000_000


@dataclass(frozen=True)
class Rewrites:
    """A validated set of rewrite names plus their parameters."""

    names: frozenset = field(default_factory=frozenset)
    serial_conv_limit: int = DEFAULT_SERIAL_CONV_LIMIT
    serial_conv_axis: str = "input"
    winograd_tile: int = 4
    flash_tile: int = 64
    gelu_clip_M: float = 10.0
    prune_amount: float = DEFAULT_PRUNE_AMOUNT
    prune_min_weights: int = DEFAULT_PRUNE_MIN_WEIGHTS
    fixes: tuple = ()  # ``Fix``es, sorted

    def __post_init__(self) -> None:
        names = frozenset(self.names)
        object.__setattr__(self, "names", names)
        fixes = tuple(sorted({f if isinstance(f, Fix) else Fix.parse(str(f)) for f in self.fixes}))
        object.__setattr__(self, "fixes", fixes)
        for a, b in zip(fixes, fixes[1:]):
            if (a.kind, a.path) == (b.kind, b.path):
                raise ValueError(f"two {a.kind} fixes at {a.path}: {a} and {b}")
        unknown = sorted(names - set(NAMES))
        if unknown:
            raise ValueError(
                f"unknown rewrite{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"valid names: {', '.join(NAMES)}; presets: {', '.join(PRESETS)}"
            )
        for a, b in EXCLUSIVE:
            if a in names and b in names:
                raise ValueError(f"rewrites {a!r} and {b!r} replace the same op: choose one")
        if self.serial_conv_axis not in ("input", "output"):
            raise ValueError(f"serial_conv_axis must be 'input' or 'output', got {self.serial_conv_axis!r}")
        if not (isinstance(self.serial_conv_limit, int) and self.serial_conv_limit > 0):
            raise ValueError(f"serial_conv_limit must be a positive int, got {self.serial_conv_limit!r}")
        if self.winograd_tile not in (2, 4):
            raise ValueError(f"winograd_tile must be 2 or 4, got {self.winograd_tile!r}")
        if not (isinstance(self.flash_tile, int) and self.flash_tile > 0):
            raise ValueError(f"flash_tile must be a positive int, got {self.flash_tile!r}")
        if not self.gelu_clip_M > 0:
            raise ValueError(f"gelu_clip_M must be > 0, got {self.gelu_clip_M!r}")
        if not (isinstance(self.prune_amount, (int, float)) and 0 <= self.prune_amount < 1):
            raise ValueError(f"prune amount must lie in [0, 1), got {self.prune_amount!r}")
        if not (isinstance(self.prune_min_weights, int) and self.prune_min_weights >= 1):
            raise ValueError(f"prune_min_weights must be a positive int, got {self.prune_min_weights!r}")

    @classmethod
    def parse(cls, spec: "str | Iterable[str] | Rewrites | None" = "none", **params) -> "Rewrites":
        """``"none"`` / ``"paper"`` / ``"google"``, a comma list of names and
        presets (``"google,fc_as_conv"``), an iterable of names, or a ``Rewrites``
        (``params`` then override its parameters). ``prune=AMOUNT[:MIN_WEIGHTS]``
        sets ``prune_amount`` (and ``prune_min_weights``), ``serial_conv=LIMIT``
        ``serial_conv_limit``; ``str()`` writes both back, so a bundle's
        ``model.rewrites`` reproduces the deployment."""
        if isinstance(spec, Rewrites):
            return replace(spec, **params) if params else spec
        if spec is None:
            spec = "none"
        items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
        names: set[str] = set()
        fixes: list[Fix] = []
        for item in items:
            if not item:
                continue
            if "@" in item:
                fixes.append(Fix.parse(item))
            elif item in PRESETS:
                names.update(PRESETS[item])
            elif item.startswith("prune="):
                names.add("prune")
                params = {**_prune_params(item), **params}
            elif item.startswith("serial_conv="):
                names.add("serial_conv")
                params = {**_serial_conv_params(item), **params}
            else:
                names.add(item)
        if fixes:
            params = {"fixes": tuple(fixes) + tuple(params.pop("fixes", ())), **params}
        return cls(frozenset(names), **params)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __iter__(self):
        return (n for n in NAMES if n in self.names)

    def __str__(self) -> str:
        def token(n: str) -> str:
            if n == "serial_conv" and self.serial_conv_limit != DEFAULT_SERIAL_CONV_LIMIT:
                return f"serial_conv={self.serial_conv_limit}"  # the limit decides the splits: a deployment needs it
            if n != "prune":
                return n
            tail = f":{self.prune_min_weights}" if self.prune_min_weights != DEFAULT_PRUNE_MIN_WEIGHTS else ""
            return f"prune={self.prune_amount:g}{tail}"

        return ",".join([token(n) for n in self] + [str(f) for f in self.fixes]) or "none"

    def fix(self, kind: str, path: str | None = None) -> Fix | None:
        """The fix of ``kind`` that applies at module ``path`` (default: the current scope)."""
        if not self.fixes:
            return None
        return find(self.fixes, kind, current_path() if path is None else path)

    def without_fixes(self) -> "Rewrites":
        return replace(self, fixes=())


def _prune_params(item: str) -> dict:
    """``prune=AMOUNT[:MIN_WEIGHTS]`` -> rewrite parameters, or a one-line error naming the token."""
    amount, _, minimum = item[len("prune="):].partition(":")
    try:
        params = {"prune_amount": float(amount)}
        if minimum:
            params["prune_min_weights"] = int(minimum)
    except ValueError:
        raise ValueError(f"bad rewrite token {item!r}: expected prune=AMOUNT or prune=AMOUNT:MIN_WEIGHTS "
                         "(e.g. prune=0.25:4000000)") from None
    return params


def _serial_conv_params(item: str) -> dict:
    """``serial_conv=LIMIT`` -> ``serial_conv_limit``, or a one-line error naming the token."""
    try:
        return {"serial_conv_limit": int(item[len("serial_conv="):])}
    except ValueError:
        raise ValueError(f"bad rewrite token {item!r}: expected serial_conv=LIMIT (elements per image, "
                         "e.g. serial_conv=1572864)") from None


# ---------------------------------------------------------------- dispatch
# The op a layer runs, by its rewrites. ``module`` is a layer bound to a root model: these read
# ``module.ops``, ``module.rewrites``, ``module.opts`` and the layer's own attributes.


def gelu_op(module, *, gated: bool, approximate: str | None = None):
    """The GELU (or GEGLU gate) a module runs, by rewrite and approximation
    (``approximate`` fixed by the checkpoint, else the model option): ``f(x)``."""
    ops, rw = module.ops, module.rewrites
    approx = approximate or module.opts.gelu_approximate
    clip = rw.fix("gelu_clip")
    if clip is not None or "gelu_clip" in rw:
        fn = ops.geglu_clip if gated else ops.gelu_clip
        m = rw.gelu_clip_M if clip is None else clip.value
        return lambda x: fn(x, M=m)
    if "gelu_fused" in rw:
        fn = ops.geglu_fused if gated else ops.gelu_fused
        return lambda x: fn(x, approximate=approx)
    fn = ops.geglu if gated else ops.gelu
    return lambda x: fn(x, approximate=approx)


def attention_op(module):
    """The attention op a module runs, by rewrite and by the fixes at its path
    (``mask``: the additive mask's negative entries replaced by the fix's value;
    ``scale_qk``: ``q`` scaled before ``Q K^T``): ``f(q, k, v, **kw)``."""
    ops, rw = module.ops, module.rewrites
    if "flash_attention" in rw:
        fn = lambda q, k, v, **kw: ops.flash_attention(q, k, v, tile=rw.flash_tile, **kw)  # noqa: E731
    elif "softmax_partial_fused" in rw:
        fn = ops.softmax_partial_fused
    else:
        fn = ops.attention
    mask_fix, scale_qk = rw.fix("mask"), rw.fix("scale_qk")
    if mask_fix is None and scale_qk is None:
        return fn

    def fixed(q, k, v, *, heads: int = 1, mask=None, scale=None, **kw):
        if mask is not None and mask_fix is not None:
            mask = np.where(np.asarray(mask) < 0, np.float32(mask_fix.value), np.float32(0))
        if scale_qk is not None:
            d = q.shape[-1] // heads
            q = ops.scale(q, factor=float(d**-0.5 if scale is None else scale))
            scale = 1.0
        return fn(q, k, v, heads=heads, mask=mask, scale=scale, **kw)

    return fixed


def group_norm_op(module):
    """The GroupNorm op, by rewrite: ``f(x, weight, bias, *, num_groups, eps)``."""
    ops, rw = module.ops, module.rewrites
    if rw.fix("gn_fused") is not None:
        return ops.group_norm_fused
    if "gn4d" in rw:
        return ops.gn4d
    if "group_norm_fused" in rw:
        return ops.group_norm_fused
    return ops.group_norm


def norm_eps(module) -> float:
    """A GroupNorm's or LayerNorm's eps: the module's, or an ``eps`` fix's at its path."""
    fix = module.rewrites.fix("eps")
    return module.eps if fix is None else fix.value


def embedding_op(module):
    """The token lookup, by rewrite: ``f(ids, table)``."""
    return module.ops.embedding_1d if "embedding_1d" in module.rewrites else module.ops.embedding


def _fc_as_conv(module, ndim: int) -> bool:
    return "fc_as_conv" in module.rewrites and ndim == 3


def linear_op(module, ndim: int):
    """A Linear's float op on a rank-``ndim`` input (``fc_as_conv`` applies to (N, L, C)): ``f(x, w, b)``."""
    return module.ops.fc_as_conv if _fc_as_conv(module, ndim) else module.ops.linear


def linear_hybrid_op(module, ndim: int):
    """A Linear's int8 hybrid kernel (``int8_kernels="hybrid"``): ``f(x, Int8Weight, b)``; under
    ``fc_as_conv`` the hybrid CONV_2D the graph then has."""
    ops = module.ops
    if _fc_as_conv(module, ndim):
        return lambda x, d, b: ops.fc_as_conv_hybrid_int8(x, d.q, d.scale, b)
    return lambda x, d, b: ops.linear_hybrid_int8(x, d.q, d.scale, b, asymmetric=d.asymmetric)


def serial_conv_split(conv, x_shape) -> tuple[int, str | None]:
    """(factor, axis) a Conv2d runs input ``x_shape`` with: ``serial_conv`` with
    the smallest factor that meets ``serial_conv_limit`` per image (the preferred
    ``serial_conv_axis`` first, then the other), factor 1 if within the limit or
    if no split of either axis can meet it; ``(1, None)`` without ``serial_conv``."""
    rw = conv.rewrites
    if "serial_conv" not in rw:
        return 1, None
    w_shape = (conv.kernel_size, conv.kernel_size, x_shape[-1], conv.out_channels)
    one = (1,) + tuple(x_shape[1:])  # the limit is per image
    axes = (rw.serial_conv_axis,) + tuple(a for a in ("input", "output") if a != rw.serial_conv_axis)
    for axis in axes:
        try:
            k = conv.ops.serial_conv_factor(one, w_shape, limit=rw.serial_conv_limit, axis=axis,
                                            stride=conv.stride, padding=conv.padding)
        except ValueError:
            continue
        return k, axis
    return 1, rw.serial_conv_axis


def conv_op(conv, factor: int, axis: str | None):
    """A Conv2d's float op for the split ``serial_conv_split`` chose: ``serial_conv``
    when split, else ``winograd`` for 3x3 stride-1, else ``conv2d``: ``f(x, w, b)``."""
    ops, rw, stride, padding = conv.ops, conv.rewrites, conv.stride, conv.padding
    if factor > 1:
        return lambda x, w, b: ops.serial_conv(x, w, b, factor=factor, axis=axis, stride=stride, padding=padding)
    if "winograd" in rw and conv.kernel_size == 3 and stride == 1:
        return lambda x, w, b: ops.conv2d_winograd(x, w, b, padding=padding, tile=rw.winograd_tile)
    return lambda x, w, b: ops.conv2d(x, w, b, stride=stride, padding=padding)


def conv_hybrid_op(conv, split: bool):
    """A Conv2d's int8 hybrid kernel (which replaces ``winograd``): per-part
    scales (a conv the converter split over input channels) run
    ``serial_conv_hybrid_int8``, else ``conv2d_hybrid_int8``: ``f(x, q, scale, b)``."""
    ops, stride, padding = conv.ops, conv.stride, conv.padding
    fn = ops.serial_conv_hybrid_int8 if split else ops.conv2d_hybrid_int8
    return lambda x, q, scale, b: fn(x, q, scale, b, stride=stride, padding=padding)
