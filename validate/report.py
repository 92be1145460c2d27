"""What a person reads: ``report.html`` (one self-contained file: images as
base64 PNG from ``refsd.image``, plots as inline SVG, no script, no network;
the page is ``templates/report.html``, a ``string.Template`` filled here) and
Model Explorer node data.

The report shows the verdict and the first failing tensor; the reference and
device images side by side with the amplified difference (``refsd.image.
side_by_side``: NaN/inf pixels magenta); each step's error in noise floors
(``k_needed``, log scale, the bar at k); the worst tensors; the rule and
provenance.

Model Explorer (google-ai-edge/model-explorer, ``node_data_builder.py``) node
data: one ``GraphNodeData`` JSON per stage, ``{"results": {key: {"value": v}},
"gradient": [...]}``, to load in its side panel over that stage's .tflite
graph. Keys are the TFLite output tensor names when the export's
``refsd_export.json`` is given (``certify --tflite DIR``), else module paths.
The value is the worst ``k_needed`` over steps (teacher-forced when run):
below 1 the node is within its noise floor, above k it fails; a NaN is
reported as 1e30, never dropped.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import string
from pathlib import Path

import numpy as np

from refsd_validate.explain import source_words

from refsd.image import encode_png, side_by_side, to_image
from refsd.trace import leaf

NAN_VALUE = 1e30  # Model Explorer values must be numbers: a non-finite error shows as the worst there is
TEMPLATE = Path(__file__).with_name("templates") / "report.html"  # string.Template: $name fields, $$ a dollar


@functools.cache
def _template() -> string.Template:
    return string.Template(TEMPLATE.read_text(encoding="utf-8"))


def render_report(cert) -> str:
    verdict = ("<span class='verdict ok'>CERTIFIED</span>" if cert.certified
               else "<span class='verdict bad'>NOT CERTIFIED</span>")
    where = "".join(f"<p class='why {ln.kind}'>{_e(ln.text)}</p>" for ln in cert.explanation.lines
                    if ln.kind not in ("cost",))
    prov, dev = cert.provenance, cert.provenance["device"]
    rule = cert.rule
    fields = {
        "verdict": verdict,
        "where": where,
        "device": f"{_e(dev['name'])} &middot; SoC {_e(dev.get('soc'))} &middot; GPU {_e(dev.get('gpu'))} "
                  f"&middot; {_e(prov['runtime']['name'])} {_e(prov['runtime']['version'])} &middot; request: "
                  f"&ldquo;{_e(cert.request['prompt'])}&rdquo;, {cert.request['steps']} steps "
                  f"{_e(cert.request['scheduler'])}, {cert.request['width']}x{cert.request['height']}, "
                  f"seed {cert.request['seed']}",
        "images": _images(cert),
        "stages": _stages_table(rule["stages"]),
        "cost": _cost(cert),
        "not_judged": _not_judged(cert),
        "k": f"{rule['k']:g}",
        "plot": _plot(cert),
        "per_step": _per_step(cert),
        "worst": _table(sorted(cert.results, key=lambda r: -_finite(r.verdict.k_needed))[:15], cert),
        "statement": _e(rule["statement"]),
        "rule": f"k = {rule['k']:g}; calibration variants ({_e(rule['calibration_design'])}): "
                f"{_e(', '.join(rule['calibration_variants']))}; "
                f"reference {_e(rule['reference'])}; unit roundoff u per stage: "
                f"{_e(', '.join(f'{k} {v:.3g}' for k, v in rule['unit_roundoff'].items()))}. "
                f"{_e(rule['localization'])}.",
        "provenance": "\n".join(f"<tr><th class='l'>{_e(k)}</th><td class='l'>{_e(v)}</td></tr>"
                                for k, v in prov.items() if k not in ("device", "runtime")),
        "boundary": _table([r for r in cert.results if r.module_path is None], cert),
    }
    return _template().substitute(fields).rstrip("\n")


def _stages_table(stages: dict) -> str:
    cols = ("processor", "precision", "ftz", "int8_kernels", "fast_math", "fully_accelerated", "runtime")
    head = "<tr><th class='l'>stage</th>" + "".join(f"<th class='l'>{c}</th>" for c in cols) + "</tr>"
    rows = "".join(f"<tr><td class='l'>{_e(name)}</td>" + "".join(f"<td class='l'>{_e(st.get(c))}</td>" for c in cols)
                   + "</tr>" for name, st in stages.items())
    return f"<table>{head}{rows}</table>"


def _cost(cert) -> str:
    """The deployed model against the original one: not part of the verdict."""
    cost = cert.deployment_cost
    if not cost:
        return "<p class='muted'>not computed</p>"
    gate = cost.get("gate")
    gate_line = "" if gate is None else (f"<p>Gate --max-deployment-cost {gate['kind']}:{gate['limit']:g}: "
                                         f"<b>{'passed' if gate['passed'] else 'FAILED'}</b></p>")
    rows = "".join(f"<tr><td class='l'>{_e(n)}</td><td>{_num(v['rel_peak'])}</td><td>{_num(v['rel_rms'])}</td></tr>"
                   for n, v in cost["tensors"].items())
    return (f"<p>{_e(cost['deployment'])} against {_e(cost['original'])}, both in f32: image PSNR "
            f"<b>{_num(cost['image_psnr_db'])} dB</b>, worst relative error {_num(cost['worst_rel_peak'])} at "
            f"<code>{_e(cost['worst_tensor'])}</code>. This is what the rewrites and weight storage cost; the "
            "device is judged against the deployed model, never against this.</p>" + gate_line +
            "<details><summary>per boundary tensor</summary><table><tr><th class='l'>tensor</th>"
            f"<th>max|e| / max|ref|</th><th>rms(e) / rms(ref)</th></tr>{rows}</table></details>")


def _not_judged(cert) -> str:
    parts = []
    if cert.unknown_intermediates:
        parts.append(f"<p>{len(cert.unknown_intermediates)} intermediates the reference does not record were not "
                     "judged: " + ", ".join(f"<code>{_e(n)}</code>" for n in cert.unknown_intermediates[:50]) + "</p>")
    if cert.not_observable:
        parts.append(f"<p>{len(cert.not_observable)} intermediates are not observable on this device (fused away): "
                     + ", ".join(f"<code>{_e(n)}</code>" for n in cert.not_observable[:50]) + "</p>")
    for c in cert.exact_checks:
        if not c.get("checked", True):
            parts.append(f"<p><code>{_e(c['tensor'])}</code>: {_e(c['detail'])}</p>")
    for o in cert.calibration_overflows:
        parts.append(f"<p>Calibration variant <code>{_e(o['variant'])}</code> ({_e(o['mode'])}) overflows fp16: "
                     f"{_e(o['detail'])} at <code>{_e(o['op'])}</code>, stage {_e(o['stage'])}, step {_e(o['step'])}; "
                     f"it defines no floor from <code>{_e(o['first_affected_tensor'])}</code> on.</p>")
    return "<h2>Not judged, and why</h2>" + "".join(parts) if parts else ""


def _images(cert) -> str:
    ref = to_image(cert.images["reference"])
    dev = cert.images["device"]
    with np.errstate(invalid="ignore"):
        dev_img = np.where(np.isfinite(dev), to_image(np.nan_to_num(dev)), np.nan)  # keep NaN/inf for magenta
    scale = max(1, 256 // ref.shape[1])
    picture, gain = side_by_side(ref, dev_img, scale=scale)
    png = base64.b64encode(encode_png(picture)).decode("ascii")
    image = next((r for r in cert.results if r.name == "vae/image" and r.mode == "free"), None)
    psnr = "" if image is None else f"; PSNR {_num(image.psnr_db)} dB (free-running)"
    return ("<h2>Images</h2><figure><img alt='reference | device | difference' "
            f"src='data:image/png;base64,{png}'><figcaption>reference (f32) | device | |difference| amplified "
            f"x{gain:.3g} (black = equal; NaN/inf magenta){psnr}</figcaption></figure>")


def _plot(cert, width: int = 640, height: int = 260) -> str:
    series = {}
    for r in cert.results:
        if r.module_path is None and r.step is not None:
            series.setdefault(f"{r.mode} {leaf(r.name)}", []).append((r.step, r.verdict.k_needed))
    if not series:
        return "<p>(no per-step tensors)</p>"
    k = cert.rule["k"]
    finite = [v for s in series.values() for _, v in s if math.isfinite(v) and v > 0]
    lo = math.floor(math.log10(min(finite + [k / 10])))
    hi = math.ceil(math.log10(max(finite + [k * 10])))
    steps = cert.request["steps"]
    x0, y0, pw, ph = 60, 15, width - 230, height - 50

    def px(step):
        return x0 + (pw * step / max(steps - 1, 1))

    def py(v):
        return y0 if not math.isfinite(v) else y0 + ph * (hi - math.log10(max(v, 10.0**lo))) / (hi - lo)

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-size='11'>",
           f"<rect x='{x0}' y='{y0}' width='{pw}' height='{ph}' fill='none' stroke='#999'/>"]
    for e in range(lo, hi + 1):
        y = py(10.0**e)
        out.append(f"<line x1='{x0}' x2='{x0 + pw}' y1='{y:.1f}' y2='{y:.1f}' stroke='#eee'/>"
                   f"<text x='{x0 - 6}' y='{y + 4:.1f}' text-anchor='end'>1e{e}</text>")
    for s in range(steps):
        out.append(f"<text x='{px(s):.1f}' y='{y0 + ph + 16}' text-anchor='middle'>{s}</text>")
    out.append(f"<text x='{x0 + pw / 2}' y='{height - 4}' text-anchor='middle'>denoising step</text>")
    out.append(f"<line x1='{x0}' x2='{x0 + pw}' y1='{py(k):.1f}' y2='{py(k):.1f}' stroke='#c62828' "
               f"stroke-dasharray='5,4'/><text x='{x0 + pw + 4}' y='{py(k) + 4:.1f}' fill='#c62828'>k={k:g}</text>")
    colors = ["#1565c0", "#6a1b9a", "#ef6c00", "#2e7d32"]
    for i, (label, pts) in enumerate(sorted(series.items())):
        c = colors[i % len(colors)]
        dash = "" if label.startswith("teacher") else " stroke-dasharray='2,2'"
        path = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in pts)
        out.append(f"<polyline points='{path}' fill='none' stroke='{c}' stroke-width='1.6'{dash}/>")
        for s, v in pts:
            mark = "&#215;" if not math.isfinite(v) else "&#9679;"
            out.append(f"<text x='{px(s):.1f}' y='{py(v) + 4:.1f}' fill='{c}' text-anchor='middle'>{mark}</text>")
        ly = y0 + 14 + 16 * i
        out.append(f"<line x1='{x0 + pw + 40}' x2='{x0 + pw + 60}' y1='{ly - 4}' y2='{ly - 4}' stroke='{c}' "
                   f"stroke-width='2'{dash}/><text x='{x0 + pw + 64}' y='{ly}'>{_e(label)}</text>")
    out.append("</svg>")
    return "".join(out)


def _table(results, cert) -> str:
    rows = ["<table><tr><th class='l'>tensor</th><th>mode</th><th>pass</th><th>k needed</th><th>failed</th>"
            "<th>peak / floor</th><th>rms / floor</th><th>gain / floor</th><th class='l'>floor set by</th>"
            "<th class='l'>nearest calibration run</th><th>resolution: gain</th><th>offset</th>"
            "<th>cosine</th><th>max fp16 ULP</th></tr>"]
    for r in results:
        v = r.verdict
        rows.append(f"<tr class='{'' if v.passed else 'fail'}'><td class='l'>{_e(r.name)}</td><td>{r.mode}</td>"
                    f"<td>{'yes' if v.passed else 'NO'}</td><td>{_num(v.k_needed)}</td>"
                    f"<td>{_e(', '.join(v.failed))}</td>"
                    + "".join(f"<td>{_num(v.stats.get(s))} / {_num(v.floor.get(s))}</td>" for s in ("peak", "rms", "gain"))
                    + f"<td class='l'>{_e(v.binding)}: {_e(source_words(r.floor_source))}</td>"
                    + f"<td class='l'>{_e(r.closest_run)}</td>"
                    + "".join(f"<td>{_pct(None if r.resolution is None else getattr(r.resolution, a))}</td>"
                              for a in ("gain", "offset"))
                    + "".join(f"<td>{_num((r.compare or {}).get(key))}</td>" for key in ("cosine", "max_ulp_f16"))
                    + "</tr>")
    rows.append("</table>")
    return "".join(rows)


def _per_step(cert) -> str:
    """Per step, the UNet output's error (k needed) beside its resolution: what the check could not have seen."""
    rows = {}
    for r in cert.results:
        if r.stage == "unet" and r.module_path is None and r.step is not None:
            rows.setdefault(r.step, {})[r.mode] = r
    if not rows:
        return ""
    modes = [m for m in ("teacher", "free") if any(m in v for v in rows.values())]
    head = "<tr><th>step</th>" + "".join(f"<th>{m}: k needed</th><th>{m}: gain resolution</th>"
                                          f"<th>{m}: offset resolution</th>" for m in modes) + "</tr>"
    body = []
    for step in sorted(rows):
        cells = []
        for m in modes:
            r = rows[step].get(m)
            res = None if r is None else r.resolution
            cells.append(f"<td>{_num(None if r is None else r.verdict.k_needed)}</td>"
                         f"<td>{_pct(None if res is None else res.gain)}</td>"
                         f"<td>{_pct(None if res is None else res.offset)}</td>")
        body.append(f"<tr><td>{step}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def model_explorer_node_data(cert, tflite_names: dict[str, dict[str, str]] | None = None) -> dict[str, dict]:
    """Stage -> Model Explorer ``GraphNodeData`` of the worst ``k_needed`` per
    module. Keys are module paths, or with ``tflite_names`` (stage -> module
    path -> TFLite tensor name, from the export's ``refsd_export.json``) the
    TFLite output tensor names Model Explorer matches nodes by. A stage's
    boundary output counts as its root module (``unet/step_i/noise_pred`` is
    module ``unet``)."""
    mode = "teacher" if any(r.mode == "teacher" for r in cert.results) else "free"
    worst: dict[str, dict[str, float]] = {}
    for r in cert.results:
        if r.mode != mode or r.stage == "scheduler":
            continue
        path = r.module_path or r.stage
        v = r.verdict.k_needed
        v = NAN_VALUE if not math.isfinite(v) else v
        stage = worst.setdefault(r.stage, {})
        stage[path] = max(stage.get(path, 0.0), v)
    gradient = [{"stop": 0.0, "bgColor": "#c8e6c9"}, {"stop": 0.5, "bgColor": "#fff59d"},
                {"stop": 1.0, "bgColor": "#ef9a9a"}]
    out = {}
    for stage, values in worst.items():
        names = (tflite_names or {}).get(stage)
        if names is not None:  # modules the converter folded away have no tensor to colour
            values = {names[p]: v for p, v in values.items() if p in names}
        out[stage] = {"results": {k: {"value": v} for k, v in sorted(values.items())}, "gradient": gradient}
    return out


def _finite(v: float) -> float:
    return math.inf if not math.isfinite(v) else v


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return f"{v:.3g}"


def _pct(v) -> str:
    return "-" if v is None else (f"{100 * v:.3g} %" if math.isfinite(v) else "inf")


def _e(v) -> str:
    return html.escape("-" if v is None else (v if isinstance(v, str) else json.dumps(v)), quote=True)
