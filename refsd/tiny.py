"""``refsd make-tiny DIR --arch sd15|sd21 --seed N``: a complete diffusers-format
Stable Diffusion folder with seeded random weights, without torch.

The module structure is the real one (every block type SD uses: cross-attention
and plain down / up blocks, the cross-attention mid block, the VAE with its
attention; SD 2.x's per-block head counts, linear projections, upcast
attention, GELU text encoder and v-prediction scheduler), at small widths.
diffusers and transformers load it with ``from_pretrained(DIR)``; refsd loads
it with ``refsd.weights``. The tokenizer is the real CLIP tokenizer
(vocab.json / merges.txt derived from CLIP's BPE file in ``refsd/data``).

Deterministic byte for byte: each tensor is drawn from
``numpy.random.default_rng([seed, component, crc32(key)])`` (independent of
the order keys are written), safetensors are written with sorted keys and
fixed metadata, JSON with sorted keys.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from refsd.data import BOS, EOS, clip_bpe, merges_txt
from refsd.models.clip_text import ClipTextConfig, ClipTextModel
from refsd.models.options import ModelOptions
from refsd.models.unet import UNet2DConditionModel, UNetConfig
from refsd.models.vae import AutoencoderKL, VaeConfig
from refsd.trace import MODELS
from refsd.weights import write_safetensors

ARCHES = ("sd15", "sd21")
DTYPES = ("float32", "float16")
_DIFFUSERS_VERSION = "0.30.0"  # written into configs; a fixed value keeps the folder byte-identical
_TRANSFORMERS_VERSION = "4.40.0"
_COMPONENT_IDS = {"text_encoder": 1, "unet": 2, "vae": 3}


def tiny_configs(arch: str) -> dict[str, dict]:
    """The JSON configs of each component (what ``config.json`` files hold)."""
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHES)}")
    sd21 = arch == "sd21"
    text = {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "gelu" if sd21 else "quick_gelu",
        "hidden_size": 32,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 1,
        "projection_dim": 32,
        "torch_dtype": "float32",
        "transformers_version": _TRANSFORMERS_VERSION,
        "vocab_size": 49408,
    }
    unet = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": [2, 4] if sd21 else 8,
        "block_out_channels": [32, 64],
        "center_input_sample": False,
        "cross_attention_dim": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "resnet_time_scale_shift": "default",
        "sample_size": 16,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "upcast_attention": sd21,
        "use_linear_projection": sd21,
    }
    vae = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": 32,
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    }
    scheduler = {
        "_class_name": "DDIMScheduler" if sd21 else "PNDMScheduler",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction" if sd21 else "epsilon",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    return {"text_encoder": text, "unet": unet, "vae": vae, "scheduler": scheduler, "model_index": index}


def tokenizer_files(arch: str) -> dict[str, str]:
    """tokenizer/ files: SD 1.x pads with <|endoftext|>, SD 2.x with "!" (id 0)."""
    vocab, _ = clip_bpe()
    pad = "!" if arch == "sd21" else EOS
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad, "unk_token": EOS}
    config = {
        **special,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": merges_txt(),
        "special_tokens_map.json": _json(special),
        "tokenizer_config.json": _json(config),
    }


def build_models(arch: str) -> dict:
    """Weightless refsd models of the tiny architecture (shapes only)."""
    cfg = tiny_configs(arch)
    opts = ModelOptions.make()
    return {
        "text_encoder": ClipTextModel(ClipTextConfig.from_dict(cfg["text_encoder"]), options=opts),
        "unet": UNet2DConditionModel(UNetConfig.from_dict(cfg["unet"]), options=opts),
        "vae": AutoencoderKL(VaeConfig.from_dict(cfg["vae"]), options=opts),
    }


def random_state(model, component: str, seed: int, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Seeded weights for every parameter of ``model``, in checkpoint layout.

    Linear / conv: N(0, 1/fan_in) (activations stay O(1) through the depth);
    norm scales 1 + N(0, 0.1^2); biases N(0, 0.05^2); token embeddings
    N(0, 0.02^2), position embeddings N(0, 0.01^2) (CLIP's magnitudes)."""
    out = {}
    for key, spec in model.parameter_specs():
        if spec.layout == "buffer" or spec.optional:
            continue
        rng = np.random.default_rng([seed, _COMPONENT_IDS[component], zlib.crc32(key.encode())])
        z = rng.standard_normal(spec.shape)
        if spec.layout in ("linear", "conv"):
            w = z / np.sqrt(np.prod(spec.shape[1:]))
        elif spec.layout == "embedding":
            w = z * (0.01 if "position" in key else 0.02)
        elif key.endswith(".weight"):  # GroupNorm / LayerNorm scale
            w = 1.0 + 0.1 * z
        else:
            w = 0.05 * z
        out[key] = w.astype(dtype)
    return out


def make_tiny(directory: str | Path, arch: str = "sd15", seed: int = 0, *, dtype: str = "float32") -> Path:
    """Write the tiny ``arch`` pipeline with weights from ``seed`` into ``directory``
    (created; existing files of the same names are overwritten). Returns the path."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    root = Path(directory)
    cfg = tiny_configs(arch)
    models = build_models(arch)
    files: dict[str, str | bytes] = {
        "model_index.json": _json(cfg["model_index"]),
        "scheduler/scheduler_config.json": _json(cfg["scheduler"]),
        "refsd_tiny.json": _json({"arch": arch, "seed": int(seed), "dtype": dtype, "generator": "refsd make-tiny"}),
    }
    for comp in MODELS:
        c = dict(cfg[comp])
        if comp == "text_encoder":
            c["torch_dtype"] = dtype
        files[f"{comp}/config.json"] = _json(c)
    for name, text in tokenizer_files(arch).items():
        files[f"tokenizer/{name}"] = text
    for sub in ("scheduler", "text_encoder", "tokenizer", "unet", "vae"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (root / rel).write_text(text, encoding="utf-8", newline="\n")
    weight_files = {"text_encoder": "model.safetensors", "unet": "diffusion_pytorch_model.safetensors",
                    "vae": "diffusion_pytorch_model.safetensors"}
    for comp, fname in weight_files.items():
        write_safetensors(root / comp / fname, random_state(models[comp], comp, int(seed), dtype))
    return root


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"
