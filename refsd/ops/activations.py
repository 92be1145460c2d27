"""Activations: SiLU, GELU (erf and tanh), QuickGELU, GEGLU, and the GELU
rewrites: input clipping (Choi et al. 2023) and a fused kernel (Chen et al. 2023).

Unfused tanh-GELU, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3)))``,
is eight kernels; in ``f16`` each rounds, and ``x**3`` overflows fp16 for
``|x| >= 40.3`` (41**3 = 68921 > 65504).

``litert-gpu`` (measured): TFLite's converter turns that unclipped pattern
into the GELU builtin, one kernel with no ``x**3`` tensor; the clipped form
stays unfused. The builtin's two forms are computed as the kernel does
(``gelu_erf_kernel``, ``gelu_tanh_kernel``; bit-identical to lavapipe on every
finite fp16 input). SiLU's exp is the kernel's ``exp2`` form
(``refsd.ops._core.exp``).
"""

from __future__ import annotations

import math

import numpy as np

from refsd import kernels
from refsd.numerics import current_precision, round_f16, truncate_f16
from refsd.ops._core import const, exp, kernel_out, load, op, prim, store
from refsd.ops.transcendental import perturb

SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))
_INV_SQRT2 = float(1.0 / np.sqrt(2.0))
GELU_COEFF = 0.044715
APPROXIMATIONS = ("none", "tanh")

# Numerical Recipes' erfc (Chebyshev fit), fractional error < 1.2e-7 for all x,
# vectorized without SciPy. Evaluated in float32 it adds up to ~8 ulp of 1
# near x = 0, where erf = 1 - erfc cancels (tests/test_ops_oracle.py::test_erf
# bounds it per x by a running error analysis of the Horner chain).
_ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
                0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277)
# 2/sqrt(pi) * (-1)^n / (n! (2n+1)), n = 0..6: erf's Maclaurin coefficients in x^2.
_ERF_SERIES = tuple(2.0 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(7))


# The same constants as the compiled passes take them (``refsd.kernels.erf``).
_ERFC_F32 = np.array(_ERFC_COEFFS, np.float32)
_SERIES_F32 = np.array(_ERF_SERIES, np.float32)

# Elements per chunk of ``erf``: its ~20 passes run on a chunk while it is in
# cache, in place, instead of allocating and streaming a full-size temporary
# per pass (a GEGLU gate at 64x64 latents is 10M elements): 2-3.5x faster, and
# bit for bit the same float32 operations.
_ERF_CHUNK = 1 << 14


def erf(x: np.ndarray) -> np.ndarray:
    """Error function in float32. For ``|x| < 0.5`` the Maclaurin series
    ``2/sqrt(pi) sum_n (-1)^n x^(2n+1) / (n! (2n+1))`` to n = 6 (truncation
    < 5e-10, so relative error is float32's own); elsewhere ``1 - erfc`` with
    Numerical Recipes' fit (absolute error < 1.1e-6 derived, ~5e-7 observed,
    where ``erf >= 0.52``)."""
    x = np.asarray(x, dtype=np.float32)
    flat = np.ascontiguousarray(x).reshape(-1)
    k = kernels.compiled_erf()
    if k is not None:
        out = k.erf(flat, _ERFC_F32, _SERIES_F32)
        if out is not None:
            return out.reshape(x.shape)
    out = np.empty_like(flat)
    n = min(flat.size, _ERF_CHUNK)
    z_buf, t_buf = np.empty(n, np.float32), np.empty(n, np.float32)
    one, half = np.float32(1.0), np.float32(0.5)
    for s0 in range(0, flat.size, _ERF_CHUNK):
        xc, y = flat[s0 : s0 + _ERF_CHUNK], out[s0 : s0 + _ERF_CHUNK]
        z, t = np.abs(xc, out=z_buf[: xc.size]), t_buf[: xc.size]
        np.multiply(z, half, out=t)
        t += one
        np.divide(one, t, out=t)  # t = 1 / (1 + z/2)
        np.multiply(t, np.float32(_ERFC_COEFFS[-1]), out=y)
        y += np.float32(_ERFC_COEFFS[-2])
        for c in reversed(_ERFC_COEFFS[:-2]):
            y *= t
            y += np.float32(c)
        small = z < half  # before z is overwritten by z * z
        np.multiply(z, z, out=z)
        y -= z
        np.exp(y, out=y)
        y *= t
        np.subtract(one, y, out=y)
        np.copysign(y, xc, out=y)
        if small.any():
            xs = xc[small]
            x2 = xs * xs
            series = np.float32(_ERF_SERIES[-1])
            for c in reversed(_ERF_SERIES[:-1]):
                series = series * x2 + np.float32(c)
            y[small] = xs * series
    return out.reshape(x.shape)


# The erf form of LiteRT's GPU GELU builtin: Abramowitz & Stegun 7.1.26 (the
# accelerator's shader template, ``{ // erf approximation``), in fp16.
_AS26 = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_AS26_P = 0.3275911
_LOG2E = np.float32(1.0 / np.log(2.0))


def gelu_erf_kernel(x: np.ndarray, ftz: bool = False) -> np.ndarray:
    """The GELU builtin (erf form) as LiteRT's GPU kernel computes it in fp16
    (float32 arrays of fp16 values in and out; measured on lavapipe,
    bit-identical on all 63488 finite fp16 inputs, ``tests/test_gpu_emulation.py``)::

        z = x * 0.70710678;  a = |z|;  t = 1 / (1 + p a)
        erf = sign(z) (1 - ((((a5 t + a4) t + a3) t + a2) t + a1) t exp(-a a))
        gelu = 0.5 x (1 + erf)

    every operation one fp16 rounding (no fused multiply-add), left to right,
    with three details of the shader compiler (Mesa's NIR on lavapipe) that
    the measurement pins: the float32 literals become fp16 constants by
    truncation (toward zero), as the device's float32 -> fp16 stores do;
    ``exp(v)`` is ``exp2(v * r16(log2 e))``, as the EXP op; and the constant
    is moved inward, ``exp(-a a) = exp2(-a r16(a r16(log2 e)))``. Intermediate
    infinities (``a log2 e`` past 65504 for ``|x| > 212``) are the kernel's own
    and harmless (``exp2(-inf) = 0``), so no monitor event is reported."""
    def h(v):
        return round_f16(np.asarray(v, np.float32), ftz=ftz)

    def c(v):
        return truncate_f16(np.float32(v))

    x = np.asarray(x, np.float32)
    z = h(x * c(_INV_SQRT2))
    a = np.abs(z)
    t = h(np.float32(1.0) / h(np.float32(1.0) + h(c(_AS26_P) * a)))
    poly = c(_AS26[4])
    for coeff in _AS26[3::-1]:
        poly = h(h(poly * t) + c(coeff))
    poly = h(poly * t)
    e = h(perturb(np.exp2(h(-a * h(a * round_f16(_LOG2E))))))
    erf = h(np.float32(1.0) - h(poly * e)) * np.sign(z)
    return h(h(np.float32(0.5) * x) * h(np.float32(1.0) + erf))


def gelu_tanh_kernel(x: np.ndarray) -> np.ndarray:
    """The GELU builtin (tanh form) as LiteRT's GPU kernel computes it: in
    float32 (the caller stores it, truncated: ``kernel_out``), with tanh as
    the shader compiler lowers it, ``(e^u - e^-u) / (e^u + e^-u)`` on ``u``
    clamped to [-10, 10] and ``e^u = exp2(u log2 e)`` (measured on lavapipe,
    bit-identical on every finite fp16 input once truncated)."""
    x = np.asarray(x, np.float32)
    u = np.float32(0.7978845608) * (x + np.float32(GELU_COEFF) * x * x * x)
    u = np.clip(u, np.float32(-10.0), np.float32(10.0))
    ep = perturb(np.exp2(u * _LOG2E))
    em = perturb(np.exp2(-u * _LOG2E))
    return np.float32(0.5) * x * (np.float32(1.0) + (ep - em) / (ep + em))


def _check_approximate(approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"gelu approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def _gelu_unfused(x: np.ndarray, approximate: str, clip: float | None = None) -> np.ndarray:
    p = current_precision()
    device = p.device if p.math16 else None
    if device and device.gelu_kernel and approximate == "none":
        return gelu_erf_kernel(x, p.ftz)  # the GELU builtin's fp16 kernel
    if device and device.gelu_builtin and approximate == "tanh" and clip is None:
        # The converter matches the unclipped pattern to the GELU builtin: one
        # float32 kernel, no x**3 tensor (measured: finite where x**3 overflows).
        return kernel_out(gelu_tanh_kernel(x) if device.gelu_kernel else gelu_f32(x, approximate), "gelu")
    if approximate == "none":
        e = prim(perturb(erf(prim(x * const(_INV_SQRT2, "inv_sqrt2"), "scale"))), "erf")
    else:
        g = x if clip is None else np.clip(x, -np.float32(clip), np.float32(clip))
        # The graph's two MULs; a device model rounds each (the generic f16 model, one pow3 primitive).
        cube = prim(prim(g * g, "square") * g, "pow3") if device else prim(g * g * g, "pow3")
        inner = prim(g + prim(cube * const(GELU_COEFF, "gelu_coeff"), "mul_coeff"), "add")
        e = prim(perturb(np.tanh(prim(inner * const(SQRT_2_OVER_PI, "sqrt_2_over_pi"), "mul_sqrt_2_over_pi"))), "tanh")
    y = prim(x * np.float32(0.5), "half") * prim(np.float32(1.0) + e, "add_one")
    # A device model rounds the product before GEGLU's gate multiplies it (a MUL of its own).
    return prim(y, "gelu") if device else y


def gelu_f32(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """GELU in plain float32 math (what a fused kernel computes in registers)."""
    if approximate == "none":
        return np.float32(0.5) * x * (np.float32(1.0) + erf(x * np.float32(_INV_SQRT2)))
    inner = np.float32(SQRT_2_OVER_PI) * (x + np.float32(GELU_COEFF) * x * x * x)
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))


@op
def gelu(x: np.ndarray, *, approximate: str = "none") -> np.ndarray:
    """GELU as ``torch.nn.functional.gelu``: ``0.5 x (1 + erf(x / sqrt 2))``,
    or the tanh approximation with ``approximate="tanh"``. Unfused."""
    _check_approximate(approximate)
    return store(_gelu_unfused(load(x), approximate))


@op
def gelu_clip(x: np.ndarray, *, M: float = 10.0) -> np.ndarray:
    """Numerically stable tanh-GELU (Choi et al. 2023, Sec. 3.2):
    ``0.5 x (1 + tanh(sqrt(2/pi) (g + 0.044715 g**3)))`` with ``g = clip(x, -M, M)``.
    For ``|x| > M`` (M >= 10) tanh has already saturated in fp32 and fp16, so
    the result equals tanh-GELU while ``g**3 <= M**3`` cannot overflow."""
    if not M > 0:
        raise ValueError(f"gelu_clip needs M > 0, got {M!r}")
    return store(_gelu_unfused(load(x), "tanh", clip=M))


@op
def gelu_fused(x: np.ndarray, *, approximate: str = "tanh") -> np.ndarray:
    """GELU as one kernel (Chen et al. 2023): float32 registers, only the
    output rounded in fp16 modes, so ``x**3`` never reaches memory or fp16."""
    _check_approximate(approximate)
    return store(gelu_f32(load(x), approximate))


@op
def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)`` with ``sigmoid(x) = 1 / (1 + exp(-x))``; in ``f16``
    ``exp(-x)`` overflows for x < -11.1 (harmlessly: the result is -0)."""
    x = load(x)
    e = exp(-x)
    return store(x * prim(np.float32(1.0) / prim(np.float32(1.0) + e, "add_one"), "reciprocal"))


@op
def quick_gelu(x: np.ndarray) -> np.ndarray:
    """CLIP's ``x * sigmoid(1.702 x)``."""
    x = load(x)
    z = prim(x * const(1.702, "quick_gelu_coeff"), "scale")
    e = exp(-z)
    return store(x * prim(np.float32(1.0) / prim(np.float32(1.0) + e, "add_one"), "reciprocal"))


def _split_geglu(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if h.shape[-1] % 2:
        raise ValueError(f"geglu expects an even last dimension (value, gate), got {h.shape[-1]}")
    half = h.shape[-1] // 2
    return h[..., :half], h[..., half:]


@op
def geglu(h: np.ndarray, *, approximate: str = "none") -> np.ndarray:
    """GEGLU gate on a projected tensor ``h = [a, g]`` (last axis halves):
    ``a * gelu(g)`` as diffusers' ``GEGLU`` after its ``proj`` linear."""
    _check_approximate(approximate)
    a, g = _split_geglu(load(h))
    return store(a * _gelu_unfused(g, approximate))


@op
def geglu_fused(h: np.ndarray, *, approximate: str = "tanh") -> np.ndarray:
    """``geglu`` with its GELU as one float32 kernel (``gelu_fused``)."""
    _check_approximate(approximate)
    a, g = _split_geglu(load(h))
    return store(a * gelu_f32(g, approximate))


@op
def geglu_clip(h: np.ndarray, *, M: float = 10.0) -> np.ndarray:
    """``geglu`` with ``gelu_clip``'s clipped tanh-GELU."""
    a, g = _split_geglu(load(h))
    return store(a * _gelu_unfused(g, "tanh", clip=M))
