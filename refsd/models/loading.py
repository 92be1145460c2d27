"""Loading a checkpoint into a model: the strict key / shape check, the one
conversion of each tensor (fp16 / bf16 -> float32, conv OIHW -> HWIO) and the
float storage of a weight as deployed (fp16 / bf16 rounding, fp16 storage
registered with ``ops.mark_stored``, read-only).

``Module.load_state_dict`` drives it; this module knows tensors and
``ParamSpec`` declarations, not the module tree.
"""

from __future__ import annotations

import mmap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from refsd.numerics import U_F16, round_f16
from refsd.ops import mark_stored


class WeightsError(ValueError):
    """A checkpoint that does not match the model (keys, shapes, format)."""


@dataclass(frozen=True)
class ParamSpec:
    """A declared tensor: its shape *in the checkpoint* and how it is stored.

    ``layout``: ``linear`` (out, in), kept; ``conv`` (O, I, KH, KW), stored HWIO;
    ``vector`` / ``embedding``, kept; ``buffer``: accepted, shape-checked and
    ignored (``position_ids``). ``optional`` tensors may be absent.
    ``alt_shapes``: other accepted checkpoint shapes (legacy layouts)."""

    shape: tuple
    layout: str
    optional: bool = False
    alt_shapes: tuple = ()


def _jitter(arr: np.ndarray, u: float) -> np.ndarray:
    """``arr * (1 + s u)`` with a fixed pseudo-random sign ``s`` per element (see ``weight_jitter``)."""
    signs = np.random.default_rng(arr.size).integers(0, 2, arr.size, dtype=np.int8).reshape(arr.shape)
    return (arr * np.where(signs == 1, np.float32(1 + u), np.float32(1 - u))).astype(np.float32)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    u = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    return u.view(np.float32)


def drop_mapped_pages(src: np.ndarray) -> None:
    """Once a model holds its own converted copy of a memory-mapped checkpoint
    tensor, drop the tensor's mapped pages: pages a process has read count in
    its RSS while mapped, so a converting load (conv transposes, fp16
    rounding) would otherwise peak at checkpoint size + model size. The page
    cache keeps them; a later read of a neighbouring tensor just faults again."""
    base = src
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, mmap.mmap) or not src.flags.c_contiguous or src.nbytes == 0:
        return
    page = mmap.PAGESIZE
    origin = np.frombuffer(base, np.uint8, count=1).ctypes.data
    lo = (src.ctypes.data - origin) // page * page
    hi = min(len(base), -(-(src.ctypes.data - origin + src.nbytes) // page) * page)
    base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _as_float32(value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == np.float32:
        return arr
    if arr.dtype.kind != "f":
        raise WeightsError(f"expected a floating-point tensor, got dtype {arr.dtype}")
    return arr.astype(np.float32)


def _mismatch_message(model: str, source, missing, unexpected, mismatched, limit: int = 25) -> str:
    def listing(items):
        items = list(items)
        shown = items[:limit]
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return "".join(f"\n    {s}" for s in shown) + more

    lines = [f"{source or 'checkpoint'} does not match {model}:"]
    if missing:
        lines.append(f"  {len(missing)} missing key{'s' * (len(missing) != 1)}:{listing(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key{'s' * (len(unexpected) != 1)}:{listing(unexpected)}")
    if mismatched:
        rows = [f"{k}: checkpoint {tuple(a)}, model expects {tuple(b)}" for k, a, b in mismatched]
        lines.append(f"  {len(mismatched)} shape mismatch{'es' * (len(mismatched) != 1)}:{listing(rows)}")
    if missing and unexpected:
        lines.append("  (missing and unexpected keys together usually mean a config.json that does not "
                     "belong to these weights, or a different checkpoint dialect)")
    return "\n".join(lines)



def check_state(model: str, specs: Mapping[str, ParamSpec], state: Mapping[str, Any], source: str | None) -> None:
    """Every declared tensor present (unless optional), none unexpected, each of
    its declared (or an alternative) shape; else one ``WeightsError`` listing
    every missing key, unexpected key and shape mismatch (``source`` names the
    checkpoint, ``model`` the model class)."""
    missing = [k for k, spec in specs.items() if k not in state and not spec.optional]
    unexpected = sorted(k for k in state if k not in specs)
    mismatched = []
    for k, spec in specs.items():
        if k in state:
            shape = tuple(np.shape(state[k]))
            if shape != spec.shape and shape not in spec.alt_shapes:
                mismatched.append((k, shape, spec.shape))
    if missing or unexpected or mismatched:
        raise WeightsError(_mismatch_message(model, source, missing, unexpected, mismatched))


def checkpoint_array(value, spec: ParamSpec) -> np.ndarray:
    """A checkpoint tensor as float32 in the model's layout: conv OIHW -> HWIO,
    a legacy 1x1-conv-shaped linear weight -> (out, in)."""
    arr = _as_float32(value)
    if spec.layout == "conv":
        arr = np.ascontiguousarray(arr.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    elif spec.layout == "linear" and arr.ndim == 4:
        arr = arr.reshape(arr.shape[:2])  # legacy 1x1-conv-shaped linear
    return arr


def deployed_float(arr: np.ndarray, opts) -> np.ndarray:
    """A float32 parameter as the deployment stores it (``ModelOptions.weights``):
    rounded once to fp16 / bf16 under ``weights="fp16"`` / ``"bf16"`` (nearest
    even, subnormals kept, as the converter rounds; moved first under
    ``settings.weight_jitter``), else as given."""
    stored_as = opts.weights
    if stored_as in ("fp16", "bf16") and opts.settings.weight_jitter:
        arr = _jitter(arr, U_F16 if stored_as == "fp16" else 2.0**-8)
    if stored_as == "fp16":
        arr = round_f16(arr)
    elif stored_as == "bf16":
        arr = round_bf16(arr)
    return arr


def store_float(arr: np.ndarray, opts) -> np.ndarray:
    """A float32 parameter as a model with options ``opts`` (``ModelOptions``)
    holds it: as deployed (``deployed_float``), then rounded to fp16 in
    fp16-storage modes (registered with ``ops.mark_stored``); read-only."""
    arr = deployed_float(arr, opts)
    p = opts.settings.precision
    if p.storage16:
        return mark_stored(arr, ftz=p.ftz, f16=opts.weights_f16)
    return read_only(arr)


def read_only(arr: np.ndarray) -> np.ndarray:
    """``arr``, or a read-only view of it."""
    if arr.flags.writeable:
        arr = arr.view()
        arr.flags.writeable = False
    return arr
