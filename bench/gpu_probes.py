"""Probe LiteRT's GPU fp16 kernels one op family at a time, beside refsd's emulation.

    PYTHONPATH=$PWD .venv/bin/python bench/gpu_probes.py [--out DIR] [--only NAME,...] [--json FILE]

Each probe is a tiny model that isolates one op (or one catalogue case), with
inputs of realistic magnitude rounded to fp16 values. Three processes, because
importing tensorflow and ai_edge_litert in one process segfaults:

1. ``build``: the probe through refsd's TensorFlow twins (``refsd.export.tf_ops``,
   the same code ``refsd export`` uses) -> ``NAME.tflite`` + ``NAME.npz`` (inputs);
2. ``run``: LiteRT's GPU accelerator in fp16 (``enforce_f32=False``) -> ``NAME.gpu.npy``,
   the probes in one subprocess with native stderr captured and each probe's part of
   it told apart by a marker line (a shader that fails to compile is only logged
   there, and its output is silently zeros); after a crash the rest run in a new one;
3. compare (this process, NumPy only): refsd's op in ``f32`` (the ideal), in
   ``f16`` (the old model) and in ``f16`` with ``device_model="litert-gpu"`` (the
   new one), each against the GPU: relative error ``max|y - y_f32| / max|y_f32|``
   over elements finite in both, non-finite counts, and the fraction of elements
   bit-identical to the GPU (NaN matches NaN).

Prints the markdown table of README's "fp16 on real GPU kernels" section.
Needs Vulkan (Mesa's lavapipe is enough); not run in CI (tests/test_gpu_emulation.py
runs a few probes when a GPU is present).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from refsd import catalogue  # noqa: E402
from refsd.numerics import Precision, round_f16  # noqa: E402

DEVICE = Precision("f16", device_model="litert-gpu")


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _h(x) -> np.ndarray:
    """fp16 values as float32: the probe's inputs and weights are exact in fp16."""
    return round_f16(np.asarray(x, np.float32))


@dataclass(frozen=True)
class Probe:
    """``fn(ns, *inputs)``: the computation over an ops namespace (refsd.ops or the
    TF twins); ``inputs()``: the runtime inputs (fp16-exact float32 arrays)."""

    name: str
    family: str
    what: str
    inputs: Callable[[], tuple]
    fn: Callable
    gpu_f32: bool = False  # run with fp32 kernels (enforce_f32); refsd then emulates in f32


def _conv_w(seed, kh, cin, cout):
    return _h(_rng(seed).standard_normal((kh, kh, cin, cout)) / np.sqrt(kh * kh * cin))


def _lin_w(seed, cin, cout):
    return _h(_rng(seed).standard_normal((cout, cin)) / np.sqrt(cin))


_W_CONV = _conv_w(10, 3, 64, 64)
_B_CONV = _h(_rng(11).standard_normal(64) * 0.1)
_W_FC = _lin_w(12, 1280, 320)
_B_FC = _h(_rng(13).standard_normal(320) * 0.1)
_W_FC36 = _lin_w(27, 36, 64)
_B_FC36 = _h(_rng(28).standard_normal(64) * 0.1)
_GAMMA = _h(1 + 0.1 * _rng(14).standard_normal(64))
_BETA = _h(0.1 * _rng(15).standard_normal(64))


def _all_fp16():
    """Every finite fp16 value, once (63488)."""
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    return (x[np.isfinite(x)].astype(np.float32).reshape(1, -1),)


def _gn_conv1x1(ns, x):
    """GroupNorm then a 1x1 conv, as ``refsd.models.unet.Transformer2DModel``
    runs its norm and proj_in: under a device model that folds the norm's
    gamma and beta into the conv, refsd's ops get the folded weight and bias
    (the TF twins, the plain graph)."""
    from refsd.numerics import current_precision

    g, b, w, cb = _GAMMA[:32], _BETA[:32], _W_CONV[:1, :1, :32, :32], _B_CONV[:32]
    p = current_precision()
    if isinstance(ns, _Namespace) and ns.is_refsd and p.device and p.device.fold_norm_into_conv:
        return ns.conv2d(ns.gn4d(x, None, None, num_groups=32, eps=1e-6), w * g[:, None], cb + b @ w[0, 0])
    return ns.conv2d(ns.gn4d(x, g, b, num_groups=32, eps=1e-6), w, cb)


def _t_values():
    # DDIM's 20-step timesteps for 1000 training steps (951 ... 1) and the worst case 999.
    return (_h(np.array([999, 951, 751, 501, 251, 51, 1], np.float32)),)


PROBES: tuple[Probe, ...] = (
    Probe("mul", "elementwise", "x * y, |x|,|y| up to 400 (products past 65504)",
          lambda: (_h(_rng(1).uniform(-400, 400, (1, 8, 8, 32))), _h(_rng(2).uniform(-400, 400, (1, 8, 8, 32)))),
          lambda ns, x, y: ns.mul(x, y)),
    Probe("add", "elementwise", "x + y, N(0, 300^2)",
          lambda: (_h(_rng(3).normal(0, 300, (1, 8, 8, 32))), _h(_rng(4).normal(0, 300, (1, 8, 8, 32)))),
          lambda ns, x, y: ns.add(x, y)),
    Probe("input_convert", "conversion", "x + y with x = +-7e4, +-1e5 (fp32 model inputs past 65504)",
          lambda: (np.float32([[7e4, -7e4, 1e5, -1e5, 65504, 65519, 65520, 3e38]]), np.zeros((1, 8), np.float32)),
          lambda ns, x, y: ns.add(x, y)),
    Probe("const_convert", "conversion", "x * 1e5 (a constant past 65504), x = 2^-10 .. 1",
          lambda: (_h(np.geomspace(2.0**-10, 1, 64, dtype=np.float32).reshape(1, 64)),),
          lambda ns, x: ns.scale(x, factor=1e5)),
    Probe("exp", "elementwise", "exp(x), x in [-20, 12] (overflow past 11.09)",
          lambda: (_h(np.linspace(-20, 12, 1024, dtype=np.float32).reshape(1, 4, 8, 32)),),
          lambda ns, x: ns.exp(x)),
    Probe("subnormal", "elementwise", "x * 2^-10 for x in [2^-8, 1]: results in the subnormal range (FTZ?)",
          lambda: (_h(np.geomspace(2.0**-8, 1, 256, dtype=np.float32).reshape(1, 1, 8, 32)),),
          lambda ns, x: ns.scale(x, factor=2.0**-10)),
    Probe("silu", "elementwise", "SiLU, N(0, 4^2)",
          lambda: (_h(_rng(5).normal(0, 4, (1, 8, 8, 64))),),
          lambda ns, x: ns.silu(x)),
    Probe("conv3x3", "conv", "3x3 conv 64->64 + bias on 16x16, N(0, 3^2) (K = 576)",
          lambda: (_h(_rng(6).normal(0, 3, (1, 16, 16, 64))),),
          lambda ns, x: ns.conv2d(x, _W_CONV, _B_CONV, padding=1)),
    Probe("linear", "FC / matmul", "FullyConnected 1280 -> 320 + bias, 77 tokens, N(0, 2^2)",
          lambda: (_h(_rng(7).normal(0, 2, (1, 77, 1280))),),
          lambda ns, x: ns.linear(x, _W_FC, _B_FC)),
    Probe("linear_row", "FC / matmul", "FullyConnected 1280 -> 320 + bias on a single row (the time embedding's shape)",
          lambda: (_h(_rng(26).normal(0, 2, (1, 1280))),),
          lambda ns, x: ns.linear(x, _W_FC, _B_FC)),
    Probe("linear_rows16", "FC / matmul", "FullyConnected 36 -> 64 + bias on 16 rows (the last row count of the split kernel)",
          lambda: (_h(_rng(29).normal(0, 2, (1, 16, 36))),),
          lambda ns, x: ns.linear(x, _W_FC36, _B_FC36)),
    Probe("linear_rows17", "FC / matmul", "the same on 17 rows (the sequential kernel)",
          lambda: (_h(_rng(30).normal(0, 2, (1, 17, 36))),),
          lambda ns, x: ns.linear(x, _W_FC36, _B_FC36)),
    Probe("reduce_sum", "REDUCE_SUM", "sum over 4096 of N(2, 1) (~8200)",
          lambda: (_h(_rng(8).normal(2, 1, (1, 64, 64, 4))),),
          lambda ns, x: ns.reduce_sum(x, axis=(1, 2))),
    Probe("reduce_sum_big", "REDUCE_SUM", "sum over 4096 of N(30, 1) (~123000, past 65504)",
          lambda: (_h(_rng(9).normal(30, 1, (1, 64, 64, 4))),),
          lambda ns, x: ns.reduce_sum(x, axis=(1, 2))),
    Probe("mean", "MEAN / GroupNorm", "mean over 12288 of N(100, 10^2)",
          lambda: (_h(_rng(16).normal(100, 10, (1, 64, 64, 3))),),
          lambda ns, x: ns.reduce_mean(x, axis=(1, 2))),
    Probe("group_norm", "MEAN / GroupNorm", "gn4d 32 groups over 16x16x64, N(5, 40^2) (d*d up to ~4e4)",
          lambda: (_h(_rng(17).normal(5, 40, (1, 16, 16, 64))),),
          lambda ns, x: ns.gn4d(x, _GAMMA, _BETA, num_groups=32)),
    Probe("gn_conv1x1", "MEAN / GroupNorm", "GroupNorm (gn4d, 32 groups, eps 1e-6, gamma, beta) then a 1x1 conv 32->32 on 32x32: SD 1.x's norm + proj_in",
          lambda: (_h(_rng(39).normal(0, 3, (1, 32, 32, 32))),),
          lambda ns, x: _gn_conv1x1(ns, x)),
    Probe("layer_norm", "MEAN / GroupNorm", "LayerNorm over 320, 64 tokens, N(0, 20^2)",
          lambda: (_h(_rng(18).normal(0, 20, (1, 64, 320))),),
          lambda ns, x: ns.layer_norm(x)),
    Probe("layer_norm_affine", "MEAN / GroupNorm", "LayerNorm over 32 with gamma and beta, 2 x 64 tokens, N(0, 3^2) (the tiny UNets' norm1-3)",
          lambda: (_h(_rng(31).normal(0, 3, (2, 64, 32))),),
          lambda ns, x: ns.layer_norm(x, _GAMMA[:32], _BETA[:32])),
    Probe("softmax", "softmax / attention", "softmax over 256, scores N(0, 4^2)",
          lambda: (_h(_rng(19).normal(0, 4, (1, 2, 64, 256))),),
          lambda ns, x: ns.softmax(x)),
    Probe("attention", "softmax / attention", "self-attention 256 tokens, 2 heads x 32, N(0, 2^2)",
          lambda: tuple(_h(_rng(20 + i).normal(0, 2, (1, 256, 64))) for i in range(3)),
          lambda ns, q, k, v: ns.attention(q, k, v, heads=2)),
    Probe("softmax_rows1024", "softmax / attention", "softmax over 64 on 1024 rows, scores N(0, 4^2) (two kernels from 1024 rows)",
          lambda: (_h(_rng(36).normal(0, 4, (1, 4, 256, 64))),),
          lambda ns, x: ns.softmax(x)),
    Probe("attention_1024", "softmax / attention", "self-attention 2 x 1024 tokens, 2 heads x 16, N(0, 1) (the tiny UNets' attn1 at 64x64)",
          lambda: tuple(_h(_rng(37 + i).normal(0, 1, (2, 1024, 32))) for i in range(3)),
          lambda ns, q, k, v: ns.attention(q, k, v, heads=2)),
    Probe("gelu_erf", "GELU", "GELU (erf; the GELU builtin), N(0, 4^2)",
          lambda: (_h(_rng(23).normal(0, 4, (1, 8, 8, 64))),),
          lambda ns, x: ns.gelu(x)),
    Probe("gelu_tanh", "GELU", "tanh-GELU unfused, N(0, 4^2)",
          lambda: (_h(_rng(24).normal(0, 4, (1, 8, 8, 64))),),
          lambda ns, x: ns.gelu(x, approximate="tanh")),
    Probe("geglu", "GELU", "GEGLU gate (erf) on 2x320, N(0, 3^2)",
          lambda: (_h(_rng(25).normal(0, 3, (1, 64, 640))),),
          lambda ns, h: ns.geglu(h)),
    Probe("geglu_clip", "GELU", "GEGLU gate with gelu_clip (M=10, unfused tanh-GELU: the paper's rewrite) on 2x320, N(0, 3^2)",
          lambda: (_h(_rng(38).normal(0, 3, (1, 64, 640))),),
          lambda ns, h: ns.geglu_clip(h)),
    Probe("gelu_all", "GELU", "GELU (erf) on every finite fp16 value",
          _all_fp16, lambda ns, x: ns.gelu(x)),
    Probe("gelu_tanh_all", "GELU", "tanh-GELU (unfused) on every finite fp16 value",
          _all_fp16, lambda ns, x: ns.gelu(x, approximate="tanh")),
    Probe("timestep_embedding", "timestep embedding", "SD's 320-dim sinusoidal embedding (flip_sin_to_cos, shift 0)",
          _t_values,
          lambda ns, t: ns.timestep_embedding(t, dim=320, flip_sin_to_cos=True, downscale_freq_shift=0.0)),
)

# The float16 exception catalogue, each variant as its own probe: the case's
# own inputs (refsd.catalogue) through the TF twins.
CATALOGUE_PROBES: tuple[Probe, ...] = (
    Probe("cat.gelu_tanh.broken", "catalogue", "tanh-GELU on FF activations with outliers to 80",
          lambda: (_h(catalogue._ff_activations()),), lambda ns, x: ns.gelu(x, approximate="tanh")),
    Probe("cat.gelu_tanh.fixed", "catalogue", "gelu_clip(M=10), same input",
          lambda: (_h(catalogue._ff_activations()),), lambda ns, x: ns.gelu_clip(x, M=10.0)),
    Probe("cat.group_norm_sum_squares.broken", "catalogue", "GroupNorm (rank-4 gn4d) over 64x64x10 groups, N(0, 2^2)",
          lambda: (_h(catalogue._gn_large_group()),), lambda ns, x: ns.gn4d(x, None, None, num_groups=2)),
    Probe("cat.eps_ftz.broken", "catalogue", "GroupNorm eps=1e-5, a constant group",
          lambda: (_h(catalogue._gn_constant_group()),), lambda ns, x: ns.gn4d(x, None, None, num_groups=4, eps=1e-5)),
    Probe("cat.eps_ftz.fixed", "catalogue", "GroupNorm eps=1e-3, a constant group",
          lambda: (_h(catalogue._gn_constant_group()),), lambda ns, x: ns.gn4d(x, None, None, num_groups=4, eps=1e-3)),
    Probe("cat.mask_neg_1e9.broken", "catalogue", "attention, key-padding mask -1e9, one row fully masked",
          lambda: tuple(_h(a) for a in catalogue._qkv_padded()[:3]),
          lambda ns, q, k, v: ns.attention(q, k, v, heads=2, mask=catalogue._qkv_padded()[3] * np.float32(-1e9))),
    Probe("cat.mask_neg_1e9.fixed", "catalogue", "attention, mask -1e4",
          lambda: tuple(_h(a) for a in catalogue._qkv_padded()[:3]),
          lambda ns, q, k, v: ns.attention(q, k, v, heads=2, mask=catalogue._qkv_padded()[3] * np.float32(-1e4))),
    Probe("cat.scores_overflow.broken", "catalogue", "attention, |q|,|k| in [92, 100], head dim 64",
          lambda: tuple(_h(a) for a in catalogue._large_qk()),
          lambda ns, q, k, v: ns.attention(q, k, v, heads=1)),
    Probe("cat.scores_overflow.fixed", "catalogue", "upcast_attention=True (exported as the same fp16 graph)",
          lambda: tuple(_h(a) for a in catalogue._large_qk()),
          lambda ns, q, k, v: ns.attention(q, k, v, heads=1, upcast_attention=True)),
    Probe("cat.scores_overflow.fixed_f32", "catalogue", "the same attention on fp32 kernels (enforce_f32=True)",
          lambda: tuple(_h(a) for a in catalogue._large_qk()),
          lambda ns, q, k, v: ns.attention(q, k, v, heads=1), gpu_f32=True),
)

ALL = PROBES + CATALOGUE_PROBES


class _Namespace:
    """refsd.ops, or the TF twins plus the few ops the models never call alone
    (and so have no twin): MUL, SOFTMAX, EXP, SUM, MEAN."""

    def __init__(self, ops_mod, tf_mod=None):
        self._ops = ops_mod
        self.is_refsd = tf_mod is None
        if tf_mod is not None:
            self.mul = lambda a, b: a * b
            self.softmax = lambda x: tf_mod.nn.softmax(x, axis=-1)
            self.exp = tf_mod.exp
            self.reduce_sum = lambda x, *, axis: tf_mod.reduce_sum(x, axis=axis, keepdims=True)
            self.reduce_mean = lambda x, *, axis: tf_mod.reduce_mean(x, axis=axis, keepdims=True)

    def __getattr__(self, name):
        return getattr(self._ops, name)


# ---------------------------------------------------------------- stage 1: build (TensorFlow)


def build(out: Path, names: list[str]) -> None:
    import tensorflow as tf

    from refsd.export import tf_ops

    ns = _Namespace(tf_ops, tf)
    for p in _select(names):
        inputs = p.inputs()
        np.savez(out / f"{p.name}.npz", *inputs)
        spec = [tf.TensorSpec(a.shape, tf.float32, name=f"in{i}") for i, a in enumerate(inputs)]
        fn = tf.function(lambda *xs, p=p: p.fn(ns, *xs), input_signature=spec)
        conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
        (out / f"{p.name}.tflite").write_bytes(conv.convert())


# ---------------------------------------------------------------- stage 2: run (LiteRT GPU)


def gpu_run(tflite: Path, inputs: dict[str, np.ndarray], *, enforce_f32: bool = False,
            outputs: int = 1) -> tuple[np.ndarray | list[np.ndarray], bool]:
    """Run a .tflite once on LiteRT's GPU accelerator (fp16 kernels unless
    ``enforce_f32``), inputs fed by signature name; (its output, or its first
    ``outputs`` outputs in signature order as a list, fully accelerated)."""
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import GpuOptions, Options

    opts = Options(hardware_accelerators=HardwareAccelerator.GPU, gpu_options=GpuOptions(enforce_f32=enforce_f32))
    model = CompiledModel.from_file(str(tflite), options=opts)
    key = next(iter(model.get_signature_list()))
    ib, ob = model.create_input_buffers(0), model.create_output_buffers(0)
    for buf, name in zip(ib, model.get_signature_list()[key]["inputs"]):
        buf.write(np.ascontiguousarray(inputs[name]))
    model.run_by_index(0, ib, ob)
    dets = model.get_output_tensor_details(key)
    names = model.get_signature_list()[key]["outputs"]
    ys = [buf.read(int(np.prod(dets[n]["shape"])), np.float32).reshape(dets[n]["shape"]) for buf, n in zip(ob, names)]
    return (ys[0] if outputs == 1 else ys[:outputs]), model.is_fully_accelerated()


def with_outputs(tflite: bytes, tensor_names: list[str]) -> bytes:
    """The model with the named tensors appended to its outputs, in that order
    (LiteRT has no preserve-all-tensors on the GPU)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(tflite, 0)
    sub = model.subgraphs[0]
    index = {t.name.decode(): i for i, t in enumerate(sub.tensors)}
    extra = [index[n] for n in tensor_names]
    sub.outputs = list(sub.outputs) + extra
    for sig in model.signatureDefs or ():  # a model without signatures lists the subgraph's outputs
        for k, i in enumerate(extra):
            m = schema.TensorMapT()
            m.name, m.tensorIndex = f"extra_{k}".encode(), i
            sig.outputs.append(m)
    b = flatbuffers.Builder(len(tflite) + 4096)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def run_some(out: Path, names: list[str]) -> None:
    """Run ``names`` in order in this process, each announced on stderr (``_START``) before the native
    runtime logs anything for it, so that its errors can be told apart."""
    for name in names:
        print(f"{_START}{name}", file=sys.stderr, flush=True)
        run_one(out, name)


def run_one(out: Path, name: str) -> None:
    with np.load(out / f"{name}.npz") as z:
        inputs = {f"in{i}": z[f"arr_{i}"] for i in range(len(z.files))}
    y, full = gpu_run(out / f"{name}.tflite", inputs, enforce_f32=_select([name])[0].gpu_f32)
    np.save(out / f"{name}.gpu.npy", y)
    (out / f"{name}.accel").write_text("full" if full else "partial")


# Log lines that are noise on this machine (DESIGN.md): plugin loaders probing for hardware it lacks.
_HARMLESS = re.compile(r"openvino|npu|libopencl", re.IGNORECASE)


_START = "refsd-probe: "


def _error_lines(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "error" in ln.lower() and not _HARMLESS.search(ln)]


def run(out: Path, names: list[str]) -> dict[str, str]:
    """The probes in one process (a process start and the accelerator's set-up cost about a second each);
    when a probe crashes it, the rest run in a new one. Returns the native-stderr errors per probe."""
    errors = {}
    pending = [p.name for p in _select(names)]
    while pending:
        r = subprocess.run([sys.executable, __file__, "run-some", str(out), *pending], capture_output=True, text=True)
        logs: dict[str, list[str]] = {}
        current = None
        for line in r.stderr.splitlines():
            if line.startswith(_START) and line[len(_START):] in pending:
                current = line[len(_START):]
                logs[current] = []
            elif current is not None:
                logs[current].append(line)
        for name, lines in logs.items():
            if bad := _error_lines(lines):
                errors[name] = bad[0]
        if not r.returncode:
            break
        # The last probe announced crashed it: its last error line, else its last line.
        last = current or pending[0]
        lines = logs.get(last) or r.stderr.strip().splitlines() or [f"exit {r.returncode}"]
        errors[last] = (_error_lines(lines) or lines)[-1]
        pending = pending[pending.index(last) + 1:]
    return errors


# ---------------------------------------------------------------- stage 3: compare (NumPy)


def _emulate(p: Probe, inputs, prec: Precision) -> np.ndarray:
    from refsd import ops
    from refsd.numerics import precision

    with precision(prec):
        return np.asarray(p.fn(_Namespace(ops), *inputs), np.float32)


def _stats(y: np.ndarray, ideal: np.ndarray, gpu: np.ndarray) -> dict:
    both = np.isfinite(y) & np.isfinite(ideal)
    scale = float(np.abs(ideal[np.isfinite(ideal)]).max(initial=0.0)) or 1.0
    err = float(np.abs(y[both] - ideal[both]).max(initial=0.0)) / scale
    same = (y.view(np.uint32) == gpu.view(np.uint32)) | (np.isnan(y) & np.isnan(gpu))
    return {"rel_err": err, "nonfinite": int((~np.isfinite(y)).sum()), "bit_identical": float(same.mean())}


def compare(out: Path, names: list[str], errors: dict[str, str]) -> list[dict]:
    rows = []
    for p in _select(names):
        with np.load(out / f"{p.name}.npz") as z:
            inputs = [z[f"arr_{i}"] for i in range(len(z.files))]
        gpu = np.load(out / f"{p.name}.gpu.npy") if (out / f"{p.name}.gpu.npy").exists() else None
        ideal = _emulate(p, inputs, Precision("f32"))
        row = {"probe": p.name, "family": p.family, "what": p.what, "size": int(ideal.size),
               "accel": (out / f"{p.name}.accel").read_text() if (out / f"{p.name}.accel").exists() else "-",
               "error": errors.get(p.name)}
        if gpu is not None:
            gpu = gpu.reshape(ideal.shape)
            row["gpu"] = _stats(gpu, ideal, gpu)
            old, new = (Precision("f32"), Precision("f32")) if p.gpu_f32 else (Precision("f16"), DEVICE)
            row["old"] = _stats(_emulate(p, inputs, old), ideal, gpu)
            row["new"] = _stats(_emulate(p, inputs, new), ideal, gpu)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def cell(s):
        if s is None:
            return "-"
        nf = f", {s['nonfinite']} non-finite" if s["nonfinite"] else ""
        return f"{s['rel_err']:.2e}{nf}"

    lines = ["| family | probe | real GPU fp16 | refsd f16 (old) | refsd f16 litert-gpu (new) "
             "| bit-identical to GPU old / new |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "gpu" not in r:
            lines.append(f"| {r['family']} | {r['probe']}: {r['what']} | failed: {r['error']} | | | |")
            continue
        note = "" if r["accel"] == "full" else f" ({r['accel']})"
        bits = f"{r['old']['bit_identical']:.1%} / {r['new']['bit_identical']:.1%}"
        lines.append(f"| {r['family']} | {r['probe']}: {r['what']}{note} | {cell(r['gpu'])} | {cell(r['old'])} "
                     f"| {cell(r['new'])} | {bits} |")
    return "\n".join(lines)


def _select(names: list[str]) -> list[Probe]:
    if not names:
        return list(ALL)
    known = {p.name: p for p in ALL}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown probe(s): {', '.join(unknown)}")
    return [known[n] for n in names]


def measure(out: Path, names: list[str]) -> list[dict]:
    """Build, run on the GPU and compare the named probes (all if empty) in ``out``."""
    subprocess.run([sys.executable, __file__, "build", str(out), *names], check=True, stderr=subprocess.DEVNULL)
    return compare(out, names, run(out, names))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "build":
        build(Path(argv[1]), argv[2:])
        return 0
    if argv and argv[0] == "run-some":
        run_some(Path(argv[1]), argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="probe folder (default: a temporary one)")
    ap.add_argument("--only", default="", help="comma-separated probe names")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    out = args.out or Path(tempfile.mkdtemp(prefix="refsd_probes_"))
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(out, names)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
