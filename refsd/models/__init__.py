"""The Stable Diffusion models in NumPy, NHWC, attribute trees == checkpoint keys.

``ClipTextModel`` (text_encoder), ``UNet2DConditionModel`` (unet),
``AutoencoderKL`` (vae), each built from its ``config.json`` dataclass with
``ModelOptions`` (op namespace, rewrites, precision mode) and loaded with
``refsd.weights``::

    from refsd import weights
    unet = weights.load_unet("sd/unet", precision="f16", rewrites="paper")
    eps = unet(latents_nhwc, 981, text_hidden)

The model as deployed: ``weights="fp16"|"bf16"|"int8"``, ``int8_kernels="hybrid"``
(LiteRT CPU) and ``int8_values`` read from the .tflite
(``refsd.export.tflite_weights.read_int8_weights``); pruning as the rewrite ``prune=0.25``.
"""

from refsd.models.clip_text import ClipTextConfig, ClipTextModel
from refsd.models.loading import WeightsError
from refsd.models.module import Module, RootModel
from refsd.models.options import Int8Weight, ModelOptions
from refsd.models.prune import prune
from refsd.models.rewrites import EQUIVALENCE, NAMES, PRESETS, Rewrites
from refsd.models.unet import UNet2DConditionModel, UNetConfig
from refsd.models.vae import AutoencoderKL, VaeConfig

__all__ = [
    "EQUIVALENCE", "NAMES", "PRESETS", "AutoencoderKL", "ClipTextConfig", "ClipTextModel", "Int8Weight", "ModelOptions",
    "Module",
    "Rewrites", "RootModel", "UNet2DConditionModel", "UNetConfig", "VaeConfig", "WeightsError", "prune",
]
