"""Writing, checking and explaining a bundle from any runtime: write_bundle's
checks at write time, ``refsd-validate check`` and ``names``, and a CLI whose
first line gives the cause."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bundle_helpers import bundle_parts
from conftest import certify_request

from refsd.pipeline import Request
from refsd_validate.bundle import write_bundle
from refsd_validate.capture_emulated import emulated_capture
from refsd_validate.cli import main
from refsd_validate.reader import read_bundle




def test_write_bundle_checks_against_the_model(emulated_bundle, tiny_sd21, tmp_path):
    doc, tensors = bundle_parts(emulated_bundle)
    write_bundle(tmp_path / "ok", doc, tensors, model_dir=tiny_sd21)  # the good bundle passes
    nchw = {**tensors, "unet/step_1/noise_pred": np.transpose(tensors["unet/step_1/noise_pred"], (0, 3, 1, 2))}
    with pytest.raises(ValueError, match=r"unet/step_1/noise_pred: shape .* \(NCHW: pass layout='NCHW'"):
        write_bundle(tmp_path / "a", doc, nchw, model_dir=tiny_sd21)
    assert not (tmp_path / "a").exists()  # nothing written
    bad = {**tensors, "unet/step_0/unet.not_a_module": tensors["unet/step_0/noise_pred"]}
    with pytest.raises(ValueError, match="tensors the reference does not record"):
        write_bundle(tmp_path / "b", doc, bad, model_dir=tiny_sd21)
    with pytest.raises(ValueError, match="schema violation at stages/unet/precision"):
        write_bundle(tmp_path / "c", {**doc, "stages": {**doc["stages"], "unet": {"processor": "gpu",
                                                                                  "precision": "fp16"}}}, tensors)


def test_write_bundle_converts_a_declared_layout(emulated_bundle, tiny_sd21, tmp_path):
    doc, tensors = bundle_parts(emulated_bundle)
    nchw = {n: np.transpose(v, (0, 3, 1, 2)) if v.ndim == 4 else v for n, v in tensors.items()}
    out = write_bundle(tmp_path / "b", doc, nchw, layout="NCHW", model_dir=tiny_sd21)
    again = read_bundle(out)
    for n, v in read_bundle(emulated_bundle).tensors.items():
        assert np.array_equal(again.tensors[n], v), n


def test_write_bundle_takes_other_runtimes_tensors(emulated_bundle, tmp_path):
    torch = pytest.importorskip("torch")
    doc, tensors = bundle_parts(emulated_bundle)
    as_torch = {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in tensors.items()}
    out = write_bundle(tmp_path / "t", doc, as_torch)
    assert np.array_equal(read_bundle(out).tensors["vae/image"], tensors["vae/image"])
    bf16 = {**as_torch, "vae/image": as_torch["vae/image"].to(torch.bfloat16)}
    with pytest.raises(ValueError, match=r"vae/image: bfloat16 .* widen it to float32"):
        write_bundle(tmp_path / "u", doc, bf16)
    with pytest.raises(ValueError, match=r"vae/image: float64; cast it to float32"):
        write_bundle(tmp_path / "v", doc, {**tensors, "vae/image": tensors["vae/image"].astype(np.float64)})


def test_check_says_what_certify_will_judge(emulated_bundle, tiny_sd21, tmp_path, capsys):
    doc, tensors = bundle_parts(emulated_bundle)
    del tensors["scheduler/timesteps"]
    doc["observability"] = {"not_observable": ["unet/step_2/unet.mid_block.attentions.0"], "method": "test"}
    bundle = write_bundle(tmp_path / "b", doc, tensors)
    assert main(["check", str(bundle), "--model", str(tiny_sd21)]) == 0
    out = capsys.readouterr().out
    assert "sha256 matches" in out and "scheduler/timesteps is missing" in out
    assert "1 marked not observable" in out and out.strip().endswith("OK: certify can run on this bundle")
    (bundle / "tensors" / "vae" / "image.npy").write_bytes(b"\x93NUMPY garbage")
    assert main(["check", str(bundle)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vae/image" in err[0]


def test_names_lists_what_the_reference_records(tiny_sd21, capsys):
    assert main(["names", "--model", str(tiny_sd21), "--steps", "2", "--height", "64", "--width", "64",
                 "--json"]) == 0
    names = {n["name"]: n for n in json.loads(capsys.readouterr().out)}
    assert names["text_encoder/hidden_states"]["shape"] == [2, 77, 32]
    assert names["unet/step_1/noise_pred"]["layout"] == "NHWC"
    assert "unet/step_1/unet.mid_block.attentions.0" in names and "unet/step_0/unet.mid_block.attentions.0" in names
    enc = names["text_encoder/text_encoder.text_model.encoder"]
    assert "concatenates its two batch-1 outputs" in enc["meaning"]
    assert main(["names", "--model", str(tiny_sd21), "--height", "0"]) == 2


def test_swapped_cfg_batch_order_is_the_first_line(emulated_bundle, tiny_sd21, certify_cache, tmp_path, capsys):
    doc, tensors = bundle_parts(emulated_bundle)
    swap = ("inputs/token_ids", "text_encoder/hidden_states", *(f"unet/step_{i}/noise_pred" for i in range(4)))
    for n in swap:
        tensors[n] = tensors[n][::-1].copy()
    bundle = write_bundle(tmp_path / "b", doc, tensors)
    rc = main(["certify", str(bundle), "--model", str(tiny_sd21), "--out", str(tmp_path / "o"),
               "--cache", str(certify_cache), "--mode", "teacher"])
    first = capsys.readouterr().out.splitlines()[0]
    assert rc == 1 and first.startswith("NOT CERTIFIED: inputs/token_ids: rows are [prompt, negative_prompt]")


def test_nchw_written_as_nhwc_is_explained(tiny_sd21, certify_cache, tmp_path, capsys):
    """C == H == W (8x8 images: 4x4x4 latents), so no shape check can see the layout: certify's first line does."""
    req = Request(certify_request().prompt, steps=2, scheduler="ddim", height=8, width=8)
    good = emulated_capture(tiny_sd21, req, tmp_path / "good", precision="f32")
    doc, tensors = bundle_parts(good)
    ambiguous = {n for n, v in tensors.items() if v.ndim == 4 and v.shape[1] == v.shape[2] == v.shape[3]}
    assert "unet/step_0/noise_pred" in ambiguous
    wrong = {n: np.ascontiguousarray(np.transpose(v, (0, 3, 1, 2))) if n in ambiguous - {"scheduler/latents_init"}
             else v for n, v in tensors.items()}
    bundle = write_bundle(tmp_path / "b", doc, wrong)
    rc = main(["certify", str(bundle), "--model", str(tiny_sd21), "--out", str(tmp_path / "o"),
               "--cache", str(certify_cache), "--mode", "teacher"])
    first = capsys.readouterr().out.splitlines()[0]
    assert rc == 1 and "passes if read as NCHW" in first, first
