"""Text -> image, with a trace of every boundary tensor.

The loop is diffusers' ``StableDiffusionPipeline``: the prompt and the negative
prompt (empty by default) are tokenized to 77 ids and encoded together; the
UNet runs both halves as one batch of 2 (``[uncond, cond]``); classifier-free
guidance ``eps = uncond + g (cond - uncond)`` and the scheduler step run on the
host in float32 (on a phone they run on the CPU, outside the GPU graph); the
VAE decodes ``latents / scaling_factor``.

Boundary tensors (the names of the capture bundle), all NHWC float32:

``text_encoder/hidden_states``   (2, 77, D), batch order [uncond, cond]
``scheduler/latents_init``       (1, h, w, 4), already times ``init_noise_sigma``
                                 (h, w = image size / VAE scale factor, 8 for SD)
``unet/step_{i}/noise_pred``     (2, h, w, 4), the UNet's raw output [uncond, cond]
``scheduler/step_{i}/latents``   (1, h, w, 4), latents after step i
``vae/image``                    (1, H, W, 3), the decoder's raw output (about [-1, 1])

Initial latents come from ``numpy.random.default_rng(seed).standard_normal(
(1, h, w, 4), dtype=float32)`` (PCG64, NHWC order) times ``init_noise_sigma``, or are supplied, so a
device's own noise can be replayed.

Staged low-memory mode (Choi et al. 2023, Sec. 3.3): the text encoder is
loaded, run and freed before the UNet is loaded; the decoder is loaded after
the UNet is freed; weights are memory-mapped.
"""

from __future__ import annotations

import gc
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from refsd.limits import check_request
from refsd.models.module import ModelOptions
from refsd.models.vae import VaeConfig
from refsd.monitor import Monitor, Report, location, monitoring
from refsd.numerics import Precision
from refsd.schedulers import make_scheduler
from refsd.weights import Components, load_pipeline, read_config, load_scheduler_config, load_text_encoder, load_tokenizer, \
    load_unet, load_vae

TOKENS = 77


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


def to_image(decoded: np.ndarray) -> np.ndarray:
    """Decoder output (about [-1, 1]) -> [0, 1], as diffusers' ``postprocess``."""
    return np.clip(decoded / np.float32(2) + np.float32(0.5), 0.0, 1.0)


class Pipeline:
    """A Stable Diffusion pipeline over a diffusers folder.

    ``precision``: ``f32`` | ``f32_f16`` | ``f16`` (``ftz``, ``block``);
    ``rewrites``: ``none`` | ``paper`` | ``google`` | a comma list;
    ``low_memory``: staged loading (each model loaded only for its stage),
    and in fp16-storage modes weights kept as float16 arrays (``weights_f16``)."""

    def __init__(self, model_dir: str | Path, *, precision: str = "f32", ftz: bool = False, block: int = 32,
                 rewrites: str = "none", low_memory: bool = False) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(2, "no such model folder", str(self.model_dir))
        if not (self.model_dir / "model_index.json").exists():  # present but not a file: refused when read
            raise ValueError(f"{self.model_dir}: not a diffusers folder (no model_index.json)")
        p = Precision(precision, ftz, block)
        self.options = ModelOptions.make(precision=p, rewrites=rewrites, weights_f16=low_memory and p.storage16)
        self.low_memory = low_memory
        self.tokenizer = load_tokenizer(self.model_dir / "tokenizer")
        self.scheduler_config = load_scheduler_config(self.model_dir / "scheduler")
        vae_config = self.model_dir / "vae" / "config.json"
        # As diffusers: each VAE up block but the last doubles the size (8 for SD).
        self.vae_scale_factor = VaeConfig.from_dict(read_config(vae_config), source=str(vae_config)).downscale
        self.components: Components | None = None
        if not low_memory:
            self.components = load_pipeline(self.model_dir, options=self.options, tokenizer=False)

    # -- stages, each loading its model in low-memory mode

    def _model(self, name: str):
        if self.components is not None:
            return getattr(self.components, name)
        loader = {"text_encoder": load_text_encoder, "unet": load_unet, "vae": load_vae}[name]
        return loader(self.model_dir / name, options=self.options)

    def token_ids(self, text: str) -> np.ndarray:
        """(1, 77) int64, padded to max length and truncated, as diffusers does."""
        out = self.tokenizer(text, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="np")
        return np.asarray(out["input_ids"], dtype=np.int64)

    def encode_text(self, prompt: str, negative_prompt: str = "") -> np.ndarray:
        ids = np.concatenate([self.token_ids(negative_prompt), self.token_ids(prompt)])
        model = self._model("text_encoder")
        with location("text_encoder"):
            hidden = np.array(model(ids))
        del model
        gc.collect()
        return hidden

    def __call__(self, request: Request, *, latents: np.ndarray | None = None, monitor: Monitor | None = None,
                 progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> Result:
        """Run ``request``. ``latents``: initial noise (1, h, w, 4) to replay
        instead of the seed's. ``monitor``: collect fp16 events into it."""
        trace: dict[str, np.ndarray] = {}
        if monitor is None:
            return self._run(request, latents, trace, progress, on_step)
        with monitoring(monitor):
            result = self._run(request, latents, trace, progress, on_step)
        result.report = monitor.report()
        return result

    def _run(self, req: Request, latents, trace, progress, on_step) -> Result:
        sched = make_scheduler(req.scheduler, self.scheduler_config)
        timesteps = sched.set_timesteps(req.steps)
        context = self.encode_text(req.prompt, req.negative_prompt)
        trace["text_encoder/hidden_states"] = context

        f = self.vae_scale_factor
        if req.height % f or req.width % f:
            raise ValueError(f"height and width must be multiples of the VAE scale factor {f}, "
                             f"got {req.height}x{req.width}")
        unet = self._model("unet")
        h, w = req.height // f, req.width // f
        channels = unet.config.in_channels
        if latents is None:
            x = initial_latents(req.seed, h, w, channels) * np.float32(sched.init_noise_sigma)
        else:
            x = np.asarray(latents, dtype=np.float32)
            if x.shape != (1, h, w, channels):
                raise ValueError(f"initial latents must have shape {(1, h, w, channels)}, got {x.shape}")
        trace["scheduler/latents_init"] = x
        g = np.float32(req.guidance)
        for i in _progress(range(len(timesteps)), progress, "denoising"):
            x_in = sched.scale_model_input(np.concatenate([x, x]), i)
            with location("unet", i):
                noise = np.array(unet(x_in, timesteps[i], context))
            uncond, cond = noise[:1], noise[1:]
            x = sched.step(uncond + g * (cond - uncond), i, x)
            trace[f"unet/step_{i}/noise_pred"] = noise
            trace[f"scheduler/step_{i}/latents"] = x
            if on_step is not None:
                on_step(i, trace)
        del unet
        gc.collect()

        vae = self._model("vae")
        with location("vae"):
            decoded = np.array(vae.decode_latents(x))
        trace["vae/image"] = decoded
        return Result(image=to_image(decoded[0]), trace=trace, peak_rss_mb=peak_rss_mb())


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(it, desc=desc, unit="step", leave=False)
