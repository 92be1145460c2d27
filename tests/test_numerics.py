"""refsd.numerics: fp16 rounding, rounding statistics, precision modes, and the
f16 emulation model checked bit for bit against sequential ``np.float16`` loops.

The reference for "what fp16 rounding is" is NumPy's own float32 -> float16
cast (``x.astype(np.float16)``), which is IEEE round-to-nearest-even with
overflow to inf; the midpoint tests below also check the tie rule directly
from the bit patterns, so they do not trust NumPy blindly either.

Exactness tests compare with ``np.array_equal`` (value equality: -0.0 == +0.0,
``equal_nan=True`` where the emulation legitimately produces NaN from
inf - inf). No tolerance anywhere in this file: every comparison is exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from refsd import ops
from refsd.numerics import (
    FP16_MAX,
    FP16_MIN_NORMAL,
    MODES,
    Precision,
    RoundingStats,
    current_precision,
    precision,
    round_f16,
    round_f16_stats,
)
from refsd.ops import _core

SEED = 20240601


# ------------------------------------------------------------------ helpers


def _reference_round(x32: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x32.astype(np.float16).astype(np.float32)


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    """Bit-for-bit equality of float32 arrays; NaNs only need to be NaN with
    the same sign (payloads are not fp16 semantics)."""
    assert got.dtype == np.float32 and want.dtype == np.float32
    assert got.shape == want.shape
    gn, wn = np.isnan(got), np.isnan(want)
    np.testing.assert_array_equal(gn, wn, err_msg="NaN positions differ")
    np.testing.assert_array_equal(np.signbit(got[gn]), np.signbit(want[wn]), err_msg="NaN signs differ")
    gb, wb = got.view(np.uint32)[~gn], want.view(np.uint32)[~wn]
    bad = np.flatnonzero(gb != wb)
    if bad.size:
        i = bad[0]
        raise AssertionError(
            f"{bad.size} of {gb.size} elements differ; first: got bits {gb[i]:#010x} ({gb.view(np.float32)[i]!r}), "
            f"want {wb[i]:#010x} ({wb.view(np.float32)[i]!r})"
        )


def all_f16_as_f32() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def binade(lo_bits: int) -> np.ndarray:
    """Every float32 whose exponent field is that of ``lo_bits`` (2**23 values)."""
    return (np.uint32(lo_bits) + np.arange(1 << 23, dtype=np.uint32)).view(np.float32)


# ------------------------------------------------------------------ round_f16 == astype


def test_round_f16_identity_on_all_fp16_values():
    x = all_f16_as_f32()
    assert_bits_equal(round_f16(x), x)
    assert_bits_equal(round_f16(x), _reference_round(x))
    # Idempotent, and the NaNs (0x7C01..0x7FFF and negatives: 2 * 1023 patterns) stay NaN.
    assert int(np.isnan(round_f16(x)).sum()) == 2 * 1023


def _midpoints() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Midpoints between adjacent positive finite fp16 values h < h+1 (h+1 may
    be the 'value' 65536 just above 65504, i.e. the overflow threshold 65520),
    plus, for each, the fp16 bit patterns of the lower and upper neighbour."""
    h = np.arange(0, 0x7BFF + 1, dtype=np.uint16)
    lo = h.view(np.float16).astype(np.float64)
    up_bits = h + np.uint16(1)
    up = up_bits.view(np.float16).astype(np.float64)
    up[np.isinf(up)] = 65536.0
    mid = (lo + up) / 2  # 12 significant bits: exact in float32 (also in fp16's subnormal range)
    mid32 = mid.astype(np.float32)
    assert np.array_equal(mid32.astype(np.float64), mid)
    return mid32, h, up_bits


def _f16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.uint16).view(np.float16).astype(np.float32)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_round_f16_ties_to_even(sign):
    mid, lo_bits, up_bits = _midpoints()
    mid = np.float32(sign) * mid
    even = np.where(lo_bits % 2 == 0, lo_bits, up_bits)
    want = np.float32(sign) * _f16_bits_to_f32(even)
    got = round_f16(mid)
    assert_bits_equal(got, want)
    assert_bits_equal(got, _reference_round(mid))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_round_f16_just_off_midpoints(sign):
    mid, lo_bits, up_bits = _midpoints()
    mid = np.float32(sign) * mid
    toward_zero = np.nextafter(mid, np.float32(0))
    away = np.nextafter(mid, np.float32(sign * np.inf))
    want_tz = np.float32(sign) * _f16_bits_to_f32(lo_bits)
    want_away = np.float32(sign) * _f16_bits_to_f32(up_bits)  # 0x7C00 is inf
    assert_bits_equal(round_f16(toward_zero), want_tz)
    assert_bits_equal(round_f16(away), want_away)
    assert_bits_equal(round_f16(toward_zero), _reference_round(toward_zero))
    assert_bits_equal(round_f16(away), _reference_round(away))


def test_round_f16_random_float32_bit_patterns():
    # 2**22 uniformly random bit patterns: NaNs with payloads, infs, float32
    # subnormals, huge and tiny values, both signs.
    bits = np.random.default_rng(SEED).integers(0, 1 << 32, size=1 << 22, dtype=np.uint32)
    x = bits.view(np.float32)
    assert np.isnan(x).any() and (np.abs(x) > 65520).any() and (np.abs(x) < 2**-126).any()
    assert_bits_equal(round_f16(x), _reference_round(x))


@pytest.mark.parametrize(
    "lo_bits",
    [
        0x3F800000,  # [1, 2): the normal path, every rounding case of the 13 dropped bits
        0x47000000,  # [32768, 65536): 65504, the overflow threshold 65520, overflow
        0x38000000,  # [2**-15, 2**-14): fp16 subnormals and the round-up into 2**-14
        0x33000000,  # [2**-25, 2**-24): smallest subnormal, the tie 2**-25 -> 0
        0x00000000,  # float32 subnormals -> +0
    ],
    ids=["[1,2)", "[2^15,2^16)", "[2^-15,2^-14)", "[2^-25,2^-24)", "f32-subnormal"],
)
def test_round_f16_exhaustive_binades(lo_bits):
    x = binade(lo_bits)
    assert_bits_equal(round_f16(x), _reference_round(x))
    assert_bits_equal(round_f16(-x), _reference_round(-x))


def test_round_f16_special_values():
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 65520.0, -65520.0, 65519.99, -65519.99,
                  65504.0, 1e9, 3.4e38], np.float32)
    r = round_f16(x)
    assert np.isnan(r[0]) and np.isnan(r[1]) and np.signbit(r[1])
    assert r[2] == np.inf and r[3] == -np.inf
    assert r[4] == 0 and not np.signbit(r[4]) and r[5] == 0 and np.signbit(r[5])
    assert r[6] == np.inf and r[7] == -np.inf  # >= 65520 overflows (tie between 65504 and 2**16: even = inf)
    assert r[8] == 65504.0 and r[9] == -65504.0  # 65519.99 is below the tie
    assert r[10] == FP16_MAX and r[11] == np.inf and r[12] == np.inf
    # a NaN payload that the fp16 cast would truncate away still stays NaN
    payload = np.array([0x7F800001, 0xFF800001, 0x7FC00000], np.uint32).view(np.float32)
    assert np.isnan(round_f16(payload)).all()


def test_round_f16_shapes_layout_and_input_untouched():
    rng = np.random.default_rng(SEED)
    x = (rng.standard_normal((6, 7, 5)) * 100).astype(np.float32)
    keep = x.copy()
    view = x[::2, 1:, ::-1]  # non-contiguous, negative stride
    r = round_f16(view)
    assert r.shape == view.shape
    assert_bits_equal(r, _reference_round(np.ascontiguousarray(view)))
    np.testing.assert_array_equal(x, keep)
    # 0-d input keeps its shape (a scalar constant must stay a scalar)
    r0 = round_f16(np.float32(3.1))
    assert r0.shape == () and r0 == np.float16(3.1)
    assert round_f16(np.zeros((0, 3), np.float32)).shape == (0, 3)
    r0s, _ = round_f16_stats(np.float32(70000.0))
    assert r0s.shape == () and r0s == np.inf


def test_round_f16_float64_input_is_rounded_once():
    """A float64 input must be rounded to the *nearest* fp16 value, not first
    to float32 (which can land exactly on an fp16 midpoint and then tie to even)."""
    x = np.float64(1 + 2**-11 + 2**-40)  # just above the midpoint between 1 and 1 + 2**-10
    assert round_f16(x) == np.float32(1 + 2**-10)
    mid, _, _ = _midpoints()
    m64 = mid.astype(np.float64)
    rng = np.random.default_rng(SEED)
    eps = np.ldexp(rng.uniform(0.5, 1.0, m64.size), np.frexp(m64)[1] - 30)  # far below a float32 ulp
    for x64 in (m64 + eps, m64 - eps, -(m64 + eps), m64 * 1.001, np.array([1e300, -1e300, 1e-300, np.nan, np.inf])):
        with np.errstate(over="ignore"):
            want = x64.astype(np.float16).astype(np.float32)
        assert_bits_equal(round_f16(x64), want)
    # stats of a float64 input count the overflow of a finite value
    r, st = round_f16_stats(np.array([1e300, 70000.0, 1.0]))
    assert st.overflow == 2 and not st.had_inf and np.isinf(r[:2]).all()


# ------------------------------------------------------------------ flush to zero


def test_round_f16_ftz():
    """ftz=True: every input with |x| < 2**-14 (fp16's smallest normal) becomes a
    zero of its own sign, everything else is rounded exactly as without ftz.
    The threshold is on the input, i.e. tininess is detected before rounding (as
    ARM does): [2**-14 - 2**-25, 2**-14), which would round up to 2**-14, flushes too."""
    rng = np.random.default_rng(SEED + 1)
    x = np.concatenate([
        all_f16_as_f32(),
        _midpoints()[0],
        -_midpoints()[0],
        rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint32).view(np.float32),
        binade(0x38000000)[::7],
    ])
    plain = round_f16(x)
    flushed = round_f16(x, ftz=True)
    small = np.abs(x) < np.float32(FP16_MIN_NORMAL)
    assert small.sum() > 1000
    assert (flushed[small] == 0).all()
    np.testing.assert_array_equal(np.signbit(flushed[small]), np.signbit(x[small]))
    assert_bits_equal(flushed[~small], plain[~small])
    # every fp16-subnormal result of plain rounding is a zero under ftz
    sub = (plain != 0) & (np.abs(plain) < np.float32(FP16_MIN_NORMAL))
    assert sub.sum() > 1000 and (flushed[sub] == 0).all()
    # the stats variant returns the same array
    assert_bits_equal(round_f16_stats(x, ftz=True)[0], flushed)
    assert_bits_equal(round_f16_stats(x)[0], plain)


@pytest.mark.parametrize("n_small", [1, 3, 127, 128, 129, 1000, 4096])
def test_round_f16_small_value_paths(n_small):
    """round_f16 may treat |x| < 2**-14 differently depending on how many there
    are (gather/scatter for few, a branch-free select for many): every mix must
    give the same bits, with and without ftz, and the same stats."""
    rng = np.random.default_rng(n_small)
    n = 4096
    big = (rng.standard_normal(n) * 10).astype(np.float32)
    big[np.abs(big) < 2**-13] = 1.0
    small = (rng.choice([-1, 1], n) * np.exp2(rng.uniform(-27, -14, n))).astype(np.float32)
    small[:4] = [2.0**-25, -(2.0**-25), np.nextafter(np.float32(2.0**-14), np.float32(0)), 0.0]
    x = big.copy()
    idx = rng.permutation(n)[:n_small]
    x[idx] = small[:n_small]
    x[rng.permutation(n)[:5]] = [np.nan, np.inf, -np.inf, 70000.0, -0.0]
    assert_bits_equal(round_f16(x), _reference_round(x))
    r, st = round_f16_stats(x)
    assert_bits_equal(r, _reference_round(x))
    is_small = (np.abs(x) < FP16_MIN_NORMAL) & (x != 0)
    assert st.to_zero == int(np.count_nonzero(is_small & (r == 0)))
    assert st.to_subnormal == int(np.count_nonzero(is_small & (r != 0)))
    assert (st.overflow, st.had_nan, st.had_inf, st.max_abs) == (1, True, True, math.inf)
    want_ftz = np.where(np.abs(x) < FP16_MIN_NORMAL, np.copysign(np.float32(0), x), _reference_round(x))
    assert_bits_equal(round_f16(x, ftz=True), want_ftz.astype(np.float32))
    rf, stf = round_f16_stats(x, ftz=True)
    assert_bits_equal(rf, want_ftz.astype(np.float32))
    assert (stf.to_zero, stf.to_subnormal) == (int(np.count_nonzero(is_small)), 0)


# ------------------------------------------------------------------ round_f16_stats


STATS_X = np.array([1.0, 70000.0, -70000.0, 65519.99, 65520.0, np.inf, np.nan, 1e-8, 2**-25, 3e-8, 1e-5, 0.0, -0.0,
                    -1e-5], np.float32)


def test_stats_counts_crafted():
    r, st = round_f16_stats(STATS_X)
    # overflow: 70000, -70000, 65520 (finite -> inf); 65519.99 -> 65504; inf was already inf
    # to_zero: 1e-8 (< 2**-25) and 2**-25 (tie -> even = 0); 0 and -0 were zero already
    # to_subnormal: 3e-8 (> 2**-25 -> 2**-24), 1e-5, -1e-5
    assert st == RoundingStats(overflow=3, to_zero=2, to_subnormal=3, had_nan=True, had_inf=True, max_abs=math.inf)
    assert r[3] == 65504.0 and r[9] == 2.0**-24
    _, st = round_f16_stats(STATS_X, ftz=True)
    assert (st.overflow, st.to_zero, st.to_subnormal) == (3, 5, 0)


@pytest.mark.parametrize(
    "x, want",
    [
        ([65519.99, -3.0, 2**-14, 6e-5], RoundingStats(0, 0, 1, False, False, 65504.0)),
        ([-65519.99, 1.0], RoundingStats(0, 0, 0, False, False, 65504.0)),
        ([np.nan, np.nan], RoundingStats(0, 0, 0, True, False, 0.0)),
        ([np.nan, -2.5, 1e-9], RoundingStats(0, 1, 0, True, False, 2.5)),
        ([-np.inf, 1.0], RoundingStats(0, 0, 0, False, True, math.inf)),
        ([65520.0], RoundingStats(1, 0, 0, False, False, math.inf)),
        ([0.1], RoundingStats(0, 0, 0, False, False, float(np.float16(0.1)))),
        ([], RoundingStats(0, 0, 0, False, False, 0.0)),
    ],
)
def test_stats_small_cases(x, want):
    _, st = round_f16_stats(np.array(x, np.float32))
    assert st == want


def test_stats_max_abs_matches_rounded_result():
    rng = np.random.default_rng(SEED)
    for scale in (1e-6, 3e-5, 1.0, 3e4, 1e5):
        x = (rng.standard_normal(1000) * scale).astype(np.float32)
        r, st = round_f16_stats(x)
        assert st.max_abs == float(np.max(np.abs(r)))
        assert st.overflow == int(np.count_nonzero(np.isinf(r)))
        assert st.to_zero == int(np.count_nonzero((r == 0) & (x != 0)))
        # "lands in the subnormal range" is judged on the input (tininess before rounding, the
        # same threshold as ftz): 2**-25 < |x| < 2**-14, including the band that rounds up to 2**-14
        tiny = (np.abs(x) < FP16_MIN_NORMAL) & (r != 0)
        assert st.to_subnormal == int(np.count_nonzero(tiny))


# ------------------------------------------------------------------ Precision


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "f64"}, "unknown precision mode"),
    ({"mode": "F16"}, "unknown precision mode"),
    ({"block": 0}, "positive integer"),
    ({"block": -4}, "positive integer"),
    ({"block": 2.5}, "positive integer"),
    ({"block": "4"}, "positive integer"),
])
def test_precision_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Precision(**kwargs)
    with pytest.raises(ValueError, match=match):
        with precision(**kwargs):
            pass  # pragma: no cover


def test_precision_properties():
    assert MODES == ("f32", "f32_f16", "f16")
    p32, p3216, p16 = Precision("f32"), Precision("f32_f16"), Precision("f16")
    assert (p32.storage16, p32.math16, p32.unit_roundoff) == (False, False, 2.0**-24)
    assert (p3216.storage16, p3216.math16, p3216.unit_roundoff) == (True, False, 2.0**-11)
    assert (p16.storage16, p16.math16, p16.unit_roundoff) == (True, True, 2.0**-11)
    assert Precision() == Precision("f32", False, 32)


def test_precision_context_nesting_restores():
    assert current_precision() == Precision()
    with precision("f16", block=4) as outer:
        assert current_precision() is outer and outer == Precision("f16", False, 4)
        with precision("f32_f16", ftz=True):
            assert current_precision() == Precision("f32_f16", True, 32)
            with precision(Precision("f32")):
                assert current_precision() == Precision("f32")
            assert current_precision() == Precision("f32_f16", True, 32)
        assert current_precision() is outer
        with pytest.raises(RuntimeError):
            with precision("f32"):
                raise RuntimeError("boom")
        assert current_precision() is outer
    assert current_precision() == Precision()


# ------------------------------------------------------------------ f16 emulation == np.float16 scalar loops


def f16_values(rng, shape, regime: str) -> np.ndarray:
    """fp16-representable float32 arrays.

    ``normal``: N(0, 2); ``overflow``: N(0, 150), so products reach ~1e5 and
    running sums pass 65504 (inf, and inf - inf = NaN); ``underflow``:
    magnitudes 2**-13 .. 2**-6, so products (2**-26 .. 2**-12) land in fp16's
    subnormal range or round to zero; ``mixed``: log-uniform 2**-14 .. 2**8.
    """
    if regime == "normal":
        x = rng.standard_normal(shape) * 2
    elif regime == "overflow":
        x = rng.standard_normal(shape) * 150
    elif regime == "underflow":
        x = rng.choice([-1, 1], shape) * np.exp2(rng.uniform(-13, -6, shape))
    elif regime == "mixed":
        x = rng.choice([-1, 1], shape) * np.exp2(rng.uniform(-14, 8, shape))
    else:
        raise AssertionError(regime)
    return round_f16(x.astype(np.float32))


REGIMES = ["normal", "overflow", "underflow", "mixed"]
SEEDS = [0, 1, 2]


def loop_dot(terms_a, terms_b) -> np.float16:
    """Sequential fp16 dot product: acc = fp16(acc + fp16(a_k * b_k)).
    Starting from +0 gives the same value as starting from the first product
    (0 + p == p; only the sign of a zero can differ, and -0 == +0)."""
    acc = np.float16(0)
    for a, b in zip(terms_a, terms_b):
        acc = np.float16(acc + np.float16(a) * np.float16(b))
    return acc


def loop_matmul(a, b) -> np.ndarray:
    m, k = a.shape
    n = b.shape[1]
    out = np.empty((m, n), np.float32)
    with np.errstate(all="ignore"):
        for i in range(m):
            for j in range(n):
                out[i, j] = loop_dot(a[i, :], b[:, j])
    return out


def test_loop_model_start_is_the_first_product():
    rng = np.random.default_rng(SEED)
    p = f16_values(rng, 1000, "mixed").astype(np.float16)
    np.testing.assert_array_equal(np.float16(0) + p, p)


def _regime_happened(a, b, regime, want):
    """Make sure a regime exercises what it claims (else the test proves nothing)."""
    exact = a.astype(np.float64)[:, :, None] * b.astype(np.float64)[None, :, :]
    if regime == "overflow":
        assert not np.isfinite(want).all()
    if regime == "underflow":
        p16 = round_f16(exact.astype(np.float32))
        assert ((p16 == 0) & (exact != 0)).any()
        assert ((np.abs(p16) < FP16_MIN_NORMAL) & (p16 != 0)).any()


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("seed", SEEDS)
def test_matmul_block1_equals_float16_loop(seed, regime):
    rng = np.random.default_rng(seed)
    a, b = f16_values(rng, (3, 37), regime), f16_values(rng, (37, 4), regime)
    want = loop_matmul(a, b)
    _regime_happened(a, b, regime, want)
    with precision("f16", block=1), np.errstate(all="ignore"):
        got = _core.matmul(a, b)
    assert got.dtype == np.float32
    assert np.array_equal(got, want, equal_nan=True)


def test_matmul_block1_batched():
    rng = np.random.default_rng(7)
    a, b = f16_values(rng, (2, 3, 4, 19), "normal"), f16_values(rng, (2, 3, 19, 5), "normal")
    with precision("f16", block=1):
        got = _core.matmul(a, b)
    for i in range(2):
        for j in range(3):
            assert np.array_equal(got[i, j], loop_matmul(a[i, j], b[i, j]))


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("seed", SEEDS)
def test_reduce_sum_block1_equals_float16_loop(seed, regime):
    rng = np.random.default_rng(seed)
    x = f16_values(rng, (4, 61), regime)
    if regime == "overflow":
        x = round_f16(x * 40)  # single values stay finite; sums of a few overflow
    want = np.empty(4, np.float32)
    with np.errstate(all="ignore"):
        for i in range(4):
            acc = np.float16(0)
            for k in range(61):
                acc = np.float16(acc + np.float16(x[i, k]))
            want[i] = acc
    with precision("f16", block=1):
        got = _core.reduce_sum(x, -1)
        got_keep = _core.reduce_sum(x, 1, keepdims=True)
    assert np.array_equal(got, want, equal_nan=True)
    assert got_keep.shape == (4, 1) and np.array_equal(got_keep[:, 0], want, equal_nan=True)


def test_reduce_sum_block1_multi_axis_c_order():
    """Reducing axes (1, 3) sums in C order of the reduced axes (axis 3 fastest)."""
    rng = np.random.default_rng(11)
    x = f16_values(rng, (2, 5, 3, 7), "mixed")
    want = np.empty((2, 3), np.float32)
    for n in range(2):
        for c in range(3):
            acc = np.float16(0)
            for i in range(5):
                for k in range(7):
                    acc = np.float16(acc + np.float16(x[n, i, c, k]))
            want[n, c] = acc
    with precision("f16", block=1):
        got = _core.reduce_sum(x, (3, 1))
    assert np.array_equal(got, want)


@pytest.mark.parametrize("regime", ["normal", "overflow", "mixed"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_block1_equals_float16_loop(regime, with_bias):
    rng = np.random.default_rng(3)
    x, w = f16_values(rng, (2, 3, 29), regime), f16_values(rng, (5, 29), regime)
    b = f16_values(rng, (5,), "normal") if with_bias else None
    want = loop_matmul(x.reshape(-1, 29), w.T).reshape(2, 3, 5)
    if with_bias:
        with np.errstate(all="ignore"):
            want = (want.astype(np.float16) + b.astype(np.float16)).astype(np.float32)
    with precision("f16", block=1):
        got = ops.linear(x, w, b)
    assert np.array_equal(got, want, equal_nan=True)


def loop_conv2d(x, w, b, stride, padding, *, block: int = 1):
    """Scalar reference of the blocked model for conv2d: the K = KH*KW*Cin
    terms in C order of (kh, kw, cin); padded positions are zero terms."""
    (pt, pb), (pl, pr) = padding
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    n, hp, wp, cin = xp.shape
    kh, kw, _, cout = w.shape
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    out = np.empty((n, ho, wo, cout), np.float32)
    with np.errstate(all="ignore"):
        for ni in range(n):
            for i in range(ho):
                for j in range(wo):
                    patch = xp[ni, i * stride : i * stride + kh, j * stride : j * stride + kw, :].reshape(-1)
                    for o in range(cout):
                        wcol = w[:, :, :, o].reshape(-1)
                        acc = loop_dot(patch, wcol) if block == 1 else blocked_dot(patch, wcol, block)
                        if b is not None:
                            acc = np.float16(acc + np.float16(b[o]))
                        out[ni, i, j, o] = acc
    return out


@pytest.mark.parametrize(
    "kernel, stride, padding",
    [(1, 1, ((0, 0), (0, 0))), (3, 1, ((1, 1), (1, 1))), (3, 2, ((0, 1), (0, 1))), (3, 1, ((0, 0), (0, 0)))],
    ids=["1x1", "3x3-s1-p1", "3x3-s2-asym", "3x3-s1-p0"],
)
@pytest.mark.parametrize("regime", ["normal", "overflow", "underflow"])
def test_conv2d_block1_equals_float16_loop(kernel, stride, padding, regime):
    rng = np.random.default_rng(5)
    x = f16_values(rng, (1, 5, 5, 3), regime)
    w = f16_values(rng, (kernel, kernel, 3, 2), regime)
    b = f16_values(rng, (2,), "normal")
    for bias in (None, b):
        want = loop_conv2d(x, w, bias, stride, padding)
        with precision("f16", block=1):
            got = ops.conv2d(x, w, bias, stride=stride, padding=padding)
        assert np.array_equal(got, want, equal_nan=True)


# ---- blocked model with block > 1.
# The partial of `block` products is a float32 sum. To make the expected value
# independent of the order BLAS adds them in, inputs are k/16 with |k| <= 63
# (6 significant bits): products are multiples of 2**-8 below 2**4, so a sum of
# up to 32 of them has < 2**17 units of 2**-8 and is exact in float32 in any
# order. The fp16 roundings of partials and running sums still happen (partials
# need up to 17 bits, fp16 keeps 11). "big" scales by 2**6 so partials overflow.


def exact_partial_values(rng, shape, big=False):
    x = rng.integers(-63, 64, shape).astype(np.float32) / np.float32(16)
    return x * np.float32(64) if big else x


def blocked_dot(a, b, block: int) -> np.float16:
    """s = fp16(P_0); s = fp16(s + fp16(P_j)), P_j a float32 sum of `block` products."""
    s = None
    with np.errstate(all="ignore"):
        for k0 in range(0, len(a), block):
            part = np.float32(0)
            for k in range(k0, min(k0 + block, len(a))):
                part = np.float32(part + np.float32(a[k]) * np.float32(b[k]))
            p16 = np.float16(part)
            s = p16 if s is None else np.float16(s + p16)
    return s


@pytest.mark.parametrize("block", [4, 32])
@pytest.mark.parametrize("big", [False, True], ids=["moderate", "overflowing"])
def test_matmul_blocked_equals_partial_sum_loop(block, big):
    rng = np.random.default_rng(block)
    k = 101  # not a multiple of 4 or 32: a short last block
    a, b = exact_partial_values(rng, (4, k), big), exact_partial_values(rng, (k, 3), big)
    want = np.array([[blocked_dot(a[i], b[:, j], block) for j in range(3)] for i in range(4)], np.float32)
    with precision("f16", block=block), np.errstate(all="ignore"):
        got = _core.matmul(a, b)
    assert np.array_equal(got, want, equal_nan=True)
    if big:
        assert not np.isfinite(want).all()
    # the roundings did something: the model differs from the exact sum
    assert not np.array_equal(want, (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32))


@pytest.mark.parametrize("block", [4, 32])
def test_reduce_sum_blocked_equals_partial_sum_loop(block):
    rng = np.random.default_rng(17)
    x = exact_partial_values(rng, (5, 75)) * np.float32(9)  # k*9/16: sums of 32 need 15 bits, still exact
    ones = np.ones(75, np.float32)
    want = np.array([blocked_dot(x[i], ones, block) for i in range(5)], np.float32)
    with precision("f16", block=block):
        got = _core.reduce_sum(x, 1)
    assert np.array_equal(got, want)


def test_conv2d_blocked4_equals_partial_sum_loop():
    rng = np.random.default_rng(23)
    x = exact_partial_values(rng, (1, 4, 5, 6))
    w = exact_partial_values(rng, (3, 3, 6, 2))
    b = exact_partial_values(rng, (2,))
    pad = ((1, 1), (1, 1))
    want = loop_conv2d(x, w, b, 1, pad, block=4)
    with precision("f16", block=4):
        got = ops.conv2d(x, w, b, padding=1)
    assert np.array_equal(got, want)


# ------------------------------------------------------------------ FTZ in ops


def test_ftz_flushes_op_inputs_and_outputs():
    tiny = np.float32(2.0**-15)  # an fp16 subnormal; tiny + tiny = 2**-14 is normal
    a = np.array([tiny, -tiny, 1e-6, 1.0, 2.0**-14], np.float32)
    b = np.array([tiny, -tiny, 0.0, 2.0**-20, 0.0], np.float32)
    with precision("f32_f16"):
        plain = ops.add(a, b)
    with precision("f32_f16", ftz=True):
        flushed = ops.add(a, b)
    np.testing.assert_array_equal(plain, [2.0**-14, -(2.0**-14), round_f16(np.float32(1e-6)), 1.0, 2.0**-14])
    # inputs are flushed before the add (else 2**-15 + 2**-15 = 2**-14 would survive), signs kept
    np.testing.assert_array_equal(flushed, [0.0, 0.0, 0.0, 1.0, 2.0**-14])
    assert not np.signbit(flushed[0]) and np.signbit(flushed[1])
    # an op output stored without ftz still holds a subnormal; a later ftz op must flush it
    with precision("f32_f16"):
        y = ops.add(np.array([tiny], np.float32), np.zeros(1, np.float32))
    assert y[0] == tiny
    with precision("f32_f16", ftz=True):
        assert ops.add(y, y)[0] == 0.0
    # and in f16 the primitives flush too: 2**-8 * 2**-8 = 2**-16 is subnormal
    with precision("f16", ftz=True):
        assert ops.mul(np.float32([2.0**-8]), np.float32([2.0**-8]))[0] == 0.0
    with precision("f16"):
        assert ops.mul(np.float32([2.0**-8]), np.float32([2.0**-8]))[0] == 2.0**-16
