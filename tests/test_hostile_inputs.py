"""The malformed-input corpus: bundles, model folders and command-line options
that must each give exit 2 and exactly one stderr line naming the file, key or
option: no traceback, no hang, no allocation beyond the input, nothing accepted.

Cases run in-process through each CLI's ``main(argv)`` (the same code path as
the console scripts, minus interpreter start-up). The cases that would hang or
blow up memory if a check regressed (FIFOs, decompression bombs, huge .npy
headers, 150k-member zips, absurd image sizes) run as subprocesses with the
corpus's bounds: 10 s wall (a hung case is killed, not waited for) and 500 MB
peak RSS of that process (its VmHWM, written by the process itself at exit).
In-process cases are held to the 10 s bound too.

Model folders are copies of the tiny SD 2.1 model (made once per session), with
files hard-linked: every mutation replaces a file (unlink, then write), never
writes into one, so the shared original is never touched.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import zip_bundle
from refsd_validate.bundle import tensor_file
from refsd_validate.cli import main as validate_main

from refsd.cli import main as refsd_main

LIMIT_S = 10.0
LIMIT_RSS_MB = 500.0
DEEP = 100_000  # nesting depth of the deep-JSON cases (CPython's parser recurses ~1000 deep)


# ---------------------------------------------------------------- helpers


def _replace(path: Path, data: bytes | str) -> None:
    """Replace ``path`` by a new file (never writing through a hard link into the shared original)."""
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    _replace(path, json.dumps(doc))


def _set(path_in_model: str, key: str, value):
    def mutate(m: Path) -> None:
        _edit_json(m / path_in_model, lambda d: d.__setitem__(key, value))
    return mutate


def _st_parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st_write(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    _replace(path, struct.pack("<Q", len(raw)) + raw + data)


UNET_ST = "unet/diffusion_pytorch_model.safetensors"
VAE_ST = "vae/diffusion_pytorch_model.safetensors"
TEXT_ST = "text_encoder/model.safetensors"


def _st_edit(rel: str, edit):
    """Rewrite a weights file's header with ``edit(header)`` (data unchanged)."""
    def mutate(m: Path) -> None:
        header, data = _st_parts(m / rel)
        edit(header)
        _st_write(m / rel, header, data)
    return mutate


def _tensors(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _overlap(header: dict) -> None:
    # A tensor aliased onto the one before it of the same byte size: loads unless offsets are checked.
    names = _tensors(header)
    size = {k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in names}
    a, b = next((a, b) for a, b in zip(names, names[1:]) if size[a] == size[b])
    header[b]["data_offsets"] = list(header[a]["data_offsets"])


def _st_duplicate_key(m: Path) -> None:
    # A tensor listed twice: the safetensors library keeps the last entry; which one is meant?
    header, data = _st_parts(m / TEXT_ST)
    last = _tensors(header)[-1]
    text = json.dumps(header)
    _st_write(m / TEXT_ST, (text[:-1] + f", {json.dumps(last)}: {json.dumps(header[last])}}}").encode(), data)


def _first(header: dict) -> dict:
    return header[_tensors(header)[0]]


def _shard(m: Path, weight_map_value) -> None:
    """unet/ as an index naming ``weight_map_value`` for every tensor (the single file removed)."""
    header, _ = _st_parts(m / UNET_ST)
    (m / UNET_ST).unlink()
    wm = {k: weight_map_value for k in header if k != "__metadata__"}
    _replace(m / "unet/diffusion_pytorch_model.safetensors.index.json", json.dumps({"weight_map": wm}))


def _sharded_outside(m: Path) -> None:
    # The shard exists, a perfectly good file, but outside the model folder.
    shutil.copyfile(m / UNET_ST, m.parent / "outside.safetensors")
    _shard(m, "../../outside.safetensors")


def _mkfifo(rel: str):
    def mutate(m: Path) -> None:
        (m / rel).unlink()
        os.mkfifo(m / rel)
    return mutate


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npy_declaring(shape: tuple) -> bytes:
    """An .npy whose header declares ``shape`` float32 but holds 16 bytes."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape!r}, }}".encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 16


@pytest.fixture(scope="session", autouse=True)
def _imports_done():
    """Import what the commands import lazily, once, so a case's time is the case's, not the
    interpreter's first import of transformers (seconds on a loaded machine)."""
    import jsonschema  # noqa: F401
    import refsd_validate.certify  # noqa: F401
    import safetensors  # noqa: F401
    from transformers import CLIPTokenizer  # noqa: F401

    import refsd.pipeline  # noqa: F401


@pytest.fixture(scope="session")
def base_model(tiny_sd21):
    return tiny_sd21


@pytest.fixture
def model(base_model, tmp_path):
    """A hard-linked copy of the tiny model to mutate (see the module docstring)."""
    return Path(shutil.copytree(base_model, tmp_path / "model", copy_function=os.link))


def _run(main, argv, capsys, prog):
    start = time.monotonic()
    rc = main([str(a) for a in argv])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert seconds < LIMIT_S, f"{seconds:.1f} s"
    return lines[0]


def _generate(model, tmp, *extra):
    return ["generate", "--model", model, "--prompt", "a cat", "--steps", "1", "--height", "16", "--width", "16",
            "--quiet", "--out", tmp / "x.png", *extra]


# ---------------------------------------------------------------- model folders (refsd generate)

MODEL_CASES = [
    # configs: syntax, encoding, nesting, kind
    ("unet_config_deep", lambda m: _replace(m / "unet/config.json", "[" * DEEP + "]" * DEEP),
     "unet/config.json: JSON nested too deeply"),
    ("unet_config_not_utf8", lambda m: _replace(m / "unet/config.json", b'{"a": "\xff"}'),
     "unet/config.json: not UTF-8 text (byte 0xff"),
    ("unet_config_bad_json", lambda m: _replace(m / "unet/config.json", '{"in_channels": 4,'),
     "unet/config.json: not valid JSON"),
    ("unet_config_list", lambda m: _replace(m / "unet/config.json", "[1, 2]"),
     "unet/config.json: expected a JSON object"),
    ("unet_config_inf", lambda m: _replace(m / "unet/config.json", '{"norm_eps": 1e400}'),
     "unet/config.json: not valid JSON (number 1e400 overflows"),
    ("unet_config_nan", lambda m: _replace(m / "unet/config.json", '{"norm_eps": NaN}'),
     "unet/config.json: not valid JSON (non-standard JSON constant NaN"),
    ("unet_config_duplicate_key", lambda m: _replace(m / "unet/config.json", (m / "unet/config.json").read_text()[:-2]
                                                     + ', "in_channels": 9}'), "duplicate key 'in_channels'"),
    ("unet_config_dir", lambda m: ((m / "unet/config.json").unlink(), (m / "unet/config.json").mkdir()),
     "unet/config.json: is a directory"),
    ("unet_config_missing", lambda m: (m / "unet/config.json").unlink(), "missing config.json"),
    ("vae_config_surrogate", lambda m: _replace(m / "vae/config.json", '{"act_fn": "\\ud800"}'),
     "vae/config.json: string at /act_fn holds a lone UTF-16 surrogate"),
    # configs: types and ranges
    ("unet_in_channels_str", _set("unet/config.json", "in_channels", "4"),
     "unet/config.json: schema violation at in_channels"),
    ("unet_in_channels_float", _set("unet/config.json", "in_channels", 4.0), "schema violation at in_channels"),
    ("unet_groups_zero", _set("unet/config.json", "norm_num_groups", 0), "schema violation at norm_num_groups"),
    ("unet_layers_str", _set("unet/config.json", "layers_per_block", "2"), "schema violation at layers_per_block"),
    ("unet_blocks_float", _set("unet/config.json", "block_out_channels", [32.0, 64.0]),
     "schema violation at block_out_channels/"),
    ("unet_blocks_empty", _set("unet/config.json", "block_out_channels", []), "schema violation at block_out_channels"),
    ("unet_heads_zero", _set("unet/config.json", "attention_head_dim", 0), "schema violation at attention_head_dim"),
    ("unet_cross_dim_bool", _set("unet/config.json", "cross_attention_dim", True),
     "schema violation at cross_attention_dim"),
    ("unet_eps_negative", _set("unet/config.json", "norm_eps", -1e-5), "schema violation at norm_eps"),
    ("unet_block_type_int", _set("unet/config.json", "down_block_types", [1, 2]),
     "schema violation at down_block_types/"),
    ("unet_groups_indivisible", _set("unet/config.json", "norm_num_groups", 3),
     "unet/config.json: GroupNorm: 3 groups do not divide 32 channels"),
    ("unet_heads_indivisible", _set("unet/config.json", "attention_head_dim", 3),
     "unet/config.json: 3 attention heads do not divide"),
    ("unet_layers_million", _set("unet/config.json", "layers_per_block", 10**6),
     "schema violation at layers_per_block"),
    ("unet_freq_shift_huge", _set("unet/config.json", "freq_shift", 1e300), "schema violation at freq_shift"),
    ("unet_padding_huge", _set("unet/config.json", "downsample_padding", 10**9),
     "schema violation at downsample_padding"),
    ("unet_too_many_blocks", _set("unet/config.json", "block_out_channels", [32] * 100),
     "schema violation at block_out_channels"),
    ("vae_groups_indivisible", _set("vae/config.json", "norm_num_groups", 5), "vae/config.json: GroupNorm: 5 groups"),
    ("vae_scaling_str", _set("vae/config.json", "scaling_factor", "0.18"),
     "vae/config.json: schema violation at scaling_factor"),
    ("vae_scaling_zero", _set("vae/config.json", "scaling_factor", 0), "schema violation at scaling_factor"),
    ("vae_latent_zero", _set("vae/config.json", "latent_channels", 0), "schema violation at latent_channels"),
    ("vae_blocks_dict", _set("vae/config.json", "block_out_channels", {"a": 1}),
     "schema violation at block_out_channels"),
    ("text_hidden_bool", _set("text_encoder/config.json", "hidden_size", True),
     "text_encoder/config.json: schema violation at hidden_size"),
    ("text_vocab_negative", _set("text_encoder/config.json", "vocab_size", -1), "schema violation at vocab_size"),
    ("text_layers_float", _set("text_encoder/config.json", "num_hidden_layers", 2.5),
     "schema violation at num_hidden_layers"),
    ("text_heads_indivisible", _set("text_encoder/config.json", "num_attention_heads", 7), "heads do not divide"),
    ("model_index_list", lambda m: _replace(m / "model_index.json", "[]"), "model_index.json: expected a JSON object"),
    ("model_index_deep", lambda m: _replace(m / "model_index.json", '{"a":' * DEEP + "1" + "}" * DEEP),
     "model_index.json: JSON nested too deeply"),
    # scheduler
    ("scheduler_class_list", _set("scheduler/scheduler_config.json", "_class_name", ["DDIMScheduler"]),
     "_class_name must be a string"),
    ("scheduler_list", lambda m: _replace(m / "scheduler/scheduler_config.json", "[]"),
     "scheduler_config.json: expected a JSON object"),
    ("beta_start_negative", _set("scheduler/scheduler_config.json", "beta_start", -1),
     "beta_start=-1 is not supported"),
    ("beta_end_two", _set("scheduler/scheduler_config.json", "beta_end", 2.0), "beta_end=2.0 is not supported"),
    ("beta_start_str", _set("scheduler/scheduler_config.json", "beta_start", "0.001"), "beta_start='0.001'"),
    ("train_steps_huge", _set("scheduler/scheduler_config.json", "num_train_timesteps", 10**12),
     "num_train_timesteps=1000000000000 is not supported"),
    ("train_steps_float", _set("scheduler/scheduler_config.json", "num_train_timesteps", 1000.0),
     "num_train_timesteps=1000.0 is not supported"),
    ("trained_betas_negative", _set("scheduler/scheduler_config.json", "trained_betas", [-0.5] * 1000),
     "trained_betas="),
    # tokenizer
    ("tokenizer_config_missing", lambda m: (m / "tokenizer/tokenizer_config.json").unlink(),
     "tokenizer/tokenizer_config.json: missing"),
    ("vocab_bad_json", lambda m: _replace(m / "tokenizer/vocab.json", '{"a": 1,'),
     "tokenizer/vocab.json: not valid JSON"),
    ("vocab_garbage", lambda m: _replace(m / "tokenizer/vocab.json", bytes(range(256)) * 4),
     "tokenizer/vocab.json: not UTF-8 text"),
    ("vocab_str_ids", lambda m: _replace(m / "tokenizer/vocab.json", '{"a": "1"}'),
     "tokenizer/vocab.json: every token id must be a non-negative integer"),
    ("vocab_list", lambda m: _replace(m / "tokenizer/vocab.json", "[1]"),
     "tokenizer/vocab.json: expected a JSON object"),
    ("merges_garbage", lambda m: _replace(m / "tokenizer/merges.txt", b"\xfe\xff\x00garbage"),
     "tokenizer/merges.txt: not UTF-8 text"),
    ("merges_missing", lambda m: (m / "tokenizer/merges.txt").unlink(), "no tokenizer files"),
    ("special_tokens_list", lambda m: _replace(m / "tokenizer/special_tokens_map.json", "[]"),
     "special_tokens_map.json: expected a JSON object"),
    ("tokenizer_config_deep", lambda m: _replace(m / "tokenizer/tokenizer_config.json", "[" * DEEP + "]" * DEEP),
     "tokenizer_config.json: JSON nested too deeply"),
    ("vocab_ids_past_encoder", lambda m: _edit_json(m / "tokenizer/vocab.json",
                                                    lambda d: d.update({k: v + 10**6 for k, v in d.items()})),
     "outside the text encoder's vocabulary"),
    # safetensors
    ("st_offsets_strings", _st_edit(UNET_ST, lambda h: _first(h).update(data_offsets=[str(x) for x in
                                                                                    _first(h)["data_offsets"]])),
     "unet/diffusion_pytorch_model.safetensors: corrupt safetensors file"),
    ("st_offsets_floats", _st_edit(UNET_ST, lambda h: _first(h).update(data_offsets=[float(x) for x in
                                                                                   _first(h)["data_offsets"]])),
     "corrupt safetensors file"),
    ("st_dtype_list", _st_edit(UNET_ST, lambda h: _first(h).update(dtype=["F32"])), "corrupt safetensors file"),
    ("st_shape_float", _st_edit(VAE_ST, lambda h: _first(h).update(shape=[float(s) for s in _first(h)["shape"]])),
     "vae/diffusion_pytorch_model.safetensors: corrupt safetensors file"),
    ("st_overlap", _st_edit(UNET_ST, _overlap), "corrupt safetensors file"),
    ("st_gap", lambda m: _st_write(m / TEXT_ST, *(lambda h, d: (h, d + b"\0" * 8))(*_st_parts(m / TEXT_ST))),
     "text_encoder/model.safetensors: corrupt safetensors file"),
    ("st_header_deep", lambda m: _st_write(m / TEXT_ST, b"[" * DEEP + b"]" * DEEP, b""), "corrupt safetensors file"),
    ("st_header_length_lies", lambda m: _replace(m / TEXT_ST, struct.pack("<Q", 1 << 40) + b"{}"),
     "corrupt safetensors file"),
    ("st_short", lambda m: _replace(m / TEXT_ST, b"abc"), "corrupt safetensors file"),
    ("st_header_not_utf8", lambda m: _st_write(m / TEXT_ST, b'{"\xff": 1}', b""), "corrupt safetensors file"),
    ("st_shape_wraps", _st_edit(UNET_ST, lambda h: _first(h).update(shape=[2**32, 2**32])), "corrupt safetensors file"),
    ("st_dtype_unsupported", _st_edit(UNET_ST, lambda h: _first(h).update(dtype="U32")), "unsupported dtype U32"),
    ("st_tensor_missing", _st_edit(UNET_ST, lambda h: h.pop(_tensors(h)[-1])), "corrupt safetensors file"),
    ("st_duplicate_key", _st_duplicate_key, "(safetensors header): not valid JSON (duplicate key"),
    ("st_is_dir", lambda m: ((m / TEXT_ST).unlink(), (m / TEXT_ST).mkdir()), "is a directory, not a regular file"),
    ("index_list", lambda m: (_shard(m, "x.safetensors"),
                              _replace(m / "unet/diffusion_pytorch_model.safetensors.index.json", "[]")),
     "safetensors.index.json: expected a JSON object"),
    ("index_escapes", _sharded_outside, "index.json: schema violation at weight_map/"),
    ("index_absolute", lambda m: _shard(m, "/etc/passwd.safetensors"), "index.json: schema violation at weight_map/"),
    ("index_int_values", lambda m: _shard(m, 3), "index.json: schema violation at weight_map/"),
    ("index_missing_shard", lambda m: _shard(m, "absent.safetensors"), "absent.safetensors: no such file"),
    ("pickle_only", lambda m: ((m / TEXT_ST).unlink(), _replace(m / "text_encoder/pytorch_model.bin", pickle.dumps(1))),
     "refusing PyTorch pickle checkpoint"),
    ("unet_folder_missing", lambda m: shutil.rmtree(m / "unet"), "model/unet: no such folder"),
]


@pytest.mark.parametrize("mutate, fragment", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_malformed_model_folder(mutate, fragment, model, tmp_path, capsys):
    mutate(model)
    line = _run(refsd_main, _generate(model, tmp_path), capsys, "refsd")
    assert fragment in line, line
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- command-line options (refsd generate, fp16-check)

def _latents(tmp: Path, data: bytes) -> Path:
    p = tmp / "latents.npy"
    p.write_bytes(data)
    return p


CLI_CASES = [
    ("guidance_nan", lambda t: ["--guidance", "nan"], "--guidance must be a finite number in [0, 1000], got nan"),
    ("guidance_inf", lambda t: ["--guidance", "inf"], "--guidance must be a finite number in [0, 1000]"),
    ("guidance_negative", lambda t: ["--guidance", "-1"], "--guidance must be a finite number in [0, 1000]"),
    ("guidance_huge", lambda t: ["--guidance", "1e6"], "--guidance must be a finite number in [0, 1000]"),
    ("guidance_text", lambda t: ["--guidance", "lots"], "argument --guidance: invalid float value"),
    ("steps_zero", lambda t: ["--steps", "0"], "--steps must be in [1, 1000], got 0"),
    ("steps_huge", lambda t: ["--steps", "100000"], "--steps must be in [1, 1000]"),
    ("steps_float", lambda t: ["--steps", "2.0"], "argument --steps: invalid int value"),
    ("height_huge", lambda t: ["--height", "65536"], "--height must be in [1, 16384], got 65536"),
    ("width_zero", lambda t: ["--width", "0"], "--width must be in [1, 16384], got 0"),
    ("size_over_memory", lambda t: ["--height", "16384", "--width", "16384"], "over this machine's bound"),
    ("height_not_multiple", lambda t: ["--height", "15"], "multiples of the VAE scale factor 2"),
    ("seed_negative", lambda t: ["--seed", "-1"], "--seed must be in [0, 18446744073709551615]"),
    ("seed_huge", lambda t: ["--seed", str(2**70)], "--seed must be in [0, 18446744073709551615]"),
    ("prompt_surrogate", lambda t: ["--prompt", "a \udcff cat"], "--prompt: not valid Unicode text"),
    ("negative_prompt_surrogate", lambda t: ["--negative-prompt", "\ud800"], "--negative-prompt: not valid Unicode"),
    ("prompt_huge", lambda t: ["--prompt", "cat " * 100_000], "--prompt is 400000 characters, over the limit"),
    ("block_zero", lambda t: ["--block", "0"], "--block must be >= 1"),
    ("precision_unknown", lambda t: ["--precision", "f8"], "argument --precision: invalid choice"),
    ("rewrites_unknown", lambda t: ["--rewrites", "warp"], "warp"),
    ("scheduler_unknown", lambda t: ["--scheduler", "pndm"], "argument --scheduler: invalid choice"),
    ("out_dir_missing", lambda t: ["--out", t / "no" / "x.png"], "no/x.png: output folder"),
    ("out_is_dir", lambda t: ["--out", t], "exists and is not a regular file"),
    ("trace_is_dir", lambda t: ["--trace", t], "exists and is not a regular file"),
    ("latents_text", lambda t: ["--latents", _latents(t, b"hello")], "latents.npy: not an .npy file (no NumPy magic)"),
    ("latents_pickle", lambda t: ["--latents", _latents(t, pickle.dumps(np.zeros(3)))], "is a Python pickle; refused"),
    ("latents_object", lambda t: ["--latents", _latents(t, _npy_object())], "pickled object array; refused"),
    ("latents_huge_header", lambda t: ["--latents", _latents(t, _npy_declaring((10**12,)))], "over the"),
    ("latents_wraps", lambda t: ["--latents", _latents(t, _npy_declaring((2**32, 2**32)))],
     "(73786976294838206464 bytes), over the"),
    ("latents_truncated", lambda t: ["--latents", _latents(t, _npy_declaring((1, 8, 8, 4)))], "truncated"),
    ("latents_nan", lambda t: ["--latents", _latents(t, _npy(np.full((1, 8, 8, 4), np.nan, np.float32)))],
     "latents contain inf or NaN"),
    ("latents_int", lambda t: ["--latents", _latents(t, _npy(np.zeros((1, 8, 8, 4), np.int32)))],
     "expected a floating-point .npy array"),
    ("latents_shape", lambda t: ["--latents", _latents(t, _npy(np.zeros((1, 9, 8, 4), np.float32)))],
     "initial latents must have shape (1, 8, 8, 4)"),
    ("latents_missing", lambda t: ["--latents", t / "absent.npy"], "absent.npy: no such file"),
    ("latents_dir", lambda t: ["--latents", t], "is a directory, not a regular file"),
    ("latents_npz", lambda t: ["--latents", _latents(t, _npz())], "zip archive"),
]


def _npy_object() -> bytes:
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + pickle.dumps([1])


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(2))
    return buf.getvalue()


@pytest.mark.parametrize("extra, fragment", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_generate_option(extra, fragment, base_model, tmp_path, capsys):
    line = _run(refsd_main, _generate(base_model, tmp_path, *extra(tmp_path)), capsys, "refsd")
    assert fragment in line, line


FP16_CHECK_CASES = [
    ("fail_on", ["--fail-on", "meltdown"], "--fail-on: unknown event kind(s) meltdown"),
    ("top", ["--top", "-1"], "--top must be >= 0"),
    ("guidance", ["--guidance", "nan"], "--guidance must be a finite number"),
    ("json_dir", ["--json", "."], "--json .: exists and is not a regular file"),
]


@pytest.mark.parametrize("extra, fragment", [c[1:] for c in FP16_CHECK_CASES], ids=[c[0] for c in FP16_CHECK_CASES])
def test_bad_fp16_check_option(extra, fragment, base_model, tmp_path, capsys):
    argv = ["fp16-check", "--model", base_model, "--prompt", "a cat", "--steps", "1", "--height", "16", "--width", "16",
            "--quiet", *extra]
    assert fragment in _run(refsd_main, argv, capsys, "refsd")


COMPARE_CASES = [
    ("atol_nan", lambda t, ok: [ok, ok, "--atol", "nan"], "--atol must be a finite number >= 0"),
    ("rtol_inf", lambda t, ok: [ok, ok, "--rtol", "inf"], "--rtol must be a finite number >= 0"),
    ("quantile_two", lambda t, ok: [ok, ok, "--check-mode", "quantile", "--quantile", "2"],
     "quantile must be in [0, 1]"),
    ("huge_header", lambda t, ok: [_latents(t, _npy_declaring((10**12,))), ok], "over the"),
    ("wrapping_header", lambda t, ok: [ok, _latents(t, _npy_declaring((2**32, 2**32)))],
     "latents.npy: declares float32 (4294967296, 4294967296) (73786976294838206464 bytes), over the"),
    ("text_file", lambda t, ok: [ok, _latents(t, b"hello")], "latents.npy: not an .npy file"),
]


@pytest.mark.parametrize("args, fragment", [c[1:] for c in COMPARE_CASES], ids=[c[0] for c in COMPARE_CASES])
def test_bad_compare_input(args, fragment, tmp_path, capsys):
    ok = tmp_path / "ok.npy"
    ok.write_bytes(_npy(np.ones(4, np.float32)))
    assert fragment in _run(validate_main, ["compare", *args(tmp_path, ok)], capsys, "refsd-validate")


# ---------------------------------------------------------------- capture bundles (refsd-validate certify)

def _doc_edit(edit):
    def mutate(b: Path, tmp: Path) -> Path:
        doc = json.loads((b / "capture.json").read_text())
        edit(doc)
        _replace(b / "capture.json", json.dumps(doc))
        return b
    return mutate


def _raw_capture(text: str | bytes):
    def mutate(b: Path, tmp: Path) -> Path:
        _replace(b / "capture.json", text)
        return b
    return mutate


def _zip_patch(method, patch):
    """A zip of the bundle (members compressed with ``method``), its bytes then passed through ``patch``."""
    def mutate(b: Path, tmp: Path) -> Path:
        out = zip_bundle(b, tmp / "bundle.zip", method=method)
        out.write_bytes(patch(bytearray(out.read_bytes())))
        return out
    return mutate


def _corrupt_first_member(raw: bytearray) -> bytearray:
    # Flip bytes inside the first member's compressed data (capture.json: the zip is written sorted).
    name_len, extra_len = struct.unpack("<HH", raw[26:30])
    start = 30 + name_len + extra_len
    raw[start + 10:start + 30] = b"\xff" * 20
    return raw


def _lzma_member(b: Path, tmp: Path) -> Path:
    out = tmp / "bundle.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_LZMA) as zf:  # capture.json is read first: enough to refuse
        zf.write(b / "capture.json", "capture.json")
    return out


def _stored_crc_wrong(raw: bytearray) -> bytearray:
    name_len, extra_len = struct.unpack("<HH", raw[26:30])
    start = 30 + name_len + extra_len
    raw[start] ^= 0x01  # capture.json's first byte, stored: only the CRC can tell
    return raw


def _encrypted_flag(raw: bytearray) -> bytearray:
    c = raw.index(b"PK\x01\x02")
    raw[c + 8] |= 0x01
    return raw


def _bundle_tensor_huge_header(b: Path, tmp: Path) -> Path:
    name = "scheduler/latents_init"
    data = _npy_declaring((1, 32, 32, 4 * 10**9))
    _replace(b / tensor_file(name), data)
    doc = json.loads((b / "capture.json").read_text())
    doc["tensors"][name].update(shape=[1, 32, 32, 4 * 10**9])
    _replace(b / "capture.json", json.dumps(doc))
    return b


BUNDLE_CASES = [
    ("capture_deep", _raw_capture("[" * DEEP + "]" * DEEP), "capture.json: JSON nested too deeply"),
    ("capture_not_utf8", _raw_capture(b'{"schema": "\xff"}'), "capture.json: not UTF-8 text (byte 0xff"),
    ("capture_list", _raw_capture("[]"), "capture.json: not a JSON object"),
    ("capture_bad_json", _raw_capture('{"schema": '), "capture.json: not valid JSON"),
    ("capture_duplicate_key", lambda b, t: (_replace(b / "capture.json", (b / "capture.json").read_text().replace(
        '"request": {', '"request": {"seed": 0, ', 1)), b)[-1], "capture.json: not valid JSON (duplicate key 'seed'"),
    ("capture_dir", lambda b, t: ((b / "capture.json").unlink(), (b / "capture.json").mkdir(), b)[-1],
     "capture.json is not a regular file"),
    ("guidance_1e400", lambda b, t: (_replace(b / "capture.json", (b / "capture.json").read_text().replace(
        '"guidance": 7.5', '"guidance": 1e400')), b)[-1], "capture.json: not valid JSON (number 1e400 overflows"),
    ("guidance_huge", _doc_edit(lambda d: d["request"].update(guidance=1e300)), "at request/guidance"),
    ("guidance_negative", _doc_edit(lambda d: d["request"].update(guidance=-2)), "at request/guidance"),
    ("steps_float", _doc_edit(lambda d: d["request"].update(steps=4.0)), "schema violation at request/steps"),
    ("seed_float", _doc_edit(lambda d: d["request"].update(seed=3.0)), "schema violation at request/seed"),
    ("height_float", _doc_edit(lambda d: d["request"].update(height=64.0)), "schema violation at request/height"),
    ("shape_float", _doc_edit(lambda d: d["tensors"]["scheduler/latents_init"].update(shape=[1.0, 32, 32, 4])),
     "schema violation at tensors/scheduler/latents_init/shape/0"),
    ("shape_bool", _doc_edit(lambda d: d["tensors"]["scheduler/latents_init"].update(shape=[True, 32, 32, 4])),
     "schema violation at tensors/scheduler/latents_init/shape/0"),
    ("prompt_surrogate", lambda b, t: (_replace(b / "capture.json", (b / "capture.json").read_text().replace(
        '"prompt": "', '"prompt": "\\ud800')), b)[-1], "capture.json: string at /request/prompt holds a lone"),
    ("prompt_huge", _doc_edit(lambda d: d["request"].update(negative_prompt="x" * 1_000_000)),
     "request/negative_prompt is 1000000 characters"),
    ("seed_huge", _doc_edit(lambda d: d["request"].update(seed=2**70)), "request/seed must be in"),
    ("tensor_huge_header", _bundle_tensor_huge_header, "tensor scheduler/latents_init"),
    ("tensor_file_dir", lambda b, t: ((b / tensor_file("vae/image")).unlink(), (b / tensor_file("vae/image")).mkdir(),
                                      b)[-1], "tensors/vae/image.npy is not a regular file"),
    ("zip_corrupt_deflate", _zip_patch(zipfile.ZIP_DEFLATED, _corrupt_first_member), "zip member capture.json"),
    ("zip_lzma", _lzma_member, "compression method 14"),
    ("zip_stored_crc", _zip_patch(zipfile.ZIP_STORED, _stored_crc_wrong), "zip member capture.json is corrupt"),
    ("zip_encrypted", _zip_patch(zipfile.ZIP_STORED, _encrypted_flag), "zip member capture.json is encrypted"),
    ("zip_truncated", _zip_patch(zipfile.ZIP_DEFLATED, lambda raw: raw[: len(raw) // 2]),
     "neither a bundle directory nor a readable .zip"),
    ("zip_empty_file", lambda b, t: (t / "empty.zip", (t / "empty.zip").write_bytes(b""))[0],
     "neither a bundle directory nor a readable .zip"),
]


@pytest.mark.parametrize("mutate, fragment", [c[1:] for c in BUNDLE_CASES], ids=[c[0] for c in BUNDLE_CASES])
def test_malformed_bundle(mutate, fragment, emulated_bundle, base_model, tmp_path, capsys):
    bundle = Path(shutil.copytree(emulated_bundle, tmp_path / "b", copy_function=os.link))
    target = mutate(bundle, tmp_path)
    line = _run(validate_main, ["certify", target, "--model", base_model, "--out", tmp_path / "out",
                                "--cache", tmp_path / "cache"], capsys, "refsd-validate")
    assert fragment in line, line
    assert not (tmp_path / "cache").exists()  # refused before any reference rerun


CERTIFY_OPTION_CASES = [
    ("k_inf", ["--k", "inf"], "--k must be in (0, 16]"),
    ("k_nan", ["--k", "nan"], "--k must be in (0, 16]"),
    ("k_huge", ["--k", "1e6"], "--k must be in (0, 16]"),
    ("k_zero", ["--k", "0"], "--k must be in (0, 16]"),
    ("cache_gb_inf", ["--cache-gb", "inf"], "--cache-gb must be in (0, 1024]"),
    ("cache_gb_nan", ["--cache-gb", "nan"], "--cache-gb must be in (0, 1024]"),
    ("cache_gb_zero", ["--cache-gb", "0"], "--cache-gb must be in (0, 1024]"),
    ("mode_unknown", ["--mode", "lenient"], "argument --mode: invalid choice"),
]


@pytest.mark.parametrize("extra, fragment", [c[1:] for c in CERTIFY_OPTION_CASES],
                         ids=[c[0] for c in CERTIFY_OPTION_CASES])
def test_bad_certify_option(extra, fragment, emulated_bundle, base_model, tmp_path, capsys):
    argv = ["certify", emulated_bundle, "--model", base_model, "--out", tmp_path / "out", "--cache", tmp_path / "c",
            *extra]
    assert fragment in _run(validate_main, argv, capsys, "refsd-validate")
    assert not (tmp_path / "c").exists()


TFLITE_MANIFEST_CASES = [
    ("missing", None, "no refsd_export.json (not a folder written by 'refsd export')"),
    ("deep", "[" * DEEP + "]" * DEEP, "refsd_export.json: JSON nested too deeply"),
    ("list", "[]", "refsd_export.json: not a refsd export manifest"),
    ("wrong_shape", '{"format": "refsd-export", "components": {"unet": {"tensors": [1]}}}',
     "not an export manifest"),
    ("not_utf8", b"\xff\xfe", "refsd_export.json: not UTF-8 text"),
]


@pytest.mark.parametrize("content, fragment", [c[1:] for c in TFLITE_MANIFEST_CASES],
                         ids=[c[0] for c in TFLITE_MANIFEST_CASES])
def test_bad_tflite_manifest(content, fragment, emulated_bundle, base_model, tmp_path, capsys):
    tflite = tmp_path / "tflite"
    tflite.mkdir()
    if content is not None:
        _replace(tflite / "refsd_export.json", content)
    argv = ["certify", emulated_bundle, "--model", base_model, "--out", tmp_path / "out", "--cache", tmp_path / "c",
            "--tflite", tflite]
    assert fragment in _run(validate_main, argv, capsys, "refsd-validate")


CERTIFY_MODEL_CASES = [
    ("in_channels_str", _set("unet/config.json", "in_channels", "4"), "in_channels must be a positive integer"),
    ("vae_blocks_str", _set("vae/config.json", "block_out_channels", "abc"), "block_out_channels must be a list"),
    ("hidden_size_float", _set("text_encoder/config.json", "hidden_size", 32.0), "hidden_size must be a positive"),
    ("shard_outside", _sharded_outside, "index.json: schema violation at weight_map/"),
    # a file the loader reads is part of the identity: without it, this is another model
    ("tokenizer_config_removed", lambda m: (m / "tokenizer/tokenizer_config.json").unlink(), "not the same model"),
]


@pytest.mark.parametrize("mutate, fragment", [c[1:] for c in CERTIFY_MODEL_CASES],
                         ids=[c[0] for c in CERTIFY_MODEL_CASES])
def test_certify_refuses_malformed_model(mutate, fragment, emulated_bundle, model, tmp_path, capsys):
    mutate(model)
    argv = ["certify", emulated_bundle, "--model", model, "--out", tmp_path / "out", "--cache", tmp_path / "c"]
    assert fragment in _run(validate_main, argv, capsys, "refsd-validate")


# ---------------------------------------------------------------- export, lint-gpu, golden

def _st_poison(rel: str, value: float):
    """One element of the first float32 tensor of a weights file set to ``value`` (NaN, inf)."""
    def mutate(m: Path) -> None:
        header, data = _st_parts(m / rel)
        name = next(k for k in _tensors(header) if header[k]["dtype"] == "F32")
        a = header[name]["data_offsets"][0] + 4 * 7
        _st_write(m / rel, header, data[:a] + np.float32(value).tobytes() + data[a + 4:])
    return mutate


HUGE = 2**32  # float32 elements: a 16 GiB tensor, the file extended sparsely to cover it


def _st_huge(rel: str, *, rename: bool):
    """The last tensor of a weights file made 16 GiB (declared and covered: a sparse file), under its own key
    (a shape the config does not allow) or under a key the model does not have."""
    def mutate(m: Path) -> None:
        header, data = _st_parts(m / rel)
        last = _tensors(header)[-1]
        a, b = header[last]["data_offsets"]
        info = {"dtype": "F32", "shape": [HUGE], "data_offsets": [a, a + 4 * HUGE]}
        header["extra.weight" if rename else last] = info
        if rename:
            info["data_offsets"] = [b, b + 4 * HUGE]
        _st_write(m / rel, header, data if rename else data[:a])
        with open(m / rel, "r+b") as f:
            f.truncate(os.path.getsize(m / rel) + 4 * HUGE - (0 if rename else 0))
    return mutate


def _export(model, tmp, *extra):
    return ["export", "--model", model, "--out", tmp / "tflite", "--height", "16", "--width", "16", "--quiet",
            *extra]


def _unwritable(t: Path) -> Path:
    (t / "plain").write_text("a file")
    return t / "plain" / "tflite"


EXPORT_CASES = [
    ("unet_nan", lambda m, t: _export((_st_poison(UNET_ST, np.nan)(m), m)[1], t),
     "unet: tensor 'conv_in.bias' holds non-finite values (NaN or inf, 1 in elements 0..31 of 32)"),
    ("vae_inf", lambda m, t: _export((_st_poison(VAE_ST, np.inf)(m), m)[1], t), "vae: tensor"),
    ("text_nan_only_component", lambda m, t: _export((_st_poison(TEXT_ST, -np.nan)(m), m)[1], t, "--component",
                                                     "text_encoder"), "text_encoder: tensor"),
    ("unet_config_missing", lambda m, t: _export(((m / "unet/config.json").unlink(), m)[1], t),
     "unet: missing config.json"),
    ("out_is_a_file", lambda m, t: _export(m, t, "--out", ((t / "f").write_text("x"), t / "f")[1]),
     "--out " ),
    ("out_under_a_file", lambda m, t: _export(m, t, "--out", _unwritable(t)), "cannot write there (Not a directory)"),
    ("out_unwritable", lambda m, t: _export(m, t, "--out", "/proc/1/refsd-tflite"), "--out /proc/1/refsd-tflite: "
                                                                                    "cannot write there"),
    ("height_not_multiple", lambda m, t: _export(m, t, "--height", "17"), "multiples of the VAE scale factor 2"),
    ("height_huge", lambda m, t: _export(m, t, "--height", "65536"), "--height must be in [1, 16384], got 65536"),
    ("pixels_over_memory", lambda m, t: _export(m, t, "--height", "16384", "--width", "16384"), "over this machine"),
    ("bad_rewrite", lambda m, t: _export(m, t, "--rewrites", "fc_as_conv,nonsense"), "nonsense"),
]


@pytest.mark.parametrize("build, fragment", [c[1:] for c in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES])
def test_bad_export_input(build, fragment, model, tmp_path, capsys):
    argv = build(model, tmp_path)
    assert fragment in _run(refsd_main, argv, capsys, "refsd")
    assert not (tmp_path / "tflite").exists()  # refused before the output folder is made


def _tflite(t: Path, data: bytes) -> Path:
    _replace(t / "m.tflite", data)
    return t / "m.tflite"


LINT_CASES = [
    ("missing", lambda t: [t / "none.tflite"], "none.tflite: no such file"),
    ("directory", lambda t: [t], "is a directory"),
    ("empty", lambda t: [_tflite(t, b"")], "not a .tflite file"),
    ("text", lambda t: [_tflite(t, "not a model at all")], "not a .tflite file (no TFL3"),
    ("identifier_then_garbage", lambda t: [_tflite(t, b"\xff\xff\xff\x7fTFL3" + b"\x01" * 64)], "corrupt .tflite"),
    ("identifier_only", lambda t: [_tflite(t, b"\x08\x00\x00\x00TFL3")], "m.tflite: "),
    ("max_fc_input_zero", lambda t: [_tflite(t, b"x"), "--max-fc-input", "0"], "--max-fc-input must be a positive"),
    ("max_conv_negative", lambda t: [_tflite(t, b"x"), "--max-conv-activation", "-5"], "--max-conv-activation"),
]


@pytest.mark.parametrize("build, fragment", [c[1:] for c in LINT_CASES], ids=[c[0] for c in LINT_CASES])
def test_bad_lint_input(build, fragment, tmp_path, capsys):
    assert fragment in _run(refsd_main, ["lint-gpu", *build(tmp_path)], capsys, "refsd")


def _golden_copy(t: Path) -> Path:
    from refsd.golden import DEFAULT_DIR  # noqa: PLC0415

    return Path(shutil.copytree(DEFAULT_DIR, t / "golden"))


def _golden(edit):
    def build(t: Path) -> list:
        g = _golden_copy(t)
        edit(g, t)
        return ["golden", "verify", "--dir", g]
    return build


def _link_out(g: Path, t: Path) -> None:
    shutil.move(g / "ops" / "add.npz", t / "add.npz")
    (g / "ops" / "add.npz").symlink_to(t / "add.npz")  # the right bytes, through a link: still refused


GOLDEN_CASES = [
    ("no_folder", lambda t: ["golden", "verify", "--dir", t / "none"], "MANIFEST.sha256: no golden manifest"),
    ("extra_file", _golden(lambda g, t: (g / "ops" / "extra.npz").write_bytes(b"x")),
     "ops/extra.npz: not in MANIFEST.sha256"),
    ("missing_file", _golden(lambda g, t: (g / "traces" / "sd15_f32.npz").unlink()),
     "traces/sd15_f32.npz: listed in MANIFEST.sha256 but missing"),
    ("missing_and_extra", _golden(lambda g, t: ((g / "ops" / "add.npz").unlink(), (g / "x").write_text("x"))),
     "and 1 more: "),
    ("symlinked_file", _golden(_link_out), "ops/add.npz: a symlink in the golden folder (never followed)"),
    ("symlinked_folder", _golden(lambda g, t: (shutil.move(g / "traces", t / "traces"),
                                               (g / "traces").symlink_to(t / "traces"))), "traces: a symlink"),
    ("fifo_in_folder", _golden(lambda g, t: os.mkfifo(g / "ops" / "pipe")), "ops/pipe: not a regular file"),
    ("manifest_garbage", _golden(lambda g, t: _replace(g / "MANIFEST.sha256", "nonsense\n")),
     "MANIFEST.sha256:1: not a 'sha256 path' line"),
    ("manifest_escapes", _golden(lambda g, t: _replace(g / "MANIFEST.sha256", "0" * 64 + "  ../../etc/passwd\n")),
     "MANIFEST.sha256:1:"),
    ("manifest_duplicate", _golden(lambda g, t: _replace(g / "MANIFEST.sha256", ("0" * 64 + "  recipe.json\n") * 2)),
     "MANIFEST.sha256:2:"),
    ("manifest_not_utf8", _golden(lambda g, t: _replace(g / "MANIFEST.sha256", b"\xff\xfe")), "not UTF-8"),
    ("make_into_a_file", lambda t: ["golden", "make", "--dir", ((t / "f").write_text("x"), t / "f")[1]],
     "exists and is not a folder"),
    ("make_through_a_link", lambda t: ["golden", "make", "--dir", (_link_out(_golden_copy(t), t), t / "golden")[1]],
     "a symlink in the golden folder; refusing to write through it"),
]


@pytest.mark.parametrize("build, fragment", [c[1:] for c in GOLDEN_CASES], ids=[c[0] for c in GOLDEN_CASES])
def test_bad_golden_folder(build, fragment, tmp_path, capsys):
    assert fragment in _run(refsd_main, build(tmp_path), capsys, "refsd")


def test_the_corpus_has_at_least_100_cases():
    n = (len(MODEL_CASES) + len(CLI_CASES) + len(FP16_CHECK_CASES) + len(COMPARE_CASES) + len(BUNDLE_CASES) + len(CERTIFY_OPTION_CASES)
         + len(CERTIFY_MODEL_CASES) + len(TFLITE_MANIFEST_CASES) + len(SUBPROCESS_CASES) + len(EXPORT_CASES)
         + len(LINT_CASES) + len(GOLDEN_CASES))
    assert n >= 100, n


# ---------------------------------------------------------------- hangs and blow-ups, in their own processes

def _bz2_bomb(tmp: Path, b: Path) -> Path:
    """A zipped bundle whose capture.json is a bzip2 member of ~100 bytes declaring 48 KB (so the
    declared-size check passes) and inflating to 64 MiB, 16 times the budget: only a bounded
    decompressor refuses it (64 MiB keeps the case fast; the bound does not depend on the size)."""
    (b / "capture.json").unlink()
    out = zip_bundle(b, tmp / "bomb.zip", method=zipfile.ZIP_BZIP2, extra=[("capture.json", b"\0" * (64 << 20))])
    raw = bytearray(out.read_bytes())
    for sig, at in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):  # the last member's headers (capture.json)
        pos = raw.rfind(sig)
        raw[pos + at:pos + at + 4] = struct.pack("<I", 48_000)
    out.write_bytes(raw)
    return out


def _many_members(tmp: Path, b: Path) -> Path:
    out = tmp / "many.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for i in range(150_000):
            zf.writestr(f"m{i}", b"")
    return out


def _fifo_model(rel: str):
    def make(tmp: Path, m: Path) -> Path:
        _mkfifo(rel)(m)
        return m
    return make


SUBPROCESS_CASES = [
    # (id, argv builder (tmp, model copy, bundle copy) -> [module, args...], fragment)
    ("vae_config_fifo", lambda t, m, b: ["refsd", *_generate(_fifo_model("vae/config.json")(t, m), t)],
     "vae/config.json: is a FIFO"),
    ("text_config_fifo", lambda t, m, b: ["refsd", *_generate(_fifo_model("text_encoder/config.json")(t, m), t)],
     "text_encoder/config.json: is a FIFO"),
    ("weights_fifo", lambda t, m, b: ["refsd", *_generate(_fifo_model(UNET_ST)(t, m), t)],
     "diffusion_pytorch_model.safetensors: is a FIFO"),
    ("model_index_fifo", lambda t, m, b: ["refsd", *_generate(_fifo_model("model_index.json")(t, m), t)],
     "model_index.json: is a FIFO"),
    ("out_fifo", lambda t, m, b: ["refsd", *_generate(m, t, "--out", (os.mkfifo(t / "o.png"), t / "o.png")[1])],
     "o.png: exists and is not a regular file"),
    ("certify_vae_config_fifo", lambda t, m, b: ["refsd_validate", "certify", b, "--model",
                                                 _fifo_model("vae/config.json")(t, m), "--out", t / "o"],
     "vae/config.json: is a FIFO"),
    ("capture_json_fifo", lambda t, m, b: ["refsd_validate", "certify", (_mkfifo("capture.json")(b), b)[1],
                                           "--model", m, "--out", t / "o"], "capture.json is not a regular file"),
    ("compare_fifo", lambda t, m, b: ["refsd_validate", "compare", (os.mkfifo(t / "f.npy"), t / "f.npy")[1],
                                      t / "f.npy"], "f.npy: is a FIFO"),
    ("bz2_bomb", lambda t, m, b: ["refsd_validate", "certify", _bz2_bomb(t, b), "--model", m, "--out", t / "o"],
     "inflates past the 4194304-byte limit"),
    ("zip_150k_members", lambda t, m, b: ["refsd_validate", "certify", _many_members(t, b), "--model", m,
                                          "--out", t / "o"], "150000 zip members, over the limit"),
    ("huge_image", lambda t, m, b: ["refsd", *_generate(m, t, "--height", "65536", "--width", "65536")],
     "--height must be in [1, 16384]"),
    ("latents_1e12", lambda t, m, b: ["refsd", *_generate(m, t, "--latents", _latents(t, _npy_declaring(
        (10**12,))))], "over the"),
    # export / lint-gpu / golden: 16 GiB tensors and files (sparse), pipes, each refused without reading them
    ("export_huge_tensor_own_key", lambda t, m, b: ["refsd", *_export((_st_huge(UNET_ST, rename=False)(m), m)[1], t)],
     "shape"),
    ("export_huge_tensor_extra_key", lambda t, m, b: ["refsd", *_export((_st_huge(VAE_ST, rename=True)(m), m)[1], t)],
     "1 unexpected key: extra.weight"),
    ("lint_fifo", lambda t, m, b: ["refsd", "lint-gpu", (os.mkfifo(t / "p.tflite"), t / "p.tflite")[1]],
     "p.tflite: is a FIFO"),
    ("lint_16gb_not_a_model", lambda t, m, b: ["refsd", "lint-gpu", _sparse(t / "big.tflite", b"junk")],
     "not a .tflite file"),
    ("lint_16gb_flatbuffer_garbage", lambda t, m, b: ["refsd", "lint-gpu", _sparse(t / "big.tflite",
                                                                                   b"\xf0\xff\xff\x3fTFL3")],
     "big.tflite: "),
    ("golden_16gb_unlisted", lambda t, m, b: ["refsd", "golden", "verify", "--dir", (
        _sparse(_golden_copy(t) / "ops" / "big.npz", b""), t / "golden")[1]], "ops/big.npz: not in MANIFEST"),
    ("golden_manifest_fifo", lambda t, m, b: ["refsd", "golden", "verify", "--dir", (
        _mkfifo("MANIFEST.sha256")(_golden_copy(t)), t / "golden")[1]], "MANIFEST.sha256: is a FIFO"),
]


def _sparse(path: Path, head: bytes) -> Path:
    """A 16 GiB file of ``head`` then zeros (sparse: no disk used)."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(4 * HUGE)
    return path


# Runs a module as ``python -m`` would, then writes the process's own peak RSS (VmHWM: this process
# image only; rusage's ru_maxrss would include the pytest process it was forked from).
_WRAPPER = """import runpy, sys
module, hwm = sys.argv[1], sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as f, open(hwm, "w") as out:
        out.write(next(line for line in f if line.startswith("VmHWM:")).split()[1])
"""


def _run_process(argv: list, cwd: Path) -> tuple[int, str, float]:
    """(exit code, stderr, peak RSS in MB) of ``python -m argv[0] argv[1:]``; killed past LIMIT_S."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    hwm = cwd / "vmhwm_kb.txt"
    try:
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(argv[0]), str(hwm), *map(str, argv[1:])],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, cwd=cwd,
                              timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {LIMIT_S} s (hang?): {argv}")
    return proc.returncode, proc.stderr, int(hwm.read_text()) / 1024


@pytest.mark.parametrize("build, fragment", [c[1:] for c in SUBPROCESS_CASES], ids=[c[0] for c in SUBPROCESS_CASES])
def test_no_hang_no_blowup(build, fragment, model, emulated_bundle, tmp_path):
    bundle = Path(shutil.copytree(emulated_bundle, tmp_path / "b", copy_function=os.link))
    rc, err, rss_mb = _run_process(build(tmp_path, model, bundle), tmp_path)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    assert rss_mb < LIMIT_RSS_MB, f"peak RSS {rss_mb:.0f} MB"
