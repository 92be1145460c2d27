"""Softmax and attention, with the memory-saving attention rewrites of
Chen et al. 2023 ("Speed is all you need"): partially fused softmax and
FlashAttention.

Attention is modelled as the graph it is on a GPU: a batched matmul writes the
scaled scores ``S = scale * Q K^T (+ mask)``, a softmax kernel writes
``P = softmax(S)``, a batched matmul writes ``Y = P V``. ``S`` and ``P`` are
tensors in memory, so in fp16-storage modes they are fp16: ``S`` overflows
for large activations (``upcast_attention`` keeps it float32, as diffusers
does) and an additive mask of -1e9 becomes -inf, making a fully masked row
NaN. The rewrites differ exactly in which of these tensors they store.

``litert-gpu`` (measured): the two BATCH_MATMULs accumulate sequentially in
fp16 like FULLY_CONNECTED, ``S`` is stored after the scale MUL, and SOFTMAX
is one float32 kernel that rounds only ``P``; from 1024 rows of scores (N x
heads x Lq) it is two kernels, the second in fp16 (``_softmax_math``).

Shapes: ``q`` (N, Lq, H*D), ``k`` (N, Lk, H*D), ``v`` (N, Lk, H*Dv) ->
(N, Lq, H*Dv). ``mask`` is additive, broadcastable to (N, H, Lq, Lk).
"""

from __future__ import annotations

import numpy as np

from refsd.numerics import current_precision
from refsd.ops._core import const, exp, kernel_out, load, matmul, op, prim, reduce_sum, store, stored
from refsd.ops.transcendental import perturb


def _softmax_math(x: np.ndarray, axis: int, *, inplace: bool = False, rows: int | None = None) -> np.ndarray:
    """The three passes: max, sum of exp(x - max), divide. Primitives round in
    f16. ``inplace``: ``x`` is a temporary of the caller and may be overwritten
    (attention's score matrices are the largest tensors of the UNet).
    Under a device model with ``fused_softmax`` it is one float32 kernel that
    stores its output (``kernel_out``); from ``softmax_split_rows`` rows (the
    whole tensor's: ``rows``, when ``x`` is a chunk of it) two kernels: a
    reduction storing the row max and ``1 / sum exp(x - max)`` (float32 sum,
    the inverse truncated to fp16), then an fp16 elementwise kernel,
    ``r16(exp(r16(x - max)) * inverse)`` with the device's fp16 ``exp``
    (measured on lavapipe: bit-identical from 1024 rows, ``sm_rows1024``)."""
    m = np.max(x, axis=axis, keepdims=True)
    e = np.subtract(x, m, out=x if inplace else None)
    device = current_precision().device
    if rows is None:
        rows = x.size // max(1, x.shape[axis])
    if device and device.fused_softmax and device.softmax_split_rows and rows >= device.softmax_split_rows:
        inverse = kernel_out(np.float32(1.0) / np.sum(perturb(np.exp(e)), axis=axis, keepdims=True,
                                                      dtype=np.float32), "softmax.inverse_sum")
        return prim(exp(prim(e, "subtract_max")) * inverse, "softmax")
    if device and device.fused_softmax:
        perturb(np.exp(e, out=e))
        e /= np.sum(e, axis=axis, keepdims=True, dtype=np.float32)
        return kernel_out(e, "softmax")
    e = prim(e, "subtract_max")
    e = prim(perturb(np.exp(e, out=e)), "exp")
    return prim(np.divide(e, reduce_sum(e, axis, keepdims=True), out=e), "divide")


@op
def softmax(x: np.ndarray, *, axis: int = -1) -> np.ndarray:
    """``exp(x - max) / sum(exp(x - max))`` along ``axis``; in ``f16`` the
    exponentials and the blocked sum round. A row of -inf gives NaN."""
    return store(_softmax_math(load(x), axis))


def _heads(t: np.ndarray, heads: int, name: str) -> np.ndarray:
    if t.ndim != 3:
        raise ValueError(f"attention expects {name} of shape (N, L, heads*dim), got {t.shape}")
    n, length, c = t.shape
    if heads < 1 or c % heads:
        raise ValueError(f"attention: {heads} heads do not divide {name} width {c}")
    return t.reshape(n, length, heads, c // heads).transpose(0, 2, 1, 3)


def _merge(y: np.ndarray) -> np.ndarray:
    n, h, length, d = y.shape
    return y.transpose(0, 2, 1, 3).reshape(n, length, h * d)


def _prepare(q, k, v, heads, mask, scale):
    q, k, v = load(q), load(k), load(v)
    qh, kh, vh = _heads(q, heads, "q"), _heads(k, heads, "k"), _heads(v, heads, "v")
    if qh.shape[0] != kh.shape[0] or kh.shape[:3] != vh.shape[:3] or qh.shape[3] != kh.shape[3]:
        raise ValueError(f"attention: incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
    scale = float(qh.shape[-1] ** -0.5) if scale is None else float(scale)
    m = None
    if mask is not None:
        m = const(mask, "mask")
        try:
            np.broadcast_shapes(np.shape(m), qh.shape[:3] + (kh.shape[2],))
        except ValueError:
            raise ValueError(f"attention: mask shape {np.shape(mask)} does not broadcast to scores "
                             f"{qh.shape[:3] + (kh.shape[2],)}") from None
    return qh, kh, vh, scale, m


def _scale_const(scale: float, upcast_attention: bool):
    """The score scale as the graph stores it: float32 when upcast, else fp16."""
    return np.float32(scale) if upcast_attention else const(scale, "scale")


def _scores(qh, kh, scale, m, upcast_attention: bool) -> np.ndarray:
    """``scale * Q K^T + mask`` (``scale`` from ``_scale_const``), a fresh
    array the caller may overwrite."""
    if upcast_attention:  # float32 scores, never stored as fp16
        s = np.matmul(qh, np.swapaxes(kh, -1, -2))
        s *= scale
        return s if m is None else np.add(s, m, out=s)
    s = matmul(qh, np.swapaxes(kh, -1, -2))
    s = stored(prim(np.multiply(s, scale, out=s), "scale"), "scores")
    return s if m is None else stored(np.add(s, m, out=s), "masked_scores")


# Scores per chunk of ``attention``. A 4096-token self-attention at batch 2 x 5
# heads has 168M scores (671 MB for S, as much again for P); computed a few
# hundred query rows at a time (4 MB of scores), S and P stay in cache through
# the softmax's passes and the fp16 roundings and never take more memory than a
# chunk: 1.3-1.45x faster there (bench/README.md; 2^20 was the fastest of
# 2^15..2^22). Every score, probability and output element is computed by the
# same formula as unchunked, but not necessarily bit for bit: BLAS may block a
# chunk's rows differently from the whole product's (1-2 fp32 ulp measured on
# OpenBLAS). The chunks depend only on the shapes, so results are reproducible.
SCORE_CHUNK = 1 << 20
_MIN_ROWS = 16  # keeps each matmul a GEMM (a single row would be a GEMV)


def _chunks(n: int, h: int, lq: int, lk: int):
    """(image, head slice, query-row slice) units of about SCORE_CHUNK scores."""
    per_head = lq * lk
    heads = SCORE_CHUNK // per_head if per_head <= SCORE_CHUNK else 1
    rows = lq if per_head <= SCORE_CHUNK else max(_MIN_ROWS, SCORE_CHUNK // lk)
    for b in range(n):
        for h0 in range(0, h, heads):
            for r0 in range(0, lq, rows):
                yield b, slice(h0, h0 + heads), slice(r0, r0 + rows)


@op
def attention(q, k, v, *, heads: int = 1, mask=None, scale: float | None = None,
              upcast_attention: bool = False, upcast_softmax: bool = False) -> np.ndarray:
    """Scaled dot-product attention, ``softmax(scale * Q K^T + mask) V``,
    ``scale = 1/sqrt(D)`` by default, self or cross (Lk != Lq).

    ``upcast_attention``: scores and softmax in float32 (diffusers'
    ``upcast_attention``); ``upcast_softmax``: softmax in float32 only. In both
    the probabilities are cast back to fp16 storage before ``P V``. Under a
    device model without ``per_op_fp32`` both flags are ignored: the exported
    graph runs in fp16 on the device like every other op (measured: the
    upcast variant's scores overflow on LiteRT's GPU as the plain one's do)."""
    device = current_precision().device
    if device and not device.per_op_fp32:
        upcast_attention = upcast_softmax = False
    qh, kh, vh, scale, m = _prepare(q, k, v, heads, mask, scale)
    scale = _scale_const(scale, upcast_attention)
    n, h, lq, _ = qh.shape
    lk = kh.shape[2]
    m = None if m is None else np.broadcast_to(m, (n, h, lq, lk))
    y = np.empty((n, h, lq, vh.shape[-1]), np.float32)
    for b, hs, rs in _chunks(n, h, lq, lk):
        s = _scores(qh[b, hs, rs], kh[b, hs], scale, None if m is None else m[b, hs, rs], upcast_attention)
        if upcast_attention or upcast_softmax:
            p = perturb(np.exp(np.subtract(s, np.max(s, axis=-1, keepdims=True), out=s), out=s))
            p /= np.sum(p, axis=-1, keepdims=True)
        else:
            p = _softmax_math(s, -1, inplace=True, rows=n * h * lq)
        y[b, hs, rs] = matmul(stored(p, "probs"), vh[b, hs])
    return store(_merge(y))


@op
def softmax_partial_fused(q, k, v, *, heads: int = 1, mask=None, scale: float | None = None,
                          upcast_attention: bool = False, upcast_softmax: bool = False) -> np.ndarray:
    """Attention with a partially fused softmax (Chen et al. 2023): the scores
    ``S`` are stored, a reduction kernel stores only the row max ``m`` and row
    sum ``s = sum exp(S - m)``, and the matmul kernel computes
    ``(exp(S - m) / s) V`` in registers, so ``P = softmax(S)`` never exists in
    memory (one fp16 rounding fewer than ``attention``). The fused matmul runs
    in float32 registers. ``upcast_softmax`` is accepted for signature
    compatibility; the softmax here is never stored in fp16 anyway."""
    qh, kh, vh, scale, m = _prepare(q, k, v, heads, mask, scale)
    s = _scores(qh, kh, _scale_const(scale, upcast_attention), m, upcast_attention)
    row_max = np.max(s, axis=-1, keepdims=True)
    if upcast_attention:
        row_sum = np.sum(np.exp(s - row_max), axis=-1, keepdims=True, dtype=np.float32)
    else:
        row_sum = stored(reduce_sum(prim(np.exp(prim(s - row_max, "subtract_max")), "exp"), -1, keepdims=True),
                         "row_sum")
    y = np.matmul(np.exp(s - row_max) / row_sum, vh)
    return store(_merge(y))


@op
def flash_attention(q, k, v, *, heads: int = 1, mask=None, scale: float | None = None, tile: int = 64,
                    upcast_attention: bool = False, upcast_softmax: bool = False) -> np.ndarray:
    """FlashAttention (Dao et al. 2022; Chen et al. 2023): keys and values in
    tiles of ``tile`` rows, online softmax with a running max, running sum and
    running output, all in float32 registers; only the output is stored. A row
    whose every score is -inf is NaN, as in ``attention``. The upcast flags
    are accepted for signature compatibility (everything is float32 inside)."""
    if not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ValueError(f"flash_attention tile must be a positive integer, got {tile!r}")
    qh, kh, vh, scale, m = _prepare(q, k, v, heads, mask, scale)
    n, h, lq, _ = qh.shape
    lk = kh.shape[2]
    mfull = None if m is None else np.broadcast_to(m, (n, h, lq, lk))
    run_max = np.full((n, h, lq, 1), -np.inf, np.float32)
    run_sum = np.zeros((n, h, lq, 1), np.float32)
    acc = np.zeros((n, h, lq, vh.shape[-1]), np.float32)
    for j in range(0, lk, tile):
        s = np.matmul(qh, kh[:, :, j : j + tile].transpose(0, 1, 3, 2)) * np.float32(scale)
        if mfull is not None:
            s = s + mfull[..., j : j + tile]
        new_max = np.maximum(run_max, np.max(s, axis=-1, keepdims=True))
        # A tile (or row prefix) that is all -inf must not turn the running state into NaN.
        safe_max = np.where(np.isneginf(new_max), np.float32(0), new_max)
        p = np.exp(s - safe_max)
        alpha = np.exp(run_max - safe_max)
        run_sum = run_sum * alpha + np.sum(p, axis=-1, keepdims=True)
        acc = acc * alpha + np.matmul(p, vh[:, :, j : j + tile])
        run_max = new_max
    return store(_merge(acc / run_sum))
