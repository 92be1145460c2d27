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
    """FULLY_CONNECTED on more than 16 rows is bit for bit the generic model's block=1."""
    rng = np.random.default_rng(1)
    x, w, b = (round_f16(rng.standard_normal(s).astype(np.float32)) for s in ((17, 40), (8, 40), (8,)))
    with precision(GPU):
        dev = ops.linear(x, w, b)
    with precision("f16", block=1):
        seq = ops.linear(x, w, b)
    assert np.array_equal(dev, seq)


def _split_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The split FULLY_CONNECTED in np.float16 scalar arithmetic, one rounding
    per operation: input j on thread (j // 4) % 8, each thread's sum from +0 in
    order, the halving tree (4, 2, 1), the bias last."""
    h = np.float16
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    for r in range(x.shape[0]):
        for o in range(w.shape[0]):
            s = [h(0.0)] * 8
            for j in range(x.shape[1]):
                s[(j // 4) % 8] = h(s[(j // 4) % 8] + h(x[r, j]) * h(w[o, j]))
            for half in (4, 2, 1):
                for t in range(half):
                    s[t] = h(s[t] + s[t + half])
            out[r, o] = h(s[0] + h(b[o]))
    return out


@pytest.mark.parametrize("rows,k", [(1, 1280), (1, 36), (16, 12), (5, 128)])
def test_linear_on_few_rows_splits_k_over_eight_threads(rows, k):
    """FULLY_CONNECTED on at most 16 rows (the time embedding's linears) runs the
    split kernel; K = 12 leaves five threads without inputs."""
    rng = np.random.default_rng(k)
    x = round_f16(rng.normal(0, 2, (rows, k)).astype(np.float32))
    w = round_f16((rng.standard_normal((24, k)) / np.sqrt(k)).astype(np.float32))
    b = round_f16(rng.normal(0, 0.1, 24).astype(np.float32))
    with precision(GPU):
        dev = ops.linear(x[None], w, b)[0]
    with np.errstate(over="ignore"):
        assert np.array_equal(dev, _split_reference(x, w, b))
    with precision("f16", block=1):
        assert not np.array_equal(dev, ops.linear(x, w, b)) or k < 32  # another order than the sequential one


def test_split_order_is_what_cancellation_shows():
    """The structured probe that pinned the order: +B and -B at inputs i and j,
    1 at input k, B = 2**15 (spacing 32: B + 1 rounds back to B). The sum is 1
    exactly when k meets the pair after i and j have cancelled."""
    big = np.float32(2.0**15)

    def result(i, j, k):
        x = np.zeros((1, 1280), np.float32)
        x[0, i], x[0, j], x[0, k] = big, -big, 1.0
        with precision(GPU):
            return float(ops.linear(x, np.ones((4, 1280), np.float32))[0, 0])

    assert result(0, 1, 2) == 1.0  # inputs 0, 1, 2 in order on thread 0
    assert result(0, 4, 2) == 0.0  # slices 0 and 1: threads 0 and 1 meet last
    assert result(0, 8, 4) == 1.0  # threads 0 and 2 meet before the odd threads join
    assert result(0, 640, 32) == 0.0 and result(0, 640, 672) == 1.0  # slice 160 is thread 0's, after slice 8


def _gelu_erf_reference(x: np.ndarray) -> np.ndarray:
    """The GELU builtin's erf form in np.float16 arithmetic (one rounding per
    operation), constants truncated toward zero, exp(v) = exp2(v log2 e)."""
    h = np.float16

    def c(v):
        n = np.float16(np.float32(v))
        return n if abs(float(n)) <= abs(float(np.float32(v))) else np.nextafter(n, h(0))

    x = x.astype(np.float16)
    z = x * c(0.707106781186548)
    a = np.abs(z)
    t = h(1.0) / (h(1.0) + c(0.3275911) * a)
    poly = c(1.061405429)
    for coeff in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly = poly * t + c(coeff)
    e = np.exp2((-a * (a * h(1 / math.log(2)))).astype(np.float32)).astype(np.float16)
    erf = (h(1.0) - poly * t * e) * np.sign(z)
    return (h(0.5) * x * (h(1.0) + erf)).astype(np.float32)


def test_gelu_builtin_erf_form_is_the_kernels_fp16_polynomial():
    """Every finite fp16 input: the device model's erf-GELU is the kernel's
    Abramowitz-Stegun 7.1.26 in fp16 arithmetic. Its distance to the true GELU
    is what fp16 costs there: erf off by at most the truncated coefficients
    (sum |a_i| = 4.48, each off < 2**-10 relative) plus 16 roundings of values
    below 2 (each < 2**-11 absolute; the fit's own 1.5e-7 is far below), times
    0.5 |x|; plus two output roundings (2**-11 relative each)."""
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    x = x[np.isfinite(x)].astype(np.float32)
    with monitoring() as mon, precision(GPU):
        dev = ops.gelu(x)
    with np.errstate(all="ignore"):
        assert np.array_equal(dev, _gelu_erf_reference(x))
    assert mon.report().clean  # the kernel's internal inf (a log2 e past 65504) is no event
    xd = x.astype(np.float64)
    ideal = 0.5 * xd * (1 + np.vectorize(math.erf)(xd / math.sqrt(2)))
    erf_err = 4.48 * 2.0**-10 + 16 * 2.0**-11
    bound = 0.5 * np.abs(xd) * erf_err + np.abs(ideal) * 2 * 2.0**-11 + 2.0**-24
    assert np.all(np.abs(dev - ideal) <= bound)


def test_gelu_builtin_tanh_form_is_float32_with_the_compilers_tanh():
    """The tanh form: float32, tanh as (e^u - e^-u) / (e^u + e^-u) on u clamped
    to +-10, truncated to fp16: within one fp16 spacing toward zero of the true
    value, up to float32's own error delta (tanh: two exp2 results whose
    relative errors reach it damped by 1 - tanh^2, three roundings; about
    5 * 2**-24 absolute, times 0.5 |x|; then 2**-24 relative per operation
    after it: delta = |x| 2**-21 + |gelu| 2**-22)."""
    x = round_f16(np.linspace(-12, 12, 20001, dtype=np.float32))
    with precision(GPU):
        dev = ops.gelu(x, approximate="tanh").astype(np.float64)
    xd = x.astype(np.float64)
    true = 0.5 * xd * (1 + np.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd**3)))
    delta = np.abs(xd) * 2.0**-21 + np.abs(true) * 2.0**-22
    spacing = np.exp2(np.floor(np.log2(np.maximum(np.abs(true), 2.0**-14))) - 10)
    assert np.all(np.abs(dev) <= np.abs(true) + delta)  # truncated: never outward
    assert np.all(np.abs(true) - np.abs(dev) < spacing + delta)
    assert np.all(np.sign(dev) * np.sign(true) >= 0)


def test_layer_norm_affine_rounds_the_normalized_value_to_nearest():
    """With gamma and beta the fused LayerNorm converts to fp16 in registers
    (nearest) before the affine; alone its stored output is truncated."""
    rng = np.random.default_rng(6)
    x = round_f16(rng.normal(0, 3, (4, 32)).astype(np.float32))
    g, b = np.ones(32, np.float32), np.zeros(32, np.float32)
    mean = x.mean(-1, keepdims=True, dtype=np.float32)
    d = x - mean
    norm = d / np.sqrt(np.mean(d * d, -1, keepdims=True, dtype=np.float32) + np.float32(1e-5))
    with precision(GPU):
        assert np.array_equal(ops.layer_norm(x, g, b), round_f16(norm))
        assert np.array_equal(ops.layer_norm(x), truncate_f16(norm))


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
GPU_PROBES = ("mul", "exp", "silu", "linear", "linear_row", "linear_rows16", "linear_rows17", "reduce_sum_big", "mean",
              "group_norm", "layer_norm_affine", "gelu_all", "gelu_tanh_all", "geglu", "timestep_embedding")


def _gpu_probes():
    """bench/gpu_probes.py as a module (skips without the export extra)."""
    pytest.importorskip("tensorflow", reason="needs the export extra (tensorflow-cpu) to build probes")
    pytest.importorskip("ai_edge_litert", reason="needs the export extra (ai-edge-litert) to run probes")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_probes
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return gpu_probes


def test_real_gpu_kernels(tmp_path):
    gpu_probes = _gpu_probes()
    cat = [p.name for p in gpu_probes.CATALOGUE_PROBES]
    rows = {r["probe"]: r for r in gpu_probes.measure(tmp_path, list(GPU_PROBES) + cat)}
    first = rows["mul"]
    if "gpu" not in first or first["accel"] != "full":  # no output, or the CPU ran it
        pytest.skip(f"LiteRT's GPU accelerator does not run here (no Vulkan device?): {first['error'] or 'fallback'}")
    for name in GPU_PROBES:
        assert rows[name]["error"] is None, rows[name]["error"]
        assert rows[name]["new"]["bit_identical"] == 1.0, name
    for case in CASES:
        for variant, want in (("broken", case.litert_gpu.broken_finite), ("fixed", case.litert_gpu.fixed_finite)):
            r = rows.get(f"cat.{case.name}.{variant}")
            if r is not None:
                assert (r["gpu"]["nonfinite"] == 0) == want, (case.name, variant)


def test_gpu_probes_survive_a_probe_that_crashes(tmp_path):
    """The probes share one process; one that dies takes its error with it and the rest run in a new one."""
    gpu_probes = _gpu_probes()
    names = ["mul", "exp", "silu"]
    subprocess.run([sys.executable, gpu_probes.__file__, "build", str(tmp_path), *names], check=True,
                   stderr=subprocess.DEVNULL)
    (tmp_path / "exp.npz").unlink()
    errors = gpu_probes.run(tmp_path, names)
    assert "exp.npz" in errors["exp"] and "FileNotFoundError" in errors["exp"], errors
    if not (tmp_path / "mul.accel").exists():  # the probe before the crash did not run either
        pytest.skip(f"LiteRT's GPU accelerator does not run here (no Vulkan device?): {errors}")
    assert (tmp_path / "silu.accel").exists() and set(errors) == {"exp"}, errors  # ran after the crash


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


def test_group_norm_affine_is_folded_into_sd15_proj_in(tiny_sd15):
    """SD 1.x's transformer: GroupNorm, then the 1x1 proj_in. The device folds
    gamma and beta into the conv (measured, ``gn_conv1x1`` probe): the conv
    reads the unscaled normalized values, with weight w * gamma and bias
    b + beta @ w from the deployed (float32) values; the generic f16 model
    keeps the graph's order."""
    from refsd.models.options import ModelOptions
    from refsd.weights import load_unet

    rng = np.random.default_rng(7)
    model = load_unet(tiny_sd15 / "unet", options=ModelOptions.make(precision=GPU))
    block = model.down_blocks[0].attentions[0]
    x = round_f16(rng.normal(0, 3, (1, 8, 8, block.norm.num_channels)).astype(np.float32))
    got = {}
    with precision(GPU), scope("t"):
        from refsd.context import recording

        with recording(got):
            block(x, round_f16(rng.normal(0, 1, (1, 77, 32)).astype(np.float32)))
    proj_in = next(v for k, v in got.items() if k.endswith("proj_in"))
    # Folded from the values as deployed (an fp32-weight export: the float32 checkpoint), not the held fp16 ones.
    g, b = (np.asarray(block.norm.deployed(n), np.float32) for n in ("weight", "bias"))
    w, cb = (np.asarray(block.proj_in.deployed(n), np.float32) for n in ("weight", "bias"))
    assert not np.array_equal(w, round_f16(w))
    with precision(GPU):
        want = ops.conv2d(ops.gn4d(x, None, None, num_groups=block.norm.num_groups, eps=1e-6),
                          w * g[:, None], cb + b @ w[0, 0])
        plain = ops.conv2d(ops.gn4d(x, g, b, num_groups=block.norm.num_groups, eps=1e-6), w, cb)
    assert np.array_equal(np.asarray(proj_in).reshape(want.shape), want)
    assert not np.array_equal(want, plain)
