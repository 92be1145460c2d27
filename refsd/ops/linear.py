"""Fully connected layers and the FullyConnected-as-Conv2D rewrite."""

from __future__ import annotations

import numpy as np

from refsd.numerics import current_precision
from refsd.ops._core import load, matmul, matmul_split, op, param, prim, store
from refsd.ops.conv import conv2d


def _check_linear(x: np.ndarray, w: np.ndarray, b) -> None:
    if w.ndim != 2:
        raise ValueError(f"linear expects weights (out_features, in_features), got shape {w.shape}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features, weights expect {w.shape[1]}")
    if b is not None and np.shape(b) != (w.shape[0],):
        raise ValueError(f"linear: bias shape {np.shape(b)} does not match {w.shape[0]} output features")


@op
def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``y = x @ w.T + b`` with ``w`` of shape (out_features, in_features), as
    ``torch.nn.functional.linear``. Accumulates like ``conv2d`` (blocked in f16);
    a device model with ``fc_split_rows`` sums few rows as its kernel does
    (``matmul_split``: the time embedding's linears)."""
    x, w = load(x), param(w, "weight")
    _check_linear(x, w, b)
    x2 = x.reshape(-1, x.shape[-1])
    p = current_precision()
    device = p.device if p.math16 else None
    if device and device.fc_split_rows and x2.shape[0] <= device.fc_split_rows:
        y = matmul_split(x2, w.T, device.fc_split_threads)
    else:
        y = matmul(x2, w.T)
    y = y.reshape(*x.shape[:-1], w.shape[0])
    if b is not None:
        y = prim(np.add(y, param(b, "bias"), out=y), "bias_add")  # y is this op's own fresh array
    return store(y)


@op
def fc_as_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """FullyConnected on (N, L, C) as Reshape -> 1x1 Conv2D -> Reshape
    (Choi et al. 2023, Fig. 1a): the same sums in the same order as ``linear``,
    but a graph the GPU delegate accepts for large L (e.g. 1x4096x320)."""
    x, w = load(x), param(w, "weight")
    _check_linear(x, w, b)
    if x.ndim != 3:
        raise ValueError(f"fc_as_conv expects (N, L, C) input, got shape {x.shape}")
    n, length, c = x.shape
    y = conv2d(x.reshape(n, length, 1, c), w.T.reshape(1, 1, c, w.shape[0]), b)
    return store(y.reshape(n, length, w.shape[0]))
