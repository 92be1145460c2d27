"""Symmetric per-output-channel int8 weights, dequantized to fp16 at use
(Choi et al. 2023, Sec. 3.4: mobile GPUs have no int8 matmul, so weights are
cast from int8 to fp16 before the computation)."""

from __future__ import annotations

import numpy as np

from refsd.numerics import current_precision, round_f16
from refsd.ops._core import op, store


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    axis = axis % ndim
    return tuple(i for i in range(ndim) if i != axis)


def quantize_int8(w: np.ndarray, *, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``scale_c = max|w_c| / 127`` per output channel ``c`` along ``axis``,
    ``q = clip(round(w / scale), -127, 127)`` as int8 (round half to even).
    An all-zero channel gets scale 1. Returns ``(q, scale)``, scale float32
    of shape ``(w.shape[axis],)``. Linear weights (out, in): axis 0; conv
    HWIO weights: axis -1."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 1:
        raise ValueError("quantize_int8 needs an array with an output-channel axis")
    if not np.isfinite(w).all():
        raise ValueError("quantize_int8: weights contain inf or NaN")
    red = _reduce_axes(w.ndim, axis)
    amax = np.max(np.abs(w), axis=red, keepdims=True) if red else np.abs(w)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale.reshape(-1)


@op
def dequantize_int8(q: np.ndarray, scale: np.ndarray, *, axis: int = 0) -> np.ndarray:
    """``w = fp16(q * scale_c)``: always rounded to fp16 (the device
    dequantizes to fp16 whatever the activation precision), flushed to zero
    under FTZ. The error against the float weights is at most
    ``(scale_c / 2 + u16 * |w|) * (1 + 2**-10)`` per element (the factor covers
    the float32 steps and ``u16 * scale_c / 2``) where ``q * scale_c`` is an fp16
    normal; below 2**-14 add fp16's floor, half the subnormal spacing (2**-25),
    or the flushed value itself (< 2**-14) under FTZ: a channel of tiny weights
    has ``scale_c`` finer than fp16 can store."""
    q = np.asarray(q)
    if q.dtype != np.int8:
        raise ValueError(f"dequantize_int8 expects int8 weights, got {q.dtype}")
    scale = np.asarray(scale, dtype=np.float32)
    axis = axis % q.ndim
    if scale.shape != (q.shape[axis],):
        raise ValueError(f"dequantize_int8: scale shape {scale.shape} does not match axis {axis} of {q.shape}")
    shape = [1] * q.ndim
    shape[axis] = -1
    return store(round_f16(q.astype(np.float32) * scale.reshape(shape), ftz=current_precision().ftz))
