"""The judge: a plan's reruns in, its certificate out. Every boundary tensor
and every intermediate the reference also records is judged in execution
order against ``k`` times its noise floor (``tolerance``), free-running and
teacher-forced; a calibration run that overflowed fp16 gives no floor from
there on (``_cut``); the first failure (teacher-forced first) is the
localization; the integer tensors are checked exactly; the explanation is
built once, here (``explain.explain``)."""

from __future__ import annotations

import math
from dataclasses import asdict
from datetime import datetime, timezone

import numpy as np
from refsd_validate.bundle import BundleError
from refsd_validate.certificate import Certificate, Resolution, TensorResult
from refsd_validate.certify_rerun import (
    ORIGINAL_DEPLOYMENT,
    CacheStats,
    Deployment,
    code_fingerprint,
    first_severe_event,
)
from refsd_validate.compare import compare, psnr
from refsd_validate.declaration_cost import f16_declaration_cost
from refsd_validate.declarations import declaration_checks
from refsd_validate.explain import explain, resolution
from refsd_validate.plan import Plan
from refsd_validate.rerun_cache import cache_bytes
from refsd_validate.tolerance import (
    REFERENCE_RUN,
    Verdict,
    error_stats,
    explained_noise_floor,
    judge,
    minimum_floor,
    rule_statement,
    standard_error_scale,
    unit_roundoff,
)

from refsd import __version__, kernels
from refsd import trace
from refsd.image import to_image
from refsd.trace import parse_name, position
from refsd.weights import load_scheduler_config


def judge_certificate(plan: Plan, traces: dict[tuple[str, int], dict],
                      cache_stats: CacheStats | None = None) -> Certificate:
    """The certificate from the reruns of ``plan.jobs()`` (keyed (role, index))."""
    bundle, k, deployment, variants, stages = plan.bundle, plan.k, plan.deployment, plan.variants, plan.bundle.stages
    req, cache = bundle.request, plan.cache
    cache_stats = cache_stats if cache_stats is not None else CacheStats()
    ref = traces["reference", 0]
    check_reference(plan, ref)
    unknown = sorted(plan.asked - set(ref))
    order = [n for n in ref if n in bundle.capture["tensors"] and n != trace.TIMESTEPS]

    def device(n):
        return np.broadcast_to(bundle.tensor(n), ref[n].shape)

    modes = plan.modes
    checks = 2 * len(order) * len(modes)  # an offset and a gain per judged tensor
    se_scale = standard_error_scale(checks)
    expected_by_mode: dict[str, dict] = {}
    results: list[TensorResult] = []
    overflows: list[dict] = []
    nonfinite: set[str] = set()  # device tensors holding NaN or inf
    labels = [v.label for v in variants]
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
            test = device(n)
            if not np.isfinite(test).all():
                nonfinite.add(n)
            stage = parse_name(n)[0]
            stage = stage if stage in stages else "guidance_scheduler"  # the declaration's key for scheduler/...
            precision = stages[stage].precision
            usable = [j for j, cut in enumerate(usable_until) if i < cut]
            if not usable:
                results.append(_no_floor(n, m, expected[n], test, precision, stage))
                continue
            runs = [(calib[j][n], variants[j].scale) for j in usable]
            floor, sources = explained_noise_floor(ref[n], runs, precision, se_scale, [labels[j] for j in usable],
                                                   stage=stage)
            result = _judge(n, m, expected[n], test, floor, k)
            result.floor_sources = sources
            result.closest_run = _closest_run(ref[n], expected[n], test, runs, [labels[j] for j in usable])
            r = np.asarray(ref[n], np.float64)
            result.resolution = Resolution.of(result.verdict.tolerance, float(np.sqrt(np.mean(r * r))) if r.size else 0.0,
                                              float(np.abs(r).max(initial=0.0)))
            results.append(result)

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
    original = ref if plan.original_is_reference else traces["original", 0]
    cost = _deployment_cost(ref, original, deployment)
    gate = plan.max_deployment_cost
    if gate is not None:
        cost["gate"] = {"kind": gate.kind, "limit": gate.limit, "passed": gate.passes(cost)}
    rule = {
        "k": k,
        "statement": rule_statement(k, se_scale, checks),
        "stages": {s: asdict(d) for s, d in stages.items()}, "deployment": deployment.label,
        "unit_roundoff": {s: unit_roundoff(d.precision) for s, d in stages.items()},
        "calibration_variants": labels,
        "calibration_design": plan.design,
        "reference": f"{REFERENCE_RUN.label}, {deployment.label}",
        "teacher_forced_floor": "calibration variants fed the reference's own trajectory (one step's error)",
        "localization": "first failing tensor in execution order, teacher-forced mode first",
    }
    provenance = {
        "bundle": str(bundle.source), "bundle_sha256": bundle.sha256, "model_dir": str(plan.model_dir),
        "model_sha256": plan.model_sha, "refsd_version": __version__,
        "reference_code_sha256": code_fingerprint(), "reference_precision": REFERENCE_RUN.label,
        # Not in the rerun cache key: both backends give the same bits (tests/test_kernels.py).
        "kernels": kernels.backend(),
        "modes": list(modes), "device": bundle.capture["device"], "runtime": bundle.capture["runtime"],
        "model": {k_: v for k_, v in bundle.capture["model"].items() if k_ != "sha256"},
        "schema_version": bundle.capture["schema_version"],
        "capture_created": bundle.capture["created"], "capture_tool": bundle.capture.get("tool"),
        "int8_source": None if deployment.int8_source is None else str(deployment.int8_source),
        "rerun_cache": {"dir": str(cache), "budget_bytes": plan.cache_budget,
                        **dict(cache_stats.to_dict(), bytes_after=cache_bytes(cache) if cache.is_dir() else 0)},
        "certified_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    nonfinite_from = next((i for i, n in enumerate(order) if n in nonfinite), None)
    res = resolution(results)
    declared_cost = None if res is None else f16_declaration_cost(
        variants, traces, ref, expected_by_mode[res["mode"]], device, order, cuts[res["mode"]], stages,
        res["mode"], k, se_scale, res["gain_every_step"])
    explanation = explain(certified=certified, k=k, results=results, first=first, exact_checks=exact, hint=hint,
                          overflows=overflows, order=order, device_nonfinite_from=nonfinite_from,
                          unknown=unknown, not_observable=plan.not_observable, cost=cost,
                          declaration_cost=declared_cost)
    images = {"reference": ref[trace.IMAGE][0], "device": np.asarray(bundle.tensors[trace.IMAGE][0], np.float32)}
    return Certificate(certified, first, results, rule, provenance, dict(req), explanation, exact, images,
                       deployment_cost=cost, unknown_intermediates=unknown, not_observable=plan.not_observable,
                       calibration_overflows=overflows, hint=hint, overflow_before_failure=before_first,
                       declaration_cost=declared_cost)


def _closest_run(ref: np.ndarray, expected: np.ndarray, test: np.ndarray, runs: list[tuple[np.ndarray, float]],
                 labels: list[str]) -> str | None:
    """The calibration run whose error (scaled) is nearest the device's, by the
    rms of their difference; None where the device is non-finite."""
    e = np.asarray(test, np.float64) - np.asarray(expected, np.float64)
    if not np.isfinite(e).all():
        return None
    r = np.asarray(ref, np.float64)
    dist = [float(np.sqrt(np.mean((e - scale * (np.asarray(run, np.float64) - r)) ** 2))) if e.size else 0.0
            for run, scale in runs]
    return labels[int(np.argmin(dist))]


def check_reference(plan: Plan, ref: dict) -> None:
    """What the reference itself says about the bundle: finite, every asked
    intermediate known (``strict``), every shape the reference's."""
    _check_reference_finite(ref, plan.deployment)
    unknown = sorted(plan.asked - set(ref))
    if unknown and plan.strict:
        raise BundleError(f"intermediates the reference does not record ({len(unknown)}): {', '.join(unknown[:5])} "
                          "(see 'refsd-validate names'; without --strict they are listed and skipped)")
    for n in ref:
        if n in plan.bundle.capture["tensors"] and n != trace.TIMESTEPS:
            _check_shape(n, tuple(plan.bundle.capture["tensors"][n]["shape"]), ref[n])



def _layout_hint(first: TensorResult, expected: np.ndarray, test: np.ndarray, k: float) -> str | None:
    """A 4-D tensor with C == H == W fails by a mile but would pass read as NCHW: say so."""
    if test.ndim != 4 or not (test.shape[1] == test.shape[2] == test.shape[3]):
        return None
    if judge(expected, np.ascontiguousarray(np.transpose(test, (0, 2, 3, 1))), first.verdict.floor, k).passed:
        return (f"{first.name} passes if read as NCHW: the runtime's activations are NCHW; transpose them to NHWC "
                "(0, 2, 3, 1), or write the bundle with write_bundle(..., layout='NCHW')")
    return None



def _check_reference_finite(ref: dict, deployment: Deployment) -> None:
    bad = next((n for n in ref if n != trace.TIMESTEPS and not np.isfinite(ref[n]).all()), None)
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
        start = trace.stage_position(event["stage"], event["step"])
        cut = min(cut, next((i for i, n in enumerate(order) if position(n) >= start and n not in unaffected),
                            len(order)))
    return cut


def _deployment_cost(deployed: dict, original: dict, deployment: Deployment) -> dict:
    """Deployed reference vs the original fp32 model, per boundary tensor:
    relative peak and rms error (max|e| / max|orig|, rms(e) / rms(orig)), and
    the PSNR of the images a user sees. What the deployment costs, not the device."""
    per = {}
    for n in deployed:
        if n in (trace.TIMESTEPS,) or n not in original or parse_name(n)[2] is not None:
            continue
        o, d = np.asarray(original[n], np.float64), np.asarray(deployed[n], np.float64)
        e = d - o
        scale_peak, scale_rms = float(np.abs(o).max(initial=0.0)), float(np.sqrt(np.mean(o * o)))
        per[n] = {"rel_peak": float(np.abs(e).max(initial=0.0)) / scale_peak if scale_peak else 0.0,
                  "rel_rms": float(np.sqrt(np.mean(e * e))) / scale_rms if scale_rms else 0.0}
    image = psnr(_to_image(original[trace.IMAGE]), _to_image(deployed[trace.IMAGE]))
    return {"deployment": deployment.label, "original": ORIGINAL_DEPLOYMENT.label, "image_psnr_db": image,
            "worst_rel_peak": max((v["rel_peak"] for v in per.values()), default=0.0),
            "worst_tensor": max(per, key=lambda n: per[n]["rel_peak"]) if per else None, "tensors": per}


def _no_floor(name: str, mode: str, ref: np.ndarray, test: np.ndarray, precision: str, stage: str) -> TensorResult:
    """Every calibration variant is non-finite here: the declared precision
    overflows on this request, so a finite device did not compute as declared
    (an fp32 accumulation, say) and a non-finite one cannot be told from a fault."""
    stats, floor = error_stats(ref, test), minimum_floor(ref, precision, stage)
    verdict = Verdict(False, math.inf, ("calibration_overflow",), stats, floor, floor)
    stage, step, path = parse_name(name)
    return TensorResult(name, mode, stage, step, path, verdict, None)



def _judge(name: str, mode: str, ref: np.ndarray, test: np.ndarray, floor, k: float) -> TensorResult:
    stage, step, path = parse_name(name)
    verdict = judge(ref, test, floor, k)
    summary = None
    if path is None:  # boundary tensors also get Polygraphy's view (intermediates: too many for its medians)
        c = compare(ref, np.asarray(test, np.float32), atol=k * floor.peak, rtol=0.0, check_mode="max", name=name)
        summary = {key: c.to_dict()[key] for key in ("passed", "atol", "atol_alone", "nonfinite_mismatches",
                                                     "cosine", "max_ulp_f16", "mean_ulp_f16")}
    image_psnr = None
    if name == trace.IMAGE:  # PSNR of the [0, 1] images a user sees
        image_psnr = psnr(_to_image(ref), _to_image(test))
    return TensorResult(name, mode, stage, step, path, verdict, summary, image_psnr)


def _to_image(decoded: np.ndarray) -> np.ndarray:
    return to_image(np.asarray(decoded, np.float32))


def _exact_checks(bundle: Bundle, ref: dict, model_dir: Path) -> list[dict]:
    """Integer tensors must match exactly: the timesteps the device ran, and its
    tokenization of the prompts (the rerun uses the device's ids either way)."""
    from refsd.weights import load_tokenizer  # noqa: PLC0415

    checks = []
    if trace.TIMESTEPS in bundle.tensors:
        dev, want = bundle.tensors[trace.TIMESTEPS], ref[trace.TIMESTEPS]
        bad = np.flatnonzero(dev.astype(np.int64) != want.astype(np.int64))
        checks.append({"tensor": trace.TIMESTEPS, "passed": not bad.size,
                       "detail": "as the reference scheduler" if not bad.size else
                       f"step {int(bad[0])}: device ran t={int(dev[bad[0]])}, reference t={int(want[bad[0]])}"})
    else:  # optional in a bundle, but a user should know the check did not run
        checks.append({"tensor": trace.TIMESTEPS, "passed": True, "checked": False,
                       "detail": "not checked: the bundle has no scheduler/timesteps"})
    tok = load_tokenizer(model_dir / "tokenizer")
    req = bundle.request
    want = np.asarray([tok(t, padding="max_length", max_length=trace.TOKENS, truncation=True)["input_ids"]
                       for t in (req["negative_prompt"], req["prompt"])], np.int64)
    dev = bundle.tensors[trace.TOKEN_IDS].astype(np.int64)
    rows = [i for i in range(2) if not np.array_equal(dev[i], want[i])]
    swapped = rows == [0, 1] and np.array_equal(dev[::-1], want)
    checks.append({"tensor": trace.TOKEN_IDS, "passed": not rows,
                   "detail": "the reference tokenizer's ids for [negative_prompt, prompt]" if not rows else
                   "rows are [prompt, negative_prompt]: the CFG batch order is [uncond, cond] (negative prompt "
                   "first)" if swapped else
                   f"row {rows[0]} ({'negative_prompt' if rows[0] == 0 else 'prompt'}) differs from the reference "
                   "tokenizer's ids"})
    return checks
