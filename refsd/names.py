"""Which tensors the reference records for a model folder: every boundary
tensor and every module output, with shape, layout and what it means. What a
capture from any runtime names its tensors by (``refsd-validate names``).

Module outputs are named ``{stage}/step_{i}/{module path}`` in the denoising
loop and ``{stage}/{module path}`` outside it (``refsd.trace``). The module
path is the checkpoint key prefix with the model's name in front
(``unet.down_blocks.0.attentions.0`` holds the output of diffusers'
``unet.down_blocks[0].attentions[0]``); :func:`module_paths` lists them from
the configs alone, without weights or a run.

Shapes: :func:`recorded_names` runs one denoising step at the smallest probe
size that tells the UNet's and the VAE decoder's levels apart (latents
``2**K`` square, ``K`` the UNet's downsamples: 8x8 for SD, an 8 ms tiny run)
and scales each spatial axis to the size asked for, as the modules compute
it: a stride-2 downsample gives ``ceil(s / 2)`` (so level ``k`` of the UNet
is ``ceil(s / 2**k)``, its up path matching its skips), a VAE up block
``2 s``; a token axis is the product of its level's height and width.

Not every name can be captured with a forward hook in diffusers or
transformers: some of their modules return a tuple or a ``ModelOutput``
(:data:`HOOK_RESULTS`). Such names are marked; only boundary tensors are
required in a bundle, every intermediate is optional.
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


# What diffusers (0.2x-0.4x) and transformers return from the modules refsd mirrors, where it is not one tensor
# (checked against both in tests/test_names.py): refsd's module class -> what a forward hook receives there.
HOOK_RESULTS = {
    "ClipTextModel": "a ModelOutput (BaseModelOutputWithPooling) in transformers",
    "ClipTextTransformer": "a ModelOutput (BaseModelOutputWithPooling) in transformers, and no module of its own in "
                           "transformers 5",
    "ClipEncoder": "a ModelOutput (BaseModelOutput) in transformers",
    "ClipAttention": "a tuple (output, attention weights) in transformers",
    "UNet2DConditionModel": "a ModelOutput (UNet2DConditionOutput) in diffusers: capture unet/step_i/noise_pred",
    "DownBlock": "a tuple (hidden states, skip connections) in diffusers",
    "Transformer2DModel": "a tuple (return_dict=False) in diffusers' UNet",
}


@dataclass(frozen=True)
class NameInfo:
    name: str
    shape: tuple[int, ...]
    layout: str
    meaning: str
    required: bool = False  # a boundary tensor every bundle holds; intermediates are optional
    hook: str | None = None  # None: a forward hook in diffusers / transformers sees this tensor; else what it sees

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "layout": self.layout, "meaning": self.meaning,
                "required": self.required, "capturable_by_hook": self.hook is None,
                **({"hook_sees": self.hook} if self.hook else {})}


def _models(model_dir: str | Path) -> dict:
    """Per model, its module tree built from the folder's config (no weights)."""
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
        out[stage] = model_cls(config_cls.from_dict(read_config(path), source=str(path)))
    return out


def _path(stage: str, p: str) -> str:
    return f"{stage}.{p}" if p else stage


def module_paths(model_dir: str | Path) -> dict[str, set[str]]:
    """Per model, the module paths whose outputs the reference can record,
    from the folder's configs (the module tree is built without weights)."""
    return {stage: {_path(stage, p) for p, _ in model.named_modules()} for stage, model in _models(model_dir).items()}


def hook_results(model_dir: str | Path) -> dict[str, str]:
    """Module path -> what a forward hook sees there in diffusers / transformers,
    for the modules whose output is not one tensor (:data:`HOOK_RESULTS`)."""
    return _hook_results(_models(model_dir))


def _hook_results(models: dict) -> dict[str, str]:
    return {_path(stage, p): HOOK_RESULTS[type(m).__name__] for stage, model in models.items()
            for p, m in model.named_modules() if type(m).__name__ in HOOK_RESULTS}


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
    loop's names at step 0), with its shape and whether both CFG rows are
    equal: one f32 run of the pipeline at that size (a bundle's check needs
    the values, not only the shapes ``recorded_names`` scales)."""
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


def default_size(model_dir: str | Path) -> tuple[int, int]:
    """The model's own image size: the UNet's ``sample_size`` (latent pixels) times the VAE's factor."""
    return _default_size(_models(model_dir))


def _default_size(models: dict) -> tuple[int, int]:
    unet, vae = models["unet"].config, models["vae"].config
    if unet.sample_size is None:
        return vae.sample_size, vae.sample_size  # diffusers' VAE sample_size is in image pixels
    side = int(unet.sample_size) * vae.downscale
    return side, side


def recorded_names(model_dir: str | Path, *, steps: int = 1, height: int | None = None, width: int | None = None,
                   progress: bool = False) -> list[NameInfo]:
    """Every tensor a run of ``steps`` steps at ``height`` x ``width`` (default
    the model's own size) records, in execution order, with shape, meaning,
    whether it is required and whether a forward hook can capture it. One
    step is run, at the probe size, for the shapes (see the module's doc)."""
    from refsd.context import recording  # noqa: PLC0415
    from refsd.pipeline import Pipeline, Request  # noqa: PLC0415

    models = _models(model_dir)
    unet, vae = models["unet"].config, models["vae"].config
    f = vae.downscale
    if height is None or width is None:
        height, width = _default_size(models)
    if height % f or width % f:
        raise ValueError(f"--height and --width must be multiples of the model's VAE factor {f}, got {height}x{width}")
    levels = _Levels(downs=len(unet.block_out_channels) - 1, ups=len(vae.block_out_channels) - 1)
    pipe = Pipeline(model_dir, low_memory=True)
    probe = levels.probe * f
    with recording() as rec:
        result = pipe(Request("", steps=1, scheduler="ddim", height=probe, width=probe), progress=progress)
    hooks = _hook_results(models)
    required = {trace.TOKEN_IDS, *trace.boundary_names(steps)}
    infos = []
    recorded = {**result.trace, **rec, trace.TOKEN_IDS: np.zeros((2, trace.TOKENS))}  # ids: an input, not traced
    for name, value in recorded.items():
        stage, step, path = trace.parse_name(name)
        shape = tuple(np.shape(value))
        if name == trace.TIMESTEPS:
            shape = (steps,)
        elif stage != "text_encoder":
            shape = levels.scale(name, shape, height // f, width // f)
        for i in range(steps) if step is not None else (None,):
            full = name.replace("step_0/", f"step_{i}/", 1) if i is not None else name
            infos.append(NameInfo(full, shape, layout(shape) if name != trace.TOKEN_IDS else "N,tokens",
                                  _meaning(name, stage, path, shape), required=full in required,
                                  hook=hooks.get((path or "").split("#", 1)[0])))
    order = trace.execution_order([i.name for i in infos])
    by_name = {i.name: i for i in infos}
    return [by_name[n] for n in order]


@dataclass(frozen=True)
class _Levels:
    """The spatial sizes of a UNet with ``downs`` stride-2 downsamples and a VAE
    decoder with ``ups`` 2x upsamples, from latents of side ``probe`` (a power
    of two at least ``2**downs``: every level's side and token count differ)."""

    downs: int
    ups: int

    @property
    def probe(self) -> int:
        return 1 << max(self.downs, 1)

    def _sides(self, s: int) -> dict[str, int]:
        out = {f"down {k}": -(-s // (1 << k)) for k in range(self.downs + 1)}
        out.update({f"up {k}": s << k for k in range(1, self.ups + 1)})
        return out

    def scale(self, name: str, shape: tuple[int, ...], h: int, w: int) -> tuple[int, ...]:
        """``shape`` recorded at the probe size, at latents ``h`` x ``w``: NHWC
        axes 1 and 2 by their level's side, an N,L,C token axis by its level's
        height x width (any other axis, 77 text tokens included, as recorded)."""
        probe, at_h, at_w = self._sides(self.probe), self._sides(h), self._sides(w)
        if len(shape) == 4:
            return (shape[0], at_h[self._level(name, shape[1], probe)], at_w[self._level(name, shape[2], probe)],
                    shape[3])
        if len(shape) == 3:
            tokens = {probe[k] * probe[k]: k for k in probe}
            k = tokens.get(shape[1])
            return shape if k is None else (shape[0], at_h[k] * at_w[k], shape[2])
        return shape

    @staticmethod
    def _level(name: str, side: int, probe: dict[str, int]) -> str:
        found = [k for k, v in probe.items() if v == side]
        if len(found) != 1:  # a module that resizes otherwise than the SD UNet and VAE decoder
            raise ValueError(f"{name}: spatial size {side} at the probe size matches no single UNet or VAE level")
        return found[0]


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
