"""Helpers the validator's tests share: run ``certify`` through its CLI, judge
a plan on its own calibration design, and derive a bundle from another by
editing its tensors or its capture.json (a broken capture tool, a faulty
device, a wrong declaration)."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from refsd_validate.bundle import write_bundle
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
    from refsd_validate.certify import certificate_from  # noqa: PLC0415

    traces = {}
    for job in plan.jobs():
        traces[job.role, job.index] = job.run(traces.get(("reference", 0)), cache_dir=plan.cache)
    return certificate_from(plan, traces)


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
