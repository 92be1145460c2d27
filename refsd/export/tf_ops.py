"""TensorFlow twins of ``refsd.ops``: same names, same positional arrays and
keyword attributes, same formula, written with the TF ops the TFLite
converter maps to builtin kernels, in float32 (the precision modes of the
reference are not emulated here: LiteRT computes what the graph says).

Each twin builds its ops inside the TF name scope of the module path that
calls it (``refsd.context.current_path()``, absolute, e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2/MatMul``),
so TFLite tensor names say which module produced them.

Rewrites are graph rewrites here: ``fc_as_conv`` really is Reshape ->
CONV_2D -> Reshape, ``serial_conv`` really is several CONV_2D plus ADD (or a
CONCATENATION), ``gn4d`` keeps every tensor at rank <= 4 while ``group_norm``
reshapes to rank 5 (as converters emit GroupNorm), ``gelu_clip`` puts the
clip (MAXIMUM / MINIMUM) before the cube, ``embedding_1d`` gathers with 1-D indices. The GPU-kernel fusions of the
``google`` preset and ``int8_weights`` have no twin: they are not graphs (see
``refsd.export.build.graph_rewrites``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Iterator

import numpy as np
import tensorflow as tf

from refsd.context import current_path
from refsd.ops.activations import GELU_COEFF, SQRT_2_OVER_PI

# Pure shape arithmetic, shared with the reference so both executors choose the same split.
from refsd.ops.conv import conv_output_hw, padding_pairs, serial_conv_factor  # noqa: F401 (re-exported names)

_FP16_EXACT: contextvars.ContextVar[bool] = contextvars.ContextVar("refsd_export_fp16_exact", default=False)


@contextlib.contextmanager
def fp16_exact_constants(on: bool = True) -> Iterator[None]:
    """Within it, graph constants that fp16 weight storage would damage beyond a
    weight's rounding (the timestep frequency table) are built fp16-exact."""
    token = _FP16_EXACT.set(on)
    try:
        yield
    finally:
        _FP16_EXACT.reset(token)


def _twin(fn):
    """Build ``fn``'s ops in the absolute TF name scope of the calling module's path
    (a trailing "/" re-enters the scope by that exact name instead of nesting and
    uniquifying it: a module's ops all share ``unet.conv_in/``, not ``unet.conv_in_1/``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        path = current_path()
        if not path:
            return fn(*args, **kwargs)
        with tf.name_scope(path + "/"):
            return fn(*args, **kwargs)

    return wrapper


def _f32(x):
    return tf.convert_to_tensor(x, tf.float32)


# ---------------------------------------------------------------- elementwise


@_twin
def add(a, b):
    return _f32(a) + _f32(b)


@_twin
def scale(x, *, factor: float):
    return _f32(x) * np.float32(factor)


@_twin
def concat(*arrays, axis: int = -1):
    return tf.concat([_f32(a) for a in arrays], axis=axis)


# ---------------------------------------------------------------- activations


@_twin
def silu(x):
    # x * LOGISTIC(x): the reference's x / (1 + exp(-x)) up to the kernel's rounding.
    return x * tf.sigmoid(x)


@_twin
def quick_gelu(x):
    return x * tf.sigmoid(x * np.float32(1.702))


def _gelu(x, approximate: str, clip: float | None = None):
    if approximate == "none":
        # tf.math.erf has no TFLite builtin; this pattern converts to the GELU builtin (erf form).
        return tf.nn.gelu(x, approximate=False)
    # Unfused tanh-GELU, primitive by primitive, so the clip sits before the cube.
    g = x if clip is None else tf.clip_by_value(x, -np.float32(clip), np.float32(clip))
    inner = (g + (g * g * g) * np.float32(GELU_COEFF)) * np.float32(SQRT_2_OVER_PI)
    return (x * np.float32(0.5)) * (np.float32(1.0) + tf.tanh(inner))


def _check_approximate(approximate: str) -> None:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be one of ('none', 'tanh'), got {approximate!r}")


@_twin
def gelu(x, *, approximate: str = "none"):
    _check_approximate(approximate)
    return _gelu(x, approximate)


@_twin
def gelu_clip(x, *, M: float = 10.0):
    return _gelu(x, "tanh", clip=M)


def _split_geglu(h):
    # SPLIT (supported by the GPU delegate), not two STRIDED_SLICEs.
    a, g = tf.split(h, 2, axis=-1)
    return a, g


@_twin
def geglu(h, *, approximate: str = "none"):
    _check_approximate(approximate)
    a, g = _split_geglu(h)
    return a * _gelu(g, approximate)


@_twin
def geglu_clip(h, *, M: float = 10.0):
    a, g = _split_geglu(h)
    return a * _gelu(g, "tanh", clip=M)


# ---------------------------------------------------------------- normalization


def _normalize(xg, axes, eps: float):
    # The reference's primitives: mean, centre, mean of squares, rsqrt(var + eps), scale.
    mean = tf.reduce_mean(xg, axis=axes, keepdims=True)
    d = xg - mean
    var = tf.reduce_mean(d * d, axis=axes, keepdims=True)
    return d * tf.math.rsqrt(var + np.float32(eps))


def _affine(y, gamma, beta):
    if gamma is not None:
        y = y * np.asarray(gamma, np.float32)
    if beta is not None:
        y = y + np.asarray(beta, np.float32)
    return y


@_twin
def group_norm(x, gamma=None, beta=None, *, num_groups: int, eps: float = 1e-5):
    n, h, w, c = x.shape
    xg = tf.reshape(x, (n, h, w, num_groups, c // num_groups))  # rank 5, as converters emit GroupNorm
    y = tf.reshape(_normalize(xg, (1, 2, 4), eps), (n, h, w, c))
    return _affine(y, gamma, beta)


@_twin
def gn4d(x, gamma=None, beta=None, *, num_groups: int, eps: float = 1e-5):
    n, h, w, c = x.shape
    xg = tf.reshape(x, (n, h * w, num_groups, c // num_groups))  # every tensor rank <= 4
    y = tf.reshape(_normalize(xg, (1, 3), eps), (n, h, w, c))
    return _affine(y, gamma, beta)


@_twin
def layer_norm(x, gamma=None, beta=None, *, eps: float = 1e-5):
    return _affine(_normalize(x, (len(x.shape) - 1,), eps), gamma, beta)


# ---------------------------------------------------------------- linear and conv


@_twin
def linear(x, w, b=None):
    # x @ w.T on a rank-3 input converts to FULLY_CONNECTED with keep_num_dims.
    y = tf.matmul(x, np.ascontiguousarray(np.asarray(w, np.float32).T))
    return y if b is None else y + np.asarray(b, np.float32)


@_twin
def conv2d(x, w, b=None, *, stride=1, padding=0):
    w = np.asarray(w, np.float32)
    kh, kw = w.shape[:2]
    (pt, pb), (pl, pr) = padding_pairs(padding)
    sh, sw = (stride, stride) if isinstance(stride, (int, np.integer)) else stride
    h, wd = x.shape[1], x.shape[2]
    ho, wo = conv_output_hw(h, wd, kh, kw, stride=stride, padding=padding)
    if (pt, pb, pl, pr) == (0, 0, 0, 0):
        mode = "VALID"
    elif _same_pads(h, kh, sh) == (pt, pb) and _same_pads(wd, kw, sw) == (pl, pr):
        mode = "SAME"  # the same zero padding, without a PAD op
    else:
        x = tf.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
        mode = "VALID"
    y = tf.nn.conv2d(x, w, strides=(1, sh, sw, 1), padding=mode)
    assert tuple(y.shape[1:3]) == (ho, wo), (y.shape, ho, wo)
    return y if b is None else y + np.asarray(b, np.float32)


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) along one axis."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


@_twin
def fc_as_conv(x, w, b=None):
    n, length, c = x.shape
    w = np.asarray(w, np.float32)
    y = conv2d(tf.reshape(x, (n, length, 1, c)), np.ascontiguousarray(w.T).reshape(1, 1, c, w.shape[0]), b)
    return tf.reshape(y, (n, length, w.shape[0]))


@_twin
def serial_conv(x, w, b=None, *, factor: int, axis: str = "input", stride=1, padding=0):
    w = np.asarray(w, np.float32)
    cin, cout = w.shape[2], w.shape[3]
    channels = cin if axis == "input" else cout
    if not isinstance(factor, (int, np.integer)) or factor < 1 or channels % factor:
        raise ValueError(f"serialization factor {factor!r} does not divide {channels} {axis} channels")
    c = channels // factor
    if axis == "input":
        y = None
        for i, part_x in enumerate(tf.split(x, factor, axis=-1)):
            part = conv2d(part_x, w[:, :, i * c:(i + 1) * c, :], b if i == 0 else None,
                          stride=stride, padding=padding)
            y = part if y is None else add(y, part)
        return y
    parts = [conv2d(x, w[..., j * c:(j + 1) * c], None if b is None else np.asarray(b)[j * c:(j + 1) * c],
                    stride=stride, padding=padding) for j in range(factor)]
    return tf.concat(parts, axis=-1)


# ---------------------------------------------------------------- attention


def _heads(t, heads: int):
    n, length, c = t.shape
    return tf.transpose(tf.reshape(t, (n, length, heads, c // heads)), (0, 2, 1, 3))


@_twin
def attention(q, k, v, *, heads: int = 1, mask=None, scale: float | None = None,
              upcast_attention: bool = False, upcast_softmax: bool = False):
    # upcast_*: float32 everywhere here, so both flags are the identity.
    qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    d = qh.shape[-1]
    s = tf.matmul(qh, kh, transpose_b=True) * np.float32(d ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s + np.asarray(mask, np.float32)
    y = tf.matmul(tf.nn.softmax(s, axis=-1), vh)
    n, h, length, dv = y.shape
    return tf.reshape(tf.transpose(y, (0, 2, 1, 3)), (n, length, h * dv))


# ---------------------------------------------------------------- embeddings and resampling


@_twin
def timestep_embedding(t, *, dim: int, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0,
                       scale: float = 1.0, max_period: float = 10000.0):
    # The frequencies are the reference's float32 constants, computed the same way in NumPy.
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    freqs = np.exp(exponent / np.float32(half - downscale_freq_shift))
    t = tf.reshape(_f32(t), (-1, 1))
    if _FP16_EXACT.get():
        # An fp16-weight export rounds every float constant to fp16; a rounded table
        # would move the sin/cos arguments by up to t * 2**-11 rad (0.5 rad at t = 999),
        # far more than the weights' rounding does. As an fp16-exact pair hi + lo,
        # t * hi + t * lo is the float32 product up to ~2 ulp (lo's own fp16 rounding,
        # <= freq * 2**-23, is ~1 ulp of t * freq; where lo is subnormal, <= 2**-25).
        hi = freqs.astype(np.float16).astype(np.float32)
        lo = (freqs - hi).astype(np.float16).astype(np.float32)
        prod = t * hi[None, :] + t * lo[None, :]
    else:
        prod = t * freqs[None, :]  # the reference's one float32 product
    args = np.float32(scale) * prod
    parts = [tf.cos(args), tf.sin(args)] if flip_sin_to_cos else [tf.sin(args), tf.cos(args)]
    emb = tf.concat(parts, axis=-1)
    if dim % 2:
        emb = tf.pad(emb, ((0, 0), (0, 1)))
    return emb


@_twin
def embedding(ids, table):
    return tf.gather(np.asarray(table, np.float32), ids, axis=0)


@_twin
def embedding_1d(ids, table):
    # One GATHER with 1-D indices between two RESHAPEs: what the GPU delegate accepts. (An
    # fp16-weight export then also needs its table as float32: tflite_edit.widen_gather_tables.)
    table = np.asarray(table, np.float32)
    rows = tf.gather(table, tf.reshape(ids, [-1]), axis=0)
    return tf.reshape(rows, [*ids.shape, table.shape[1]])


@_twin
def upsample_nearest2x(x):
    h, w = x.shape[1], x.shape[2]
    # TF2 nearest uses half-pixel centres: source floor((i + 0.5) / 2) = floor(i / 2), the reference's x[i // 2].
    return tf.image.resize(x, (2 * h, 2 * w), method="nearest")
