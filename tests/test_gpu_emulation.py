"""The ``litert-gpu`` device model: what LiteRT's GPU fp16 kernels were measured
to do (bench/gpu_probes.py), as refsd's emulation reproduces it.

The first part needs no GPU: each test derives its expectation from fp16
arithmetic (11 significant bits, u = 2**-11), not from recorded numbers. The
last test runs a few probes on the real kernels and skips, with its reason,
where LiteRT's GPU accelerator cannot start (no Vulkan device).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refsd import ops
from refsd.catalogue import CASES, run_on_device
from refsd.context import scope
from refsd.monitor import monitoring
from refsd.numerics import FP16_MAX, U_F16, Precision, precision, round_f16, truncate_f16

ROOT = Path(__file__).resolve().parent.parent
GPU = Precision("f16", device_model="litert-gpu")


def _truncate_reference(x: np.ndarray) -> np.ndarray:
    """Round toward zero onto fp16 via NumPy's nearest rounding and one step
    back toward zero where that went outward (float64 compare: exact)."""
    with np.errstate(over="ignore"):
        near = x.astype(np.float16)
    outward = np.abs(near.astype(np.float64)) > np.abs(x.astype(np.float64))
    back = np.where(outward, np.nextafter(near, np.float16(0)), near).astype(np.float32)
    return np.where(np.isinf(back) & np.isfinite(x), np.copysign(np.float32(FP16_MAX), x), back)


def test_truncate_f16_rounds_toward_zero_and_saturates():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-9, 6, 20000)).astype(np.float32)
    edge = np.float32([0.0, -0.0, 2**-24, 2**-25, -3e-6, 65504, 65519, 65520, 1e6, -1e6, np.inf, -np.inf])
    x = np.concatenate([x, edge])
    y = truncate_f16(x)
    assert np.array_equal(y.view(np.uint32), _truncate_reference(x).view(np.uint32))
    assert np.isnan(truncate_f16(np.float32([np.nan]))).all()
    assert truncate_f16(np.float32([3e-6]), ftz=True)[0] == 0  # subnormal flushed


def test_device_model_is_validated():
    with pytest.raises(ValueError, match="needs mode 'f16'"):
        Precision("f32_f16", device_model="litert-gpu")
    with pytest.raises(ValueError, match="unknown device model"):
        Precision("f16", device_model="mali")
    with precision("f16", device_model="litert-gpu") as p:
        assert p.device.name == "litert-gpu" and p.device.matmul_block == 1


def test_mean_keeps_a_float32_sum():
    """The issue's observation: the mean of 12288 copies of 100 is exactly 100
    on the GPU, where an fp16 running sum would pass 65504."""
    x = np.full((1, 64, 64, 3), 100.0, np.float32)
    with precision(GPU):
        assert np.all(ops.reduce_mean(x, axis=(1, 2)) == 100.0)
    with precision("f16"):
        assert np.all(np.isinf(ops.reduce_mean(x, axis=(1, 2))))


def test_sum_past_65504_saturates_and_is_reported():
    x = np.full((1, 64, 64, 1), 30.0, np.float32)  # sum 122880
    with monitoring() as mon, precision(GPU), scope("probe"):
        y = ops.reduce_sum(x, axis=(1, 2))
    assert y.item() == FP16_MAX
    assert any(e.kind == "overflow" and "saturates" in e.detail for e in mon.report().events)


def test_elementwise_overflow_is_inf():
    with precision(GPU):
        assert np.isinf(ops.mul(np.float32([300.0]), np.float32([300.0]))).all()


def test_exp_error_grows_with_its_argument():
    """exp2(a) with a = r16(x * c), c = r16(log2 e) = log2 e (1 + dc): the
    argument is off by |x log2 e dc| plus half an ulp of |x c|'s binade, which
    exp2 turns into a relative error of ln 2 times that; then the result's own
    rounding (1 + u). At x > 10 that exceeds what a correctly rounded exp gives."""
    x = round_f16(np.linspace(-9.7, 11, 4001, dtype=np.float32))  # exp(x) an fp16 normal: rounding is relative
    with precision(GPU):
        y = ops.exp(x).astype(np.float64)
    true = np.exp(x.astype(np.float64))
    log2e = 1 / math.log(2)
    dc = abs(float(round_f16(np.float32(log2e))) / log2e - 1)
    xc = np.abs(x.astype(np.float64)) * float(round_f16(np.float32(log2e)))
    half_ulp = np.exp2(np.floor(np.log2(np.maximum(xc, 2.0**-14))) - 11)
    bound = (1 + U_F16) * np.exp(math.log(2) * (np.abs(x) * log2e * dc + half_ulp)) - 1 + 1e-6  # + fp32 exp2
    rel = np.abs(y - true) / true
    assert np.all(rel <= bound)
    assert rel[x > 10].max() > 2 * U_F16  # not a correctly rounded exp


def test_linear_is_the_sequential_fp16_dot_product():
    """FULLY_CONNECTED on the GPU is bit for bit the generic model's block=1."""
    rng = np.random.default_rng(1)
    x, w, b = (round_f16(rng.standard_normal(s).astype(np.float32)) for s in ((3, 40), (8, 40), (8,)))
    with precision(GPU):
        dev = ops.linear(x, w, b)
    with precision("f16", block=1):
        seq = ops.linear(x, w, b)
    assert np.array_equal(dev, seq)


def test_timestep_arguments_are_stored_in_fp16():
    """t * freq is a stored fp16 tensor: at t = 999 its spacing is 0.5, so the
    embedding is far off, and the monitor says why."""
    t = np.float32([999.0])
    kw = dict(dim=32, flip_sin_to_cos=True, downscale_freq_shift=0.0)
    with precision("f32"):
        ideal = ops.timestep_embedding(t, **kw)
    with monitoring() as mon, precision(GPU), scope("unet.time_proj"):
        dev = ops.timestep_embedding(t, **kw)
    freqs = round_f16(np.exp(-math.log(10000.0) * np.arange(16, dtype=np.float32) / np.float32(16)))
    args = round_f16(t * freqs)
    assert np.array_equal(dev, round_f16(np.concatenate([np.cos(args), np.sin(args)])[None]))
    assert np.abs(dev - ideal).max() > 0.01
    hazards = [e for e in mon.report().events if e.kind == "precision"]
    assert hazards and not hazards[0].severe and "spacing 0.5" in hazards[0].detail


def test_group_norm_overflows_only_where_a_square_does():
    """MEAN keeps float32 sums: the catalogue's large group (sum of squares
    ~164000) stays finite; a deviation of 256 from the mean makes d*d inf."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((1, 64, 64, 20)) * 2.0).astype(np.float32)
    with monitoring() as mon, precision(GPU), scope("norm1"):
        assert np.isfinite(ops.gn4d(x, num_groups=2)).all()
    assert mon.report().clean
    x[0, 0, 0, 0] = 300.0
    with monitoring() as mon, precision(GPU), scope("norm1"):
        ops.gn4d(x, num_groups=2)
    first = mon.report().first
    assert (first.kind, first.primitive) == ("overflow", "square")


def test_tanh_gelu_is_one_kernel_and_upcast_attention_does_not_exist():
    x = np.float32([[41.0, -52.0, 80.0, 1.0]])
    with monitoring() as mon, precision(GPU):
        assert np.isfinite(ops.gelu(x, approximate="tanh")).all()
    assert mon.report().clean  # no x**3 tensor
    rng = np.random.default_rng(5)
    q = (rng.uniform(92, 100, (1, 4, 64)) * rng.choice([-1, 1], 64)).astype(np.float32)
    with monitoring() as mon, precision(GPU):
        ops.attention(q, q, q, upcast_attention=True)
    assert mon.report().has("overflow")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_catalogue_outcome_on_the_device_model_matches_the_real_kernels(case):
    _, outcome = run_on_device(case)
    assert (outcome.broken_finite, outcome.fixed_finite) == (case.litert_gpu.broken_finite,
                                                             case.litert_gpu.fixed_finite), case.litert_gpu.why


# Probes whose emulation is bit-identical to the GPU (README table); the
# catalogue probes check the recorded outcomes.
GPU_PROBES = ("mul", "exp", "silu", "linear", "reduce_sum_big", "mean", "group_norm", "timestep_embedding")


def test_real_gpu_kernels(tmp_path):
    pytest.importorskip("tensorflow", reason="needs the export extra (tensorflow-cpu) to build probes")
    pytest.importorskip("ai_edge_litert", reason="needs the export extra (ai-edge-litert) to run probes")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_probes
    finally:
        sys.path.remove(str(ROOT / "bench"))
    cat = [p.name for p in gpu_probes.CATALOGUE_PROBES]
    first = gpu_probes.measure(tmp_path, ["mul"])[0]
    if "gpu" not in first or first["accel"] != "full":  # no output, or the CPU ran it
        pytest.skip(f"LiteRT's GPU accelerator does not run here (no Vulkan device?): {first['error'] or 'fallback'}")
    rows = {r["probe"]: r for r in gpu_probes.measure(tmp_path, list(GPU_PROBES) + cat)}
    for name in GPU_PROBES:
        assert rows[name]["error"] is None, rows[name]["error"]
        assert rows[name]["new"]["bit_identical"] == 1.0, name
    for case in CASES:
        for variant, want in (("broken", case.litert_gpu.broken_finite), ("fixed", case.litert_gpu.fixed_finite)):
            r = rows.get(f"cat.{case.name}.{variant}")
            if r is not None:
                assert (r["gpu"]["nonfinite"] == 0) == want, (case.name, variant)


def test_fp16_check_device_model(tmp_path, capsys):
    from refsd.cli import main
    from refsd.tiny import make_tiny

    tiny = make_tiny(tmp_path / "sd21", "sd21", seed=0)
    req = ["--model", str(tiny), "--prompt", "a lighthouse", "--steps", "2", "--height", "32", "--width", "32",
           "--scheduler", "ddim", "--quiet"]
    js = tmp_path / "r.json"
    assert main(["fp16-check", *req, "--device-model", "litert-gpu", "--json", str(js)]) == 0
    doc = json.loads(js.read_text())
    assert doc["device_model"] == "litert-gpu" and doc["report"]["clean"]
    assert doc["report"]["counts"]["precision"] > 0  # the timestep arguments (t = 501 at step 0)
    assert "f16 litert-gpu" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "refsd", "fp16-check", *req, "--precision", "f32_f16",
                           "--device-model", "litert-gpu"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "needs mode 'f16'" in proc.stderr
