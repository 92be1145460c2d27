"""Elementwise arithmetic between tensors (residual adds, scaling)."""

from __future__ import annotations

import numpy as np

from refsd.ops._core import const, load, op, store


@op
def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b`` (broadcasting), one fp32 add rounded to fp16 in fp16 modes."""
    return store(load(a) + load(b))


@op
def mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a * b`` (broadcasting), one fp32 multiply rounded to fp16 in fp16 modes."""
    return store(load(a) * load(b))


@op
def scale(x: np.ndarray, *, factor: float) -> np.ndarray:
    """``x * factor`` with ``factor`` a graph constant (stored fp16 in fp16 modes)."""
    return store(load(x) * const(factor, "factor"))
