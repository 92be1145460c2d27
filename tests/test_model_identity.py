"""model_sha256 covers exactly the bytes the loader reads (refsd.weights)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from refsd.weights import model_files, model_sha256
from refsd.pipeline import Pipeline
from refsd.weights import WeightsError, load_unet, read_safetensors, write_safetensors

_OPENED: list[str] | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed: it records only while _OPENED is a list


@pytest.fixture
def model(tiny_sd21, tmp_path):
    return Path(shutil.copytree(tiny_sd21, tmp_path / "model"))


def test_hashes_exactly_the_files_the_pipeline_opens(model):
    global _OPENED
    _OPENED = []
    try:
        Pipeline(model)
    finally:
        opened, _OPENED = _OPENED, None
    root = model.resolve()
    read = {Path(p).resolve() for p in opened if Path(p).resolve().is_relative_to(root) and Path(p).is_file()}
    assert read == {p.resolve() for p in model_files(model)}


def test_every_hashed_byte_counts_and_nothing_else(model):
    before = model_sha256(model)
    (model / "README.md").write_text("notes")
    (model / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"another variant")
    assert model_sha256(model) == before  # refsd_tiny.json, README and another variant are not read
    for f in model_files(model):
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        f.write_bytes(raw)
        assert model_sha256(model) != before, f
        raw[len(raw) // 2] ^= 0x01
        f.write_bytes(raw)
    assert model_sha256(model) == before


def test_a_shard_outside_the_folder_is_refused_not_ignored(model):
    # The attack: an index naming ../../outside.safetensors loaded weights model_sha256 never hashed.
    unet = model / "unet"
    shutil.move(unet / "diffusion_pytorch_model.safetensors", model.parent / "outside.safetensors")
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"conv_in.weight": "../../outside.safetensors"}}')
    with pytest.raises(WeightsError, match="schema violation at weight_map/conv_in.weight"):
        model_sha256(model)


def test_sharded_weights_are_hashed_shard_by_shard(model):
    unet = model / "unet"
    state = read_safetensors(unet / "diffusion_pytorch_model.safetensors")
    names = sorted(state)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        write_safetensors(unet / shard, {k: state[k] for k in keys})
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: s for s, keys in halves.items() for k in keys}}))
    load_unet(unet)  # the sharded folder loads
    files = {p.relative_to(model).as_posix() for p in model_files(model)}
    assert {"unet/a.safetensors", "unet/b.safetensors", "unet/diffusion_pytorch_model.safetensors.index.json"} <= files
    before = model_sha256(model)
    raw = bytearray((unet / "b.safetensors").read_bytes())
    raw[-1] ^= 0x01
    (unet / "b.safetensors").write_bytes(raw)
    assert model_sha256(model) != before
