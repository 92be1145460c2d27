"""``refsd-validate certify``: judge a device capture against the reference.

    refsd-validate certify BUNDLE --model DIR [--mode free|teacher|both] --out DIR [--cache DIR] [--k K]

1. Read the bundle strictly (``reader.py``); its model sha256 must be the
   folder's (else it was captured from another model: bad input, exit 2).
2. Rerun the f32 reference on the bundle's token ids and initial latents,
   free-running and/or teacher-forced (``certify_rerun.py``, cached).
3. Calibrate each tensor's noise floor from the reference's own calibration
   variants for the declared delegate precision (``tolerance.py``): free-running
   variants against the f32 run; teacher-forced variants fed the f32 run's own
   trajectory (so the floor is one step's error, as the device's is).
4. Judge every boundary tensor, and every intermediate the bundle has, in
   execution order; the first failing tensor (teacher-forced first: it is the
   step's own error) is the localization: stage, step, module path.
5. Write ``certificate.json``, ``report.html`` and Model Explorer node data.

Exit 0 certified, 1 not certified, 2 bad input.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from refsd import __version__
from refsd.safe_io import read_json
from refsd_validate.bundle import model_sha256
from refsd_validate.certify_cli import MODES, default_cache_dir
from refsd_validate.certify_rerun import CACHE_BUDGET_BYTES, code_fingerprint, rerun, teacher_inputs
from refsd_validate.compare import json_safe, compare
from refsd_validate.reader import Bundle, BundleError, ModelGeometry, read_bundle
from refsd_validate.tolerance import K, REFERENCE, SYSTEMATIC, Verdict, calibration_variants, judge, noise_floor, \
    unit_roundoff

CERTIFICATE = "refsd-certificate"
CERTIFICATE_VERSION = 1
_NAME = re.compile(r"^(?P<stage>[a-z_]+)/(?:step_(?P<step>\d+)/)?(?P<rest>.+)$")
_BOUNDARY_LEAVES = ("hidden_states", "noise_pred", "latents", "image", "timesteps", "latents_init", "token_ids")


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
            "rule": self.rule, "provenance": self.provenance, "request": self.request,
            "tensors": [r.to_dict() for r in self.results],
        }


def parse_name(name: str) -> tuple[str, int | None, str | None]:
    """``unet/step_3/unet.mid_block`` -> ("unet", 3, "unet.mid_block"); boundary tensors have no module path."""
    m = _NAME.match(name)
    stage, step, rest = m["stage"], m["step"], m["rest"]
    return stage, None if step is None else int(step), None if rest in _BOUNDARY_LEAVES else rest


def certify(bundle_path: str | Path, model_dir: str | Path, *, mode: str = "both",
            cache_dir: str | Path | None = None, k: float = K,
            cache_budget: int = CACHE_BUDGET_BYTES) -> Certificate:
    """Judge a bundle (see the module docstring). Raises ``BundleError`` for bad input."""
    if mode not in MODES:
        raise BundleError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not k > 0:
        raise BundleError(f"k must be > 0, got {k!r}")
    model_dir = Path(model_dir)
    if not os.path.lexists(model_dir / "model_index.json"):  # a FIFO or directory there is refused when read
        raise BundleError(f"{model_dir}: not a diffusers model folder (no model_index.json)")
    geometry = ModelGeometry.from_dir(model_dir)
    bundle = read_bundle(bundle_path, geometry)
    model_sha = model_sha256(model_dir)
    if bundle.capture["model"]["sha256"] != model_sha:
        raise BundleError(f"bundle was captured from model sha256 {bundle.capture['model']['sha256'][:16]}..., "
                          f"but {model_dir} is {model_sha[:16]}...: not the same model")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    req = bundle.request
    delegate = bundle.capture["runtime"]["delegate"]
    variants = calibration_variants(delegate["precision"], delegate.get("ftz"))
    wanted = frozenset(bundle.intermediates)

    def run(variant, teacher=None):
        return rerun(model_dir, model_sha, variant, req, bundle.tensors["inputs/token_ids"],
                     bundle.tensors["scheduler/latents_init"], teacher=teacher, intermediates=wanted, cache_dir=cache,
                     cache_budget=cache_budget)

    ref = run(REFERENCE)
    order = [n for n in ref if n in bundle.capture["tensors"] and n != "scheduler/timesteps"]
    missing = sorted(wanted - set(ref))
    if missing:
        raise BundleError(f"intermediates the reference does not produce ({len(missing)}): {', '.join(missing[:5])}")
    for n in order:
        shape = tuple(bundle.capture["tensors"][n]["shape"])
        # An export may compute a batch-invariant tensor once (the time embedding of one timestep, shape (1, C),
        # where the reference has (2, C)): a shape that broadcasts to the reference's is compared broadcast.
        if shape != ref[n].shape and not _broadcasts(shape, ref[n].shape):
            raise BundleError(f"tensor {n}: shape {shape}, the reference's is {ref[n].shape}")

    def device(n):
        return np.broadcast_to(bundle.tensor(n), ref[n].shape)

    modes = ("free", "teacher") if mode == "both" else (mode,)
    results: list[TensorResult] = []
    for m in modes:
        if m == "free":
            calib = [run(v) for v in variants]
            expected = ref
        else:
            calib = [run(v, teacher_inputs(ref, req["steps"])) for v in variants]
            expected = run(REFERENCE, teacher_inputs(bundle.tensors, req["steps"]))
        for n in order:
            floor = noise_floor(ref[n], [(c[n], v.scale) for c, v in zip(calib, variants)], delegate["precision"])
            results.append(_judge(n, m, expected[n], device(n), floor, k))

    exact = _exact_checks(bundle, ref, model_dir)
    failures = [r for r in results if not r.verdict.passed]
    # Teacher-forced failures localize better: they are the step's own error, not inherited drift.
    by_mode = {m: next((r for r in failures if r.mode == m), None) for m in modes}
    first = by_mode.get("teacher") or by_mode.get("free")
    certified = not failures and all(c["passed"] for c in exact)
    rule = {
        "k": k,
        "statement": "a tensor passes iff it is finite where the reference is and each of peak = max|e|, rms(e), "
                     "|offset| and |gain| of the least-squares fit e ~ offset + gain * reference (e = device - "
                     "reference) is <= k * its noise floor. The floor of each statistic is the largest spread of the "
                     "calibration variants around the f32 reference on this request (times the variant's scale), at "
                     "least one unit roundoff u of the declared storage precision at the tensor's scale (peak: "
                     f"u max|ref|, rms: u rms(ref)), {SYSTEMATIC} unit roundoffs of the arithmetic precision for offset "
                     "and gain, and one standard error of the fit under noise of the rms floor",
        "declared_precision": delegate["precision"], "declared_ftz": delegate.get("ftz"),
        "unit_roundoff": unit_roundoff(delegate["precision"]),
        "calibration_variants": [v.label for v in variants],
        "reference": REFERENCE.label,
        "teacher_forced_floor": "calibration variants fed the f32 reference's own trajectory (one step's error)",
        "localization": "first failing tensor in execution order, teacher-forced mode first",
    }
    provenance = {
        "bundle": str(bundle.source), "bundle_sha256": bundle.sha256, "model_dir": str(model_dir),
        "model_sha256": model_sha, "refsd_version": __version__,
        "reference_code_sha256": code_fingerprint(), "reference_precision": REFERENCE.label,
        "modes": list(modes), "device": bundle.capture["device"], "runtime": bundle.capture["runtime"],
        "capture_created": bundle.capture["created"], "capture_tool": bundle.capture.get("tool"),
        "certified_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    images = {"reference": ref["vae/image"][0], "device": np.asarray(bundle.tensors["vae/image"][0], np.float32)}
    return Certificate(certified, first, results, rule, provenance, dict(req), exact, images)


def _broadcasts(shape: tuple, to: tuple) -> bool:
    try:
        return np.broadcast_shapes(shape, to) == to
    except ValueError:
        return False


def _judge(name: str, mode: str, ref: np.ndarray, test: np.ndarray, floor, k: float) -> TensorResult:
    stage, step, path = parse_name(name)
    verdict = judge(ref, test, floor, k)
    summary = None
    if path is None:  # boundary tensors also get Polygraphy's view (intermediates: too many for its medians)
        c = compare(ref, np.asarray(test, np.float32), atol=k * floor.peak, rtol=0.0, check_mode="max", name=name)
        summary = {key: c.to_dict()[key] for key in ("passed", "atol", "atol_alone", "nonfinite_mismatches",
                                                     "cosine", "max_ulp_f16", "mean_ulp_f16")}
    psnr = None
    if name == "vae/image":  # PSNR of the [0, 1] images a user sees
        from refsd_validate.compare import psnr as _psnr  # noqa: PLC0415

        psnr = _psnr(_to_image(ref), _to_image(test))
    return TensorResult(name, mode, stage, step, path, verdict, summary, psnr)


def _to_image(decoded: np.ndarray) -> np.ndarray:
    from refsd.pipeline import to_image  # noqa: PLC0415

    return to_image(np.asarray(decoded, np.float32))


def _exact_checks(bundle: Bundle, ref: dict, model_dir: Path) -> list[dict]:
    """Integer tensors must match exactly: the timesteps the device ran, and its
    tokenization of the prompts (the rerun uses the device's ids either way)."""
    from refsd.weights import load_tokenizer  # noqa: PLC0415

    checks = []
    if "scheduler/timesteps" in bundle.tensors:
        dev, want = bundle.tensors["scheduler/timesteps"], ref["scheduler/timesteps"]
        bad = np.flatnonzero(dev.astype(np.int64) != want.astype(np.int64))
        checks.append({"tensor": "scheduler/timesteps", "passed": not bad.size,
                       "detail": "as the reference scheduler" if not bad.size else
                       f"step {int(bad[0])}: device ran t={int(dev[bad[0]])}, reference t={int(want[bad[0]])}"})
    tok = load_tokenizer(model_dir / "tokenizer")
    req = bundle.request
    want = np.asarray([tok(t, padding="max_length", max_length=77, truncation=True)["input_ids"]
                       for t in (req["negative_prompt"], req["prompt"])], np.int64)
    dev = bundle.tensors["inputs/token_ids"].astype(np.int64)
    rows = [i for i in range(2) if not np.array_equal(dev[i], want[i])]
    checks.append({"tensor": "inputs/token_ids", "passed": not rows,
                   "detail": "the reference tokenizer's ids for [negative_prompt, prompt]" if not rows else
                   f"row {rows[0]} ({'negative_prompt' if rows[0] == 0 else 'prompt'}) differs from the reference "
                   "tokenizer's ids"})
    return checks


def tflite_tensor_names(tflite_dir: str | Path) -> dict[str, dict[str, str]]:
    """Stage -> module path -> TFLite tensor name, from an export's ``refsd_export.json``."""
    path = Path(tflite_dir) / "refsd_export.json"
    if not os.path.lexists(path):
        raise BundleError(f"{path}: missing (--tflite must be the export folder)")
    doc = read_json(path, error=BundleError)  # never blocks on a FIFO; nesting and numbers checked
    try:
        return {stage: {p: t["tensor"] for p, t in c["tensors"].items()} for stage, c in doc["components"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"{path}: not an export manifest ({' '.join(str(e).split())})") from None


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

