"""The bundle reader: every malformed bundle is refused with exit 2 and one
line on stderr naming the fault, before any reference rerun; never a traceback,
never a pickle loaded, never a byte read outside the bundle or past a size limit."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import zip_bundle
from refsd_validate.bundle import ModelGeometry, npy_bytes, tensor_file
from refsd_validate.cli import main
from refsd_validate.reader import read_bundle

INTERMEDIATE = "unet/step_2/unet.mid_block.attentions.0.proj_in"


def _doc(root: Path) -> dict:
    return json.loads((root / "capture.json").read_text())


def _save_doc(root: Path, doc: dict) -> None:
    (root / "capture.json").write_text(json.dumps(doc, indent=1))


def _retensor(root: Path, name: str, data: bytes, *, dtype=None, shape=None) -> None:
    """Replace a tensor's file with ``data`` and make capture.json agree with it
    (sha256 and, if given, dtype and shape), so only the fault under test remains."""
    doc = _doc(root)
    entry = doc["tensors"].setdefault(name, {"file": tensor_file(name), "dtype": "float32", "shape": [1]})
    (root / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
    (root / entry["file"]).write_bytes(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    if dtype is not None:
        entry["dtype"] = dtype
    if shape is not None:
        entry["shape"] = list(shape)
    _save_doc(root, doc)


# Each case: (id, mutate(bundle_dir, tmp) -> path to give the validator, fragment of the one-line error)
def bad_json(b, tmp):
    (b / "capture.json").write_text("{\"schema\": \"refsd-capture\", ")
    return b


def unknown_version(b, tmp):
    doc = _doc(b)
    doc["schema_version"] = 3
    _save_doc(b, doc)
    return b


def nan_literal_in_json(b, tmp):
    doc = _doc(b)
    doc["request"]["guidance"] = float("nan")  # json.dumps writes the non-standard NaN literal
    _save_doc(b, doc)
    return b


def schema_violation(b, tmp):
    doc = _doc(b)
    doc["request"]["steps"] = "four"
    _save_doc(b, doc)
    return b


def pickle_payload(b, tmp):
    _retensor(b, "vae/image", pickle.dumps(np.zeros((1, 64, 64, 3), np.float32)))
    return b


def object_array(b, tmp):
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    _retensor(b, INTERMEDIATE, buf.getvalue())
    return b


def path_escape(b, tmp):
    (tmp / "outside.npy").write_bytes((b / tensor_file("vae/image")).read_bytes())
    doc = _doc(b)
    doc["tensors"]["vae/image"]["file"] = "tensors/../../outside.npy"
    _save_doc(b, doc)
    return b


def symlink_out(b, tmp):
    target = tmp / "elsewhere.npy"
    f = b / tensor_file("vae/image")
    shutil.copy(f, target)  # identical bytes and sha256: only the location is wrong
    f.unlink()
    f.symlink_to(target)
    return b


def wrong_dtype_declared(b, tmp):
    lat = np.load(b / tensor_file("scheduler/latents_init"))
    _retensor(b, "scheduler/latents_init", npy_bytes(lat.astype(np.int32)), dtype="int32")
    return b


def dtype_differs_from_file(b, tmp):
    lat = np.load(b / tensor_file("scheduler/latents_init"))
    _retensor(b, "scheduler/latents_init", npy_bytes(lat.astype(np.float16)))  # declared float32 still
    return b


def wrong_shape(b, tmp):
    lat = np.zeros((1, 16, 16, 4), np.float32)
    _retensor(b, "scheduler/latents_init", npy_bytes(lat), shape=lat.shape)
    return b


def empty_tensor(b, tmp):
    _retensor(b, INTERMEDIATE, npy_bytes(np.zeros((0, 4), np.float32)), shape=(0, 4))
    return b


def missing_capture_json(b, tmp):
    (b / "capture.json").unlink()
    return b


def missing_tensor_file(b, tmp):
    (b / tensor_file("scheduler/step_1/latents")).unlink()
    return b


def missing_tensors_listed(b, tmp):
    doc = _doc(b)
    for n in ("unet/step_3/noise_pred", "scheduler/step_3/latents"):
        del doc["tensors"][n]
    _save_doc(b, doc)
    return b


def nan_token_ids(b, tmp):
    ids = np.load(b / tensor_file("inputs/token_ids")).astype(np.float32)
    ids[1, 3] = np.nan
    _retensor(b, "inputs/token_ids", npy_bytes(ids), dtype="float32")
    return b


def token_ids_out_of_vocab(b, tmp):
    ids = np.load(b / tensor_file("inputs/token_ids"))
    ids[0, 5] = 10**6
    _retensor(b, "inputs/token_ids", npy_bytes(ids))
    return b


def nan_initial_latents(b, tmp):
    lat = np.load(b / tensor_file("scheduler/latents_init"))
    lat[0, 1, 2, 3] = np.nan
    _retensor(b, "scheduler/latents_init", npy_bytes(lat))
    return b


def sha_mismatch(b, tmp):
    f = b / tensor_file("unet/step_0/noise_pred")
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01  # one flipped bit of the last value
    f.write_bytes(bytes(data))
    return b


def trailing_bytes(b, tmp):
    f = b / tensor_file("unet/step_0/noise_pred")
    _retensor(b, "unet/step_0/noise_pred", f.read_bytes() + b"\0" * 8)
    return b


def unknown_tensor_name(b, tmp):
    _retensor(b, "postprocess/extra", npy_bytes(np.zeros(3, np.float32)), shape=(3,))
    return b


def step_past_request(b, tmp):
    _retensor(b, "unet/step_7/unet.conv_in", npy_bytes(np.zeros(3, np.float32)), shape=(3,))
    return b


def oversized_capture_json(b, tmp):
    doc = _doc(b)
    (b / "capture.json").write_text(json.dumps(doc) + " " * (5 << 20))
    return b


def not_a_bundle(b, tmp):
    p = tmp / "notes.txt"
    p.write_text("hello")
    return p


def no_such_path(b, tmp):
    return tmp / "nowhere"


def zip_bomb_member(b, tmp):
    # vae/image's member inflates to 64 MiB of zeros (compressed: ~64 KiB): refused from its declared size.
    (b / tensor_file("vae/image")).unlink()
    info = zipfile.ZipInfo(tensor_file("vae/image"))
    info.compress_type = zipfile.ZIP_DEFLATED
    return zip_bundle(b, tmp / "bomb.zip", extra=[(info, b"\0" * (64 << 20))])


def zip_duplicate_members(b, tmp):
    return zip_bundle(b, tmp / "dupes.zip", extra=[("capture.json", (b / "capture.json").read_bytes())])


def zip_escaping_member(b, tmp):
    return zip_bundle(b, tmp / "escape.zip", extra=[("../evil.txt", b"x")])


def zip_symlink_member(b, tmp):
    info = zipfile.ZipInfo("tensors/link.npy")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zip_bundle(b, tmp / "link.zip", extra=[(info, "/etc/passwd")])


CASES = [
    (bad_json, "capture.json: not valid JSON"),
    (unknown_version, "unsupported schema_version 3"),
    (nan_literal_in_json, "non-standard JSON constant NaN"),
    (schema_violation, "schema violation at request/steps"),
    (pickle_payload, "is a Python pickle; refused"),
    (object_array, "pickled object array; refused"),
    (path_escape, "escapes the bundle"),
    (symlink_out, "resolves outside the bundle"),
    (wrong_dtype_declared, "tensor scheduler/latents_init: dtype int32, expected float32 or float16"),
    (dtype_differs_from_file, "file holds float16 (1, 32, 32, 4), capture.json declares float32"),
    (wrong_shape, "tensor scheduler/latents_init: shape (1, 16, 16, 4), expected (1, 32, 32, 4)"),
    (empty_tensor, "empty (shape (0, 4))"),
    (missing_capture_json, "capture.json: file capture.json is missing"),
    (missing_tensor_file, "tensor scheduler/step_1/latents: file tensors/scheduler/step_1/latents.npy is missing"),
    (missing_tensors_listed, "missing tensors (2): unet/step_3/noise_pred, scheduler/step_3/latents"),
    (nan_token_ids, "tensor inputs/token_ids: dtype float32, expected int32 or int64"),
    (token_ids_out_of_vocab, "ids must lie in [0, 49408)"),
    (nan_initial_latents, "scheduler/latents_init: holds NaN or inf"),
    (sha_mismatch, "sha256 differs from capture.json"),
    (trailing_bytes, "has trailing bytes"),
    (unknown_tensor_name, "tensor postprocess/extra: not a boundary tensor"),
    (step_past_request, "step 7 is past the request's 4 steps"),
    (oversized_capture_json, "over the 4194304-byte limit; refused unread"),
    (not_a_bundle, "neither a bundle directory nor a readable .zip"),
    (no_such_path, "no such bundle"),
    (zip_bomb_member, "67108864 bytes uncompressed, over the"),
    (zip_duplicate_members, "duplicate zip members capture.json"),
    (zip_escaping_member, "zip member '../evil.txt' escapes the bundle"),
    (zip_symlink_member, "zip member 'tensors/link.npy' is a symlink"),
]


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile warns while we build the duplicate-member zip
@pytest.mark.parametrize("mutate, fragment", CASES, ids=[c[0].__name__ for c in CASES])
def test_malformed_bundle_exits_2_with_one_line(mutate, fragment, emulated_bundle, tiny_sd21, tmp_path, capsys):
    bundle = shutil.copytree(emulated_bundle, tmp_path / "b", symlinks=True)
    target = mutate(bundle, tmp_path)
    rc = main(["certify", str(target), "--model", str(tiny_sd21), "--out", str(tmp_path / "out"),
               "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refsd-validate: error: "), err
    assert fragment in lines[0]
    assert not (tmp_path / "cache").exists()  # refused before any reference rerun


def test_truncated_tensor_is_named(emulated_bundle, tiny_sd21, tmp_path, capsys):
    bundle = shutil.copytree(emulated_bundle, tmp_path / "b")
    f = bundle / tensor_file("unet/step_1/noise_pred")
    f.write_bytes(f.read_bytes()[:-100])  # a copy cut short
    rc = main(["certify", str(bundle), "--model", str(tiny_sd21), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == ("refsd-validate: error: tensor unet/step_1/noise_pred (tensors/unet/step_1/noise_pred.npy): "
                   "truncated: 32668 data bytes, 32768 expected for float32 (2, 32, 32, 4)")


def test_zip_of_the_folder_reads_like_the_folder(emulated_bundle, tiny_sd21, tmp_path):
    """A .zip with the bundle at its root or inside one top folder, as `zip -r` makes it."""
    geometry = ModelGeometry.from_dir(tiny_sd21)
    plain = read_bundle(emulated_bundle, geometry)
    flat = read_bundle(zip_bundle(emulated_bundle, tmp_path / "flat.zip"), geometry)
    nested = tmp_path / "nested.zip"
    shutil.make_archive(str(nested.with_suffix("")), "zip", emulated_bundle.parent, emulated_bundle.name)
    folder = read_bundle(nested, geometry)
    for b in (flat, folder):
        assert b.sha256 == plain.sha256 and b.intermediates == plain.intermediates
        assert set(b.tensors) == set(plain.tensors)
        assert all(np.array_equal(b.tensors[n], plain.tensors[n]) for n in plain.tensors)
        name = plain.intermediates[0]
        assert np.array_equal(b.tensor(name), plain.tensor(name))


def test_reader_never_unpickles(emulated_bundle, tiny_sd21, tmp_path, monkeypatch):
    """The only np.load the reader makes is allow_pickle=False (a pickle that ran would be caught here)."""
    calls = []
    real = np.load

    def spy(*a, **kw):
        calls.append(kw.get("allow_pickle"))
        return real(*a, **kw)

    monkeypatch.setattr(np, "load", spy)
    b = read_bundle(emulated_bundle, ModelGeometry.from_dir(tiny_sd21))
    b.tensor(b.intermediates[0])
    assert calls and set(calls) == {False}


def test_declared_sizes_bound_what_is_read(emulated_bundle, tmp_path):
    """An 8 GiB declared tensor is refused from capture.json alone (nothing of that size is read)."""
    bundle = shutil.copytree(emulated_bundle, tmp_path / "b")
    _retensor(bundle, INTERMEDIATE, b"\x93NUMPY", shape=(1 << 31, 1))
    with pytest.raises(ValueError, match="over the 4294967296-byte limit"):
        read_bundle(bundle)
    assert os.path.getsize(bundle / tensor_file(INTERMEDIATE)) == 6
