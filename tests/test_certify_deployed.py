"""Certifying the model as deployed: the reference follows the bundle's
rewrites, the declared stages and their precision; what the deployment costs
is reported beside the verdict, never in it; a declared precision whose own
emulation overflows gives a verdict with its reason, not "bad input".

Devices here are refsd's emulation (fast, in-process); the LiteRT capture
matrix (tests/test_capture_matrix.py) and diffusers as a device
(tests/test_diffusers_device.py) are the independent runtimes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bundle_helpers import certify_cli, judge_plan, rewrite_bundle, unet_output_fault
from conftest import certify_request

from refsd_validate.bundle import declared_stages
from refsd_validate.capture_emulated import emulated_capture
from refsd_validate.cli import main
from refsd_validate.reader import read_bundle

TIME_EMBEDDING = "unet.time_embedding"






@pytest.fixture(scope="module")
def gelu_clip_device(tiny_sd21, tmp_path_factory):
    """A correct device running the clipped GELU (an approximating rewrite), f32_f16 storage."""
    return emulated_capture(tiny_sd21, certify_request(), tmp_path_factory.mktemp("gc") / "bundle",
                            precision="f32_f16", ftz=False, declare_ftz=False, rewrites="gelu_clip")


def test_a_model_deployed_as_published_is_its_own_original(gelu_clip_device, tiny_sd21, certify_cache, tmp_path):
    """The deployment cost compares the deployed reference with the published model's run; with fp32 weights
    and no rewrites the two are one run, bit for bit, so it runs once."""
    from refsd_validate.certify_rerun import ORIGINAL_DEPLOYMENT
    from refsd_validate.plan import prepare

    published = rewrite_bundle(gelu_clip_device, tmp_path / "published",
                               doc=lambda d: d["model"].update(rewrites="none"))
    roles = {j.role for j in prepare(published, tiny_sd21, cache_dir=certify_cache).jobs()}
    assert "original" not in roles and {"reference", "free", "teacher"} <= roles
    plan = prepare(gelu_clip_device, tiny_sd21, cache_dir=certify_cache)
    assert plan.deployment != ORIGINAL_DEPLOYMENT and "original" in {j.role for j in plan.jobs()}


def test_approximating_rewrite_certifies_and_its_cost_is_reported(gelu_clip_device, tiny_sd21, certify_cache,
                                                                   tmp_path, capsys):
    rc, cert, out = certify_cli(gelu_clip_device, tiny_sd21, tmp_path / "out", certify_cache, capsys)
    assert rc == 0, out
    cost = cert["deployment_cost"]
    # gelu_clip switches the tiny SD 2.1's erf-GELU to a clipped tanh-GELU: the deployed model differs from the
    # original by that approximation, which is reported, and was not held against the device.
    assert 0 < cost["worst_rel_peak"] < 0.05 and 30 < cost["image_psnr_db"] < 200
    assert set(cost["tensors"]) >= {"text_encoder/hidden_states", "unet/step_0/noise_pred", "vae/image"}
    assert "deployment cost (weights fp32, rewrites gelu_clip vs weights fp32, rewrites none)" in out
    assert "What the deployment costs" in (tmp_path / "out" / "report.html").read_text()


def test_deployment_cost_gate_has_its_own_exit_code(gelu_clip_device, tiny_sd21, certify_cache, tmp_path, capsys):
    rc, cert, out = certify_cli(gelu_clip_device, tiny_sd21, tmp_path / "a", certify_cache, capsys,
                             "--max-deployment-cost", "psnr:199")
    assert rc == 3 and cert["verdict"] == "certified" and cert["deployment_cost"]["gate"]["passed"] is False
    assert "FAILS --max-deployment-cost psnr:199" in out
    rc, cert, _ = certify_cli(gelu_clip_device, tiny_sd21, tmp_path / "b", certify_cache, capsys,
                           "--max-deployment-cost", "rel:0.5")
    assert rc == 0 and cert["deployment_cost"]["gate"]["passed"] is True


@pytest.mark.parametrize("value", ["psnr", "psnr:x", "rel:-1", "psnr:inf", "snr:3"])
def test_deployment_cost_gate_is_checked(value, capsys):
    rc = main(["certify", "b", "--model", "m", "--out", "o", "--max-deployment-cost", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--max-deployment-cost" in err[0], err


def test_undeclared_rewrite_is_a_device_fault(tiny_sd21, certify_cache, tmp_path, capsys):
    """An f32 device running the clipped GELU but declaring the plain model: the approximation is then an error
    of the device. (In fp16 storage the tiny model's clipped-GELU difference, 4.6e-4 relative, is below one
    fp16 unit roundoff, so only an f32 declaration can tell the two apart.)"""
    device = emulated_capture(tiny_sd21, certify_request(), tmp_path / "device", precision="f32",
                              rewrites="gelu_clip")
    rc, cert, _ = certify_cli(device, tiny_sd21, tmp_path / "ok", certify_cache, capsys, "--mode", "teacher")
    assert rc == 0

    def plain(doc):
        doc["model"]["rewrites"] = "none"
        doc["runtime"]["delegate"]["options"]["rewrites"] = "none"

    bundle = rewrite_bundle(device, tmp_path / "bundle", doc=plain)
    rc, cert, _ = certify_cli(bundle, tiny_sd21, tmp_path / "out", certify_cache, capsys, "--mode", "teacher")
    assert rc == 1 and cert["first_failure"]["tensor"] == "text_encoder/hidden_states"


def test_unknown_rewrite_is_bad_input(gelu_clip_device, tiny_sd21, tmp_path, capsys):
    bundle = rewrite_bundle(gelu_clip_device, tmp_path / "bundle", doc=lambda d: d["model"].update(rewrites="gelu_magic"))
    rc = main(["certify", str(bundle), "--model", str(tiny_sd21), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "model.rewrites 'gelu_magic'" in err[0] and "gelu_magic" in err[0], err


def test_f16_declared_where_the_f16_emulation_overflows_gets_a_verdict(tiny_sd21, certify_cache, tmp_path, capsys):
    """The tiny SD 2.1 overflows refsd's f16 emulation (a GroupNorm sum of squares at step 0; its output stays
    finite: the norm divides by the inf). A device that declares f16 and stays finite is judged, not refused:
    the certificate names the variants that overflowed, with op and step, and leaves them out of the floors
    from there on (a floor measured across an overflow would certify anything)."""
    def f16(doc):
        for s in ("text_encoder", "unet", "vae"):
            doc["stages"][s].update(precision="f16", ftz=None)

    # A device that keeps fp16 tensors but does not overflow (it accumulates in fp32), with the plain GroupNorm.
    device = emulated_capture(tiny_sd21, certify_request(), tmp_path / "device", precision="f32_f16")
    bundle = rewrite_bundle(device, tmp_path / "bundle", doc=f16)
    rc, cert, out = certify_cli(bundle, tiny_sd21, tmp_path / "out", certify_cache, capsys, "--mode", "free")
    assert rc in (0, 1), out
    overflows = cert["calibration_overflows"]
    assert overflows and all(o["variant"].startswith("text_encoder+unet+vae: f16") for o in overflows)
    first = overflows[0]
    assert first["stage"] == "unet" and first["step"] == 0 and "norm" in first["op"]
    assert first["first_affected_tensor"] == "unet/step_0/noise_pred"
    assert "overflow" in first["detail"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "it defines no floor from <code>unet/step_0/noise_pred</code> on" in html


def test_an_overflow_the_half_design_names_does_not_run_the_rest(tiny_sd21, certify_cache, tmp_path):
    """The same plain f16 device with FTZ unknown: the half-fraction design holds a plain f16 run (FTZ on) that
    overflows where the device does, so the rejection already names the deployment's overflow, and its first
    failure needs far more than the rest could widen a floor. certify stops at the half; the full design,
    computed anyway, gives the same verdict, first failure and explanation."""
    from refsd_validate.certify import certify, needs_full_design, prepare
    from refsd_validate.tolerance import FULL_DESIGN_WIDENING, K

    device = emulated_capture(tiny_sd21, certify_request(), tmp_path / "device", precision="f16", ftz=False,
                              declare_ftz=None, rewrites="none")
    half = certify(device, tiny_sd21, mode="teacher", cache_dir=certify_cache)
    assert not half.certified and half.rule["calibration_design"].startswith("half fraction")
    assert half.overflow_before_failure is not None
    assert half.first_failure.verdict.k_needed > K * FULL_DESIGN_WIDENING
    plan = prepare(device, tiny_sd21, mode="teacher", cache_dir=certify_cache)
    assert plan.complement and not needs_full_design(plan, half)
    plan = plan.completed()
    full = judge_plan(plan)
    assert not full.certified and len(full.rule["calibration_variants"]) > len(half.rule["calibration_variants"])
    assert (full.first_failure.name, full.first_failure.mode) == (half.first_failure.name, half.first_failure.mode)
    assert full.overflow_before_failure is not None
    assert (full.overflow_before_failure["stage"], full.overflow_before_failure["step"]) == \
        (half.overflow_before_failure["stage"], half.overflow_before_failure["step"])


def test_a_device_that_overflows_as_declared_is_told_so(tiny_sd21, certify_cache, tmp_path, capsys):
    """f16 with FTZ declared off and plain kernels, computed exactly so: the GroupNorm's fp16 sum of squares
    overflows at step 0, and the device's image is NaN. Not certified (its output is not the model's), but the
    certificate must say the deployment overflows there. The half-fraction design holds no (f16, plain) run
    with FTZ off, so it judged the device against runs that do not overflow and named no overflow; a rejection
    now runs the rest of the design, which holds the device's own configuration."""
    device = emulated_capture(tiny_sd21, certify_request(), tmp_path / "device", precision="f16", ftz=False,
                              declare_ftz=False, rewrites="none")
    rc, cert, out = certify_cli(device, tiny_sd21, tmp_path / "out", certify_cache, capsys, "--mode", "teacher")
    assert rc == 1
    assert cert["rule"]["calibration_design"] == ("full factorial design: the half fraction rejected, so the other "
                                                  "half ran too (f16 declared with FTZ: the half holds no f16 run "
                                                  "with plain kernels)")
    assert "text_encoder+unet+vae: f16; guidance_scheduler: f32 libm±4ulp" in cert["rule"]["calibration_variants"]
    o = cert["overflow_before_failure"]
    assert o is not None and o["mode"] == cert["first_failure"]["mode"]
    assert (o["stage"], o["step"]) == ("unet", 0) and "group_norm" in o["op"]
    assert o["variant"].startswith("text_encoder+unet+vae: f16;")  # the device's own configuration
    assert "the deployment overflows fp16 before this tensor" in out and o["op"] in out
    assert "the deployment overflows fp16 before this tensor" in (tmp_path / "out" / "report.html").read_text()


def test_one_percent_error_in_the_time_embedding_is_caught(tiny_sd21, certify_cache, tmp_path, capsys):
    """The floor covers a correct runtime's libm (perturbed exp / sin / cos), and no more: a 1 % gain on the
    time embedding, on an otherwise exact f32 device, is rejected there."""
    def fault(pipe):
        te = pipe.components["unet"].time_embedding
        forward = te.forward
        te.forward = lambda *a, **kw: forward(*a, **kw) * np.float32(1.01)

    bundle = emulated_capture(tiny_sd21, certify_request(), tmp_path / "bundle", precision="f32",
                              intermediates=(f"unet/step_0/{TIME_EMBEDDING}",), fault=fault)
    rc, cert, _ = certify_cli(bundle, tiny_sd21, tmp_path / "out", certify_cache, capsys, "--mode", "teacher")
    assert rc == 1
    f = cert["first_failure"]
    assert (f["tensor"], f["module_path"]) == (f"unet/step_0/{TIME_EMBEDDING}", TIME_EMBEDDING)


def test_exact_f32_device_is_within_the_libm_floor(tiny_sd21, certify_cache, tmp_path, capsys):
    """The same exact device without the fault certifies, time embedding included (its floor is not zero:
    the perturbed-libm variant moves it)."""
    bundle = emulated_capture(tiny_sd21, certify_request(), tmp_path / "bundle", precision="f32",
                              intermediates=(f"unet/step_0/{TIME_EMBEDDING}",))
    rc, cert, _ = certify_cli(bundle, tiny_sd21, tmp_path / "out", certify_cache, capsys, "--mode", "teacher")
    assert rc == 0
    te = next(t for t in cert["tensors"] if t["module_path"] == TIME_EMBEDDING)
    assert te["floor"]["peak"] > 0 and te["k_needed"] == 0


def test_version_1_bundles_are_still_read(emulated_bundle, tmp_path):
    """A version-1 capture.json (one delegate for the three models) reads, and its stages are derived."""
    b = read_bundle(emulated_bundle)
    doc = json.loads((emulated_bundle / "capture.json").read_text())
    doc["schema_version"] = 1
    del doc["stages"]
    for c in doc["model"]["components"].values():
        c.clear()
        c.update(file="(none: emulated)", sha256="0" * 64)
    import shutil

    v1 = shutil.copytree(emulated_bundle, tmp_path / "v1")
    (v1 / "capture.json").write_text(json.dumps(doc))
    got = read_bundle(v1)
    assert got.capture["schema_version"] == 1 and set(got.tensors) == set(b.tensors)
    stages = got.stages
    assert stages["unet"].precision == "f32_f16" and stages["unet"].ftz is True
    assert stages["guidance_scheduler"].precision == "f32"


def test_declared_stages_fill_defaults():
    doc = {"schema_version": 2, "model": {"weights": "int8"},
           "stages": {"text_encoder": {"processor": "cpu", "precision": "f32"},
                      "unet": {"processor": "gpu", "precision": "f16"},
                      "vae": {"processor": "gpu", "precision": "f16", "int8_kernels": "hybrid"},
                      "guidance_scheduler": {"processor": "host", "precision": "f32"}}}
    s = declared_stages(doc)
    # int8 on a CPU runs LiteRT's hybrid kernels, on a GPU dequantized weights, unless declared otherwise
    assert [s[m].int8_kernels for m in ("text_encoder", "unet", "vae")] == ["hybrid", "dequantize", "hybrid"]
    assert s["unet"].fast_math is True and s["text_encoder"].fast_math is False
    assert s["unet"].ftz is None


def test_an_overflow_off_the_failing_tensors_path_does_not_excuse_a_finite_device(tiny_sd21, certify_cache, tmp_path,
                                                                                   capsys):
    """Issue 28: a finite device with a +1 % UNet bias from step 1, declared f16. The f16 calibration runs
    overflow a GroupNorm at step 0; teacher-forced, step 1 is fed the reference's latents, so that overflow is
    not on the failing tensor's path, and the rejection stands unqualified (the certificate still lists the
    overflow among the calibration runs that define no floor)."""
    def f16(doc):
        for s in ("text_encoder", "unet", "vae"):
            doc["stages"][s].update(precision="f16", ftz=None)

    biased = emulated_capture(tiny_sd21, certify_request(), tmp_path / "device", precision="f32_f16",
                              fault=unet_output_fault(1, lambda o: o * np.float32(1.01)))
    bundle = rewrite_bundle(biased, tmp_path / "bundle", doc=f16)
    assert all(np.isfinite(read_bundle(bundle).tensors[n]).all() for n in read_bundle(bundle).tensors)
    rc, cert, out = certify_cli(bundle, tiny_sd21, tmp_path / "out", certify_cache, capsys, "--mode", "teacher")
    assert rc == 1
    first = cert["first_failure"]
    assert (first["tensor"], first["mode"]) == ("unet/step_1/noise_pred", "teacher")
    earlier = [o for o in cert["calibration_overflows"] if (o["stage"], o["step"]) == ("unet", 0)]
    assert earlier, cert["calibration_overflows"]  # a calibration run does overflow, before and elsewhere
    assert "overflows fp16" not in out and "headroom" not in out
    kinds = [ln["kind"] for ln in cert["explanation"]["lines"]]
    assert "possible_cause" not in kinds and kinds[:2] == ["verdict", "first_failure"]
    assert "headroom" not in (tmp_path / "out" / "report.html").read_text()


def test_an_overflow_is_named_only_on_the_failing_tensors_path():
    """explain.possible_overflow on the cases it tells apart (the judge's overflows, the execution order)."""
    from types import SimpleNamespace

    from refsd_validate.explain import possible_overflow

    order = ["text_encoder/hidden_states", "unet/step_0/unet.mid_block", "unet/step_0/noise_pred",
             "scheduler/step_0/latents", "unet/step_1/unet.mid_block", "unet/step_1/noise_pred",
             "scheduler/step_1/latents", "vae/image"]

    def overflow(mode, tensor):
        return {"mode": mode, "variant": "f16", "first_affected_tensor": tensor, "op": "x", "stage": "unet",
                "step": 0, "detail": "overflow"}

    def failing(name, mode):
        return SimpleNamespace(name=name, mode=mode)

    step0 = [overflow("teacher", "unet/step_0/noise_pred"), overflow("free", "unet/step_0/noise_pred")]
    # teacher-forced: only the failing tensor's own step counts, and only from the overflowing module on
    assert possible_overflow(failing("unet/step_1/noise_pred", "teacher"), step0, order, None) is None
    assert possible_overflow(failing("scheduler/step_0/latents", "teacher"), step0, order, None) is step0[0]
    assert possible_overflow(failing("unet/step_0/unet.mid_block", "teacher"), step0, order, None) is None
    # free-running: every earlier tensor feeds every later one
    assert possible_overflow(failing("unet/step_1/noise_pred", "free"), step0, order, None) is step0[1]
    # a device non-finite at or before the failure: any earlier overflow of its mode may be the cause
    assert possible_overflow(failing("unet/step_1/noise_pred", "teacher"), step0, order, 4) is step0[0]
    assert possible_overflow(failing("unet/step_1/noise_pred", "teacher"), step0, order, 6) is None
