"""Differential tests: every rewrite in ``refsd.ops.REWRITES`` against the op it
replaces, with ``assert_rewrite_equivalent`` and budgets from
``refsd.testing.rounding_budgets``; plus the int8 weight round trip, the serialization
factor, and negative tests showing the assertion does fail on wrong rewrites.

Where the default scale (the original op on ``|inputs|``) is not the right
magnitude for an op's rounding error, the scale is derived here, with its
derivation next to it (GroupNorm: statistics amplified by ``1/std``;
attention: score perturbations amplified through ``exp``). Below fp16's
normal range rounding errors are absolute, not relative: rewrites that store
several small intermediates get a derived floor (serial conv: ``flush_floor``)
or scale (Winograd: ``winograd_error_scale(tiny=...)``).

Modes: ``f32`` and ``f32_f16`` always; ``f16`` where the rewrite rounds
differently from the original (all here but ``fc_as_conv``, which is tested
in ``f16`` too because it is cheap and must not diverge).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from refsd import ops
from refsd.numerics import U_F16, precision, round_f16
from refsd.testing import RewriteMismatch, assert_rewrite_equivalent, compare
from refsd.testing import strategies as rst
from refsd.testing.rounding_budgets import BUDGET, blocked_budget, serial_conv_budget, winograd_budget
from refsd.testing.rounding_budgets import floor as tolerance_floor
from refsd.testing.rounding_budgets import flush_floor

MODES = ("f32", "f32_f16", "f16")
f64 = np.float64


def _f16_budget(k: int, block: int, extra: int = 0) -> int:
    """f16 budget for a K-term blocked accumulation: the table's default, or the
    blocked model's count when the block is small enough to need more."""
    return max(BUDGET["f16"], blocked_budget(k, block)) + extra


def _without(attrs: dict, *keys: str) -> dict:
    return {k: v for k, v in attrs.items() if k not in keys}


def test_every_rewrite_is_covered():
    """A new entry in REWRITES needs a differential test here."""
    covered = {"fc_as_conv", "serial_conv", "gn4d", "group_norm_fused", "gelu_clip", "gelu_fused", "geglu_clip",
               "geglu_fused", "softmax_partial_fused", "flash_attention", "conv2d_winograd", "embedding_1d"}
    assert set(ops.REWRITES) == covered


def test_one_rewrite_vocabulary():
    """The ops each model rewrite runs (``refsd.models.rewrites.OPS``) are exactly the ops of ``ops.REWRITES``."""
    from refsd.models import rewrites  # noqa: PLC0415

    assert set(rewrites.OPS) == set(rewrites.NAMES)
    assert {op for names in rewrites.OPS.values() for op in names} == set(ops.REWRITES)


# ---------------------------------------------------------------- strategies themselves


@given(st.data())
def test_strategies_draw_fp16_values(data):
    for arr in data.draw(st.one_of(rst.conv_inputs(), rst.linear_inputs(), rst.attention_inputs(masked=True),
                                   rst.group_norm_inputs(), rst.gelu_inputs(), rst.winograd_inputs())):
        if isinstance(arr, np.ndarray):
            assert arr.dtype == np.float32
            np.testing.assert_array_equal(round_f16(arr), arr)


_ALL_FP16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
_ALL_FP16 = _ALL_FP16[np.isfinite(_ALL_FP16)]


@given(st.floats(-70000, 70000), st.floats(-70000, 70000), st.booleans(), st.data())
@example(66000.0, 70000.0, False, None)  # above the fp16 range: no value, not 65504
def test_fp16_values_within_bounds(a, b, sub, data):
    lo, hi = min(a, b), max(a, b)
    inside = _ALL_FP16[(_ALL_FP16 >= lo) & (_ALL_FP16 <= hi)]
    if not sub:
        inside = inside[(inside == 0) | (np.abs(inside) >= 2.0**-14)]
    if not inside.size:
        with pytest.raises(Exception):  # ValueError, or Hypothesis' InvalidArgument for an empty range
            strategy = rst.fp16_values(lo, hi, allow_subnormal=sub)
            strategy.validate()
        return
    v = data.draw(rst.fp16_values(lo, hi, allow_subnormal=sub))
    assert v in inside


@given(rst.serial_conv_inputs())
def test_serial_conv_inputs_factor_divides(args):
    x, w, b, attrs = args
    channels = w.shape[2] if attrs["axis"] == "input" else w.shape[3]
    assert channels % attrs["factor"] == 0 and x.shape[-1] == w.shape[2]
    assert b is None or b.shape == (w.shape[3],)


@given(rst.attention_inputs(masked=True))
def test_attention_masks_keep_a_key_per_row(args):
    mask = args[3]["mask"]
    assert set(np.unique(mask)) <= {0.0, -10000.0}
    assert (mask == 0).any(axis=-1).all()


@given(rst.group_norm_inputs(min_std=0.25))
def test_group_norm_inputs_meet_the_spread_bound(args):
    x, _, _, attrs = args
    n, h, w, c = x.shape
    g = attrs["num_groups"]
    xg = x.astype(f64).reshape(n, h * w, g, c // g)
    assert (xg.std(axis=(1, 3)) >= 0.25).all()
    assert h * w * (c // g) >= 2


# ---------------------------------------------------------------- fc_as_conv


@given(rst.linear_inputs())
def test_fc_as_conv(args):
    for mode in MODES:
        assert_rewrite_equivalent(ops.linear, ops.fc_as_conv, *args, mode=mode)


# ---------------------------------------------------------------- embedding_1d


@given(rst.embedding_inputs())
def test_embedding_1d(args):
    """A gather moves rows, it computes nothing: the rewrite must be bit-identical
    (budget 0, floor 0) in every mode, including the fp16 rounding of the table."""
    for mode in MODES:
        assert_rewrite_equivalent(ops.embedding, ops.embedding_1d, *args, mode=mode, budget=0, floor=0)


def _embedding_1d_wrong_order(ids, table):
    # A plausible bug: flattening in Fortran order picks the rows of the transposed ids.
    flat = np.asarray(ids).reshape(-1, order="F")
    return ops.embedding_1d(flat.reshape(np.shape(ids)), table)


@given(rst.embedding_inputs())
def test_detects_embedding_1d_in_the_wrong_order(args):
    ids, table = args
    assume(not np.array_equal(ids.reshape(-1, order="F"), ids.reshape(-1)))  # transposing changes the order
    assume(not np.array_equal(np.take(table, ids.reshape(-1, order="F"), 0), np.take(table, ids.reshape(-1), 0)))
    with pytest.raises(RewriteMismatch):
        assert_rewrite_equivalent(ops.embedding, _embedding_1d_wrong_order, ids, table, budget=0, floor=0)


# ---------------------------------------------------------------- serial_conv


def _serial_check(x, w, b, attrs, block, ftz):
    """Budgets: ``serial_conv_budget`` (f32, f32_f16); in f16 also at least the
    blocked model's count for K terms plus the 2 factor stored partials and adds.

    Floor: under FTZ (or for subnormal results) each stored fp16 intermediate may
    lose up to 2**-14 (2**-25) outright, which ``u * scale`` does not cover when
    the partial sums are small. f32_f16 stores ``factor`` partial outputs and
    ``factor - 1`` sums besides the original's output: ``2 factor`` roundings. In
    f16 every rounding the budget counts (block partials, running sums) can flush.
    """
    factor = attrs["factor"]
    conv = _without(attrs, "factor", "axis")
    k = w.shape[0] * w.shape[1] * w.shape[2]

    def original(x, w, b):
        return ops.conv2d(x, w, b, **conv)

    def rewritten(x, w, b):
        return ops.serial_conv(x, w, b, **attrs)

    for mode in ("f32", "f32_f16"):
        assert_rewrite_equivalent(original, rewritten, x, w, b, mode=mode, ftz=ftz,
                                  budget=serial_conv_budget(mode, factor), floor=flush_floor(mode, ftz, 2 * factor))
    budget = max(serial_conv_budget("f16", factor), _f16_budget(k, block, 2 * factor))
    assert_rewrite_equivalent(original, rewritten, x, w, b, mode="f16", block=block, ftz=ftz, budget=budget,
                              floor=flush_floor("f16", ftz, budget))
    # Output serialization adds no fp16 rounding, but it is not bit-exact either: BLAS may sum a
    # 6-column weight slice with other kernels (FMA or not) than the 12-column whole, and a float32
    # ulp can tip an fp16 rounding (shrunk case below, f16 at block 4).


def _either_padding(strategy, **kw):
    return st.one_of(strategy(**kw), strategy(**kw, asymmetric_padding=True))


@given(_either_padding(rst.serial_conv_inputs, axis="input"), st.sampled_from([4, 32]), st.booleans())
def test_serial_conv_input_axis(args, block, ftz):
    _serial_check(*args, block, ftz)


def _serial_output_case():
    """Shrunk (approximately: Hypothesis elided part of ``w``) from a failed claim
    that output serialization is bit-exact in fp16 modes: the 6-column slices'
    float32 sums differ from the 12-column conv's by 2.6e-6."""
    x = np.full((2, 3, 2, 12), np.float16(0.0968), np.float32)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = np.float16(-1.277), 0.0
    w = np.full((3, 3, 12, 12), np.float16(0.7134), np.float32)
    w[0, 0, 2, 0] = 0.0625
    b = np.full(12, np.float16(-0.1451), np.float32)
    return x, w, b, {"factor": 2, "axis": "output", "stride": 1, "padding": ((0, 0), (0, 1))}


@given(_either_padding(rst.serial_conv_inputs, axis="output"), st.sampled_from([4, 32]), st.booleans())
@example(_serial_output_case(), 4, False)
def test_serial_conv_output_axis(args, block, ftz):
    _serial_check(*args, block, ftz)


@given(rst.serial_conv_inputs(axis="input", max_abs=2.0**-8, w_max_abs=2.0**-6))
def test_serial_conv_ftz_small_partials(args):
    """Partials around fp16's smallest normal: the regime where flushes dominate."""
    _serial_check(*args, 32, True)


def _activations(x_shape, w_shape, axis, k, stride, padding):
    """Brute force: the largest tensor the k-way split conv reads or writes."""
    n, h, w, cin = x_shape
    kh, kw, _, cout = w_shape
    (pt, pb), (pl, pr) = padding
    ho = (h + pt + pb - kh) // stride + 1
    wo = (w + pl + pr - kw) // stride + 1
    if axis == "input":
        return max(n * h * w * (cin // k), n * ho * wo * cout)
    return max(n * h * w * cin, n * ho * wo * (cout // k))


@given(_either_padding(rst.serial_conv_inputs), st.integers(1, 3000))
def test_serial_conv_factor_is_smallest_valid_divisor(args, limit):
    x, w, _, attrs = args
    axis, stride, padding = attrs["axis"], attrs["stride"], attrs["padding"]
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    channels = w.shape[2] if axis == "input" else w.shape[3]
    valid = [k for k in range(1, channels + 1)
             if channels % k == 0 and _activations(x.shape, w.shape, axis, k, stride, pad) <= limit]
    kwargs = dict(limit=limit, axis=axis, stride=stride, padding=padding)
    if not valid:
        with pytest.raises(ValueError, match="serialization"):
            ops.serial_conv_factor(x.shape, w.shape, **kwargs)
        return
    k = ops.serial_conv_factor(x.shape, w.shape, **kwargs)
    assert k == valid[0]
    # and the rewrite accepts it
    ops.serial_conv(x, w, None, factor=k, axis=axis, stride=stride, padding=padding)


def test_serial_conv_factor_errors():
    with pytest.raises(ValueError, match="within 10 elements"):
        ops.serial_conv_factor((1, 4, 4, 8), (3, 3, 8, 8), limit=10, padding=1)
    with pytest.raises(ValueError, match="axis"):
        ops.serial_conv_factor((1, 4, 4, 8), (3, 3, 8, 8), limit=10**6, axis="batch")
    x, w = np.ones((1, 4, 4, 6), np.float32), np.ones((1, 1, 6, 4), np.float32)
    with pytest.raises(ValueError, match="does not divide"):
        ops.serial_conv(x, w, factor=4)


# ---------------------------------------------------------------- GroupNorm


def _gn_scale(x, gamma, beta, num_groups, eps):
    """Derived error scale for GroupNorm.

    With ``mu``, ``sd = sqrt(var + eps)`` per group, ``y_n = (x - mu) / sd`` and
    ``kappa = mean_g|x| / sd`` (the conditioning of the statistics), a blocked
    fp16 sum of the group (``nb`` blocks) gives ``|d mu| <= (nb + 1) u mean|x|``;
    it shifts every centred value (``<= (nb + 1) u kappa`` after dividing by
    ``sd``) and, through the variance, scales ``y_n`` by ``1 + d sd / sd`` with
    ``|d sd / sd| <= (nb / 2 + 3) u + |d mu| / sd``. Adding the roundings of
    normalize, gamma, beta and the output on both sides:
    ``|error| <= u [|gamma| ((nb+1) kappa (1 + |y_n|) + (nb/2 + 6) |y_n|) + 2 |y|]
    <= (1.5 nb + 9) u S`` with ``S = |gamma| (1 + kappa) (1 + |y_n|) + |beta|``,
    and ``1.5 nb + 9 <= blocked_budget(K, block)``. In f32 the same S with u32.
    """
    n, h, w, c = x.shape
    xg = x.astype(f64).reshape(n, h * w, num_groups, c // num_groups)
    mu = xg.mean(axis=(1, 3), keepdims=True)
    sd = np.sqrt(xg.var(axis=(1, 3), keepdims=True) + eps)
    kappa = np.abs(xg).mean(axis=(1, 3), keepdims=True) / sd
    s = ((1 + kappa) * (1 + np.abs(xg - mu) / sd)).reshape(n, h, w, c)
    if gamma is not None:
        s = s * np.abs(gamma.astype(f64))
    if beta is not None:
        s = s + np.abs(beta.astype(f64))
    return s


@given(rst.group_norm_inputs(), st.booleans())
def test_gn4d_is_exactly_group_norm(args, ftz):
    x, gamma, beta, attrs = args
    orig = lambda x, g, b: ops.group_norm(x, g, b, **attrs)  # noqa: E731
    rew = lambda x, g, b: ops.gn4d(x, g, b, **attrs)  # noqa: E731
    for mode in MODES:
        for block in ((4, 32) if mode == "f16" else (32,)):
            assert_rewrite_equivalent(orig, rew, x, gamma, beta, mode=mode, budget=0, block=block, ftz=ftz)
            with precision(mode, block=block, ftz=ftz):
                assert np.array_equal(orig(x, gamma, beta), rew(x, gamma, beta), equal_nan=True)


@given(rst.group_norm_inputs(), st.sampled_from([4, 32]), st.booleans())
def test_group_norm_fused(args, block, affine):
    x, gamma, beta, attrs = args
    if not affine:
        gamma = beta = None
    g = attrs["num_groups"]
    scale = _gn_scale(x, gamma, beta, g, attrs["eps"])
    orig = lambda x, gm, bt: ops.group_norm(x, gm, bt, **attrs)  # noqa: E731
    rew = lambda x, gm, bt: ops.group_norm_fused(x, gm, bt, **attrs)  # noqa: E731
    for mode in ("f32", "f32_f16"):
        assert_rewrite_equivalent(orig, rew, x, gamma, beta, mode=mode, scale=scale)
    k = x.shape[1] * x.shape[2] * x.shape[3] // g
    assert_rewrite_equivalent(orig, rew, x, gamma, beta, mode="f16", block=block, scale=scale,
                              budget=blocked_budget(k, block))


# ---------------------------------------------------------------- GELU, GEGLU

GELU_TANH = lambda x: ops.gelu(x, approximate="tanh")  # noqa: E731
GEGLU_TANH = lambda h: ops.geglu(h, approximate="tanh")  # noqa: E731


@given(rst.gelu_inputs(max_abs=10.0))
def test_gelu_clip_is_exact_within_M(args):
    for mode in MODES:
        assert_rewrite_equivalent(GELU_TANH, ops.gelu_clip, *args, mode=mode, budget=0)
        with precision(mode):
            assert np.array_equal(GELU_TANH(*args), ops.gelu_clip(*args))


@given(rst.gelu_inputs(max_abs=60.0))
def test_gelu_clip_is_exact_beyond_M_in_f32(args):
    """Past M tanh has saturated to exactly +-1 in float32 on both sides."""
    with precision("f32"):
        assert np.array_equal(GELU_TANH(*args), ops.gelu_clip(*args))


@pytest.mark.parametrize("ftz", [False, True])
def test_gelu_clip_exhaustive_over_fp16(ftz):
    """Every finite fp16 value, every mode: clipping never changes tanh-GELU's
    value (in f16 the original's x**3 overflows for |x| >= 40.3, but tanh(inf)
    saturates to the same +-1 the clipped input reaches)."""
    x = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    x = x[np.isfinite(x)]
    for mode in MODES:
        with precision(mode, ftz=ftz):
            a, b = GELU_TANH(x), ops.gelu_clip(x)
        assert np.array_equal(a, b), (mode, x[a != b][:5], a[a != b][:5], b[a != b][:5])


@given(rst.gelu_inputs(max_abs=8.0))
def test_gelu_fused(args):
    for mode in MODES:
        assert_rewrite_equivalent(GELU_TANH, ops.gelu_fused, *args, mode=mode)


@given(rst.gelu_inputs(max_abs=60.0))
def test_gelu_fused_wide_range(args):
    """Up to |x| = 60, where the unfused f16 x**3 overflows."""
    for mode in MODES:
        assert_rewrite_equivalent(GELU_TANH, ops.gelu_fused, *args, mode=mode)


@given(rst.geglu_inputs(max_abs=10.0))
def test_geglu_clip_is_exact_within_M(args):
    for mode in MODES:
        assert_rewrite_equivalent(GEGLU_TANH, ops.geglu_clip, *args, mode=mode, budget=0)
        with precision(mode):
            assert np.array_equal(GEGLU_TANH(*args), ops.geglu_clip(*args))


@given(rst.geglu_inputs(max_abs=60.0))
def test_geglu_clip_is_exact_beyond_M_in_f32(args):
    with precision("f32"):
        assert np.array_equal(GEGLU_TANH(*args), ops.geglu_clip(*args))


@given(rst.geglu_inputs(max_abs=8.0))
def test_geglu_fused(args):
    for mode in MODES:
        assert_rewrite_equivalent(GEGLU_TANH, ops.geglu_fused, *args, mode=mode)


# ---------------------------------------------------------------- attention


def _attention_scale(q, k, v, heads, mask):
    """Derived error scale for attention rewrites: ``S = (1 + kappa_i) (P |V|)_i``.

    ``P |V|`` (the true probabilities times ``|v|``) bounds the output and the
    error of the ``P V`` matmul. A perturbation ``e_j`` of score ``s_ij`` changes
    ``y_i`` by at most ``2 max_j |e_j| (P |V|)_i`` (softmax is shift-invariant and
    ``p_j`` moves by ``exp(e_j)``), and every rounding of a score is bounded by
    ``u T_ij`` with ``T_ij = scale sum_d |q_id| |k_jd| + |m_ij|``; ``kappa_i`` is
    ``max_j T_ij`` over the keys that carry weight (``p_ij > 0`` in float64, so
    masked-out keys do not count). Counting roundings: f32_f16 <= (6 kappa + 3) u S
    (fp16 scale constant, stored scores, stored masked scores, P, outputs) within
    budget 8; f16 <= ((2 nb_D + 8) kappa + 2 nb_L + 5) u S, within
    ``blocked_budget(D) + blocked_budget(Lk)``.
    """
    n, lq, _ = q.shape
    lk = k.shape[1]
    qh = q.astype(f64).reshape(n, lq, heads, -1).transpose(0, 2, 1, 3)
    kh = k.astype(f64).reshape(n, lk, heads, -1).transpose(0, 2, 1, 3)
    vh = v.astype(f64).reshape(n, lk, heads, -1).transpose(0, 2, 1, 3)
    sc = qh.shape[-1] ** -0.5
    m = np.zeros((1, 1, 1, 1)) if mask is None else mask.astype(f64)
    s = sc * qh @ kh.transpose(0, 1, 3, 2) + m
    t = sc * np.abs(qh) @ np.abs(kh).transpose(0, 1, 3, 2) + np.abs(m)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    kappa = np.where(p > 0, t, 0).max(axis=-1, keepdims=True)
    y = (1 + kappa) * (p @ np.abs(vh))
    return y.transpose(0, 2, 1, 3).reshape(n, lq, -1)


def _attention_budget(mode, q, k, heads, block):
    if mode != "f16":
        return BUDGET[mode]
    return blocked_budget(q.shape[-1] // heads, block) + blocked_budget(k.shape[1], block)


def _attention_check(rewritten, q, k, v, attrs, block):
    heads, mask = attrs["heads"], attrs.get("mask")
    scale = _attention_scale(q, k, v, heads, mask)
    orig = lambda q, k, v: ops.attention(q, k, v, **attrs)  # noqa: E731
    rew = lambda q, k, v: rewritten(q, k, v, **attrs)  # noqa: E731
    for mode in MODES:
        assert_rewrite_equivalent(orig, rew, q, k, v, mode=mode, block=block, scale=scale,
                                  budget=_attention_budget(mode, q, k, heads, block))


ATTN_CASES = [(c, m) for c in (False, True) for m in (False, True)]


@pytest.mark.parametrize("cross,masked", ATTN_CASES, ids=lambda v: str(v))
@given(data=st.data())
def test_softmax_partial_fused(cross, masked, data):
    q, k, v, attrs = data.draw(rst.attention_inputs(cross=cross, masked=masked))
    _attention_check(ops.softmax_partial_fused, q, k, v, attrs, data.draw(st.sampled_from([4, 32])))


@pytest.mark.parametrize("cross,masked", ATTN_CASES, ids=lambda v: str(v))
@given(data=st.data())
def test_flash_attention(cross, masked, data):
    q, k, v, attrs = data.draw(rst.attention_inputs(cross=cross, masked=masked))
    tile = data.draw(st.sampled_from([1, 2, 3, 64]))
    rewritten = lambda q, k, v, **kw: ops.flash_attention(q, k, v, tile=tile, **kw)  # noqa: E731
    _attention_check(rewritten, q, k, v, attrs, data.draw(st.sampled_from([4, 32])))


@pytest.mark.parametrize("rewritten", [ops.softmax_partial_fused, ops.flash_attention], ids=lambda f: f.__name__)
@given(rst.attention_inputs(masked=True, allow_fully_masked=True), st.sampled_from([-10000.0, -1e9]))
def test_attention_rewrites_with_fully_masked_rows(rewritten, args, mask_value):
    """Rows may be fully masked. With -10000 every row stays finite in every mode
    (the scale's kappa includes |mask|, so only the finiteness pattern and the
    unmasked rows are tight). A -1e9 mask is -inf in fp16 storage: fully masked
    rows become NaN in the original and must be NaN in the rewrite, at exactly the
    same places (inf/NaN are never tolerated away)."""
    q, k, v, attrs = args
    attrs = {**attrs, "mask": np.where(attrs["mask"] < 0, np.float32(mask_value), np.float32(0))}
    scale = _attention_scale(q, k, v, attrs["heads"], attrs["mask"])
    for mode in MODES:
        assert_rewrite_equivalent(lambda q, k, v: ops.attention(q, k, v, **attrs),
                                  lambda q, k, v: rewritten(q, k, v, **attrs), q, k, v, mode=mode, scale=scale,
                                  budget=_attention_budget(mode, q, k, attrs["heads"], 32))
        if mode == "f32_f16" and mask_value == -1e9:
            with precision(mode):
                y = rewritten(q, k, v, **attrs)
            full = (attrs["mask"] < 0).all(axis=-1)[:, 0]  # (N, rows)
            rows_nan = np.isnan(y).all(axis=-1)  # (N, Lq)
            assert np.array_equal(rows_nan, np.broadcast_to(full, rows_nan.shape))


# ---------------------------------------------------------------- Winograd


def _winograd_tiny(mode: str, ftz: bool) -> float:
    """Below this magnitude an fp16 rounding error is absolute: <= u * max(|v|, 2**-14)
    (subnormal spacing 2**-24), or a flush of up to 2**-14 = u * 2**-3 under FTZ."""
    if mode == "f32":
        return 0.0
    return 2.0**-3 if ftz else 2.0**-14


@pytest.mark.parametrize("tile", [2, 4])
@given(args=rst.winograd_inputs(), ftz=st.booleans())
# Shrunk: every value 2**-14. U = G w G^T is subnormal (coefficients down to 1/4),
# so Winograd's fp16 intermediates round absolutely; fixed by winograd_error_scale(tiny=).
@example(args=(np.full((1, 1, 1, 6), 2.0**-14, np.float32), np.full((3, 3, 6, 1), 2.0**-14, np.float32), None,
               {"padding": 1}), ftz=False)
def test_conv2d_winograd(tile, args, ftz):
    x, w, b, attrs = args
    orig = lambda x, w, b: ops.conv2d(x, w, b, **attrs)  # noqa: E731
    rew = lambda x, w, b: ops.conv2d_winograd(x, w, b, tile=tile, **attrs)  # noqa: E731
    for mode in MODES:
        scale = ops.winograd_error_scale(x, w, tile=tile, tiny=_winograd_tiny(mode, ftz), **attrs)
        if b is not None:
            scale = scale + np.abs(b)
        assert_rewrite_equivalent(orig, rew, x, w, b, mode=mode, ftz=ftz, scale=scale,
                                  budget=winograd_budget(mode, tile))


def test_winograd_error_scale_tiny_default_is_unchanged():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 5, 6, 3)).astype(np.float32), rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
    for tile in (2, 4):
        a = ops.winograd_error_scale(x, w, tile=tile)
        assert np.array_equal(a, ops.winograd_error_scale(x, w, tile=tile, tiny=0.0))
        assert (ops.winograd_error_scale(x, w, tile=tile, tiny=2.0**-14) > a).all()


# ---------------------------------------------------------------- int8 weights


@st.composite
def _int8_weights(draw):
    """(w, axis): linear (out, in) weights quantized along 0, or conv HWIO along -1;
    magnitudes from fp16-subnormal-sized channels to 1000."""
    conv = draw(st.booleans())
    shape = draw(st.tuples(st.sampled_from([1, 3]), st.sampled_from([1, 3]), st.integers(1, 8), st.integers(1, 8))
                 if conv else st.tuples(st.integers(1, 16), st.integers(1, 16)))
    bound = draw(st.sampled_from([1e-4, 1.0, 8.0, 1000.0]))
    w = draw(rst.fp16_arrays(shape, min_value=-bound, max_value=bound, allow_subnormal=draw(st.booleans())))
    return w, (-1 if conv else 0)


@given(_int8_weights(), st.booleans())
# Shrunk from the documented bound ``scale/2 + u16 |w|`` alone: a channel of fp16
# subnormals has scale ~ 8e-8, finer than fp16's subnormal spacing (6e-8), so the
# dequantized weight is off by up to half that spacing (docstring fixed to say so).
@example((2.0**-24 * np.array([[141.0, 168.0]], np.float32), 0), False)
def test_int8_roundtrip_error_bound(w_axis, ftz):
    """Per channel: |w - deq| <= (scale/2 + u16 |w|) (1 + 2**-10) + floor, where the
    factor covers u16 scale/2 and the float32 steps and the floor is fp16's
    (2**-24; 2**-14 under FTZ) for values below the normal range."""
    w, axis = w_axis
    q, s = ops.quantize_int8(w, axis=axis)
    assert q.dtype == np.int8 and s.shape == (w.shape[axis],) and s.dtype == np.float32
    assert (np.abs(q.astype(int)) <= 127).all()
    shp = [1] * w.ndim
    shp[axis] = -1
    sc = s.reshape(shp).astype(f64)
    bound = (sc / 2 + U_F16 * np.abs(w)) * (1 + 2.0**-10) + tolerance_floor("f16", ftz)
    for mode in MODES:
        with precision(mode, ftz=ftz):
            deq = ops.dequantize_int8(q, s, axis=axis)
        if mode == "f32":  # the float32 product, as a delegate dequantizing to fp32
            np.testing.assert_array_equal(deq, q.astype(np.float32) * s.reshape(shp))
        else:  # fp16 values in fp16-storage modes
            np.testing.assert_array_equal(round_f16(deq, ftz=ftz), deq)
        err = np.abs(w.astype(f64) - deq)
        assert (err <= bound).all(), f"{mode}: excess {float((err - bound).max()):.3g}"
    # each channel's largest magnitude maps to +-127
    red = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    amax = np.max(np.abs(w), axis=red)
    assert (np.max(np.abs(q.astype(int)), axis=red)[amax > 0] == 127).all()


# ---------------------------------------------------------------- the assertion can fail


def _poke_channel(x, w):
    x, w = x.copy(), w.copy()
    x[..., -1] = 1.0
    w[:, :, -1, :] = 0.5
    return x, w


def _check_message(exc: RewriteMismatch, c):
    msg = str(exc)
    assert f"max |a-b| = {c.max_abs_err:.3g}" in msg
    assert f"at {c.worst_index}" in msg
    assert "would pass with budget" in msg
    needed = float(re.search(r"would pass with budget >= ([0-9.e+]+)", msg).group(1))
    assert needed == pytest.approx(c.needed_budget, abs=0.05)


def _assert_detected(original, wrong, *inputs, mode="f32", **kw):
    c, _ = compare(original, wrong, *inputs, mode=mode, **kw)
    with pytest.raises(RewriteMismatch) as info:
        assert_rewrite_equivalent(original, wrong, *inputs, mode=mode, **kw)
    _check_message(info.value, c)
    # The budget the message reports is the one that passes; a little less fails.
    assert compare(original, wrong, *inputs, mode=mode, **{**kw, "budget": c.needed_budget * (1 + 1e-6) + 1e-6})[0].passed
    assert not compare(original, wrong, *inputs, mode=mode, **{**kw, "budget": c.needed_budget * 0.99})[0].passed
    return c


@given(_either_padding(rst.conv_inputs, max_channels=8))
def test_detects_a_dropped_input_channel(args):
    x, w, b, attrs = args
    assume(x.shape[-1] >= 2)
    x, w = _poke_channel(x, w)  # the dropped channel contributes >= 0.5 to every output
    orig = lambda x, w, b: ops.conv2d(x, w, b, **attrs)  # noqa: E731
    wrong = lambda x, w, b: ops.conv2d(x[..., :-1], w[:, :, :-1], b, **attrs)  # noqa: E731
    c = _assert_detected(orig, wrong, x, w, b)
    assert c.max_abs_err >= 0.5 - 1e-6


@given(rst.attention_inputs(masked=False, min_head_dim=2, max_len=8).filter(lambda a: a[1].shape[1] >= 2))
def test_detects_attention_without_scale(args):
    q, k, v, attrs = args
    q, k, v = np.ones_like(q), -np.ones_like(k), -np.ones_like(v)
    k[:, 0], v[:, 0] = 1.0, 1.0  # key 0 wins by 2 D scale; its weight depends on the scale
    orig = lambda q, k, v: ops.attention(q, k, v, **attrs)  # noqa: E731
    wrong = lambda q, k, v: ops.attention(q, k, v, scale=1.0, **attrs)  # noqa: E731
    _assert_detected(orig, wrong, q, k, v)


def _gelu_wrong_coeff(x):
    x = np.asarray(x, np.float32)
    inner = np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.04) * x * x * x)
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(inner))


@given(rst.gelu_inputs())
def test_detects_gelu_with_a_wrong_coefficient(args):
    (x,) = args
    x = x.copy()
    x.flat[0] = 1.5  # where the x**3 term matters
    _assert_detected(GELU_TANH, _gelu_wrong_coeff, x)


@given(rst.linear_inputs(), st.sampled_from(MODES), st.sampled_from([np.nan, np.inf, -np.inf]),
       st.data(), st.sampled_from([8.0, 1e30]))
def test_nonfinite_mismatch_always_fails(args, mode, bad, data, budget):
    x, w, b = args
    with precision(mode):
        y = ops.linear(x, w, b)
    idx = data.draw(st.tuples(*[st.integers(0, d - 1) for d in y.shape]))

    def broken(x, w, b):
        out = np.array(ops.linear(x, w, b))
        out[idx] = bad
        return out

    for orig, rew in ((ops.linear, broken), (broken, ops.linear)):
        with pytest.raises(RewriteMismatch, match="inf/NaN differ"):
            assert_rewrite_equivalent(orig, rew, x, w, b, mode=mode, budget=budget)
    # the same non-finite value in the same place on both sides is agreement
    assert_rewrite_equivalent(broken, broken, x, w, b, mode=mode)
