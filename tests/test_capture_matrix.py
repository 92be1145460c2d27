"""The capture matrix: the model as deployed, captured by LiteRT's CPU
interpreter (an implementation we did not write), must certify, and faults
must still be caught at the right tensor.

Cells: tiny SD 1.5 and SD 2.1 x weights {fp32, fp16, int8} x rewrites {none,
each paper rewrite alone, paper}, exported at 64x64 (32x32 latents) and run
for 3 DDIM steps. int8 captures run LiteRT CPU's hybrid kernels, which the
reference models (``refsd.ops.hybrid``) with the .tflite's own int8 values
(``--tflite``). Every cell checks: the capture certifies; the deployment cost
is reported, non-zero where the deployment changes the math (fp16 / int8
weights, the clipped GELU) and at float32-reordering level where it does not;
a NaN at step 1 and a +1 % bias from step 1 are rejected at
``unet/step_1/noise_pred`` (teacher-forced).

CI runs ``CI_CELLS`` (3 exports: the export dominates the cost), which cover
every weights value and every paper rewrite, on both architectures; set
``REFSD_CAPTURE_MATRIX=full`` for all 36 cells (each rewrite alone too).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from bundle_helpers import certify_cli, rewrite_bundle
from conftest import TINY_CONV_LIMIT

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from refsd.pipeline import Request  # noqa: E402
from refsd_validate.cli import main  # noqa: E402

pytestmark = [pytest.mark.conformance, pytest.mark.slow]

SIZE, STEPS = 64, 3
ARCHS = ("sd15", "sd21")
WEIGHTS = ("fp32", "fp16", "int8")
REWRITES = ("none", "fc_as_conv", "serial_conv", "gn4d", "gelu_clip", "paper")
# CI: int8 (hybrid kernels) with every paper rewrite, fp16 weights with every paper rewrite on the other
# architecture, and the plain fp32 export. Each cell costs an export (~20 s on 2 cores) plus its certifications.
CI_CELLS = [("sd21", "int8", "paper"), ("sd15", "fp16", "paper"), ("sd21", "fp32", "none")]
ALL_CELLS = [(a, w, r) for a in ARCHS for w in WEIGHTS for r in REWRITES]
CELLS = ALL_CELLS if os.environ.get("REFSD_CAPTURE_MATRIX") == "full" else CI_CELLS
# Rewrites that compute the original function up to float32 summation order.
EQUIVALENT = ("none", "fc_as_conv", "serial_conv", "gn4d")


def _request() -> Request:
    return Request("a lighthouse at dusk", negative_prompt="blurry", seed=2, steps=STEPS, guidance=7.5,
                   scheduler="ddim", height=SIZE, width=SIZE)


@pytest.fixture(scope="module")
def models(tiny_sd15, tiny_sd21):
    return {"sd15": tiny_sd15, "sd21": tiny_sd21}


@pytest.fixture(scope="module")
def cell_capture(models, tmp_path_factory):
    """(arch, weights, rewrites) -> (model folder, export folder, bundle), each built once."""
    from refsd.export.build import export
    from refsd_validate.capture import capture

    made = {}

    def get(arch, weights, rewrites):
        key = (arch, weights, rewrites)
        if key not in made:
            root = tmp_path_factory.mktemp(f"matrix-{arch}-{weights}-{rewrites}")
            export(models[arch], root / "tflite", weights=weights, rewrites=rewrites, height=SIZE, width=SIZE,
                   serial_conv_limit=TINY_CONV_LIMIT, progress=False)
            bundle = capture(root / "tflite", models[arch], _request(), root / "bundle", progress=False)
            made[key] = (models[arch], root / "tflite", bundle)
        return made[key]

    return get






def _nan_at_step_1(t):
    noise = t["unet/step_1/noise_pred"].copy()
    noise[1, 3, 5, 2] = np.nan  # as a device's: everything after it is NaN too
    t["unet/step_1/noise_pred"] = noise
    for i in range(1, STEPS):
        t[f"scheduler/step_{i}/latents"] = np.full_like(t[f"scheduler/step_{i}/latents"], np.nan)
    t["vae/image"] = np.full_like(t["vae/image"], np.nan)


def _bias_from_step_1(t):
    for i in range(1, STEPS):
        t[f"unet/step_{i}/noise_pred"] = t[f"unet/step_{i}/noise_pred"] * np.float32(1.01)


@pytest.mark.parametrize("arch,weights,rewrites", CELLS, ids=["-".join(c) for c in CELLS])
def test_litert_cpu_capture_of_the_deployed_model(arch, weights, rewrites, cell_capture, certify_cache, tmp_path,
                                                  capsys):
    model, tflite, bundle = cell_capture(arch, weights, rewrites)
    rc, cert, out = certify_cli(bundle, model, tmp_path / "good", certify_cache, capsys, "--tflite", str(tflite))
    assert rc == 0, out
    assert max(t["k_needed"] for t in cert["tensors"]) < 4
    cost = cert["deployment_cost"]
    if weights == "fp32" and rewrites == "none":
        assert cost["worst_rel_peak"] == 0  # the model as published: the reference is the original run
    elif weights == "fp32" and rewrites in EQUIVALENT:
        assert cost["worst_rel_peak"] < 1e-4  # float32 reordering only (serial sums, 1x1 convs for FC)
    else:  # fp16 / int8 weights or the clipped GELU change the model: its cost is measured and reported
        assert cost["worst_rel_peak"] > 1e-5, cost
    assert f"deployment cost (weights {weights}" in out

    for name, fault in (("nan", _nan_at_step_1), ("bias", _bias_from_step_1)):
        bad = rewrite_bundle(bundle, tmp_path / name, tensors=fault)
        rc, cert, out = certify_cli(bad, model, tmp_path / f"out-{name}", certify_cache, capsys, "--tflite", str(tflite),
                                 "--mode", "teacher")
        assert rc == 1, out
        f = cert["first_failure"]
        assert (f["tensor"], f["stage"], f["step"]) == ("unet/step_1/noise_pred", "unet", 1), (name, f)
        if name == "bias":
            assert "gain" in f["failed"]


def test_int8_without_the_tflite_quantizes_as_the_exporter(cell_capture, certify_cache, tmp_path, capsys):
    """Without --tflite the reference quantizes the checkpoint as the converter does (bit-identical values):
    the same capture certifies."""
    model, _, bundle = cell_capture("sd21", "int8", "paper")
    rc, cert, out = certify_cli(bundle, model, tmp_path / "out", certify_cache, capsys)
    assert rc == 0, out
    assert cert["provenance"]["int8_source"] is None


def test_a_tflite_that_is_not_the_one_captured_is_refused(cell_capture, tmp_path, capsys):
    model, _, bundle = cell_capture("sd21", "int8", "paper")
    _, other, _ = cell_capture("sd21", "fp32", "none")
    rc = main(["certify", str(bundle), "--model", str(model), "--out", str(tmp_path / "o"), "--tflite", str(other)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is not the" in err[0] and "sha256 differs" in err[0], err
