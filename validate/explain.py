"""Why a certificate says what it says, worded once: the judge builds an
``Explanation`` (``explain``) and every reader renders its lines as they are:
``refsd-validate certify``'s terminal lines, report.html, fleet.json and
fleet.html.

Its lines, in order: the verdict; a calibration run's fp16 overflow, where it
may be the cause (:func:`possible_overflow`); the first failure and the
narrowest pass, each with the term that set the binding floor, the k it
needed and the calibration run whose error came nearest the device's; what
was not checked or judged; the resolution (the smallest gain and offset error
rejected, worst over the UNet outputs and over the intermediates); the
deployment's cost."""

from __future__ import annotations

import math
from dataclasses import dataclass

from refsd_validate.declarations import declared_stage
from refsd_validate.tolerance import MINIMUM, STANDARD_ERROR

from refsd.trace import position

# Line kinds a terminal indents under the verdict: details of it.
DETAIL_KINDS = frozenset({"possible_cause", "first_failure", "narrowest_pass", "not_checked", "not_judged",
                          "declaration_cost"})
WEAK_GAIN = 0.01  # a certificate that cannot see a 1 % gain error at some step says so


@dataclass(frozen=True)
class Line:
    kind: str  # verdict | possible_cause | first_failure | narrowest_pass | not_checked | not_judged | resolution |
    #            declaration_cost | cost
    text: str
    facts: dict

    def to_dict(self) -> dict:
        return {"kind": self.kind, "text": self.text, **self.facts}


@dataclass(frozen=True)
class Explanation:
    lines: tuple[Line, ...]
    resolution: dict | None  # the worst resolution (certificate.json "resolution")

    def line(self, kind: str) -> Line | None:
        return next((ln for ln in self.lines if ln.kind == kind), None)

    def to_dict(self) -> dict:
        return {"lines": [ln.to_dict() for ln in self.lines], "resolution": self.resolution}


def source_words(source: str | None) -> str:
    """How a floor source (``tolerance.explained_noise_floor``) reads in a sentence."""
    if source is None:
        return "no floor"
    if source == MINIMUM:
        return "the minimum floor"
    if source == STANDARD_ERROR:
        return "the fit's standard error"
    return f"calibration run '{source}'"


def tensor_facts(r) -> dict:
    """What a judged tensor's explanation line states, as data."""
    v = r.verdict
    b = v.binding
    return {"tensor": r.name, "mode": r.mode, "stage": r.stage, "step": r.step, "module_path": r.module_path,
            "failed": list(v.failed), "k_needed": v.k_needed, "binding": b,
            "value": None if b is None else v.stats.get(b), "floor": None if b is None else v.floor.get(b),
            "floor_source": r.floor_source, "closest_run": r.closest_run}


def tensor_sentence(r) -> str:
    """``NAME (MODE): needs k K on STAT (VALUE against a floor of F, set by SOURCE); nearest calibration run: RUN``."""
    v = r.verdict
    if "calibration_overflow" in v.failed:
        return f"{r.name} ({r.mode}): no floor: every calibration run is non-finite here"
    if v.binding is None:
        return f"{r.name} ({r.mode}): non-finite where the reference is finite"
    b = v.binding
    out = (f"{r.name} ({r.mode}): needs k {_g(v.k_needed)} on {b} ({_g(v.stats.get(b))} against a floor of "
           f"{_g(v.floor.get(b))}, set by {source_words(r.floor_source)})")
    return out + (f"; nearest calibration run: {r.closest_run}" if r.closest_run else "")


def possible_overflow(first, overflows: list[dict], order: list[str], device_nonfinite_from: int | None) -> dict | None:
    """The calibration run's overflow to name as a possible cause of ``first``,
    or None: then the first failure stands unqualified. A run's overflow is
    named only when the device itself is non-finite at or before the failure
    (in execution order), or when the overflow is on the failing tensor's own
    path:

    * free-running, every tensor feeds every later one (the latents carry each
      step into the next, the hidden states feed every step): the overflow's
      first affected tensor is at or before the failure;
    * teacher-forced, each stage call is fed the reference's inputs, so only
      its own step counts: the overflow is in the same stage call (text
      encoder; one denoising step's UNet, guidance and scheduler; decoder),
      and its first affected tensor is at or before the failure (the failing
      tensor is the overflowing module, inside it, or computed after it began).
    """
    if first is None:
        return None
    at = order.index(first.name)
    same_mode = [o for o in overflows if o["mode"] == first.mode and order.index(o["first_affected_tensor"]) <= at]
    if device_nonfinite_from is not None and device_nonfinite_from <= at:
        return next(iter(same_mode), None)
    if first.mode == "free":
        return next(iter(same_mode), None)
    here = position(first.name)
    return next((o for o in same_mode if position(o["first_affected_tensor"]) == here), None)


def _overflow_line(o: dict, first) -> Line:
    where = f"{o['op']} (stage {o['stage']}, step {o['step']})" if o["op"] else o["detail"]
    if "calibration_overflow" in first.verdict.failed:
        text = (f"the declared precision overflows here: calibration variant {o['variant']} first at {where}; "
                "a finite device did not compute as declared")
    else:
        text = (f"the deployment overflows fp16 before this tensor in calibration variant {o['variant']}, first at "
                f"{where}: a device computing as declared can fail here too, so this may be the model's fp16 "
                "headroom, not the device ('refsd fp16-check' shows the op)")
    return Line("possible_cause", text, {"overflow": o})


def resolution(results) -> dict | None:
    """The worst (largest) resolution over the UNet's outputs (teacher-forced
    where judged so) and over the intermediates, and the UNet output's best step."""
    modes = {r.mode for r in results}
    mode = "teacher" if "teacher" in modes else "free"
    mine = [r for r in results if r.mode == mode and r.resolution is not None]
    unet = [r for r in mine if r.stage == "unet" and r.module_path is None]
    inner = [r for r in mine if r.module_path is not None]
    if not unet:
        return None
    out = {"tensor": "unet noise prediction", "mode": mode,
           "gain_every_step": max(r.resolution.gain for r in unet),
           "gain_best_step": min(r.resolution.gain for r in unet),
           "offset_every_step": max(r.resolution.offset for r in unet), "intermediates": None}
    if inner:
        g = max(inner, key=lambda r: r.resolution.gain)
        o = max(inner, key=lambda r: r.resolution.offset)
        out["intermediates"] = {"gain": g.resolution.gain, "gain_tensor": g.name,
                                "offset": o.resolution.offset, "offset_tensor": o.name, "count": len(inner)}
    return out


def _resolution_lines(res: dict | None) -> list[Line]:
    if res is None:
        return []
    weak = f" (weak: a {WEAK_GAIN:.0%} gain error at one step can pass)" if res["gain_every_step"] > WEAK_GAIN else ""
    lines = [Line("resolution", f"resolution: a gain error on the UNet output is rejected above "
                  f"{_pct(res['gain_every_step'])} at any step, above {_pct(res['gain_best_step'])} at the "
                  f"best-resolved step; an offset above {_pct(res['offset_every_step'])} of its rms at any step{weak}",
                  {"over": "unet_outputs"})]
    inner = res["intermediates"]
    if inner:
        lines.append(Line("resolution", f"resolution over {inner['count']} intermediates: a gain error is rejected "
                          f"above {_pct(inner['gain'])} at every one (weakest {inner['gain_tensor']}), an offset "
                          f"above {_pct(inner['offset'])} of its rms (weakest {inner['offset_tensor']})",
                          {"over": "intermediates"}))
    return lines


def explain(*, certified: bool, k: float, results: list, first, exact_checks: list[dict], hint: str | None,
            overflows: list[dict], order: list[str], device_nonfinite_from: int | None, unknown: list[str],
            not_observable: list[str], cost: dict, declaration_cost: dict | None = None) -> Explanation:
    """The certificate's explanation (see the module docstring)."""
    lines = []
    exact_bad = [c for c in exact_checks if not c["passed"]]
    if certified:
        lines.append(Line("verdict", f"CERTIFIED: every tensor within k={k:g} noise floors ({len(results)} checks)",
                          {"certified": True}))
    elif exact_bad:  # a wrong token id or timestep explains every numeric failure after it
        c = exact_bad[0]
        lines.append(Line("verdict", f"NOT CERTIFIED: {c['tensor']}: {c['detail']}",
                          {"certified": False, "exact_check": c["tensor"]}))
    elif hint:
        lines.append(Line("verdict", f"NOT CERTIFIED: {hint}", {"certified": False, "hint": True}))
    else:
        f = first
        where = (f"{f.name} ({f.mode}; stage {declared_stage(f.stage)}" + (f", step {f.step}" if f.step is not None else "")
                 + (f", module {f.module_path}" if f.module_path else "") + f"): {', '.join(f.verdict.failed)}, "
                 f"needs k={_g(f.verdict.k_needed)}")
        lines.append(Line("verdict", f"NOT CERTIFIED: first failing tensor {where}", {"certified": False}))
    o = possible_overflow(first, overflows, order, device_nonfinite_from)
    if o is not None:
        lines.append(_overflow_line(o, first))
    if first is not None:
        lines.append(Line("first_failure", "first failure " + tensor_sentence(first), tensor_facts(first)))
    passed = [r for r in results if r.verdict.passed and math.isfinite(r.verdict.k_needed)]
    if passed:
        narrow = max(passed, key=lambda r: r.verdict.k_needed)
        lines.append(Line("narrowest_pass", f"narrowest pass (bar k={k:g}) " + tensor_sentence(narrow),
                          tensor_facts(narrow)))
    for c in exact_checks:
        if not c.get("checked", True):
            lines.append(Line("not_checked", f"{c['tensor']}: {c['detail']}", {"tensor": c["tensor"]}))
    if unknown:
        lines.append(Line("not_judged", f"{len(unknown)} intermediates not judged (the reference does not record "
                          "them; see certificate.json not_judged, 'refsd-validate names')", {"count": len(unknown)}))
    if not_observable:
        lines.append(Line("not_judged", f"{len(not_observable)} intermediates not judged (not observable on this "
                          "device)", {"count": len(not_observable)}))
    res = resolution(results)
    lines += _resolution_lines(res)
    if declaration_cost is not None:
        lines.append(Line("declaration_cost", declaration_cost["statement"], {}))
    if cost:
        gate = cost.get("gate")
        verdict = "" if gate is None else (" (within" if gate["passed"] else " (FAILS") + \
            f" --max-deployment-cost {gate['kind']}:{gate['limit']:g})"
        lines.append(Line("cost", f"deployment cost ({cost['deployment']} vs {cost['original']}): image PSNR "
                          f"{cost['image_psnr_db']:.1f} dB, worst relative error {cost['worst_rel_peak']:.3g}"
                          f" at {cost['worst_tensor']}{verdict}", {}))
    return Explanation(tuple(lines), res)


def _g(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else ("inf" if v > 0 else "nan")


def _pct(v: float) -> str:
    """A fraction as a percentage to 3 significant digits (an f32 certificate resolves 1e-5 gains)."""
    return f"{100 * v:.3g} %" if math.isfinite(v) else "inf"
