"""Conformance with implementations we did not write, on identical weights:
refsd (float32, NHWC) against transformers' CLIPTextModel and diffusers'
UNet2DConditionModel / AutoencoderKL.decode (PyTorch float32, CPU, NCHW).

Bound: max|a - b| / max|b| <= 1e-5 for each output. Both sides are float32
computations of the same function that differ only in summation order and
in library kernels (BLAS vs MKL-DNN convs, erf and exp implementations):
a few float32 ulps per op, accumulated over the depth of the model, measure
~1e-6 here, so 1e-5 leaves a margin of ~10x without hiding a wrong formula
(a wrong eps, mask, head split or GELU flavour costs >= 1e-4).

Two sources of folders: ``refsd make-tiny`` (written without torch) and a
pipeline written by diffusers' own ``save_pretrained`` from diffusers- and
transformers-initialized modules (transformers 5 saves the text encoder
without the ``text_model.`` prefix: that dialect is covered too).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from refsd import weights  # noqa: E402
from refsd.tiny import build_models, make_tiny  # noqa: E402

pytestmark = pytest.mark.conformance

BOUND = 1e-5
PROMPTS = ["a photo of a cat", ""]  # cond, uncond: the batch classifier-free guidance runs


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def tiny(request, tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp(request.param), request.param, seed=0)
    return request.param, path


def _torch_models(path):
    unet = diffusers.UNet2DConditionModel.from_pretrained(path / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(path / "vae").eval()
    text = transformers.CLIPTextModel.from_pretrained(path / "text_encoder").eval()
    return text, unet, vae


def _compare_all(ours, text, unet, vae, ids, label):
    """Text hidden states, UNet output at batch 2 (cond + uncond), VAE decode."""
    rng = np.random.default_rng(1234)
    with torch.no_grad():
        ref_h = text(torch.from_numpy(ids)).last_hidden_state.numpy()
    h = ours.text_encoder(ids)
    errs = {"text_encoder": rel(h, ref_h)}

    size = ours.unet.config.sample_size or 16
    latents = rng.standard_normal((1, size, size, 4)).astype(np.float32)
    latents2 = np.concatenate([latents, latents])  # CFG: the same latents twice
    with torch.no_grad():
        ref_eps = nhwc(unet(nchw(latents2), 981, torch.from_numpy(ref_h)).sample)
    eps = ours.unet(latents2, 981, ref_h)
    errs["unet"] = rel(eps, ref_eps)

    z = rng.standard_normal((2, size, size, 4)).astype(np.float32)
    with torch.no_grad():
        ref_img = nhwc(vae.decode(nchw(z)).sample)
    img = ours.vae.decode(z)
    errs["vae"] = rel(img, ref_img)
    print(f"\n{label}: max rel error " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    for k, v in errs.items():
        assert v <= BOUND, f"{label} {k}: max|a-b|/max|b| = {v:.3e} > {BOUND}"
    assert eps.shape == (2, size, size, 4) and img.shape == (2, 2 * size, 2 * size, 3)


def test_tiny_folder_conforms(tiny):
    arch, path = tiny
    ours = weights.load_pipeline(path)
    ids = ours.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="np").input_ids
    _compare_all(ours, *_torch_models(path), ids.astype(np.int64), f"make-tiny {arch}")


def test_tiny_keys_and_shapes_match_torch_models(tiny):
    """The attribute tree is the checkpoint tree: same keys, same shapes as the torch modules."""
    arch, path = tiny
    text, unet, vae = _torch_models(path)
    models = build_models(arch)
    for name, tm in (("unet", unet), ("vae", vae)):
        theirs = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
        assert dict(models[name].named_parameter_shapes()) == theirs, name
    theirs = {k if k.startswith("text_model.") else f"text_model.{k}": tuple(v.shape)
              for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    assert dict(models["text_encoder"].named_parameter_shapes()) == theirs


def test_odd_latent_size_conforms(tiny):
    """Latents not divisible by the UNet's downsampling: diffusers forwards an
    explicit upsample size; refsd crops the nearest-2x upsample to the skip."""
    arch, path = tiny
    _, unet, _ = _torch_models(path)
    ours = weights.load_unet(path / "unet")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 9, 13, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(unet(nchw(x), torch.tensor([10, 500]), torch.from_numpy(ctx)).sample)
    err = rel(ours(x, np.array([10, 500]), ctx), ref)
    assert err <= BOUND, err


def _diffusers_pipeline(arch: str, tokenizer_dir):
    """A pipeline whose modules are initialized by diffusers / transformers
    (their init, not ours), with tiny SD-like configs."""
    torch.manual_seed(0)
    sd21 = arch == "sd21"
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4) if sd21 else 8, use_linear_projection=sd21,
        upcast_attention=sd21)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, latent_channels=4,
        sample_size=32)
    # diffusers initializes conv / linear weights but not norms and biases to
    # anything but 1 / 0; perturb them so every parameter matters.
    with torch.no_grad():
        for m in (unet, vae):
            for _, p in m.named_parameters():
                if p.ndim == 1:
                    p.add_(0.05 * torch.randn_like(p))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        hidden_act="gelu" if sd21 else "quick_gelu", projection_dim=32))
    tok = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    sched_cls = diffusers.DDIMScheduler if sd21 else diffusers.PNDMScheduler
    sched = sched_cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      set_alpha_to_one=False, prediction_type="v_prediction" if sd21 else "epsilon",
                      **({"clip_sample": False} if sd21 else {"skip_prk_steps": True}))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    return pipe


def test_diffusers_save_pretrained_folder_conforms(tiny, tmp_path):
    arch, path = tiny
    pipe = _diffusers_pipeline(arch, path / "tokenizer")
    out = tmp_path / "saved"
    pipe.save_pretrained(out, safe_serialization=True)
    assert not list(out.rglob("*.bin"))
    ours = weights.load_pipeline(out)
    assert ours.scheduler_config["prediction_type"] == ("v_prediction" if arch == "sd21" else "epsilon")
    ids = ours.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="np").input_ids
    _compare_all(ours, pipe.text_encoder.eval(), pipe.unet.eval(), pipe.vae.eval(), ids.astype(np.int64),
                 f"save_pretrained {arch}")


def test_vae_encoder_conforms(tiny):
    arch, path = tiny
    _, _, vae = _torch_models(path)
    ours = weights.load_vae(path / "vae")
    x = np.random.default_rng(3).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        post = vae.encode(nchw(x)).latent_dist
    mean, logvar = ours.encode(x)
    assert rel(mean, nhwc(post.mean)) <= BOUND
    assert rel(logvar, nhwc(post.logvar)) <= BOUND
