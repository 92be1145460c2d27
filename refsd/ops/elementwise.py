"""Elementwise arithmetic between tensors (residual adds, scaling), and the
channel concatenation of skip connections."""

from __future__ import annotations

import numpy as np

from refsd.ops._core import const, exp as _exp, load, op, store


@op
def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b`` (broadcasting), one fp32 add rounded to fp16 in fp16 modes."""
    return store(load(a) + load(b))


@op
def mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a * b`` (broadcasting), one fp32 multiply rounded to fp16 in fp16 modes."""
    return store(load(a) * load(b))


@op
def exp(x: np.ndarray) -> np.ndarray:
    """``exp(x)``, rounded to fp16 in fp16 modes; overflows fp16 for x > 11.09.
    ``litert-gpu``: computed as ``exp2(r16(x * r16(log2 e)))`` like its kernel."""
    return store(_exp(load(x)))


@op
def scale(x: np.ndarray, *, factor: float) -> np.ndarray:
    """``x * factor`` with ``factor`` a graph constant (stored fp16 in fp16 modes)."""
    return store(load(x) * const(factor, "factor"))


@op
def concat(*arrays: np.ndarray, axis: int = -1) -> np.ndarray:
    """Concatenation along ``axis`` (the UNet's skip connections, channel axis
    of NHWC), as ``torch.cat``. Exact: the inputs are already stored tensors."""
    if not arrays:
        raise ValueError("concat needs at least one array")
    return store(np.concatenate([load(a) for a in arrays], axis=axis))
