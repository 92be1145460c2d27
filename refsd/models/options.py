"""How a model runs, fixed at construction (``ModelOptions``), and the
vocabulary of weights as deployed (``WEIGHT_STORAGE``, ``INT8_KERNELS``,
``Int8Weight``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from refsd.models.rewrites import Rewrites
from refsd.numerics import Precision, RunSettings
from refsd.trace import MODELS

WEIGHT_STORAGE = ("fp32", "fp16", "bf16", "int8")
INT8_KERNELS = ("dequantize", "hybrid")
# The TFLite converter leaves weights of fewer elements float (its dynamic-range quantizer's
# minimum; measured on the tiny exports: 1024-element weights int8, an 864-element conv float).
INT8_MIN_ELEMENTS = 1024


class Int8Weight(NamedTuple):
    """One int8 weight as deployed, in refsd's layout (Linear (out, in), Conv2d
    HWIO, Embedding (num, dim)): ``q`` int8 and ``scale`` float32, per output
    channel (out,), per tensor (1,), or for a conv the converter received split
    over input channels (``serial_conv``) one row per part, (parts, out): each
    part was quantized on its own. ``asymmetric``: the hybrid
    FULLY_CONNECTED's ``asymmetric_quantize_inputs`` option. ``fold``: the
    module path (relative to the root model) of a LayerNorm whose affine the
    converter folded into this weight (``q * scale ~ W * gamma``), whose output
    is then the normalized input alone; ``bias`` is then the folded bias
    (``b + W @ beta``) as the .tflite stores it."""

    q: np.ndarray
    scale: np.ndarray
    asymmetric: bool = True
    fold: str | None = None
    bias: np.ndarray | None = None


@dataclass(frozen=True)
class ModelOptions:
    """How a model runs, fixed at construction: op namespace, rewrites,
    its run settings (``settings``: precision mode, transcendental ulps,
    either-rounding, weight jitter; ``refsd.numerics.RunSettings``, under which
    the model runs its entry points), the GELU approximation of its GELU / GEGLU layers
    (``"none"`` = erf, as diffusers and transformers compute it), and
    ``weights_f16``: in fp16-storage modes, keep the (fp16-rounded) weights as
    float16 arrays, widened to float32 at each use: half the weight memory
    (the low-memory pipeline), same results, ~2 ns per weight per use.

    Weights as deployed, independent of the precision mode:

    * ``weights="fp32"``: as loaded (in fp16-storage modes rounded to fp16 once,
      as the device stores every tensor).
    * ``"fp16"`` / ``"bf16"``: every parameter (conv and linear weights, biases,
      norm weights, embedding tables) rounded once at load, to nearest even,
      also in precision f32. That is the set the TFLite converter stores as
      float16 with ``refsd export --weights fp16`` (every float constant of the
      tiny exports is FLOAT16 + DEQUANTIZE); bf16 rounds the same set.
    * ``"int8"``: what ``Optimize.DEFAULT`` stores: Linear and Conv2d weights
      of at least ``INT8_MIN_ELEMENTS`` elements symmetric per output channel
      (``ops.quantize_int8``, bit for bit the converter's values), and the
      token embedding table (a GATHER of runtime ids) per tensor; biases, norm
      weights and smaller weights stay float. ``int8_values``: {component
      (``text_encoder`` / ``unet`` / ``vae``): {checkpoint key: ``Int8Weight``
      or ``(q, scale)``}} read from the deployed .tflite
      (``refsd.export.tflite_weights.read_int8_weights``) replaces refsd's own
      quantization: then exactly the weights listed are int8, and LayerNorm
      affines the converter folded into a weight are folded here too.
      ``int8_kernels``: ``"dequantize"`` (weights dequantized at use, as GPU
      delegates do: ``ops.dequantize_int8``) or ``"hybrid"`` (LiteRT CPU's
      hybrid kernels, which also quantize activations: ``ops.hybrid``). The
      ``int8_weights`` rewrite is ``weights="int8", int8_kernels="dequantize"``.

    ``settings.weight_jitter`` (a validator calibration variant, fp16 / bf16 weights):
    each weight is rounded from its value moved by a pseudo-random +-1 unit
    roundoff, so about half land on the other neighbour. A converter stores
    folded constants (``fp16(W * gamma)`` of a LayerNorm folded into the next
    layer, scalar products) where refsd rounds each tensor alone: a correct
    deployment's fp16 weights may each be the other neighbour (measured: the
    tiny text encoder's fp16 export is 1.1e-3 from refsd's per-tensor rounding).
    """

    ops: Any = None
    rewrites: Rewrites = dataclasses.field(default_factory=Rewrites)
    settings: RunSettings = dataclasses.field(default_factory=RunSettings)
    gelu_approximate: str = "none"
    weights_f16: bool = False
    weights: str = "fp32"
    int8_kernels: str = "dequantize"
    int8_values: Mapping[str, Mapping[str, Any]] | None = dataclasses.field(default=None, compare=False)

    @property
    def precision(self) -> Precision:
        return self.settings.precision

    @property
    def weight_jitter(self) -> bool:
        return self.settings.weight_jitter

    @classmethod
    def make(cls, *, ops=None, rewrites="none", precision="f32", gelu_approximate: str = "none",
             weights_f16: bool = False, weights: str = "fp32", int8_kernels: str = "dequantize",
             int8_values: Mapping | None = None, weight_jitter: bool = False, settings: RunSettings | None = None,
             **rewrite_params) -> "ModelOptions":
        """``settings`` (a ``RunSettings``), or its ``precision`` (a mode or a
        ``Precision``) and ``weight_jitter`` alone."""
        if ops is None:
            import refsd.ops as ops  # noqa: PLC0415 (the default namespace)
        if settings is None:
            settings = RunSettings(precision if isinstance(precision, Precision) else Precision(precision),
                                   weight_jitter=weight_jitter)
        elif precision != "f32" or weight_jitter:
            raise ValueError("give precision and weight_jitter in settings or as arguments, not both")
        if settings.recorder is not None:
            raise ValueError("a model's settings record nothing: record a run with refsd.context.recording")
        p, weight_jitter = settings.precision, settings.weight_jitter
        if gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got {gelu_approximate!r}")
        if weights_f16 and not p.storage16:
            raise ValueError(f"weights_f16 needs an fp16-storage precision mode (f32_f16 or f16), not {p.mode}")
        if weights not in WEIGHT_STORAGE:
            raise ValueError(f"unknown weights {weights!r}: expected one of {', '.join(WEIGHT_STORAGE)}")
        if int8_kernels not in INT8_KERNELS:
            raise ValueError(f"unknown int8_kernels {int8_kernels!r}: expected one of {', '.join(INT8_KERNELS)}")
        rw = Rewrites.parse(rewrites, **rewrite_params)
        if "int8_weights" in rw:
            if weights not in ("fp32", "int8"):
                raise ValueError(f"rewrite int8_weights stores weights as int8; it contradicts weights={weights!r}")
            weights = "int8"
        if int8_values is not None:
            if weights != "int8":
                raise ValueError(f"int8_values given with weights={weights!r}: they need weights='int8'")
            bad = sorted(set(int8_values) - set(MODELS))
            if bad:
                raise ValueError(f"int8_values: unknown component {bad[0]!r} (expected {', '.join(MODELS)})")
        if weight_jitter and weights not in ("fp16", "bf16"):
            raise ValueError(f"weight_jitter moves fp16 / bf16 weights; weights={weights!r} has none")
        return cls(ops, rw, settings, gelu_approximate, weights_f16, weights, int8_kernels, int8_values)
