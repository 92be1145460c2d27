"""Rounding budgets: how far two computations of one op may differ, one table per mode.

An element passes when ``|a - b| <= budget * u * scale + floor``:

``u``       unit roundoff of the mode's storage: 2**-24 (f32), 2**-11 (f16 storage).
``scale``   the componentwise magnitude of the computation. For multilinear ops
            (conv, linear, matmul, attention's P V) it is ``sum |x| |w|``, the
            classical forward-error scale; ``assert_rewrite_equivalent`` gets it
            by running the original op on ``|inputs|`` in float32, and never
            lets it fall below ``|y|``.
``budget``  how many roundings of size ``u * scale`` the two computations may
            differ by. Each fp16 rounding of a tensor bounded by ``scale``
            contributes at most ``u * scale``; a reordered float32 sum of K
            terms at most ``K u scale`` on each side (Higham, Thm 3.1).
``floor``   fp16's subnormal spacing (2**-24), or its smallest normal (2**-14)
            under flush-to-zero, since values below it are not representable.

Defaults per mode, each with its reason; ``OVERRIDES`` names the rewrites whose
budget is derived differently.
"""

from __future__ import annotations

import math

from refsd.numerics import FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, MODES, Precision

UNIT_ROUNDOFF = {mode: Precision(mode).unit_roundoff for mode in MODES}  # refsd.numerics defines u

BUDGET = {
    # Reassociated float32 sums: 2 K u scale is the worst case; 256 covers K <= 128
    # worst-case and far longer sums in practice (errors grow like sqrt(K)).
    "f32": 256,
    # Identical fp16 inputs; each side rounds its output once (2) and may store a
    # few more fp16 intermediates (serial partials, P in attention): 8.
    "f32_f16": 8,
    # Blocked fp16 accumulation: one rounding per block and per running-sum add,
    # plus ~10 primitive roundings: 32 covers K <= 8 blocks (K <= 256 at block 32).
    "f16": 32,
}


def serial_conv_budget(mode: str, factor: int) -> int:
    """Input serialization stores ``factor`` partial outputs and ``factor - 1``
    running sums in fp16: ``2 factor`` extra roundings of magnitude <= scale."""
    return BUDGET[mode] + 2 * factor


def blocked_budget(k: int, block: int, primitives: int = 12) -> int:
    """f16 budget for a K-term accumulation on each side: two roundings per
    block (partial, running sum), both sides, plus primitive roundings."""
    return 2 * 2 * math.ceil(k / block) + primitives


def winograd_budget(mode: str, tile: int) -> int:
    """Winograd's rounding errors are bounded against ``winograd_error_scale``
    (the transforms' absolute values applied to ``|x|``, ``|w|``); per stored
    stage (V, U, M, output: 4) plus the direct conv's own rounding."""
    return {"f32": 64, "f32_f16": 8, "f16": 32}[mode] + (4 if tile == 4 else 2)


OVERRIDES = {
    "serial_conv": "serial_conv_budget(mode, factor): input serialization rounds every partial",
    "conv2d_winograd": "winograd_budget(mode, tile) against winograd_error_scale, not sum |x||w|",
    # Not the scale |x - mean| / std: the error of the mean shifts every centred value, also where
    # x ~ mean. Not the default |group_norm(|x|)| either: it fails even in f32 when beta cancels
    # gamma * y_n (y ~ 0, error ~ u |beta|). Derivation: tests/test_rewrites.py, _gn_scale.
    "group_norm_fused": "every mode: the original's statistics carry (blocked-)sum error amplified by "
    "kappa = mean_g|x| / std_g; scale |gamma| (1 + kappa) (1 + |x - mean| / std) + |beta|, "
    "budget BUDGET[mode] in f32 / f32_f16 and blocked_budget(H*W*C/G, block) in f16",
}


def floor(mode: str, ftz: bool) -> float:
    """The default floor: one fp16 rounding of the compared outputs below the normal range."""
    if mode == "f32":
        return 0.0
    return FP16_MIN_NORMAL if ftz else FP16_MIN_SUBNORMAL


def flush_floor(mode: str, ftz: bool, roundings: int) -> float:
    """Floor for ``roundings`` fp16 roundings that may each land below fp16's normal
    range: each loses up to 2**-14 under flush-to-zero (half the subnormal spacing,
    2**-25, without), an absolute error that ``u * scale`` does not cover when the
    rounded intermediate is small. ``floor`` counts one; a rewrite that stores
    several intermediates (serial partial outputs) needs this, passed as
    ``assert_rewrite_equivalent(..., floor=...)``. Never below ``floor``."""
    if mode == "f32":
        return 0.0
    return max(floor(mode, ftz), roundings * (FP16_MIN_NORMAL if ftz else FP16_MIN_SUBNORMAL / 2))
