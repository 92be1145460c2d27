"""What every op is built from: the precision-aware load / store / primitive
rounding, blocked fp16 accumulation, and the hook into the exception monitor.

An op body reads its inputs with ``load`` (activations) and ``param``
(weights), rounds each primitive with ``prim`` (a no-op unless ``f16``),
accumulates with ``matmul`` / ``reduce_sum`` and returns ``store(y)``.

Outputs of ops are returned read-only and remembered as "already fp16", so the
next op's ``load`` does not round them again (weights rounded once at load
time are remembered the same way via ``mark_stored``). The memo is keyed on
the array object itself and dies with it.
"""

from __future__ import annotations

import contextvars
import functools
import weakref
from dataclasses import dataclass

import numpy as np

from refsd import kernels
from refsd import monitor as _mon
from refsd.ops.transcendental import perturb
from refsd.numerics import (FP16_MIN_NORMAL, RoundingStats, current_precision, round_f16, round_f16_stats,
                            round_into, round_sum_f16, rounding_stats, truncate_f16)

# ---------------------------------------------------------------- op frames


@dataclass
class _Frame:
    op: str
    finite: bool | None  # all float array inputs finite; None: not checked yet (see inputs_finite)
    # Within one op an inf or a NaN is reported once, where it first appears;
    # later ones are its consequences. An inf (overflow, a constant lost to inf)
    # and the NaN it then makes (0 * inf, inf - inf) are distinct events.
    inf_seen: bool = False
    nan_seen: bool = False
    out_max_abs: float = 0.0
    args: tuple = ()

    @property
    def inputs_finite(self) -> bool:
        # Checked only when an inf or NaN shows up (rare), not on every op call:
        # that saves a full pass over every raw input and weight per op.
        if self.finite is None:
            self.finite = all(_is_finite(a) for a in self.args if isinstance(a, np.ndarray) and a.dtype.kind == "f")
            self.args = ()
        return self.finite


_FRAME: contextvars.ContextVar[_Frame | None] = contextvars.ContextVar("refsd_op_frame", default=None)

# id(array) -> (weakref to it, ftz it was rounded with or None if not rounded, all finite)
_KNOWN: dict[int, tuple[weakref.ref, bool | None, bool]] = {}


def _remember(arr: np.ndarray, ftz: bool | None, finite: bool) -> None:
    key = id(arr)
    if key not in _KNOWN:
        weakref.finalize(arr, _KNOWN.pop, key, None)
    _KNOWN[key] = (weakref.ref(arr), ftz, finite)


def _known(arr) -> tuple[bool | None, bool] | None:
    info = _KNOWN.get(id(arr))
    if info is None or info[0]() is not arr:
        return None
    return info[1], info[2]


def mark_stored(arr: np.ndarray, *, ftz: bool = False, f16: bool = False) -> np.ndarray:
    """Round ``arr`` to fp16 once, make it read-only and remember it, so ops
    in fp16-storage modes use it without rounding again (for weights).
    ``f16``: return it as a float16 array (exact; half the memory), which
    ``param`` widens at each use."""
    out = round_f16(arr, ftz=ftz)
    if f16:
        out = out.astype(np.float16)
    out.flags.writeable = False
    _remember(out, ftz, bool(np.isfinite(out).all()))
    return out


def op(fn):
    """Make ``fn`` an op: it reports to the active monitor under its name."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        mon = _mon.active_monitor()
        if mon is None:
            with np.errstate(all="ignore"):  # inf and NaN are results here, reported by the monitor
                return fn(*args, **kwargs)
        frame = _Frame(name, None, args=args)  # ops are pure: the inputs are unchanged when checked later
        token = _FRAME.set(frame)
        try:
            with np.errstate(all="ignore"):
                out = fn(*args, **kwargs)
        finally:
            _FRAME.reset(token)
        mon.op_output(name, frame.out_max_abs)
        return out

    wrapper.__refsd_op__ = name
    return wrapper


def _is_finite(a: np.ndarray) -> bool:
    known = _known(a)
    if known is not None:
        return known[1]
    return bool(np.isfinite(a).all())


def _frame() -> _Frame:
    # Ops called outside a monitored op body (helpers used directly) get a throwaway frame.
    return _FRAME.get() or _Frame("?", True)


# ---------------------------------------------------------------- rounding points


def _report(stats, primitive: str, *, constant: str | None = None) -> None:
    mon = _mon.active_monitor()
    frame = _frame()
    if constant is not None:
        if stats.overflow:
            mon.event("constant", frame.op, primitive, stats.overflow, f"{constant} overflows fp16 (becomes inf)", True)
        if stats.overflow or stats.had_inf:
            frame.inf_seen = True  # an inf this constant carries is not a new overflow where it lands
        if stats.to_zero:
            mon.event("constant", frame.op, primitive, stats.to_zero, f"{constant} flushes to zero in fp16", True)
        if stats.to_subnormal:
            mon.event(
                "constant", frame.op, primitive, stats.to_subnormal,
                f"{constant} is subnormal in fp16 (precision lost; zero on FTZ hardware)", False,
            )
        return
    if stats.had_nan or stats.had_inf:
        if not frame.inputs_finite:
            if not (frame.inf_seen or frame.nan_seen):
                mon.event("propagated", frame.op, primitive, 1, "inputs held inf/NaN", False)
            frame.inf_seen = frame.nan_seen = True
        else:
            if stats.had_inf and not frame.inf_seen:
                mon.event("overflow", frame.op, primitive, 1, "inf computed from finite inputs", True)
            if stats.had_nan and not frame.nan_seen:
                mon.event("invalid", frame.op, primitive, 1, "NaN from NaN-free inputs", True)
            frame.inf_seen |= stats.had_inf
            frame.nan_seen |= stats.had_nan
    if stats.overflow:
        mon.event("overflow", frame.op, primitive, stats.overflow, "finite value rounds to inf in fp16", True)
        frame.inf_seen = True  # later infs in this op are its consequences
    if stats.to_zero:
        mon.event("underflow", frame.op, primitive, stats.to_zero, "non-zero to zero", False)
    if stats.to_subnormal:
        mon.event("underflow", frame.op, primitive, stats.to_subnormal, "non-zero to subnormal", False)


def _round(x: np.ndarray, primitive: str, *, constant: str | None = None) -> np.ndarray:
    ftz = current_precision().ftz
    if _mon.active_monitor() is None:
        return round_f16(x, ftz=ftz)
    r, stats = round_f16_stats(x, ftz=ftz)
    _report(stats, primitive, constant=constant)
    return r


def load(x, primitive: str = "input") -> np.ndarray:
    """An activation input: float32, rounded to fp16 in fp16-storage modes."""
    x = np.asarray(x, dtype=np.float32)
    p = current_precision()
    if not p.storage16:
        return x
    known = _known(x)
    if known is not None and known[0] is not None and (known[0] or not p.ftz):
        return x
    return _round(x, primitive)


def param(w, name: str) -> np.ndarray:
    """A weight or bias: like ``load``, but losses are ``constant`` events."""
    p = current_precision()
    if p.storage16:
        known = _known(w)
        if known is not None and known[0] is not None and (known[0] or not p.ftz):
            return np.asarray(w, dtype=np.float32)  # widens a float16 ``mark_stored`` weight
    w = np.asarray(w, dtype=np.float32)
    if not p.storage16:
        return w
    return _round(w, name, constant=f"weight {name}")


def const(value, name: str):
    """A constant of the graph (eps, a mask value, a scale): stored as fp16 in
    fp16-storage modes, where losing it is a ``constant`` event."""
    arr = np.asarray(value, dtype=np.float32)
    if not current_precision().storage16:
        return arr if arr.ndim else np.float32(arr)
    r = _round(arr, name, constant=f"{name}={_short(value)}")
    return r if r.ndim else np.float32(r)


def _short(value) -> str:
    arr = np.asarray(value)
    if arr.ndim == 0:
        return f"{float(arr):g}"
    finite = arr[np.isfinite(arr)]
    lo = float(finite.min()) if finite.size else float("nan")
    return f"array{list(arr.shape)} min {lo:g}"


def prim(x: np.ndarray, primitive: str) -> np.ndarray:
    """A primitive inside an unfused op: rounded to fp16 only in ``f16``."""
    if not current_precision().math16:
        return x
    return _round(np.asarray(x, dtype=np.float32), primitive)


def stored(x: np.ndarray, primitive: str) -> np.ndarray:
    """A tensor a composite op writes to memory between its kernels (attention
    scores, softmax probabilities, Winograd transforms): fp16 in fp16-storage
    modes. The fused rewrites exist to avoid exactly these roundings."""
    if not current_precision().storage16:
        return x
    return _round(np.asarray(x, dtype=np.float32), primitive)


def store(y: np.ndarray, primitive: str = "output") -> np.ndarray:
    """An op output: rounded to fp16 in fp16-storage modes, read-only, remembered."""
    y = np.asarray(y, dtype=np.float32)
    p = current_precision()
    mon = _mon.active_monitor()
    if p.storage16:
        if mon is None:
            out = round_f16(y, ftz=p.ftz)
            finite = None
        else:
            out, stats = round_f16_stats(y, ftz=p.ftz)
            _report(stats, primitive)
            finite = not (stats.had_nan or stats.had_inf or stats.overflow)
            _frame().out_max_abs = float("nan") if stats.had_nan else (
                float("inf") if not finite else stats.max_abs)
    else:
        out = y
        finite = None
        if mon is not None:
            hi = float(max(out.max(), -out.min())) if out.size else 0.0
            finite = bool(np.isfinite(hi))
            if not finite:
                _report(_f32_stats(out), primitive)
            _frame().out_max_abs = hi
    if finite is None:
        finite = bool(np.isfinite(out).all()) if mon is not None else True
    out.flags.writeable = False
    _remember(out, p.ftz if p.storage16 else None, finite)
    return out


def _f32_stats(y: np.ndarray) -> RoundingStats:
    return RoundingStats(0, 0, 0, bool(np.isnan(y).any()), bool(np.isinf(y).any()), float("nan"))


# ---------------------------------------------------------------- accumulation


def _severe_only(*inputs: np.ndarray) -> bool:
    """Whether an fp16 sum of these inputs may run unwatched and again watched
    only if its result is non-finite: under a monitor that collects no
    underflows, from finite inputs. The events left to report, overflow and
    invalid, leave such a sum non-finite: a product, partial or running sum
    rounded to inf stays inf in every later fp16 addition, or becomes NaN."""
    mon = _mon.active_monitor()
    return mon is not None and not mon.underflow and all(_is_finite(x) for x in inputs)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` on float32 BLAS; in ``f16`` under the blocked model over K
    (the device model's measured block when one is set)."""
    p = current_precision()
    if not p.math16:
        return np.matmul(a, b)
    if _severe_only(a, b):
        with _mon.unwatched():
            out = matmul(a, b)
        if _is_finite(out):
            return out
    block = p.device.matmul_block if p.device else p.block
    k = kernels.compiled()
    if (k is not None and block == 1 and a.dtype == np.float32 and b.dtype == np.float32 and a.ndim >= 2
            and a.shape[-1] > 1 and b.ndim == a.ndim and a.shape[:-2] == b.shape[:-2] and _is_finite(a) and _is_finite(b)):
        return _matmul_sequential(k, a, b, p.ftz)
    if (a.dtype != np.float32 or b.dtype != np.float32 or a.ndim < 2 or a.shape[-1] <= block
            or a.shape[:-2] != b.shape[:-2]):  # batched items only as the loop's own BLAS calls
        return _matmul_loop(a, b, block)
    return _matmul_blocked(a, b, block, p.ftz)


def matmul_split(a: np.ndarray, b: np.ndarray, threads: int) -> np.ndarray:
    """``a`` (m, k) @ ``b`` (k, n) as LiteRT's GPU FULLY_CONNECTED kernel for
    few rows sums it in fp16 (measured on lavapipe, ``bench/gpu_probes.py``
    ``linear_row``; the device model's ``fc_split_rows``): K in slices of 4
    inputs, slice ``c`` on thread ``c % threads``; each thread a sequential fp16
    sum of fp16-rounded products over its inputs in order (``matmul`` with
    block 1, from a zero accumulator: a thread without inputs holds +0); then
    a halving tree, ``s[t] = r16(s[t] + s[t + h])`` for ``t < h``, ``h =
    threads/2, ..., 1``. The caller adds the bias. (One product per step, no
    fused multiply-add: each product is rounded, then each sum.)"""
    if threads < 1 or threads & (threads - 1):
        raise ValueError(f"matmul_split needs a power-of-two thread count, got {threads!r}")
    k = a.shape[-1]
    owner = (np.arange(k) // 4) % threads
    parts = []
    for t in range(threads):
        idx = np.flatnonzero(owner == t)
        if idx.size:
            parts.append(matmul(a[..., idx], b[idx, :]))
        else:
            parts.append(np.zeros(a.shape[:-1] + b.shape[-1:], np.float32))
    h = threads
    while h > 1:
        h //= 2
        for t in range(h):
            parts[t] = prim(parts[t] + parts[t + h], "matmul.reduce")
    return parts[0]


def _matmul_sequential(k, a: np.ndarray, b: np.ndarray, ftz: bool) -> np.ndarray:
    """``_matmul_blocked`` with ``block=1`` as one compiled kernel
    (``kernels.fp16.matmul_sequential``), monitor events in the same order."""
    batch = a.shape[:-2]
    a3 = np.ascontiguousarray(a).reshape((-1,) + a.shape[-2:])
    b3 = np.ascontiguousarray(b).reshape((-1,) + b.shape[-2:])
    stats = _mon.active_monitor() is not None
    out, counters = k.matmul_sequential(a3, b3, ftz, stats)
    if stats:
        _report_blocks(counters, ftz, "matmul")
    return out.reshape(batch + out.shape[-2:])


def _report_blocks(counters, ftz: bool, what: str) -> None:
    """Report the blocked model's roundings block by block, in the loop's
    order (partial, then accumulate)."""
    for part, acc in counters:
        _report(rounding_stats(part, ftz), f"{what}.partial")
        if acc is not None:
            _report(rounding_stats(acc, ftz), f"{what}.accumulate")


def _matmul_loop(a: np.ndarray, b: np.ndarray, block: int) -> np.ndarray:
    """The blocked model as written: per block of K one GEMM, the rounding
    of its partial product and of the running sum, each over the whole output
    (the reference ``_matmul_blocked`` is tested against)."""
    k = a.shape[-1]
    s = None
    for k0 in range(0, k, block):
        part = prim(np.matmul(a[..., k0 : k0 + block], b[..., k0 : k0 + block, :]), "matmul.partial")
        s = part if s is None else prim(s + part, "matmul.accumulate")
    return s


# Output elements per piece of ``_matmul_blocked``'s accumulation: the running
# sum, one partial product and the rounding's scratch stay in L2 cache.
ACC_PIECE = 1 << 15
# Bytes of partial products computed per group of blocks (one batched GEMM call).
GROUP_BYTES = 32 << 20


def _block_views(a: np.ndarray, b: np.ndarray, block: int, count: int):
    """``a[..., j*block:(j+1)*block]`` and ``b[..., j*block:(j+1)*block, :]``
    for ``j < count`` stacked on a new leading axis (views): each item has the
    strides of the slice, so a batched ``np.matmul`` makes for every block
    the same BLAS call as slicing it."""
    av = np.lib.stride_tricks.as_strided(a, (count,) + a.shape[:-1] + (block,),
                                         (block * a.strides[-1],) + a.strides, writeable=False)
    bv = np.lib.stride_tricks.as_strided(b, (count,) + b.shape[:-2] + (block, b.shape[-1]),
                                         (block * b.strides[-2],) + b.strides, writeable=False)
    return av, bv


def _matmul_blocked(a: np.ndarray, b: np.ndarray, block: int, ftz: bool) -> np.ndarray:
    """``_matmul_loop``, bit for bit, faster.

    The partial products of a group of blocks come from one batched
    ``np.matmul`` whose items are exactly the loop's BLAS calls (same shapes
    and strides: a GEMM's result may depend on its shape, so the rows are never
    split). The roundings and the running sum then run piece by piece over the
    output, each piece in cache through all the group's blocks, rounding in
    place. The running sum's additions ``s + r16(P)`` add two fp16 values, so
    the rounding that follows takes a shorter path (``round_sum_f16``).
    Under the monitor each rounding's statistics are summed over the pieces
    and reported afterwards, block by block in the loop's order (partial,
    then accumulate), so the events are those of ``_matmul_loop``."""
    mon = _mon.active_monitor()
    stats = mon is not None
    kern = kernels.compiled()
    k = a.shape[-1]
    out_shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    total = int(np.prod(out_shape))
    if total == 0:
        return _matmul_loop(a, b, block)
    starts = list(range(0, k, block))
    nfull = k // block
    group = max(1, min(len(starts), GROUP_BYTES // (4 * total)))
    pbuf = np.empty((group,) + out_shape, np.float32)
    pflat = pbuf.reshape(group, total)
    s = np.empty(total, np.float32)
    counters = [[None, None] for _ in starts] if stats else None
    for g0 in range(0, len(starts), group):
        g1 = min(g0 + group, len(starts))
        f1 = min(g1, nfull)
        if f1 > g0:
            av, bv = _block_views(a[..., g0 * block :], b[..., g0 * block :, :], block, f1 - g0)
            np.matmul(av, bv, out=pbuf[: f1 - g0])
        if g1 > f1:  # the last, shorter block
            np.matmul(a[..., nfull * block :], b[..., nfull * block :, :], out=pbuf[f1 - g0])
        if kern is not None:
            c = kern.accumulate(pflat[: g1 - g0], s, g0 == 0, ftz, stats)
            if stats:
                for j, (part, acc) in enumerate(c, start=g0):
                    counters[j][0] = _add_counts(counters[j][0], part)
                    if acc is not None:
                        counters[j][1] = _add_counts(counters[j][1], acc)
            continue
        if not stats and total <= ACC_PIECE and g1 - g0 > 1:
            # Small outputs: round all the group's partials in one call (fewer Python calls).
            flat = pflat[: g1 - g0].reshape(-1)
            round_into(flat, flat, ftz, False)
            rounded = True
        else:
            rounded = False
        for q0 in range(0, total, ACC_PIECE):
            sp = s[q0 : q0 + ACC_PIECE]
            for j in range(g0, g1):
                pp = pflat[j - g0, q0 : q0 + ACC_PIECE]
                if j == 0:
                    if rounded:
                        np.copyto(sp, pp)
                    else:
                        c = round_into(pp, sp, ftz, stats)
                        if stats:
                            counters[0][0] = _add_counts(counters[0][0], c)
                    continue
                if not rounded:
                    c = round_into(pp, pp, ftz, stats)
                    if stats:
                        counters[j][0] = _add_counts(counters[j][0], c)
                np.add(sp, pp, out=sp)
                c = round_sum_f16(sp, ftz, stats)
                if stats:
                    counters[j][1] = _add_counts(counters[j][1], c)
    if stats:
        _report_blocks(counters, ftz, "matmul")
    return s.reshape(out_shape)


def _add_counts(total: tuple | None, c: tuple) -> tuple:
    """Sum two ``round_into`` counter tuples (one rounding split in pieces)."""
    if total is None:
        return c
    return (max(total[0], c[0]), max(total[1], c[1]), total[2] + c[2], total[3] + c[3], total[4] + c[4],
            total[5] or c[5])


def reduce_sum(x: np.ndarray, axis, *, keepdims: bool = False) -> np.ndarray:
    """Sum over ``axis`` (int or tuple); in ``f16`` under the blocked model,
    summing the reduced axes in C order (last fastest). A device model with
    ``fp32_reductions`` keeps the float32 sum (the caller rounds what it stores)."""
    p = current_precision()
    if not p.math16 or p.device and p.device.fp32_reductions:
        return np.sum(x, axis=axis, dtype=np.float32, keepdims=keepdims)
    if _severe_only(x):
        with _mon.unwatched():
            out = reduce_sum(x, axis, keepdims=keepdims)
        if _is_finite(out):
            return out
    axes = tuple(sorted(a % x.ndim for a in ((axis,) if np.isscalar(axis) else axis)))
    keep = [i for i in range(x.ndim) if i not in axes]
    flat = np.transpose(x, keep + list(axes)).reshape([x.shape[i] for i in keep] + [-1])
    k = flat.shape[-1]
    if flat.dtype == np.float32 and k > p.block and flat.size:
        s = _reduce_sum_blocked(flat, p.block, p.ftz)
    else:
        s = _reduce_sum_loop(flat, p.block)
    if keepdims:
        s = s.reshape([1 if i in axes else n for i, n in enumerate(x.shape)])
    return s


def _reduce_sum_loop(flat: np.ndarray, block: int) -> np.ndarray:
    """The blocked model over the last axis as written (the reference
    ``_reduce_sum_blocked`` is tested against)."""
    s = None
    for k0 in range(0, flat.shape[-1], block):
        part = prim(np.sum(flat[..., k0 : k0 + block], axis=-1, dtype=np.float32), "sum.partial")
        s = part if s is None else prim(s + part, "sum.accumulate")
    if s is None:
        s = np.zeros(flat.shape[:-1], np.float32)
    return s


# Running sums at most this wide run as float16 additions (one call per block).
_F16_SUM_WIDTH = 1 << 12


def _reduce_sum_blocked(flat: np.ndarray, block: int, ftz: bool) -> np.ndarray:
    """``_reduce_sum_loop``, bit for bit, with far fewer Python-level calls.

    All partial sums come from one ``np.sum`` over a (rows, blocks, block)
    view: each is the same reduction of the same ``block`` contiguous float32
    values as the loop's slice. Unmonitored they are rounded in one call, and
    the running sum ``r16(s + p)``, an fp16 addition (the float32 sum of two
    fp16 values rounded once more is the correctly rounded fp16 sum, as
    float32 has at least 2 * 11 + 2 bits), runs as NumPy float16 additions
    when narrow, else in place with ``round_sum_f16``. Results holding a NaN
    (whose payload float16 would not keep) and ``ftz`` take the float32 path.
    Monitored, the roundings run block by block in the loop's order."""
    outer = flat.shape[:-1]
    k = flat.shape[-1]
    f2 = flat.reshape(-1, k)
    m = f2.shape[0]
    nfull = k // block
    nb = -(-k // block)
    parts = np.empty((nb, m), np.float32)
    sums = np.sum(f2[:, : nfull * block].reshape(m, nfull, block), axis=-1, dtype=np.float32)
    parts[:nfull] = sums.T
    if nb > nfull:
        parts[nfull] = np.sum(f2[:, nfull * block :], axis=-1, dtype=np.float32)
    stats = _mon.active_monitor() is not None
    kern = kernels.compiled()
    if kern is not None:
        s = np.empty(m, np.float32)
        counters = kern.accumulate(parts, s, True, ftz, stats)
        if stats:
            _report_blocks(counters, ftz, "sum")
        return s.reshape(outer)
    if stats:
        s = None
        for j in range(nb):
            pj = parts[j]
            _report(rounding_stats(round_into(pj, pj, ftz, True), ftz), "sum.partial")
            if s is None:
                s = pj.copy()
                continue
            np.add(s, pj, out=s)
            _report(rounding_stats(round_into(s, s, ftz, True), ftz), "sum.accumulate")
        return s.reshape(outer)
    pf = parts.reshape(-1)
    round_into(pf, pf, ftz, False)
    if not ftz and m <= _F16_SUM_WIDTH:
        h = parts.astype(np.float16)  # exact: already fp16 values
        acc = h[0].copy()
        for j in range(1, nb):
            np.add(acc, h[j], out=acc)
        s = acc.astype(np.float32)
        if not np.isnan(s).any():
            return s.reshape(outer)
    s = parts[0].copy()
    for j in range(1, nb):
        np.add(s, parts[j], out=s)
        round_sum_f16(s, ftz, False)
    return s.reshape(outer)


def reduce_mean(x: np.ndarray, axes, primitive: str = "mean") -> np.ndarray:
    """Mean over ``axes`` (kept as size-1 dims): ``reduce_sum / n`` rounded as
    one primitive in ``f16`` (``litert-gpu``: the float32 mean, stored by
    ``kernel_out``)."""
    axes = (axes,) if np.isscalar(axes) else tuple(axes)
    n = int(np.prod([x.shape[a] for a in axes]))
    return kernel_out(reduce_sum(x, axes, keepdims=True) / np.float32(n), primitive)


_LOG2E = np.float32(1.0 / np.log(2.0))


def exp(x: np.ndarray, primitive: str = "exp") -> np.ndarray:
    """``exp(x)`` as a primitive: rounded in ``f16``; under a device model with
    ``exp2`` computed as the kernel does, ``exp2(r16(x * r16(log2 e)))``, whose
    fp16 argument is off by up to |x log2 e| (2**-11 + 2.2e-4) (its rounding and
    the constant's), a relative error of the result ln 2 times that (1.7e-3
    measured at x = 11)."""
    p = current_precision()
    if p.device and p.device.exp2:
        return prim(perturb(np.exp2(prim(x * round_f16(_LOG2E), primitive + ".log2e"))), primitive)
    return prim(perturb(np.exp(x)), primitive)


def kernel_out(y: np.ndarray, primitive: str) -> np.ndarray:
    """The fp16 tensor a float32 kernel (a reduction, a fused op) stores: under
    a device model with ``truncating_stores`` rounded toward zero
    (``truncate_f16``: past 65504 it saturates, reported as an ``overflow``
    since the value is silently wrong); otherwise a primitive (``prim``)."""
    p = current_precision()
    if not (p.device and p.device.truncating_stores):
        return prim(y, primitive)
    y = np.asarray(y, dtype=np.float32)
    r = truncate_f16(y, ftz=p.ftz)
    if _mon.active_monitor() is not None:
        a = np.abs(y)
        finite = np.isfinite(a)
        saturated = int(np.count_nonzero(finite & (a >= np.float32(2.0**16))))
        if saturated:
            _mon.active_monitor().event("overflow", _frame().op, primitive, saturated,
                                        "finite value saturates to 65504 (float32 kernel output truncated to fp16)",
                                        True)
            _frame().inf_seen = True
        nonzero = a != 0
        to_zero = int(np.count_nonzero(nonzero & (r == 0)))
        to_sub = int(np.count_nonzero((r != 0) & (np.abs(r) < np.float32(FP16_MIN_NORMAL))))
        has_nan, has_inf = bool(np.isnan(a).any()), bool(np.isinf(a).any())
        _report(RoundingStats(0, to_zero, to_sub, has_nan, has_inf, 0.0), primitive)
    return r
