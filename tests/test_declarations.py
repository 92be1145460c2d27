"""Declarations a user gets right (issue 28): one source for what a stage
declaration means (``refsd_validate.declarations``), from which the schema's
text is generated and which the README quotes; exact checks of a declaration
against the device's tensors; and ``check --model`` / ``write_bundle(model_dir=)``
refusing an intermediate of the wrong shape or layout with one message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import bundle_parts, rewrite_bundle
from conftest import CERTIFY_INTERMEDIATES, certify_request
from refsd_validate import declarations
from refsd_validate.bundle import BundleError, check_document, write_bundle
from refsd_validate.bundle_check import check_bundle
from refsd_validate.cli import main
from refsd_validate.reader import read_bundle

from refsd.numerics import Precision
from refsd.pipeline import guided_step
from refsd.schedulers import make_scheduler
from refsd.trace import LATENTS_INIT, latents, noise_pred
from refsd.weights import load_scheduler_config

ROOT = Path(__file__).resolve().parents[1]


def test_schema_text_is_generated_from_the_tables():
    fix = 'python -c "from refsd_validate.declarations import write_schema; write_schema()"'
    assert declarations.schema_path().read_text(encoding="utf-8") == declarations.schema_text(), f"regenerate: {fix}"
    stage = json.loads(declarations.schema_text())["$defs"]["stage"]["properties"]
    assert stage["precision"]["enum"] == list(declarations.PRECISIONS)
    assert stage["processor"]["enum"] == list(declarations.PROCESSORS)


def test_readme_quotes_the_runtime_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert declarations.runtime_table() in readme
    for precision, text in declarations.PRECISIONS.items():
        assert f"`{precision}`: {text}" in readme, precision


def _doc_with(emulated_bundle, **stage_fields):
    doc, _ = bundle_parts(emulated_bundle)
    doc.update(schema="refsd-capture", schema_version=2, created="2026-12-07T00:00:00+00:00",
               tensors={"inputs/token_ids": {"file": "tensors/inputs/token_ids.npy", "dtype": "int64",
                                             "shape": [2, 77], "sha256": "0" * 64}})
    doc["stages"]["unet"].update(stage_fields)
    return doc


def test_bf16_precision_is_refused_with_the_fix(emulated_bundle):
    with pytest.raises(ValueError) as e:
        check_document(_doc_with(emulated_bundle, precision="bf16"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("capture.json: stages.unet.precision 'bf16': bf16 activations")
    assert "run the stage with fp16 (f32_f16, f16) or fp32 (f32) activations" in msg
    check_document(_doc_with(emulated_bundle, precision="f16"))  # the same document, declared as it may be


def test_bf16_values_are_told_from_fp16_and_fp32():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000).astype(np.float32)
    bf16 = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    assert declarations.bf16_valued(bf16)
    assert not declarations.bf16_valued(x.astype(np.float16).astype(np.float32))  # 1/8 of fp16 values are bf16
    assert not declarations.bf16_valued(x)
    assert not declarations.bf16_valued(bf16[:10])  # too few values to tell
    assert not declarations.bf16_valued(np.zeros(1000, np.float32))


def _steps(config, request, precision, seed=0):
    """Boundary tensors of a guidance and scheduler stage that ran in ``precision``."""
    rng = np.random.default_rng(seed)
    sched = make_scheduler(request["scheduler"], config)
    sched.set_timesteps(request["steps"])
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float16).astype(np.float32)
    out = {LATENTS_INIT: x}
    for i in range(request["steps"]):
        out[noise_pred(i)] = rng.standard_normal((2, 8, 8, 4)).astype(np.float16).astype(np.float32)
        x = guided_step(sched, out[noise_pred(i)], np.float32(request["guidance"]), i, x, Precision(precision))
        out[latents(i)] = x
    return out


def _declared(precision, ftz):
    from refsd_validate.bundle import StageDeclaration

    return StageDeclaration(processor="cpu", precision=precision, ftz=ftz, int8_kernels=None, fast_math=False,
                            fully_accelerated=None, fallback_ops=(), runtime=None)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++2m"])
def test_latents_that_match_another_guidance_declaration_say_so(tiny_sd21, scheduler):
    config = load_scheduler_config(tiny_sd21 / "scheduler")
    request = {"scheduler": scheduler, "steps": 3, "guidance": 7.5}
    tensors = _steps(config, request, "f16")

    def checks(precision, ftz=False):
        stages = {s: _declared(precision, ftz) for s in ("text_encoder", "unet", "vae", "guidance_scheduler")}
        return declarations.declaration_checks(tensors, stages, request, config)

    (c,) = checks("f32")
    assert not c["passed"] and c["declaration"] == "stages.guidance_scheduler"
    assert c["detail"].startswith("these latents match guidance and the scheduler in f16, ftz false bit for bit at "
                                  "every step; the bundle declares guidance_scheduler f32"), c["detail"]
    assert "the bundle declares guidance_scheduler f32: declare stages.guidance_scheduler.precision" in c["detail"]
    assert checks("f16") == [] and checks("f32_f16") == []  # calibrated alike on this stage
    assert checks("f16", None) == []
    # An f32 stage's latents match no 16-bit declaration: nothing to say.
    f32 = _steps(config, request, "f32")
    assert declarations.declaration_checks(f32, {"guidance_scheduler": _declared("f32", None)},
                                           request, config) == []
    # More precise than declared (f32 latents, f16 declared): not a declaration error; the floors judge it.
    assert declarations.declaration_checks(f32, {"guidance_scheduler": _declared("f16", False)},
                                           request, config) == []
    # A step that matches nothing (a device's own arithmetic, or a fault): nothing claimed either.
    tensors[latents(1)] = tensors[latents(1)] * np.float32(1.001)
    assert checks("f32") == []


def test_a_wrong_layout_intermediate_is_refused_by_check_and_write_alike(emulated_bundle, tiny_sd21, tmp_path, capsys):
    (name,) = CERTIFY_INTERMEDIATES
    good = read_bundle(emulated_bundle)
    assert good.tensor(name).ndim == 4
    assert any("every judged one has the shape and layout" in line for line in check_bundle(emulated_bundle, tiny_sd21))
    bad = rewrite_bundle(emulated_bundle, tmp_path / "nchw",
                         tensors=lambda t: t.update({name: np.ascontiguousarray(t[name].transpose(0, 3, 1, 2))}))
    r = certify_request()
    h, w = good.tensor(name).shape[1:3]
    want = (f"tensor {name}: shape {(2, good.tensor(name).shape[3], h, w)}, the reference records "
            f"{good.tensor(name).shape} at {r.height}x{r.width} (NCHW: bundles hold NHWC activations; transpose "
            "(0, 2, 3, 1), or write_bundle(..., layout='NCHW'))")
    with pytest.raises(BundleError) as e:
        check_bundle(bad, tiny_sd21)
    assert str(e.value) == want
    assert main(["check", str(bad), "--model", str(tiny_sd21)]) == 2
    err = capsys.readouterr().err
    assert want in err and err.count("\n") == 1
    doc, tensors = bundle_parts(bad)
    with pytest.raises(ValueError) as e:
        write_bundle(tmp_path / "written", doc, tensors, model_dir=tiny_sd21)
    assert str(e.value) == want
    assert not (tmp_path / "written").exists()
