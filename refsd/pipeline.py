"""Text -> image, with a trace of every boundary tensor.

The loop is diffusers' ``StableDiffusionPipeline``: the prompt and the negative
prompt (empty by default) are tokenized to 77 ids and encoded together; the
UNet runs both halves as one batch of 2 (``[uncond, cond]``); classifier-free
guidance ``eps = uncond + g (cond - uncond)`` and the scheduler step run on the
host in float32 (on a phone they run on the CPU, outside the GPU graph); the
VAE decodes ``latents / scaling_factor``.

Boundary tensors (the names of the capture bundle) and their batch order: ``refsd.trace``.

Initial latents come from ``numpy.random.default_rng(seed).standard_normal(
(1, h, w, 4), dtype=float32)`` (PCG64, NHWC order) times ``init_noise_sigma``, or are supplied, so a
device's own noise can be replayed.

Staged low-memory mode (Choi et al. 2023, Sec. 3.3): the text encoder is
loaded, run and freed before the UNet is loaded; the decoder is loaded after
the UNet is freed; weights are memory-mapped.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from refsd import console
from refsd import trace as trace_names
from refsd.context import location
from refsd.image import to_image
from refsd.limits import check_request
from refsd.models.options import ModelOptions
from refsd.models.vae import VaeConfig
from refsd.monitor import Monitor, Report, monitoring
from refsd.numerics import Precision, round_f16
from refsd.schedulers import DDIMScheduler, make_scheduler
from refsd.trace import MODELS, TOKENS
from refsd.weights import load_model, load_scheduler_config, load_tokenizer, read_config


@dataclass(frozen=True)
class Request:
    """What a user asks for; the same fields a capture bundle records."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    scheduler: str | None = None  # None: the folder's scheduler class
    height: int = 512
    width: int = 512

    def __post_init__(self) -> None:
        check_request(self.prompt, self.negative_prompt, self.seed, self.steps, self.guidance, self.height,
                      self.width)


@dataclass
class Result:
    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    trace: dict[str, np.ndarray] = field(default_factory=dict)
    report: Report | None = None
    peak_rss_mb: float = 0.0


def initial_latents(seed: int, height: int, width: int, channels: int = 4) -> np.ndarray:
    """The documented noise: PCG64 ``standard_normal`` float32, NHWC (1, height, width, channels)
    in *latent* pixels (image size / the VAE's scale factor, 8 for SD)."""
    return np.random.default_rng(seed).standard_normal((1, height, width, channels), dtype=np.float32)


def peak_rss_mb() -> float:
    """Peak resident set size of this process image so far, in MiB.

    Linux's ``VmHWM`` (this image only): ``getrusage``'s ``ru_maxrss`` survives
    ``exec``, so a process started by a larger one would report its parent's
    peak. ``ru_maxrss`` (KiB on Linux) where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Pipeline:
    """A Stable Diffusion pipeline over a diffusers folder.

    ``precision``: ``f32`` | ``f32_f16`` | ``f16`` (``ftz``, ``block``), or a
    ``Precision`` (then ``ftz`` and ``block`` are its own), e.g.
    ``Precision("f16", device_model="litert-gpu")``;
    ``rewrites``: ``none`` | ``paper`` | ``google`` | a comma list;
    ``low_memory``: staged loading (each model loaded only for its stage),
    and in fp16-storage modes weights kept as float16 arrays (``weights_f16``).

    A deployment whose stages differ (the text encoder on a CPU in fp32, the
    UNet on a GPU in fp16, int8 weights) passes ``options``: one
    ``ModelOptions`` per model (``refsd.trace.MODELS``), which then replace
    precision / rewrites; ``guidance_precision``: the precision of classifier-free
    guidance and the scheduler step (float32 by default, as a phone's host
    CPU runs them; see :func:`guided_step`)."""

    def __init__(self, model_dir: str | Path, *, precision: str | Precision = "f32", ftz: bool = False,
                 block: int = 32, rewrites: str = "none", low_memory: bool = False,
                 options: Mapping[str, ModelOptions] | None = None,
                 guidance_precision: Precision | None = None) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(2, "no such model folder", str(self.model_dir))
        if not (self.model_dir / "model_index.json").exists():
            raise ValueError(f"{self.model_dir}: not a diffusers folder (no model_index.json)")
        read_config(self.model_dir / "model_index.json")  # read as load_pipeline reads it: part of model_sha256
        if options is None:
            p = precision if isinstance(precision, Precision) else Precision(precision, ftz, block)
            base = ModelOptions.make(precision=p, rewrites=rewrites, weights_f16=low_memory and p.storage16)
            options = {m: base for m in MODELS}
        missing = [m for m in MODELS if m not in options]
        if missing:
            raise ValueError(f"options must name every model ({', '.join(MODELS)}); missing {', '.join(missing)}")
        self.options = dict(options)
        self.guidance_precision = guidance_precision if guidance_precision is not None else Precision()
        self.low_memory = low_memory
        self.tokenizer = load_tokenizer(self.model_dir / "tokenizer")
        self.scheduler_config = load_scheduler_config(self.model_dir / "scheduler")
        vae_config = self.model_dir / "vae" / "config.json"
        # As diffusers: each VAE up block but the last doubles the size (8 for SD).
        self.vae_scale_factor = VaeConfig.from_dict(read_config(vae_config), source=str(vae_config)).downscale
        self.components: dict | None = None
        if not low_memory:
            self.components = {m: self._load(m) for m in MODELS}

    # -- stages, each loading its model in low-memory mode

    def _load(self, name: str):
        return load_model(self.model_dir / name, name, options=self.options[name])

    def model(self, name: str):
        """The stage's model (``text_encoder``, ``unet``, ``vae``): loaded with the pipeline, or now
        in low-memory mode. A pipeline with other models behind the same calls overrides it."""
        if self.components is not None:
            return self.components[name]
        return self._load(name)

    def token_ids(self, text: str) -> np.ndarray:
        """(1, 77) int64, padded to max length and truncated, as diffusers does."""
        out = self.tokenizer(text, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="np")
        return np.asarray(out["input_ids"], dtype=np.int64)

    def request_ids(self, request: Request) -> np.ndarray:
        """(2, 77) int64 token ids in CFG order [negative_prompt, prompt]."""
        return np.concatenate([self.token_ids(request.negative_prompt), self.token_ids(request.prompt)])

    def encode_ids(self, ids: np.ndarray) -> np.ndarray:
        model = self.model("text_encoder")
        with location("text_encoder"):
            hidden = np.array(model(ids))
        # Dropping the last reference frees the stage's weights before the next stage loads (a model holds no
        # reference cycle: tests/test_pipeline.py proves it); a gc.collect() here cost 0.3 s in a big process.
        del model
        return hidden

    def encode_text(self, prompt: str, negative_prompt: str = "") -> np.ndarray:
        return self.encode_ids(np.concatenate([self.token_ids(negative_prompt), self.token_ids(prompt)]))

    def __call__(self, request: Request, *, latents: np.ndarray | None = None, token_ids: np.ndarray | None = None,
                 teacher: Mapping[str, np.ndarray] | None = None, monitor: Monitor | None = None,
                 progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> Result:
        """Run ``request``. ``latents``: initial noise (1, h, w, 4) to replay
        instead of the seed's; ``token_ids``: (2, 77) ids to encode instead of
        tokenizing the prompts. ``teacher``: teacher forcing: the UNet is fed
        ``teacher``'s ``text_encoder/hidden_states`` and, after each step, the
        loop continues from ``teacher``'s ``scheduler/step_{i}/latents`` (the
        decoder decodes its last), so each traced tensor is that stage's own
        error on a device's inputs, not the drift of a trajectory.
        ``monitor``: collect fp16 events into it."""
        trace: dict[str, np.ndarray] = {}
        if monitor is None:
            return self._run(request, latents, token_ids, teacher, trace, progress, on_step)
        with monitoring(monitor):
            result = self._run(request, latents, token_ids, teacher, trace, progress, on_step)
        result.report = monitor.report()
        return result

    def _run(self, req: Request, latents, token_ids, teacher, trace, progress, on_step) -> Result:
        sched = make_scheduler(req.scheduler, self.scheduler_config)
        timesteps = sched.set_timesteps(req.steps)
        ids = self.request_ids(req) if token_ids is None else np.asarray(token_ids, dtype=np.int64)
        if ids.shape != (2, TOKENS):
            raise ValueError(f"token ids must have shape (2, {TOKENS}) [negative_prompt, prompt], got {ids.shape}")
        context = self.encode_ids(ids)
        trace[trace_names.HIDDEN_STATES] = context
        trace[trace_names.TIMESTEPS] = np.asarray(timesteps)
        if teacher is not None:
            context = np.asarray(teacher[trace_names.HIDDEN_STATES], np.float32)

        f = self.vae_scale_factor
        if req.height % f or req.width % f:
            raise ValueError(f"height and width must be multiples of the VAE scale factor {f}, "
                             f"got {req.height}x{req.width}")
        unet = self.model("unet")
        h, w = req.height // f, req.width // f
        channels = unet.config.in_channels
        if latents is None:
            x = initial_latents(req.seed, h, w, channels) * np.float32(sched.init_noise_sigma)
        else:
            x = np.asarray(latents, dtype=np.float32)
            if x.shape != (1, h, w, channels):
                raise ValueError(f"initial latents must have shape {(1, h, w, channels)}, got {x.shape}")
        trace[trace_names.LATENTS_INIT] = x
        g = np.float32(req.guidance)
        for i in _progress(range(len(timesteps)), progress, "denoising"):
            x_in = sched.scale_model_input(np.concatenate([x, x]), i)
            with location("unet", i):
                noise = np.array(unet(x_in, timesteps[i], context))
            x = guided_step(sched, noise, g, i, x, self.guidance_precision)
            trace[trace_names.noise_pred(i)] = noise
            trace[trace_names.latents(i)] = x
            if teacher is not None:
                x = np.asarray(teacher[trace_names.latents(i)], np.float32)
            if on_step is not None:
                on_step(i, trace)
        del unet

        vae = self.model("vae")
        with location("vae"):
            decoded = np.array(vae.decode_latents(x))
        trace[trace_names.IMAGE] = decoded
        return Result(image=to_image(decoded[0]), trace=trace, peak_rss_mb=peak_rss_mb())


def guided_step(sched, noise: np.ndarray, g: np.float32, i: int, x: np.ndarray, p: Precision) -> np.ndarray:
    """Classifier-free guidance ``eps = uncond + g (cond - uncond)`` on the
    UNet's [uncond, cond] output, then the scheduler step, in precision ``p``.

    ``f32``: float32 throughout (a host CPU). ``f32_f16``: fp16 tensors, one
    fused kernel: the noise, the latents, eps and the new latents are rounded,
    the math inside is float32. ``f16``: a framework's fp16 tensors (PyTorch
    on fp16, on a CPU or a GPU): every primitive's result is rounded, and so is
    every scalar coefficient (``g``, the scheduler's square roots), which
    biases the step's gain by up to a unit roundoff per coefficient. The DDIM
    step emulates that primitive by primitive; Euler and DPM-Solver++ are
    rounded at their output only (their primitives are not emulated)."""
    if not p.storage16:
        uncond, cond = noise[:1], noise[1:]
        return sched.step(uncond + g * (cond - uncond), i, x)

    def r(a):
        return round_f16(a, ftz=p.ftz)

    uncond, cond, x = r(noise[:1]), r(noise[1:]), r(x)
    if not p.math16:
        return r(sched.step(r(uncond + g * (cond - uncond)), i, x))
    eps = r(uncond + r(r(g) * r(cond - uncond)))
    if isinstance(sched, DDIMScheduler):
        return sched.step(eps, i, x, rounding=r)
    return r(sched.step(eps, i, x))


def _progress(it, enabled: bool, desc: str):
    return console.progress(it, desc=desc, unit="step", enabled=enabled) if enabled else it
