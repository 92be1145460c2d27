"""refsd's terminal holds refsd's lines only (``refsd.console``): what the
libraries write to descriptors 1 and 2, from C or Python, is captured, shown
with ``--verbose`` and under an error; progress is one line per finished stage
when not on a terminal. Run as command-line processes (a fake command through
``refsd.arguments.run``, then the real export, capture and certify commands)
with output to files, as a log would hold it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# A line is refsd's on stderr when it starts with the program's name; on stdout, when it is none of the
# forms the libraries log in (glog/absl, LiteRT's INFO:/WARNING:, Python logging's LEVEL:name:, their texts).
OWN_STDERR = re.compile(r"^(refsd|refsd-validate): ")
FOREIGN = re.compile(r"^([IWEF]\d{4} |INFO: |WARNING: |ERROR: |(WARNING|INFO|ERROR|DEBUG):\w)|absl|TensorFlow|"
                     r"tensorflow|XNNPACK|oneDNN|PyTorch was not found|To enable the following|trackable_obj")

FAKE = r"""
import atexit, logging, os, sys, time
from refsd.arguments import build_parser, run
from refsd.console import progress

def cmd(args):
    os.write(1, b"I0000 00:00:1.0 1 port.cc:153] native stdout\n")
    os.write(2, b"W0000 00:00:1.0 1 helpers.cc:1] native stderr\n")
    logging.getLogger("absl").warning("Please consider providing the trackable_obj")
    print("the report")
    for _ in progress(range(3), desc="stage", unit="step"):
        time.sleep(0.01)
    atexit.register(os.write, 2, b"INFO: teardown at exit\n")
    if args.fail:
        raise ValueError("--fail: asked to fail")
    return 0

def add(sub):
    p = sub.add_parser("fake")
    p.add_argument("--fail", action="store_true")
    p.set_defaults(func=cmd)

logging.basicConfig()  # as TensorFlow's absl set-up does: a root handler on sys.stderr
sys.exit(run(build_parser("fakeprog", "a fake", [add]), None))
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _fake(tmp_path: Path, *args: str) -> tuple[int, list[str], list[str]]:
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "wb") as o, open(err, "wb") as e:
        rc = subprocess.run([sys.executable, "-c", FAKE, "fake", *args], stdout=o, stderr=e, env=_env(),
                            timeout=60).returncode
    return rc, out.read_text().splitlines(), err.read_text().splitlines()


def test_only_refsd_lines_on_success(tmp_path):
    rc, out, err = _fake(tmp_path)
    assert rc == 0
    assert out == ["the report"]
    assert len(err) == 1 and re.fullmatch(r"fakeprog: stage: 3 steps in \d+\.\d s", err[0]), err


NATIVE = ["I0000 00:00:1.0 1 port.cc:153] native stdout", "W0000 00:00:1.0 1 helpers.cc:1] native stderr",
          "WARNING:absl:Please consider providing the trackable_obj"]


def test_bad_input_stays_one_line_naming_the_libraries_log(tmp_path):
    rc, out, err = _fake(tmp_path, "--fail")
    assert rc == 2 and out == ["the report"]
    assert len(err) == 2 and err[0].startswith("fakeprog: stage: 3 steps in ")
    m = re.fullmatch(r"fakeprog: error: --fail: asked to fail \(what the libraries printed before it: (.+)\)", err[1])
    assert m, err
    log = Path(m[1])
    assert log.read_text().splitlines() == NATIVE
    log.unlink()


def test_verbose_lets_the_libraries_speak(tmp_path):
    rc, out, err = _fake(tmp_path, "--verbose")
    assert rc == 0
    assert "I0000 00:00:1.0 1 port.cc:153] native stdout" in out
    assert "W0000 00:00:1.0 1 helpers.cc:1] native stderr" in err
    assert "WARNING:absl:Please consider providing the trackable_obj" in err
    assert err[-1] == "INFO: teardown at exit"
    assert [line for line in err if FOREIGN.search(line)]  # the checker below can fail


def test_an_internal_error_shows_its_traceback_after_the_context(tmp_path):
    script = FAKE.replace('raise ValueError("--fail: asked to fail")', "raise RuntimeError('a bug')")
    err = subprocess.run([sys.executable, "-c", script, "fake", "--fail"], capture_output=True, text=True,
                         env=_env(), timeout=60)
    lines = err.stderr.splitlines()
    assert err.returncode == 70
    assert lines[1] == ("fakeprog: internal error: RuntimeError: a bug (a bug in fakeprog; the libraries' output "
                        "and the traceback follow)")
    assert lines[2:6] == ["fakeprog: the libraries' output before the error (3 lines):", *(f"  | {x}" for x in NATIVE)]
    assert lines[-1] == "RuntimeError: a bug"


# ---------------------------------------------------------------- the real commands, output to files

def _command(tmp_path: Path, name: str, *argv) -> list[str]:
    """Run ``python -m`` argv with stdout and stderr to files; every line must be refsd's."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        rc = subprocess.run([sys.executable, "-m", *map(str, argv)], stdout=o, stderr=e, env=_env(),
                            timeout=300).returncode
    text_out, text_err = out.read_bytes().decode(), err.read_bytes().decode()
    assert rc == 0, text_err
    assert "\r" not in text_out + text_err  # no progress bar in a file
    foreign = [line for line in text_err.splitlines() if not OWN_STDERR.match(line)]
    foreign += [line for line in text_out.splitlines() if FOREIGN.search(line)]
    assert foreign == [], f"{name}: lines not refsd's: {foreign[:5]}"
    return text_out.splitlines() + text_err.splitlines()


@pytest.mark.conformance
@pytest.mark.slow  # a TensorFlow export (text encoder), a LiteRT capture and a certificate: ~30 s on 2 cores
def test_export_capture_certify_print_refsd_lines_only(tiny_sd15, tiny_export, certify_cache, tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("ai_edge_litert")
    lines = _command(tmp_path, "export", "refsd", "export", "--model", tiny_sd15, "--out", tmp_path / "tflite",
                     "--component", "text_encoder", "--height", "16", "--width", "16")
    assert any(line.startswith("refsd: export: 1 model in ") for line in lines)
    tflite = tiny_export("fp32")
    lines = _command(tmp_path, "capture", "refsd_validate", "capture", "--tflite", tflite, "--model", tiny_sd15,
                     "--prompt", "a cat", "--steps", "1", "--scheduler", "ddim", "--out", tmp_path / "bundle",
                     "--intermediates")
    assert f"wrote capture bundle {tmp_path / 'bundle'}" in lines
    lines = _command(tmp_path, "certify", "refsd_validate", "certify", tmp_path / "bundle", "--model", tiny_sd15,
                     "--out", tmp_path / "cert", "--cache", certify_cache, "--mode", "teacher")
    assert lines[0].startswith("CERTIFIED")
    lines = _command(tmp_path, "names", "refsd_validate", "names", "--model", tiny_sd15)
    assert lines[0].startswith("name\tshape")
