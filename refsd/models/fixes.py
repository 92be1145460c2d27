"""Per-module fp16 fixes: a change to one module of a model, at its module path.

A rewrite (``refsd.models.rewrites``) changes every layer of a kind; a fix
changes one module, where the exception monitor located a failure (``refsd
fp16-fix`` searches for them). Fixes travel as rewrite tokens
``KIND@PATH`` or ``KIND@PATH=VALUE``, so a ``Rewrites`` string, a bundle's
``model.rewrites`` and an export's ``refsd_export.json`` carry them like any
rewrite. The path is the module's full path as the monitor reports it
(``unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0``).

==============  ==============================  ==============================================
kind            module                          what it does (value)
==============  ==============================  ==============================================
``gelu_clip``   GELU / GEGLU (``ff.net.0``)     tanh-GELU with its input clipped to [-M, M] (M)
``eps``         GroupNorm / LayerNorm           the normalization's eps (eps)
``mask``        attention with an additive      the mask's negative entries (its new value)
                mask (CLIP's causal mask)
``gn_fused``    GroupNorm                       one kernel with float32 sums
                                                (``group_norm_fused``): the fp16 sum of squares
                                                cannot overflow; the exported graph is unchanged
                                                (LiteRT's GPU MEAN keeps float32 sums) (no value)
``scale_qk``    attention                       ``q`` scaled by ``1/sqrt(d)`` before ``Q K^T``
                                                (score scale 1): the product stays within fp16
                                                where the unscaled one overflows (no value)
``fp32``        any module                      the module and everything under it in float32
                                                (a separate fp32 sub-model or a CPU fallback on
                                                a GPU without per-op precision; no value)
==============  ==============================  ==============================================

A fix applies to the module at its path and to every module under it; where
two apply, the one with the longer path wins. So a deployment can declare its
converter's causal mask (``mask@text_encoder=-1e9``) and a fix replace it in
one layer (``mask@text_encoder.text_model.encoder.layers.0.self_attn=-1e4``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from refsd.numerics import FP16_MIN_NORMAL

# kind -> whether it takes a value
KINDS = {"gelu_clip": True, "eps": True, "mask": True, "gn_fused": False, "scale_qk": False, "fp32": False}


@dataclass(frozen=True, order=True)
class Fix:
    kind: str
    path: str
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fix kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if not self.path or any(not part for part in self.path.split(".")) or any(c in self.path for c in "@=, "):
            raise ValueError(f"fix {self.kind}: bad module path {self.path!r}")
        if KINDS[self.kind] != (self.value is not None):
            need = "needs a value" if KINDS[self.kind] else "takes no value"
            raise ValueError(f"fix {self.kind}@{self.path}: {need}")
        if self.value is not None:
            v = float(self.value)
            if not math.isfinite(v):
                raise ValueError(f"fix {self.kind}@{self.path}: value must be finite, got {self.value!r}")
            if self.kind == "gelu_clip" and not 0 < v <= 40:
                raise ValueError(f"fix gelu_clip@{self.path}: M must lie in (0, 40] (40**3 < 65504), got {v!r}")
            if self.kind == "eps" and not FP16_MIN_NORMAL <= v <= 1:
                raise ValueError(f"fix eps@{self.path}: eps must be a normal fp16 number in [2**-14, 1], got {v!r}")
            if self.kind == "mask" and not v < 0:
                raise ValueError(f"fix mask@{self.path}: the mask must be negative, got {v!r}")
            object.__setattr__(self, "value", v)

    @property
    def stage(self) -> str:
        """The component it changes (``text_encoder``, ``unet``, ``vae``): the path's first part."""
        return self.path.split(".", 1)[0]

    @classmethod
    def parse(cls, token: str) -> "Fix":
        kind, _, rest = token.partition("@")
        path, eq, value = rest.partition("=")
        try:
            v = float(value) if eq else None
        except ValueError:
            raise ValueError(f"bad fix token {token!r}: expected KIND@PATH or KIND@PATH=VALUE") from None
        return cls(kind.strip(), path.strip(), v)

    def __str__(self) -> str:
        return f"{self.kind}@{self.path}" + ("" if self.value is None else f"={self.value!r}")


def applies(fix: Fix, path: str) -> bool:
    return path == fix.path or path.startswith(fix.path + ".")


def find(fixes, kind: str, path: str) -> Fix | None:
    """The fix of ``kind`` that applies at module ``path`` (the longest such path), or None."""
    best = None
    for f in fixes:
        if f.kind == kind and applies(f, path) and (best is None or len(f.path) > len(best.path)):
            best = f
    return best
