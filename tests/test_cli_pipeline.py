"""``refsd generate``, ``refsd fp16-check`` and ``refsd demo`` end to end on
tiny folders, including a folder whose weights are scaled to force an fp16
overflow at a known module."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from refsd.cli import main
from refsd.tiny import make_tiny
from refsd.weights import read_safetensors, write_safetensors

REQ = ["--prompt", "a photo of a cat", "--steps", "2", "--height", "32", "--width", "32", "--scheduler", "ddim",
       "--quiet"]
HOT = "mid_block.resnets.0.conv2"  # the module the fixture makes overflow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("sd15"), "sd15", seed=0)


@pytest.fixture(scope="module")
def hot_tiny(tmp_path_factory):
    """The tiny model with one conv's weights x 3e4: its output exceeds 65504."""
    path = make_tiny(tmp_path_factory.mktemp("hot"), "sd15", seed=0)
    f = path / "unet" / "diffusion_pytorch_model.safetensors"
    state = {k: np.array(v) for k, v in read_safetensors(f).items()}
    state[f"{HOT}.weight"] = state[f"{HOT}.weight"] * np.float32(3e4)
    write_safetensors(f, state)
    return path


def test_generate_writes_png_and_trace(tiny, tmp_path, capsys):
    out, trace = tmp_path / "cat.png", tmp_path / "trace.npz"
    assert main(["generate", "--model", str(tiny), *REQ, "--out", str(out), "--trace", str(trace)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(trace, allow_pickle=False) as t:
        assert "unet__step_1__noise_pred" in t.files and t["vae__image"].shape == (1, 32, 32, 3)
    assert "wrote" in capsys.readouterr().out


def test_fp16_check_clean_in_f32_f16(tiny, tmp_path):
    js = tmp_path / "r.json"
    assert main(["fp16-check", "--model", str(tiny), *REQ, "--precision", "f32_f16", "--json", str(js)]) == 0
    doc = json.loads(js.read_text())
    assert doc["failed"] == [] and doc["report"]["clean"]


def test_fp16_check_names_the_overflowing_module_and_step(hot_tiny, tmp_path, capsys):
    js = tmp_path / "r.json"
    code = main(["fp16-check", "--model", str(hot_tiny), *REQ, "--precision", "f32_f16", "--json", str(js)])
    assert code == 1
    first = json.loads(js.read_text())["report"]["first_offending"]
    assert (first["kind"], first["stage"], first["step"], first["op"]) == ("overflow", "unet", 0, "conv2d")
    assert first["path"] == f"unet.{HOT}"
    assert f"unet:unet.{HOT} @step 0" in capsys.readouterr().out
    # --fail-on picks the gate: the overflow's infs only propagate (no NaN made from finite values).
    assert main(["fp16-check", "--model", str(hot_tiny), *REQ, "--precision", "f32_f16", "--fail-on", "overflow"]) == 1
    assert main(["fp16-check", "--model", str(hot_tiny), *REQ, "--precision", "f32_f16", "--fail-on", "invalid"]) == 0


def test_fp16_check_f32_mode_reports_headroom_not_events(hot_tiny, tmp_path):
    js = tmp_path / "r.json"
    assert main(["fp16-check", "--model", str(hot_tiny), *REQ, "--precision", "f32", "--json", str(js)]) == 0
    closest = json.loads(js.read_text())["report"]["closest_to_overflow"][0]
    # In f32 nothing overflows, but the scaled conv is the op with the least (negative) headroom.
    assert closest["path"] == f"unet.{HOT}" and closest["headroom_bits"] < 0


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--model", "/nonexistent", "--prompt", "x", "--out", "/tmp/x.png"], "no such model folder"),
    (["generate", "--model", "{tiny}", "--prompt", "x", "--out", "/nonexistent/dir/x.png"], "output folder"),
    (["generate", "--model", "{tiny}", "--prompt", "x", "--out", "{tmp}/x.png", "--rewrites", "bogus"],
     "unknown rewrite"),
    (["generate", "--model", "{tiny}", "--prompt", "x", "--out", "{tmp}/x.png", "--steps", "0"], "steps"),
    (["generate", "--model", "{tiny}", "--prompt", "x", "--out", "{tmp}/x.png", "--height", "33",
      "--scheduler", "ddim"], "scale factor"),
    (["generate", "--model", "{tiny}", "--prompt", "x", "--out", "{tmp}/x.png"], "PNDMScheduler"),
    (["generate", "--model", "{tiny}", "--prompt", "x", "--out", "{tmp}/x.png", "--latents", "{tmp}/none.npy"],
     "no such file"),
    (["fp16-check", "--model", "{tiny}", "--prompt", "x", "--fail-on", "bogus"], "unknown event kind"),
    (["fp16-check", "--model", "{tiny}", "--prompt", "x", "--precision", "f8"], "invalid choice"),
    (["generate", "--model", "{tiny}", "--prompt", "x", "--out", "{tmp}/x.png", "--block", "0"], "--block"),
])
def test_bad_input_is_one_line_exit_2(tiny, tmp_path, argv, needle):
    argv = [a.format(tiny=tiny, tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "refsd", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refsd: error:"), proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_latents_file_replays_noise(tiny, tmp_path):
    lat = tmp_path / "lat.npy"
    np.save(lat, np.random.default_rng(3).standard_normal((1, 16, 16, 4)).astype(np.float32))
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for seed, trace in (("1", a), ("2", b)):
        assert main(["generate", "--model", str(tiny), *REQ, "--seed", seed, "--latents", str(lat),
                     "--out", str(tmp_path / "x.png"), "--trace", str(trace)]) == 0
    with np.load(a) as ta, np.load(b) as tb:
        assert np.array_equal(ta["vae__image"], tb["vae__image"])
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((1, 16, 16, 4), np.nan, np.float32))
    assert main(["generate", "--model", str(tiny), *REQ, "--latents", str(bad), "--out", str(tmp_path / "x.png")]) == 2


def test_demo_writes_its_pictures_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--size", "32"]) == 0
    for name in ("compare.png", "image_f32.png", "image_f32_f16.png", "image_f16.png", "fp16_report.json",
                 "catalogue.json", "trace_f32.npz", "tiny/model_index.json", "tflite/unet.tflite",
                 "capture/capture.json", "certificate/report.html"):
        assert (out / name).is_file(), name
    cert = json.loads((out / "certificate" / "certificate.json").read_text())
    assert cert["verdict"] == "certified"  # the LiteRT capture of the same graph (exit 0 says so too)
    if (out / "capture_gpu").exists():  # this machine has a GPU adapter (README: GPU capture)
        assert (out / "capture_gpu" / "capture.json").is_file() and (out / "certificate_gpu" / "report.html").is_file()
    doc = json.loads((out / "fp16_report.json").read_text())
    assert set(doc["modes"]) == {"f32_f16", "f16"}
    assert doc["modes"]["f32_f16"]["report"]["clean"]
    assert "float16 exception catalogue" in capsys.readouterr().out
