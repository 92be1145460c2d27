"""``refsd-validate names`` (``refsd.names``): shapes scaled from one probe-size
step are exactly a real run's, at the model's own size and at an odd one, for
both architectures; the pipeline never runs at the size asked for; names a
forward hook cannot capture in diffusers / transformers are marked and optional."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refsd import trace
from refsd.context import recording
from refsd.names import default_size, hook_results, recorded_names
from refsd.pipeline import Pipeline, Request
from refsd_validate.cli import main


@pytest.fixture(params=["sd15", "sd21"])
def model(request, tiny_sd15, tiny_sd21):
    return {"sd15": tiny_sd15, "sd21": tiny_sd21}[request.param]


def _real_shapes(model, height, width, steps):
    with recording() as rec:
        result = Pipeline(model, low_memory=True)(Request("", steps=steps, scheduler="ddim", height=height,
                                                          width=width), progress=False)
    return {n: tuple(np.shape(v)) for n, v in {**result.trace, **rec}.items()}


# The model's own size (tiny: sample_size 16 x VAE factor 2), and latents 9 x 23: odd at every level, where a
# downsample rounds up and the UNet's up path must match its skips, not double.
@pytest.mark.parametrize("size", [None, (18, 46)])
def test_names_shapes_are_a_real_runs(model, size):
    height, width = size or default_size(model)
    got = {i.name: i.shape for i in recorded_names(model, steps=2, height=height, width=width)}
    real = _real_shapes(model, height, width, steps=2)
    real[trace.TOKEN_IDS] = (2, trace.TOKENS)  # an input of the run, not in its trace (refsd.trace's contract)
    assert got == real


def test_default_size_is_the_models_own(tiny_sd21, monkeypatch):
    assert default_size(tiny_sd21) == (32, 32)  # unet sample_size 16, two VAE blocks: factor 2
    sizes = []
    call = Pipeline.__call__

    def spy(self, req, **kw):
        sizes.append((req.height, req.width, req.steps))
        return call(self, req, **kw)

    monkeypatch.setattr(Pipeline, "__call__", spy)
    infos = {i.name: i for i in recorded_names(tiny_sd21, steps=3)}
    assert infos[trace.IMAGE].shape == (1, 32, 32, 3) and infos[trace.TIMESTEPS].shape == (3,)
    assert sizes == [(4, 4, 1)]  # one step at the probe size (latents 2x2), never the size asked for


def test_names_marks_what_a_hook_cannot_capture(tiny_sd21, capsys):
    assert main(["names", "--model", str(tiny_sd21), "--steps", "2", "--json"]) == 0
    names = {n["name"]: n for n in json.loads(capsys.readouterr().out)}
    required = {n for n, v in names.items() if v["required"]}
    assert required == {trace.TOKEN_IDS, *trace.boundary_names(2)}
    attn = names["unet/step_1/unet.down_blocks.0.attentions.0"]
    assert not attn["capturable_by_hook"] and "tuple" in attn["hook_sees"] and not attn["required"]
    assert names["unet/step_1/unet.down_blocks.0.resnets.0"]["capturable_by_hook"]
    assert "noise_pred" in names["unet/step_1/unet"]["hook_sees"]
    assert not names["text_encoder/text_encoder.text_model.encoder"]["capturable_by_hook"]
    assert main(["names", "--model", str(tiny_sd21)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t")[3] == "in a bundle"
    row = next(line.split("\t") for line in lines if line.startswith("unet/step_0/unet.down_blocks.0.attentions.0\t"))
    assert row[3].startswith("optional, not hook-capturable: a tuple")
    assert next(line for line in lines if line.startswith("vae/image\t")).split("\t")[3] == "required"


@pytest.mark.parametrize("argv, word", [(["--height", "33", "--width", "32"], "multiples"),
                                        (["--height", "32"], "--width"), (["--width", "99999", "--height", "8"],
                                                                         "--width")])
def test_names_bad_sizes_are_one_line(tiny_sd21, capsys, argv, word):
    assert main(["names", "--model", str(tiny_sd21), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0], err


@pytest.mark.conformance
def test_hook_marks_agree_with_diffusers_and_transformers(model):
    """Every module of diffusers' UNet and VAE and transformers' CLIP text model, hooked during one forward:
    refsd marks exactly those whose hook sees something other than one tensor."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from refsd.names import module_paths  # noqa: PLC0415

    seen: dict[str, bool] = {}
    te = transformers.CLIPTextModel.from_pretrained(model / "text_encoder")
    unet = diffusers.UNet2DConditionModel.from_pretrained(model / "unet")
    vae = diffusers.AutoencoderKL.from_pretrained(model / "vae")
    paths = module_paths(model)
    for stage, m in (("text_encoder", te), ("unet", unet), ("vae", vae)):
        for name, mod in m.named_modules():
            path = f"{stage}.{name}" if name else stage
            if stage == "text_encoder" and path not in paths[stage]:  # transformers 5 has no text_model level
                path = f"text_encoder.text_model.{name}" if name else stage
            def hook(mod, args, out, path=path):  # returns None: a hook's result would replace the output
                seen.setdefault(path, torch.is_tensor(out))

            mod.register_forward_hook(hook)
    with torch.no_grad():
        hidden = te(torch.zeros(2, 77, dtype=torch.long))[0]
        unet(torch.zeros(2, 4, 8, 8), 10, hidden)
        vae.decode(torch.zeros(1, 4, 8, 8))
    marked = hook_results(model)
    not_tensors = {p for p, tensor in seen.items() if not tensor}
    assert not_tensors <= set(marked)
    assert {p for p in marked if p in seen} == not_tensors  # marked modules a hook reaches: none returns a tensor
    assert all(p in paths["text_encoder"] | paths["unet"] | paths["vae"] for p in seen if p in marked)
