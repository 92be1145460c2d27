"""Compiled passes of ``refsd.ops.activations.erf``: its float32 operations in
its order, fused into one pass before NumPy's ``exp`` and one after it.
``exp`` stays NumPy's: the definition calls NumPy's SIMD ``exp``, and a
compiled ``exp`` gives other bits. ``tests/test_kernels.py`` proves the same
bits as the definition.

The definition's about twenty NumPy passes per element become two compiled
passes and NumPy's ``exp``, the compiled ones on every thread. An input
holding a NaN is left to the definition: which NaN payload a float operation
returns is up to the compiler here, and up to x86 in NumPy.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from refsd.kernels.fp16 import _ABS, _SIGN, _bits, _float

CHUNK = 1 << 16
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)


@njit(inline="always")
def _t(z):
    """``t = 1 / (1 + z/2)`` as the definition: ``z * 0.5``, ``+ 1``, ``1 /``."""
    return _ONE / (z * _HALF + _ONE)


@njit(cache=True, nogil=True, parallel=True)
def _before_exp(x, y, c, nan):
    """``y = erfc_poly(t) - z * z`` (the argument of ``exp``) per element;
    ``nan[k]``: chunk ``k`` holds a NaN."""
    n = x.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        xs = x[k * CHUNK : min(k * CHUNK + CHUNK, n)]
        ys = y[k * CHUNK : min(k * CHUNK + CHUNK, n)]
        seen = False
        for i in range(xs.size):
            xi = xs[i]
            seen |= xi != xi
            z = abs(xi)
            t = _t(z)
            v = t * c[9] + c[8]
            v = v * t + c[7]
            v = v * t + c[6]
            v = v * t + c[5]
            v = v * t + c[4]
            v = v * t + c[3]
            v = v * t + c[2]
            v = v * t + c[1]
            v = v * t + c[0]
            ys[i] = v - z * z
        nan[k] = seen


@njit(cache=True, nogil=True, parallel=True)
def _after_exp(x, y, s):
    """``erf = sign(x) (1 - exp(...) t)``, or the Maclaurin series
    ``x * sum_n s_n (x^2)^n`` where ``|x| < 0.5``; ``y`` holds ``exp(...)``."""
    n = x.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        xs = x[k * CHUNK : min(k * CHUNK + CHUNK, n)]
        ys = y[k * CHUNK : min(k * CHUNK + CHUNK, n)]
        for i in range(xs.size):
            xi = xs[i]
            z = abs(xi)
            if z < _HALF:
                x2 = xi * xi
                v = s[6] * x2 + s[5]
                v = v * x2 + s[4]
                v = v * x2 + s[3]
                v = v * x2 + s[2]
                v = v * x2 + s[1]
                v = v * x2 + s[0]
                ys[i] = xi * v
            else:
                r = _ONE - ys[i] * _t(z)
                ys[i] = _float(np.uint32(np.uint32(_bits(r) & _ABS) | np.uint32(_bits(xi) & _SIGN)))


def erf(x: np.ndarray, coeffs: np.ndarray, series: np.ndarray) -> np.ndarray | None:
    """``activations.erf`` of the contiguous 1-D float32 ``x`` with its
    erfc fit ``coeffs`` (10, float32) and series ``series`` (7, float32);
    None when ``x`` holds a NaN (the caller runs the definition)."""
    y = np.empty_like(x)
    nan = np.zeros((x.size + CHUNK - 1) // CHUNK, np.bool_)
    _before_exp(x, y, coeffs, nan)
    if nan.any():
        return None
    np.exp(y, out=y)
    _after_exp(x, y, series)
    return y


def warm_up() -> None:
    x = np.linspace(-4, 4, 2 * CHUNK + 3, dtype=np.float32)
    erf(x, np.ones(10, np.float32), np.ones(7, np.float32))
