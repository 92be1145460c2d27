"""``refsd make-tiny``: deterministic, complete, torch-free, with the real CLIP tokenizer."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refsd import weights
from refsd.data import clip_bpe
from refsd.cli import main
from refsd.tiny import make_tiny

EXPECTED_FILES = {
    "model_index.json", "refsd_tiny.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
}
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with the real CLIP tokenizer


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_deterministic_byte_for_byte(tmp_path, arch):
    a = digests(make_tiny(tmp_path / "a", arch, seed=5))
    b = digests(make_tiny(tmp_path / "b", arch, seed=5))
    assert set(a) == EXPECTED_FILES
    assert a == b
    c = digests(make_tiny(tmp_path / "c", arch, seed=6))
    changed = {k for k in a if a[k] != c[k]}
    assert changed == {"refsd_tiny.json", "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                       "vae/diffusion_pytorch_model.safetensors"}


def test_cli_writes_the_folder(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "x"), "--arch", "sd21", "--seed", "3"]) == 0
    assert "sd21" in capsys.readouterr().out
    assert json.loads((tmp_path / "x" / "refsd_tiny.json").read_text())["seed"] == 3
    assert main(["make-tiny", str(tmp_path / "y"), "--arch", "sd3"]) == 2


def test_does_not_import_torch(tmp_path):
    code = ("import sys; from refsd.tiny import make_tiny; make_tiny(sys.argv[1], 'sd21', 0); "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "t")], check=True)


def test_vocab_is_clips():
    vocab, merges = clip_bpe()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["cat</w>"] == 2368 and vocab["photo</w>"] == 1125


@pytest.mark.parametrize("arch, pad_id", [("sd15", 49407), ("sd21", 0)])
def test_tokenizer(tmp_path, arch, pad_id):
    pytest.importorskip("transformers")
    path = make_tiny(tmp_path, arch, seed=0)
    tok = weights.load_tokenizer(path / "tokenizer")
    assert tok("a photo of a cat").input_ids == CAT_IDS
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[:7] == CAT_IDS and set(ids[7:]) == {pad_id}
    assert tok.model_max_length == 77
    # The folder's own files, as transformers' constructor takes them.
    from transformers import CLIPTokenizer
    vocab = json.loads((path / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (path / "tokenizer" / "merges.txt").read_text(encoding="utf-8")
              .splitlines()[1:]]
    assert CLIPTokenizer(vocab=vocab, merges=merges)("a photo of a cat").input_ids == CAT_IDS


@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_folder_loads_and_runs(tmp_path, arch):
    path = make_tiny(tmp_path, arch, seed=1)
    comp = weights.load_pipeline(path, tokenizer=False)
    sd21 = arch == "sd21"
    assert comp.text_encoder.config.hidden_act == ("gelu" if sd21 else "quick_gelu")
    assert comp.unet.config.use_linear_projection is sd21 and comp.unet.config.upcast_attention is sd21
    assert comp.scheduler_config["prediction_type"] == ("v_prediction" if sd21 else "epsilon")
    assert comp.model_index["_class_name"] == "StableDiffusionPipeline"
    h = comp.text_encoder(np.array([CAT_IDS + [49407] * 70]))
    eps = comp.unet(np.zeros((1, 16, 16, 4), np.float32), 500, h)
    img = comp.vae.decode_latents(eps)
    assert h.shape == (1, 77, 32) and eps.shape == (1, 16, 16, 4) and img.shape == (1, 32, 32, 3)
    assert all(np.isfinite(a).all() for a in (h, eps, img))
    assert 0.1 < np.abs(eps).max() < 100  # weights scaled to keep activations O(1)
