"""Which graph rewrites a model runs with, chosen at construction.

A rewrite set is a preset name, an explicit comma list, or a ``Rewrites``::

    Rewrites.parse("none")
    Rewrites.parse("paper")                       # Choi et al. 2023 (Squeezing ...)
    Rewrites.parse("google")                      # Chen et al. 2023 (Speed is all you need)
    Rewrites.parse("gn4d,fc_as_conv", serial_conv_limit=1 << 20)
    Rewrites.parse("paper,prune=0.25:30000")      # + pruning (amount 0.25, convs of >= 30000 weights)

Names and what a model does with them (each op beside the op it replaces in
``refsd.ops``):

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
==========================  ==================================================================

"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

# name -> preset membership is documented above; order here is the canonical print order.
NAMES = (
    "fc_as_conv", "serial_conv", "gn4d", "gelu_clip", "embedding_1d", "int8_weights", "prune",
    "softmax_partial_fused", "flash_attention", "winograd", "gelu_fused", "group_norm_fused",
)
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

    def __post_init__(self) -> None:
        names = frozenset(self.names)
        object.__setattr__(self, "names", names)
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
        for item in items:
            if not item:
                continue
            if item in PRESETS:
                names.update(PRESETS[item])
            elif item.startswith("prune="):
                names.add("prune")
                params = {**_prune_params(item), **params}
            elif item.startswith("serial_conv="):
                names.add("serial_conv")
                params = {**_serial_conv_params(item), **params}
            else:
                names.add(item)
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

        return ",".join(token(n) for n in self) or "none"


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
