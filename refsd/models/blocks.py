"""Blocks shared by the UNet and the VAE, as diffusers defines them
(``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``, ``Attention``), NHWC."""

from __future__ import annotations

import numpy as np

from refsd.models.module import Conv2d, GroupNorm, Linear, Module, activation
from refsd.models.rewrites import attention_op


class ResnetBlock2D(Module):
    """``norm1 -> silu -> conv1 (+ time_emb_proj(silu(temb))) -> norm2 -> silu
    -> conv2``, plus the input (through ``conv_shortcut`` when the width changes).
    ``time_embedding_norm="default"``, ``output_scale_factor=1`` (SD's values)."""

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None, groups: int,
                 eps: float) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: np.ndarray, temb: np.ndarray | None = None) -> np.ndarray:
        ops = self.ops
        h = activation(self, "nonlinearity", ops.silu, self.norm1(x))
        h = self.conv1(h)
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(activation(self, "nonlinearity", ops.silu, temb))
            h = ops.add(h, t[:, None, None, :])
        h = activation(self, "nonlinearity", ops.silu, self.norm2(h))
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return ops.add(x, h)


class Downsample2D(Module):
    """``conv`` 3x3 stride 2: ``padding=1`` in the UNet; the VAE encoder's
    ``padding=0`` pads (0, 1, 0, 1) first, as diffusers does."""

    def __init__(self, channels: int, *, padding: int = 1) -> None:
        super().__init__()
        pad = padding if padding else ((0, 1), (0, 1))
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=pad)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.conv(x)


class Upsample2D(Module):
    """Nearest 2x (cropped to ``size`` when the skip connection is odd-sized,
    as ``interpolate(size=...)`` gives), then ``conv`` 3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        up = self.ops.upsample_nearest2x(x)
        if size is not None and tuple(size) != up.shape[1:3]:
            up = up[:, : size[0], : size[1]]
        return self.conv(up)


class SpatialSelfAttention(Module):
    """The VAE's single-head attention (diffusers ``Attention`` with
    ``group_norm``, ``residual_connection=True``, ``upcast_softmax=True``,
    biases). Legacy checkpoints name the projections ``query``, ``key``,
    ``value``, ``proj_attn`` and may store them 1x1-conv shaped (C, C, 1, 1):
    both are accepted (see ``AutoencoderKL._remap_state``)."""

    LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

    def __init__(self, channels: int, *, groups: int, eps: float, head_dim: int | None = None) -> None:
        super().__init__()
        legacy = ((channels, channels, 1, 1),)
        self.heads = channels // (head_dim or channels)
        self.group_norm = GroupNorm(groups, channels, eps)
        self.to_q = Linear(channels, channels, alt_shapes=legacy)
        self.to_k = Linear(channels, channels, alt_shapes=legacy)
        self.to_v = Linear(channels, channels, alt_shapes=legacy)
        self.to_out = [Linear(channels, channels, alt_shapes=legacy)]

    def forward(self, x: np.ndarray) -> np.ndarray:
        n, h, w, c = x.shape
        t = self.group_norm(x).reshape(n, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        y = attention_op(self)(q, k, v, heads=self.heads, upcast_softmax=True)
        y = self.to_out[0](y).reshape(n, h, w, c)
        return self.ops.add(y, x)
