"""A certification read and checked, before any rerun: the bundle, the
model, the deployment it declares, the calibration design
(``tolerance.calibration_variants``: its half, and the rest that completes
it) and the options; and the reruns it needs (``Plan.jobs``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from refsd_validate.bundle import BundleError, ModelGeometry, model_sha256, sha256_file
from refsd_validate.certify_rerun import CACHE_BUDGET_BYTES, ORIGINAL_DEPLOYMENT, Deployment, RerunJob, teacher_inputs
from refsd_validate.reader import Bundle, read_bundle
from refsd_validate.tolerance import MAX_K, REFERENCE_RUN, K, calibration_variants

from refsd import trace

RUN_MODES = ("free", "teacher", "both")  # free-running, teacher-forced, or both


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

    @property
    def original_is_reference(self) -> bool:
        """The model is deployed as published (fp32 weights, no rewrites): the
        original model's run is the reference run, bit for bit."""
        return self.deployment == ORIGINAL_DEPLOYMENT

    def jobs(self) -> list[RerunJob]:
        """Every rerun the certificate needs, the reference first (the
        teacher-forced calibration runs are fed its trajectory). Calibration
        runs depend only on the model, the deployment, the declared stages
        and the request, not on what the device computed: bundles of one
        request share them (same keys). The original model's run (what the
        deployment costs) is the reference itself when the model is deployed
        as published (fp32 weights, no rewrites): not run twice."""
        b = self.bundle

        def job(role, variant=REFERENCE_RUN, index=0, teacher=None, dep=None, wanted=None, tensors=None):
            return RerunJob(role, index, variant, dep or self.deployment, self.asked if wanted is None else wanted,
                            teacher, str(self.model_dir), self.model_sha, dict(b.request), b.tensors[trace.TOKEN_IDS],
                            b.tensors[trace.LATENTS_INIT], tensors)

        out = [job("reference")]
        if "free" in self.modes:
            out += [job("free", v, i) for i, v in enumerate(self.variants)]
        if "teacher" in self.modes:
            out += [job("teacher", v, i, teacher="reference") for i, v in enumerate(self.variants)]
            out.append(job("device_teacher", teacher="tensors",
                           tensors=teacher_inputs(b.tensors, b.request["steps"])))
        if not self.original_is_reference:
            out.append(job("original", dep=ORIGINAL_DEPLOYMENT, wanted=frozenset()))
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


def default_cache_dir() -> Path:
    """Reference reruns are cached here unless ``--cache`` says otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "refsd" / "certify"


def _deployment(bundle: Bundle, stages: dict, tflite_dir) -> Deployment:
    model = bundle.capture["model"]
    try:
        deployment = Deployment.of_bundle(bundle.capture, stages, None)
    except ValueError as e:
        raise BundleError(f"capture.json: model.rewrites {model.get('rewrites')!r}: {one_line(e)}") from None
    if tflite_dir is None:
        return deployment
    from refsd.export.build import read_manifest  # noqa: PLC0415

    tflite_dir = Path(tflite_dir)
    try:
        manifest = read_manifest(tflite_dir)
    except (OSError, ValueError) as e:
        raise BundleError(f"--tflite {tflite_dir}: {one_line(e)}") from None
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


def one_line(e: object) -> str:
    return " ".join(str(e).split())
