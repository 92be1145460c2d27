"""Normalizations: GroupNorm (as converters emit it), its broadcast-free rank-4
rewrite, a fused variant, and LayerNorm.

Unfused, in ``f16`` every primitive rounds: the mean (blocked sum / n), the
centred values, their squares, the blocked sum of squares, var + eps, rsqrt,
the normalized values, gamma and beta. The sum of squares is where a large
group overflows fp16 (64x64x10 elements of magnitude 2 already sum past 65504).
``eps`` is a graph constant: 1e-5 is subnormal in fp16 and flushes to zero on
FTZ hardware, so a constant group gives rsqrt(0) = inf and 0 * inf = NaN.

``litert-gpu`` (measured, bit-identical on the probes): the MEAN kernels
keep float32 sums, so the sums of squares cannot overflow; the mean is
truncated to fp16, the squares ``d * d`` are an fp16 tensor (MUL) that
overflows to inf where ``|x - mean| >= 256``; the second MEAN and the eps ADD
round once; LayerNorm is one float32 kernel, whose output is truncated when
stored, or rounded to nearest when gamma and beta follow (measured: they run
in the same kernel, in fp16, on the normalized value converted in registers).
"""

from __future__ import annotations

import numpy as np

from refsd.numerics import current_precision
from refsd.ops._core import const, kernel_out, load, op, param, prim, reduce_mean, reduce_sum, store
from refsd.ops.transcendental import perturb


def _check_gn(x: np.ndarray, gamma, beta, num_groups: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"group_norm expects NHWC input of rank 4, got shape {x.shape}")
    c = x.shape[-1]
    if num_groups < 1 or c % num_groups:
        raise ValueError(f"group_norm: {num_groups} groups do not divide {c} channels")
    for name, v in (("gamma", gamma), ("beta", beta)):
        if v is not None and np.shape(v) != (c,):
            raise ValueError(f"group_norm: {name} shape {np.shape(v)} does not match {c} channels")


def _normalize(xg: np.ndarray, axes: tuple[int, ...], eps) -> np.ndarray:
    """The unfused statistics and normalization over ``axes`` of ``xg``."""
    mean = reduce_mean(xg, axes)
    d = prim(xg - mean, "center")
    square = prim(d * d, "square")
    device = current_precision().device
    if device and device.linked_eps:  # one kernel: the float32 mean of squares plus eps, rounded once
        n = int(np.prod([xg.shape[a] for a in axes]))
        var_eps = prim(reduce_sum(square, axes, keepdims=True) / np.float32(n) + eps, "add_eps")
        inv = prim(perturb(np.float32(1.0) / prim(np.sqrt(var_eps), "sqrt")), "rsqrt")
    else:
        var = reduce_mean(square, axes, "variance")
        inv = prim(perturb(np.float32(1.0) / np.sqrt(prim(var + eps, "add_eps"))), "rsqrt")
    return prim(d * inv, "normalize")


def _affine(y: np.ndarray, gamma, beta) -> np.ndarray:
    if gamma is not None:
        y = prim(y * param(gamma, "gamma"), "scale")
    if beta is not None:
        y = y + param(beta, "beta")
    return y


@op
def group_norm(x: np.ndarray, gamma=None, beta=None, *, num_groups: int, eps: float = 1e-5) -> np.ndarray:
    """GroupNorm over NHWC as converters emit it: a 5-D reshape
    (N, H, W, G, C/G), statistics over (H, W, C/G) broadcast back.

    ``y = (x - mean_g) / sqrt(var_g + eps) * gamma + beta``, biased variance.
    """
    x = load(x)
    _check_gn(x, gamma, beta, num_groups)
    n, h, w, c = x.shape
    xg = x.reshape(n, h, w, num_groups, c // num_groups)  # rank 5: BroadcastTo on the GPU delegate
    y = _normalize(xg, (1, 2, 4), const(eps, "eps")).reshape(n, h, w, c)
    return store(_affine(y, gamma, beta))


@op
def gn4d(x: np.ndarray, gamma=None, beta=None, *, num_groups: int, eps: float = 1e-5) -> np.ndarray:
    """Broadcast-free GroupNorm (Choi et al. 2023, Fig. 7): every tensor has
    rank <= 4: (N, H*W, G, C/G), statistics over axes (1, 3). The reduction
    order is that of ``group_norm``, so results are identical in every mode."""
    x = load(x)
    _check_gn(x, gamma, beta, num_groups)
    n, h, w, c = x.shape
    xg = x.reshape(n, h * w, num_groups, c // num_groups)
    y = _normalize(xg, (1, 3), const(eps, "eps")).reshape(n, h, w, c)
    return store(_affine(y, gamma, beta))


@op
def group_norm_fused(x: np.ndarray, gamma=None, beta=None, *, num_groups: int, eps: float = 1e-5) -> np.ndarray:
    """GroupNorm as one kernel (Chen et al. 2023): statistics, normalization
    and affine in float32 registers, ``eps`` a float32 literal; only the output
    is rounded (fp16 modes). No intermediate can overflow fp16."""
    x = load(x)
    _check_gn(x, gamma, beta, num_groups)
    n, h, w, c = x.shape
    xg = x.reshape(n, h * w, num_groups, c // num_groups)
    mean = xg.mean(axis=(1, 3), keepdims=True, dtype=np.float32)
    d = xg - mean
    var = np.mean(d * d, axis=(1, 3), keepdims=True, dtype=np.float32)
    y = (d / np.sqrt(var + np.float32(eps))).reshape(n, h, w, c)
    if gamma is not None:
        y = y * param(gamma, "gamma")
    if beta is not None:
        y = y + param(beta, "beta")
    return store(y)


@op
def layer_norm(x: np.ndarray, gamma=None, beta=None, *, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * gamma + beta``.
    Same primitives as ``group_norm``, reduced over one axis. Under a device
    model with ``fused_layer_norm`` the normalization is one float32 kernel
    (two-pass mean and variance, float32 ``eps``) whose output is stored by
    ``kernel_out`` (truncated); with gamma or beta, the kernel converts it to
    fp16 in registers (to nearest: ``prim``) and applies them as fp16
    primitives (measured: ``layer_norm_affine`` probe, bit-identical)."""
    x = load(x)
    c = x.shape[-1]
    for name, v in (("gamma", gamma), ("beta", beta)):
        if v is not None and np.shape(v) != (c,):
            raise ValueError(f"layer_norm: {name} shape {np.shape(v)} does not match {c} features")
    device = current_precision().device
    if device and device.fused_layer_norm:
        mean = x.mean(axis=-1, keepdims=True, dtype=np.float32)
        d = x - mean
        var = np.mean(d * d, axis=-1, keepdims=True, dtype=np.float32)
        y = d / np.sqrt(var + np.float32(eps))
        y = prim(y, "normalize") if gamma is not None or beta is not None else kernel_out(y, "normalize")
    else:
        y = _normalize(x, (x.ndim - 1,), const(eps, "eps"))
    return store(_affine(y, gamma, beta))
