"""Winograd F(2x2, 3x3) and F(4x4, 3x3) for 3x3 stride-1 convolutions
(Lavin & Gray 2016; Chen et al. 2023 use 4x4 tiles on mobile GPUs).

``Y = A^T [ (G g G^T) (.) (B^T d B) ] A`` per tile, summed over input channels.
As on the GPU, the transformed input ``V``, the element-wise products summed
over channels ``M`` and the output are tensors in memory (fp16 in fp16-storage
modes); the transformed weights ``U`` are stored fp16 like any weight. The
transforms' coefficients (up to 2.5 in B^T, 2 in G, 2.8 in A^T for 4x4 tiles)
amplify rounding error: ``winograd_error_scale`` gives the magnitude that
bounds it.

F(4x4, 3x3) uses the matrices of LiteRT's GPU delegate (``winograd_util.cc``
in TensorFlow Lite's GPU delegate): interpolation points 0, +-sqrt(2)/2,
+-sqrt(2) and infinity, not Lavin's 0, +-1, +-2. Lavin's G has coefficients
down to 1/24, so ``U`` of small weights (7e-3 in a random-init SD 2.1 UNet)
falls below fp16's normal range; flushed (FTZ), those values carry the
terms that A^T's coefficient 8 scales up, and a UNet forward moved 38 %
(measured). With these points G's coefficients are >= 1/2.
"""

from __future__ import annotations

import numpy as np

import weakref

from refsd import monitor as _mon
from refsd.numerics import current_precision, round_f16_stats
from refsd.ops import _core
from refsd.ops._core import load, matmul, op, param, prim, store, stored
from refsd.ops.conv import _check_conv
from refsd.ops.conv import padding_pairs as _padding

_F2 = (
    np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32),  # B^T
    np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32),  # G
    np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32),  # A^T
)


def _interpolation_matrices(points: list[float], m: int, r: int = 3):
    """(B^T, G, A^T) of F(m x m, r x r) from ``m + r - 2`` finite interpolation
    points and the point at infinity: the rows of A^T and G are powers of the
    points (Vandermonde), B^T the inverse of the square one. Built as LiteRT's
    GPU delegate builds them (``GetTransposedMatrixForWinograd``), in float64."""
    a = m + r - 1
    px = np.array([*points, 1.0])
    py = np.array([1.0] * (a - 1) + [0.0])

    def vandermonde(rows: int) -> np.ndarray:  # (rows, a): [x, y] = px[y]^x * py[y]^(rows - 1 - x)
        x = np.arange(rows)[:, None]
        return px[None, :] ** x * py[None, :] ** (rows - 1 - x)

    bt = np.linalg.inv(vandermonde(a))
    bt[np.abs(bt) < 1e-12] = 0.0  # exact zeros, not the inversion's 1e-17 residue
    return bt.astype(np.float32), vandermonde(r).T.astype(np.float32), vandermonde(m).astype(np.float32)


_H = np.sqrt(2.0) / 2
_F4 = _interpolation_matrices([0.0, _H, -_H, 2 * _H, -2 * _H], 4)
TILES = {2: _F2, 4: _F4}


def _matrices(tile: int):
    if tile not in TILES:
        raise ValueError(f"winograd tile must be 2 or 4 (F(2x2,3x3) or F(4x4,3x3)), got {tile!r}")
    return TILES[tile]


def _weight_transform(w: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``U = G w G^T`` per (cin, cout): (a*a, cin, cout)."""
    # Two small-K matmuls: einsum evaluates a three-operand contraction as one
    # unoptimized loop, ~25 s for the SD 2.1 UNet's weights against ~1 s.
    a, r = g.shape
    t = np.matmul(g, w.reshape(r, -1)).reshape(a, r, -1)  # (i, k, cin*cout)
    return np.matmul(g, t).reshape(a * a, w.shape[2], w.shape[3])  # [i, l] = sum_k g[l, k] t[i, k]


def _winograd(x: np.ndarray, w: np.ndarray, padding, tile: int, bt, g, at, rnd_stored, rnd_prim, acc, u=None):
    """The algorithm, parameterized by matrices and rounding so that the
    error-scale computation runs the same code on absolute values. ``u``: the
    weight transform of ``w``, if already computed."""
    (pt, pb), (pl, pr) = _padding(padding)
    n, h, wd, cin = x.shape
    cout = w.shape[3]
    m, a = tile, tile + 2
    ho, wo = h + pt + pb - 2, wd + pl + pr - 2
    th, tw = -(-ho // m), -(-wo // m)
    # Pad so the tiles cover the output exactly; the extra rows/cols are cropped.
    xp = np.pad(x, ((0, 0), (pt, pb + th * m - ho), (pl, pr + tw * m - wo), (0, 0)))
    d = np.lib.stride_tricks.sliding_window_view(xp, (a, a), axis=(1, 2))[:, ::m, ::m][:, :th, :tw]
    d = d.transpose(4, 5, 0, 1, 2, 3).reshape(a, a, -1)  # (a, a, P*C) with P = n*th*tw
    v = rnd_prim(np.einsum("ij,jkp->ikp", bt, d), "input_transform")
    v = rnd_stored(rnd_prim(np.einsum("ikp,lk->ilp", v, bt), "input_transform"), "transformed_input")
    v = v.reshape(a * a, n * th * tw, cin)
    if u is None:
        u = _weight_transform(w, g)
    mm = rnd_stored(acc(v, u), "transformed_output")  # (a*a, P, cout)
    mm = mm.reshape(a, a, -1)
    y = rnd_prim(np.einsum("ij,jkp->ikp", at, mm), "output_transform")
    y = rnd_prim(np.einsum("ikp,lk->ilp", y, at), "output_transform")  # (m, m, P*cout)
    y = y.reshape(m, m, n, th, tw, cout).transpose(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, cout)
    return y[:, :ho, :wo], u


@op
def conv2d_winograd(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, *, padding=1,
                    tile: int = 4) -> np.ndarray:
    """3x3 stride-1 convolution by Winograd F(tile x tile, 3x3), tile 2 or 4;
    the same contract as ``conv2d(x, w, b, stride=1, padding=padding)``.
    In ``f16`` the transforms round per stage and the channel sums accumulate
    under the blocked model. The weight transform ``U`` (and its fp16
    rounding) of a read-only weight array is computed once and reused while
    that array lives (a model's weights: every call, step and run)."""
    w_in = w
    x, w = load(x), param(w, "weight")
    _check_conv(x, w, b)
    if w.shape[:2] != (3, 3):
        raise ValueError(f"winograd needs a 3x3 kernel, got {w.shape[:2]}")
    bt, g, at = _matrices(tile)
    entry = _cache_entry(w_in, tile)
    hit = None if entry is None else entry.get("stored")
    u_ready = None if hit is None else hit[0]  # float16 (widened in acc), or float32 holding a NaN

    def acc(v, u):
        if entry is None:
            return matmul(v, stored(u, "transformed_weight"))
        if hit is None:  # first use: U just computed by _winograd; round and keep it
            r, stats = round_f16_stats(u, ftz=current_precision().ftz)
            # float16 holds fp16 values exactly (a NaN's float32 payload excepted: kept as float32)
            entry["stored"] = (_readonly(r if stats.had_nan else r.astype(np.float16)), stats)
        else:
            r, stats = u, hit[1]
        if _mon.active_monitor() is not None:
            _core._report(stats, "transformed_weight")
        if r.dtype == np.float16 and not current_precision().math16:
            return _widening_matmul(v, r)
        return matmul(v, np.asarray(r, np.float32))

    y, _ = _winograd(x, w, padding, tile, bt, g, at, stored, prim, acc, u=u_ready)
    if b is not None:
        y = prim(y + param(b, "bias"), "bias_add")
    return store(y)


def _widening_matmul(v: np.ndarray, u16: np.ndarray) -> np.ndarray:
    """``v @ u16`` per transform point, each float16 slice widened into one
    reused float32 buffer: the same BLAS call per slice as the stacked
    ``np.matmul`` (the same bits), without widening all of ``U`` into fresh
    memory on every call (~6 s per SD 2.1 UNet forward at any image size)."""
    out = np.empty(v.shape[:-1] + u16.shape[-1:], np.float32)
    buf = np.empty(u16.shape[1:], np.float32)
    for i in range(u16.shape[0]):
        np.copyto(buf, u16[i])
        np.matmul(v[i], buf, out=out[i])
    return out


# id(weight) -> (weakref to it, {(tile, ftz): {"stored": (U rounded to fp16 as float16, its RoundingStats)}})
_U_CACHE: dict[int, tuple[weakref.ref, dict]] = {}


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _cache_entry(w, tile: int) -> dict | None:
    """Where the stored (fp16) weight transform of ``w`` for ``tile`` under the
    current ftz is kept, or None: ``w`` may change (writeable), cannot be weakly
    referenced, or the mode stores float32 (``f32``: not cached, U would take
    4x the weights' memory in float32; fp16 modes keep it as float16, 2x)."""
    p = current_precision()
    if not p.storage16 or not isinstance(w, np.ndarray) or w.flags.writeable:
        return None
    key = id(w)
    hit = _U_CACHE.get(key)
    if hit is None or hit[0]() is not w:
        try:
            ref = weakref.ref(w)
        except TypeError:
            return None
        hit = _U_CACHE[key] = (ref, {})
        weakref.finalize(w, _U_CACHE.pop, key, None)
    return hit[1].setdefault((tile, p.ftz), {})


def winograd_error_scale(x: np.ndarray, w: np.ndarray, *, padding=1, tile: int = 4, tiny: float = 0.0) -> np.ndarray:
    """Per-output magnitude ``|A^T| [ (|G| |g| |G^T|) (.) (|B^T| |d| |B|) ] |A|``
    summed over channels: every rounding error of the algorithm is bounded by
    a small multiple of the unit roundoff times this (the Winograd analogue
    of ``sum |x| |w|`` for direct convolution).

    That holds while the intermediates are normal numbers. Below fp16's normal
    range a rounding error is absolute (up to 2**-25; a flush loses up to
    2**-14), i.e. at most ``u * max(|v|, tiny)`` with ``tiny = 2**-14``
    (``2**-3`` under FTZ), and the transforms amplify it: pass ``tiny`` to raise
    every intermediate of this computation by it (tiny weights make ``U``, whose
    coefficients go down to 1/4 for F(2x2, 3x3), subnormal)."""
    bt, g, at = (np.abs(mat) for mat in _matrices(tile))
    tiny = np.float32(tiny)
    lift = lambda t, _name: t + tiny if tiny else t  # noqa: E731
    acc = (lambda v, u: np.matmul(v, u + tiny) + tiny) if tiny else np.matmul
    y, _ = _winograd(np.abs(np.asarray(x, np.float32)), np.abs(np.asarray(w, np.float32)), padding, tile,
                     bt, g, at, lift, lift, acc)
    return y + tiny if tiny else y
