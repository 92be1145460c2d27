"""The compiled kernels (``refsd.kernels``) give the bits of the NumPy
definitions they stand for, in every precision mode, with and without FTZ,
for any accumulation block and the ``litert-gpu`` device model, on NaN
payloads, infinities, subnormals and values next to 65504; the monitor sees
the same events; and a whole pipeline run is identical under both backends.

``kernels.using("numpy")`` runs the definitions; ``kernels.using("numba")``
the kernels (these tests skip where numba cannot compile here)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refsd import kernels
from refsd.monitor import monitoring
from refsd.numerics import precision, round_into, truncate_f16
from refsd.ops import _core

if kernels.compiled() is None:
    pytest.skip("compiled kernels unavailable here (the NumPy definitions run)", allow_module_level=True)

U32 = np.uint32
# Bit patterns every rounding rule tells apart: signed zeros, the smallest and largest float32
# subnormals, fp16's subnormal and normal boundaries and the ties next to them, 65504 and the
# overflow threshold 65520 with their neighbours, infinities, quiet and signalling NaNs with payloads.
SPECIAL = [0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x33000000, 0x33000001, 0x32FFFFFF, 0x337FFFFF,
           0x38800000, 0x387FFFFF, 0x387FF000, 0x38801000, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001,
           0x477FE001, 0x47800000, 0x3F801000, 0x3F803000, 0x3F800FFF, 0x7F7FFFFF, 0x7F800000, 0xFF800000,
           0x7FC00000, 0xFFC00000, 0x7FC00001, 0x7F800001, 0xFFA00005, 0x7FFFFFFF]
SPECIAL += [u | 0x80000000 for u in SPECIAL]

bit_patterns = st.one_of(st.sampled_from(SPECIAL), st.integers(0, 2**32 - 1),
                         st.integers(0x33000000 - 64, 0x38800000 + 64),  # around fp16's subnormal range
                         st.integers(0x477FE000 - 4096, 0x477FF000 + 4096))  # around 65504 / 65520


def floats(size):
    return hnp.arrays(U32, size, elements=bit_patterns).map(lambda u: u.view(np.float32))


def _bits(x):
    return np.ascontiguousarray(x, dtype=np.float32).view(U32)


def _events(mon):
    return [(e.kind, e.op, e.primitive, e.count, e.detail, e.severe) for e in mon.events]


def both(fn):
    """``fn()`` under the definitions and under the kernels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with kernels.using("numpy"):
            want = fn()
        with kernels.using("numba"):
            got = fn()
    return want, got


@pytest.mark.parametrize("ftz", [False, True])
@pytest.mark.parametrize("stats", [False, True])
@given(x=floats(st.integers(0, 300)))
def test_round_into_same_bits_and_counters(x, ftz, stats):
    def run():
        out = np.empty_like(x)
        c = round_into(x, out, ftz, stats)
        return _bits(out).copy(), c

    (want, cw), (got, cg) = both(run)
    np.testing.assert_array_equal(got, want)
    assert cg == cw


@pytest.mark.parametrize("ftz", [False, True])
def test_round_into_large_in_place_and_any_thread_count(ftz):
    """The parallel path (several chunks), in place, at 1 and 2 threads."""
    import numba

    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, 5 * (1 << 16) + 77, dtype=np.uint64).astype(U32).view(np.float32)
    x[::5] = (rng.standard_normal(x[::5].size) * 1e-6).astype(np.float32)

    def run():
        buf = x.copy()
        c = round_into(buf, buf, ftz, True)
        return _bits(buf).copy(), c

    want = both(run)[0]
    for n in (1, 2):
        before = numba.get_num_threads()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        try:
            with kernels.using("numba"):
                got = run()
        finally:
            numba.set_num_threads(before)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1] == want[1]


@pytest.mark.parametrize("ftz", [False, True])
@given(x=floats(st.integers(0, 300)))
def test_truncate_same_bits(x, ftz):
    want, got = both(lambda: _bits(truncate_f16(x, ftz=ftz)).copy())
    np.testing.assert_array_equal(got, want)


def _fp16_operands(data, shape, scale_exp):
    """fp16 values (some subnormal, some past 2**15 so sums overflow), and optionally inf / NaN."""
    x = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-2.0, 2.0, width=32)))
    x = x * np.float32(2.0**scale_exp)
    with precision("f32_f16"):
        return _core.load(x)


@pytest.mark.parametrize("ftz", [False, True])
@pytest.mark.parametrize("block,device", [(1, None), (4, None), (7, None), (32, None), (32, "litert-gpu")])
@given(data=st.data())
def test_blocked_matmul_same_bits_and_events(block, device, ftz, data):
    m, k, n = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 80)), data.draw(st.integers(1, 9))
    batch = data.draw(st.sampled_from([(), (2,)]))
    a = np.array(_fp16_operands(data, batch + (m, k), data.draw(st.sampled_from([-20, 0, 7]))))
    b = np.array(_fp16_operands(data, batch + (k, n), data.draw(st.sampled_from([-12, 0, 8]))))
    if data.draw(st.booleans()):
        a.reshape(-1)[data.draw(st.integers(0, a.size - 1))] = data.draw(st.sampled_from([np.inf, -np.inf, np.nan]))
    if data.draw(st.booleans()):
        a.reshape(-1)[:: max(1, a.size // 3)] = -0.0  # -0 products: a GEMM returns +0

    def run():
        with precision("f16", ftz=ftz, block=block, device_model=device):
            with monitoring() as mon:
                y = _core.matmul(a, b)
            return _bits(y).copy(), _events(mon), _bits(_core.matmul(a, b)).copy()

    (wy, we, wy2), (gy, ge, gy2) = both(run)
    np.testing.assert_array_equal(gy, wy)
    np.testing.assert_array_equal(gy2, wy)
    np.testing.assert_array_equal(wy2, wy)
    assert ge == we


@pytest.mark.parametrize("ftz", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 8])
@given(data=st.data())
def test_split_matmul_same_bits_and_events(threads, ftz, data):
    """``litert-gpu``'s FULLY_CONNECTED on few rows (``_core.matmul_split``: each
    thread's sequential sum, then the halving tree), through ``ops.linear``
    with its bias too: the sequential kernel per thread against the definition."""
    from refsd import ops

    m, k, n = data.draw(st.integers(1, 16)), data.draw(st.integers(1, 80)), data.draw(st.integers(1, 9))
    a = np.array(_fp16_operands(data, (m, k), data.draw(st.sampled_from([-20, 0, 7]))))
    b = np.array(_fp16_operands(data, (k, n), data.draw(st.sampled_from([-12, 0, 8]))))
    bias = np.array(_fp16_operands(data, (n,), 0))
    if data.draw(st.booleans()):
        a.reshape(-1)[data.draw(st.integers(0, a.size - 1))] = data.draw(st.sampled_from([np.inf, -np.inf, np.nan]))
    if data.draw(st.booleans()):
        a.reshape(-1)[:: max(1, a.size // 3)] = -0.0

    def run():
        with precision("f16", ftz=ftz, device_model="litert-gpu"):
            with monitoring() as mon:
                y = _core.matmul_split(a, b, threads)
                z = ops.linear(a, b.T, bias)
            return _bits(y).copy(), _bits(z).copy(), _events(mon)

    want, got = both(run)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] == want[2]


@pytest.mark.parametrize("ftz", [False, True])
@pytest.mark.parametrize("block", [1, 5, 32])
@given(data=st.data())
def test_blocked_reduce_sum_same_bits_and_events(block, ftz, data):
    shape = data.draw(st.sampled_from([(3, 70), (2, 4, 4, 9), (40, 33)]))
    x = np.array(_fp16_operands(data, shape, data.draw(st.sampled_from([-20, 0, 14]))))
    if data.draw(st.booleans()):
        x.reshape(-1)[0] = np.nan

    def run():
        with precision("f16", ftz=ftz, block=block):
            with monitoring() as mon:
                y = _core.reduce_sum(x, -1)
            return _bits(y).copy(), _events(mon), _bits(_core.reduce_sum(x, (0, -1))).copy()

    want, got = both(run)
    for w, g in zip(want, got):
        if isinstance(w, np.ndarray):
            np.testing.assert_array_equal(g, w)
        else:
            assert g == w


PIPELINE_MODES = [dict(precision="f32"), dict(precision="f32_f16", ftz=True), dict(precision="f16"),
                  dict(precision="f16", device_model="litert-gpu")]


@pytest.mark.parametrize("mode", PIPELINE_MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_pipeline_run_identical_under_both_backends(tiny_sd21, mode):
    """Every trace tensor and every monitor event of a whole run (text encoder, UNet steps with
    guidance, scheduler, VAE) is the same under the definitions and the kernels."""
    from refsd.numerics import Precision
    from refsd.pipeline import Pipeline, Request

    p = Precision(mode["precision"], ftz=mode.get("ftz", False), device_model=mode.get("device_model"))
    # One step for the device model: its definition (one GEMM per K) is the slow side here.
    req = Request("a photo of a cat", negative_prompt="blurry", seed=1, steps=1 if p.device_model else 2,
                  guidance=7.5, scheduler="ddim", height=16, width=16)

    def run():
        with monitoring() as mon:
            r = Pipeline(tiny_sd21, precision=p)(req, progress=False)
        return {k: _bits(v).copy() for k, v in r.trace.items()}, _events(mon)

    (wt, we), (gt, ge) = both(run)
    assert sorted(gt) == sorted(wt)
    for name in wt:
        np.testing.assert_array_equal(gt[name], wt[name], err_msg=name)
    assert ge == we
    assert len(we) > 0 or p.mode == "f32"


@pytest.mark.parametrize("mode", PIPELINE_MODES[1:], ids=lambda m: "-".join(str(v) for v in m.values()))
def test_pipeline_run_under_a_monitor_without_underflow(tiny_sd21, mode):
    """A certificate's calibration monitor (``Monitor(underflow=False)``: sums run unwatched and
    again watched only when non-finite) gives a
    whole run's bits and the full monitor's events less the underflows, under both backends."""
    from refsd.monitor import Monitor
    from refsd.numerics import Precision
    from refsd.pipeline import Pipeline, Request

    p = Precision(mode["precision"], ftz=mode.get("ftz", False), device_model=mode.get("device_model"))
    req = Request("a photo of a cat", seed=2, steps=1, guidance=7.5, scheduler="ddim", height=16, width=16)

    def run(underflow):
        with monitoring(Monitor(underflow=underflow)) as mon:
            r = Pipeline(tiny_sd21, precision=p)(req, progress=False)
        return {k: _bits(v).copy() for k, v in r.trace.items()}, _events(mon), mon.stats

    for backend in ("numba", "numpy") if p.device_model is None else ("numba",):
        with kernels.using(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (ft, fe, fs), (t, e, s) = run(True), run(False)
        for name in ft:
            np.testing.assert_array_equal(t[name], ft[name], err_msg=name)
        assert any(ev[0] == "underflow" for ev in fe)
        assert e == [ev for ev in fe if ev[0] != "underflow"]
        # per-op magnitudes (headroom) are the same
        assert {key: repr(st.max_abs) for key, st in s.items()} == {key: repr(st.max_abs) for key, st in fs.items()}


@pytest.mark.skipif(not os.environ.get("REFSD_EXHAUSTIVE"), reason="exhaustive: REFSD_EXHAUSTIVE=1 (minutes)")
@pytest.mark.slow
@pytest.mark.parametrize("ftz", [False, True])
def test_round_every_float32_pattern(ftz):
    """All 2**32 float32 bit patterns, in chunks: rounding (bits and counters) and truncation."""
    step = 1 << 26
    for lo in range(0, 1 << 32, step):
        x = np.arange(lo, lo + step, dtype=np.uint64).astype(U32).view(np.float32)
        outs = []
        for name in kernels.BACKENDS:
            out = np.empty_like(x)
            with kernels.using(name):
                c = round_into(x, out, ftz, True)
                t = truncate_f16(x, ftz=ftz)
            outs.append((out.view(U32), c, t.view(U32)))
        np.testing.assert_array_equal(outs[0][0], outs[1][0], err_msg=f"rounding, patterns from {lo:#x}")
        assert outs[0][1] == outs[1][1], f"counters, patterns from {lo:#x}"
        np.testing.assert_array_equal(outs[0][2], outs[1][2], err_msg=f"truncation, patterns from {lo:#x}")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_numpy_switch_and_bad_value():
    code = "from refsd import kernels; print(kernels.backend())"
    p = _python(code, REFSD_KERNELS="numpy")
    assert (p.stdout.strip(), p.stderr) == ("numpy", "")
    p = _python(code, REFSD_KERNELS="fortran")
    assert p.stdout.strip() == "numpy"
    assert p.stderr.count("\n") == 1 and "REFSD_KERNELS='fortran'" in p.stderr


def test_numba_missing_falls_back_in_one_line():
    p = _python("import sys; sys.modules['numba'] = None\n"
                "from refsd import kernels; from refsd.numerics import round_f16; import numpy as np\n"
                "print(kernels.backend(), round_f16(np.float32([1.0001, 70000]), ftz=True).tolist())",
                REFSD_KERNELS="numba")
    assert p.returncode == 0
    assert p.stdout.split()[0] == "numpy" and "inf" in p.stdout
    assert p.stderr.count("\n") == 1 and "compiled kernels unavailable" in p.stderr


def test_cache_dir_unwritable_falls_back_to_a_temporary_one(tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("REFSD_KERNEL_CACHE", str(blocked / "numba"))
    d = kernels.cache_dir()
    assert d.is_dir() and os.access(d, os.W_OK) and not str(d).startswith(str(blocked))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no writable cache directory" in err
    monkeypatch.setenv("REFSD_KERNEL_CACHE", str(tmp_path / "ok"))
    assert kernels.cache_dir() == tmp_path / "ok"


@pytest.mark.parametrize("ftz", [False, True])
@pytest.mark.parametrize("block,device", [(1, "litert-gpu"), (4, None)])
def test_parallel_paths_same_bits_and_events(block, device, ftz):
    """Past the one-thread limit (``fp16._SERIAL_WORK``): the parallel accumulation and sequential matmul,
    with subnormal products, overflowing sums and cancellations, against the definitions."""
    from refsd.kernels import fp16

    rng = np.random.default_rng(3)
    m, k, n = 96, 320, 160
    assert m * k * n > fp16._SERIAL_WORK and (k // block) * m * n > fp16._SERIAL_WORK
    with precision("f32_f16"):
        a = np.array(_core.load((rng.standard_normal((m, k)) * 2.0 ** rng.integers(-14, 9, (m, k))).astype(np.float32)))
        b = np.array(_core.load((rng.standard_normal((k, n)) * 2.0 ** rng.integers(-12, 4, (k, n))).astype(np.float32)))
    a[0, :] = 300.0  # row 0 times column 0: products of 90000 overflow fp16
    b[:, 0] = 300.0

    def run():
        with precision("f16", ftz=ftz, block=block, device_model=device):
            with monitoring() as mon:
                y = _core.matmul(a, b)
        return _bits(y).copy(), _events(mon)

    (wy, we), (gy, ge) = both(run)
    np.testing.assert_array_equal(gy, wy)
    assert ge == we and any(e[0] == "overflow" for e in we) and any(e[0] == "underflow" for e in we)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("block,device", [(1, "litert-gpu"), (32, None)])
@pytest.mark.parametrize("overflows", [False, True])
def test_monitor_without_underflow_sees_every_other_event(backend, block, device, overflows):
    """``Monitor(underflow=False)`` (a certificate's calibration runs): the fp16
    sums run unwatched and again watched only when their result is non-finite,
    so the same bits and the full monitor's events less the underflows."""
    from refsd.monitor import Monitor

    rng = np.random.default_rng(5)
    with precision("f32_f16"):
        a = np.array(_core.load((rng.standard_normal((24, 96)) * 2.0 ** rng.integers(-14, 6, (24, 96))).astype(np.float32)))
        b = np.array(_core.load((rng.standard_normal((96, 40)) * 2.0 ** rng.integers(-12, 3, (96, 40))).astype(np.float32)))
    a[5, :] = np.float32(2.0**-10)  # row 5: every sum subnormal
    if overflows:
        a[3, :] = 300.0
        b[:, 7] = 300.0

    def run(mon):
        with kernels.using(backend), precision("f16", block=block, device_model=device), monitoring(mon):
            y = _core.matmul(a, b)
        return _bits(y).copy(), _events(mon)

    full_y, full_events = run(Monitor())
    y, events = run(Monitor(underflow=False))
    np.testing.assert_array_equal(y, full_y)
    assert any(e[0] == "underflow" for e in full_events)
    assert events == [e for e in full_events if e[0] != "underflow"]
    assert any(e[0] == "overflow" for e in events) == overflows


@given(x=floats(st.integers(0, 300)), scale_exp=st.sampled_from([-8, 0, 2]))
def test_erf_same_bits(x, scale_exp):
    """``activations.erf``: the compiled passes around NumPy's ``exp`` against the
    definition's NumPy passes (NaN, inf, subnormals, both branches: |x| < 0.5 and not)."""
    from refsd.ops.activations import erf

    with np.errstate(all="ignore"):
        x = (x * np.float32(2.0**scale_exp)).astype(np.float32)
    want, got = both(lambda: _bits(erf(x)).copy())
    np.testing.assert_array_equal(got, want)


def test_erf_same_bits_across_chunks_and_threads():
    """Past one chunk (``refsd.kernels.erf.CHUNK``), so every thread runs; the values a GELU sees."""
    from refsd.kernels import erf as erf_kernels
    from refsd.ops.activations import erf

    x = (np.random.default_rng(4).standard_normal(3 * erf_kernels.CHUNK + 5) * 3).astype(np.float32)
    want, got = both(lambda: _bits(erf(x)).copy())
    np.testing.assert_array_equal(got, want)
