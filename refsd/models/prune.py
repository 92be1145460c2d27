"""Structured L1-norm channel pruning of large convolutions (Choi et al. 2023,
Sec. 3.4: "structured pruning on huge convolution layers").

This changes the model, so it is measured, never asserted equal: run the
model before and after and compare (tests/test_models_rewrites.py reports the
error). A deployment declares it as the rewrite ``prune=AMOUNT[:MIN_WEIGHTS]``
(``refsd.models.rewrites``): ``RootModel.deploy`` then prunes after loading,
and ``refsd export --rewrites ...,prune=...`` exports the pruned model.

For each Conv2d with at least ``min_weights`` weights, the input channels
whose weight slices ``w[:, :, c, :]`` have the smallest L1 norms are removed:
the conv keeps ``in_keep`` (a gather of its input) and a weight with fewer
input channels, so its reduction is shorter and its weight smaller, while its
output and every other layer are unchanged. (Removing *output* filters instead
would also change the GroupNorm statistics downstream; input pruning keeps the
change local to the pruned convolution.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refsd.models.rewrites import DEFAULT_PRUNE_AMOUNT
from refsd.models.rewrites import DEFAULT_PRUNE_MIN_WEIGHTS as DEFAULT_MIN_WEIGHTS


@dataclass(frozen=True)
class PrunedConv:
    path: str
    kept: int
    total: int
    weights_before: int
    weights_after: int


def prune(model, *, amount: float = DEFAULT_PRUNE_AMOUNT,
          min_weights: int = DEFAULT_MIN_WEIGHTS) -> list[PrunedConv]:
    """Prune ``amount`` (0 <= amount < 1) of the input channels of every conv
    with at least ``min_weights`` weights, in place, by smallest L1 norm.
    Returns what was pruned. Re-quantizes under ``weights="int8"`` (refsd's own
    quantization: int8 values read from a .tflite describe the weights they
    were read for). The loaders apply it after loading when the rewrite
    ``prune`` is declared (``Rewrites.parse("prune=0.25:4000000")``)."""
    if not 0 <= amount < 1:
        raise ValueError(f"prune amount must lie in [0, 1), got {amount!r}")
    done = []
    for path, mod in model.named_modules():
        if not callable(getattr(mod, "prune_inputs", None)) or mod.weight is None or mod.weight.size < min_weights:
            continue
        w = np.asarray(mod.weight)
        cin = w.shape[2]
        drop = min(int(amount * cin), cin - 1)
        if drop == 0:
            continue
        norms = np.abs(w).sum(axis=(0, 1, 3), dtype=np.float64)
        keep = np.sort(np.argsort(norms, kind="stable")[drop:])
        mod.prune_inputs(keep)  # stored as the loader stores weights, re-quantized under weights="int8"
        root = getattr(model, "_name", "")
        done.append(PrunedConv(f"{root}.{path}" if root else path, int(keep.size), int(cin), w.size, mod.weight.size))
    return done
