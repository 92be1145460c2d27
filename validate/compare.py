"""Tensor comparison with Polygraphy's semantics, plus the metrics a float16
device output needs. NumPy only: no refsd import, so the validator can judge
the reference without trusting it.

The rule (Polygraphy ``CompareFunc.simple``)::

    absdiff = |test - ref|
    reldiff = absdiff / |ref|            (ref == 0 is replaced by 2.2e-16)
    elemwise: an element fails only if  absdiff > atol  AND  reldiff > rtol
    max | mean | median | quantile: the output fails only if
        stat(absdiff) > atol  AND  stat(reldiff) > rtol

NaN, and inf that the other tensor does not match, always fail: such an
element's absdiff is NaN, which fails every check and every statistic, whatever
the tolerances (``infinities_compare_equal=True`` lets equal infs match; the
default, as in Polygraphy, is that they fail too). The reported statistics
are taken over the comparable elements, with the non-finite mismatches
counted separately, so one NaN does not hide the size of every other error.

Each result also reports the tolerances that would have passed:
``required_atol`` (the smallest atol that passes with the given rtol),
``required_rtol`` (the smallest rtol that passes with the given atol), and
``atol_alone`` / ``rtol_alone`` (with the other tolerance 0: Polygraphy's
"Minimum Required Tolerance"). All are ``inf`` when a non-finite mismatch
means no tolerance can pass.

Extra metrics: cosine similarity, fp16 ULP distance (both tensors rounded to
fp16, distance in representable fp16 steps) and PSNR (for images; data range
1 by default, computed automatically when the reference lies in [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from refsd.image import psnr as image_psnr

CHECK_MODES = ("elemwise", "max", "mean", "median", "quantile")
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-5
DEFAULT_QUANTILE = 0.99
# Polygraphy adds this to zeros of the reference before dividing.
REL_EPSILON = 2.220446049250313e-16

__all__ = [
    "CHECK_MODES", "CompareResult", "ErrorStats", "compare", "cosine_similarity", "psnr", "ulp_distance_f16",
]


@dataclass(frozen=True)
class ErrorStats:
    """Statistics of an error tensor over its comparable elements."""

    max: float
    mean: float
    median: float
    quantile: float

    def get(self, check_mode: str) -> float:
        return self.max if check_mode == "elemwise" else getattr(self, check_mode)


@dataclass(frozen=True)
class CompareResult:
    passed: bool
    check_mode: str
    atol: float
    rtol: float
    quantile: float
    shape: tuple[int, ...]
    ref_dtype: str
    test_dtype: str
    size: int
    mismatches: int  # elements failing the elemwise rule (informative in every mode)
    nonfinite_mismatches: int  # NaN anywhere, or an inf the other tensor does not match
    first_mismatch: tuple[int, ...] | None
    absdiff: ErrorStats
    reldiff: ErrorStats
    required_atol: float  # smallest atol that passes with this rtol
    required_rtol: float  # smallest rtol that passes with this atol
    atol_alone: float  # smallest atol that passes with rtol = 0
    rtol_alone: float  # smallest rtol that passes with atol = 0
    cosine: float
    max_ulp_f16: float
    mean_ulp_f16: float
    psnr_db: float | None
    name: str | None = None

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        """JSON-safe: non-finite floats become the strings "inf", "-inf", "nan"."""
        return json_safe(asdict(self))

    def summary(self) -> str:
        name = f"{self.name}: " if self.name else ""
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"{name}{verdict} | check {self.check_mode}"
            + (f" (q={self.quantile:g})" if self.check_mode == "quantile" else "")
            + f" | atol={self.atol:g} rtol={self.rtol:g} | shape {self.shape} | ref {self.ref_dtype}, "
            f"test {self.test_dtype}",
            f"  elements past both tolerances: {self.mismatches} of {self.size} ({_pct(self.mismatches, self.size)})"
            + (f", first at {list(self.first_mismatch)}" if self.first_mismatch is not None else ""),
            f"  non-finite mismatches (NaN / unmatched inf; always fail): {self.nonfinite_mismatches}",
            f"  {'':<9}{'max':>12}{'mean':>12}{'median':>12}{f'q{self.quantile:g}':>12}",
            "  abs diff " + "".join(f"{v:>12.4g}" for v in asdict(self.absdiff).values()),
            "  rel diff " + "".join(f"{v:>12.4g}" for v in asdict(self.reldiff).values()),
            f"  would pass with: atol >= {self.required_atol:.4g} (at rtol={self.rtol:g}) "
            f"or rtol >= {self.required_rtol:.4g} (at atol={self.atol:g}); "
            f"alone: atol >= {self.atol_alone:.4g} or rtol >= {self.rtol_alone:.4g}",
            f"  cosine similarity: {self.cosine:.8g}",
            f"  fp16 ULP distance: max {self.max_ulp_f16:g}, mean {self.mean_ulp_f16:.4g}",
        ]
        if self.psnr_db is not None:
            lines.append(f"  PSNR (data range 1): {self.psnr_db:.2f} dB")
        return "\n".join(lines)


def _pct(k: int, n: int) -> str:
    return f"{100.0 * k / n:.3g}%" if n else "0%"


def json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def _check_arrays(ref, test) -> tuple[np.ndarray, np.ndarray]:
    ref, test = np.asarray(ref), np.asarray(test)
    for label, a in (("reference", ref), ("test", test)):
        if a.dtype.kind != "f":
            raise ValueError(f"{label} tensor has dtype {a.dtype}; expected a floating dtype")
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape}, test {test.shape}")
    return ref, test


def _stats(d: np.ndarray, q: float) -> ErrorStats:
    if d.size == 0:
        return ErrorStats(0.0, 0.0, 0.0, 0.0)
    return ErrorStats(float(d.max()), float(d.mean()), float(np.median(d)), float(np.quantile(d, q)))


def compare(
    ref,
    test,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    check_mode: str = "elemwise",
    quantile: float = DEFAULT_QUANTILE,
    infinities_compare_equal: bool = False,
    data_range: float | None = None,
    name: str | None = None,
) -> CompareResult:
    """Compare ``test`` against the reference ``ref`` (same shape, floating
    dtypes; computed in float64). See the module docstring for the rule.

    ``data_range``: compute PSNR with this peak value; by default PSNR is
    computed (range 1) only when every reference value lies in [0, 1]."""
    if check_mode not in CHECK_MODES:
        raise ValueError(f"check mode must be one of {', '.join(CHECK_MODES)}, got {check_mode!r}")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
    for label, tol in (("atol", atol), ("rtol", rtol)):
        if not tol >= 0:  # also rejects NaN
            raise ValueError(f"{label} must be >= 0, got {tol!r}")
    ref_in, test_in = _check_arrays(ref, test)
    r = ref_in.astype(np.float64).ravel()
    t = test_in.astype(np.float64).ravel()

    with np.errstate(all="ignore"):
        absdiff = np.abs(t - r)
        nonfinite = ~(np.isfinite(r) & np.isfinite(t))
        if infinities_compare_equal:
            nonfinite &= ~(np.isinf(r) & (r == t))
            absdiff[np.isinf(r) & (r == t)] = 0.0
        absdiff[nonfinite] = np.nan  # fails every tolerance and every statistic
        denom = np.abs(r)
        denom[denom == 0] = REL_EPSILON
        reldiff = absdiff / denom

    ok = ~nonfinite
    a_ok, r_ok = absdiff[ok], reldiff[ok]
    abs_stats, rel_stats = _stats(a_ok, quantile), _stats(r_ok, quantile)
    n_nonfinite = int(np.count_nonzero(nonfinite))

    elem_fail = nonfinite.copy()
    elem_fail[ok] = (a_ok > atol) & (r_ok > rtol)
    mismatches = int(np.count_nonzero(elem_fail))
    first = None
    if mismatches:
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(elem_fail)), ref_in.shape))

    if check_mode == "elemwise":
        passed = mismatches == 0
        # An element passes if absdiff <= atol or reldiff <= rtol.
        required_atol = float(a_ok[r_ok > rtol].max(initial=0.0))
        required_rtol = float(r_ok[a_ok > atol].max(initial=0.0))
    else:
        s_abs, s_rel = abs_stats.get(check_mode), rel_stats.get(check_mode)
        passed = n_nonfinite == 0 and not (s_abs > atol and s_rel > rtol)
        required_atol = 0.0 if s_rel <= rtol else s_abs
        required_rtol = 0.0 if s_abs <= atol else s_rel
    atol_alone, rtol_alone = abs_stats.get(check_mode), rel_stats.get(check_mode)
    if n_nonfinite:
        required_atol = required_rtol = atol_alone = rtol_alone = math.inf

    psnr_db = None
    if data_range is not None:
        psnr_db = psnr(ref_in, test_in, data_range=data_range)
    elif r.size and np.all((r >= 0.0) & (r <= 1.0)):
        psnr_db = psnr(ref_in, test_in, data_range=1.0)

    ulp = ulp_distance_f16(ref_in, test_in).astype(np.float64)
    return CompareResult(
        passed=bool(passed),
        check_mode=check_mode,
        atol=float(atol),
        rtol=float(rtol),
        quantile=float(quantile),
        shape=tuple(ref_in.shape),
        ref_dtype=str(ref_in.dtype),
        test_dtype=str(test_in.dtype),
        size=int(r.size),
        mismatches=mismatches,
        nonfinite_mismatches=n_nonfinite,
        first_mismatch=first,
        absdiff=abs_stats,
        reldiff=rel_stats,
        required_atol=float(required_atol),
        required_rtol=float(required_rtol),
        atol_alone=float(atol_alone),
        rtol_alone=float(rtol_alone),
        cosine=cosine_similarity(ref_in, test_in),
        max_ulp_f16=float(ulp.max()) if ulp.size else 0.0,
        mean_ulp_f16=float(ulp.mean()) if ulp.size else 0.0,
        psnr_db=psnr_db,
        name=name,
    )


def cosine_similarity(a, b) -> float:
    """``<a, b> / (|a| |b|)`` over all elements in float64; NaN if either holds
    a non-finite value; 1 for two all-zero tensors, 0 if exactly one is zero."""
    x, y = (np.asarray(v, dtype=np.float64).ravel() for v in _check_arrays(a, b))
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    # Scale first so squares of fp16-range values cannot lose precision or overflow.
    sx, sy = np.abs(x).max(initial=0.0), np.abs(y).max(initial=0.0)
    if sx == 0.0 or sy == 0.0:
        return 1.0 if sx == sy else 0.0
    x, y = x / sx, y / sy
    c = float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))
    return max(-1.0, min(1.0, c))


def psnr(ref, test, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range**2 / MSE)`` in dB, for
    images (``data_range`` 1 for [0, 1] images, 255 for uint8 scale). ``inf``
    for identical images, NaN if either holds a non-finite value."""
    if not data_range > 0:
        raise ValueError(f"PSNR data range must be > 0, got {data_range!r}")
    return image_psnr(*_check_arrays(ref, test), data_range=data_range)


def _f16_ordered(a: np.ndarray) -> np.ndarray:
    """fp16 bit patterns mapped to integers that are monotonic in value, with
    +0 and -0 both 0, so that subtracting two counts the fp16 values between."""
    bits = np.asarray(a, dtype=np.float16).view(np.uint16).astype(np.int32)
    mag = bits & 0x7FFF
    return np.where(bits & 0x8000, -mag, mag)


def ulp_distance_f16(a, b) -> np.ndarray:
    """Elementwise distance in fp16 ULPs: both tensors are rounded to fp16
    (nearest-even) and the result counts the representable fp16 values
    stepped over (0 for equal values, 1 for neighbours; +inf is one step past
    65504). NaN has no position: its distance is reported as inf (float64)."""
    x, y = _check_arrays(a, b)
    with np.errstate(over="ignore"):  # float32/64 beyond 65504 round to inf, as fp16 storage would
        hx, hy = x.astype(np.float16), y.astype(np.float16)
    d = np.abs(_f16_ordered(hx) - _f16_ordered(hy)).astype(np.float64)
    return np.where(np.isnan(hx) | np.isnan(hy), math.inf, d)
