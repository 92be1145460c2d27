"""Sinusoidal timestep embedding, as diffusers' ``get_timestep_embedding``, and
the table lookup of token / position embeddings."""

from __future__ import annotations

import math

import numpy as np

from refsd.monitor import active_monitor
from refsd.numerics import current_precision
from refsd.ops._core import const, load, op, param, store, stored
from refsd.ops.transcendental import perturb


# fp16 spacing of a sin/cos argument above which the monitor reports a
# ``precision`` event: half that spacing is the argument's storage error and,
# as |d sin/dx| <= 1, the output's: 2**-7 = 16 fp16 ulps of a value near 1.
# The spacing exceeds it from |arg| = 32 on (2**-5 there; t * freq of SD's
# highest frequency, 1, at t >= 32); at t ~ 751 it is 0.5, up to 0.25 off.
ARG_SPACING_LIMIT = 2.0**-6


@op
def timestep_embedding(t: np.ndarray, *, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> np.ndarray:
    """``freq_i = exp(-ln(max_period) * i / (dim/2 - shift))``, ``i < dim/2``;
    ``emb = [sin(s t freq), cos(s t freq)]`` (swapped with ``flip_sin_to_cos``),
    zero-padded to odd ``dim``. ``t`` has shape (N,).

    Generic modes: float32 math like diffusers, the output rounded in fp16
    modes. Under a device model, the exported graph's tensors: the frequency
    table is an fp16 constant, ``t * freq`` (and ``* s`` when ``s != 1``) a
    stored fp16 tensor, then sin/cos rounded (measured bit-identical on LiteRT's
    GPU; time_proj up to 33% off for t from 1 to 999). In fp16-storage modes the monitor
    reports a ``precision`` event where the arguments' fp16 spacing exceeds
    ``ARG_SPACING_LIMIT``, since every fp16 deployment of the graph stores them."""
    if dim < 1:
        raise ValueError(f"timestep_embedding dim must be >= 1, got {dim}")
    p = current_precision()
    t = (load(t) if p.device else np.asarray(t, dtype=np.float32)).reshape(-1)
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    freqs = perturb(np.exp(exponent / np.float32(half - downscale_freq_shift)))
    if p.device:
        args = stored(t[:, None] * const(freqs, "freqs")[None, :], "args")
        if scale != 1.0:
            args = stored(args * const(scale, "scale"), "scaled_args")
    else:
        args = np.float32(scale) * (t[:, None] * freqs[None, :])
    if p.storage16:
        _report_arg_spacing(args)
    emb = np.concatenate([perturb(np.sin(args)), perturb(np.cos(args))], axis=-1)
    if flip_sin_to_cos:
        emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return store(emb)


def _report_arg_spacing(args: np.ndarray) -> None:
    mon = active_monitor()
    if mon is None or not args.size:
        return
    a = np.abs(args[np.isfinite(args)])
    # fp16 spacing at |x| in [2^e, 2^(e+1)) is 2^(e-10): it exceeds the limit from twice limit * 2^10 on.
    big = a >= np.float32(ARG_SPACING_LIMIT * 2**11)
    if big.any():
        top = float(a.max())
        spacing = 2.0 ** (math.floor(math.log2(top)) - 10)
        mon.event("precision", "timestep_embedding", "args", int(big.sum()),
                  f"sin/cos arguments stored as fp16: spacing {spacing:g} at |t*freq| = {top:g} "
                  f"(output error up to {spacing / 2:g}; limit {ARG_SPACING_LIMIT:g})", False)


def _checked(ids, table, name: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{name} expects integer ids, got dtype {ids.dtype}")
    table = param(table, "table")
    if table.ndim != 2:
        raise ValueError(f"{name} expects a table of shape (num_embeddings, dim), got {table.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise ValueError(f"{name}: ids must lie in [0, {table.shape[0]}), got range [{ids.min()}, {ids.max()}]")
    return ids, table


@op
def embedding(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Table lookup, as ``torch.nn.functional.embedding``: ``y[..., :] = table[ids[...], :]``
    for integer ``ids`` of any shape and ``table`` of shape (num_embeddings, dim).

    Exact (a gather): in fp16-storage modes the table is an fp16 weight
    (losses reported as ``constant`` events), so the output is too."""
    ids, table = _checked(ids, table, "embedding")
    return store(np.take(table, ids, axis=0))


@op
def embedding_1d(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``embedding`` as one lookup by a 1-D index vector: ``ids`` flattened,
    gathered, the rows reshaped back to ``ids.shape + (dim,)``. The rewrite
    ``embedding_1d``: TFLite's GPU delegate gathers only with 1-D indices
    (``GATHER: Only support 1D indices`` for the text encoder's (2, 77) ids).
    Exact like ``embedding``: the same rows in the same order."""
    ids, table = _checked(ids, table, "embedding_1d")
    rows = np.take(table, ids.reshape(-1), axis=0)
    return store(rows.reshape(ids.shape + (table.shape[1],)))
