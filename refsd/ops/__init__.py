"""The ops: pure functions on NumPy arrays, NHWC, each honouring the run's
settings (``refsd.numerics.current_settings``: the precision mode, perturbed
transcendentals, either-rounding) and reporting to the active exception
monitor (``refsd.monitor.monitoring``).

Arrays are positional, attributes keyword-only. Every rewrite sits beside the
op it replaces; ``REWRITES`` maps each to its original (the rewrite names a
model declares, and the ops each runs: ``refsd.models.rewrites.OPS``).
"""

from refsd.ops._core import mark_stored
from refsd.ops.activations import erf, geglu, geglu_clip, geglu_fused, gelu, gelu_clip, gelu_fused, quick_gelu, silu
from refsd.ops.attention import attention, flash_attention, softmax, softmax_partial_fused
from refsd.ops.conv import conv2d, conv_output_hw, serial_conv, serial_conv_factor
from refsd.ops.elementwise import add, concat, exp, mul, scale
from refsd.ops.embedding import embedding, embedding_1d, timestep_embedding
from refsd.ops.hybrid import (conv2d_hybrid_int8, fc_as_conv_hybrid_int8, linear_hybrid_int8,
                              quantize_activations, serial_conv_hybrid_int8)
from refsd.ops.linear import fc_as_conv, linear
from refsd.ops.norm import gn4d, group_norm, group_norm_fused, layer_norm
from refsd.ops.quant import dequantize_int8, quantize_int8
from refsd.ops.reduce import reduce_mean, reduce_sum
from refsd.ops.resample import upsample_nearest2x
from refsd.ops.winograd import conv2d_winograd, winograd_error_scale

# rewrite op -> the op it replaces (same positional arrays, same result up to rounding). Keys are op
# names; the model rewrite that runs each (``winograd`` runs ``conv2d_winograd``, ``gelu_clip`` runs
# ``gelu_clip`` and ``geglu_clip``) is ``refsd.models.rewrites.OPS``.
REWRITES = {
    "fc_as_conv": "linear",
    "serial_conv": "conv2d",
    "gn4d": "group_norm",
    "group_norm_fused": "group_norm",
    "gelu_clip": "gelu",
    "gelu_fused": "gelu",
    "geglu_clip": "geglu",
    "geglu_fused": "geglu",
    "softmax_partial_fused": "attention",
    "flash_attention": "attention",
    "conv2d_winograd": "conv2d",
    "embedding_1d": "embedding",
}
# Kernels for int8 weights (``ModelOptions(weights="int8", int8_kernels="hybrid")``): not rewrites
# (they compute a different function, LiteRT CPU's), but they replace these ops.
HYBRID_KERNELS = {"linear_hybrid_int8": "linear", "conv2d_hybrid_int8": "conv2d",
                  "fc_as_conv_hybrid_int8": "fc_as_conv", "serial_conv_hybrid_int8": "serial_conv"}

__all__ = [
    "HYBRID_KERNELS", "REWRITES", "add", "attention", "concat", "conv2d", "conv2d_hybrid_int8", "conv2d_winograd",
    "conv_output_hw", "dequantize_int8", "embedding", "embedding_1d", "erf", "exp", "fc_as_conv",
    "fc_as_conv_hybrid_int8", "flash_attention", "geglu", "geglu_clip", "geglu_fused", "gelu", "gelu_clip",
    "gelu_fused", "gn4d", "group_norm", "group_norm_fused", "layer_norm", "linear", "linear_hybrid_int8",
    "mark_stored", "mul",
    "quantize_activations", "quantize_int8", "quick_gelu", "reduce_mean", "reduce_sum", "scale", "serial_conv",
    "serial_conv_factor", "serial_conv_hybrid_int8", "silu", "softmax", "softmax_partial_fused", "timestep_embedding",
    "upsample_nearest2x", "winograd_error_scale",
]
