"""CLIP text encoder as transformers' ``CLIPTextModel`` computes it: SD 1.x
ships OpenAI CLIP ViT-L/14 (``quick_gelu``), SD 2.x OpenCLIP ViT-H/14 (``gelu``,
23 of its 24 layers, as diffusers folders ship it). The output is
``last_hidden_state`` (after ``final_layer_norm``), what SD pipelines feed the UNet.

Keys: ``text_model.embeddings.token_embedding.weight``,
``text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``layer_norm{1,2}``,
``mlp.fc{1,2}``, ``text_model.final_layer_norm``. transformers 5's
``save_pretrained`` drops the ``text_model.`` prefix; both are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refsd.models.config import config_from_dict
from refsd.models.module import Embedding, LayerNorm, Linear, Module, RootModel, activation
from refsd.models.options import ModelOptions
from refsd.models.rewrites import attention_op, embedding_op, gelu_op

# transformers' ACT2FN names -> (op, GELU approximation; None: erf unless the model option says tanh)
_ACTS = {"quick_gelu": ("quick_gelu", None), "gelu": ("gelu", None), "gelu_new": ("gelu", "tanh"),
         "gelu_pytorch_tanh": ("gelu", "tanh")}


@dataclass(frozen=True)
class ClipTextConfig:
    """transformers' ``CLIPTextConfig`` fields the encoder uses (defaults are
    transformers' own, since its ``config.json`` may omit default values)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    model_type: str = "clip_text_model"

    def __post_init__(self) -> None:
        if self.hidden_act not in _ACTS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported; expected one of {', '.join(_ACTS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{self.num_attention_heads} heads do not divide hidden_size {self.hidden_size}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "text_encoder/config.json") -> "ClipTextConfig":
        if d.get("model_type") == "clip" and isinstance(d.get("text_config"), dict):
            d = {**d["text_config"], "model_type": "clip_text_model"}
        mt = d.get("model_type")
        if mt not in (None, "clip_text_model"):
            raise ValueError(f"{source}: model_type {mt!r} is not a CLIP text model")
        return config_from_dict(cls, d, source=source)


class ClipAttention(Module):
    """``self_attn``: multi-head self-attention with the causal mask."""

    def __init__(self, c: ClipTextConfig) -> None:
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(d, d) for _ in range(4))

    def forward(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # transformers computes the softmax in float32 (eager_attention_forward), hence upcast_softmax.
        y = attention_op(self)(q, k, v, heads=self.heads, mask=mask, upcast_softmax=True)
        return self.out_proj(y)


class ClipMLP(Module):
    def __init__(self, c: ClipTextConfig) -> None:
        super().__init__()
        self.fc1 = Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = Linear(c.intermediate_size, c.hidden_size)
        self.hidden_act = c.hidden_act

    def forward(self, x: np.ndarray) -> np.ndarray:
        h = self.fc1(x)
        kind, approx = _ACTS[self.hidden_act]
        fn = self.ops.quick_gelu if kind == "quick_gelu" else gelu_op(self, gated=False, approximate=approx)
        return self.fc2(activation(self, "activation_fn", fn, h))


class ClipEncoderLayer(Module):
    def __init__(self, c: ClipTextConfig) -> None:
        super().__init__()
        self.self_attn = ClipAttention(c)
        self.layer_norm1 = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.mlp = ClipMLP(c)
        self.layer_norm2 = LayerNorm(c.hidden_size, c.layer_norm_eps)

    def forward(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        x = self.ops.add(x, self.self_attn(self.layer_norm1(x), mask))
        return self.ops.add(x, self.mlp(self.layer_norm2(x)))


class ClipEncoder(Module):
    def __init__(self, c: ClipTextConfig) -> None:
        super().__init__()
        self.layers = [ClipEncoderLayer(c) for _ in range(c.num_hidden_layers)]

    def forward(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class TokenEmbedding(Embedding):
    """The token lookup; ``embedding_1d`` runs it as a gather by 1-D indices (same rows)."""

    def forward(self, ids: np.ndarray) -> np.ndarray:
        return embedding_op(self)(ids, self.table())


class ClipEmbeddings(Module):
    def __init__(self, c: ClipTextConfig) -> None:
        super().__init__()
        self.token_embedding = TokenEmbedding(c.vocab_size, c.hidden_size)
        # Looked up by constant positions: a deployed graph folds it into a float constant (never int8).
        self.position_embedding = Embedding(c.max_position_embeddings, c.hidden_size, constant_ids=True)
        # transformers < 4.31 saved this buffer; accepted and ignored.
        self.declare("position_ids", (1, c.max_position_embeddings), "buffer", optional=True)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        length = ids.shape[1]
        pos = self.position_embedding(np.arange(length)[None, :])
        return self.ops.add(self.token_embedding(ids), pos)


class ClipTextTransformer(Module):
    def __init__(self, c: ClipTextConfig) -> None:
        super().__init__()
        self.embeddings = ClipEmbeddings(c)
        self.encoder = ClipEncoder(c)
        self.final_layer_norm = LayerNorm(c.hidden_size, c.layer_norm_eps)

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.final_layer_norm(self.encoder(self.embeddings(ids), mask))


class ClipTextModel(RootModel):
    """``text_encoder``: token ids (N, L) int -> hidden states (N, L, D).

    ``mask_value`` is the additive causal mask above the diagonal: ``-inf``
    (exactly zero weight, survives fp16 as -inf, no monitor event). A graph
    converter's ``-1e9`` or ``finfo.min`` mask gives the same f32 result and
    becomes -inf in fp16 (the catalogue shows that case)."""

    def __init__(self, config: ClipTextConfig, *, options: ModelOptions | None = None, name: str = "text_encoder",
                 mask_value: float = float("-inf"), **option_kw) -> None:
        super().__init__()
        self.config = config
        self.mask_value = mask_value
        self.text_model = ClipTextTransformer(config)
        self._finish(name, options or ModelOptions.make(**option_kw))

    def _remap_state(self, state: dict) -> dict:
        # transformers 5 saves CLIPTextModel without the "text_model." prefix.
        if state and not any(k.startswith("text_model.") for k in state):
            state = {f"text_model.{k}": v for k, v in state.items()}
        return state

    def causal_mask(self, length: int) -> np.ndarray:
        m = np.zeros((length, length), np.float32)
        m[np.triu_indices(length, 1)] = np.float32(self.mask_value)
        return m[None, None]

    def forward(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"text encoder expects integer token ids of shape (N, L), got {ids.dtype} {ids.shape}")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{ids.shape[1]} tokens exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids {int(ids.min())}..{int(ids.max())} outside the text encoder's vocabulary "
                             f"[0, {self.config.vocab_size}) (tokenizer and text_encoder/config.json disagree)")
        return self.graph(ids)

    def graph(self, ids):
        """The encoder on checked (N, L) ids (executor-agnostic, see ``UNet2DConditionModel.graph``)."""
        return self.text_model(ids, self.causal_mask(ids.shape[1]))
