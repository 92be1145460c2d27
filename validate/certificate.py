"""The certificate document: each judged tensor's result, the verdict, the
explanation the judge built (``explain.py``), and ``certificate.json``'s
layout (``Certificate.to_dict``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from refsd_validate.compare import json_safe
from refsd_validate.explain import Explanation
from refsd_validate.tolerance import Verdict

CERTIFICATE = "refsd-certificate"
CERTIFICATE_VERSION = 3  # 3: per-tensor floor sources, closest calibration run, resolution; the explanation


@dataclass(frozen=True)
class Resolution:
    """The smallest systematic errors a tensor's check rejects, relative to
    the reference, for a device with no other error there: a gain g (error g *
    ref) and an offset o (error o * rms(ref)). Each is rejected by whichever
    statistic catches it first: gain by |gain|, rms or peak; offset by
    |offset|, rms or peak. A device's own noise adds to rms and peak, so a
    noisy device is rejected at about these or smaller."""

    gain: float
    offset: float

    @classmethod
    def of(cls, tolerance, ref_rms: float, ref_peak: float) -> "Resolution":
        def rel(x: float, scale: float) -> float:
            return x / scale if scale > 0 else math.inf
        return cls(min(tolerance.gain, rel(tolerance.rms, ref_rms), rel(tolerance.peak, ref_peak)),
                   rel(min(tolerance.offset, tolerance.rms, tolerance.peak), ref_rms))


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
    floor_sources: dict[str, str] | None = None  # statistic -> tolerance.MINIMUM / STANDARD_ERROR / a run's label
    closest_run: str | None = None  # the calibration run whose error is nearest the device's (rms of the difference)
    resolution: Resolution | None = None  # None where no calibration run gives a floor

    @property
    def floor_source(self) -> str | None:
        """The term that set the binding statistic's floor."""
        b = self.verdict.binding
        return None if self.floor_sources is None or b is None else self.floor_sources[b]

    def to_dict(self) -> dict:
        v = self.verdict
        out = {"name": self.name, "mode": self.mode, "stage": self.stage, "step": self.step,
               "module_path": self.module_path, "passed": v.passed, "k_needed": v.k_needed,
               "failed": list(v.failed), "stats": asdict(v.stats), "floor": asdict(v.floor),
               "tolerance": asdict(v.tolerance), "binding": v.binding, "floor_source": self.floor_source,
               "floor_sources": self.floor_sources, "closest_run": self.closest_run,
               "resolution": None if self.resolution is None else asdict(self.resolution), "compare": self.compare}
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
    explanation: Explanation
    exact_checks: list[dict] = field(default_factory=list)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # for the report: reference, device (decoder output)
    deployment_cost: dict = field(default_factory=dict)
    unknown_intermediates: list[str] = field(default_factory=list)
    not_observable: list[str] = field(default_factory=list)
    calibration_overflows: list[dict] = field(default_factory=list)
    hint: str | None = None  # an explanation of the first failure that an exact check found
    # A calibration overflow the first failure may come from (explain.possible_overflow): a device computing as
    # declared can fail there too, so the failure may be the deployment's fp16 headroom rather than the device.
    overflow_before_failure: dict | None = None
    declaration_cost: dict | None = None  # what an f16 declaration costs (declaration_cost.f16_declaration_cost)

    @property
    def cost_gate_failed(self) -> bool:
        return not self.deployment_cost.get("gate", {}).get("passed", True)

    @property
    def resolution(self) -> dict | None:
        return self.explanation.resolution

    def to_dict(self) -> dict:
        first = self.first_failure
        return {
            "certificate": CERTIFICATE, "version": CERTIFICATE_VERSION,
            "verdict": "certified" if self.certified else "not certified",
            "first_failure": None if first is None else {
                "tensor": first.name, "mode": first.mode, "stage": first.stage, "step": first.step,
                "module_path": first.module_path, "failed": list(first.verdict.failed),
                "k_needed": json_safe(first.verdict.k_needed), "floor_source": first.floor_source,
                "closest_run": first.closest_run},
            "explanation": self.explanation.to_dict(),
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
