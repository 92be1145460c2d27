"""diffusers' ``UNet2DConditionModel`` for SD 1.x / 2.x, NHWC.

``unet(sample, timestep, encoder_hidden_states)``: latents (N, h, w, 4), a
timestep (scalar or (N,)) and text hidden states (N, L, cross_attention_dim)
-> the model output (N, h, w, 4): noise (epsilon models, SD 1.x, SD 2.x-base)
or velocity (v-prediction, SD 2.x 768); the UNet does not care which, the
scheduler does.

Config semantics follow diffusers, including its naming quirk: for these
blocks ``attention_head_dim`` (int or per-block list) is the *number of
heads* unless ``num_attention_heads`` is given; the head width is
``channels // heads``. ``use_linear_projection`` makes ``proj_in`` /
``proj_out`` linear (SD 2.x) instead of 1x1 convs; ``upcast_attention``
computes attention scores and softmax in float32 (SD 2.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refsd.context import scope
from refsd.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from refsd.models.config import config_from_dict
from refsd.models.module import Conv2d, GroupNorm, LayerNorm, Linear, Module, RootModel, activation
from refsd.models.options import ModelOptions
from refsd.models.rewrites import attention_op, gelu_op
from refsd.numerics import current_precision

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class UNetConfig:
    """``unet/config.json`` fields (diffusers' defaults). Options SD does not
    use are accepted only at their default value (anything else is an error
    naming the key, rather than a silently different model)."""

    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    layers_per_block: int | tuple = 2
    downsample_padding: int = 1
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple = 1280
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple = 8
    num_attention_heads: int | tuple | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None
    # accepted only at diffusers' defaults:
    only_cross_attention: bool | tuple = False
    dual_cross_attention: bool = False
    mid_block_scale_factor: float = 1
    resnet_out_scale_factor: float = 1.0
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    time_embedding_type: str = "positional"
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    addition_embed_type: str | None = None
    encoder_hid_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    attention_type: str = "default"
    cross_attention_norm: str | None = None
    reverse_transformer_layers_per_block: tuple | None = None

    _UNSUPPORTED = {
        "only_cross_attention": False, "dual_cross_attention": False, "mid_block_scale_factor": 1,
        "resnet_out_scale_factor": 1.0, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
        "time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
        "time_cond_proj_dim": None, "class_embed_type": None, "num_class_embeds": None,
        "addition_embed_type": None, "encoder_hid_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "attention_type": "default", "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
        "act_fn": "silu",
    }

    def __post_init__(self) -> None:
        for key, default in self._UNSUPPORTED.items():
            value = getattr(self, key)
            if isinstance(default, bool) and isinstance(value, tuple):
                ok = not any(value)
            else:
                ok = value == default
            if not ok:
                raise ValueError(f"{key}={value!r} is not supported (SD 1.x/2.x UNets use {default!r})")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types / up_block_types need {n} entries (block_out_channels)")
        for t in self.down_block_types:
            if t not in _DOWN:
                raise ValueError(f"down block type {t!r} not supported; expected one of {', '.join(_DOWN)}")
        for t in self.up_block_types:
            if t not in _UP:
                raise ValueError(f"up block type {t!r} not supported; expected one of {', '.join(_UP)}")
        if self.mid_block_type not in ("UNetMidBlock2DCrossAttn", None):
            raise ValueError(f"mid_block_type {self.mid_block_type!r} not supported")
        for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "heads"):
            value = self.per_block(key)
            if len(value) != n:
                raise ValueError(f"{key} has {len(value)} entries, expected {n}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "unet/config.json") -> "UNetConfig":
        return config_from_dict(cls, d, required=("block_out_channels", "down_block_types", "up_block_types",
                                                  "cross_attention_dim"), source=source)

    def per_block(self, key: str) -> tuple:
        """A per-block setting expanded to one entry per down block; ``heads``
        is ``num_attention_heads or attention_head_dim`` (diffusers' rule)."""
        if key == "heads":
            value = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        else:
            value = getattr(self, key)
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(self.down_block_types)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4


# ---------------------------------------------------------------- transformer


class Attention(Module):
    """``attn1`` (self) / ``attn2`` (cross): ``to_q``, ``to_k``, ``to_v`` without
    bias, ``to_out.0`` with bias (``to_out.1`` is dropout)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None, upcast_attention: bool) -> None:
        super().__init__()
        ctx = context_dim or dim
        self.heads, self.upcast_attention = heads, upcast_attention
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(ctx, dim, bias=False)
        self.to_v = Linear(ctx, dim, bias=False)
        self.to_out = [Linear(dim, dim)]

    def forward(self, x: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        c = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(c), self.to_v(c)
        y = attention_op(self)(q, k, v, heads=self.heads, upcast_attention=self.upcast_attention)
        return self.to_out[0](y)


class GEGLU(Module):
    """``ff.net.0``: ``proj`` to 2x the inner width, then ``a * gelu(g)``."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = Linear(dim, 2 * inner)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return gelu_op(self, gated=True)(self.proj(x))


class FeedForward(Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = [GEGLU(dim, dim * mult), None, Linear(dim * mult, dim)]  # net.1: dropout

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(Module):
    def __init__(self, dim: int, heads: int, context_dim: int, upcast_attention: bool) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, None, upcast_attention)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast_attention)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: np.ndarray, context: np.ndarray) -> np.ndarray:
        add = self.ops.add
        x = add(self.attn1(self.norm1(x)), x)
        x = add(self.attn2(self.norm2(x), context), x)
        return add(self.ff(self.norm3(x)), x)


class Transformer2DModel(Module):
    """``attentions.{j}``: GroupNorm (eps 1e-6), ``proj_in`` (1x1 conv, or linear
    with ``use_linear_projection``), transformer blocks, ``proj_out``, residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, layers: int, groups: int,
                 linear_projection: bool, upcast_attention: bool) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{heads} attention heads do not divide {channels} channels")
        self.linear_projection = linear_projection
        self.norm = GroupNorm(groups, channels, 1e-6)
        proj = (lambda: Linear(channels, channels)) if linear_projection else (lambda: Conv2d(channels, channels, 1))
        self.proj_in = proj()
        # What a device folds (refsd.numerics.DeviceModel.fold_norm_into_conv) is folded from the deployed values.
        self.norm.keep_deployed = self.proj_in.keep_deployed = not linear_projection
        self.transformer_blocks = [BasicTransformerBlock(channels, heads, context_dim, upcast_attention)
                                   for _ in range(layers)]
        self.proj_out = proj()

    def forward(self, x: np.ndarray, context: np.ndarray) -> np.ndarray:
        n, h, w, c = x.shape
        p = current_precision()
        device = p.device if p.math16 else None
        if device and device.fold_norm_into_conv and not self.linear_projection and self.proj_in.can_fold():
            # The device folds the GroupNorm's gamma and beta into the 1x1 proj_in (measured).
            t = self.norm(x, affine=False)
            t = self.proj_in(t, fold=(self.norm.deployed("weight"), self.norm.deployed("bias"))).reshape(n, h * w, c)
        elif self.linear_projection:
            t = self.norm(x)
            t = self.proj_in(t.reshape(n, h * w, c))
        else:
            t = self.proj_in(self.norm(x)).reshape(n, h * w, c)
        for block in self.transformer_blocks:
            t = block(t, context)
        if self.linear_projection:
            t = self.proj_out(t).reshape(n, h, w, c)
        else:
            t = self.proj_out(t.reshape(n, h, w, c))
        return self.ops.add(t, x)


# ---------------------------------------------------------------- blocks


class DownBlock(Module):
    """``CrossAttnDownBlock2D`` (with ``attentions``) or ``DownBlock2D``."""

    def __init__(self, cin, cout, temb, layers, groups, eps, add_downsample, padding, attn=None) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, temb_channels=temb, groups=groups, eps=eps)
                        for i in range(layers)]
        if attn is not None:
            self.attentions = [Transformer2DModel(cout, groups=groups, **attn) for _ in range(layers)]
        self.downsamplers = [Downsample2D(cout, padding=padding)] if add_downsample else None

    def forward(self, x, temb, context):
        skips = []
        attentions = getattr(self, "attentions", None)
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if attentions is not None:
                x = attentions[i](x, context)
            skips.append(x)
        if self.downsamplers:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(Module):
    """``CrossAttnUpBlock2D`` (with ``attentions``) or ``UpBlock2D``: each resnet
    takes the channel concat of the hidden state and one skip (last first)."""

    def __init__(self, cin, cout, prev, temb, layers, groups, eps, add_upsample, attn=None) -> None:
        super().__init__()
        self.resnets = []
        for i in range(layers):
            skip = cin if i == layers - 1 else cout
            rin = prev if i == 0 else cout
            self.resnets.append(ResnetBlock2D(rin + skip, cout, temb_channels=temb, groups=groups, eps=eps))
        if attn is not None:
            self.attentions = [Transformer2DModel(cout, groups=groups, **attn) for _ in range(layers)]
        self.upsamplers = [Upsample2D(cout)] if add_upsample else None

    def forward(self, x, skips, temb, context, upsample_size=None):
        attentions = getattr(self, "attentions", None)
        for i, resnet in enumerate(self.resnets):
            x = self.ops.concat(x, skips.pop(), axis=-1)
            x = resnet(x, temb)
            if attentions is not None:
                x = attentions[i](x, context)
        if self.upsamplers:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock(Module):
    """``UNetMidBlock2DCrossAttn``: resnet, (transformer, resnet) ..."""

    def __init__(self, channels, temb, groups, eps, attn) -> None:
        super().__init__()
        self.attentions = [Transformer2DModel(channels, groups=groups, **attn)]
        self.resnets = [ResnetBlock2D(channels, channels, temb_channels=temb, groups=groups, eps=eps)
                        for _ in range(2)]

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


class TimestepEmbedding(Module):
    """``time_embedding``: ``linear_1 -> silu -> linear_2``."""

    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = Linear(cin, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, t: np.ndarray) -> np.ndarray:
        return self.linear_2(activation(self, "act", self.ops.silu, self.linear_1(t)))


# ---------------------------------------------------------------- model


class UNet2DConditionModel(RootModel):
    def __init__(self, config: UNetConfig, *, options: ModelOptions | None = None, name: str = "unet",
                 **option_kw) -> None:
        super().__init__()
        c = self.config = config
        ch = c.block_out_channels
        temb = c.time_embed_dim
        groups, eps = c.norm_num_groups, c.norm_eps
        heads, ctx = c.per_block("heads"), c.per_block("cross_attention_dim")
        layers, tlayers = c.per_block("layers_per_block"), c.per_block("transformer_layers_per_block")

        def attn(i):
            return dict(heads=heads[i], context_dim=ctx[i], layers=tlayers[i],
                        linear_projection=c.use_linear_projection, upcast_attention=c.upcast_attention)

        self.conv_in = Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = []
        for i, kind in enumerate(c.down_block_types):
            self.down_blocks.append(DownBlock(
                ch[max(i - 1, 0)], ch[i], temb, layers[i], groups, eps, add_downsample=i < len(ch) - 1,
                padding=c.downsample_padding, attn=attn(i) if kind == "CrossAttnDownBlock2D" else None))
        self.mid_block = MidBlock(ch[-1], temb, groups, eps, attn(-1)) if c.mid_block_type else None
        self.up_blocks = []
        rch = tuple(reversed(ch))
        r = {k: tuple(reversed(c.per_block(k))) for k in ("heads", "cross_attention_dim", "layers_per_block",
                                                           "transformer_layers_per_block")}
        for i, kind in enumerate(c.up_block_types):
            up_attn = None
            if kind == "CrossAttnUpBlock2D":
                up_attn = dict(heads=r["heads"][i], context_dim=r["cross_attention_dim"][i],
                               layers=r["transformer_layers_per_block"][i],
                               linear_projection=c.use_linear_projection, upcast_attention=c.upcast_attention)
            self.up_blocks.append(UpBlock(
                rch[min(i + 1, len(ch) - 1)], rch[i], rch[max(i - 1, 0)], temb, r["layers_per_block"][i] + 1,
                groups, eps, add_upsample=i < len(ch) - 1, attn=up_attn))
        self.conv_norm_out = GroupNorm(groups, ch[0], eps)
        self.conv_out = Conv2d(ch[0], c.out_channels, 3, padding=1)
        self._finish(name, options or ModelOptions.make(**option_kw))

    def forward(self, sample: np.ndarray, timestep, encoder_hidden_states: np.ndarray) -> np.ndarray:
        return self.graph(*self.check_inputs(sample, timestep, encoder_hidden_states))

    def check_inputs(self, sample, timestep, encoder_hidden_states) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """NumPy inputs -> float32 latents, timesteps broadcast to (N,), hidden states; shapes checked."""
        c = self.config
        x = np.asarray(sample, np.float32)
        ctx = np.asarray(encoder_hidden_states, np.float32)
        if x.ndim != 4 or x.shape[-1] != c.in_channels:
            raise ValueError(f"unet expects NHWC latents with {c.in_channels} channels, got {x.shape}")
        n = x.shape[0]
        if ctx.ndim != 3 or ctx.shape[0] != n:
            raise ValueError(f"encoder_hidden_states must be (N={n}, L, D), got {ctx.shape}")
        t = np.asarray(timestep, np.float32).reshape(-1)
        if t.size == 1:
            t = np.broadcast_to(t, (n,))
        elif t.shape != (n,):
            raise ValueError(f"timestep must be a scalar or of shape ({n},), got {np.shape(timestep)}")
        return x, t, ctx

    def graph(self, x, t, ctx):
        """The network on checked inputs: only ``self.ops`` and shapes, so another
        executor's tensors run through it too (``refsd.export`` traces it with
        TensorFlow twins of the ops, ``t`` of shape (1,) broadcasting over the batch)."""
        c, ops = self.config, self.ops
        if c.center_input_sample:
            x = ops.add(ops.scale(x, factor=2.0), np.float32(-1.0))
        with scope("time_proj"):
            t_emb = ops.timestep_embedding(t, dim=c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                           downscale_freq_shift=c.freq_shift)
        emb = self.time_embedding(t_emb)

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, res = block(x, emb, ctx)
            skips.extend(res)
        if self.mid_block is not None:
            x = self.mid_block(x, emb, ctx)
        for block in self.up_blocks:
            own = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            size = skips[-1].shape[1:3] if (block.upsamplers and skips) else None
            x = block(x, own, emb, ctx, upsample_size=size)
        x = activation(self, "conv_act", ops.silu, self.conv_norm_out(x))
        return self.conv_out(x)
