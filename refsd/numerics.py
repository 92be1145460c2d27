"""Precision modes and float16 rounding.

Three modes, named after TFLite GPU's ``CalculationsPrecision``:

``f32``
    float32 storage and math. The ideal every other mode is measured against.
``f32_f16``
    float16 *storage*: every op input and output is rounded to fp16
    (round-to-nearest-even, overflow to inf, NaN kept); math inside an op is
    float32.
``f16``
    float16 storage *and* math: each primitive inside an unfused op is rounded
    to fp16, and reductions / matmul / conv accumulate under the **blocked
    model**: float32 partial sums of ``block`` consecutive terms (products of
    two fp16 numbers are exact in float32), each partial rounded to fp16 and
    added to an fp16 running sum::

        s = r16(P_0);  s = r16(s + r16(P_j))  for j = 1 .. ceil(K / block) - 1

    ``block=1`` is a sequential fp16 dot product, bit for bit what a
    ``np.float16`` scalar loop computes. A GPU shader that accumulates FLT4
    slices in half registers is ``block=4``; the default ``block=32`` models a
    kernel that keeps a short fp32 partial (and keeps emulation fast).

``device_model="litert-gpu"`` (``f16`` only) replaces the generic f16 model
by what LiteRT's GPU accelerator's fp16 kernels were measured to do
(``DeviceModel``, ``bench/gpu_probes.py``, README "fp16 on real GPU kernels").

``ftz=True`` flushes fp16 subnormals (``|x| < 2**-14``) to signed zero, as many
mobile GPUs do.

The precision is one field of ``RunSettings``, the one immutable object that
says how the running ops compute (with perturbed transcendentals,
either-rounding, weight jitter and the recorder): ops read it with
``current_settings()``; ``run_settings`` and ``precision`` set it for a block.

All arrays stay ``float32`` holding fp16 values: rounding is emulated around
float32 BLAS, never computed in ``np.float16`` loops (NumPy's float16 matmul is
hundreds of times slower and accumulates in float32 anyway).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

import numpy as np

from refsd import kernels

MODES = ("f32", "f32_f16", "f16")
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
FP16_MIN_SUBNORMAL = 2.0**-24
# Unit roundoff u (half an ulp at 1): 11 significant bits for fp16, 24 for fp32.
U_F32 = 2.0**-24
U_F16 = 2.0**-11

_U32 = np.uint32
_SIGN = _U32(0x80000000)
_ABS = _U32(0x7FFFFFFF)
_INF = _U32(0x7F800000)
# float32 bit patterns: smallest magnitude that rounds to fp16 inf (65520),
# and the smallest fp16 normal (2**-14).
_OVERFLOW_FROM = _U32(0x477FF000)
_NORMAL_FROM = _U32(0x38800000)
# 2**-25: the largest magnitude that rounds to fp16 zero (a tie, to even).
_ZERO_UPTO = _U32(0x33000000)


@dataclass(frozen=True)
class DeviceModel:
    """How one runtime's fp16 kernels compute, where that differs from the
    generic ``f16`` model. Each field was measured on probe models that isolate
    one op (``bench/gpu_probes.py``); the comment says what was seen."""

    name: str
    # FULLY_CONNECTED, CONV_2D, BATCH_MATMUL: the accumulation block. 1: a
    # sequential fp16 sum of fp16-rounded products in (kh, kw, cin) order, the
    # bias added last (bit-identical on every probe; FULLY_CONNECTED on few
    # rows runs another kernel, ``fc_split_rows``).
    matmul_block: int
    # MEAN and SUM keep a float32 accumulator (the mean of 12288 x 100 is
    # exactly 100); only the result is stored as fp16.
    fp32_reductions: bool
    # Kernels that compute in float32 (MEAN, SUM, SOFTMAX, the fused LayerNorm,
    # GELU) store fp16 by rounding toward zero (``truncate_f16``): bit-identical
    # on SUM and MEAN, 99.98% on SOFTMAX (every element within 1 ulp), and a
    # SUM past 65504 stores 65504, not inf. (Elementwise ops, model inputs and
    # constants round to nearest and overflow to inf.)
    truncating_stores: bool
    # EXP (and LOGISTIC's exp) is exp2(r16(x * r16(log2 e))) in fp16, so its
    # error grows with |x| (1.7e-3 relative at x = 11); bit-identical.
    exp2: bool
    # SOFTMAX is one float32 kernel: only its output is stored.
    fused_softmax: bool
    # The MEAN/SUB/MUL/MEAN/ADD/RSQRT/MUL pattern over the last axis (LayerNorm)
    # is one float32 kernel (its exposed intermediates read back garbage):
    # two-pass float32 statistics, truncated, 99.99% bit-identical.
    fused_layer_norm: bool
    # GroupNorm's second MEAN and the ADD of eps are one kernel: var + eps is
    # rounded once, to nearest (bit-identical; unlike a lone MEAN, which
    # truncates), and RSQRT is 1 / sqrt with the sqrt rounded.
    linked_eps: bool
    # The converter fuses the unfused tanh-GELU pattern into the GELU builtin
    # (one kernel, no x**3 tensor: finite where x**3 overflows fp16).
    gelu_builtin: bool
    # Graph-level float32 requests (diffusers' upcast_attention) do not exist
    # on the device: the whole graph runs in fp16.
    per_op_fp32: bool
    # FULLY_CONNECTED on at most this many rows (all dims but the last) splits
    # K over ``fc_split_threads`` threads (``refsd.ops._core.matmul_split``:
    # slice c of 4 inputs on thread c mod 8, each thread a sequential fp16 sum,
    # a halving tree across threads, bias last). Measured: 100% bit-identical
    # from 1 to 16 rows, K 4 to 2048; from 17 rows the sequential kernel.
    fc_split_rows: int = 0
    fc_split_threads: int = 1
    # The GELU builtin computed as its kernel does (``refsd.ops.activations``,
    # ``gelu_erf_kernel`` / ``gelu_tanh_kernel``): bit-identical on every
    # finite fp16 input, erf and tanh forms.
    gelu_kernel: bool = False
    # SOFTMAX on at least this many rows (all dims but the last) runs as two
    # kernels (``refsd.ops.attention._softmax_math``): float32 row sums, the
    # inverse stored in fp16 (truncated), then an fp16 elementwise kernel.
    # Measured: bit-identical at 1024 to 4096 rows, the fused kernel below.
    softmax_split_rows: int = 0
    # A GroupNorm's gamma and beta before a 1x1 CONV_2D (SD 1.x's proj_in) are
    # folded into the conv's weight and bias (``refsd.models.unet``): the
    # normalized values feed the conv unscaled. Measured: bit-identical.
    fold_norm_into_conv: bool = False


DEVICE_MODELS = {
    "litert-gpu": DeviceModel("litert-gpu", matmul_block=1, fp32_reductions=True, truncating_stores=True, exp2=True,
                              fused_softmax=True, fused_layer_norm=True, linked_eps=True, gelu_builtin=True,
                              per_op_fp32=False, fc_split_rows=16, fc_split_threads=8, gelu_kernel=True,
                              softmax_split_rows=1024, fold_norm_into_conv=True),
}


@dataclass(frozen=True)
class Precision:
    """A precision mode: ``mode`` in MODES, flush-to-zero, f16 accumulation block,
    and optionally a measured ``device_model`` (in DEVICE_MODELS, ``f16`` only)."""

    mode: str = "f32"
    ftz: bool = False
    block: int = 32
    device_model: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown precision mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if not isinstance(self.block, (int, np.integer)) or self.block < 1:
            raise ValueError(f"accumulation block must be a positive integer, got {self.block!r}")
        if self.device_model is not None:
            if self.device_model not in DEVICE_MODELS:
                raise ValueError(f"unknown device model {self.device_model!r}; expected one of "
                                 f"{', '.join(DEVICE_MODELS)}")
            if self.mode != "f16":
                raise ValueError(f"device model {self.device_model!r} models fp16 kernels: it needs mode 'f16', "
                                 f"got {self.mode!r}")

    @property
    def storage16(self) -> bool:
        """Tensors between ops are fp16."""
        return self.mode != "f32"

    @property
    def math16(self) -> bool:
        """Primitives inside unfused ops are fp16."""
        return self.mode == "f16"

    @property
    def device(self) -> DeviceModel | None:
        """The measured device model, or None for the generic modes."""
        return None if self.device_model is None else DEVICE_MODELS[self.device_model]

    @property
    def unit_roundoff(self) -> float:
        return U_F32 if self.mode == "f32" else U_F16


@dataclass(frozen=True)
class RunSettings:
    """How a run computes: one immutable object, the only one an op reads
    (``current_settings()``) to know how to compute. A run sets it once
    (``run_settings``); a model carries its own (``ModelOptions.settings``) and
    runs its entry points under it. A rerun's cache key is its ``content()``.

    ``precision``: the precision mode, FTZ, accumulation block and device
    model. ``transcendental_ulps``: every transcendental result moved by that
    many float32 ulp (``refsd.ops.transcendental``; 0: NumPy's results).
    ``either_rounding``: hybrid int8 kernels round each activation to either
    neighbour (``refsd.ops.hybrid``). ``weight_jitter``: fp16 / bf16 weights
    rounded from a value moved by +-1 unit roundoff (``refsd.models.loading``,
    read when a model loads its weights). ``recorder``: where module outputs
    are recorded (``refsd.context.recording``), None when not recording; what
    is kept, not how it is computed, so no part of ``content()``."""

    precision: Precision = Precision()
    transcendental_ulps: float = 0.0
    either_rounding: bool = False
    weight_jitter: bool = False
    recorder: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.precision, Precision):
            raise TypeError(f"precision must be a Precision, got {type(self.precision).__name__}")
        ulps = self.transcendental_ulps
        if not (ulps >= 0 and np.isfinite(ulps)):
            raise ValueError(f"transcendental ulps must be finite and >= 0, got {ulps!r}")
        object.__setattr__(self, "transcendental_ulps", float(ulps))

    def content(self) -> dict:
        """What a computation under these settings is a function of, as JSON."""
        return {"precision": asdict(self.precision), "transcendental_ulps": self.transcendental_ulps,
                "either_rounding": self.either_rounding, "weight_jitter": self.weight_jitter}


_SETTINGS: contextvars.ContextVar[RunSettings] = contextvars.ContextVar("refsd_run_settings", default=RunSettings())


def current_settings() -> RunSettings:
    """The settings the running ops compute under."""
    return _SETTINGS.get()


@contextlib.contextmanager
def run_settings(settings: RunSettings | None = None, /, **changes) -> Iterator[RunSettings]:
    """Run the enclosed ops under ``settings`` (default: the current ones),
    with the fields named in ``changes`` replaced::

        with run_settings(RunSettings(Precision("f16"), transcendental_ulps=4)):
            ...
        with run_settings(either_rounding=True):
            ...
    """
    s = settings if settings is not None else _SETTINGS.get()
    if changes:
        s = replace(s, **changes)
    token = _SETTINGS.set(s)
    try:
        yield s
    finally:
        _SETTINGS.reset(token)


@contextlib.contextmanager
def precision(mode: str | Precision = "f32", *, ftz: bool = False, block: int = 32,
              device_model: str | None = None) -> Iterator[Precision]:
    """Run the enclosed ops under a precision mode (the ``precision`` of the
    current ``RunSettings``)::

        with precision("f16", ftz=True):
            y = ops.gelu(x, approximate="tanh")
        with precision("f16", device_model="litert-gpu"):
            ...
    """
    p = mode if isinstance(mode, Precision) else Precision(mode, ftz, block, device_model)
    with run_settings(precision=p):
        yield p


def current_precision() -> Precision:
    """``current_settings().precision``."""
    return _SETTINGS.get().precision


@dataclass(frozen=True)
class RoundingStats:
    """What one rounding to fp16 did. Counts are element counts."""

    overflow: int  # finite in float32, inf in fp16
    to_zero: int  # non-zero in float32, zero in fp16
    to_subnormal: int  # non-zero, lands in fp16's subnormal range (lost precision)
    had_nan: bool  # NaN already present before rounding
    had_inf: bool  # inf already present before rounding
    max_abs: float  # of the rounded result, NaN ignored


def round_f16(x: np.ndarray, *, ftz: bool = False) -> np.ndarray:
    """Round to the nearest fp16 value (ties to even), returned as float32.

    Overflow goes to +-inf (anything >= 65520 in magnitude), NaN stays NaN,
    subnormals are kept (``ftz=False``) or flushed to signed zero.
    Bit for bit equal to ``x.astype(np.float16).astype(np.float32)`` when
    ``ftz=False``, and about twice as fast (bench/README.md).
    """
    return _round_f16(_as_float32(x), ftz, stats=False)[0]


# float32 bit pattern of 65504, the largest fp16 value.
_F16_MAX_BITS = _U32(0x477FE000)


def truncate_f16(x: np.ndarray, *, ftz: bool = False) -> np.ndarray:
    """Round toward zero onto fp16, returned as float32: how LiteRT's GPU kernels
    that compute in float32 (reductions, softmax, the fused LayerNorm) store
    their fp16 output (measured). Finite values past 65504 saturate to +-65504
    (so a too-large sum is silently wrong, never inf); inf and NaN are kept;
    subnormals are truncated onto fp16's 2**-24 grid, or flushed with ``ftz``."""
    x = _as_float32(x)
    k = kernels.compiled()
    if k is not None:
        flat = np.ascontiguousarray(x).reshape(-1)
        out = np.empty(flat.size, np.float32)
        k.truncate_into(flat, out, ftz)
        return out.reshape(x.shape)
    u = np.ascontiguousarray(x).view(_U32)
    a = u & _ABS
    r = a & _U32(0xFFFFE000)  # normal range: drop the 13 extra mantissa bits
    np.minimum(r, _F16_MAX_BITS, out=r)
    nonfinite = a >= _INF
    r[nonfinite] = a[nonfinite]
    small = a < _NORMAL_FROM
    if small.any():
        if ftz:
            r[small] = 0
        else:
            grid = np.float32(2.0**24)  # powers of two: both products are exact
            r[small] = (np.floor(a[small].view(np.float32) * grid) / grid).view(_U32)
    r |= u & _SIGN
    return r.view(np.float32).reshape(x.shape)


def round_f16_stats(x: np.ndarray, *, ftz: bool = False) -> tuple[np.ndarray, RoundingStats]:
    """``round_f16`` plus what it did, for the exception monitor."""
    return _round_f16(_as_float32(x), ftz, stats=True)


def _as_float32(x) -> np.ndarray:
    """float32 view of the input. A wider float (float64) is narrowed with
    round-to-odd, so the following round-to-nearest-even onto fp16 is a single
    correct rounding (24 >= 11 + 2 bits); plain float64 -> float32 -> fp16
    double-rounds values just off an fp16 midpoint onto the midpoint."""
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.dtype.itemsize <= 4:
        return np.asarray(x, dtype=np.float32)
    x = x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        y = x.astype(np.float32)
        inexact = (y != x) & np.isfinite(x)
    if inexact.any():
        y = np.where(np.abs(y) > np.abs(x), np.nextafter(y, np.float32(0)), y)  # truncate toward zero
        y = y.view(np.uint32) | inexact.astype(np.uint32)  # sticky bit: odd if inexact
        y = y.view(np.float32)
    return y


# Elements per chunk: the ~10 passes of the rounding run on a chunk while it is
# in cache, so a large tensor (attention scores: 10**8 elements) is read and
# written once from memory instead of once per pass (3x faster there).
_CHUNK = 1 << 15


def _round_f16(x: np.ndarray, ftz: bool, stats: bool) -> tuple[np.ndarray, RoundingStats | None]:
    shape = x.shape
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(flat.size, np.float32)
    c = round_into(flat, out, ftz, stats)
    out = out.reshape(shape)
    if not stats:
        return out, None
    return out, rounding_stats(c, ftz)


def rounding_stats(c: tuple, ftz: bool) -> RoundingStats:
    """``RoundingStats`` from ``round_into``'s counters."""
    hi, top, overflow, to_zero, to_subnormal, had_inf = c
    had_nan = hi > int(_INF)
    # Rounding is monotonic in |x|, so the largest rounded magnitude is the
    # rounding of the largest input magnitude (NaN bit patterns excluded).
    if ftz and top < int(_NORMAL_FROM):
        max_abs = 0.0
    else:  # one scalar: NumPy's own conversion (bit-exact with ours) is cheaper than a second pass here
        with np.errstate(over="ignore"):
            max_abs = float(_U32(top).view(np.float32).astype(np.float16))
    return RoundingStats(overflow, to_zero, to_subnormal, had_nan, had_inf, max_abs)


class _Scratch:
    """Three chunk-sized uint32 buffers, reused by ``round_into`` calls."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.a, self.b, self.c = (np.empty(n, _U32) for _ in range(3))


_SCRATCH = contextvars.ContextVar("refsd_round_scratch", default=None)


def _scratch(n: int) -> _Scratch:
    s = _SCRATCH.get()
    if s is None or s.n < n:
        s = _Scratch(max(n, _CHUNK))
        _SCRATCH.set(s)
    return s


def round_into(x: np.ndarray, out: np.ndarray, ftz: bool, stats: bool) -> tuple:
    """Round the contiguous 1-D float32 ``x`` onto fp16 into ``out`` (float32,
    same size; may be ``x`` itself), chunk by chunk. Returns counters for
    ``rounding_stats`` (with ``stats``; zeros otherwise): (max |bits|, max non-NaN
    |bits|, overflow, to_zero, to_subnormal, had_inf)."""
    k = kernels.compiled()
    if k is not None:
        return k.round_into(x, out, ftz, stats)
    hi = top = 0
    overflow = to_zero = to_subnormal = 0
    had_inf = False
    n = x.size
    if n == 0:
        return 0, 0, 0, 0, 0, False
    sc = _scratch(min(n, _CHUNK))
    for s0 in range(0, n, _CHUNK):
        xc, rc = x[s0 : s0 + _CHUNK], out[s0 : s0 + _CHUNK]
        c = _round_piece(xc, rc, sc, ftz, stats)
        if stats:
            hi, top = max(hi, c[0]), max(top, c[1])
            overflow, to_zero, to_subnormal = overflow + c[2], to_zero + c[3], to_subnormal + c[4]
            had_inf |= c[5]
    return hi, top, overflow, to_zero, to_subnormal, had_inf


_HALF_SUM_LIMIT = np.float32(65520.0)  # sums below this in magnitude round to a finite fp16


def round_sum_f16(x: np.ndarray, ftz: bool, stats: bool) -> tuple:
    """``round_into(x, x, ...)`` for ``x`` whose elements are each the float32
    sum of two fp16 values (a running sum plus a rounded partial sum).

    Such a sum is a multiple of 2**-24 and, if finite, never a float32
    subnormal, so below 2**-14 it already lies on fp16's subnormal grid and
    rounding to 11 significant bits is exact everywhere below 65520: five
    integer passes (round-to-nearest-even on the bit pattern, sign untouched)
    instead of the general path; its statistics need only the count of small
    non-zero sums. Anything else (inf, NaN, a magnitude that overflows,
    ``ftz``) takes ``round_into``. (The compiled ``round_into`` is one pass
    either way: it takes every sum.)"""
    if ftz or x.size == 0 or kernels.compiled() is not None:
        return round_into(x, x, ftz, stats)
    hi, lo = x.max(), x.min()
    if not (hi < _HALF_SUM_LIMIT and lo > -_HALF_SUM_LIMIT):  # NaN fails both
        return round_into(x, x, ftz, stats)
    u = x.view(_U32)
    sc = _scratch(x.size)
    t = sc.a[: x.size]
    res = (0, 0, 0, 0, 0, False)
    if stats:
        # Nothing overflows or goes to zero (a non-zero sum is at least 2**-24);
        # the non-zero sums below 2**-14 are the "subnormal" ones.
        f = sc.b[: x.size].view(np.float32)
        np.abs(x, out=f)
        n_small = int(np.count_nonzero(np.less(f, _F32_NORMAL16, out=sc.c[: x.size].view(np.bool_)[: x.size])))
        n_zero = x.size - int(np.count_nonzero(x))
        top = int(np.abs(np.float32([hi, lo])).max().view(_U32))  # abs: a -0 extreme is not a NaN pattern
        res = (top, top, 0, 0, n_small - n_zero, False)
    np.right_shift(u, _U32(13), out=t)
    np.bitwise_and(t, _U32(1), out=t)
    np.add(t, u, out=t)
    np.add(t, _U32(0x0FFF), out=t)
    np.bitwise_and(t, _U32(0xFFFFE000), out=u)
    return res


# float32 exponent field, sign bit; 2**15 (past it a value may round to fp16 inf)
_EXP = _U32(0x7F800000)
_FAST_BELOW = _U32(0x47000000)
# Added to a power of two 2**e (as bits): 1.5 * 2**(e + 13), whose float32 ulp is fp16's ulp at 2**e.
_MAGIC = _U32(0x06C00000)
_F32_NORMAL16 = np.float32(FP16_MIN_NORMAL)


def _round_piece(x: np.ndarray, r: np.ndarray, sc: _Scratch, ftz: bool, stats: bool):
    """One chunk of ``round_into``: the fast path below, or ``_round_chunk``
    (the bit-level reference) for a chunk with a magnitude >= 2**15, inf or NaN,
    or, under ``ftz``, a non-zero magnitude below 2**-14.

    Fast path: with ``c = 1.5 * 2**(max(e, -14) + 13)`` for ``|x|`` in binade
    ``2**e``, ``x + c`` lies in ``c``'s binade whatever the sign of ``x``, so
    the float32 addition rounds ``x`` to a multiple of ``2**(max(e, -14) - 10)``
    (fp16's ulp there; subnormals: 2**-24), to nearest, ties to even, exactly as
    fp16 does; ``- c`` is exact. An exact-zero result loses its sign to IEEE's
    ``c - c = +0``, so the sign bit is OR-ed back."""
    n = x.size
    u = x.view(_U32)
    e, sg = sc.a[:n], sc.b[:n]
    np.bitwise_and(u, _EXP, out=e)
    hi_e = e.max()
    slow = hi_e >= _FAST_BELOW
    if ftz and not slow:
        # Zeros and float32 subnormals (exponent field 0) round to signed zero either way.
        np.subtract(e, _U32(1), out=sg)
        slow = sg.min() < _NORMAL_FROM - _U32(1)
    if slow:
        if np.may_share_memory(x, r):  # _round_chunk reads u after writing r
            np.copyto(sc.c[:n], u)
            u = sc.c[:n]
        return _round_chunk(u, r.view(_U32), e, ftz, stats)
    res = (0, 0, 0, 0, 0, False)
    if stats:
        a = sc.c[:n]
        np.bitwise_and(u, _ABS, out=a)
        hi = int(a.max())
        lo = int(a.min())
        to_zero = to_subnormal = 0
        if lo < int(_NORMAL_FROM):
            to_zero, to_subnormal = _underflows(a, lo, int(np.count_nonzero(a < _NORMAL_FROM)), ftz)
        res = (hi, hi, 0, to_zero, to_subnormal, False)
    np.bitwise_and(u, _SIGN, out=sg)
    ef = e.view(np.float32)
    np.maximum(ef, _F32_NORMAL16, out=ef)
    np.add(e, _MAGIC, out=e)
    np.add(x, ef, out=r)
    np.subtract(r, ef, out=r)
    rv = r.view(_U32)
    np.bitwise_or(rv, sg, out=rv)
    return res


def _underflows(a: np.ndarray, lo: int, n_small: int, ftz: bool) -> tuple[int, int]:
    """(to zero, to subnormal) counts of rounding ``a`` (|x| bits, min ``lo``;
    ``n_small`` of them below fp16's smallest normal). Counted on the input,
    not the result (cheaper): |x| <= 2**-25 rounds to zero (a tie goes to
    even, 0), 2**-25 < |x| < 2**-14 to a subnormal; with ftz every non-zero
    small value goes to zero. Zeros stay zero and are not counted."""
    n_exact = a.size - int(np.count_nonzero(a)) if lo == 0 else 0
    if ftz:
        return n_small - n_exact, 0
    n_tiny = int(np.count_nonzero(a <= _ZERO_UPTO)) if lo <= int(_ZERO_UPTO) else 0
    return n_tiny - n_exact, n_small - n_tiny


def _round_chunk(u: np.ndarray, r: np.ndarray, a: np.ndarray, ftz: bool, stats: bool):
    """Round the float32 bit patterns ``u`` into ``r`` (``a`` is scratch).
    Returns (max |bits|, max non-NaN |bits|, overflow, to_zero, to_subnormal, had_inf)."""
    np.bitwise_and(u, _ABS, out=a)
    # Round-to-nearest-even onto 10 mantissa bits: add 0x0FFF plus the lowest
    # kept bit, then truncate the 13 dropped bits. Carries into the exponent
    # are exactly the round-up-to-next-binade cases.
    np.right_shift(a, _U32(13), out=r)
    r &= _U32(1)
    r += a
    r += _U32(0x0FFF)
    r &= _U32(0xFFFFE000)
    hi = int(a.max())
    lo = int(a.min())
    overflow = to_zero = to_subnormal = 0
    had_inf = False
    if hi >= int(_OVERFLOW_FROM):
        big = a >= _OVERFLOW_FROM
        nonfinite = a >= _INF
        had_inf = bool(np.any(a == _INF))
        if stats:
            overflow = int(np.count_nonzero(big & ~nonfinite))
        r[big] = _INF
        r[nonfinite] = a[nonfinite]  # keep inf and NaN (with payload)
    if lo < int(_NORMAL_FROM):
        small = a < _NORMAL_FROM
        n_small = int(np.count_nonzero(small))
        # Below 2**-14 fp16 is a fixed-point grid of step 2**-24; adding 0.5
        # (whose float32 ulp is 2**-24) rounds onto it, ties to even.
        half = np.float32(0.5)
        if n_small * 32 < a.size:  # few (the usual case): gather, round, scatter
            if ftz:
                r[small] = 0
            else:
                r[small] = ((a[small].view(np.float32) + half) - half).view(_U32)
        else:
            # Many (post-ReLU zeros, softmax tails): a branch-free select with a
            # bit mask. Boolean-mask assignment and np.copyto(where=) branch per
            # element and are 3-5x slower on a mixed mask.
            m = small.astype(_U32)
            if ftz:
                m -= _U32(1)  # 0 where small, all ones elsewhere
                r &= m
            else:
                np.negative(m, out=m)  # all ones where small
                with np.errstate(invalid="ignore"):  # signalling-NaN inputs are not small; discarded
                    sub = a.view(np.float32) + half
                sub -= half
                d = sub.view(_U32)
                d ^= r
                d &= m
                r ^= d
        if stats:
            to_zero, to_subnormal = _underflows(a, lo, n_small, ftz)
    top = hi if hi <= int(_INF) else int(a[a <= _INF].max(initial=0))
    np.bitwise_and(u, _SIGN, out=a)
    r |= a
    return hi, top, overflow, to_zero, to_subnormal, had_inf

