"""Which tensors the reference records for a model folder: every boundary
tensor and every module output, with shape, layout and what it means. What a
capture from any runtime names its tensors by (``refsd-validate names``).

Module outputs are named ``{stage}/step_{i}/{module path}`` in the denoising
loop and ``{stage}/{module path}`` outside it (``refsd.trace``). The module
path is the checkpoint key prefix with the model's name in front
(``unet.down_blocks.0.attentions.0`` holds the output of diffusers'
``unet.down_blocks[0].attentions[0]``); :func:`module_paths` lists them from
the configs alone, without weights or a run. Shapes need a run:
:func:`recorded_names` runs one denoising step at the requested size and
repeats the UNet's names for every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refsd import trace

BOUNDARY_MEANING = {
    trace.TOKEN_IDS: "token ids, rows [negative_prompt, prompt] (CFG order [uncond, cond]), padded to 77",
    trace.HIDDEN_STATES: "text encoder output (last hidden state after the final LayerNorm), batch [uncond, cond]",
    trace.TIMESTEPS: "the timesteps the scheduler ran, in order (integers)",
    trace.LATENTS_INIT: "initial noise, already times the scheduler's init_noise_sigma",
    "noise_pred": "the UNet's raw output at this step, batch [uncond, cond], before guidance",
    "latents": "latents after classifier-free guidance and the scheduler step",
    trace.IMAGE: "the VAE decoder's raw output (about [-1, 1]), before clipping to an image",
}
TEXT_ENCODER_NOTE = ("batch [uncond, cond]: refsd encodes both prompts as one batch of 2; a runtime that encodes "
                     "them separately (diffusers) concatenates its two batch-1 outputs, uncond first")


@dataclass(frozen=True)
class NameInfo:
    name: str
    shape: tuple[int, ...]
    layout: str
    meaning: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "layout": self.layout, "meaning": self.meaning}


def module_paths(model_dir: str | Path) -> dict[str, set[str]]:
    """Per model, the module paths whose outputs the reference can record,
    from the folder's configs (the module tree is built without weights)."""
    from refsd.models.clip_text import ClipTextConfig, ClipTextModel  # noqa: PLC0415
    from refsd.models.unet import UNet2DConditionModel, UNetConfig  # noqa: PLC0415
    from refsd.models.vae import AutoencoderKL, VaeConfig  # noqa: PLC0415
    from refsd.weights import read_config  # noqa: PLC0415

    root = Path(model_dir)
    kinds = {"text_encoder": (ClipTextModel, ClipTextConfig), "unet": (UNet2DConditionModel, UNetConfig),
             "vae": (AutoencoderKL, VaeConfig)}
    out = {}
    for stage, (model_cls, config_cls) in kinds.items():
        path = root / stage / "config.json"
        model = model_cls(config_cls.from_dict(read_config(path), source=str(path)))
        out[stage] = {f"{stage}.{p}" if p else stage for p, _ in model.named_modules()}
    return out


def is_recorded(name: str, paths: dict[str, set[str]]) -> bool:
    """Whether ``name`` is a boundary tensor or a module output the reference records."""
    try:
        stage, step, path = trace.parse_name(name)
    except ValueError:
        return False
    if path is None:
        return True
    return path.split("#", 1)[0] in paths.get(stage, ())


def layout(shape: tuple[int, ...]) -> str:
    return {4: "NHWC", 3: "N,L,C (tokens or pixels, channels)", 2: "N,C", 1: "vector"}.get(len(shape), f"rank {len(shape)}")


@dataclass(frozen=True)
class RecordedShape:
    shape: tuple[int, ...]
    # identical for both CFG rows (the time embedding of one timestep): a device that computes it once may
    # hold it with batch 1
    batch_invariant: bool


def recorded_shapes(model_dir: str | Path, *, height: int, width: int,
                    progress: bool = False) -> dict[str, RecordedShape]:
    """Every tensor one denoising step at ``height`` x ``width`` records (the
    loop's names at step 0), with its shape: one f32 run of the pipeline."""
    from refsd.context import recording  # noqa: PLC0415
    from refsd.pipeline import Pipeline, Request  # noqa: PLC0415

    pipe = Pipeline(model_dir, low_memory=True)
    with recording() as rec:
        result = pipe(Request("", steps=1, scheduler="ddim", height=height, width=width), progress=progress)
    out = {}
    for n, v in {**result.trace, **rec}.items():
        v = np.asarray(v)
        out[n] = RecordedShape(tuple(v.shape), v.ndim >= 1 and v.shape[0] == 2 and np.array_equal(v[0], v[1]))
    return out


def recorded_shape(name: str, shapes: dict[str, RecordedShape]) -> RecordedShape | None:
    """The shape a name at any step has (``recorded_shapes`` holds step 0's); None if not recorded."""
    try:
        stage, step, path = trace.parse_name(name)
    except ValueError:
        return None
    return shapes.get(name if step is None else name.replace(f"/step_{step}/", "/step_0/", 1))


def recorded_names(model_dir: str | Path, *, steps: int = 1, height: int = 512, width: int = 512,
                   progress: bool = False) -> list[NameInfo]:
    """Every tensor a run of ``steps`` steps at ``height`` x ``width`` records,
    in execution order, with shape and meaning (one step is run for shapes)."""
    shapes = {n: r.shape for n, r in recorded_shapes(model_dir, height=height, width=width, progress=progress).items()}
    shapes[trace.TOKEN_IDS] = (2, trace.TOKENS)
    shapes[trace.TIMESTEPS] = (steps,)
    infos = []
    for name, shape in shapes.items():
        stage, step, path = trace.parse_name(name)
        for i in range(steps) if step is not None else (None,):
            full = name.replace("step_0/", f"step_{i}/", 1) if i is not None else name
            infos.append(NameInfo(full, shape, layout(shape) if name != trace.TOKEN_IDS else "N,tokens",
                                  _meaning(name, stage, path, shape)))
    order = trace.execution_order([i.name for i in infos])
    by_name = {i.name: i for i in infos}
    return [by_name[n] for n in order]


def _meaning(name: str, stage: str, path: str | None, shape: tuple) -> str:
    if path is None:
        return BOUNDARY_MEANING.get(name, BOUNDARY_MEANING.get(name.rsplit("/", 1)[-1], ""))
    what = f"output of module {path}"
    if not shape or shape[0] != 2:  # batch-invariant (position embeddings, the time embedding of one step)
        return what
    if stage == "text_encoder":
        return f"{what}; {TEXT_ENCODER_NOTE}"
    if stage == "unet":
        return f"{what}; batch [uncond, cond]"
    return what
