"""``refsd lint-gpu``: the paper's rewrites make the tiny UNet delegable, the
plain export is not; hand-built BROADCAST_TO and rank-5 graphs are flagged.

Limits scaled to the tiny widths. SD 1.5 at 512x512 has A = 64x64x320 = 1.25 Mi
elements in a level-0 activation; the paper's failing FullyConnected is exactly
A (1x4096x320) and the default FC limit is 0.8 A (1 Mi). The tiny UNet at a
16x16 image has A = 8x8x32 = 2048, so FC limit 0.8 A = 1638. Conv limit: the
tiny UNet's upsampler conv (8x8x64 in and out, 4096) cannot be split below
itself, the analog of the paper's failing concat conv is 8x8x96 -> 32 (6144):
4096 separates them (the tiny exports use serial_conv_limit 4096 too).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from refsd.export.lint import Limits, lint

TINY_LIMITS = Limits(max_fc_input=1638, max_conv_activation=4096)


def rules(report) -> set[str]:
    return {f.rule for f in report.findings}


def test_none_export_is_flagged_and_paper_export_is_clean(tiny_export):
    none = lint(tiny_export("fp32", "none") / "unet.tflite", TINY_LIMITS)
    paper = lint(tiny_export("fp32", "paper") / "unet.tflite", TINY_LIMITS)
    # rank-5 GroupNorm, token FullyConnected past the limit, the 8x8x96 3x3 conv
    assert {"rank", "fc-size", "conv-size"} <= rules(none)
    conv = [f for f in none.findings if f.rule == "conv-size"]
    assert len(conv) == 1 and conv[0].tensors[0].startswith("unet.up_blocks.1.resnets.0.conv1/")
    assert all(f.tensors and f.tensors[0] for f in none.findings)  # named by module path
    assert paper.clean, paper.table()


def test_other_components(tiny_export):
    """VAE: rank-5 GroupNorm in the plain export only (default limits: its convs are
    image-sized). Text encoder: the token-id GATHER with 2-D indices in the plain export;
    paper's embedding_1d gathers with 1-D indices and fc_as_conv removes the token FCs."""
    assert "rank" in rules(lint(tiny_export("fp32", "none") / "vae.tflite"))
    assert lint(tiny_export("fp32", "paper") / "vae.tflite").clean
    te_none = lint(tiny_export("fp32", "none") / "text_encoder.tflite", TINY_LIMITS)
    te_paper = lint(tiny_export("fp32", "paper") / "text_encoder.tflite", TINY_LIMITS)
    assert "fc-size" in rules(te_none)
    assert ("GATHER", "op-constraint") in {(f.op, f.rule) for f in te_none.findings}
    assert te_paper.clean, te_paper.table()


def test_int8_hybrid_weights_are_flagged(tiny_export):
    report = lint(tiny_export("int8", "none") / "unet.tflite", TINY_LIMITS)
    assert "hybrid-weights" in rules(report)


@pytest.fixture(scope="module")
def broadcast_rank5(tmp_path_factory):
    """A hand-built graph: BROADCAST_TO to a rank-5 tensor, then a rank-5 ADD."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((1, 4, 4, 8), tf.float32)])
    def f(x):
        y = tf.broadcast_to(tf.reshape(x, (1, 4, 4, 8, 1)), (1, 4, 4, 8, 3))
        return y + tf.reshape(x, (1, 4, 4, 8, 1))

    conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()])
    path = tmp_path_factory.mktemp("hand") / "broadcast_rank5.tflite"
    path.write_bytes(conv.convert())
    return path


def test_broadcast_to_and_rank5_are_flagged(broadcast_rank5):
    report = lint(broadcast_rank5)
    ops = {(f.op, f.rule) for f in report.findings}
    assert ("BROADCAST_TO", "unsupported-op") in ops
    assert any(rule == "rank" for _, rule in ops)


def test_runtime_tensor_types(tmp_path):
    """int32 runtime tensors pass (index tensors: LiteRT's GPU accelerator runs the
    embedding_1d text encoder's RESHAPE and GATHER of its int32 ids); an int64 one
    (ARG_MAX's output) is flagged."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((1, 4, 4, 8), tf.float32)])
    def f(x):
        return tf.cast(tf.argmax(x, axis=-1), tf.float32)

    conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()])
    path = tmp_path / "argmax.tflite"
    path.write_bytes(conv.convert())
    found = [f for f in lint(path).findings if f.rule == "tensor-type"]
    assert found and all("int64" in f.message for f in found), [f.message for f in found]


def test_op_option_rules(tmp_path):
    """A rule read from builtin options: a STRIDED_SLICE that drops an axis
    (shrink_axis_mask). (SOFTMAX beta != 1 cannot be made from TF here: the
    converter keeps x * 2 as a MUL, and the MUL-plus-SOFTMAX passes.)"""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((1, 4, 4, 8), tf.float32)])
    def f(x):
        return tf.nn.softmax(x[:, 0] * 2.0, axis=-1)

    conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()])
    path = tmp_path / "options.tflite"
    path.write_bytes(conv.convert())
    messages = [f.message for f in lint(path).findings if f.rule == "op-constraint"]
    assert messages == ["STRIDED_SLICE with shrinkAxisMask (not supported by the GPU delegate)"], messages


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "refsd", "lint-gpu", *args], capture_output=True, text=True)


def test_cli_json_and_exit_codes(broadcast_rank5, tiny_export):
    r = _cli(str(broadcast_rank5), "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["clean"] is False and doc["findings"][0]["tensors"]
    clean = _cli(str(tiny_export("fp32", "paper") / "unet.tflite"), "--max-fc-input", "1638",
                 "--max-conv-activation", "4096")
    assert clean.returncode == 0 and "every op" in clean.stdout


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.tflite", "no such file"),
    (lambda p: (p / "x.tflite").write_bytes(b"not a flatbuffer at all") and p / "x.tflite", "not a .tflite"),
    (lambda p: (p / "y.tflite").write_bytes(b"\0\0\0\0TFL3" + np.arange(7, dtype=np.uint8).tobytes())
     and p / "y.tflite", "corrupt"),
])
def test_cli_bad_input(tmp_path, make, message):
    r = _cli(str(make(tmp_path)))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_limits():
    r = _cli("x.tflite", "--max-fc-input", "0")
    assert r.returncode == 2 and "--max-fc-input" in r.stderr
