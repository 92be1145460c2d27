"""The fast paths of the fp16 emulation against slow references written here:
bit-identical results and identical monitor events, no tolerance.

- ``round_f16`` / ``round_into`` (magic-constant rounding) against a
  per-element reference (NumPy's float16 cast for finite and inf values, the
  float32 NaN kept as it is, FTZ applied to the input) and statistics counted
  from their definitions;
- ``round_sum_f16`` against ``round_f16`` on sums of two fp16 values;
- the blocked matmul and reduce_sum against the block loop as the precision
  model states it (one rounding per partial and per running sum);
- Winograd's cached weight transform against an uncached run.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from refsd import kernels, ops
from refsd.monitor import monitoring
from refsd.numerics import precision, round_f16, round_f16_stats, round_into, round_sum_f16
from refsd.ops import _core

U32 = np.uint32


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32).view(U32)


def _slow_round(x: np.ndarray, ftz: bool) -> np.ndarray:
    """fp16 rounding element by element as the model states it."""
    x = np.asarray(x, np.float32).reshape(-1)
    out = np.empty_like(x)
    for i, v in enumerate(x):
        if np.isnan(v):
            out[i] = v  # the float32 NaN, payload and sign kept
        elif ftz and abs(float(v)) < 2.0**-14:
            out[i] = np.copysign(np.float32(0), v)
        else:
            with np.errstate(over="ignore"):
                out[i] = np.float32(np.float16(v))
    return out


def _slow_stats(x: np.ndarray, ftz: bool):
    x = np.asarray(x, np.float32).reshape(-1)
    a = np.abs(x.astype(np.float64))
    finite = np.isfinite(a)
    overflow = int(np.count_nonzero(finite & (a >= 65520.0)))
    nonzero = finite & (a > 0)
    if ftz:
        to_zero, to_sub = int(np.count_nonzero(nonzero & (a < 2.0**-14))), 0
    else:
        to_zero = int(np.count_nonzero(nonzero & (a <= 2.0**-25)))
        to_sub = int(np.count_nonzero(nonzero & (a > 2.0**-25) & (a < 2.0**-14)))
    return overflow, to_zero, to_sub, bool(np.isnan(x).any()), bool(np.isinf(x).any())


def _hostile(rng, n: int) -> np.ndarray:
    """float32 values of every class fp16 rounding distinguishes."""
    parts = [
        rng.integers(0, 2**32, n, dtype=np.uint64).astype(U32).view(np.float32),  # any bit pattern
        (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 17, n)).astype(np.float32),
        np.float32(2.0**-24) * rng.integers(-2048, 2048, n).astype(np.float32) / np.float32(4),  # subnormal grid, ties
        np.float32([65504, 65519.99, 65520, 65536, 1e6, 2.0**-14, 2.0**-25, 2.0**-26, 1.5 * 2.0**-25, 0.0,
                    np.inf, 1e-40, 2049, 2051, 4097]),
    ]
    x = np.concatenate([np.concatenate([p, -p]) for p in parts])
    x = np.concatenate([x, np.array([0x7FC00001, 0xFFA00000, 0x7F800001], U32).view(np.float32)])  # NaN payloads
    return rng.permutation(x)


@pytest.mark.parametrize("ftz", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_f16_against_slow_reference(ftz, seed):
    x = _hostile(np.random.default_rng(seed), 3000)
    want = _slow_round(x, ftz)
    np.testing.assert_array_equal(_bits(round_f16(x, ftz=ftz)), _bits(want))
    r, st = round_f16_stats(x, ftz=ftz)
    np.testing.assert_array_equal(_bits(r), _bits(want))
    assert (st.overflow, st.to_zero, st.to_subnormal, st.had_nan, st.had_inf) == _slow_stats(x, ftz)


@pytest.mark.parametrize("ftz", [False, True])
@pytest.mark.parametrize("kind", ["normal", "tiny", "zeros", "big", "nan"])
def test_round_into_chunks_in_place(ftz, kind):
    """Chunks taking the fast path and the bit-level path side by side, in place."""
    rng = np.random.default_rng(7)
    n = (1 << 15) * 3 + 123
    x = (rng.standard_normal(n) * {"normal": 1, "tiny": 1e-5, "zeros": 1, "big": 3e4, "nan": 1}[kind]).astype(np.float32)
    if kind == "zeros":
        x[::3] = 0.0
        x[1::7] = -0.0
    if kind == "nan":
        x[n // 2] = np.nan
    want = _slow_round(x, ftz)
    buf = x.copy()
    c = round_into(buf, buf, ftz, True)
    np.testing.assert_array_equal(_bits(buf), _bits(want))
    assert (c[2], c[3], c[4]) == _slow_stats(x, ftz)[:3]
    out = np.empty_like(x)
    round_into(x, out, ftz, False)
    np.testing.assert_array_equal(_bits(out), _bits(want))


@pytest.mark.parametrize("scale", [1.0, 1e-6, 2e4, 6e4])
def test_round_sum_f16_on_sums_of_fp16_values(scale):
    rng = np.random.default_rng(3)
    n = 50_000
    s = round_f16((rng.standard_normal(n) * scale).astype(np.float32))
    p = round_f16((rng.standard_normal(n) * scale).astype(np.float32))
    p[:100] = -s[:100]  # exact cancellations
    s[100:110], p[100:110] = -0.0, -0.0
    s[110], p[111] = np.inf, np.nan
    t = s + p if scale < 1e4 else np.float32(2) * (s + p)  # larger values: some overflow
    t = round_f16(t) if scale >= 1e4 else t  # stays a sum-like fp16 value there
    want = _slow_round(t, False)
    for ftz in (False, True):
        buf = t.copy()
        round_sum_f16(buf, ftz, False)
        np.testing.assert_array_equal(_bits(buf), _bits(_slow_round(t, ftz)))
    buf = t.copy()
    round_sum_f16(buf, False, False)
    np.testing.assert_array_equal(_bits(buf), _bits(want))
    for part in (t, t[112:]):  # with and without inf / NaN
        buf, ref = part.copy(), part.copy()
        assert round_sum_f16(buf, False, True) == round_into(ref, ref, False, True)
        np.testing.assert_array_equal(_bits(buf), _bits(ref))


def _slow_matmul(a, b, block, ftz):
    k = a.shape[-1]
    s = None
    for k0 in range(0, k, block):
        part = _slow_round(np.matmul(a[..., k0 : k0 + block], b[..., k0 : k0 + block, :]), ftz)
        part = part.reshape(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]))
        s = part if s is None else _slow_round(s + part, ftz).reshape(part.shape)
    return s


def _events(mon):
    return [(e.kind, e.op, e.primitive, e.count, e.detail, e.severe) for e in mon.events]


MATMUL_SHAPES = [
    ((40, 100), (100, 24), False),
    ((3, 33), (33, 5), False),  # tail block of one
    ((1, 70), (70, 9), False),  # one row: GEMV
    ((2, 3, 17, 64), (2, 3, 64, 19), False),  # attention-like batch
    ((2, 3, 17, 64), (2, 3, 19, 64), True),  # K^T as a transposed view
    ((50, 96), (60, 96), True),  # linear: w.T
    ((2, 5, 70), (70, 9), False),  # broadcast b: the loop
]


@pytest.mark.parametrize("ftz", [False, True])
@pytest.mark.parametrize("scale", [1.0, 3e-3, 40.0])
@pytest.mark.parametrize("shape_a,shape_b,transposed", MATMUL_SHAPES)
def test_blocked_matmul_matches_block_loop(shape_a, shape_b, transposed, scale, ftz):
    rng = np.random.default_rng(11)
    a = round_f16((rng.standard_normal(shape_a) * scale).astype(np.float32))
    b = round_f16((rng.standard_normal(shape_b) * scale).astype(np.float32))
    if transposed:
        b = np.swapaxes(b, -1, -2)
    if scale == 40.0:
        a.reshape(-1)[::97] *= 64  # some partials and sums overflow to inf, then NaN
    with warnings.catch_warnings(), precision("f16", ftz=ftz):
        warnings.simplefilter("ignore")
        want = _slow_matmul(a, b, 32, ftz)
        got = _core.matmul(a, b)
        np.testing.assert_array_equal(_bits(got), _bits(want))
        with monitoring() as m_loop:
            _core._matmul_loop(a, b, 32)
        with monitoring() as m_fast:
            got_m = _core.matmul(a, b)
    np.testing.assert_array_equal(_bits(got_m), _bits(want))
    assert _events(m_fast) == _events(m_loop)


def test_blocked_matmul_pieces_and_groups(monkeypatch):
    """Several accumulation pieces and partial-product groups per call."""
    monkeypatch.setattr(_core, "ACC_PIECE", 1000)
    monkeypatch.setattr(_core, "GROUP_BYTES", 3 * 4 * 60 * 50)
    rng = np.random.default_rng(5)
    a = round_f16((rng.standard_normal((60, 300)) * 0.01).astype(np.float32))
    b = round_f16((rng.standard_normal((300, 50)) * 0.01).astype(np.float32))
    with precision("f16"):
        np.testing.assert_array_equal(_bits(_core.matmul(a, b)), _bits(_slow_matmul(a, b, 32, False)))
        with monitoring() as m_loop:
            _core._matmul_loop(a, b, 32)
        with monitoring() as m_fast:
            _core.matmul(a, b)
    assert _events(m_fast) == _events(m_loop)


def _slow_reduce(flat, block, ftz):
    s = None
    for k0 in range(0, flat.shape[-1], block):
        part = _slow_round(np.sum(flat[..., k0 : k0 + block], axis=-1, dtype=np.float32), ftz)
        s = part if s is None else _slow_round(s + part, ftz)
    return s.reshape(flat.shape[:-1])


@pytest.mark.parametrize("ftz", [False, True])
@pytest.mark.parametrize("kind", ["normal", "tiny", "big", "nan"])
@pytest.mark.parametrize("shape,axes", [((2, 6, 6, 4, 10), (1, 2, 4)), ((9, 300), (-1,)), ((5000, 70), (-1,))])
def test_blocked_reduce_sum_matches_block_loop(shape, axes, kind, ftz):
    rng = np.random.default_rng(13)
    x = round_f16((rng.standard_normal(shape) * {"normal": 1, "tiny": 1e-5, "big": 3000, "nan": 1}[kind])
                  .astype(np.float32))
    if kind == "nan":
        x.reshape(-1)[::101] = np.nan
    ax = tuple(sorted(a % x.ndim for a in axes))
    keep = [i for i in range(x.ndim) if i not in ax]
    flat = np.transpose(x, keep + list(ax)).reshape([x.shape[i] for i in keep] + [-1])
    with warnings.catch_warnings(), precision("f16", ftz=ftz):
        warnings.simplefilter("ignore")
        want = _slow_reduce(flat, 32, ftz)
        got = _core.reduce_sum(x, axes)
        np.testing.assert_array_equal(_bits(got), _bits(want))
        with monitoring() as m_loop:
            _core._reduce_sum_loop(flat, 32)
        with monitoring() as m_fast:
            _core.reduce_sum(x, axes)
    assert _events(m_fast) == _events(m_loop)


@pytest.mark.parametrize("mode", ["f32", "f32_f16", "f16"])
def test_winograd_weight_transform_cache(mode):
    """A read-only weight's transform is cached; results and events are those
    of an uncached run (a writeable copy of the weight), every call."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal((1, 9, 9, 40)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 40, 8)) * 1e-5).astype(np.float32)  # the transform underflows in fp16
    w_ro = w.copy()
    w_ro.flags.writeable = False
    with precision(mode):
        with monitoring() as m_ref:
            want = ops.conv2d_winograd(x, w.copy(), None, padding=1, tile=4)
        for _ in range(2):
            with monitoring() as m:
                got = ops.conv2d_winograd(x, w_ro, None, padding=1, tile=4)
            np.testing.assert_array_equal(_bits(got), _bits(want))
            assert _events(m) == _events(m_ref)


def test_round_sum_f16_stats_of_negative_zeros_are_not_a_nan():
    """Sums that are all -0 (products of opposite signs rounded to zero): the largest magnitude is 0, not the
    bit pattern 0x80000000, which the monitor would read as a NaN ('invalid' from NaN-free inputs)."""
    from refsd.numerics import rounding_stats

    buf = np.float32([-0.0, -0.0])
    with kernels.using("numpy"):
        c = round_sum_f16(buf, False, True)
    st = rounding_stats(c, False)
    assert not st.had_nan and st.max_abs == 0.0
