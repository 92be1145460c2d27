"""refsd.weights: the safetensors reader / writer and the strict loader's errors."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from refsd import weights
from refsd.models import WeightsError
from refsd.models.unet import UNetConfig
from refsd.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("sd15"), "sd15", seed=0)


@pytest.fixture
def unet_copy(tiny, tmp_path):
    d = tmp_path / "unet"
    shutil.copytree(tiny / "unet", d)
    return d


def _rewrite_state(component_dir, edit):
    f = component_dir / "diffusion_pytorch_model.safetensors"
    state = {k: np.array(v) for k, v in weights.read_safetensors(f).items()}
    edit(state)
    weights.write_safetensors(f, state)


# ---------------------------------------------------------------- safetensors


def test_roundtrip_dtypes_and_memmap(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "b.f32": rng.standard_normal((3, 4)).astype(np.float32),
        "a.f16": rng.standard_normal((5,)).astype(np.float16),
        "c.i64": np.arange(6, dtype=np.int64).reshape(1, 6),
        "d.empty": np.zeros((0, 3), np.float32),
        "e.scalar": np.array(2.5, np.float32),
    }
    f = tmp_path / "t.safetensors"
    weights.write_safetensors(f, tensors)
    out, meta = weights.read_safetensors(f, metadata=True)
    assert meta == {"format": "pt"}
    assert sorted(out) == sorted(tensors)
    again = tmp_path / "again.safetensors"
    weights.write_safetensors(again, dict(reversed(tensors.items())))
    assert again.read_bytes() == f.read_bytes()  # deterministic: the layout does not follow dict order
    for k, v in tensors.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v)
    assert isinstance(out["b.f32"], np.memmap) and not out["b.f32"].flags.writeable
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    assert n % 8 == 0


def test_interoperates_with_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(1)
    tensors = {"w": rng.standard_normal((4, 3)).astype(np.float32), "h": rng.standard_normal(7).astype(np.float16)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    weights.write_safetensors(ours, tensors)
    st.save_file(tensors, str(theirs))
    for k, v in st.load_file(str(ours)).items():
        np.testing.assert_array_equal(v, tensors[k])
    for k, v in weights.read_safetensors(theirs).items():
        np.testing.assert_array_equal(v, tensors[k])


def test_bfloat16_is_widened_exactly(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 65504.0, 1e-3], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2")  # truncation: exact for these values but 1e-3
    header = json.dumps({"x": {"dtype": "BF16", "shape": [5], "data_offsets": [0, 10]}}).encode()
    header += b" " * (-len(header) % 8)
    f = tmp_path / "bf16.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + bf16.tobytes())
    x = weights.read_safetensors(f)["x"]
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, (bf16.astype(np.uint32) << 16).view(np.float32))


@pytest.mark.parametrize("damage", ["short", "header_len", "json", "offsets"])
def test_corrupt_files_are_clear_errors(tmp_path, damage):
    f = tmp_path / "x.safetensors"
    weights.write_safetensors(f, {"w": np.ones((4, 4), np.float32)})
    raw = f.read_bytes()
    if damage == "short":
        raw = raw[:5]
    elif damage == "header_len":
        raw = struct.pack("<Q", 10**12) + raw[8:]
    elif damage == "json":
        raw = raw[:8] + b"x" + raw[9:]
    else:
        raw = raw[:-4]  # truncated data
    f.write_bytes(raw)
    with pytest.raises(WeightsError, match="safetensors|truncated"):
        weights.read_safetensors(f)


# ---------------------------------------------------------------- strict loading


def test_missing_key_is_named(unet_copy):
    _rewrite_state(unet_copy, lambda s: s.pop("mid_block.attentions.0.proj_in.weight"))
    with pytest.raises(WeightsError) as e:
        weights.load_unet(unet_copy)
    msg = str(e.value)
    assert "1 missing key:" in msg and "mid_block.attentions.0.proj_in.weight" in msg
    assert str(unet_copy) in msg and "unexpected" not in msg


def test_unexpected_key_is_named(unet_copy):
    _rewrite_state(unet_copy, lambda s: s.update({"mid_block.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(WeightsError, match=r"1 unexpected key:\s+mid_block\.extra\.weight"):
        weights.load_unet(unet_copy)


def test_shape_mismatch_names_key_and_both_shapes(unet_copy):
    def edit(s):
        s["conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)
    _rewrite_state(unet_copy, edit)
    with pytest.raises(WeightsError) as e:
        weights.load_unet(unet_copy)
    assert "conv_in.weight: checkpoint (32, 4, 1, 1), model expects (32, 4, 3, 3)" in str(e.value)


def test_all_problems_reported_at_once(unet_copy):
    def edit(s):
        s.pop("conv_out.bias")
        s["foo"] = np.zeros(1, np.float32)
        s["conv_in.bias"] = np.zeros(31, np.float32)
    _rewrite_state(unet_copy, edit)
    with pytest.raises(WeightsError) as e:
        weights.load_unet(unet_copy)
    msg = str(e.value)
    assert "conv_out.bias" in msg and "foo" in msg and "conv_in.bias" in msg


def test_config_of_another_model_is_a_clear_error(tiny, tmp_path):
    d = tmp_path / "unet"
    shutil.copytree(tiny / "unet", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["block_out_channels"] = [32, 64, 64]
    cfg["down_block_types"] += ["DownBlock2D"]
    cfg["up_block_types"] = ["UpBlock2D"] + cfg["up_block_types"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="missing keys.*unexpected keys|config.json that does not belong"):
        weights.load_unet(d)


class _Boom:
    """Unpickling this would create a file: proves the loader never unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bin_only_folder_is_refused_without_unpickling(tmp_path):
    d = tmp_path / "unet"
    d.mkdir()
    marker = tmp_path / "UNPICKLED"
    (d / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    (d / "config.json").write_text(json.dumps({"block_out_channels": [32, 64],
                                               "down_block_types": ["DownBlock2D", "DownBlock2D"],
                                               "up_block_types": ["UpBlock2D", "UpBlock2D"],
                                               "cross_attention_dim": 32}))
    with pytest.raises(WeightsError) as e:
        weights.load_unet(d)
    msg = str(e.value)
    assert "diffusion_pytorch_model.bin" in msg and "safetensors" in msg and "save_pretrained" in msg
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.ckpt", "weights.pt", "pytorch_model.bin"])
def test_pickle_files_are_refused(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b"\x80\x04N.")
    with pytest.raises(WeightsError, match="refusing PyTorch pickle.*from_single_file|refusing PyTorch pickle"):
        weights.read_safetensors(f)
    with pytest.raises(WeightsError, match="refusing PyTorch pickle"):
        weights.load_pipeline(f)


def test_ckpt_next_to_no_model_index(tmp_path):
    (tmp_path / "v1-5-pruned.ckpt").write_bytes(b"\x80\x04N.")
    with pytest.raises(WeightsError, match="from_single_file"):
        weights.load_pipeline(tmp_path)


def test_missing_component_and_config(tiny, tmp_path):
    d = tmp_path / "sd"
    shutil.copytree(tiny, d)
    (d / "vae" / "config.json").unlink()
    with pytest.raises(WeightsError, match="missing config.json"):
        weights.load_pipeline(d, tokenizer=False)
    shutil.rmtree(d / "vae")
    with pytest.raises(WeightsError, match="missing component folder.*vae"):
        weights.load_pipeline(d, tokenizer=False)


# ---------------------------------------------------------------- configs


def test_config_required_and_unsupported_keys():
    with pytest.raises(ValueError, match="missing required key.*cross_attention_dim"):
        UNetConfig.from_dict({"block_out_channels": [32], "down_block_types": ["DownBlock2D"],
                              "up_block_types": ["UpBlock2D"]})
    base = {"block_out_channels": [32], "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"],
            "cross_attention_dim": 32, "norm_num_groups": 8, "some_future_key": 1}
    assert UNetConfig.from_dict(base).block_out_channels == (32,)  # unknown keys ignored
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_dict({**base, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNetConfig.from_dict({**base, "down_block_types": ["SimpleCrossAttnDownBlock2D"]})


# ---------------------------------------------------------------- formats


def test_fp16_stored_weights_load_as_stored(tmp_path):
    d16 = make_tiny(tmp_path / "f16", "sd15", seed=0, dtype="float16")
    d32 = make_tiny(tmp_path / "f32", "sd15", seed=0)
    st = weights.read_safetensors(d16 / "unet" / "diffusion_pytorch_model.safetensors")
    assert st["conv_in.weight"].dtype == np.float16
    u16, u32 = weights.load_unet(d16 / "unet"), weights.load_unet(d32 / "unet")
    assert u16.conv_in.weight.dtype == np.float32  # widened once, HWIO
    np.testing.assert_array_equal(u16.conv_in.weight,
                                  u32.conv_in.weight.astype(np.float16).astype(np.float32))
    # fp16-storage modes round the float32 weights once at load: the same values.
    u32h = weights.load_unet(d32 / "unet", precision="f32_f16")
    np.testing.assert_array_equal(u32h.conv_in.weight, u16.conv_in.weight)
    assert not u32h.conv_in.weight.flags.writeable


def test_sharded_and_variant_files(tiny, tmp_path):
    d = tmp_path / "unet"
    d.mkdir()
    shutil.copy(tiny / "unet" / "config.json", d)
    state = weights.read_safetensors(tiny / "unet" / "diffusion_pytorch_model.safetensors")
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        weights.write_safetensors(d / name, {k: state[k] for k in ks})
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    ref = weights.load_unet(tiny / "unet")
    sharded = weights.load_unet(d)
    np.testing.assert_array_equal(sharded.conv_out.weight, ref.conv_out.weight)

    v = tmp_path / "variant"
    v.mkdir()
    shutil.copy(tiny / "unet" / "config.json", v)
    weights.write_safetensors(v / "diffusion_pytorch_model.fp16.safetensors",
                              {k: np.asarray(a).astype(np.float16) for k, a in state.items()})
    assert weights.find_weights(v, variant="fp16")[0].name == "diffusion_pytorch_model.fp16.safetensors"
    assert weights.load_unet(v, variant="fp16").conv_in.weight is not None
    assert weights.load_unet(v).conv_in.weight is not None  # the only file there


def test_legacy_vae_attention_keys_and_conv_shapes(tiny, tmp_path):
    """Old VAE checkpoints: query/key/value/proj_attn, stored (C, C, 1, 1)."""
    d = tmp_path / "vae"
    shutil.copytree(tiny / "vae", d)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def edit(s):
        for k in [k for k in s if ".attentions." in k]:
            for new, old in legacy.items():
                if f".{new}." in k:
                    v = s.pop(k)
                    s[k.replace(f".{new}.", f".{old}.")] = v.reshape(v.shape + (1, 1)) if v.ndim == 2 else v
    _rewrite_state(d, edit)
    keys = weights.read_safetensors(d / "diffusion_pytorch_model.safetensors")
    assert "decoder.mid_block.attentions.0.query.weight" in keys
    assert keys["decoder.mid_block.attentions.0.proj_attn.weight"].ndim == 4
    z = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(weights.load_vae(d).decode(z), weights.load_vae(tiny / "vae").decode(z))


def test_text_encoder_without_prefix_and_with_position_ids(tiny, tmp_path):
    """transformers 5 saves CLIPTextModel keys without ``text_model.``; older
    checkpoints carry the ``position_ids`` buffer. Both load to the same model."""
    d = tmp_path / "text_encoder"
    shutil.copytree(tiny / "text_encoder", d)
    f = d / "model.safetensors"
    state = {k.removeprefix("text_model."): np.array(v) for k, v in weights.read_safetensors(f).items()}
    state["embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    weights.write_safetensors(f, state)
    ids = np.array([[49406, 320, 1125, 49407]])
    np.testing.assert_array_equal(weights.load_text_encoder(d)(ids),
                                  weights.load_text_encoder(tiny / "text_encoder")(ids))


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_converted_tensors_release_their_mapped_pages(tmp_path):
    # A converting load (conv OIHW -> HWIO, fp16 rounding) must not keep the
    # checkpoint's pages resident beside the model's own copy.
    from refsd.models.loading import drop_mapped_pages

    rng = np.random.default_rng(0)
    big = rng.standard_normal((16, 1024, 1024)).astype(np.float32)  # 64 MiB
    weights.write_safetensors(tmp_path / "w.safetensors", {"a": big[:1, :1, :7].copy(), "w": big})
    src = weights.read_safetensors(tmp_path / "w.safetensors")["w"]
    before = _rss_file_kb()
    assert np.array_equal(src, big)  # touches every page
    touched = _rss_file_kb()
    assert touched - before > 48 * 1024
    drop_mapped_pages(src)
    assert touched - _rss_file_kb() > 48 * 1024
    assert np.array_equal(src, big)  # still readable: the page cache refaults them
