"""Helpers the validator's tests share: run ``certify`` through its CLI, judge
a plan on its own calibration design, and derive a bundle from another by
editing its tensors or its capture.json (a broken capture tool, a faulty
device, a wrong declaration)."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np

from conftest import CERTIFY_INTERMEDIATES, certify_request

from refsd_validate.bundle import write_bundle
from refsd_validate.capture_emulated import emulated_capture
from refsd_validate.cli import main
from refsd_validate.reader import read_bundle


# What certify prints on stderr when it succeeds, not on a terminal: one line per finished stage (refsd.console).
STAGE_LINE = re.compile(r"refsd-validate: certify(-fleet)?: [^:]+: \d+(/\d+)? runs? in \d+\.\d s")


def own_warnings(err: str) -> list[str]:
    """stderr's lines but the finished-stage lines."""
    return [line for line in err.splitlines() if not STAGE_LINE.fullmatch(line)]


def certify_cli(bundle, model, out, cache, capsys, *extra) -> tuple[int, dict, str]:
    """(exit code, certificate.json, stdout) of ``refsd-validate certify``; stderr holds no more than its
    finished stages."""
    rc = main(["certify", str(bundle), "--model", str(model), "--out", str(out), "--cache", str(cache), *extra])
    captured = capsys.readouterr()
    assert own_warnings(captured.err) == [], captured.err
    return rc, json.loads((out / "certificate.json").read_text()), captured.out


def judge_plan(plan):
    """The certificate of ``plan`` on exactly its own calibration design (``certify`` may run the rest of a
    half-fraction design; this never does): every rerun run in order, then judged."""
    from refsd_validate.judge import judge_certificate  # noqa: PLC0415

    traces = {}
    for job in plan.jobs():
        traces[job.role, job.index] = job.run(traces.get(("reference", 0)), cache_dir=plan.cache)
    return judge_certificate(plan, traces)


def faulty_device(model, tmp, fault=None):
    """A device like the good one (same precision, kernels, intermediates), with ``fault`` injected."""
    return emulated_capture(model, certify_request(), tmp / "bundle", precision="f32_f16", ftz=True,
                            declare_ftz=True, rewrites="google", intermediates=CERTIFY_INTERMEDIATES, fault=fault)




def unet_output_fault(first_step, edit, last_step=None):
    """Apply ``edit`` to the UNet's output at steps first_step..last_step (calls are counted: one per step)."""
    def fault(pipe):
        unet = pipe.components["unet"]
        forward, calls = unet.forward, []

        def faulty(*a, **kw):
            out = forward(*a, **kw)
            step = len(calls)
            calls.append(step)
            return edit(out) if first_step <= step <= (last_step if last_step is not None else step) else out

        unet.forward = faulty
    return fault


def _nan_at_step_2(out):
    out = out.copy()
    out[1, 5, 7, 2] = np.nan  # one element of the conditional half; the pipeline spreads it
    return out


def nan_in_attention_at_step_2(pipe):
    """A NaN in the mid-block's first self-attention output at step 2."""
    attn1 = pipe.components["unet"].mid_block.attentions[0].transformer_blocks[0].attn1
    forward, calls = attn1.forward, []

    def faulty(*a, **kw):
        out = forward(*a, **kw)
        calls.append(None)
        if len(calls) == 3:  # step 2
            out = out.copy()
            out[0, 3, 1] = np.nan
        return out

    attn1.forward = faulty


# The faulty devices several test files judge (tests/conftest.py's fault_bundle captures each once a session).
FAULTS = {
    "bias_1pct_from_step_1": unet_output_fault(1, lambda o: o * np.float32(1.01)),
    "bias_0.3pct_from_step_2": unet_output_fault(2, lambda o: o * np.float32(1.003)),
    "nan_at_step_2": unet_output_fault(2, _nan_at_step_2, last_step=2),
    "nan_in_attention_step_2": nan_in_attention_at_step_2,
}


def bundle_parts(bundle) -> tuple[dict, dict]:
    """(capture.json without what write_bundle fills in, every tensor) of a bundle, as write_bundle takes them."""
    b = read_bundle(bundle)
    tensors = {**b.tensors, **{n: b.tensor(n) for n in b.intermediates}}
    doc = {k: v for k, v in json.loads(json.dumps(b.capture)).items()
           if k not in ("schema", "schema_version", "tensors")}
    return doc, tensors


def rewrite_bundle(bundle, out, *, tensors=None, doc=None):
    """A copy of ``bundle`` at ``out`` after ``tensors(dict)`` / ``doc(dict)`` edited it in place."""
    d, t = bundle_parts(bundle)
    if tensors is not None:
        tensors(t)
    if doc is not None:
        doc(d)
    return write_bundle(out, d, t)


def zip_bundle(root: Path, out: Path, *, method: int = zipfile.ZIP_DEFLATED, extra=()) -> Path:
    """A .zip of a bundle folder (members compressed with ``method``), plus ``extra`` (name or ZipInfo, bytes) members."""
    with zipfile.ZipFile(out, "w", method) as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(root).as_posix())
        for name, data in extra:
            zf.writestr(name, data)
    return out
