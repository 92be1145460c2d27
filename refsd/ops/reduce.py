"""Standalone reductions, TFLite's SUM and MEAN (``tf.reduce_sum``,
``tf.reduce_mean``), which a graph may hold outside any normalization."""

from __future__ import annotations

import numpy as np

from refsd.ops import _core
from refsd.ops._core import kernel_out, load, op, store


def _axes(x: np.ndarray, axis) -> tuple[int, ...]:
    axes = (axis,) if np.isscalar(axis) else tuple(axis)
    for a in axes:
        if not -x.ndim <= a < x.ndim:
            raise ValueError(f"reduction axis {a} out of range for rank {x.ndim}")
    return tuple(sorted(a % x.ndim for a in axes))


@op
def reduce_sum(x: np.ndarray, *, axis) -> np.ndarray:
    """``sum(x, axis)`` with the reduced axes kept (size 1).

    ``f32_f16``: float32 accumulation, the result rounded. ``f16``: the blocked
    model; a sum past 65504 overflows to inf. ``litert-gpu``: a float32
    accumulator truncated to fp16, so a sum past 65504 saturates (measured: the
    sum of 4096 values of ~30 comes back as 65504, not inf)."""
    x = load(x)
    return store(kernel_out(_core.reduce_sum(x, _axes(x, axis), keepdims=True), "sum"))


@op
def reduce_mean(x: np.ndarray, *, axis) -> np.ndarray:
    """``mean(x, axis)`` with the reduced axes kept. ``f16``: the blocked sum
    (which can overflow although the mean cannot) divided by n; ``litert-gpu``:
    the float32 mean truncated to fp16 (measured bit-identical)."""
    x = load(x)
    return store(_core.reduce_mean(x, _axes(x, axis)))
