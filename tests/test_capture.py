"""``refsd-validate capture``: LiteRT runs of the tiny fp32 export through
refsd's pipeline loop give a schema-valid bundle whose tensors match the
reference pipeline on the same request.

Trajectory tolerance (first order, coarse): each component differs from the
reference by <= 1e-5 relative (tests/test_export.py); guidance multiplies
the UNet's error by up to 2g + 1 = 16 (g = 7.5: ``uncond + g (cond - uncond)``),
a DDIM step adds its model-output term with a coefficient <= 1/sqrt(alpha_bar)
~ 15 at the noisiest step, and 4 steps accumulate: 4 * 16 * 15 * 1e-5 ~ 1e-2.
Measured: <= 4.2e-6 on every boundary tensor (text encoder 5.6e-7, noise
predictions <= 2.6e-6, latents <= 4.2e-6, image 2.0e-6).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from refsd.pipeline import Pipeline, Request
from refsd_validate.bundle import schema_path
from refsd_validate.capture import capture

REQUEST = Request("a red cube", negative_prompt="blurry", seed=3, steps=4, guidance=7.5, scheduler="ddim",
                  height=16, width=16)
TRAJECTORY_TOL = 4 * (2 * REQUEST.guidance + 1) * 15 * 1e-5


@pytest.fixture(scope="module")
def bundle(tiny_sd15, tiny_export, tmp_path_factory):
    return capture(tiny_export("fp32", "none"), tiny_sd15, REQUEST, tmp_path_factory.mktemp("cap") / "bundle",
                   intermediates=True, progress=False)


def load(bundle, name):
    doc = json.loads((bundle / "capture.json").read_text())
    return np.load(bundle / doc["tensors"][name]["file"], allow_pickle=False)


def test_bundle_is_valid_by_the_schema(bundle):
    doc = json.loads((bundle / "capture.json").read_text())
    jsonschema.validate(doc, json.loads(schema_path().read_text()))
    assert doc["device"]["name"] == "host" and doc["device"]["gpu"] is None and doc["device"]["soc"] is None
    assert doc["runtime"]["name"] == "ai-edge-litert"
    assert doc["runtime"]["delegate"] == {"name": "none", "library": None, "precision": "f32", "ftz": None,
                                          "options": {}}
    assert doc["model"]["weights"] == "fp32" and doc["request"]["steps"] == 4
    for entry in doc["tensors"].values():
        assert hashlib.sha256((bundle / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    names = set(doc["tensors"])
    boundary = {"inputs/token_ids", "scheduler/timesteps", "text_encoder/hidden_states", "scheduler/latents_init",
                "vae/image"} | {f"unet/step_{i}/noise_pred" for i in range(4)} | \
               {f"scheduler/step_{i}/latents" for i in range(4)}
    assert boundary <= names
    # intermediates, named as refsd.context.recording() names the reference's
    assert "unet/step_3/unet.mid_block" in names and "text_encoder/text_encoder.text_model.encoder" in names
    assert "vae/vae.decoder.up_blocks.0" in names


def test_bundle_matches_the_reference_pipeline(bundle, tiny_sd15):
    ref = Pipeline(tiny_sd15)(REQUEST, progress=False).trace
    np.testing.assert_array_equal(load(bundle, "scheduler/latents_init"), ref["scheduler/latents_init"])
    assert load(bundle, "inputs/token_ids").dtype == np.int64
    for name in ("text_encoder/hidden_states", "unet/step_0/noise_pred", "scheduler/step_3/latents", "vae/image"):
        got, want = load(bundle, name), ref[name]
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert err <= TRAJECTORY_TOL, (name, err)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "refsd_validate", "capture", *args], capture_output=True, text=True)


def test_cli_capture_and_bad_inputs(tiny_sd15, tiny_export, tmp_path):
    folder = tiny_export("fp32", "none")
    base = ["--prompt", "x", "--steps", "1", "--scheduler", "ddim", "--quiet"]
    ok = _cli("--tflite", str(folder), "--model", str(tiny_sd15), "--out", str(tmp_path / "b"), *base)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "b" / "capture.json").is_file()
    other = tmp_path / "other"
    from refsd.tiny import make_tiny

    make_tiny(other, "sd15", seed=1)
    cases = [
        (["--tflite", str(tmp_path), "--model", str(tiny_sd15)], "refsd_export.json"),
        (["--tflite", str(folder), "--model", str(other)], "not the model"),
        (["--tflite", str(folder), "--model", str(tiny_sd15), "--delegate", str(tmp_path / "nope.so")],
         "state its precision"),
        (["--tflite", str(folder), "--model", str(tiny_sd15), "--delegate", str(tmp_path / "nope.so"),
          "--delegate-precision", "f16"], "no such delegate library"),
        # A real shared library that is not a TFLite delegate (no tflite_plugin_create_delegate).
        (["--tflite", str(folder), "--model", str(tiny_sd15), "--delegate", _libm(),
          "--delegate-precision", "f16"], "cannot load the delegate"),
    ]
    for args, message in cases:
        r = _cli(*args, "--out", str(tmp_path / "bad"), *base)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


def _libm() -> str:
    import ctypes.util

    name = ctypes.util.find_library("m")
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/usr/lib64", "/lib64"):
        if name and Path(d, name).is_file():
            return str(Path(d, name))
    pytest.skip("libm not found")
