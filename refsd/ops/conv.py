"""Convolutions (NHWC activations, HWIO weights) and their serialized rewrite.

Weights are ``(KH, KW, Cin, Cout)``, TensorFlow's layout; the loader converts
PyTorch's OIHW once. The reduction index runs over ``(kh, kw, cin)`` in C
order, which is the term order of the f16 blocked accumulation.
"""

from __future__ import annotations

import numpy as np

from refsd.ops._core import load, matmul, op, param, prim, store
from refsd.ops.elementwise import add

# im2col patches are built in row chunks of at most this many float32 elements
# (64 MiB), so a 512x512 VAE conv does not materialize a 9x copy of its input.
_PATCH_CHUNK = 16 * 1024 * 1024


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def padding_pairs(padding) -> tuple[tuple[int, int], tuple[int, int]]:
    """int, (ph, pw) or ((top, bottom), (left, right))."""
    if isinstance(padding, (int, np.integer)):
        p = int(padding)
        return (p, p), (p, p)
    ph, pw = padding
    ph = (int(ph), int(ph)) if isinstance(ph, (int, np.integer)) else (int(ph[0]), int(ph[1]))
    pw = (int(pw), int(pw)) if isinstance(pw, (int, np.integer)) else (int(pw[0]), int(pw[1]))
    return ph, pw


def conv_output_hw(h: int, w: int, kh: int, kw: int, *, stride=1, padding=0) -> tuple[int, int]:
    (st_h, st_w), ((pt, pb), (pl, pr)) = _pair(stride), padding_pairs(padding)
    return (h + pt + pb - kh) // st_h + 1, (w + pl + pr - kw) // st_w + 1


def _check_conv(x: np.ndarray, w: np.ndarray, b) -> None:
    if x.ndim != 4:
        raise ValueError(f"conv2d expects NHWC input of rank 4, got shape {x.shape}")
    if w.ndim != 4:
        raise ValueError(f"conv2d expects HWIO weights of rank 4, got shape {w.shape}")
    if x.shape[3] != w.shape[2]:
        raise ValueError(f"conv2d: input has {x.shape[3]} channels, weights expect {w.shape[2]}")
    if b is not None and np.shape(b) != (w.shape[3],):
        raise ValueError(f"conv2d: bias shape {np.shape(b)} does not match {w.shape[3]} output channels")


@op
def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, *, stride=1, padding=0) -> np.ndarray:
    """2-D convolution, NHWC x HWIO -> NHWC.

    ``y[n,i,j,o] = b[o] + sum_{kh,kw,c} xpad[n, i*sh+kh, j*sw+kw, c] * w[kh,kw,c,o]``

    float32 BLAS on im2col patches (row-chunked). ``f32_f16``: inputs and the
    output rounded to fp16, one fp32 accumulation. ``f16``: the K = KH*KW*Cin
    terms accumulate under the blocked model, then the bias add rounds.
    """
    x, w = load(x), param(w, "weight")
    _check_conv(x, w, b)
    bias = None if b is None else param(b, "bias")
    y = _conv_acc(x, w, stride=stride, padding=padding)
    if bias is not None:
        y = prim(np.add(y, bias, out=y), "bias_add")  # y is this op's own fresh array
    return store(y)


def _conv_acc(x: np.ndarray, w: np.ndarray, *, stride, padding, mm=matmul) -> np.ndarray:
    """The accumulation of conv2d without bias or rounding of the output, in
    the dtype of ``x`` and ``w``; ``mm`` multiplies the im2col patches by the
    weight matrix (the precision mode's ``matmul``; ``ops.hybrid`` passes exact
    integer-valued float products)."""
    n, h, wd, cin = x.shape
    kh, kw, _, cout = w.shape
    (sh, sw), ((pt, pb), (pl, pr)) = _pair(stride), padding_pairs(padding)
    ho, wo = conv_output_hw(h, wd, kh, kw, stride=stride, padding=padding)
    if kh == kw == 1 and sh == sw == 1 and not (pt or pb or pl or pr):
        return mm(x.reshape(-1, cin), w.reshape(cin, cout)).reshape(n, h, wd, cout)
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))) if (pt or pb or pl or pr) else x
    # windows: (n, ho', wo', cin, kh, kw) view -> reorder to (kh, kw, cin)
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::sh, ::sw][:, :ho, :wo]
    wmat = w.reshape(kh * kw * cin, cout)
    y = np.empty((n, ho, wo, cout), np.result_type(x, w))
    rows = max(1, _PATCH_CHUNK // max(1, n * wo * kh * kw * cin))
    for r0 in range(0, ho, rows):
        chunk = win[:, r0 : r0 + rows]
        patches = np.ascontiguousarray(chunk.transpose(0, 1, 2, 4, 5, 3)).reshape(-1, kh * kw * cin)
        y[:, r0 : r0 + rows] = mm(patches, wmat).reshape(n, -1, wo, cout)
    return y


def serial_conv_factor(x_shape, w_shape, *, limit: int, axis: str = "input", stride=1, padding=0) -> int:
    """Smallest serialization factor k (a divisor of the split channel count)
    for which every activation of the split conv has at most ``limit`` elements.

    Input serialization reads ``Cin/k`` channels and writes the full output per
    part; output serialization reads the full input and writes ``Cout/k``.
    """
    n, h, w, cin = x_shape
    kh, kw, _, cout = w_shape
    ho, wo = conv_output_hw(h, w, kh, kw, stride=stride, padding=padding)
    channels = _split_channels(axis, cin, cout)
    for k in range(1, channels + 1):
        if channels % k:
            continue
        if axis == "input":
            biggest = max(n * h * w * cin // k, n * ho * wo * cout)
        else:
            biggest = max(n * h * w * cin, n * ho * wo * cout // k)
        if biggest <= limit:
            return k
    raise ValueError(
        f"no {axis}-channel serialization of conv {tuple(x_shape)} x {tuple(w_shape)} "
        f"keeps activations within {limit} elements"
    )


def _split_channels(axis: str, cin: int, cout: int) -> int:
    if axis == "input":
        return cin
    if axis == "output":
        return cout
    raise ValueError(f"serialization axis must be 'input' or 'output', got {axis!r}")


@op
def serial_conv(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, *, factor: int, axis: str = "input", stride=1, padding=0
) -> np.ndarray:
    """Conv2D serialized into ``factor`` smaller convs (Choi et al. 2023, Fig. 1b).

    ``axis="input"``: each part convolves ``Cin/factor`` input channels (the
    bias goes with the first part) and the partial outputs are summed with
    ADD ops, in order. ``axis="output"``: each part computes ``Cout/factor``
    output channels, concatenated. A factor that does not divide the channel
    count is an error. In fp16-storage modes each partial output is an fp16
    tensor, so input serialization adds ``factor - 1`` roundings.
    """
    x, w = load(x), param(w, "weight")
    _check_conv(x, w, b)
    cin, cout = w.shape[2], w.shape[3]
    channels = _split_channels(axis, cin, cout)
    if not isinstance(factor, (int, np.integer)) or factor < 1 or channels % factor:
        raise ValueError(f"serialization factor {factor!r} does not divide {channels} {axis} channels")
    c = channels // factor
    if axis == "input":
        y = None
        for i in range(factor):
            part = conv2d(x[..., i * c : (i + 1) * c], w[:, :, i * c : (i + 1) * c, :], b if i == 0 else None,
                          stride=stride, padding=padding)
            y = part if y is None else add(y, part)
        return store(y)
    parts = [
        conv2d(x, w[..., j * c : (j + 1) * c], None if b is None else b[j * c : (j + 1) * c], stride=stride, padding=padding)
        for j in range(factor)
    ]
    return store(np.concatenate(parts, axis=-1))
