"""int8 weights as TFLite's converter stores them, and their dequantization.

``quantize_int8`` reproduces the weights ``tf.lite.TFLiteConverter`` with
``Optimize.DEFAULT`` writes (dynamic-range quantization: symmetric, narrow
range [-127, 127], per output channel, zero point 0). ``dequantize_int8`` is
what a GPU delegate does with them (Choi et al. 2023, Sec. 3.4: mobile GPUs
have no int8 matmul, so weights are cast to float before the computation).
LiteRT's CPU kernels instead run *hybrid*: ``refsd.ops.hybrid``.
"""

from __future__ import annotations

import numpy as np

from refsd.ops._core import op, store


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    axis = axis % ndim
    return tuple(i for i in range(ndim) if i != axis)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, ties away from zero (C's ``round``, which
    ``TfLiteRound`` and MLIR's ``rmNearestTiesToAway`` use; ``np.rint`` ties
    to even). Exact for |x| < 2**52 in float64 and 2**23 in float32: adding
    0.5 to a value whose fraction is < 0.5 cannot carry past the integer."""
    r = np.trunc(x)
    frac = np.abs(x - r)  # exact (Sterbenz)
    return r + np.where(frac >= 0.5, np.sign(x), 0).astype(x.dtype)


def quantize_int8(w: np.ndarray, *, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``scale_c = float32(max|w_c| / 127)`` per output channel ``c`` along
    ``axis``, computed in float64 and stored as float32, and ``q =
    clip(round_half_away(w / scale_c), -127, 127)`` with the division in float64
    by the unrounded float64 scale: bit for bit what the TFLite converter's
    dynamic-range quantizer (MLIR, ``Optimize.DEFAULT``) writes, checked on the
    tiny models' exports (tests/test_deployed_weights.py; dividing in float32
    instead moved one VAE weight by a step). An all-zero channel gets scale 1
    and q 0 (its dequantized value, 0, is what matters). Returns ``(q, scale)``,
    scale float32 of shape ``(w.shape[axis],)``. Linear weights (out, in):
    axis 0; conv HWIO weights: axis -1; ``axis=None``: one per-tensor scale,
    shape (1,) (the converter's choice for a GATHER table)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 1:
        raise ValueError("quantize_int8 needs an array with an output-channel axis")
    if not np.isfinite(w).all():
        raise ValueError("quantize_int8: weights contain inf or NaN")
    red = tuple(range(w.ndim)) if axis is None else _reduce_axes(w.ndim, axis)
    amax = np.max(np.abs(w), axis=red, keepdims=True).astype(np.float64)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    q = np.clip(round_half_away(w.astype(np.float64) / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32).reshape(-1)


def _channel_shape(ndim: int, axis: int | None) -> list[int]:
    shape = [1] * ndim
    if axis is not None:
        shape[axis % ndim] = -1
    return shape


@op
def dequantize_int8(q: np.ndarray, scale: np.ndarray, *, axis: int | None = 0) -> np.ndarray:
    """``w = q * scale_c`` in float32, as a GPU delegate dequantizes int8
    weights at use; in fp16-storage modes the delegate holds them in fp16:
    ``fp16(q * scale_c)``, flushed to zero under FTZ. ``axis=None``: one
    per-tensor scale. In f32 the product is one float32 rounding (u32 |w|). In
    fp16-storage modes the error against the float weights is at most
    ``(scale_c / 2 + u16 * |w|) * (1 + 2**-10)`` per element (the factor covers
    the float32 steps and ``u16 * scale_c / 2``) where ``q * scale_c`` is an fp16
    normal; below 2**-14 add fp16's floor, half the subnormal spacing (2**-25),
    or the flushed value itself (< 2**-14) under FTZ: a channel of tiny weights
    has ``scale_c`` finer than fp16 can store."""
    q = np.asarray(q)
    if q.dtype != np.int8:
        raise ValueError(f"dequantize_int8 expects int8 weights, got {q.dtype}")
    scale = np.asarray(scale, dtype=np.float32)
    want = (1,) if axis is None else (q.shape[axis % q.ndim],)
    if scale.shape != want:
        raise ValueError(f"dequantize_int8: scale shape {scale.shape} does not match axis {axis} of {q.shape}")
    # store() is the fp16 rounding (and FTZ) in fp16-storage modes, nothing in f32.
    return store(q.astype(np.float32) * scale.reshape(_channel_shape(q.ndim, axis)))
