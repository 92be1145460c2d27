"""``assert_rewrite_equivalent``: does a rewritten op compute what the
original does, to within the rounding error the precision mode allows?"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from refsd.numerics import precision
from refsd.testing.rounding_budgets import BUDGET, UNIT_ROUNDOFF
from refsd.testing.rounding_budgets import floor as default_floor


@dataclass(frozen=True)
class Comparison:
    """What the comparison found; ``needed_budget`` is the smallest budget that passes."""

    mode: str
    budget: float
    max_abs_err: float
    max_rel_err: float
    worst_index: tuple
    needed_budget: float
    passed: bool


class RewriteMismatch(AssertionError):
    pass


def _abs_inputs(inputs):
    return [np.abs(a) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in inputs]


def compare(original: Callable, rewritten: Callable, *inputs, mode: str = "f32", ftz: bool = False,
            block: int = 32, budget: float | None = None, scale=None,
            floor: float | None = None) -> tuple[Comparison, str]:
    budget = BUDGET[mode] if budget is None else budget
    with precision(mode, ftz=ftz, block=block):
        a = np.asarray(original(*inputs), dtype=np.float32)
        b = np.asarray(rewritten(*inputs), dtype=np.float32)
    if a.shape != b.shape:
        raise RewriteMismatch(f"rewrite changes the output shape: original {a.shape}, rewritten {b.shape}")
    # Non-finite values are not tolerated away: they must agree exactly.
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    inf_mismatch = (np.isinf(a) | np.isinf(b)) & (a != b) & ~(nan_a | nan_b)
    if (nan_a != nan_b).any() or inf_mismatch.any():
        bad = np.argwhere((nan_a != nan_b) | inf_mismatch)[0]
        idx = tuple(int(i) for i in bad)
        raise RewriteMismatch(
            f"[{mode}] inf/NaN differ: original {a[idx]} vs rewritten {b[idx]} at index {idx} "
            f"({int((nan_a != nan_b).sum() + inf_mismatch.sum())} elements); no tolerance covers this"
        )
    if scale is None:
        with precision("f32"):
            s = np.abs(np.asarray(original(*_abs_inputs(inputs)), dtype=np.float32))
        s = np.where(np.isfinite(s), s, 0)
    else:
        s = np.broadcast_to(np.asarray(scale, dtype=np.float32), a.shape)
    finite = np.isfinite(a) & np.isfinite(b)
    a0, b0 = np.where(finite, a, 0).astype(np.float64), np.where(finite, b, 0).astype(np.float64)
    s = np.maximum(np.maximum(s, np.abs(a0)), np.abs(b0))
    u, fl = UNIT_ROUNDOFF[mode], (default_floor(mode, ftz) if floor is None else float(floor))
    err = np.abs(a0 - b0)
    tol = budget * u * s + fl
    excess = np.where(err > fl, (err - fl) / np.maximum(u * s, np.finfo(np.float64).tiny), 0.0)
    needed = float(excess.max()) if excess.size else 0.0
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(err)), err.shape)) if err.size else ()
    rel = err / np.maximum(np.abs(a0), np.finfo(np.float32).tiny)
    c = Comparison(mode, budget, float(err.max(initial=0)), float(rel.max(initial=0)), worst, needed,
                   bool((err <= tol).all()))
    fail_idx = tuple(int(i) for i in np.argwhere(err > tol)[0]) if not c.passed else worst
    msg = (
        f"[{mode}{', ftz' if ftz else ''}] rewrite differs from original: max |a-b| = {c.max_abs_err:.3g} at {worst}, "
        f"max rel = {c.max_rel_err:.3g}; first failing element {fail_idx}: original {a0[fail_idx]:.7g}, "
        f"rewritten {b0[fail_idx]:.7g}, scale {s[fail_idx]:.4g}, tolerance {tol[fail_idx]:.3g} "
        f"(budget {budget} x u={u:.3g} x scale + floor {fl:.3g}); it would pass with budget >= {needed:.1f}"
    )
    return c, msg


def assert_rewrite_equivalent(original: Callable, rewritten: Callable, *inputs, mode: str = "f32",
                              ftz: bool = False, block: int = 32, budget: float | None = None,
                              scale=None, floor: float | None = None) -> Comparison:
    """Run ``original(*inputs)`` and ``rewritten(*inputs)`` under precision
    ``mode`` and assert they agree element by element within
    ``budget * u * scale + floor`` (see ``refsd.testing.rounding_budgets``).

    ``scale`` defaults to ``|original(|inputs|)|`` in float32 (``sum |x||w|``
    for multilinear ops), never below ``|y|``. ``floor`` defaults to
    ``tolerance.floor(mode, ftz)`` (one rounding below fp16's normal range);
    ``tolerance.flush_floor`` gives it for several. inf and NaN must match exactly.
    On failure the message gives the max abs/rel error, where, and the budget
    that would have passed. Returns the ``Comparison`` on success.
    """
    c, msg = compare(original, rewritten, *inputs, mode=mode, ftz=ftz, block=block, budget=budget, scale=scale,
                     floor=floor)
    if not c.passed:
        raise RewriteMismatch(msg)
    return c
