"""Compiled fp16 kernels: the same bits as the NumPy definitions in
``refsd.numerics`` and ``refsd.ops._core``, in one pass per element.

Each kernel names the definition it stands for; ``tests/test_kernels.py``
proves the two agree bit for bit (NaN payloads, infinities, subnormals,
values next to 65504, FTZ) and the monitor's counters with them.

Written for what the CPU does, not for what LLVM may assume:
- fp16 rounding is the hardware conversion (LLVM's ``fptrunc`` to half), the
  same IEEE operation as the definition's integer steps, with NaN and FTZ
  handled as the definition does;
- integer steps are cast back to ``uint32`` one by one (numba widens
  ``uint32`` arithmetic to 64-bit lanes otherwise, which halves the SIMD width);
- the float32 <-> uint32 reinterpretation is an LLVM ``bitcast`` (``_bits``,
  ``_float``), so a NaN's payload passes through untouched;
- an addition that may meet a NaN picks the NaN's payload explicitly as x86's
  ``addss a, b`` does (the first operand's, quieted), because LLVM may swap
  the operands of a commutative ``fadd`` and IEEE leaves the payload open;
- no fast-math: every float operation keeps IEEE semantics (signed zeros,
  infinities, NaN), as NumPy's do.

Parallel kernels split their element range into fixed chunks; each element's
result depends on that element alone, and the counters are integer sums and
maxima, so the result is the same at any thread count.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# Elements per parallel chunk: below this a kernel runs on one thread (a
# parallel launch costs more than rounding 64K elements).
CHUNK = 1 << 16
# Element-steps (accumulation) or multiply-adds (sequential matmul) below
# which a kernel runs on one thread.
_SERIAL_WORK = 1 << 20
# Counter layout returned by the rounding kernels (``numerics.round_into``'s tuple).
HI, TOP, OVERFLOW, TO_ZERO, TO_SUBNORMAL, HAD_INF = range(6)
NCOUNT = 6


@intrinsic
def _bits(typingctx, x):
    """float32 -> its uint32 bit pattern (an LLVM bitcast)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _float(typingctx, u):
    """uint32 bit pattern -> float32 (an LLVM bitcast)."""
    if u != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


_SIGN = np.uint32(0x80000000)
_ABS = np.uint32(0x7FFFFFFF)
_INF = np.uint32(0x7F800000)
_OVERFLOW_FROM = np.uint32(0x477FF000)
_NORMAL_FROM = np.uint32(0x38800000)
_ZERO_UPTO = np.uint32(0x33000000)
_F16_MAX_BITS = np.uint32(0x477FE000)
_KEEP = np.uint32(0xFFFFE000)
_ZERO = np.uint32(0)
_QUIET = np.uint32(0x00400000)
_DEFAULT_NAN = np.uint32(0xFFC00000)
_FZERO = np.float32(0.0)
_F16_MIN_NORMAL = np.float32(2.0**-14)
_GRID = np.float32(2.0**24)
_ONE = np.uint32(1)
_SMALL_BELOW = np.uint32(_NORMAL_FROM - _ONE)  # a - 1 below this: 0 < a < 2**-14


@intrinsic
def _via_half(typingctx, x):
    """float32 -> fp16 -> float32 as LLVM's ``fptrunc`` / ``fpext``: IEEE
    round-to-nearest-even with overflow to inf and fp16 subnormals (one
    ``vcvtps2ph`` / ``vcvtph2ps`` pair where the CPU has F16C, compiler-rt's
    conversion elsewhere: the same bits)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.float32), codegen


@njit(inline="always")
def _r16(u, ftz):
    """``numerics._round_chunk`` on one float32 bit pattern: round to nearest
    even onto fp16, overflow to inf, NaN kept with its whole payload (the
    conversion would keep only 10 bits of it), and under ``ftz`` an input
    below 2**-14 in magnitude flushed to signed zero."""
    a = np.uint32(u & _ABS)
    r = _bits(_via_half(_float(u)))
    if a > _INF:
        r = u
    if ftz and a < _NORMAL_FROM:
        r = np.uint32(u & _SIGN)
    return r


@njit(inline="always")
def _r16_nan_free(x, ftz):
    """``_r16`` on a float32 that is not NaN, or is x86's default NaN (whose
    bits survive the conversion): no payload to keep."""
    r = _via_half(x)
    if ftz and abs(x) < _F16_MIN_NORMAL:
        r = _float(np.uint32(_bits(x) & _SIGN))
    return r


@njit(inline="always")
def _t16(u, ftz):
    """``numerics.truncate_f16`` on one bit pattern: toward zero onto fp16,
    finite values past 65504 saturate, inf and NaN kept."""
    a = np.uint32(u & _ABS)
    r = np.uint32(a & _KEEP)
    if r > _F16_MAX_BITS:
        r = _F16_MAX_BITS
    if a >= _INF:
        r = a
    if a < _NORMAL_FROM:
        if ftz:
            r = _ZERO
        else:
            r = _bits(np.float32(np.floor(_float(a) * _GRID)) / _GRID)
    return np.uint32(r | np.uint32(u & _SIGN))


@njit(inline="always")
def _add(x, y):
    """``x + y`` in float32 with x86's NaN rule (``np.add``'s bits): a NaN
    operand's payload, the first one's if both, quieted; the default NaN for
    an invalid sum (inf - inf)."""
    t = x + y
    if t != t:
        ux = _bits(x)
        uy = _bits(y)
        if np.uint32(ux & _ABS) > _INF:
            t = _float(np.uint32(ux | _QUIET))
        elif np.uint32(uy & _ABS) > _INF:
            t = _float(np.uint32(uy | _QUIET))
        else:
            t = _float(_DEFAULT_NAN)
    return t


@njit(cache=True, nogil=True)
def _tally(u, ftz, c):
    """Add the bit patterns ``u``'s rounding to the counters ``c`` (length 6),
    as ``numerics._round_chunk`` and ``_underflows`` count them (``u.size`` <
    2**32). One vectorized pass takes the largest magnitude and counts the
    small ones with one unsigned compare each (``a - 1 < bound``: zero wraps
    above every bound); only where that maximum reaches fp16's overflow
    threshold does a second pass count overflows and infinities and take the
    largest non-NaN magnitude."""
    hi = tiny = small = _ZERO
    for i in range(u.size):
        a = np.uint32(u[i] & _ABS)
        hi = max(hi, a)
        a1 = np.uint32(a - _ONE)
        tiny = np.uint32(tiny + np.uint32(a1 < _ZERO_UPTO))
        small = np.uint32(small + np.uint32(a1 < _SMALL_BELOW))
    if hi < _OVERFLOW_FROM:
        _add_in_range(c, hi, tiny, small, ftz)
        return
    top = _ZERO
    overflow = had_inf = 0
    for i in range(u.size):
        a = np.uint32(u[i] & _ABS)
        top = max(top, a if a <= _INF else _ZERO)
        had_inf |= a == _INF
        overflow += (a >= _OVERFLOW_FROM) & (a < _INF)
    c[HI] = max(c[HI], hi)
    c[TOP] = max(c[TOP], top)
    c[OVERFLOW] += overflow
    c[HAD_INF] |= had_inf
    _add_underflows(c, tiny, small, ftz)


@njit(inline="always")
def _add_in_range(c, hi, tiny, small, ftz):
    """``_tally``'s counters for magnitudes all below fp16's overflow
    threshold (no overflow, inf or NaN), the largest ``hi``."""
    c[HI] = max(c[HI], hi)
    c[TOP] = max(c[TOP], hi)
    _add_underflows(c, tiny, small, ftz)


@njit(inline="always")
def _add_underflows(c, tiny, small, ftz):
    """``small`` nonzero magnitudes under 2**-14, ``tiny`` of them at most
    2**-25: all to zero under ``ftz``, else those to zero and the rest to subnormals."""
    if ftz:
        c[TO_ZERO] += small
    else:
        c[TO_ZERO] += tiny
        c[TO_SUBNORMAL] += small - tiny


# Elements rounded before their statistics are taken, while still in L1.
_PIECE = 1 << 12


@njit(cache=True, nogil=True)
def _round_serial(u, out, ftz, stats, c):
    # Tallying and rounding as separate loops over a cache-resident piece:
    # each vectorizes, and memory is read once. Tally first: ``out`` may be ``u``.
    # Loops index from 0 over slices: an index numba cannot prove non-negative gets a wraparound
    # check, which stops LLVM vectorizing the loop (measured: 1.2 against 0.085 ns per element).
    n = u.size
    for lo in range(0, n, _PIECE):
        hi = min(lo + _PIECE, n)
        up, op = u[lo:hi], out[lo:hi]
        if stats:
            _tally(up, ftz, c)
        for i in range(up.size):
            op[i] = _r16(up[i], ftz)


@njit(cache=True, nogil=True, parallel=True)
def _round_parallel(u, out, ftz, stats, cs):
    n = u.size
    for k in prange(cs.shape[0]):
        lo = k * CHUNK
        hi = min(lo + CHUNK, n)
        _round_serial(u[lo:hi], out[lo:hi], ftz, stats, cs[k])


def round_into(x: np.ndarray, out: np.ndarray, ftz: bool, stats: bool) -> tuple:
    """``numerics.round_into``: same arguments, same bits, same counters."""
    u, o = x.view(np.uint32), out.view(np.uint32)
    if x.size <= CHUNK:
        c = np.zeros(NCOUNT, np.int64)
        _round_serial(u, o, ftz, stats, c)
        return _counters(c)
    cs = np.zeros(((x.size + CHUNK - 1) // CHUNK, NCOUNT), np.int64)
    _round_parallel(u, o, ftz, stats, cs)
    return _counters(_merge_pieces(cs))


def _merge_pieces(cs: np.ndarray) -> np.ndarray:
    """Counters of pieces (axis 0) merged: maxima of the magnitudes and of had_inf, sums of the counts."""
    c = cs.sum(axis=0)
    c[..., HI] = cs[..., HI].max(axis=0)
    c[..., TOP] = cs[..., TOP].max(axis=0)
    c[..., HAD_INF] = cs[..., HAD_INF].max(axis=0)
    return c


def _counters(c) -> tuple:
    return int(c[HI]), int(c[TOP]), int(c[OVERFLOW]), int(c[TO_ZERO]), int(c[TO_SUBNORMAL]), bool(c[HAD_INF])


@njit(cache=True, nogil=True, parallel=True)
def _truncate(u, out, ftz):
    n = u.size
    nchunk = (n + CHUNK - 1) // CHUNK
    for k in prange(nchunk):
        uk, ok = u[k * CHUNK : min(k * CHUNK + CHUNK, n)], out[k * CHUNK : min(k * CHUNK + CHUNK, n)]
        for i in range(uk.size):  # from 0: see _round_serial
            ok[i] = _t16(uk[i], ftz)


def truncate_into(x: np.ndarray, out: np.ndarray, ftz: bool) -> None:
    """``numerics.truncate_f16`` of the contiguous 1-D float32 ``x`` into ``out``."""
    _truncate(x.view(np.uint32), out.view(np.uint32), ftz)


# ---------------------------------------------------------------- blocked accumulation


@njit(cache=True, nogil=True)
def _step(pu, s, first, ftz, stats, cp, ca, w):
    """One block of the running sum over a piece: ``s = r16(P)`` (``first``)
    or ``s = r16(s + r16(P))``, ``pu`` the partials' bits; ``w`` (scratch)
    takes the sums' bits. The plain float32 sums run first, vectorized; only a
    piece where one came out NaN is summed again with ``_add``'s payload rule."""
    n = pu.size
    if first:
        for i in range(n):
            s[i] = _float(_r16(pu[i], ftz))
    else:
        nan = False
        for i in range(n):
            t = s[i] + _float(_r16(pu[i], ftz))
            nan |= t != t
            w[i] = _bits(t)
        if nan:
            for i in range(n):
                w[i] = _bits(_add(s[i], _float(_r16(pu[i], ftz))))
        for i in range(n):
            s[i] = _float(_r16(w[i], ftz))
    if stats:
        _tally(pu, ftz, cp)
        if not first:
            _tally(w[:n], ftz, ca)


@njit(cache=True, nogil=True)
def _accumulate_piece(pu, s, k, first, ftz, stats, ck):
    """Output piece ``k`` (``_PIECE`` elements) through every block."""
    n = pu.shape[1]
    lo = k * _PIECE
    hi = min(lo + _PIECE, n)
    w = np.empty(hi - lo, np.uint32)
    for j in range(pu.shape[0]):
        _step(pu[j, lo:hi], s[lo:hi], first and j == 0, ftz, stats, ck[j, 0], ck[j, 1], w)


@njit(cache=True, nogil=True)
def _accumulate_serial(pu, s, first, ftz, stats, cs):
    for k in range(cs.shape[0]):
        _accumulate_piece(pu, s, k, first, ftz, stats, cs[k])


@njit(cache=True, nogil=True, parallel=True)
def _accumulate_parallel(pu, s, first, ftz, stats, cs):
    for k in prange(cs.shape[0]):
        _accumulate_piece(pu, s, k, first, ftz, stats, cs[k])


def accumulate(parts: np.ndarray, s: np.ndarray, first: bool, ftz: bool, stats: bool):
    """The blocked model's running sum over ``parts`` (blocks x n, float32
    partial sums in block order, C-contiguous) into ``s`` (n): ``s = r16(P_0)``
    if ``first``, then ``s = r16(s + r16(P_j))`` for each block. Stands for the
    rounding and addition loops of ``_core._matmul_blocked`` and
    ``_core._reduce_sum_blocked``. Returns, with ``stats``, per block its
    (partial, accumulate) counter tuples (accumulate None for a first block)."""
    nb, n = parts.shape
    cs = np.zeros(((n + _PIECE - 1) // _PIECE, nb, 2, NCOUNT), np.int64)
    # Small sums on one thread: a parallel launch costs more than it saves there.
    run = _accumulate_serial if parts.size <= _SERIAL_WORK else _accumulate_parallel
    run(parts.view(np.uint32), s, first, ftz, stats, cs)
    if not stats:
        return None
    c = _merge_pieces(cs)
    return [(_counters(c[j, 0]), None if j == 0 and first else _counters(c[j, 1])) for j in range(nb)]


# Groups of output rows of ``matmul_sequential``, each with its own counters
# (integers: the totals do not depend on the split).
_ROW_GROUPS = 64


@njit(cache=True, nogil=True)
def _matmul_rows(a, b, out, r0, r1, ftz, stats, cg):
    m = a.shape[1]
    n = b.shape[2]
    pu = np.empty(n, np.uint32)
    w = np.empty(n, np.uint32)
    for r in range(r0, r1):
        bi = r // m
        i = r - bi * m
        o = out[bi, i]
        for j in range(a.shape[2]):
            aj = a[bi, i, j]
            bj = b[bi, j]
            if j == 0:
                for q in range(n):
                    # ``+ 0``: a GEMM sums onto a zeroed accumulator, so a -0
                    # product comes out +0 (measured on NumPy's K=1 matmul).
                    pu[q] = _bits(aj * bj[q] + _FZERO)
                _step(pu, o, True, ftz, stats, cg[j, 0], cg[j, 1], w)
            elif stats:
                _fused_step_tallied(aj, bj, o, ftz, cg[j, 0], cg[j, 1], pu, w)
            else:
                # One fused loop. Inputs are finite, so the only NaN a sum can
                # make is inf - inf, x86's default NaN whatever the operand
                # order, which then propagates alone: no payload choice, and
                # the conversion keeps the default NaN's bits.
                for q in range(n):
                    p = _r16_nan_free(aj * bj[q] + _FZERO, ftz)
                    o[q] = _r16_nan_free(o[q] + p, ftz)


@njit(cache=True, nogil=True)
def _fused_step_tallied(aj, bj, o, ftz, cp, ca, pu, w):
    """The fused loop's step ``o = r16(o + r16(aj * bj))`` with ``_tally``'s
    counters of the products (``cp``) and of the sums (``ca``), counted in the
    same pass. Inputs are finite, so a product is finite and a sum is NaN only
    as the default NaN; the rare magnitudes past fp16's range are counted
    again exactly (``_tally``) from the products recomputed into ``pu`` and the
    sums kept in ``w``. Small magnitudes counted as ``a - 1 < bound`` in
    unsigned arithmetic (zero wraps above every bound): one compare each."""
    n = bj.size
    hp = ha = _ZERO
    zp = za = sp = sa = _ZERO
    for q in range(n):
        x = aj * bj[q] + _FZERO
        t = o[q] + _r16_nan_free(x, ftz)
        o[q] = _r16_nan_free(t, ftz)
        w[q] = _bits(t)
        ux = np.uint32(_bits(x) & _ABS)
        ut = np.uint32(_bits(t) & _ABS)
        hp = max(hp, ux)
        ha = max(ha, ut)
        ux1 = np.uint32(ux - _ONE)
        ut1 = np.uint32(ut - _ONE)
        zp = np.uint32(zp + np.uint32(ux1 < _ZERO_UPTO))
        za = np.uint32(za + np.uint32(ut1 < _ZERO_UPTO))
        sp = np.uint32(sp + np.uint32(ux1 < _SMALL_BELOW))
        sa = np.uint32(sa + np.uint32(ut1 < _SMALL_BELOW))
    if hp >= _OVERFLOW_FROM:
        for q in range(n):
            pu[q] = _bits(aj * bj[q] + _FZERO)
        _tally(pu[:n], ftz, cp)
    else:
        _add_in_range(cp, hp, zp, sp, ftz)
    if ha >= _OVERFLOW_FROM:
        _tally(w[:n], ftz, ca)
    else:
        _add_in_range(ca, ha, za, sa, ftz)


# Output rows summed together by the unwatched sequential matmul: each row of
# ``b`` is loaded once for all of them (a row-at-a-time loop reloads the whole
# of ``b`` from L2 or memory for every output row).
_ROW_TILE = 4
# Widest output row for which the tile's running sums stay in L1 (32 KB):
# wider, the tile is slower than one row at a time (measured: n = 4096).
_TILE_WIDTH = 2048


@njit(cache=True, nogil=True)
def _matmul_rows_tiled(a, b, out, r0, r1, ftz):
    """``_matmul_rows`` unwatched: the same sequential sum per output element
    (``o = r16(a_0 b_0)``, then ``o = r16(o + r16(a_j b_j))`` in order of j),
    ``_ROW_TILE`` rows of one batch item at a time."""
    m = a.shape[1]
    n = b.shape[2]
    r = r0
    while r < r1:
        bi = r // m
        i = r - bi * m
        if r + _ROW_TILE > r1 or i + _ROW_TILE > m or n > _TILE_WIDTH:
            _matmul_rows(a, b, out, r, r + 1, ftz, False, np.zeros((1, 2, NCOUNT), np.int64))
            r += 1
            continue
        o0 = out[bi, i]
        o1 = out[bi, i + 1]
        o2 = out[bi, i + 2]
        o3 = out[bi, i + 3]
        a0 = a[bi, i]
        a1 = a[bi, i + 1]
        a2 = a[bi, i + 2]
        a3 = a[bi, i + 3]
        b0 = b[bi, 0]
        for q in range(n):
            bq = b0[q]
            o0[q] = _r16_nan_free(a0[0] * bq + _FZERO, ftz)
            o1[q] = _r16_nan_free(a1[0] * bq + _FZERO, ftz)
            o2[q] = _r16_nan_free(a2[0] * bq + _FZERO, ftz)
            o3[q] = _r16_nan_free(a3[0] * bq + _FZERO, ftz)
        for j in range(1, a.shape[2]):
            bj = b[bi, j]
            x0 = a0[j]
            x1 = a1[j]
            x2 = a2[j]
            x3 = a3[j]
            for q in range(n):
                bq = bj[q]
                o0[q] = _r16_nan_free(o0[q] + _r16_nan_free(x0 * bq + _FZERO, ftz), ftz)
                o1[q] = _r16_nan_free(o1[q] + _r16_nan_free(x1 * bq + _FZERO, ftz), ftz)
                o2[q] = _r16_nan_free(o2[q] + _r16_nan_free(x2 * bq + _FZERO, ftz), ftz)
                o3[q] = _r16_nan_free(o3[q] + _r16_nan_free(x3 * bq + _FZERO, ftz), ftz)
        r += _ROW_TILE


@njit(cache=True, nogil=True)
def _matmul_group(a, b, out, r0, r1, ftz, stats, cg):
    if stats:
        _matmul_rows(a, b, out, r0, r1, ftz, True, cg)
    else:
        _matmul_rows_tiled(a, b, out, r0, r1, ftz)


@njit(cache=True, nogil=True)
def _matmul_serial(a, b, out, ftz, stats, cs):
    rows = a.shape[0] * a.shape[1]
    ng = cs.shape[0]
    for g in range(ng):
        _matmul_group(a, b, out, rows * g // ng, rows * (g + 1) // ng, ftz, stats, cs[g])


@njit(cache=True, nogil=True, parallel=True)
def _matmul_parallel(a, b, out, ftz, stats, cs):
    rows = a.shape[0] * a.shape[1]
    ng = cs.shape[0]
    for g in prange(ng):
        _matmul_group(a, b, out, rows * g // ng, rows * (g + 1) // ng, ftz, stats, cs[g])


def matmul_sequential(a: np.ndarray, b: np.ndarray, ftz: bool, stats: bool):
    """The blocked model with ``block=1`` (a sequential fp16 dot product) for
    ``a`` (batch, m, k) @ ``b`` (batch, k, n), float32, C-contiguous, finite:
    a product of two fp16 values is exact in float32, so each partial equals
    the K=1 GEMM's (a NaN's payload through BLAS is BLAS's own, so the caller
    keeps non-finite inputs on the definition). Returns the (batch, m, n)
    result and, with ``stats``, per K the (partial, accumulate) counters."""
    nbatch, m, k = a.shape
    out = np.empty((nbatch, m, b.shape[2]), np.float32)
    # Unwatched, only the first step's (unused) counters are written: one K slot, not K.
    cs = np.zeros((max(1, min(nbatch * m, _ROW_GROUPS)), k if stats else 1, 2, NCOUNT), np.int64)
    run = _matmul_serial if nbatch * m * k * b.shape[2] <= _SERIAL_WORK else _matmul_parallel
    run(a, b, out, ftz, stats, cs)
    if not stats:
        return out, None
    c = _merge_pieces(cs)
    return out, [(_counters(c[j, 0]), None if j == 0 else _counters(c[j, 1])) for j in range(k)]


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the types refsd
    calls it with, so a failure shows at the switch, not mid-run."""
    x = np.linspace(-70000, 70000, 2 * CHUNK + 3, dtype=np.float32)
    out = np.empty_like(x)
    big = np.linspace(-1, 1, 2 * _SERIAL_WORK + 2, dtype=np.float32)  # past the one-thread limits
    for ftz in (False, True):
        for stats in (False, True):
            round_into(x, out, ftz, stats)
            round_into(x[:5], out[:5], ftz, stats)
            for first in (True, False):
                accumulate(x[:12].reshape(3, 4), np.zeros(4, np.float32), first, ftz, stats)
                accumulate(big.reshape(2, -1), np.zeros(big.size // 2, np.float32), first, ftz, stats)
            matmul_sequential(x[:6].reshape(1, 2, 3), x[:12].reshape(1, 3, 4), ftz, stats)
            matmul_sequential(big[: 64 * 128].reshape(1, 64, 128), big[: 128 * 129].reshape(1, 128, 129), ftz, stats)
        truncate_into(x, out, ftz)
