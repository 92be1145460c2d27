"""``refsd-validate certify``: judge a device capture against the reference.

    refsd-validate certify BUNDLE --model DIR [--mode free|teacher|both] --out DIR [--cache DIR] [--k K]

1. Read the bundle strictly (``reader.py``); its model sha256 must be the
   folder's (else it was captured from another model: bad input, exit 2).
2. The reference is **the model as deployed** (``certify_rerun.Deployment``):
   the bundle's weights as stored (fp16 / bf16 rounded, int8 values and scales
   from the .tflite with ``--tflite``, else quantized as the exporter does),
   its rewrites, and for int8 the kernels that ran (LiteRT CPU's hybrid
   kernels, or dequantization on a GPU). Rerun in f32 on the bundle's token
   ids and initial latents, free-running and/or teacher-forced (cached).
3. Calibrate each tensor's noise floor from calibration variants that follow
   the bundle's declaration of where and in what precision each stage ran
   (``tolerance.calibration_variants``): free-running variants against the
   reference; teacher-forced variants fed the reference's own trajectory (so
   the floor is one step's error, as the device's is). A variant that
   overflows fp16 (f16 emulation on a request that exceeds it) defines no
   floor from that stage and step on, even where its tensors stay finite; the
   certificate names it, with the op and step, and says when it comes at or
   before the first failure. Where the variants are half of a factorial
   design (``tolerance.half_fraction``) and it rejects, the other half runs
   too and the bundle is judged on the full design, unless no floor the other
   half can widen would change the verdict or the first failure
   (``needs_full_design``).
4. Judge every boundary tensor, and every intermediate the bundle has that
   the reference also records, in execution order; the first failing tensor
   (teacher-forced first: it is the step's own error) is the localization:
   stage, step, module path. Intermediates the reference does not record are
   listed, not judged (``strict``: refused); those the capture marks as not
   observable on its device are listed too.
5. Report what the deployment itself costs (deployed reference vs the
   original fp32 model, per boundary tensor, and image PSNR) beside the
   verdict, never in it; ``max_deployment_cost`` gates it separately.
6. Write ``certificate.json``, ``report.html`` and Model Explorer node data.

Exit 0 certified, 1 not certified, 2 bad input, 3 certified but the deployment
costs more than ``--max-deployment-cost`` allows.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from refsd_validate.bundle import BundleError, ModelGeometry, model_sha256, sha256_file
from refsd_validate.certify_rerun import (
    CACHE_BUDGET_BYTES,
    ORIGINAL,
    CacheStats,
    Deployment,
    RerunJob,
    cache_bytes,
    code_fingerprint,
    first_severe_event,
    teacher_inputs,
)
from refsd_validate.compare import compare, json_safe, psnr
from refsd_validate.declaration_cost import f16_declaration_cost
from refsd_validate.declarations import declaration_checks
from refsd_validate.reader import Bundle, read_bundle
from refsd_validate.tolerance import (
    MAX_K,
    REFERENCE,
    SYSTEMATIC,
    SYSTEMATIC_F16,
    FAMILY_ALPHA,
    FULL_DESIGN_WIDENING,
    K,
    Verdict,
    calibration_variants,
    error_stats,
    judge,
    minimum_floor,
    noise_floor,
    standard_error_scale,
    unit_roundoff,
)
from tqdm import tqdm

from refsd import __version__
from refsd import trace as names
from refsd.image import to_image
from refsd.trace import parse_name
from refsd.weights import load_scheduler_config

CERTIFICATE = "refsd-certificate"
CERTIFICATE_VERSION = 2
RUN_MODES = ("free", "teacher", "both")  # free-running, teacher-forced, or both


@dataclass
class TensorResult:
    name: str
    mode: str  # free | teacher
    stage: str
    step: int | None
    module_path: str | None  # None for boundary tensors
    verdict: Verdict
    compare: dict | None  # boundary tensors: refsd_validate.compare at atol = k * peak floor (cosine, ULP)
    psnr_db: float | None = None

    def to_dict(self) -> dict:
        v = self.verdict
        out = {"name": self.name, "mode": self.mode, "stage": self.stage, "step": self.step,
               "module_path": self.module_path, "passed": v.passed, "k_needed": v.k_needed,
               "failed": list(v.failed), "stats": asdict(v.stats), "floor": asdict(v.floor),
               "tolerance": asdict(v.tolerance), "compare": self.compare}
        if self.psnr_db is not None:
            out["psnr_db"] = self.psnr_db
        return json_safe(out)


@dataclass
class Certificate:
    certified: bool
    first_failure: TensorResult | None
    results: list[TensorResult]
    rule: dict
    provenance: dict
    request: dict
    exact_checks: list[dict] = field(default_factory=list)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # for the report: reference, device (decoder output)
    deployment_cost: dict = field(default_factory=dict)
    unknown_intermediates: list[str] = field(default_factory=list)
    not_observable: list[str] = field(default_factory=list)
    calibration_overflows: list[dict] = field(default_factory=list)
    hint: str | None = None  # an explanation of the first failure that an exact check found
    # The calibration overflow at or before the first failure (same mode): a device computing as declared can
    # fail there too, so the failure may be the deployment's fp16 headroom rather than the device.
    overflow_before_failure: dict | None = None
    declaration_cost: dict | None = None  # what an f16 declaration costs (declaration_cost.f16_declaration_cost)

    @property
    def cost_gate_failed(self) -> bool:
        return not self.deployment_cost.get("gate", {}).get("passed", True)

    @property
    def resolution(self) -> dict | None:
        """The smallest systematic gain error on the UNet's noise prediction
        this certificate rejects (its gain tolerance, teacher-forced where
        judged so): at every step, and at the best-resolved step. Floors that
        legal calibration runs widen make a certificate weak; this says how
        weak, as a fraction of the output."""
        unet = [r for r in self.results if r.stage == "unet" and r.module_path is None]
        modes = {r.mode for r in unet}
        unet = [r for r in unet if r.mode == ("teacher" if "teacher" in modes else "free")]
        if not unet:
            return None
        gains = [r.verdict.tolerance.gain for r in unet]
        return {"tensor": "unet noise prediction", "mode": unet[0].mode, "gain_every_step": max(gains),
                "gain_best_step": min(gains)}

    def to_dict(self) -> dict:
        first = self.first_failure
        return {
            "certificate": CERTIFICATE, "version": CERTIFICATE_VERSION,
            "verdict": "certified" if self.certified else "not certified",
            "first_failure": None if first is None else {
                "tensor": first.name, "mode": first.mode, "stage": first.stage, "step": first.step,
                "module_path": first.module_path, "failed": list(first.verdict.failed),
                "k_needed": json_safe(first.verdict.k_needed)},
            "exact_checks": self.exact_checks,
            "deployment_cost": json_safe(self.deployment_cost),
            "not_judged": {"unknown_intermediates": self.unknown_intermediates,
                           "not_observable": self.not_observable},
            "calibration_overflows": self.calibration_overflows,
            "overflow_before_failure": self.overflow_before_failure,
            "hint": self.hint,
            "resolution": json_safe(self.resolution),
            "declaration_cost": json_safe(self.declaration_cost),
            "rule": self.rule, "provenance": self.provenance, "request": self.request,
            "tensors": [r.to_dict() for r in self.results],
        }


@dataclass(frozen=True)
class CostGate:
    """``--max-deployment-cost``: a floor on the image PSNR (dB) or a ceiling on
    the worst boundary tensor's relative error of the deployed model against
    the original one. Parsed from ``psnr:30`` or ``rel:0.05``."""

    kind: str  # psnr | rel
    limit: float

    @classmethod
    def parse(cls, text: str) -> "CostGate":
        kind, _, value = str(text).partition(":")
        try:
            limit = float(value)
        except ValueError:
            limit = math.nan
        if kind not in ("psnr", "rel") or not math.isfinite(limit) or limit < 0 or (kind == "psnr" and limit > 200):
            raise BundleError(f"--max-deployment-cost {text!r}: expected psnr:DB (0..200) or rel:X (>= 0), "
                              "e.g. psnr:30 or rel:0.05")
        return cls(kind, limit)

    def passes(self, cost: dict) -> bool:
        if self.kind == "psnr":
            return cost["image_psnr_db"] >= self.limit
        return cost["worst_rel_peak"] <= self.limit


@dataclass
class Plan:
    """A certification read and checked, before any rerun: the bundle, the
    model, the deployment and the calibration variants, and the options."""

    bundle: Bundle
    model_dir: Path
    model_sha: str
    deployment: Deployment
    variants: list
    modes: tuple[str, ...]
    asked: frozenset[str]  # intermediates to judge
    not_observable: list[str]
    k: float
    strict: bool
    max_deployment_cost: CostGate | None
    cache: Path
    cache_budget: int
    complement: list = field(default_factory=list)  # the rest of the factorial design (tolerance.half_fraction)
    completed_because: str | None = None  # why the rest ran (needs_full_design), once it has

    def completed(self, because: str = "") -> "Plan":
        """This plan with the full calibration design: its variants first, in
        the same order, so its jobs' (role, index) keep naming the same runs."""
        return replace(self, variants=self.variants + self.complement, complement=[], completed_because=because)

    @property
    def design(self) -> str:
        if self.complement:
            return ("half fraction of the factorial design (tolerance.half_fraction); the other half runs when it "
                    "could change a rejection (certify.needs_full_design), and the full design's floors are no narrower")
        if self.completed_because is not None:
            return ("full factorial design: the half fraction rejected, so the other half ran too"
                    + (f" ({self.completed_because})" if self.completed_because else ""))
        return "full design"

    def jobs(self) -> list[RerunJob]:
        """Every rerun the certificate needs, the reference first (the
        teacher-forced calibration runs are fed its trajectory). Calibration
        runs depend only on the model, the deployment, the declared stages
        and the request, not on what the device computed: bundles of one
        request share them (same keys)."""
        b = self.bundle

        def job(role, variant=REFERENCE, index=0, teacher=None, dep=None, wanted=None, tensors=None):
            return RerunJob(role, index, variant, dep or self.deployment, self.asked if wanted is None else wanted,
                            teacher, str(self.model_dir), self.model_sha, dict(b.request), b.tensors[names.TOKEN_IDS],
                            b.tensors[names.LATENTS_INIT], tensors)

        out = [job("reference")]
        if "free" in self.modes:
            out += [job("free", v, i) for i, v in enumerate(self.variants)]
        if "teacher" in self.modes:
            out += [job("teacher", v, i, teacher="reference") for i, v in enumerate(self.variants)]
            out.append(job("device_teacher", teacher="tensors",
                           tensors=teacher_inputs(b.tensors, b.request["steps"])))
        out.append(job("original", dep=ORIGINAL, wanted=frozenset()))
        return out


def check_model_dir(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    if not os.path.lexists(model_dir / "model_index.json"):  # a FIFO or directory there is refused when read
        raise BundleError(f"{model_dir}: not a diffusers model folder (no model_index.json)")
    return model_dir


def prepare(bundle_path: str | Path, model_dir: str | Path, *, mode: str = "both",
            cache_dir: str | Path | None = None, k: float = K, cache_budget: int = CACHE_BUDGET_BYTES,
            tflite_dir: str | Path | None = None, strict: bool = False,
            max_deployment_cost: CostGate | None = None) -> Plan:
    """Read and check a bundle against the model (raises ``BundleError`` for bad input)."""
    if mode not in RUN_MODES:
        raise BundleError(f"mode must be one of {', '.join(RUN_MODES)}, got {mode!r}")
    if not (isinstance(k, (int, float)) and 0 < k <= MAX_K):
        raise BundleError(f"k must be in (0, {MAX_K:g}], got {k!r}")
    model_dir = check_model_dir(model_dir)
    geometry = ModelGeometry.from_dir(model_dir)
    bundle = read_bundle(bundle_path, geometry)
    model_sha = model_sha256(model_dir)
    if bundle.capture["model"]["sha256"] != model_sha:
        raise BundleError(f"bundle was captured from model sha256 {bundle.capture['model']['sha256'][:16]}..., "
                          f"but {model_dir} is {model_sha[:16]}...: not the same model")
    deployment = _deployment(bundle, bundle.stages, tflite_dir)
    # Captures leave fused-away tensors out of their tensors and list them here: listed, never judged.
    not_observable = sorted(set(bundle.capture.get("observability", {}).get("not_observable", [])))
    return Plan(bundle, model_dir, model_sha, deployment, calibration_variants(bundle.stages, deployment.weights),
                ("free", "teacher") if mode == "both" else (mode,), frozenset(bundle.intermediates) - set(not_observable),
                not_observable, k, strict, max_deployment_cost,
                Path(cache_dir) if cache_dir is not None else default_cache_dir(), cache_budget,
                calibration_variants(bundle.stages, deployment.weights, complement=True))


def certify(bundle_path: str | Path, model_dir: str | Path, *, mode: str = "both",
            cache_dir: str | Path | None = None, k: float = K, cache_budget: int = CACHE_BUDGET_BYTES,
            tflite_dir: str | Path | None = None, strict: bool = False,
            max_deployment_cost: CostGate | None = None, progress: bool = False) -> Certificate:
    """Judge a bundle (see the module docstring). Raises ``BundleError`` for bad input."""
    plan = prepare(bundle_path, model_dir, mode=mode, cache_dir=cache_dir, k=k, cache_budget=cache_budget,
                   tflite_dir=tflite_dir, strict=strict, max_deployment_cost=max_deployment_cost)
    stats = CacheStats()
    traces = {}
    jobs = plan.jobs()
    with tqdm(total=len(jobs), desc="certify: reference reruns", unit="run", disable=not progress) as bar:
        def run(jobs):
            for job in jobs:
                traces[job.role, job.index] = job.run(traces.get(("reference", 0)), cache_dir=plan.cache,
                                                      cache_budget=plan.cache_budget, stats=stats)
                bar.update()
                if job.role == "reference":  # before the calibration runs: a bad request fails fast
                    check_reference(plan, traces[job.role, job.index])

        run(jobs)
        cert = certificate_from(plan, traces, stats)
        because = needs_full_design(plan, cert)
        if because:
            plan = plan.completed(because)
            rest = [j for j in plan.jobs() if (j.role, j.index) not in traces]
            bar.total += len(rest)
            bar.set_description("certify: rejected by the half design, running the rest")
            run(rest)
            cert = certificate_from(plan, traces, stats)
    return cert


def needs_full_design(plan: Plan, cert: Certificate) -> str | None:
    """Why the rest of a half-fraction design (``tolerance.half_fraction``)
    could change this rejection's verdict, first failure or its explanation, so
    that the bundle must be judged again on the full design (None: it could
    not). The reasons:

    * the rest holds an f16 run with plain kernels and the half none (f16 with
      FTZ declared): there the kernels and the f16 mode interact where fp16
      overflows (a plain f16 GroupNorm's sum of squares; Google's kernels and
      f32_f16 do not), and the certificate names such an overflow;
    * the first failure could pass on the full design: every calibration run
      of the half is non-finite there (no floor; a run of the rest may give
      one), or it needs k <= k * FULL_DESIGN_WIDENING (the rest may widen its
      floor that far);
    * the device went non-finite, or the half's runs did, and no calibration
      run of the half overflowed at or before the first failure: the rest may
      hold the run that explains it. When the half already names that
      overflow the rest would only name more runs, and a non-finite device
      tensor fails on any floors. (An f16 device on SD 2.1 that overflows as
      the emulation does, FTZ unknown, ran 18 reruns instead of 10 before this
      exception: bench/README.)

    Otherwise the first failing tensor fails on the full design too (floors
    only widen): the same verdict and first failure; later tensors are judged
    on the half's floors. Never when an exact check (token ids, timesteps)
    fails: no floor changes that."""
    first = cert.first_failure
    if not plan.complement or first is None or not all(c["passed"] for c in cert.exact_checks):
        return None
    if _plain_f16(plan.complement) and not _plain_f16(plan.variants):
        return "f16 declared with FTZ: the half holds no f16 run with plain kernels"
    if "calibration_overflow" in first.verdict.failed:
        return f"no run of the half gives {first.name} a floor"
    if first.verdict.k_needed <= plan.k * FULL_DESIGN_WIDENING:
        return (f"{first.name} needs k {first.verdict.k_needed:.3g}, within the {FULL_DESIGN_WIDENING:g}x the rest "
                "may widen a floor")
    if cert.overflow_before_failure is None and any(
            {"nonfinite", "calibration_overflow"} & set(r.verdict.failed) for r in cert.results):
        return "non-finite tensors, and no run of the half overflows at or before the first failure"
    return None


def _plain_f16(variants) -> bool:
    return any(sv.precision == "f16" and sv.kernels == "none" for v in variants for sv in v.stages)


def check_reference(plan: Plan, ref: dict) -> None:
    """What the reference itself says about the bundle: finite, every asked
    intermediate known (``strict``), every shape the reference's."""
    _check_reference_finite(ref, plan.deployment)
    unknown = sorted(plan.asked - set(ref))
    if unknown and plan.strict:
        raise BundleError(f"intermediates the reference does not record ({len(unknown)}): {', '.join(unknown[:5])} "
                          "(see 'refsd-validate names'; without --strict they are listed and skipped)")
    for n in ref:
        if n in plan.bundle.capture["tensors"] and n != names.TIMESTEPS:
            _check_shape(n, tuple(plan.bundle.capture["tensors"][n]["shape"]), ref[n])


def certificate_from(plan: Plan, traces: dict[tuple[str, int], dict], cache_stats: CacheStats | None = None) -> Certificate:
    """The certificate from the reruns of ``plan.jobs()`` (keyed (role, index))."""
    bundle, k, deployment, variants, stages = plan.bundle, plan.k, plan.deployment, plan.variants, plan.bundle.stages
    req, cache = bundle.request, plan.cache
    cache_stats = cache_stats if cache_stats is not None else CacheStats()
    ref = traces["reference", 0]
    check_reference(plan, ref)
    unknown = sorted(plan.asked - set(ref))
    order = [n for n in ref if n in bundle.capture["tensors"] and n != names.TIMESTEPS]

    def device(n):
        return np.broadcast_to(bundle.tensor(n), ref[n].shape)

    modes = plan.modes
    checks = 2 * len(order) * len(modes)  # an offset and a gain per judged tensor
    se_scale = standard_error_scale(checks)
    expected_by_mode: dict[str, dict] = {}
    results: list[TensorResult] = []
    overflows: list[dict] = []
    cuts: dict[str, list[int]] = {}
    for m in modes:
        calib = [traces[m, i] for i in range(len(variants))]
        expected = ref if m == "free" else traces["device_teacher", 0]
        expected_by_mode[m] = expected
        # A variant that overflowed fp16 (even into a finite result) is no calibration from that step on.
        usable_until = cuts[m] = []
        for v, c in zip(variants, calib):
            event = first_severe_event(c)
            bad = next((n for n in order if not np.isfinite(c[n]).all()), None)
            cut = _cut(order, event, bad)
            usable_until.append(cut)
            if cut < len(order):
                where = {k: v for k, v in event.items() if k != "unaffected"} if event else \
                    {"op": None, "stage": None, "step": None, "detail": f"non-finite from {bad}"}
                overflows.append({"mode": m, "variant": v.label, "first_affected_tensor": order[cut], **where})
        for i, n in enumerate(order):
            stage = parse_name(n)[0]
            precision = stages.get(stage if stage in stages else "guidance_scheduler")["precision"]
            runs = [(c[n], v.scale) for c, v, cut in zip(calib, variants, usable_until) if i < cut]
            if not runs:
                results.append(_no_floor(n, m, expected[n], device(n), precision, k))
                continue
            floor = noise_floor(ref[n], runs, precision, se_scale)
            results.append(_judge(n, m, expected[n], device(n), floor, k))

    exact = _exact_checks(bundle, ref, plan.model_dir) + declaration_checks(
        bundle.tensors, stages, req, load_scheduler_config(plan.model_dir / "scheduler"))
    failures = [r for r in results if not r.verdict.passed]
    # Teacher-forced failures localize better: they are the step's own error, not inherited drift.
    by_mode = {m: next((r for r in failures if r.mode == m), None) for m in modes}
    first = by_mode.get("teacher") or by_mode.get("free")
    before_first = None if first is None else next(
        (o for o in overflows if o["mode"] == first.mode
         and order.index(o["first_affected_tensor"]) <= order.index(first.name)), None)
    certified = not failures and all(c["passed"] for c in exact)
    hint = _layout_hint(first, expected_by_mode[first.mode][first.name], device(first.name), k) if first else None
    cost = _deployment_cost(ref, traces["original", 0], deployment)
    gate = plan.max_deployment_cost
    if gate is not None:
        cost["gate"] = {"kind": gate.kind, "limit": gate.limit, "passed": gate.passes(cost)}
    rule = {
        "k": k,
        "statement": "a tensor passes iff it is finite where the reference is and each of peak = max|e|, rms(e), "
                     "|offset| and |gain| of the least-squares fit e ~ offset + gain * reference (e = device - "
                     "reference) is <= k * its noise floor. The reference is the model as deployed (its weights as "
                     "stored, its rewrites, its int8 kernels) in f32. The floor of each statistic is the largest "
                     "spread of the calibration variants around the reference on this request (times the variant's "
                     "scale; a variant non-finite at the tensor is left out), at least one unit roundoff u of the "
                     "stage's declared storage precision at the tensor's scale (peak: u max|ref|, rms: u rms(ref)), "
                     f"{SYSTEMATIC} unit roundoffs of its arithmetic precision for offset and gain ({SYSTEMATIC_F16} "
                     "in fp16 arithmetic), and s standard "
                     "errors of the fit under noise of the rms floor, and for the gain also its heteroscedasticity-"
                     "consistent standard error from the calibration runs' errors (each times the calibration runs' "
                     f"design effect: errors correlated across elements); s = {se_scale:.3f} makes {K:g} times it the "
                     f"two-sided normal quantile at {FAMILY_ALPHA:g} / {checks} (the "
                     "certificate's offset and gain checks: Bonferroni)",
        "stages": stages, "deployment": deployment.label,
        "unit_roundoff": {s: unit_roundoff(d["precision"]) for s, d in stages.items()},
        "calibration_variants": [v.label for v in variants],
        "calibration_design": plan.design,
        "reference": f"{REFERENCE.label}, {deployment.label}",
        "teacher_forced_floor": "calibration variants fed the reference's own trajectory (one step's error)",
        "localization": "first failing tensor in execution order, teacher-forced mode first",
    }
    provenance = {
        "bundle": str(bundle.source), "bundle_sha256": bundle.sha256, "model_dir": str(plan.model_dir),
        "model_sha256": plan.model_sha, "refsd_version": __version__,
        "reference_code_sha256": code_fingerprint(), "reference_precision": REFERENCE.label,
        "modes": list(modes), "device": bundle.capture["device"], "runtime": bundle.capture["runtime"],
        "model": {k_: v for k_, v in bundle.capture["model"].items() if k_ != "sha256"},
        "schema_version": bundle.capture["schema_version"],
        "capture_created": bundle.capture["created"], "capture_tool": bundle.capture.get("tool"),
        "int8_source": None if deployment.int8_source is None else str(deployment.int8_source),
        "rerun_cache": {"dir": str(cache), "budget_bytes": plan.cache_budget,
                        **dict(cache_stats.to_dict(), bytes_after=cache_bytes(cache) if cache.is_dir() else 0)},
        "certified_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    images = {"reference": ref[names.IMAGE][0], "device": np.asarray(bundle.tensors[names.IMAGE][0], np.float32)}
    cert = Certificate(certified, first, results, rule, provenance, dict(req), exact, images, deployment_cost=cost,
                       unknown_intermediates=unknown, not_observable=plan.not_observable, calibration_overflows=overflows,
                       hint=hint, overflow_before_failure=before_first)
    res = cert.resolution
    if res is not None:
        m = res["mode"]
        cert.declaration_cost = f16_declaration_cost(variants, traces, ref, expected_by_mode[m], device, order, cuts[m],
                                                     stages, m, k, se_scale, res["gain_every_step"])
    return cert




def _layout_hint(first: TensorResult, expected: np.ndarray, test: np.ndarray, k: float) -> str | None:
    """A 4-D tensor with C == H == W fails by a mile but would pass read as NCHW: say so."""
    if test.ndim != 4 or not (test.shape[1] == test.shape[2] == test.shape[3]):
        return None
    if judge(expected, np.ascontiguousarray(np.transpose(test, (0, 2, 3, 1))), first.verdict.floor, k).passed:
        return (f"{first.name} passes if read as NCHW: the runtime's activations are NCHW; transpose them to NHWC "
                "(0, 2, 3, 1), or write the bundle with write_bundle(..., layout='NCHW')")
    return None


def default_cache_dir() -> Path:
    """Reference reruns are cached here unless ``--cache`` says otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "refsd" / "certify"


def _deployment(bundle: Bundle, stages: dict, tflite_dir) -> Deployment:
    model = bundle.capture["model"]
    try:
        deployment = Deployment.of_bundle(bundle.capture, stages, None)
    except ValueError as e:
        raise BundleError(f"capture.json: model.rewrites {model.get('rewrites')!r}: {_one_line(e)}") from None
    if tflite_dir is None:
        return deployment
    from refsd.export.build import read_manifest  # noqa: PLC0415

    tflite_dir = Path(tflite_dir)
    try:
        manifest = read_manifest(tflite_dir)
    except (OSError, ValueError) as e:
        raise BundleError(f"--tflite {tflite_dir}: {_one_line(e)}") from None
    for name, comp in model["components"].items():
        entry = manifest.get("components", {}).get(name)
        if entry is None or comp.get("sha256") is None:
            raise BundleError(f"--tflite {tflite_dir}: no {name} to match the bundle's {name} component")
        path = tflite_dir / entry["file"]
        if not path.is_file() or sha256_file(path) != comp["sha256"]:
            raise BundleError(f"--tflite {tflite_dir}: {entry['file']} is not the {name} the bundle ran "
                              "(sha256 differs from capture.json)")
    if deployment.weights == "int8":
        return Deployment(deployment.weights, deployment.rewrites, deployment.int8_kernels, str(tflite_dir))
    return deployment


def _check_reference_finite(ref: dict, deployment: Deployment) -> None:
    bad = next((n for n in ref if n != names.TIMESTEPS and not np.isfinite(ref[n]).all()), None)
    if bad is not None:
        raise BundleError(f"the f32 reference of this deployment ({deployment.label}) is non-finite at {bad}: "
                          "the model itself overflows float32 on this request")


def _check_shape(name: str, shape: tuple, ref: np.ndarray) -> None:
    """Exact shapes, with one exception: a tensor the reference computes
    identically for both CFG rows (the time embedding of one timestep) may be
    captured once, as a device that computes it once holds it."""
    if shape == ref.shape:
        return
    batch_invariant = ref.ndim >= 1 and ref.shape[0] == 2 and np.array_equal(ref[0], ref[1])
    if batch_invariant and shape == (1, *ref.shape[1:]):
        return
    hint = ""
    if len(shape) == 4 and len(ref.shape) == 4 and shape == (ref.shape[0], ref.shape[3], ref.shape[1], ref.shape[2]):
        hint = " (NCHW? bundles hold NHWC activations: transpose (0, 2, 3, 1))"
    raise BundleError(f"tensor {name}: shape {shape}, the reference's is {ref.shape}{hint}")


def _cut(order: list[str], event: dict | None, nonfinite: str | None) -> int:
    """Index in ``order`` from which a calibration run is unusable: its first
    non-finite tensor, or the first tensor at or after the stage and step of its
    first fp16 overflow that was not recorded before the overflowing module
    (``len(order)`` if neither)."""
    cut = order.index(nonfinite) if nonfinite is not None else len(order)
    if event is not None:
        unaffected = set(event.get("unaffected", ()))  # recorded before the overflowing module: still fair
        stage_rank = {"text_encoder": 0, "unet": 1, "vae": 2}

        def at_or_after(name: str) -> bool:
            st, step, _ = parse_name(name)
            rank = stage_rank.get(st, 1)  # the scheduler's tensors belong to the denoising loop
            ev_rank = stage_rank.get(event["stage"], 1)
            if rank != ev_rank:
                return rank > ev_rank
            return event["step"] is None or step is None or step >= event["step"]

        cut = min(cut, next((i for i, n in enumerate(order) if at_or_after(n) and n not in unaffected), len(order)))
    return cut


def _deployment_cost(deployed: dict, original: dict, deployment: Deployment) -> dict:
    """Deployed reference vs the original fp32 model, per boundary tensor:
    relative peak and rms error (max|e| / max|orig|, rms(e) / rms(orig)), and
    the PSNR of the images a user sees. What the deployment costs, not the device."""
    per = {}
    for n in deployed:
        if n in (names.TIMESTEPS,) or n not in original or parse_name(n)[2] is not None:
            continue
        o, d = np.asarray(original[n], np.float64), np.asarray(deployed[n], np.float64)
        e = d - o
        scale_peak, scale_rms = float(np.abs(o).max(initial=0.0)), float(np.sqrt(np.mean(o * o)))
        per[n] = {"rel_peak": float(np.abs(e).max(initial=0.0)) / scale_peak if scale_peak else 0.0,
                  "rel_rms": float(np.sqrt(np.mean(e * e))) / scale_rms if scale_rms else 0.0}
    image = psnr(_to_image(original[names.IMAGE]), _to_image(deployed[names.IMAGE]))
    return {"deployment": deployment.label, "original": ORIGINAL.label, "image_psnr_db": image,
            "worst_rel_peak": max((v["rel_peak"] for v in per.values()), default=0.0),
            "worst_tensor": max(per, key=lambda n: per[n]["rel_peak"]) if per else None, "tensors": per}


def _no_floor(name: str, mode: str, ref: np.ndarray, test: np.ndarray, precision: str, k: float) -> "TensorResult":
    """Every calibration variant is non-finite here: the declared precision
    overflows on this request, so a finite device did not compute as declared
    (an fp32 accumulation, say) and a non-finite one cannot be told from a fault."""
    stats, floor = error_stats(ref, test), minimum_floor(ref, precision)
    verdict = Verdict(False, math.inf, ("calibration_overflow",), stats, floor, floor)
    stage, step, path = parse_name(name)
    return TensorResult(name, mode, stage, step, path, verdict, None)


def _one_line(e: object) -> str:
    return " ".join(str(e).split())


def _judge(name: str, mode: str, ref: np.ndarray, test: np.ndarray, floor, k: float) -> TensorResult:
    stage, step, path = parse_name(name)
    verdict = judge(ref, test, floor, k)
    summary = None
    if path is None:  # boundary tensors also get Polygraphy's view (intermediates: too many for its medians)
        c = compare(ref, np.asarray(test, np.float32), atol=k * floor.peak, rtol=0.0, check_mode="max", name=name)
        summary = {key: c.to_dict()[key] for key in ("passed", "atol", "atol_alone", "nonfinite_mismatches",
                                                     "cosine", "max_ulp_f16", "mean_ulp_f16")}
    image_psnr = None
    if name == names.IMAGE:  # PSNR of the [0, 1] images a user sees
        image_psnr = psnr(_to_image(ref), _to_image(test))
    return TensorResult(name, mode, stage, step, path, verdict, summary, image_psnr)


def _to_image(decoded: np.ndarray) -> np.ndarray:
    return to_image(np.asarray(decoded, np.float32))


def _exact_checks(bundle: Bundle, ref: dict, model_dir: Path) -> list[dict]:
    """Integer tensors must match exactly: the timesteps the device ran, and its
    tokenization of the prompts (the rerun uses the device's ids either way)."""
    from refsd.weights import load_tokenizer  # noqa: PLC0415

    checks = []
    if names.TIMESTEPS in bundle.tensors:
        dev, want = bundle.tensors[names.TIMESTEPS], ref[names.TIMESTEPS]
        bad = np.flatnonzero(dev.astype(np.int64) != want.astype(np.int64))
        checks.append({"tensor": names.TIMESTEPS, "passed": not bad.size,
                       "detail": "as the reference scheduler" if not bad.size else
                       f"step {int(bad[0])}: device ran t={int(dev[bad[0]])}, reference t={int(want[bad[0]])}"})
    else:  # optional in a bundle, but a user should know the check did not run
        checks.append({"tensor": names.TIMESTEPS, "passed": True, "checked": False,
                       "detail": "not checked: the bundle has no scheduler/timesteps"})
    tok = load_tokenizer(model_dir / "tokenizer")
    req = bundle.request
    want = np.asarray([tok(t, padding="max_length", max_length=names.TOKENS, truncation=True)["input_ids"]
                       for t in (req["negative_prompt"], req["prompt"])], np.int64)
    dev = bundle.tensors[names.TOKEN_IDS].astype(np.int64)
    rows = [i for i in range(2) if not np.array_equal(dev[i], want[i])]
    swapped = rows == [0, 1] and np.array_equal(dev[::-1], want)
    checks.append({"tensor": names.TOKEN_IDS, "passed": not rows,
                   "detail": "the reference tokenizer's ids for [negative_prompt, prompt]" if not rows else
                   "rows are [prompt, negative_prompt]: the CFG batch order is [uncond, cond] (negative prompt "
                   "first)" if swapped else
                   f"row {rows[0]} ({'negative_prompt' if rows[0] == 0 else 'prompt'}) differs from the reference "
                   "tokenizer's ids"})
    return checks


def tflite_tensor_names(tflite_dir: str | Path) -> dict[str, dict[str, str]]:
    """Stage -> module path -> TFLite tensor name, from an export's ``refsd_export.json``."""
    from refsd.export.build import read_manifest  # noqa: PLC0415

    try:
        doc = read_manifest(tflite_dir)
        return {stage: {p: t["tensor"] for p, t in c["tensors"].items()} for stage, c in doc["components"].items()}
    except (OSError, ValueError) as e:
        raise BundleError(f"--tflite {tflite_dir}: {_one_line(e)}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"--tflite {tflite_dir}: not an export manifest ({_one_line(e)})") from None


def write_outputs(cert: Certificate, out: str | Path, tflite_names: dict | None = None) -> Path:
    """certificate.json, report.html and model_explorer/{stage}.json into ``out``."""
    from refsd_validate.report import model_explorer_node_data, render_report  # noqa: PLC0415

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "certificate.json").write_text(json.dumps(cert.to_dict(), indent=2) + "\n", encoding="utf-8")
    (out / "report.html").write_text(render_report(cert), encoding="utf-8")
    me = out / "model_explorer"
    me.mkdir(exist_ok=True)
    for stage, doc in model_explorer_node_data(cert, tflite_names).items():
        (me / f"{stage}.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return out

