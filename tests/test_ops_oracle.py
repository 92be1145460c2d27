"""The op table: every op against a float64 straight-line oracle (JAX
``lax_reference`` style), in every precision mode, with tolerances derived from
rounding error rather than guessed.

An element passes when ``|got - oracle| <= budget * u * scale + budget * floor``:

``u``       unit roundoff of the mode: 2**-24 in ``f32``, 2**-11 in ``f32_f16`` / ``f16``
            (fp16 has 11 significant bits).
``scale``   the componentwise magnitude of the computation, computed in float64
            next to the oracle: for multilinear ops the oracle on absolute values
            (``sum |x||w| + |b|``), for elementwise ops ``max(|x|, |y|)``; each op
            below says which.
``budget``  how many roundings of size ``u * scale`` the op may commit (first order).
``floor``   2**-25 per rounding in fp16 modes: half of fp16's subnormal spacing,
            the absolute error a rounding can make below 2**-14 (0 in ``f32``).

Inputs are small, seeded and fp16-representable (``round_f16`` first), so the
comparison measures the op, not the rounding of its inputs. Besides the bound,
every fp16-storage output must be fp16-representable. The tolerance that would
have passed (``max err / (u * scale)``) is printed on failure (Polygraphy style).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from refsd import ops
from refsd.monitor import monitoring
from refsd.numerics import U_F16, U_F32, precision, round_f16

# ======================================================================= tolerance table

U = {"f32": U_F32, "f32_f16": U_F16, "f16": U_F16}
FLOOR = {"f32": 0.0, "f32_f16": 2.0**-25, "f16": 2.0**-25}
R32 = U_F32 / U_F16  # a float32 rounding measured in fp16 units (2**-13)


@dataclass(frozen=True)
class Ctx:
    """What a budget may depend on: the accumulation length and the f16 block."""

    K: int = 1
    block: int = 32

    @property
    def nb(self) -> int:  # blocks in the f16 blocked model
        return math.ceil(self.K / self.block)


# Defaults. f32: a few float32 roundings plus NumPy's float32 exp/tanh/sin (<= ~2 ulp)
# and refsd.ops.erf (<= ~8 ulp absolute). f32_f16: float32 math (negligible: < 2**-13
# u16 per float32 rounding) and one fp16 rounding of the output, plus an fp16-stored
# constant. f16: every primitive rounds; see the per-op derivations.
DEFAULT = {"f32": 8, "f32_f16": 2, "f16": 8}

# op -> mode -> budget (a number, or a function of Ctx). Missing modes use DEFAULT.
TOL = {
    "add": {m: 1 for m in U},  # fp32 add of two fp16 (or fp32) values, correctly rounded: 1 rounding of |y|
    "mul": {m: 1 for m in U},  # product of fp16 values is exact in fp32: 1 rounding of |y|
    "scale": {m: 2 for m in U},  # the factor stored as a float32 / fp16 constant (1) + the product (1), scale |x*f|
    "upsample_nearest2x": {m: 0 for m in U},  # a copy: exact
    # conv / linear, scale sum|x||w| + |b|:
    #   f32: float32 dot product of K terms, worst case gamma_K (Higham Thm 3.1), + bias add
    #   f32_f16: float32 accumulation (K u32 = K 2**-13 u16) + one fp16 rounding of the output
    #   f16: ceil(K/b) partial roundings + ceil(K/b)-1 running-sum roundings + bias add,
    #        + the float32 partials (block u32 each)
    "conv2d": {
        "f32": lambda c: c.K + 2,
        "f32_f16": lambda c: 1 + (c.K + 2) * R32,
        "f16": lambda c: 2 * c.nb + 1 + c.K * R32,
    },
    "linear": {
        "f32": lambda c: c.K + 2,
        "f32_f16": lambda c: 1 + (c.K + 2) * R32,
        "f16": lambda c: 2 * c.nb + 1 + c.K * R32,
    },
    # group_norm / layer_norm over n = K elements per group, scale |gamma| (|x - mean| + mean|x|) / std + |beta|:
    #   f16: mean (2 ceil(n/b) blocked + divide) lands in x - mean with scale mean|x|, centre 1,
    #        var: square 1 + 2 ceil(n/b) blocked + divide 1 enters z = d/std halved, eps 1, rsqrt 1,
    #        normalize 1, gamma 1, beta 1: 3 ceil(n/b) + 8 <= 4 ceil(n/b) + 8 (two blocked sums, both sides)
    #   f32: the same with float32 sums of n terms (gamma_n each)
    #   f32_f16: float32 math + one output rounding (eps = 1e-5 stored fp16 moves var + eps by < 2**-13 var)
    "group_norm": {
        "f32": lambda c: 2 * c.K + 8,
        "f32_f16": lambda c: 1 + (2 * c.K + 8) * R32,
        "f16": lambda c: 4 * c.nb + 8,
    },
    "layer_norm": {
        "f32": lambda c: 2 * c.K + 8,
        "f32_f16": lambda c: 1 + (2 * c.K + 8) * R32,
        "f16": lambda c: 4 * c.nb + 8,
    },
    # softmax over L = K, scale y (1 + |x - max x|): an absolute error d in the exponent is a
    # relative error d in exp; subtract-max rounds |x - max| u. Then exp 1, sum of L positive
    # terms (2 ceil(L/b) - 1 in f16, L - 1 in f32), divide 1.
    "softmax": {
        "f32": lambda c: c.K + 4,
        "f32_f16": lambda c: 1 + (c.K + 4) * R32,
        "f16": lambda c: 2 * c.nb + 2,
    },
    # elementwise, scale max(|x|, |y|):
    #   silu f16: exp 1, 1 + e 1, reciprocal 1, product 1 (relative to |y|) + 1 margin (second order)
    "silu": {"f16": 5},
    #   quick_gelu f16: as silu + the scaled argument (1.702 stored fp16 and the product: 2 u |z|,
    #   damped by s (1 - s) |z| <= 0.224 |z| ... bounded by |x|): 6
    "quick_gelu": {"f16": 6},
    #   gelu erf f16: argument x * fp16(1/sqrt2) (2 u relative, erf' a <= 0.49), erf 1, 1 + e 2 (|1+e| <= 2),
    #   all times 0.5 |x| -> 2 u |x|, output product 1: 3, + 1 margin
    "gelu": {"f16": 4},
    #   gelu tanh f16: the cubic-polynomial argument carries <= 6 roundings relative to |arg| and
    #   arg sech^2(arg) <= 0.45, tanh 1, 1 + e 2, times 0.5 |x| -> 2.9 u |x|, output 1: 3.9, + 1 margin
    "gelu_tanh": {"f16": 5},
    #   geglu = a * gelu(g), scale |a| max(|g|, |gelu g|): gelu's budget + the product's rounding
    "geglu": {"f16": 5},
    "geglu_tanh": {"f16": 6},
    # timestep_embedding: float32 math in every mode (like diffusers), output rounded in fp16
    # modes (1 u |y|); the float32 part is the separate TIMESTEP_F32 term below
    "timestep_embedding": {"f32": 0, "f32_f16": 1, "f16": 1},
    # dequantize_int8: one float32 product (1 u32 |w|), then in fp16-storage modes the fp16
    # rounding of it (1 u16 |w|, + the u32 term as ``extra``)
    "dequantize_int8": {m: 1 for m in U},
}

# timestep_embedding's float32 argument s t freq: -ln(P) i (2 u), / (half - shift) (1 u), so
# |ln freq| <= ln(P) carries 3 u relative: 3 ln(1e4) = 27.6 u absolute in ln freq, + exp 2,
# + t * freq 1, + scale 1: ~32 u |arg|; sin/cos add <= 2 ulp. Budget 34 u32 on (|arg| + 1).
TIMESTEP_F32 = 34

# attention, per query row i and output column: scale_Y = sum_j P_ij |V_j| (the oracle's P on |V|)
# and Smax_i = max over unmasked keys of scale sum_d |q_id||k_jd| + |mask_ij|. An absolute score
# error dS gives |dP_ij| <= 2 P_ij max|dS| (softmax's Jacobian), so
#     |dY| <= u scale_Y (b_out + 2 b_S Smax_i).
# b_S counts roundings of the scores (relative to Smax), b_out roundings relative to scale_Y.
#   f16 b_S: blocked QK^T (2 ceil(D/b) - 1), fp16 scale constant 1, times scale 1, masked add 1,
#            subtract max 2 (|S - max| <= 2 Smax)
#   f16 b_out: exp 1, blocked row sum 2 ceil(Lk/b) - 1, divide 1, blocked P V 2 ceil(Lk/b) - 1, + 1 margin
#   f32_f16: scale constant 1 + scores stored 1 + masked scores stored 1; P stored 1 + output 1
#   f32: float32 sums of D (scores) and Lk (row sum, P V) terms, exp <= 2 ulp
#   upcast_attention: scores and softmax are float32 (b_S in u32), only P (1) and P V round in fp16
ATTENTION = {
    "attention": {
        "f32": (lambda c: 2 * c.Lk + 8, lambda c: c.D + 4),
        "f32_f16": (lambda c: 2 + (2 * c.Lk + 8) * R32, lambda c: 3 + (c.D + 4) * R32),
        "f16": (lambda c: 4 * c.nbk + 2, lambda c: 2 * c.nbd + 4),
    },
    "attention(upcast_attention)": {
        "f32": (lambda c: 2 * c.Lk + 8, lambda c: c.D + 4),
        "f32_f16": (lambda c: 2 + (2 * c.Lk + 8) * R32, lambda c: (c.D + 4) * R32),
        "f16": (lambda c: 2 * c.nbk + 2 + (2 * c.Lk + 8) * R32, lambda c: (c.D + 4) * R32),
    },
}


@dataclass(frozen=True)
class AttnCtx:
    Lk: int
    D: int
    block: int

    @property
    def nbk(self) -> int:
        return math.ceil(self.Lk / self.block)

    @property
    def nbd(self) -> int:
        return math.ceil(self.D / self.block)


def budget_for(name: str, mode: str, ctx: Ctx) -> float:
    b = TOL.get(name, {}).get(mode, DEFAULT[mode])
    return b(ctx) if callable(b) else b


# (mode, f16 block): the three modes, and f16 once more with the FLT4 block of 4 so
# that the blocked budgets are exercised with several blocks.
MODES = [("f32", 32), ("f32_f16", 32), ("f16", 32), ("f16", 4)]
MODE_IDS = ["f32", "f32_f16", "f16", "f16-block4"]


# ======================================================================= helpers


def f16(rng, shape, scale=1.0, loc=0.0) -> np.ndarray:
    return round_f16((rng.normal(loc, scale, shape)).astype(np.float32))


def run(fn, mode, block, *args, **kwargs):
    with precision(mode, block=block):
        y = fn(*args, **kwargs)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    if mode != "f32":  # fp16 storage: the output holds fp16 values
        r = round_f16(y)
        assert np.array_equal(r, y, equal_nan=True), "fp16-storage output is not fp16-representable"
    return y


def check(name, mode, got, want, scale, *, budget, extra=0.0, u=None):
    """``|got - want| <= budget * u * scale + budget * floor + extra``; NaN must match."""
    u = U[mode] if u is None else u
    got64 = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    scale = np.broadcast_to(np.asarray(scale, np.float64), want.shape)
    assert got64.shape == want.shape, (got64.shape, want.shape)
    np.testing.assert_array_equal(np.isnan(got64), np.isnan(want), err_msg=f"{name}[{mode}]: NaN positions")
    ok = ~np.isnan(want)
    err = np.abs(got64 - want)[ok]
    bound = (budget * u * scale + budget * FLOOR[mode] + extra)[ok]
    bad = ~(err <= bound)
    if bad.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            need = np.nanmax((err - extra - budget * FLOOR[mode]) / (u * scale[ok]))
        i = np.flatnonzero(bad)[0]
        raise AssertionError(
            f"{name} [{mode}]: {bad.sum()} of {err.size} elements exceed budget {budget:.3g} u * scale; "
            f"budget that would pass: {need:.3g}; first: got {got64[ok][i]!r} want {want[ok][i]!r} "
            f"err {err[i]:.3g} bound {bound[i]:.3g}"
        )


def elementwise_scale(x, y):
    return np.maximum(np.abs(np.asarray(x, np.float64)), np.abs(y))


# ======================================================================= float64 oracles


def conv_ref(x, w, b=None, *, stride=1, padding=0):
    x, w = x.astype(np.float64), w.astype(np.float64)
    sh = sw = stride
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    (pt, pb), (pl, pr) = padding
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw, _, cout = w.shape
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    y = np.zeros((x.shape[0], ho, wo, cout))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
            y += patch @ w[i, j]
    if b is not None:
        y += b.astype(np.float64)
    return y


def linear_ref(x, w, b=None):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    return y if b is None else y + b.astype(np.float64)


def norm_ref(xg, axes, eps):
    """(x - mean) / sqrt(var + eps) over axes, plus the error scale's pieces."""
    mean = xg.mean(axis=axes, keepdims=True)
    d = xg - mean
    std = np.sqrt((d * d).mean(axis=axes, keepdims=True) + eps)
    mean_abs = np.abs(xg).mean(axis=axes, keepdims=True)
    return d / std, (np.abs(d) + mean_abs) / std


def group_norm_ref(x, gamma, beta, groups, eps):
    n, h, w, c = x.shape
    xg = x.astype(np.float64).reshape(n, h, w, groups, c // groups)
    z, zs = norm_ref(xg, (1, 2, 4), eps)
    z, zs = z.reshape(x.shape), zs.reshape(x.shape)
    g, b = gamma.astype(np.float64), beta.astype(np.float64)
    return z * g + b, zs * np.abs(g) + np.abs(b)


def layer_norm_ref(x, gamma, beta, eps):
    z, zs = norm_ref(x.astype(np.float64), (-1,), eps)
    g, b = gamma.astype(np.float64), beta.astype(np.float64)
    return z * g + b, zs * np.abs(g) + np.abs(b)


_erf64 = np.vectorize(math.erf, otypes=[np.float64])


def gelu_ref(x, approximate="none"):
    x = x.astype(np.float64)
    if approximate == "none":
        return 0.5 * x * (1 + _erf64(x / math.sqrt(2)))
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def silu_ref(x):
    x = x.astype(np.float64)
    return x / (1 + np.exp(-x))


def quick_gelu_ref(x):
    x = x.astype(np.float64)
    return x / (1 + np.exp(-1.702 * x))


def softmax_ref(x, axis=-1):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attention_ref(q, k, v, heads, mask, scale):
    """Returns Y, scale_Y = P |V| and Smax per (n, query, head) broadcast to Y's columns."""
    q, k, v = (t.astype(np.float64) for t in (q, k, v))
    n, lq, c = q.shape
    lk = k.shape[1]
    d, dv = c // heads, v.shape[2] // heads
    scale = d**-0.5 if scale is None else scale
    m = np.zeros((n, heads, lq, lk)) if mask is None else np.broadcast_to(np.asarray(mask, np.float64),
                                                                           (n, heads, lq, lk))
    y = np.zeros((n, lq, heads * dv))
    y_scale = np.zeros_like(y)
    smax = np.zeros_like(y)
    for h in range(heads):
        qh, kh = q[:, :, h * d : (h + 1) * d], k[:, :, h * d : (h + 1) * d]
        vh = v[:, :, h * dv : (h + 1) * dv]
        s = scale * qh @ kh.transpose(0, 2, 1) + m[:, h]
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        y[:, :, h * dv : (h + 1) * dv] = p @ vh
        y_scale[:, :, h * dv : (h + 1) * dv] = p @ np.abs(vh)
        sabs = scale * np.abs(qh) @ np.abs(kh).transpose(0, 2, 1) + np.abs(np.where(np.isfinite(m[:, h]), m[:, h], 0))
        sabs = np.where(np.isfinite(m[:, h]), sabs, 0.0)
        smax[:, :, h * dv : (h + 1) * dv] = sabs.max(-1, keepdims=True)
    return y, y_scale, smax


def timestep_ref(t, dim, flip, shift, scale=1.0, max_period=10000.0):
    t = t.astype(np.float64)
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half) / (half - shift))
    arg = scale * t[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(arg), np.cos(arg)], -1)
    if flip:
        emb = np.concatenate([emb[:, half:], emb[:, :half]], -1)
    arg2 = np.concatenate([arg, arg], -1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
        arg2 = np.pad(arg2, ((0, 0), (0, 1)))
    return emb, arg2


# ======================================================================= the table

MODE_PARAMS = pytest.mark.parametrize("mode, block", MODES, ids=MODE_IDS)

CONV_CASES = [
    # (kernel, stride, padding)
    (3, 1, 1),
    (3, 1, 0),
    (3, 2, 1),
    (3, 2, ((0, 1), (0, 1))),  # diffusers' Downsample2D with padding=0: pad bottom/right by 1
    (1, 1, 0),
    (2, 2, ((1, 0), (0, 2))),  # asymmetric everything
]


@MODE_PARAMS
@pytest.mark.parametrize("kernel, stride, padding", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv2d(mode, block, kernel, stride, padding, bias):
    rng = np.random.default_rng(kernel * 10 + stride)
    cin, cout = 8, 5
    x = f16(rng, (2, 7, 6, cin))
    w = f16(rng, (kernel, kernel, cin, cout), 0.3)
    b = f16(rng, (cout,)) if bias else None
    got = run(ops.conv2d, mode, block, x, w, b, stride=stride, padding=padding)
    want = conv_ref(x, w, b, stride=stride, padding=padding)
    scale = conv_ref(np.abs(x), np.abs(w), None if b is None else np.abs(b), stride=stride, padding=padding)
    ctx = Ctx(K=kernel * kernel * cin, block=block)
    check("conv2d", mode, got, want, scale, budget=budget_for("conv2d", mode, ctx))


@MODE_PARAMS
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear(mode, block, bias):
    rng = np.random.default_rng(1)
    x, w = f16(rng, (2, 5, 40)), f16(rng, (24, 40), 0.2)
    b = f16(rng, (24,)) if bias else None
    got = run(ops.linear, mode, block, x, w, b)
    scale = linear_ref(np.abs(x), np.abs(w), None if b is None else np.abs(b))
    check("linear", mode, got, linear_ref(x, w, b), scale, budget=budget_for("linear", mode, Ctx(40, block)))


@MODE_PARAMS
@pytest.mark.parametrize("groups, hw", [(4, 5), (2, 9), (8, 3)])
def test_group_norm(mode, block, groups, hw):
    rng = np.random.default_rng(groups)
    c = 16
    x = f16(rng, (2, hw, hw, c), 1.5, 0.7)  # a non-zero mean, so the centring matters
    gamma, beta = f16(rng, (c,), 0.5, 1.0), f16(rng, (c,), 0.5)
    got = run(ops.group_norm, mode, block, x, gamma, beta, num_groups=groups, eps=1e-5)
    want, scale = group_norm_ref(x, gamma, beta, groups, 1e-5)
    ctx = Ctx(K=hw * hw * c // groups, block=block)
    check("group_norm", mode, got, want, scale, budget=budget_for("group_norm", mode, ctx))


@MODE_PARAMS
@pytest.mark.parametrize("c", [8, 77])
def test_layer_norm(mode, block, c):
    rng = np.random.default_rng(c)
    x = f16(rng, (2, 6, c), 2.0, -0.5)
    gamma, beta = f16(rng, (c,), 0.5, 1.0), f16(rng, (c,), 0.5)
    got = run(ops.layer_norm, mode, block, x, gamma, beta, eps=1e-5)
    want, scale = layer_norm_ref(x, gamma, beta, 1e-5)
    check("layer_norm", mode, got, want, scale, budget=budget_for("layer_norm", mode, Ctx(c, block)))


def _activation_inputs(seed):
    rng = np.random.default_rng(seed)
    x = f16(rng, (4, 250), 3.0)
    # the edges: zero, tiny, saturation of exp / tanh / erf, and fp16's range
    edges = np.array([0.0, -0.0, 1e-4, -1e-4, 2**-20, 5.0, -5.0, 9.5, -9.5, 12.0, -12.0, 20.0, -20.0,
                      100.0, -100.0, 1000.0, -1000.0], np.float32)
    return np.concatenate([x.reshape(-1), round_f16(edges)])


ELEMENTWISE = [
    ("silu", ops.silu, {}, silu_ref),
    ("quick_gelu", ops.quick_gelu, {}, quick_gelu_ref),
    ("gelu", ops.gelu, {"approximate": "none"}, lambda x: gelu_ref(x, "none")),
    ("gelu_tanh", ops.gelu, {"approximate": "tanh"}, lambda x: gelu_ref(x, "tanh")),
]


@MODE_PARAMS
@pytest.mark.parametrize("name, fn, kwargs, ref", ELEMENTWISE, ids=[e[0] for e in ELEMENTWISE])
def test_activation(mode, block, name, fn, kwargs, ref):
    x = _activation_inputs(2)
    got = run(fn, mode, block, x, **kwargs)
    with np.errstate(over="ignore"):
        want = ref(x)
    if name == "gelu_tanh":
        # unfused tanh-GELU's x**3 overflows fp16 for |x| >= 40.3 (documented): the monitor must
        # say so in f16, while tanh(inf) = +-1 still gives the right value (checked below)
        with precision(mode, block=block), monitoring() as mon:
            fn(x, **kwargs)
        overflowed = [e for e in mon.events if e.kind == "overflow"]
        if mode == "f16":
            assert overflowed and overflowed[0].primitive == "pow3"
        else:
            assert not overflowed
    check(name, mode, got, want, elementwise_scale(x, want), budget=budget_for(name, mode, Ctx(block=block)))


@MODE_PARAMS
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_geglu(mode, block, approximate):
    rng = np.random.default_rng(9)
    h = f16(rng, (2, 5, 2 * 24), 2.5)
    got = run(ops.geglu, mode, block, h, approximate=approximate)
    a, g = h[..., :24].astype(np.float64), h[..., 24:]
    gg = gelu_ref(g, approximate)
    scale = np.abs(a) * np.maximum(np.abs(g), np.abs(gg))
    name = "geglu" if approximate == "none" else "geglu_tanh"
    check(name, mode, got, a * gg, scale, budget=budget_for(name, mode, Ctx(block=block)))


@MODE_PARAMS
@pytest.mark.parametrize("length", [7, 77])
def test_softmax(mode, block, length):
    rng = np.random.default_rng(length)
    x = f16(rng, (3, 4, length), 3.0)
    x[0, 0, :] = 0.0  # a constant row
    got = run(ops.softmax, mode, block, x)
    want = softmax_ref(x)
    x64 = x.astype(np.float64)
    scale = want * (1 + np.abs(x64 - x64.max(-1, keepdims=True)))
    check("softmax", mode, got, want, scale, budget=budget_for("softmax", mode, Ctx(length, block)))
    # along another axis, and a row of -inf is NaN (documented)
    got1 = run(ops.softmax, mode, block, x, axis=1)
    want1 = softmax_ref(x, axis=1)
    scale1 = want1 * (1 + np.abs(x64 - x64.max(1, keepdims=True)))
    check("softmax", mode, got1, want1, scale1, budget=budget_for("softmax", mode, Ctx(4, block)))
    inf_row = np.full((1, 5), -np.inf, np.float32)
    assert np.isnan(run(ops.softmax, mode, block, inf_row)).all()


ATTN_SHAPES = {
    # name: (q shape, k shape, v shape, heads)
    "self": ((2, 6, 16), (2, 6, 16), (2, 6, 16), 2),
    "cross": ((2, 5, 16), (2, 9, 16), (2, 9, 12), 2),
}


def _mask(kind, n, heads, lq, lk, rng):
    if kind is None:
        return None
    if kind == "padding":  # key padding: batch 1 cannot see its last 2 keys (never a whole row)
        m = np.zeros((n, 1, 1, lk), np.float32)
        m[1, ..., -2:] = -np.inf
        return m
    return f16(rng, (lq, lk), 1.0)  # an additive float bias, broadcast over batch and heads


@MODE_PARAMS
@pytest.mark.parametrize("shape", list(ATTN_SHAPES))
@pytest.mark.parametrize("mask_kind", [None, "padding", "bias"])
@pytest.mark.parametrize("upcast", ["none", "upcast_attention", "upcast_softmax"])
def test_attention(mode, block, shape, mask_kind, upcast):
    rng = np.random.default_rng(len(shape) + 3)
    qs, ks, vs, heads = ATTN_SHAPES[shape]
    q, k, v = f16(rng, qs, 1.2), f16(rng, ks, 1.2), f16(rng, vs)
    mask = _mask(mask_kind, qs[0], heads, qs[1], ks[1], rng)
    flags = {"upcast_attention": upcast == "upcast_attention", "upcast_softmax": upcast == "upcast_softmax"}
    got = run(ops.attention, mode, block, q, k, v, heads=heads, mask=mask, **flags)
    want, y_scale, smax = attention_ref(q, k, v, heads, mask, None)
    row = "attention(upcast_attention)" if flags["upcast_attention"] else "attention"
    b_out, b_s = ATTENTION[row][mode]
    ctx = AttnCtx(Lk=ks[1], D=qs[2] // heads, block=block)
    budget_out, budget_s = b_out(ctx), b_s(ctx)
    # check() multiplies budget * u * scale: fold the score term into the scale
    scale = y_scale * (1 + 2 * budget_s * smax / budget_out)
    check(row, mode, got, want, scale, budget=budget_out)


@MODE_PARAMS
@pytest.mark.parametrize("scale", [None, 0.125])
def test_attention_explicit_scale_and_single_head(mode, block, scale):
    rng = np.random.default_rng(4)
    q, k, v = f16(rng, (1, 4, 8)), f16(rng, (1, 3, 8)), f16(rng, (1, 3, 8))
    got = run(ops.attention, mode, block, q, k, v, heads=1, scale=scale)
    want, y_scale, smax = attention_ref(q, k, v, 1, None, scale)
    b_out, b_s = ATTENTION["attention"][mode]
    ctx = AttnCtx(Lk=3, D=8, block=block)
    check("attention", mode, got, want, y_scale * (1 + 2 * b_s(ctx) * smax / b_out(ctx)), budget=b_out(ctx))


@MODE_PARAMS
def test_attention_fully_masked_row_is_nan(mode, block):
    rng = np.random.default_rng(6)
    q, k, v = f16(rng, (1, 3, 8)), f16(rng, (1, 4, 8)), f16(rng, (1, 4, 8))
    mask = np.zeros((3, 4), np.float32)
    mask[1] = -np.inf
    got = run(ops.attention, mode, block, q, k, v, heads=2, mask=mask)
    assert np.isnan(got[0, 1]).all() and np.isfinite(got[0, [0, 2]]).all()


@MODE_PARAMS
def test_upsample_nearest2x(mode, block):
    rng = np.random.default_rng(8)
    x = f16(rng, (2, 3, 4, 5))
    got = run(ops.upsample_nearest2x, mode, block, x)
    want = np.repeat(np.repeat(x.astype(np.float64), 2, axis=1), 2, axis=2)
    assert got.shape == (2, 6, 8, 5)
    np.testing.assert_array_equal(got, want)  # budget 0: a copy


@MODE_PARAMS
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding(mode, block, flip, shift, dim):
    t = np.array([0, 1, 10.5, 250, 999], np.float32)
    got = run(ops.timestep_embedding, mode, block, t, dim=dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    want, arg = timestep_ref(t, dim, flip, shift)
    assert got.shape == (5, dim)
    check("timestep_embedding", mode, got, want, np.abs(want),
          budget=budget_for("timestep_embedding", mode, Ctx()), extra=TIMESTEP_F32 * U_F32 * (np.abs(arg) + 1))
    if dim % 2:
        assert (got[:, -1] == 0).all()
    # t = 0: sin 0 = 0, cos 0 = 1, exactly, in the documented halves
    first, second = (got[0, : dim // 2], got[0, dim // 2 : 2 * (dim // 2)])
    sin_half, cos_half = (second, first) if flip else (first, second)
    assert (sin_half == 0).all() and (cos_half == 1).all()


@MODE_PARAMS
@pytest.mark.parametrize("axis", [0, -1])
def test_dequantize_int8(mode, block, axis):
    rng = np.random.default_rng(12)
    shape = (6, 3, 3, 4) if axis == -1 else (6, 10)
    q = rng.integers(-127, 128, shape).astype(np.int8)
    n = shape[axis]
    scale = (rng.uniform(1e-4, 0.05, n)).astype(np.float32)
    got = run(ops.dequantize_int8, mode, block, q, scale, axis=axis)
    bshape = [1] * q.ndim
    bshape[axis] = -1
    want = q.astype(np.float64) * scale.astype(np.float64).reshape(bshape)
    # fp16 in fp16-storage modes (the delegate holds the weights in fp16), else the float32 product
    if mode == "f32":
        assert np.array_equal(got, q.astype(np.float32) * scale.reshape(bshape))
    else:
        assert np.array_equal(round_f16(got), got)
    check("dequantize_int8", mode, got, want, np.abs(want), budget=1, extra=U_F32 * np.abs(want))


def quantize_ref(w, axis):
    w64 = w.astype(np.float64)
    red = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    amax = np.abs(w64).max(axis=red, keepdims=True)
    scale = np.where(amax > 0, amax / 127, 1.0)
    return w64 / scale, scale.reshape(-1)


@MODE_PARAMS
@pytest.mark.parametrize("axis", [0, -1])
def test_quantize_int8(mode, block, axis):
    rng = np.random.default_rng(13)
    shape = (5, 12) if axis == 0 else (3, 3, 4, 5)
    w = rng.normal(0, 0.1, shape).astype(np.float32)
    zero = [slice(None)] * w.ndim
    zero[axis] = 1
    w[tuple(zero)] = 0.0  # an all-zero channel: scale 1, q 0
    with precision(mode, block=block):
        q, s = ops.quantize_int8(w, axis=axis)
    ratio, s_ref = quantize_ref(w, axis)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (shape[axis],)
    # scale = max|w| / 127: one float32 division, <= u32 relative; 1.0 for the zero channel
    np.testing.assert_allclose(s, s_ref, rtol=U_F32, atol=0)
    assert s[1] == 1.0
    # q = round-half-even(w / scale) exactly, except where w/scale lies within float32 noise
    # (a few u32 of |w/scale| <= 127) of a half-integer: there q may be either neighbour
    q_ref = np.rint(ratio)
    near_tie = np.abs(np.abs(ratio - np.trunc(ratio)) - 0.5) < 8 * U_F32 * 127
    assert np.array_equal(q[~near_tie], q_ref[~near_tie])
    assert np.all(np.abs(q.astype(np.float64) - q_ref) <= 1)
    assert np.abs(q).max() == 127  # the channel maximum maps to +-127
    bshape = [1] * w.ndim
    bshape[axis] = -1
    recon = q.astype(np.float64) * s.astype(np.float64).reshape(bshape)
    assert np.all(np.abs(recon - w) <= s.reshape(bshape) * (0.5 + 1e-5))  # half a step
    # precision-independent: same as in f32
    q32, s32 = ops.quantize_int8(w, axis=axis)
    assert np.array_equal(q, q32) and np.array_equal(s, s32)


@MODE_PARAMS
def test_elementwise_arith(mode, block):
    rng = np.random.default_rng(14)
    a, b = f16(rng, (3, 40), 50.0), f16(rng, (40,), 3.0)
    for name, fn, ref in (("add", ops.add, np.add), ("mul", ops.mul, np.multiply)):
        got = run(fn, mode, block, a, b)
        want = ref(a.astype(np.float64), b.astype(np.float64))
        check(name, mode, got, want, np.abs(want), budget=budget_for(name, mode, Ctx()))
    got = run(ops.scale, mode, block, a, factor=0.18215)  # the SD VAE latent factor: not fp16-exact
    want = a.astype(np.float64) * 0.18215
    check("scale", mode, got, want, np.abs(want), budget=budget_for("scale", mode, Ctx()))


# erf: NR's erfc fit (fractional error 1.2e-7 of erfc <= 1) evaluated in float32.
# Float32 evaluation: t = 1/(1 + z/2) (2 roundings), a 10-term Horner chain whose
# partial values reach ~1.3 and cancel to ~0 at z = 0 (2 roundings per step, each
# <= u |partial|), z*z and the subtraction, exp (~1 ulp), t * exp, and 1 - erfc:
# the running-error bound below sums them per x (Higham, Sec. 5.1).
_ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
                0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def erf_f32_bound(x):
    z = np.abs(x.astype(np.float64))
    t = 1 / (1 + 0.5 * z)
    p = _ERFC_COEFFS[-1]
    dp = 0.0
    running = 0.0  # sum of |partials|: Horner's running error bound in units of u
    for c in reversed(_ERFC_COEFFS[:-1]):
        dp = dp * t + p
        prod = p * t
        p = prod + c
        running = running + np.abs(prod) + np.abs(p)
    erfc = t * np.exp(p - z * z)
    arg_err = running + 2 * np.abs(dp * t) + z * z + np.abs(p - z * z)  # abs error of the exp argument / u
    rel = arg_err + 1 + 1 + 2  # exp, t * exp, t's two roundings
    return 1.2e-7 * erfc + U_F32 * (rel * erfc + 1)  # + the rounding of 1 - erfc (|erf| <= 1)


def test_erf():
    rng = np.random.default_rng(15)
    x = np.concatenate([rng.uniform(-5, 5, 20000), rng.uniform(-0.3, 0.3, 20000),
                        np.linspace(-4, 4, 8001)]).astype(np.float32)
    got = ops.erf(x)
    assert got.dtype == np.float32
    want = _erf64(x.astype(np.float64))
    err = np.abs(got.astype(np.float64) - want)
    bound = erf_f32_bound(x)
    assert np.all(err <= bound), f"worst err/bound {np.max(err / bound):.3g} at x={x[np.argmax(err / bound)]}"
    assert err.max() < 1.1e-6  # the documented absolute bound (max over x of erf_f32_bound)
    np.testing.assert_array_equal(ops.erf(-x), -got)  # odd, exactly
    special = ops.erf(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 10.0, -10.0], np.float32))
    assert special[0] == 0 and np.signbit(special[1]) and special[2] == 1 and special[3] == -1
    assert np.isnan(special[4]) and special[5] == 1 and special[6] == -1


def test_erf_relative_accuracy_near_zero():
    x = np.array([1e-4, -3e-4, 1e-3, 0.01, 0.05], np.float32)
    want = _erf64(x.astype(np.float64))
    # float32 quality: a handful of ulp relative (8 u32), as torch.erf / libm erff give
    np.testing.assert_allclose(ops.erf(x), want, rtol=8 * U_F32, atol=0)


# ======================================================================= cross-cutting properties


def _op_calls(rng):
    """One representative call per op: (name, fn, args, kwargs)."""
    x4 = f16(rng, (1, 4, 4, 8))
    w3 = f16(rng, (3, 3, 8, 4), 0.3)
    b4 = f16(rng, (4,))
    xl, wl, bl = f16(rng, (2, 3, 8)), f16(rng, (6, 8)), f16(rng, (6,))
    g8, be8 = f16(rng, (8,), 0.5, 1.0), f16(rng, (8,))
    q, k, v = f16(rng, (1, 4, 8)), f16(rng, (1, 5, 8)), f16(rng, (1, 5, 8))
    qi, sc = ops.quantize_int8(wl)
    return [
        ("conv2d", ops.conv2d, (x4, w3, b4), {"padding": 1}),
        ("linear", ops.linear, (xl, wl, bl), {}),
        ("group_norm", ops.group_norm, (x4, g8, be8), {"num_groups": 2}),
        ("layer_norm", ops.layer_norm, (xl, g8, be8), {}),
        ("silu", ops.silu, (xl,), {}),
        ("gelu", ops.gelu, (xl,), {}),
        ("gelu_tanh", ops.gelu, (xl,), {"approximate": "tanh"}),
        ("quick_gelu", ops.quick_gelu, (xl,), {}),
        ("geglu", ops.geglu, (xl,), {}),
        ("softmax", ops.softmax, (xl,), {}),
        ("attention", ops.attention, (q, k, v), {"heads": 2, "mask": np.zeros((4, 5), np.float32)}),
        ("upsample_nearest2x", ops.upsample_nearest2x, (x4,), {}),
        ("timestep_embedding", ops.timestep_embedding, (np.array([1.0, 500.0], np.float32),), {"dim": 8}),
        ("dequantize_int8", ops.dequantize_int8, (qi, sc), {}),
        ("add", ops.add, (xl, be8), {}),
        ("mul", ops.mul, (xl, xl), {}),
        ("scale", ops.scale, (xl,), {"factor": 0.5}),
    ]


@MODE_PARAMS
def test_outputs_read_only_and_inputs_untouched(mode, block):
    rng = np.random.default_rng(16)
    for name, fn, args, kwargs in _op_calls(rng):
        copies = [np.array(a, copy=True) for a in args]
        with precision(mode, block=block):
            y = fn(*args, **kwargs)
        assert not y.flags.writeable, f"{name}: output is writeable"
        with pytest.raises(ValueError):
            y.reshape(-1)[0] = 1.0
        for a, c in zip(args, copies):
            assert np.array_equal(a, c), f"{name} modified an input"
            assert a.flags.writeable, f"{name} made its input read-only"
        # and read-only inputs are accepted (no in-place writes into them)
        frozen = [np.array(a, copy=True) for a in args]
        for a in frozen:
            a.flags.writeable = False
        with precision(mode, block=block):
            y2 = fn(*frozen, **kwargs)
        assert np.array_equal(y, y2, equal_nan=True), f"{name}: result depends on input writeability"


@pytest.mark.parametrize("mode, block", [("f16", 32), ("f32_f16", 32), ("f32", 32)], ids=["f16", "f32_f16", "f32"])
def test_monitor_does_not_change_results(mode, block):
    rng = np.random.default_rng(17)
    for name, fn, args, kwargs in _op_calls(rng):
        with precision(mode, block=block):
            plain = fn(*args, **kwargs)
            with monitoring():
                watched = fn(*args, **kwargs)
        assert np.array_equal(plain, watched, equal_nan=True), name


# ======================================================================= input validation


def _x4(shape=(1, 4, 4, 8)):
    return np.zeros(shape, np.float32)


VALIDATION = [
    ("conv2d rank", lambda: ops.conv2d(np.zeros((4, 4, 8), np.float32), np.zeros((3, 3, 8, 4), np.float32)),
     "rank 4"),
    ("conv2d weight rank", lambda: ops.conv2d(_x4(), np.zeros((3, 8, 4), np.float32)), "HWIO"),
    ("conv2d channels", lambda: ops.conv2d(_x4(), np.zeros((3, 3, 6, 4), np.float32)), "8 channels.*expect 6"),
    ("conv2d bias", lambda: ops.conv2d(_x4(), np.zeros((3, 3, 8, 4), np.float32), np.zeros(3, np.float32)),
     "bias shape"),
    ("linear weight rank", lambda: ops.linear(np.zeros((2, 8), np.float32), np.zeros(8, np.float32)),
     "out_features, in_features"),
    ("linear features", lambda: ops.linear(np.zeros((2, 8), np.float32), np.zeros((4, 6), np.float32)),
     "8 features.*expect 6"),
    ("linear bias", lambda: ops.linear(np.zeros((2, 8), np.float32), np.zeros((4, 8), np.float32),
                                       np.zeros(5, np.float32)), "bias shape"),
    ("group_norm rank", lambda: ops.group_norm(np.zeros((4, 4, 8), np.float32), num_groups=2), "rank 4"),
    ("group_norm groups", lambda: ops.group_norm(_x4(), num_groups=3), "3 groups do not divide 8 channels"),
    ("group_norm zero groups", lambda: ops.group_norm(_x4(), num_groups=0), "groups do not divide"),
    ("group_norm gamma", lambda: ops.group_norm(_x4(), np.ones(4, np.float32), num_groups=2), "gamma shape"),
    ("layer_norm beta", lambda: ops.layer_norm(np.zeros((2, 8), np.float32), None, np.ones(7, np.float32)),
     "beta shape"),
    ("serial_conv factor", lambda: ops.serial_conv(_x4(), np.zeros((3, 3, 8, 4), np.float32), factor=3),
     "factor 3 does not divide 8 input channels"),
    ("serial_conv factor 0", lambda: ops.serial_conv(_x4(), np.zeros((3, 3, 8, 4), np.float32), factor=0),
     "serialization factor"),
    ("serial_conv factor float", lambda: ops.serial_conv(_x4(), np.zeros((3, 3, 8, 4), np.float32), factor=2.0),
     "serialization factor"),
    ("serial_conv output factor", lambda: ops.serial_conv(_x4(), np.zeros((3, 3, 8, 4), np.float32), factor=3,
                                                          axis="output"), "does not divide 4 output channels"),
    ("serial_conv axis", lambda: ops.serial_conv(_x4(), np.zeros((3, 3, 8, 4), np.float32), factor=2,
                                                 axis="spatial"), "axis must be 'input' or 'output'"),
    ("serial_conv_factor limit", lambda: ops.serial_conv_factor((1, 4, 4, 8), (3, 3, 8, 4), limit=10),
     "keeps activations within 10"),
    ("winograd tile", lambda: ops.conv2d_winograd(_x4(), np.zeros((3, 3, 8, 4), np.float32), tile=3),
     "tile must be 2 or 4"),
    ("winograd kernel", lambda: ops.conv2d_winograd(_x4(), np.zeros((1, 1, 8, 4), np.float32)), "3x3 kernel"),
    ("gelu approximate", lambda: ops.gelu(np.zeros(3, np.float32), approximate="sigmoid"),
     "approximate must be one of"),
    ("gelu_fused approximate", lambda: ops.gelu_fused(np.zeros(3, np.float32), approximate="erf"),
     "approximate must be one of"),
    ("geglu approximate", lambda: ops.geglu(np.zeros(4, np.float32), approximate="exact"),
     "approximate must be one of"),
    ("geglu odd", lambda: ops.geglu(np.zeros((2, 5), np.float32)), "even last dimension"),
    ("gelu_clip M", lambda: ops.gelu_clip(np.zeros(3, np.float32), M=0.0), "M > 0"),
    ("attention rank", lambda: ops.attention(np.zeros((4, 8), np.float32), np.zeros((4, 8), np.float32),
                                             np.zeros((4, 8), np.float32)), "shape \\(N, L, heads\\*dim\\)"),
    ("attention heads", lambda: ops.attention(*(np.zeros((1, 4, 8), np.float32),) * 3, heads=3),
     "3 heads do not divide"),
    ("attention shapes", lambda: ops.attention(np.zeros((1, 4, 8), np.float32), np.zeros((1, 5, 8), np.float32),
                                               np.zeros((1, 6, 8), np.float32)), "incompatible shapes"),
    ("attention mask", lambda: ops.attention(*(np.zeros((1, 4, 8), np.float32),) * 3,
                                             mask=np.zeros((3, 4), np.float32)), "mask shape"),
    ("flash tile", lambda: ops.flash_attention(*(np.zeros((1, 4, 8), np.float32),) * 3, tile=0), "tile"),
    ("upsample rank", lambda: ops.upsample_nearest2x(np.zeros((4, 4, 8), np.float32)), "rank 4"),
    ("timestep dim", lambda: ops.timestep_embedding(np.zeros(2, np.float32), dim=0), "dim must be >= 1"),
    ("dequantize dtype", lambda: ops.dequantize_int8(np.zeros((4, 3), np.int16), np.ones(4, np.float32)),
     "expects int8"),
    ("dequantize scale", lambda: ops.dequantize_int8(np.zeros((4, 3), np.int8), np.ones(3, np.float32)),
     "scale shape"),
    ("quantize nonfinite", lambda: ops.quantize_int8(np.array([[1.0, np.nan]], np.float32)), "inf or NaN"),
    ("quantize scalar", lambda: ops.quantize_int8(np.float32(1.0)), "output-channel axis"),
]


@pytest.mark.parametrize("call, match", [(v[1], v[2]) for v in VALIDATION], ids=[v[0] for v in VALIDATION])
def test_validation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
