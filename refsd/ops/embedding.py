"""Sinusoidal timestep embedding, as diffusers' ``get_timestep_embedding``, and
the table lookup of token / position embeddings."""

from __future__ import annotations

import math

import numpy as np

from refsd.ops._core import op, param, store
from refsd.ops.transcendental import perturb


@op
def timestep_embedding(t: np.ndarray, *, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> np.ndarray:
    """``freq_i = exp(-ln(max_period) * i / (dim/2 - shift))``, ``i < dim/2``;
    ``emb = [sin(s t freq), cos(s t freq)]`` (swapped with ``flip_sin_to_cos``),
    zero-padded to odd ``dim``. float32 math like diffusers; the output is
    rounded in fp16 modes. ``t`` has shape (N,)."""
    t = np.asarray(t, dtype=np.float32).reshape(-1)
    if dim < 1:
        raise ValueError(f"timestep_embedding dim must be >= 1, got {dim}")
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    freqs = perturb(np.exp(exponent / np.float32(half - downscale_freq_shift)))
    args = np.float32(scale) * (t[:, None] * freqs[None, :])
    emb = np.concatenate([perturb(np.sin(args)), perturb(np.cos(args))], axis=-1)
    if flip_sin_to_cos:
        emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return store(emb)


@op
def embedding(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Table lookup, as ``torch.nn.functional.embedding``: ``y[..., :] = table[ids[...], :]``
    for integer ``ids`` of any shape and ``table`` of shape (num_embeddings, dim).

    Exact (a gather): in fp16-storage modes the table is an fp16 weight
    (losses reported as ``constant`` events), so the output is too."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"embedding expects integer ids, got dtype {ids.dtype}")
    table = param(table, "table")
    if table.ndim != 2:
        raise ValueError(f"embedding expects a table of shape (num_embeddings, dim), got {table.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise ValueError(f"embedding: ids must lie in [0, {table.shape[0]}), got range [{ids.min()}, {ids.max()}]")
    return store(np.take(table, ids, axis=0))
