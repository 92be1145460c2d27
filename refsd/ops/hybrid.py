"""LiteRT CPU's hybrid int8 kernels: float activations quantized to int8 on the
fly, int8 weights, int32 accumulation, float output.

A model whose weights the TFLite converter quantized (``Optimize.DEFAULT``,
no representative dataset) keeps float activations; on the CPU, LiteRT's
FULLY_CONNECTED and CONV_2D then run their *hybrid* paths, which this module
follows from TensorFlow Lite's kernel code:

* ``tensorflow/lite/kernels/fully_connected.cc``, ``EvalHybrid`` /
  ``EvalHybridDense``: the input is viewed as (batch, K) rows and each row is
  quantized by ``tensor_utils::BatchQuantizeFloats``: asymmetric
  (``AsymmetricQuantizeFloats``) when the op's ``asymmetric_quantize_inputs``
  option is set (the converter sets it), else symmetric
  (``SymmetricQuantizeFloats``). Then ``MatrixBatchVectorMultiplyAccumulate``
  (``kernels/internal/reference/portable_tensor_utils.cc``): an int32 dot
  product per row and output channel, minus ``input_offset * row_sum`` of the
  weights, times ``scale = input_scale * weight_scale[o]`` (float32), added to
  the output that was initialized with the bias.
* ``tensorflow/lite/kernels/conv.cc``, ``EvalHybridPerChannel`` (per-channel
  weights, what the converter writes): each *image* of the batch (all of
  H x W x C) is quantized with ``AsymmetricQuantizeFloats``, always (CONV_2D
  has no option); ``HybridConvPerChannel`` accumulates ``(q_x - offset) * q_w``
  in int32 over the receptive field (zero padding is exactly ``q_x = offset``)
  and writes ``acc * weight_scale[o] * input_scale + bias``.

BATCH_MATMUL (``batch_matmul.cc`` also has a hybrid path) does not apply: in
refsd's exports it only multiplies two activations (attention), never an int8
constant, so it runs in float32.

Float32 roundings are reproduced where the kernels do them (the quantization
arithmetic, the scale product, the bias add), so a correct reimplementation
differs from LiteRT only where an activation lies within float32 noise of a
rounding tie of the quantizer (then one int8 input moves by one step and the
outputs it feeds by ``s_x * s_w * q_w``), or by the order of the two scale
products (1 ulp). Fed LiteRT's own inputs, these kernels reproduce every
FULLY_CONNECTED and CONV_2D output of the tiny exports to ~1e-7 except for
about 3 activations in 10**6 (tests/test_deployed_weights.py).

The int32 sums are exact here: integer-valued float32 products summed in
float32 are exact while every partial sum stays below 2**24, i.e. for ``K *
255 * 128 < 2**24`` (K <= 514 terms; 255 = the widest ``q_x - offset``, 128 the
widest int8 weight); longer reductions (SD's 3x3 convs over 320+ channels, K >=
2880) run float32 BLAS on 514-term blocks whose sums are added in float64
(exact below 2**53): float32 speed, exact results.
"""

from __future__ import annotations

import numpy as np

from refsd.numerics import current_settings
from refsd.ops._core import load, op, store
from refsd.ops.conv import _check_conv, _conv_acc
from refsd.ops.elementwise import add
from refsd.ops.linear import _check_linear
from refsd.ops.quant import round_half_away

# How far ``quantize_activations`` moves each ``x * inv`` under the run's ``either_rounding`` (a validator
# calibration variant, ``refsd.numerics.RunSettings``): +-JITTER of a step, so activations near a rounding boundary
# go either way. End to end, a hybrid-int8 model's activation roundings compound: refsd and LiteRT's CPU kernels
# agree op by op on the same input, but one flipped activation moves a layer's output by a quantization step, and
# the tiny UNet / VAE end 1-5e-2 apart. A calibration run in this mode shows the spread that any rounding of the
# same scales gives, so a correct hybrid device's flips are inside the floor (and a biased or broken one is not).
JITTER = 0.25

_BLOCK = (2**24 - 1) // (255 * 128)  # 514 terms: every partial sum of a block is exact in float32


def quantize_activations(x: np.ndarray, *, asymmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize each row of ``x`` (G, M) as LiteRT's x86 CPU build does.

    LiteRT compiles TFLite's NEON ``tensor_utils`` (``optimized/neon_tensor_utils.cc``,
    ``NeonAsymmetricQuantizeFloats`` / ``NeonSymmetricQuantizeFloats``) through
    NEON_2_SSE, so the rounding is ``vcvtnq_s32_f32``: **ties to even**, on
    ``x * inv`` *before* the zero point is added (the portable C++ version rounds
    ``offset + x * inv`` half away from zero; measured on the tiny exports that
    one disagrees with LiteRT ~10x more often).

    Asymmetric: ``rmin = min(0, min row)``, ``rmax = max(0, max row)``,
    ``scale = (rmax - rmin) / 255`` in double; the zero point is ``-128 - rmin /
    scale`` or ``127 - rmax / scale``, whichever end has the smaller error
    ``|qmin| + |rmin / scale|`` vs ``|qmax| + |rmax / scale|``, rounded half away
    (clamped to [-128, 127]); ``q = clip(rint(x * float32(1 / scale)) + offset,
    -128, 127)`` with the float32 product; the stored scale is float32(scale).
    Symmetric: ``range = max|row|`` (float32), ``scale = range / 127``, ``q =
    clip(rint(x * (127 / range)), -127, 127)`` (float32 quotients), offset 0.
    A row of zeros (range 0) gets q = 0, scale 1, offset 0.

    Returns ``(q - offset, scale, offset)``: the centred integers as float32
    (|q - offset| <= 255), float32 scales (G,) and int offsets (G,)."""
    x = np.asarray(x, np.float32)
    lo, hi = x.min(axis=1), x.max(axis=1)
    if asymmetric:
        rmin = np.minimum(lo, 0).astype(np.float64)
        rmax = np.maximum(hi, 0).astype(np.float64)
        flat = rmin == rmax
        s = np.where(flat, 1.0, (rmax - rmin) / 255.0)
        from_min, from_max = -128.0 - rmin / s, 127.0 - rmax / s
        zp = np.where(128.0 + np.abs(rmin / s) < 127.0 + np.abs(rmax / s), from_min, from_max)
        offset = np.where(zp <= -128, -128, np.where(zp >= 127, 127, round_half_away(zp))).astype(np.int32)
        offset[flat] = 0
        inv = (1.0 / s).astype(np.float32)[:, None]
        lo_q, hi_q = -128, 127
    else:
        rng = np.maximum(np.abs(lo), np.abs(hi))
        flat = rng == 0
        safe = np.where(flat, np.float32(1), rng)
        s = np.where(flat, np.float32(1), safe / np.float32(127))
        inv = (np.float32(127) / safe)[:, None]
        offset = np.zeros(x.shape[0], np.int32)
        lo_q, hi_q = -127, 127
    scaled = x * inv
    if current_settings().either_rounding:
        # +-JITTER of a step before rounding to nearest: the elements within JITTER of a boundary (1 in 8)
        # may go either way, symmetric so unbiased.
        pick = np.random.default_rng(scaled.size).random(scaled.shape, dtype=np.float32)
        rounded = np.rint(scaled + (pick - np.float32(0.5)) * np.float32(2 * JITTER))
    else:
        rounded = np.rint(scaled)
    q = np.clip(rounded + offset[:, None], lo_q, hi_q)
    q[flat] = offset[flat, None]
    return (q - offset[:, None]).astype(np.float32), s.astype(np.float32), offset


def _exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` exactly, for integer-valued float32 ``a`` (|a| <= 255, centred
    activations) and ``b`` (|b| <= 128, int8 weights of any quantizer): float32
    BLAS on blocks of at most ``_BLOCK`` terms, whose sums stay below 2**24 and so
    are exact, added in float64 (exact below 2**53). Returns float64 when blocked."""
    k = a.shape[-1]
    if k <= _BLOCK:
        return np.matmul(a, b)
    out = np.matmul(a[..., :_BLOCK], b[:_BLOCK]).astype(np.float64)
    for k0 in range(_BLOCK, k, _BLOCK):
        out += np.matmul(a[..., k0:k0 + _BLOCK], b[k0:k0 + _BLOCK])
    return out


def _check_int8(q: np.ndarray, scale: np.ndarray, n_out: int, name: str) -> np.ndarray:
    if np.asarray(q).dtype != np.int8:
        raise ValueError(f"{name} expects int8 weights, got {np.asarray(q).dtype}")
    scale = np.asarray(scale, np.float32)
    if scale.shape not in ((n_out,), (1,)):
        raise ValueError(f"{name}: scale shape {scale.shape} does not match {n_out} output channels")
    return scale


@op
def linear_hybrid_int8(x: np.ndarray, q: np.ndarray, scale: np.ndarray, b: np.ndarray | None = None, *,
                       asymmetric: bool = True) -> np.ndarray:
    """LiteRT CPU's hybrid FULLY_CONNECTED (``fully_connected.cc``
    ``EvalHybrid``; replaces ``linear`` when weights are int8).

    ``x`` is viewed as rows (..., K); each row is quantized by
    ``quantize_activations`` (``asymmetric``: the op's
    ``asymmetric_quantize_inputs``), then ``y[r, o] = b[o] + float32(acc[r, o])
    * float32(s_x[r] * s_w[o])`` with ``acc = sum_k (q_x - offset)[r, k] *
    q[o, k]`` exact. ``q`` int8 (out, in); ``scale`` (out,) per channel or (1,).
    float32 throughout whatever the precision mode (it is a CPU kernel); the
    output is stored as the mode stores tensors."""
    x = load(x)
    q = np.asarray(q)
    _check_linear(x, q, b)
    scale = _check_int8(q, scale, q.shape[0], "linear_hybrid_int8")
    k = x.shape[-1]
    xc, sx, _ = quantize_activations(x.reshape(-1, k), asymmetric=asymmetric)
    acc = _exact_matmul(xc, q.T.astype(np.float32)).astype(np.float32)
    y = acc * (sx[:, None] * scale[None, :])
    if b is not None:
        y += np.asarray(b, np.float32)
    return store(y.reshape(*x.shape[:-1], q.shape[0]))


@op
def conv2d_hybrid_int8(x: np.ndarray, q: np.ndarray, scale: np.ndarray, b: np.ndarray | None = None, *,
                       stride=1, padding=0) -> np.ndarray:
    """LiteRT CPU's hybrid per-channel CONV_2D (``conv.cc``
    ``EvalHybridPerChannel``, ``HybridConvPerChannel``; replaces ``conv2d``
    when weights are int8).

    Each image ``x[n]`` (H x W x Cin) is quantized asymmetrically as one group
    (``quantize_activations``); ``acc[n,i,j,o] = sum (q_x - offset_n) * q`` over
    the receptive field, zero padding contributing 0, exact; ``y = float32(acc)
    * s_w[o] * s_x[n] + b[o]`` in float32 (that order). ``q`` int8 HWIO,
    ``scale`` (Cout,). A 1x1 conv on a (N, L, 1, C) reshape (``fc_as_conv``)
    therefore quantizes a whole sequence per group, not a row."""
    x = load(x)
    q = np.asarray(q)
    _check_conv(x, q, b)
    scale = _check_int8(q, scale, q.shape[3], "conv2d_hybrid_int8")
    n = x.shape[0]
    xc, sx, _ = quantize_activations(x.reshape(n, -1), asymmetric=True)
    # float32 output: the exact sums rounded once, as LiteRT converts its int32 sums to float
    acc = _conv_acc(xc.reshape(x.shape), q.astype(np.float32), stride=stride, padding=padding, mm=_exact_matmul)
    y = (acc * scale) * sx[:, None, None, None]
    if b is not None:
        y += np.asarray(b, np.float32)
    return store(y)


@op
def fc_as_conv_hybrid_int8(x: np.ndarray, q: np.ndarray, scale: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``fc_as_conv`` with int8 weights on LiteRT's CPU: the (N, L, C) input
    reshaped to (N, L, 1, C) runs ``conv2d_hybrid_int8`` with the 1x1 kernel
    ``q.T``, so each of the N sequences is one quantization group (the plain
    FULLY_CONNECTED quantizes each of the N * L rows). ``q`` int8 (out, in)."""
    x = load(x)
    q = np.asarray(q)
    _check_linear(x, q, b)
    if x.ndim != 3:
        raise ValueError(f"fc_as_conv_hybrid_int8 expects (N, L, C) input, got shape {x.shape}")
    n, length, c = x.shape
    y = conv2d_hybrid_int8(x.reshape(n, length, 1, c), q.T.reshape(1, 1, c, q.shape[0]), scale, b)
    return store(y.reshape(n, length, q.shape[0]))


@op
def serial_conv_hybrid_int8(x: np.ndarray, q: np.ndarray, scale: np.ndarray, b: np.ndarray | None = None, *,
                            stride=1, padding=0) -> np.ndarray:
    """``serial_conv(axis="input")`` with int8 weights on LiteRT's CPU: ``scale``
    is (factor, Cout), one row per part, as the converter quantizes each part's
    weight on its own. Part ``i`` runs ``conv2d_hybrid_int8`` on input channels
    ``[i*c, (i+1)*c)`` (so it quantizes that slice of the input on its own) with
    ``q[:, :, i*c:(i+1)*c]`` and ``scale[i]``, the bias with the first part, and
    the partial outputs are summed with ADD in part order. ``q`` int8 HWIO."""
    x = load(x)
    q = np.asarray(q)
    scale = np.asarray(scale, np.float32)
    _check_conv(x, q, b)
    factor, cin = scale.shape[0], q.shape[2]
    if scale.ndim != 2 or scale.shape[1] != q.shape[3] or cin % factor:
        raise ValueError(f"serial_conv_hybrid_int8: scales {scale.shape} are not (parts, {q.shape[3]}) with parts "
                         f"dividing {cin} input channels")
    c = cin // factor
    y = None
    for i in range(factor):
        part = conv2d_hybrid_int8(x[..., i * c:(i + 1) * c], q[:, :, i * c:(i + 1) * c], scale[i],
                                  b if i == 0 else None, stride=stride, padding=padding)
        y = part if y is None else add(y, part)
    return store(y)
