"""The trace contract: the names, shapes and batch order of the tensors a
pipeline run produces, shared by the reference pipeline, the exporter, the
capture writers and the validator (one definition, so a name cannot drift).

Boundary tensors, all NHWC float32::

    inputs/token_ids                  (2, 77) integer, rows [uncond, cond] = [negative_prompt, prompt]
    text_encoder/hidden_states        (2, 77, D), [uncond, cond]
    scheduler/timesteps               (steps,) integer, as the scheduler ran them
    scheduler/latents_init            (1, h, w, C), already times init_noise_sigma
    unet/step_{i}/noise_pred          (2, h, w, C'), the UNet's raw output [uncond, cond]
    scheduler/step_{i}/latents        (1, h, w, C), latents after step i (guidance + scheduler step)
    vae/image                         (1, H, W, 3), the decoder's raw output (about [-1, 1])

Intermediates: ``{stage}/step_{i}/{module path}`` inside the denoising loop,
``{stage}/{module path}`` outside it (``unet/step_3/unet.mid_block.attentions.0``);
a module called twice at one place gets ``#1``, ``#2`` suffixes.

Stages a deployment declares (where and in what precision each ran):
``text_encoder``, ``unet``, ``vae``, and ``guidance_scheduler`` (classifier-free
guidance and the scheduler step, usually on the host CPU).
"""

from __future__ import annotations

import re

TOKENS = 77  # CLIP's context length: prompts are padded / truncated to it
CFG_ORDER = ("uncond", "cond")  # batch order of the text encoder and UNet: [negative_prompt, prompt]
MODELS = ("text_encoder", "unet", "vae")
STAGES = (*MODELS, "guidance_scheduler")

TOKEN_IDS = "inputs/token_ids"
HIDDEN_STATES = "text_encoder/hidden_states"
TIMESTEPS = "scheduler/timesteps"
LATENTS_INIT = "scheduler/latents_init"
IMAGE = "vae/image"
_LEAVES = ("token_ids", "hidden_states", "timesteps", "latents_init", "noise_pred", "latents", "image")
_NAME = re.compile(r"^(?P<stage>[a-z_]+)/(?:step_(?P<step>\d+)/)?(?P<rest>[^/]+)$")


def noise_pred(i: int) -> str:
    return f"unet/step_{i}/noise_pred"


def latents(i: int) -> str:
    return f"scheduler/step_{i}/latents"


def step_names(steps: int) -> list[str]:
    """The per-step boundary tensors in execution order."""
    return [n for i in range(steps) for n in (noise_pred(i), latents(i))]


def boundary_names(steps: int) -> list[str]:
    """Every float boundary tensor a run of ``steps`` steps produces, in execution order."""
    return [HIDDEN_STATES, LATENTS_INIT, *step_names(steps), IMAGE]


def intermediate_name(stage: str, step: int | None, path: str) -> str:
    return f"{stage}/step_{step}/{path}" if step is not None else f"{stage}/{path}"


def parse_name(name: str) -> tuple[str, int | None, str | None]:
    """``unet/step_3/unet.mid_block`` -> ("unet", 3, "unet.mid_block");
    boundary tensors have no module path (``unet/step_3/noise_pred`` -> ("unet", 3, None)).
    Raises ValueError for a name of neither form."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a trace name ({{stage}}/[step_{{i}}/]{{leaf or module path}})")
    step = m["step"]
    rest = m["rest"]
    return m["stage"], None if step is None else int(step), None if rest in _LEAVES else rest


_MODULE_PATH = re.compile(r"^[A-Za-z0-9_.]+(?:#\d+)?$")


def parse_intermediate(name: str) -> tuple[str, int | None, str] | None:
    """(stage, step, module path) of an intermediate's name; None for a name
    that is not one: a boundary tensor's, a stage that records no modules
    (the scheduler), a malformed module path, or not a trace name at all."""
    try:
        stage, step, path = parse_name(name)
    except ValueError:
        return None
    if stage not in MODELS or path is None or not _MODULE_PATH.match(path):
        return None
    return stage, step, path


def leaf(name: str) -> str:
    """The last part of a name: a boundary tensor's kind (``noise_pred``) or a module path."""
    return name.rsplit("/", 1)[-1]


def is_boundary(name: str) -> bool:
    try:
        return parse_name(name)[2] is None
    except ValueError:
        return False


def stage_position(stage: str, step: int | None) -> tuple[int, int]:
    """Where a stage's work at ``step`` comes in a run, as a sortable pair:
    the inputs, the text encoder, each denoising step (the UNet, guidance and
    the scheduler of step i share (2, i)), the decoder. A denoising stage
    without a step counts as its first step."""
    if stage == "inputs":
        return (0, 0)
    if stage == "text_encoder":
        return (1, 0)
    if stage == "vae":
        return (3, 0)
    return (2, step if step is not None else 0)


def position(name: str) -> tuple[int, int]:
    """:func:`stage_position` of a tensor (the scheduler's latents_init and timesteps are inputs)."""
    stage, step, _ = parse_name(name)
    if name in (LATENTS_INIT, TIMESTEPS):
        return (0, 0)
    return stage_position(stage, step)


def execution_order(tensor_names) -> list[str]:
    """``tensor_names`` sorted as a run produces them: the text encoder's
    intermediates, then its hidden states; per step, the UNet's intermediates,
    its noise prediction, the new latents; the decoder's intermediates, then
    the image. The sort is stable: intermediates of one module call keep the
    order they were given in (a recording's order)."""
    def key(name: str) -> tuple:
        stage, _, path = parse_name(name)
        where = position(name)
        if where == (0, 0):
            return (0, 0, 0)
        return (*where, 0 if path else (2 if stage == "scheduler" else 1))

    return sorted(tensor_names, key=key)
