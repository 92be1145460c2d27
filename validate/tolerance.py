"""Tolerances from physics: each tensor's bar is k times the reference's own
noise floor for that tensor, measured on the same request and inputs. The
rule as certificates state it is :func:`rule_statement`; in short::

    e = device - reference(f32)                                   (per tensor)
    peak = max|e|,  rms = sqrt(mean e^2),  and the least-squares fit e ~ offset + gain * reference
    floor_s = max over calibration runs v of scale_v * |s(T_v - T_f32)|,  at least minimum_floor
    pass  <=>  no NaN / unmatched inf  and  s <= K * floor_s  for every s in (peak, rms, offset, gain)

``k_needed = max_s s / floor_s`` is the smallest k that would have passed.

Why four statistics: ``peak`` catches a local fault (a NaN, a saturated
patch), ``rms`` a broad one, ``offset`` and ``gain`` a *systematic* one.
Rounding noise is nearly uncorrelated with the signal, so a +1 % gain stands
out in ``gain`` even where it hides under the rms noise (on the tiny SD 2.1 in
f32_f16 with FTZ and fused kernels the rms error reaches 2.7 % of a tensor's
rms while the gain error stays below 2.1e-3).

Calibration runs (:func:`calibration_variants`) are reference runs that a
correct device of the declared precision could equally be: for f32_f16 / f16
the mode with FTZ off and on (only the declared setting when known), with and
without :data:`ALGORITHMS` (other summation orders and fused kernels, as GPU
delegates run them), half of those combinations (:func:`half_fraction`); for
f32 the ALGORITHMS run and fp16 storage noise scaled to fp32
(``F32_KERNEL_ROUNDINGS``). Other kernels move f32_f16 outputs 1.5-4x further
than rounding placement alone, FTZ another 2-3x (tiny model, measured).

The floors (:func:`explained_noise_floor`) are at least the minimum floor
(:func:`minimum_floor`) and the fit's standard errors, widened by the design
effect the calibration runs show (:func:`design_effects`) and scaled for the
number of checks in a certificate (:func:`standard_error_scale`).

K = 4: a device is one more draw of the same noise, not the calibration draw
itself. The measurements behind it (correct devices at k <= 3.61 on held-out
tiny models, a +1 % UNet bias from step 1 rejected at k >= 7.3 in the weakest
capture cell) are in docs/certification.md and bench/README.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

from refsd.numerics import U_F16, U_F32, Precision
from refsd.trace import STAGES

K = 4.0
# The largest k a certificate may be asked for. A +1 % gain on the UNet output from step 1 is rejected at k 7.3
# where the floors are widest (LiteRT CPU's int8 hybrid kernels), so a k above that already lets it pass there.
MAX_K = 16.0
# How far the other half of a half-fraction design (half_fraction) may widen a floor: about twice the largest
# full-design over half-design floor measured on correct emulated devices (2.09, an offset; gains <= 1.83). A first
# failure needing more than k times this stays a failure (certify.needs_full_design).
FULL_DESIGN_WIDENING = 4.0
# Family-wise rate at which a correct device fails on a standard-error floor (offset, gain) somewhere in its
# certificate, at the default k, for Gaussian errors (standard_error_scale).
FAMILY_ALPHA = 1e-3
ALGORITHMS = "flash_attention,winograd,gelu_fused,group_norm_fused"
STATS = ("peak", "rms", "offset", "gain")
# A correct fp32 kernel differs from another by its summation order: ~sqrt(K) roundings of fp32 per output
# (K = 128..640 in the tiny model's reductions: 11..25), modelled as 16 times the fp16 storage spread scaled to fp32.
F32_KERNEL_ROUNDINGS = 16
SYSTEMATIC = 64  # unit roundoffs of a kernel's fp32 arithmetic it may err by systematically (minimum_floor)
# In fp16 arithmetic the same cancellation would be 64 u16 = 3 %, a floor no 1 % bias could pass: there the systematic
# freedom the calibration runs cannot show is a scalar coefficient rounded to fp16 either way (a framework multiplies an
# fp16 tensor by a float32 scalar in fp16), up to u16 of gain each. A model stage's tensors follow a normalization
# (GroupNorm, LayerNorm) that divides out every gain before it, so one coefficient reaches them: its 1/n or 1/sqrt(var)
# (half a u16), or an input scale such as 1 / scaling_factor on a path around it. The guidance and the scheduler step
# apply two in a row (the guidance scale, then the step's square roots).
SYSTEMATIC_F16 = {"model": 1, "guidance_scheduler": 2}


def systematic(precision: str, stage: str) -> float:
    """Unit roundoffs of its arithmetic a correct kernel of ``stage`` may err by systematically (minimum_floor)."""
    if precision != "f16":
        return SYSTEMATIC
    return SYSTEMATIC_F16["guidance_scheduler" if stage == "guidance_scheduler" else "model"]


# Transcendental results (exp, sin, cos, tanh, erf, rsqrt) of a correct runtime, in ulp of float32 from NumPy's:
# CPU libraries (glibc, Sleef, NumPy's SIMD) stay within a few ulp; GPU shaders use fast math, for which
# Vulkan / WGSL allow far more (exp 3 + 2|x| ulp, sin / cos 2^-11 absolute). LIBM_ULPS_FAST is a chosen
# model, not Vulkan's worst case: large enough for lavapipe's and desktop drivers' measured fp32 results
# (bench/README.md), and a device beyond it is rejected with that reason in the floor.
LIBM_ULPS = 4.0
LIBM_ULPS_FAST = 64.0


@dataclass(frozen=True)
class StageVariant:
    """How one stage runs in a reference run: precision mode, flush-to-zero,
    kernel rewrites added to the deployment's (other summation orders and
    fused kernels, as a delegate may run them), and how far its transcendental
    functions are moved (``refsd.ops.transcendental``): the validator's
    description of a stage, from which a rerun builds the stage's
    ``refsd.numerics.RunSettings`` (``certify_rerun.stage_settings``)."""

    precision: str = "f32"
    ftz: bool = False
    kernels: str = "none"
    libm_ulps: float = 0.0
    weight_jitter: bool = False  # fp16 / bf16 weights each possibly the other neighbour (RunSettings.weight_jitter)
    either_rounding: bool = False  # hybrid int8 activations rounded to either neighbour (refsd.ops.hybrid)
    device_model: str | None = None  # a measured GPU's fp16 kernels (refsd.numerics.DEVICE_MODELS), f16 only

    @property
    def label(self) -> str:
        return (self.precision + (" ftz" if self.ftz else "") + ("" if self.kernels == "none" else f" +{self.kernels}")
                + (f" libm±{self.libm_ulps:g}ulp" if self.libm_ulps else "")
                + (" weights±1ulp" if self.weight_jitter else "")
                + (" int8-activations-either-way" if self.either_rounding else "")
                + (f" device-model {self.device_model}" if self.device_model else ""))


PLAIN = StageVariant()


@dataclass(frozen=True)
class CalibrationRun:
    """One reference run: a ``StageVariant`` per stage (``refsd.trace.STAGES``
    order). Its spread around the reference counts ``scale`` times (2^-13
    turns fp16 storage rounding into fp32's)."""

    stages: tuple[StageVariant, ...] = (PLAIN,) * len(STAGES)
    scale: float = 1.0

    def stage(self, name: str) -> StageVariant:
        return self.stages[STAGES.index(name)]

    @property
    def either_rounding(self) -> bool:
        return any(sv.either_rounding for sv in self.stages)

    @property
    def libm_ulps(self) -> float:
        """One run perturbs every stage alike: the largest of its stages' settings."""
        return max(sv.libm_ulps for sv in self.stages)

    @property
    def label(self) -> str:
        parts = {}
        for name, sv in zip(STAGES, self.stages):
            parts.setdefault(sv.label, []).append(name)
        body = "; ".join(f"{'+'.join(names)}: {lab}" for lab, names in parts.items()) if len(parts) > 1 \
            else next(iter(parts))
        return body + ("" if self.scale == 1.0 else f" (spread x 2^{math.log2(self.scale):g})")


REFERENCE_RUN = CalibrationRun()


def unit_roundoff(precision: str) -> float:
    """Unit roundoff of the storage between ops (``refsd.numerics``)."""
    return Precision(precision).unit_roundoff


def stage_variants(precision: str, ftz: bool | None, *, fast_math: bool = False, kernels: bool = True,
                   half_weights: bool = False, hybrid: bool = False, gpu: bool = False,
                   complement: bool = False) -> tuple[list[StageVariant], list[StageVariant]]:
    """(unscaled, scaled) runs of one stage whose spread around the f32
    reference is the noise floor of a stage declared ``precision`` (``ftz``
    None: unknown, so both). ``kernels``: the stage has ops whose kernels a
    device may swap (the models; not guidance and the scheduler).
    ``half_weights``: the deployment stores fp16 / bf16 weights, which the
    runs with other kernels also round from a jittered value (the converter
    rounds folded constants). ``hybrid``: int8 weights run by LiteRT CPU's
    hybrid kernels, which quantize activations to 8 bits: a float difference of
    1e-6 moves some activations across a rounding boundary, and those flips
    compound through the layers (1-5e-2 end to end on the tiny UNet and VAE,
    measured, from op-by-op agreement), so one run rounds activations either
    way (``RunSettings.either_rounding``) and another takes the plain float
    path's flips. ``complement``: the other half of the factorial design
    instead (:func:`half_fraction`; nothing where the design is not halved)."""
    ulps = LIBM_ULPS_FAST if fast_math else LIBM_ULPS
    other = ALGORITHMS if kernels else "none"
    jitter = half_weights and kernels
    if precision == "f32":
        if complement:
            return [], []
        runs = [StageVariant("f32", False, other, ulps, jitter)]
        if hybrid and kernels:
            runs += [StageVariant("f32", False, "none", ulps, either_rounding=True)]
        return runs, [StageVariant("f32_f16", False, "none")] if kernels else []
    # A model stage declared f32_f16 keeps fp32 math inside its kernels; guidance and the scheduler are a few
    # elementwise ops, which a framework on fp16 tensors rounds one by one, coefficients included, whichever
    # precision it declares (PyTorch's CPU fp16 kernels compute in fp32 and round each op): both orders.
    modes = ["f32_f16"] if precision == "f32_f16" and kernels else ["f32_f16", "f16"]
    flush = [False, True] if ftz is None else [bool(ftz)]
    swaps = [False, True] if kernels else [False]
    levels = [(m, z, k) for k in swaps for m in modes for z in flush]
    runs = [StageVariant(m, z, other, ulps, jitter) if k else StageVariant(m, z, "none")
            for m, z, k in half_fraction(levels, (modes, flush, swaps), complement=complement)]
    if gpu and kernels and precision == "f16" and not complement:
        # What real fp16 GPU kernels store and round that generic f16 does not (the timestep embedding's t * freq
        # as an fp16 tensor: time_proj 18-33 % off; MEAN in fp32): LiteRT's GPU kernels, measured (README).
        runs += [StageVariant("f16", z, "none", ulps, jitter, device_model="litert-gpu") for z in flush]
    return runs, []


def half_fraction(levels: list[tuple], factors: tuple[list, ...], *, complement: bool = False) -> list[tuple]:
    """The half of a two-level factorial design that keeps every factor's
    both levels and, with three factors, every pair's four combinations
    (resolution III: the runs whose two-level factors' level indices sum to
    an even number). With fewer than two two-level factors, all of ``levels``.
    ``complement``: the other half (the odd sums; nothing when not halved).

    Why a fraction: a certificate costs 2V + 2 pipeline runs for V calibration
    runs, and the floor is the largest spread of any run, so the run that
    moves a tensor most sets it. Other kernels, FTZ and the f16 mode each move
    the outputs, and a run that combines two of them moves them about as far
    as the larger alone (one SD 2.1 UNet forward in f32_f16, rms error over
    rms: plain 1.5e-3, FTZ 1.6e-3, Winograd 3.8e-3 with or without FTZ).
    Every run kept is a run of the full design, so floors can only shrink:
    no device that the full design rejects is certified; the correct devices
    of the test suite (LiteRT CPU and GPU captures, diffusers, emulated
    devices) still certify. f32_f16 with FTZ unknown: (FTZ off, plain) and
    (FTZ on, other kernels), 2 runs instead of 4; f16: 4 instead of 8.

    But the factors interact where fp16 overflows: on a tiny SD 2.1 (seed 1),
    f16 with plain kernels overflows a GroupNorm's fp16 sum of squares, which
    f32_f16 and Google's kernels do not. With FTZ declared off, the half
    fraction kept neither (f16, plain) run, so a device computing exactly that
    was judged against runs that do not overflow and its failure named no
    overflow. So a certificate that the half rejects runs the complement too
    (``certify.needs_full_design``) unless every failing tensor needs more than
    FULL_DESIGN_WIDENING times k and the device stayed finite: its verdict and
    first failure are always the full design's, and only such rejections pay."""
    varying = [i for i, f in enumerate(factors) if len(f) == 2]
    if len(varying) < 2:
        return [] if complement else list(levels)
    parity = 1 if complement else 0
    return [lv for lv in levels if sum(factors[i].index(lv[i]) for i in varying) % 2 == parity]


def calibration_variants(stages: dict, weights: str = "fp32", *,
                         complement: bool = False) -> list[CalibrationRun]:
    """The calibration runs for a deployment whose stages are declared as
    ``stages`` (``refsd_validate.bundle.declared_stages``). Each stage's own
    runs (:func:`stage_variants`) are zipped, shorter lists cycled, so every
    run varies every stage at once and the run count is the longest list's,
    not the product. fp32 storage noise (fp16's scaled by 2^-13) is one more
    run that varies only the fp32-declared stages, the rest running as the
    reference, so its scale applies to nothing else. ``complement``: the runs
    of the other half of each stage's design (:func:`half_fraction`), the
    stages not halved cycling their own runs; none when no stage is halved.
    Both lists together are the full design.

    No two of these runs compute the same bits, so none is skipped as a
    duplicate of another. The closest pair, the ``litert-gpu`` runs with FTZ
    off and on, would be one run only if nothing were ever subnormal in fp16.
    Measured on a tiny SD 2.1 under ``litert-gpu`` (2 steps, 32x32): 5.6 M
    subnormal results in every op family (products of the sequential sums,
    softmax, GELU, convolutions); and a generic f16 norm's eps (1e-5) is itself
    an fp16 subnormal that FTZ flushes. The one rerun that does repeat another,
    the original model's run of a model deployed as published, is not run
    (``Plan.jobs``)."""
    def per_stage(complement):
        return [stage_variants(stages[s].precision, stages[s].ftz, fast_math=stages[s].fast_math,
                               kernels=s != "guidance_scheduler", half_weights=weights in ("fp16", "bf16"),
                               hybrid=stages[s].int8_kernels == "hybrid", gpu=stages[s].processor == "gpu",
                               complement=complement)
                for s in STAGES]

    per = per_stage(False)
    if complement:
        other = [u for u, _ in per_stage(True)]
        if not any(other):
            return []
        lists = [o or u for o, (u, _) in zip(other, per)]
        return [CalibrationRun(tuple(u[j % len(u)] for u in lists)) for j in range(max(map(len, other)))]
    n = max(len(u) for u, _ in per)
    runs = [CalibrationRun(tuple(u[j % len(u)] for u, _ in per)) for j in range(n)]
    if any(sc for _, sc in per):
        runs.append(CalibrationRun(tuple(sc[0] if sc else PLAIN for _, sc in per), F32_KERNEL_ROUNDINGS * U_F32 / U_F16))
    return runs


@dataclass(frozen=True)
class ErrorProfile:
    """An error's peak, rms, offset and gain (``STATS``), or a floor or
    tolerance on each of them. (``refsd_validate.compare.ErrorStats`` is
    another thing: Polygraphy's max / mean / median / quantile.)"""

    peak: float
    rms: float
    offset: float  # |intercept| of the fit e ~ offset + gain * ref
    gain: float  # |slope|

    def get(self, s: str) -> float:
        return getattr(self, s)


def error_stats(ref: np.ndarray, test: np.ndarray) -> ErrorProfile:
    """Statistics of ``test - ref``; all NaN if either holds a non-finite value
    (the caller fails such a tensor: a NaN is never averaged away).

    Computed on float32 arrays (the difference of two nearby float32 values is
    exact, Sterbenz) with sums in float64: one certificate judges ~10^3 tensors
    of up to 10^6 elements, so this must stay a few passes over memory."""
    r = np.asarray(ref, np.float32).ravel()
    t = np.asarray(test, np.float32).ravel()
    if not (np.isfinite(r).all() and np.isfinite(t).all()):
        return ErrorProfile(math.nan, math.nan, math.nan, math.nan)
    if r.size == 0:
        return ErrorProfile(0.0, 0.0, 0.0, 0.0)
    e = t - r
    n = e.size
    r_mean = float(r.sum(dtype=np.float64)) / n
    rc = r - np.float32(r_mean)
    var = float(np.dot(rc, rc))
    gain = float(np.dot(e, rc)) / var if var > 0 else 0.0
    offset = float(e.sum(dtype=np.float64)) / n - gain * r_mean
    return ErrorProfile(float(np.abs(e).max()), math.sqrt(float(np.dot(e, e)) / n), abs(offset), abs(gain))


def math_roundoff(precision: str) -> float:
    """Unit roundoff of the arithmetic *inside* ops (f32_f16 stores fp16 but computes in fp32)."""
    return U_F16 if Precision(precision).math16 else U_F32


def minimum_floor(ref: np.ndarray, precision: str, stage: str) -> ErrorProfile:
    """What no calibration run can show but a correct device may do: one unit
    roundoff of the storage precision at the tensor's scale (peak, rms), and
    SYSTEMATIC unit roundoffs of its arithmetic as a systematic error (offset,
    gain): a kernel computing a variance as E[x^2] - E[x]^2 loses bits to
    cancellation, consistently (LiteRT's builtin kernels against refsd in f32:
    gain errors up to 33 u32, measured on the tiny model); in f16 arithmetic
    SYSTEMATIC_F16 unit roundoffs of the stage (fp16-rounded scalar coefficients)."""
    u = unit_roundoff(precision)
    s = systematic(precision, stage) * math_roundoff(precision)
    r = np.asarray(ref, np.float64)
    rms = float(np.sqrt(np.mean(r * r))) if r.size else 0.0
    return ErrorProfile(u * float(np.abs(r).max(initial=0.0)), u * rms, s * rms, s)


def standard_error_scale(checks: int) -> float:
    """What the offset and gain floors' standard-error terms are multiplied by
    in a certificate of ``checks`` such terms (2 per judged tensor): K times the
    scaled standard error is the two-sided normal quantile at FAMILY_ALPHA /
    checks (Bonferroni), never below 1. Why: a correct device's offset and gain
    are one more draw of the fit's noise, so each exceeds K standard errors with
    probability 6e-5, and a certificate judges hundreds to thousands of them. On
    held-out tiny models a correct device's gain at a mid-block attention
    output was 3.6 standard errors (SD 1.5 seed 3; its two calibration runs'
    gains were 0.3 and 0.5 standard errors), so a few more devices would see
    one past 4. The scale is 1.13 for 160 checks (40 tensors, free-running and
    teacher-forced), 1.27 for 2800."""
    z = NormalDist().inv_cdf(1.0 - FAMILY_ALPHA / (2.0 * max(int(checks), 1)))
    return max(1.0, z / K)


def noise_floor(ref: np.ndarray, runs: list[tuple[np.ndarray, float]], precision: str,
                se_scale: float = 1.0, stage: str = "unet") -> ErrorProfile:
    """Per statistic, the largest spread of the calibration runs ((tensor, scale)
    pairs: every statistic is homogeneous in the error), at least the minimum floor
    and, for offset and gain, ``se_scale`` standard errors of the fit
    (:func:`standard_error_scale`). A calibration run that is itself non-finite
    cannot define a floor and raises."""
    return explained_noise_floor(ref, runs, precision, se_scale, stage=stage)[0]


MINIMUM, STANDARD_ERROR = "minimum", "standard_error"  # floor sources that are not a calibration run


def explained_noise_floor(ref: np.ndarray, runs: list[tuple[np.ndarray, float]], precision: str,
                          se_scale: float = 1.0, labels: list[str] | None = None,
                          stage: str = "unet") -> tuple[ErrorProfile, dict]:
    """:func:`noise_floor`, and per statistic the term that set it: ``MINIMUM``,
    ``STANDARD_ERROR``, or the label of the calibration run (``labels``, one per
    run; else the run's index) whose spread it is. A tie keeps the earlier term."""
    floor = asdict(minimum_floor(ref, precision, stage))
    source = dict.fromkeys(STATS, MINIMUM)
    labels = labels if labels is not None else [f"calibration run {i}" for i in range(len(runs))]

    def widen(stat: str, value: float, why: str) -> None:
        if value > floor[stat]:
            floor[stat], source[stat] = value, why

    r = np.asarray(ref, np.float64).ravel()
    rc = r - r.mean() if r.size else r
    deff = [1.0, 1.0]
    channels = int(np.shape(ref)[-1]) if np.ndim(ref) >= 2 else 1
    score = 0.0  # rms of e * (ref - mean), the gain's score, over the runs
    for (run, scale), label in zip(runs, labels):
        s = error_stats(ref, run)
        if math.isnan(s.peak):
            raise ValueError("a calibration run of the reference holds NaN or inf: the model overflows in this "
                             "precision on this request; no noise floor can be measured")
        for k in STATS:
            widen(k, scale * s.get(k), label)
        e = np.asarray(run, np.float64).ravel() - r
        deff = [max(a, b) for a, b in zip(deff, design_effects(e, rc, channels=channels))]
        if r.size:
            x = e * rc
            score = max(score, scale * math.sqrt(float(np.dot(x, x)) / r.size))
    # Two or four calibration runs estimate the systematic statistics poorly (a run's |gain| can be small by
    # chance), so offset and gain are at least the fit's standard error under noise of the rms floor, times
    # the design effect the runs show (errors are correlated across elements: design_effects). The gain's
    # also in White's heteroscedasticity-consistent form sqrt(sum rc^2 e^2) / sum rc^2: rounding errors grow
    # with |value| and activations are heavy-tailed, so the form rms(e) / (std(ref) sqrt(n)), which assumes
    # every element equally noisy, is smaller by up to sqrt(kurtosis) (bench/README: a tiny SD 2.1 GEGLU
    # output's correct gain was 9.7 times it).
    if r.size:
        n, std = r.size, float(r.std())
        widen("offset", se_scale * deff[0] * floor["rms"] / math.sqrt(n), STANDARD_ERROR)
        if std > 0:
            widen("gain", se_scale * deff[1] * floor["rms"] / (std * math.sqrt(n)), STANDARD_ERROR)
            widen("gain", se_scale * deff[1] * score / (std * std * math.sqrt(n)), STANDARD_ERROR)
    return ErrorProfile(**floor), source


# Fewest batches a design effect is estimated from: offset 8, gain 32. A correct device's offset varies between
# inputs more than 32 batches show (a mid-block attention output's offset at 4.6 independent-element standard
# errors on the tiny SD 2.1); the gain keeps 32 because it is what rejects a +1 % bias, by k = 7.3 in the weakest
# capture cell (int8 hybrid kernels), which a factor-2 wider gain floor would let pass.
DESIGN_MIN_BATCHES = (8, 32)


def design_effects(e: np.ndarray, rc: np.ndarray, min_batches: tuple[int, int] = DESIGN_MIN_BATCHES,
                   channels: int = 1) -> tuple[float, float]:
    """How much larger the standard errors of the fit's offset and gain are
    for the error ``e`` (flat, float64) than for independent elements, by the
    batch-means method: the largest ratio over contiguous batches of 4^j
    elements, at least ``min_batches`` (offset, gain) of them; at least 1.
    ``rc``: the reference, centred. Two orders: as stored (channels, then
    rows of a tensor in NHWC order) and, for ``channels`` > 1, channel-major
    (one channel's elements at every position, then the next channel). The
    second sees errors a channel shares across positions, which batches of
    neighbouring elements average away: an input channel whose value is
    nearly the same everywhere (bias-dominated) rounds alike everywhere, and a
    linear layer passes that to every position of each output channel
    (measured: a correct device's cross-attention query offset on a tiny SD 2.1,
    seed 1, was 4.9 standard errors; design effect 1.1-1.4 as stored, 4.8-6.2
    channel-major)."""
    stored = (e, e * rc)  # the offset's and the gain's summands
    orders = [stored]
    if channels > 1 and e.size % channels == 0 and e.size > channels:
        orders.append(tuple(x.reshape(-1, channels).T.ravel() for x in stored))
    out = [1.0, 1.0]
    for summands in orders:
        for i, x in enumerate(summands):
            out[i] = max(out[i], _batch_means_ratio(x, min_batches[i]))
    return out[0], out[1]


def _batch_means_ratio(x: np.ndarray, min_batches: int) -> float:
    """The largest std(batch sums) / (std(x) sqrt(b)) over contiguous batches
    of b = 4^j elements (the first (n // b) b elements), at least
    ``min_batches`` of them; at least 1. Each level's sums are the previous
    level's summed four at a time (strided adds: NumPy's sum over an axis of
    length 4 is several times slower), so all levels cost about two passes."""
    base = _std(x)
    out = 1.0
    sums, b = x, 1
    while base > 0 and sums.size // 4 >= min_batches:
        m = sums.size // 4 * 4
        sums = sums[0:m:4] + sums[1:m:4] + sums[2:m:4] + sums[3:m:4]
        b *= 4
        # batch sums of b elements: variance b * var(x) if independent
        out = max(out, _std(sums) / (base * math.sqrt(b)))
    return out


def _std(x: np.ndarray) -> float:
    """Population standard deviation of a flat float64 array, as ``x.std()``
    up to rounding, in three NumPy calls (``x.std()`` makes six, and design
    effects take ~10^5 of them on small arrays in one certificate)."""
    d = x - np.add.reduce(x) / x.size
    return math.sqrt(float(np.dot(d, d)) / x.size)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    k_needed: float  # smallest k that passes (inf with a non-finite mismatch)
    failed: tuple[str, ...]  # statistics past k * floor, or "nonfinite"
    stats: ErrorProfile
    floor: ErrorProfile
    tolerance: ErrorProfile
    binding: str | None = None  # the statistic whose ratio to its floor is k_needed (None: non-finite)


def judge(ref: np.ndarray, test: np.ndarray, floor: ErrorProfile, k: float = K) -> Verdict:
    stats = error_stats(ref, test)
    tol = ErrorProfile(*(k * floor.get(s) for s in STATS))
    if math.isnan(stats.peak):
        return Verdict(False, math.inf, ("nonfinite",), stats, floor, tol)
    ratios = {s: (stats.get(s) / floor.get(s) if floor.get(s) > 0 else (math.inf if stats.get(s) > 0 else 0.0))
              for s in STATS}
    failed = tuple(s for s in STATS if ratios[s] > k)
    binding = max(ratios, key=ratios.get)
    return Verdict(not failed, ratios[binding], failed, stats, floor, tol, binding)


def rule_statement(k: float, se_scale: float, checks: int) -> str:
    """The rule as a certificate states it, from this module's constants."""
    return (f"a tensor passes iff it is finite where the reference is and each of {', '.join(STATS)} "
            "(peak = max|e|, rms(e), |offset| and |gain| of the least-squares fit e ~ offset + gain * reference, "
            f"e = device - reference) is <= k * its noise floor, k = {k:g}. The reference is the model as deployed "
            "(its weights as stored, its rewrites, its int8 kernels) in f32. The floor of each statistic is the "
            "largest spread of the calibration variants around the reference on this request (times the variant's "
            "scale; a variant non-finite at the tensor is left out), at least one unit roundoff u of the stage's "
            "declared storage precision at the tensor's scale (peak: u max|ref|, rms: u rms(ref)), "
            f"{SYSTEMATIC} unit roundoffs of its arithmetic precision for offset and gain (in fp16 arithmetic "
            f"{SYSTEMATIC_F16['model']} in a model stage, {SYSTEMATIC_F16['guidance_scheduler']} in guidance_scheduler), and s standard errors of the fit under noise of the rms floor, and for the gain also its "
            "heteroscedasticity-consistent standard error from the calibration runs' errors (each times the "
            "calibration runs' design effect: errors correlated across elements); "
            f"s = {se_scale:.3f} makes {K:g} times it the two-sided normal quantile at {FAMILY_ALPHA:g} / {checks} "
            "(the certificate's offset and gain checks: Bonferroni)")
