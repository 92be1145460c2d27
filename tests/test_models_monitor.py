"""Models report every op under its module path, run under the precision mode
chosen at construction, reach ops only through the namespace handed to them,
and validate their rewrite sets."""

from __future__ import annotations

import types

import numpy as np
import pytest

import refsd.ops
from refsd import weights
from refsd.context import location
from refsd.models import ModelOptions, Rewrites
from refsd.monitor import monitoring
from refsd.numerics import round_f16
from refsd.tiny import make_tiny

IDS = np.array([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70, [49406, 49407] + [0] * 75])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("sd21"), "sd21", seed=0)


def _run_all(comp):
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    with location("text_encoder"):
        h = comp.text_encoder(IDS)
    with location("unet", step=3):
        eps = comp.unet(lat, 981, h)
    with location("vae"):
        img = comp.vae.decode_latents(eps)
    return h, eps, img


def test_every_op_reports_under_its_module_path(tiny):
    comp = weights.load_pipeline(tiny, tokenizer=False)
    with monitoring() as mon:
        _run_all(comp)
    seen = {(stage, path, op) for (stage, path, op) in mon.stats}
    expected = {
        ("text_encoder", "text_encoder.text_model.embeddings.token_embedding", "embedding"),
        ("text_encoder", "text_encoder.text_model.encoder.layers.1.self_attn", "attention"),
        ("text_encoder", "text_encoder.text_model.encoder.layers.0.mlp.activation_fn", "gelu"),
        ("text_encoder", "text_encoder.text_model.final_layer_norm", "layer_norm"),
        ("unet", "unet.time_proj", "timestep_embedding"),
        ("unet", "unet.time_embedding.act", "silu"),
        ("unet", "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0", "geglu"),
        ("unet", "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", "linear"),
        ("unet", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0", "linear"),
        ("unet", "unet.down_blocks.0.downsamplers.0.conv", "conv2d"),
        ("unet", "unet.mid_block.attentions.0.proj_in", "linear"),  # SD 2.x: linear projection
        ("unet", "unet.up_blocks.1", "concat"),  # the skip concat is the up block's
        ("unet", "unet.up_blocks.0.upsamplers.0", "upsample_nearest2x"),
        ("unet", "unet.conv_act", "silu"),
        ("vae", "vae", "scale"),
        ("vae", "vae.post_quant_conv", "conv2d"),
        ("vae", "vae.decoder.mid_block.attentions.0", "attention"),
        ("vae", "vae.decoder.up_blocks.1.resnets.0.norm1", "group_norm"),
    }
    assert expected <= seen, sorted(expected - seen)
    assert all(stage in ("text_encoder", "unet", "vae") for stage, _, _ in seen)
    assert {s.worst_step for s in mon.stats.values() if s.stage == "unet"} == {3}


def test_precision_mode_chosen_at_construction(tiny):
    ref = _run_all(weights.load_pipeline(tiny, tokenizer=False))
    half = weights.load_pipeline(tiny, tokenizer=False, precision="f32_f16")
    w = half.unet.down_blocks[0].resnets[0].conv1.weight
    np.testing.assert_array_equal(w, round_f16(w))  # rounded once at load
    assert not w.flags.writeable
    out = _run_all(half)
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a, round_f16(a))  # fp16 storage: outputs are fp16 values
        assert np.abs(a - b).max() / np.abs(b).max() < 1e-2


def test_f16_reports_the_vae_groupnorm_overflow(tiny):
    """The tiny VAE's 32x32x4 groups of magnitude ~14: the sum of squares passes 65504 in f16 math."""
    comp = weights.load_pipeline(tiny, tokenizer=False, precision="f16")
    with monitoring() as mon:
        _run_all(comp)
    report = mon.report()
    assert not report.clean
    assert report.first.stage == "vae" and report.first.op == "group_norm" and report.first.kind == "overflow"
    fused = weights.load_pipeline(tiny, tokenizer=False, precision="f16", rewrites="group_norm_fused")
    with monitoring() as mon:
        _run_all(fused)
    assert mon.report().counts["overflow"] == 0


def test_presets_run_in_f16(tiny):
    """The paper's rank-4 GroupNorm keeps the blocked fp16 sum of squares (same
    reduction, same overflow); Google's fused GroupNorm accumulates in float32."""
    found = {}
    for preset in ("paper", "google"):
        comp = weights.load_pipeline(tiny, tokenizer=False, precision="f16", rewrites=preset)
        with monitoring() as mon:
            outs = _run_all(comp)
        assert all(np.isfinite(a).all() for a in outs[:2])
        found[preset] = mon.report()
    assert found["paper"].first.op == "gn4d" and found["paper"].first.kind == "overflow"
    assert found["google"].counts["overflow"] == 0


def test_ops_only_through_the_namespace(tiny):
    calls: dict[str, int] = {}

    def counted(name):
        fn = getattr(refsd.ops, name)

        def wrapper(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **k)
        return wrapper

    ns = types.SimpleNamespace(**{n: counted(n) for n in refsd.ops.__all__ if callable(getattr(refsd.ops, n))})
    opts = ModelOptions.make(ops=ns)
    comp = weights.load_pipeline(tiny, tokenizer=False, options=opts)
    with monitoring() as mon:
        _run_all(comp)
    # Without rewrites no op calls another op: every monitored op call came through the namespace.
    assert sum(calls.values()) == sum(s.calls for s in mon.stats.values())
    broken = types.SimpleNamespace(**{**vars(ns), "conv2d": None})
    unet = weights.load_unet(tiny / "unet", options=ModelOptions.make(ops=broken))
    with pytest.raises(TypeError):
        unet(np.zeros((1, 8, 8, 4), np.float32), 1, np.zeros((1, 77, 32), np.float32))


def test_rewrite_sets():
    assert set(Rewrites.parse("paper")) == {"fc_as_conv", "serial_conv", "gn4d", "gelu_clip", "embedding_1d",
                                           "int8_weights"}
    assert set(Rewrites.parse("google")) == {"softmax_partial_fused", "winograd", "gelu_fused", "group_norm_fused"}
    assert set(Rewrites.parse("none")) == set() and str(Rewrites.parse(None)) == "none"
    r = Rewrites.parse("google, fc_as_conv", winograd_tile=2)
    assert "fc_as_conv" in r and r.winograd_tile == 2
    assert set(Rewrites.parse(["gn4d", "flash_attention"])) == {"gn4d", "flash_attention"}
    with pytest.raises(ValueError, match="unknown rewrite 'gn5d'.*valid names: fc_as_conv"):
        Rewrites.parse("gn5d")
    p = Rewrites.parse("paper,prune=0.5:30000")  # pruning is declared like a rewrite and printed back
    assert "prune" in p and (p.prune_amount, p.prune_min_weights) == (0.5, 30000)
    assert str(Rewrites.parse(str(p))) == str(p) and "prune=0.5:30000" in str(p)
    with pytest.raises(ValueError, match="prune=x"):
        Rewrites.parse("prune=x")
    with pytest.raises(ValueError, match="replace the same op"):
        Rewrites.parse("google,flash_attention")
    with pytest.raises(ValueError, match="winograd_tile"):
        Rewrites.parse("winograd", winograd_tile=3)
    with pytest.raises(ValueError, match="gelu_approximate"):
        ModelOptions.make(gelu_approximate="sigmoid")


def test_bad_inputs_are_clear_errors(tiny):
    unet = weights.load_unet(tiny / "unet")
    with pytest.raises(ValueError, match="NHWC latents with 4 channels"):
        unet(np.zeros((1, 4, 8, 8), np.float32), 1, np.zeros((1, 77, 32), np.float32))
    with pytest.raises(ValueError, match="timestep"):
        unet(np.zeros((2, 8, 8, 4), np.float32), [1, 2, 3], np.zeros((2, 77, 32), np.float32))
    te = weights.load_text_encoder(tiny / "text_encoder")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        te(np.zeros((1, 78), np.int64))
    with pytest.raises(ValueError, match="integer token ids"):
        te(np.zeros((1, 5), np.float32))


def test_recording_names_every_module_output(tiny):
    """``recording()`` keeps each module's output under its capture-bundle name
    (``{stage}/step_{i}/{module path}``), the tensor the module returned."""
    from refsd.context import recording

    comp = weights.load_pipeline(tiny, tokenizer=False)
    with recording() as rec:
        h, eps, img = _run_all(comp)
    assert rec["text_encoder/text_encoder"] is h
    assert rec["unet/step_3/unet"] is eps
    # decode_latents scales first, then calls the model: the root output is the image
    np.testing.assert_array_equal(rec["vae/vae"], img)
    conv = rec["unet/step_3/unet.down_blocks.0.downsamplers.0.conv"]
    assert conv.shape == (2, 8, 8, 32)
    names = [k for k in rec if k.startswith("unet/step_3/unet.down_blocks.0.resnets.0")]
    assert "unet/step_3/unet.down_blocks.0.resnets.0.conv1" in names
    assert not any("#" in k for k in rec), "no module runs twice at one location in one forward"
    # a second forward at the same location does not overwrite the first
    with recording(rec), location("unet", step=3):
        again = comp.unet(np.zeros((2, 16, 16, 4), np.float32), 981, h)
    assert rec["unet/step_3/unet"] is eps and rec["unet/step_3/unet#1"] is again
