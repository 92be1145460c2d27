"""diffusers' ``AutoencoderKL`` (SD 1.x / 2.x VAE) in NHWC.

``decode(z)`` is ``AutoencoderKL.decode``: ``post_quant_conv`` then the
decoder (``conv_in``, mid block with single-head attention, up blocks,
``conv_norm_out``, SiLU, ``conv_out``). Pipelines call it on
``latents / scaling_factor`` (``decode_latents`` does that). The encoder is
here too (the checkpoint holds it, and img2img needs it): ``encode(x)``
returns the posterior's mean and log-variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refsd.models.blocks import Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D
from refsd.models.config import config_from_dict
from refsd.models.module import Conv2d, GroupNorm, Module, RootModel, activation
from refsd.models.options import ModelOptions

_EPS = 1e-6  # diffusers' VAE resnets, attention and output norms


def downscale(block_out_channels) -> int:
    """The VAE scale factor: image pixels per latent pixel along each side (one 2x per block after the first)."""
    return 2 ** (len(block_out_channels) - 1)


@dataclass(frozen=True)
class VaeConfig:
    """``vae/config.json`` fields used (diffusers' defaults)."""

    block_out_channels: tuple = (64,)
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    in_channels: int = 3
    out_channels: int = 3
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        if self.act_fn != "silu":
            raise ValueError(f"act_fn {self.act_fn!r} not supported (SD VAEs use 'silu')")
        n = len(self.block_out_channels)
        for key, types, want in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                 ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            if len(types) != n:
                raise ValueError(f"{key} has {len(types)} entries, block_out_channels {n}")
            bad = [t for t in types if t != want]
            if bad:
                raise ValueError(f"{key}: {bad[0]!r} not supported (SD VAEs use {want!r})")

    @classmethod
    def from_dict(cls, d: dict, source: str = "vae/config.json") -> "VaeConfig":
        return config_from_dict(cls, d, required=("block_out_channels", "latent_channels"), source=source)

    @property
    def downscale(self) -> int:
        return downscale(self.block_out_channels)


class VaeMidBlock(Module):
    """diffusers ``UNetMidBlock2D`` without time embedding: resnet, attention, resnet."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=_EPS)
                        for _ in range(2)]
        self.attentions = [SpatialSelfAttention(channels, groups=groups, eps=_EPS) if add_attention else None]

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                x = attn(x)
            x = resnet(x)
        return x


class DownEncoderBlock2D(Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, add_downsample: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, temb_channels=None, groups=groups, eps=_EPS)
                        for i in range(layers)]
        self.downsamplers = [Downsample2D(cout, padding=0)] if add_downsample else None

    def forward(self, x: np.ndarray) -> np.ndarray:
        for r in self.resnets:
            x = r(x)
        if self.downsamplers:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, add_upsample: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, temb_channels=None, groups=groups, eps=_EPS)
                        for i in range(layers)]
        self.upsamplers = [Upsample2D(cout)] if add_upsample else None

    def forward(self, x: np.ndarray) -> np.ndarray:
        for r in self.resnets:
            x = r(x)
        if self.upsamplers:
            x = self.upsamplers[0](x)
        return x


class Encoder(Module):
    def __init__(self, c: VaeConfig) -> None:
        super().__init__()
        ch, g = c.block_out_channels, c.norm_num_groups
        self.conv_in = Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, add_downsample=i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.mid_block = VaeMidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1], _EPS)
        self.conv_out = Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        x = activation(self, "conv_act", self.ops.silu, self.conv_norm_out(x))
        return self.conv_out(x)


class Decoder(Module):
    def __init__(self, c: VaeConfig) -> None:
        super().__init__()
        ch, g = c.block_out_channels, c.norm_num_groups
        rev = tuple(reversed(ch))
        self.conv_in = Conv2d(c.latent_channels, ch[-1], 3, padding=1)
        self.mid_block = VaeMidBlock(ch[-1], g, c.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], c.layers_per_block + 1, g, add_upsample=i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.conv_norm_out = GroupNorm(g, ch[0], _EPS)
        self.conv_out = Conv2d(ch[0], c.out_channels, 3, padding=1)

    def forward(self, z: np.ndarray) -> np.ndarray:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        x = activation(self, "conv_act", self.ops.silu, self.conv_norm_out(x))
        return self.conv_out(x)


class AutoencoderKL(RootModel):
    """``vae``: ``decode(z)`` (N, h, w, latent) -> image (N, 8h, 8w, 3) in [-1, 1]-ish
    for SD; ``encode(x)`` -> (mean, logvar)."""

    def __init__(self, config: VaeConfig, *, options: ModelOptions | None = None, name: str = "vae",
                 **option_kw) -> None:
        super().__init__()
        self.config = config
        lat = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = Conv2d(2 * lat, 2 * lat, 1) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(lat, lat, 1) if config.use_post_quant_conv else None
        self._finish(name, options or ModelOptions.make(**option_kw))

    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    def _remap_state(self, state: dict) -> dict:
        """Legacy attention keys (``query``/``key``/``value``/``proj_attn``) -> current names."""
        out = {}
        for k, v in state.items():
            head, _, leaf = k.rpartition(".")
            path, _, last = head.rpartition(".")
            if ".attentions." in k and last in SpatialSelfAttention.LEGACY:
                k = f"{path}.{SpatialSelfAttention.LEGACY[last]}.{leaf}"
            out[k] = v
        return out

    def _check_latents(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, np.float32)
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(f"vae expects NHWC latents with {self.config.latent_channels} channels, got {z.shape}")
        return z

    def forward(self, z: np.ndarray) -> np.ndarray:
        return self._decode(self._check_latents(z))

    def _decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def unscale(self, latents):
        """``latents / scaling_factor (+ shift)``: what pipelines do before decoding."""
        z = self.ops.scale(latents, factor=1.0 / self.scaling_factor)
        if self.config.shift_factor is not None:
            z = self.ops.add(z, np.float32(self.config.shift_factor))
        return z

    def graph(self, latents):
        """``decode_latents`` on checked latents (executor-agnostic, see ``UNet2DConditionModel.graph``)."""
        return self._decode(self.unscale(latents))

    def decode(self, z: np.ndarray) -> np.ndarray:
        """``AutoencoderKL.decode(z).sample`` in NHWC (no scaling applied); same as calling the model."""
        return self(z)

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        """What SD pipelines decode: ``decode(latents / scaling_factor (+ shift))``."""
        z = self._check_latents(latents)
        with self.running():
            z = self.unscale(z)
        return self.decode(z)

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image (N, H, W, 3) -> posterior (mean, logvar), each (N, H/8, W/8, latent)."""
        x = np.asarray(x, np.float32)
        with self.running():
            h = self.encoder(x)
            if self.quant_conv is not None:
                h = self.quant_conv(h)
        lat = self.config.latent_channels
        return h[..., :lat], np.clip(h[..., lat:], -30.0, 20.0)
