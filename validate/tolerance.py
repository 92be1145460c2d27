"""Tolerances from physics: each tensor's bar is k times the reference's own
noise floor for that tensor, measured on the same request and inputs.

The rule (written into every certificate)::

    e = device - reference(f32)                                   (per tensor)
    peak = max|e|,  rms = sqrt(mean e^2),  and the least-squares fit e ~ offset + gain * reference
    floor_s = max over calibration variants v of scale_v * |s(T_v - T_f32)|,  at least minimum_floor
    pass  <=>  no NaN / unmatched inf  and  s <= K * floor_s  for every s in (peak, rms, offset, gain)

``k_needed = max_s s / floor_s`` is the smallest k that would have passed.

Why four statistics: ``peak`` catches a local fault (a NaN, a saturated
patch), ``rms`` a broad one, ``offset`` and ``gain`` a *systematic* one.
Rounding noise is nearly uncorrelated with the signal, so a +1 % gain stands
out in ``gain`` even where it hides under the rms noise: on the tiny SD 2.1
model in f32_f16 with FTZ and fused kernels the rms error reaches 2.7 % of a
tensor's rms while the gain error stays below 2.1e-3.

Calibration variants (:func:`calibration_variants`): reference runs that a
correct delegate of the declared precision could equally be.

* f32_f16 / f16: the mode with FTZ off and on (only the declared setting when
  the capture states it), each with and without :data:`ALGORITHMS` (the same
  function with other summation orders and fused kernels, as GPU delegates run
  it: Winograd, flash attention, fused GELU and GroupNorm). Measured on the
  tiny model: other kernels move f32_f16 outputs 1.5-4x further than rounding
  placement alone, FTZ another 2-3x. f16 adds the f32_f16 variants.
* f32: the ALGORITHMS variant, and the f32_f16 spread scaled to fp32 by
  ``F32_KERNEL_ROUNDINGS * 2^-24 / 2^-11``. Scaling fp16 storage noise by
  2^-13 alone models one fp32 rounding per op output; another fp32 kernel
  (LiteRT's FULLY_CONNECTED, its time embedding) differs by its summation order,
  ~sqrt(K) roundings, and was measured at up to 10x that.

The systematic floors are at least one standard error of the fit under noise
of the rms floor (rms / sqrt(N) for offset, rms / (std(ref) sqrt(N)) for gain):
two or four calibration runs estimate a gain poorly, and one run's gain can be
small by chance (measured: 5.9e-5 where the device showed 2.0e-4).

``minimum_floor``: one unit roundoff of the storage precision at the tensor's
scale (peak, rms); ``SYSTEMATIC`` unit roundoffs of the arithmetic precision
for offset and gain (a variance computed as E[x^2] - E[x]^2 loses bits to
cancellation, consistently: LiteRT's builtin kernels show gain errors up to
33 u32 against refsd on the tiny model, which no refsd variant reproduces).

K = 4: a device is one more draw of the same noise, not the calibration draw
itself. Measured on the tiny model (64x64, 4 DDIM steps, tests/test_certify.py's
request): LiteRT's CPU kernels (declared f32, an independent implementation)
need k <= 1.49 over 1364 tensors, every intermediate included; an emulated
f32_f16 device with Google's fused kernels and FTZ needs k <= 2.19 (it shares
Winograd with a calibration variant, so this is the weaker of the two checks);
a +1 % gain on the UNet output from step 1 needs k = 17.7 teacher-forced
(4.6 free-running, where the drift of 3 earlier steps is in the floor).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

K = 4.0
U_F32 = 2.0**-24  # float32 unit roundoff (24 significant bits)
U_F16 = 2.0**-11  # float16 unit roundoff (11 significant bits)
ALGORITHMS = "flash_attention,winograd,gelu_fused,group_norm_fused"
STATS = ("peak", "rms", "offset", "gain")
# A correct fp32 kernel differs from another by its summation order: ~sqrt(K) roundings of fp32 per output
# (K = 128..640 in the tiny model's reductions: 11..25), modelled as 16 times the fp16 storage spread scaled to fp32.
F32_KERNEL_ROUNDINGS = 16
SYSTEMATIC = 64  # unit roundoffs of a kernel's arithmetic it may err by systematically (minimum_floor)


@dataclass(frozen=True)
class Variant:
    """One reference run configuration; its spread around the f32 reference
    counts ``scale`` times (2^-13 turns fp16 storage rounding into fp32's)."""

    precision: str = "f32"
    ftz: bool = False
    rewrites: str = "none"
    scale: float = 1.0

    @property
    def label(self) -> str:
        return (self.precision + (" ftz" if self.ftz else "") + ("" if self.rewrites == "none" else f" +{self.rewrites}")
                + ("" if self.scale == 1.0 else f" (spread x 2^{math.log2(self.scale):g})"))


REFERENCE = Variant()


def unit_roundoff(precision: str) -> float:
    return U_F32 if precision == "f32" else U_F16


def calibration_variants(precision: str, ftz: bool | None) -> list[Variant]:
    """The runs whose spread around the f32 reference is the noise floor for a
    delegate declaring ``precision`` (``ftz`` None: unknown, so both)."""
    if precision == "f32":
        return [Variant("f32", False, ALGORITHMS), Variant("f32_f16", False, "none", F32_KERNEL_ROUNDINGS * U_F32 / U_F16)]
    modes = ["f32_f16"] if precision == "f32_f16" else ["f32_f16", "f16"]
    flush = [False, True] if ftz is None else [bool(ftz)]
    return [Variant(m, z, r) for m in modes for z in flush for r in ("none", ALGORITHMS)]


@dataclass(frozen=True)
class ErrorStats:
    peak: float
    rms: float
    offset: float  # |intercept| of the fit e ~ offset + gain * ref
    gain: float  # |slope|

    def get(self, s: str) -> float:
        return getattr(self, s)


def error_stats(ref: np.ndarray, test: np.ndarray) -> ErrorStats:
    """Statistics of ``test - ref``; all NaN if either holds a non-finite value
    (the caller fails such a tensor: a NaN is never averaged away).

    Computed on float32 arrays (the difference of two nearby float32 values is
    exact, Sterbenz) with sums in float64: one certificate judges ~10^3 tensors
    of up to 10^6 elements, so this must stay a few passes over memory."""
    r = np.asarray(ref, np.float32).ravel()
    t = np.asarray(test, np.float32).ravel()
    if not (np.isfinite(r).all() and np.isfinite(t).all()):
        return ErrorStats(math.nan, math.nan, math.nan, math.nan)
    if r.size == 0:
        return ErrorStats(0.0, 0.0, 0.0, 0.0)
    e = t - r
    n = e.size
    r_mean = float(r.sum(dtype=np.float64)) / n
    rc = r - np.float32(r_mean)
    var = float(np.dot(rc, rc))
    gain = float(np.dot(e, rc)) / var if var > 0 else 0.0
    offset = float(e.sum(dtype=np.float64)) / n - gain * r_mean
    return ErrorStats(float(np.abs(e).max()), math.sqrt(float(np.dot(e, e)) / n), abs(offset), abs(gain))


def math_roundoff(precision: str) -> float:
    """Unit roundoff of the arithmetic *inside* ops (f32_f16 stores fp16 but computes in fp32)."""
    return U_F16 if precision == "f16" else U_F32


def minimum_floor(ref: np.ndarray, precision: str) -> ErrorStats:
    """What no calibration run can show but a correct device may do: one unit
    roundoff of the storage precision at the tensor's scale (peak, rms), and
    SYSTEMATIC unit roundoffs of its arithmetic as a systematic error (offset,
    gain): a kernel computing a variance as E[x^2] - E[x]^2 loses bits to
    cancellation, consistently (LiteRT's builtin kernels against refsd in f32:
    gain errors up to 33 u32, measured on the tiny model)."""
    u, s = unit_roundoff(precision), SYSTEMATIC * math_roundoff(precision)
    r = np.asarray(ref, np.float64)
    rms = float(np.sqrt(np.mean(r * r))) if r.size else 0.0
    return ErrorStats(u * float(np.abs(r).max(initial=0.0)), u * rms, s * rms, s)


def noise_floor(ref: np.ndarray, runs: list[tuple[np.ndarray, float]], precision: str) -> ErrorStats:
    """Per statistic, the largest spread of the calibration runs ((tensor, scale)
    pairs: every statistic is homogeneous in the error), at least the minimum floor.
    A calibration run that is itself non-finite cannot define a floor and raises."""
    floor = asdict(minimum_floor(ref, precision))
    for run, scale in runs:
        s = error_stats(ref, run)
        if math.isnan(s.peak):
            raise ValueError("a calibration run of the reference holds NaN or inf: the model overflows in this "
                             "precision on this request; no noise floor can be measured")
        for k in STATS:
            floor[k] = max(floor[k], scale * s.get(k))
    # A few calibration runs estimate the systematic statistics poorly (their |gain| can be small by
    # chance): at least one standard error of the least-squares fit under noise of the floor's rms,
    # counting elements as independent (spatially correlated noise only makes the true error larger).
    r = np.asarray(ref, np.float64).ravel()
    if r.size:
        n, std = r.size, float(r.std())
        floor["offset"] = max(floor["offset"], floor["rms"] / math.sqrt(n))
        if std > 0:
            floor["gain"] = max(floor["gain"], floor["rms"] / (std * math.sqrt(n)))
    return ErrorStats(**floor)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    k_needed: float  # smallest k that passes (inf with a non-finite mismatch)
    failed: tuple[str, ...]  # statistics past k * floor, or "nonfinite"
    stats: ErrorStats
    floor: ErrorStats
    tolerance: ErrorStats


def judge(ref: np.ndarray, test: np.ndarray, floor: ErrorStats, k: float = K) -> Verdict:
    stats = error_stats(ref, test)
    tol = ErrorStats(*(k * floor.get(s) for s in STATS))
    if math.isnan(stats.peak):
        return Verdict(False, math.inf, ("nonfinite",), stats, floor, tol)
    ratios = {s: (stats.get(s) / floor.get(s) if floor.get(s) > 0 else (math.inf if stats.get(s) > 0 else 0.0))
              for s in STATS}
    failed = tuple(s for s in STATS if ratios[s] > k)
    return Verdict(not failed, max(ratios.values()), failed, stats, floor, tol)
