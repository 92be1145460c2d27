"""Capture from your own runtime: diffusers (PyTorch, CPU) as the "device".

A worked example of writing a capture bundle that ``refsd-validate certify``
judges, from a runtime refsd did not write. The runtime here is diffusers /
transformers on PyTorch's CPU kernels, in float32, float16 or bfloat16; the
steps are the same for any runtime of your own:

1. run the pipeline yourself, starting from refsd's documented initial noise
   (``refsd.pipeline.initial_latents``), so the reference can replay the run;
2. keep the boundary tensors (``refsd.trace``): token ids, text hidden states,
   timesteps, initial latents, each step's raw UNet output and latents, the
   decoder's raw image; as float32, **NHWC** (PyTorch is NCHW: transpose),
   the batch of two in the order ``[uncond, cond]``;
3. optionally keep module outputs (``--intermediates``), named
   ``{stage}/[step_{i}/]{module path}`` with refsd's module paths, so a
   divergence is localized to a module and not only to a step;
4. declare honestly where and in what precision each stage ran (``stages``),
   and which weights the deployment stores (``model.weights``): the
   validator's noise floors follow the declaration;
5. ``refsd_validate.bundle.write_bundle(..., model_dir=...)`` checks the
   document against the schema, and the tensors against the model (its
   hash, the boundary shapes, with a hint for an NCHW tensor, and every
   intermediate's name), before it writes anything.

Run::

    python examples/diffusers_capture.py --model DIR --prompt "a cat" --seed 3 --steps 4 \\
        --height 64 --width 64 --out bundle/ [--dtype fp32|fp16|bf16] [--intermediates]
    refsd-validate certify bundle/ --model DIR --out cert/

``DIR`` is a diffusers Stable Diffusion folder (``refsd make-tiny DIR --arch sd21``
makes a small one). Nothing is downloaded. The scheduler is DDIM, built from the
folder's scheduler config (any prediction type the folder declares).

Precision: with ``--dtype fp16`` the models run as ``torch.float16`` modules
(weights rounded to fp16 once) and, as diffusers' own pipeline does, guidance
and the scheduler step run on the fp16 tensors too. PyTorch's CPU kernels
compute each op in fp32 and round its output to fp16 (measured with torch 2.13
on x86: a 4096-long fp16 matmul and a 512-channel 3x3 conv correctly rounded in
64 of 64 outputs; softmax and GroupNorm equal to fp32 math rounded once, GELU
within one fp16 ulp of it but in its far negative tail, where which fp32 formula
runs varies by CPU kernel path: README; fp16 accumulation would be off by ~3 %). That is refsd's ``f32_f16`` (fp16
storage, fp32 math inside an op), so every stage is declared ``f32_f16``; the
coarser ``f16`` (fp16 math inside ops too) would be true as a bound but widens
the validator's floors, and a real fault can hide under them. The capture
schema has no bfloat16 precision: ``--dtype bf16`` declares ``f16``, the most
lenient fp16 declaration, and stores ``model.weights = "bf16"``. bfloat16 keeps
8 significant bits where float16 keeps 11, so expect the validator to refuse
such a run; that refusal is the point (a device that rounds more coarsely than
it declares is not certified).
"""

from __future__ import annotations

import argparse
from collections import Counter
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import diffusers
import transformers
from diffusers.models.attention_processor import Attention, AttnProcessor

from refsd.pipeline import initial_latents
from refsd.trace import HIDDEN_STATES, IMAGE, LATENTS_INIT, TIMESTEPS, TOKEN_IDS, TOKENS, latents, noise_pred
from refsd_validate.bundle import model_sha256, write_bundle

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What each dtype is declared as (schema: f32 | f32_f16 | f16; see the module docstring). bf16 has no
# entry in the schema; f16 is the most lenient 16-bit one, and the validator should still refuse it.
DECLARED = {"fp32": "f32", "fp16": "f32_f16", "bf16": "f16"}
# Faults a broken runtime could have, to show the validator catches them (bench/fault_matrix.py runs them all):
# fault -> (what, first step it acts on).
FAULTS = {
    "attention_scale": ("every attention's scores scaled by 1.01 (a 1 % softmax temperature)", 0),
    "attention_scale_from_step_1": ("the same, from step 1 on", 1),
    "noise_pred_plus_1pct": ("the UNet output times 1.01 from step 1 on", 1),
    "noise_pred_plus_0.3pct": ("the UNet output times 1.003 from step 1 on", 1),
    "timestep_off_by_one": ("step 1 runs timestep t + 1 (UNet and scheduler), as the device records it", 1),
}


# ---------------------------------------------------------------- 1. the runtime: load the components


def load(model_dir: Path, dtype: str):
    """The pipeline's components from a diffusers folder, weights cast to ``dtype`` once."""
    torch_dtype = DTYPES[dtype]
    tokenizer = transformers.CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    text_encoder = transformers.CLIPTextModel.from_pretrained(model_dir / "text_encoder").to(torch_dtype).eval()
    unet = diffusers.UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch_dtype).eval()
    vae = diffusers.AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch_dtype).eval()
    # DDIM from the folder's own scheduler config (betas, prediction type, timestep spacing).
    scheduler = diffusers.DDIMScheduler.from_config(diffusers.DDIMScheduler.load_config(model_dir / "scheduler"))
    return tokenizer, text_encoder, unet, vae, scheduler


# ---------------------------------------------------------------- 2. layout: PyTorch tensors -> bundle arrays


def to_bundle(t: torch.Tensor) -> np.ndarray:
    """A PyTorch activation as the bundle stores it: float32 (bf16 has no .npy
    dtype; widening is exact), NHWC for 4-D tensors (PyTorch is NCHW), a copy
    (never a view of a buffer the model may reuse)."""
    t = t.detach().to(torch.float32)
    if t.ndim == 4:
        t = t.permute(0, 2, 3, 1)
    return np.array(t.cpu().numpy(), dtype=np.float32, copy=True)


# ---------------------------------------------------------------- 3. intermediates: forward hooks


class Recorder:
    """Forward hooks that keep module outputs under refsd's tensor names.

    A module path is the component name plus the checkpoint key prefix of the
    module (``unet.mid_block.attentions.0``), which is also the module's name in
    PyTorch: ``named_modules()`` gives the paths directly. Recorded: modules
    that own weights (a path refsd knows is a checkpoint key prefix), with a
    tensor output. Not recorded: parameter-free modules (dropout, activations,
    the sinusoidal ``time_proj``), and diffusers' down blocks, which return
    ``(hidden_states, skip connections)`` (refsd does not record them either:
    their tensors are recorded by the modules inside).
    """

    def __init__(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self.stage: str | None = None
        self.step: int | None = None
        self.skipped: Counter[str] = Counter()  # modules given no hook, by reason
        self._spatial: dict[int, tuple[int, int]] = {}

    def name(self, path: str) -> str:
        # refsd.context.tensor_name: {stage}/step_{i}/{path} in the denoising loop, else {stage}/{path}
        return f"{self.stage}/step_{self.step}/{path}" if self.step is not None else f"{self.stage}/{path}"

    def keep(self, path: str, value: torch.Tensor) -> None:
        name, k = self.name(path), 0
        key = name
        while key in self.tensors:  # a module called twice at one place: name#1, name#2 (as refsd)
            k += 1
            key = f"{name}#{k}"
        self.tensors[key] = to_bundle(value)

    def attach(self, component: str, model: torch.nn.Module) -> list:
        handles = []
        # transformers 5's CLIPTextModel has no ``text_model`` submodule (its modules sit at the top);
        # refsd, like transformers 4 and the checkpoint keys, puts them under ``text_model.``.
        flat_clip = component == "text_encoder" and not hasattr(model, "text_model")
        for sub, module in model.named_modules():
            if not any(True for _ in module.parameters()):
                self.skipped["no weights"] += 1  # dropout, activations, time_proj, containers
                continue
            if type(module).__name__.endswith("DownBlock2D"):
                self.skipped["down block"] += 1  # returns (hidden_states, skip connections)
                continue
            if flat_clip:
                paths = [f"{component}.text_model.{sub}"] if sub else [f"{component}.text_model", component]
            else:
                paths = [f"{component}.{sub}" if sub else component]
            if isinstance(module, Attention) and module.group_norm is not None:
                # The VAE's attention normalizes a (N, C, H*W) view: remember H, W to restore NHWC.
                handles.append(module.register_forward_pre_hook(self._remember_spatial(module.group_norm),
                                                                with_kwargs=True))
            handles.append(module.register_forward_hook(self._hook(paths, module)))
        return handles

    def _remember_spatial(self, norm):
        def pre_hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if x.ndim == 4:
                self._spatial[id(norm)] = (x.shape[2], x.shape[3])
        return pre_hook

    def _hook(self, paths: list[str], module):
        def hook(mod, args, output):
            if self.stage is None:
                return
            # transformers / diffusers return tuples or ModelOutput objects: the first element is the output
            value = output if isinstance(output, torch.Tensor) else output[0]
            if value.ndim == 3 and id(module) in self._spatial:
                n, c, _ = value.shape  # (N, C, H*W) -> (N, C, H, W), made NHWC by to_bundle
                value = value.reshape(n, c, *self._spatial[id(module)])
            for p in paths:
                self.keep(p, value)
        return hook


# ---------------------------------------------------------------- 4. a fault, to show a bad device is caught


class ScaledScoresAttnProcessor(AttnProcessor):
    """diffusers' plain attention with every score scaled by 1.01 (``q k^T * 1.01 / sqrt(d)``):
    a kernel bug a 1 % off softmax temperature would be. (``AttnProcessor2_0``, the default,
    calls ``scaled_dot_product_attention`` without ``attn.scale``; the plain processor uses it.)"""

    def __init__(self, active=lambda: True) -> None:
        super().__init__()
        self.active = active  # whether the fault acts now (a fault from step 1 leaves step 0 alone)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if not self.active():
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        scale = attn.scale
        attn.scale = scale * 1.01
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        finally:
            attn.scale = scale


# ---------------------------------------------------------------- 5. the run


@torch.no_grad()
def run(model_dir: str | Path, *, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int = 20,
        guidance: float = 7.5, height: int = 512, width: int = 512, dtype: str = "fp32",
        intermediates: bool = False, fault: str | None = None) -> dict[str, np.ndarray]:
    """Text -> image with diffusers' components; returns the bundle's tensors."""
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")
    torch_dtype = DTYPES[dtype]
    tokenizer, text_encoder, unet, vae, scheduler = load(Path(model_dir), dtype)
    rec = Recorder()
    from_step = FAULTS[fault][1] if fault is not None else None
    if fault is not None and fault.startswith("attention_scale"):
        # every diffusers attention (UNet, VAE: the VAE runs after the loop, step None); CLIP's is transformers' own
        processor = ScaledScoresAttnProcessor(lambda: rec.step is None or rec.step >= from_step)
        unet.set_attn_processor(processor)
        vae.set_attn_processor(processor)
    handles = []
    if intermediates:
        for component, model in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
            handles += rec.attach(component, model)
    tensors: dict[str, np.ndarray] = {}

    # Text: negative prompt and prompt as one batch of two, [uncond, cond] (refsd.trace.CFG_ORDER).
    ids = tokenizer([negative_prompt, prompt], padding="max_length", max_length=TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    rec.stage = "text_encoder"
    context = text_encoder(ids)[0]  # last_hidden_state (after the final layer norm), (2, 77, D)
    tensors[TOKEN_IDS] = ids.numpy().astype(np.int64)
    tensors[HIDDEN_STATES] = to_bundle(context)

    # Initial noise: refsd's documented draw (NHWC float32) times init_noise_sigma, as NCHW in the model's dtype.
    scheduler.set_timesteps(steps)
    if fault == "timestep_off_by_one":
        scheduler.timesteps[from_step] += 1
    scale = 2 ** (len(vae.config.block_out_channels) - 1)  # image pixels per latent pixel (8 for SD)
    h, w = height // scale, width // scale
    noise = initial_latents(seed, h, w, unet.config.in_channels) * np.float32(scheduler.init_noise_sigma)
    x = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))).to(torch_dtype)
    tensors[LATENTS_INIT] = to_bundle(x)  # what the run starts from (rounded to fp16 / bf16 if so)
    tensors[TIMESTEPS] = scheduler.timesteps.numpy().astype(np.int64)

    rec.stage = "unet"
    for i, t in enumerate(scheduler.timesteps):
        rec.step = i
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        # The UNet's raw output (epsilon or v, as the folder's prediction type says), (2, C, h, w), [uncond, cond]
        out = unet(x_in, t, encoder_hidden_states=context).sample
        if fault is not None and fault.startswith("noise_pred_plus") and i >= from_step:
            out = out * (1.01 if fault == "noise_pred_plus_1pct" else 1.003)
        uncond, cond = out.chunk(2)
        # Guidance and the scheduler step in the model's dtype, as diffusers' pipeline does.
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        tensors[noise_pred(i)] = to_bundle(out)
        tensors[latents(i)] = to_bundle(x)

    rec.stage, rec.step = "vae", None
    image = vae.decode(x / vae.config.scaling_factor).sample  # raw decoder output, about [-1, 1]
    tensors[IMAGE] = to_bundle(image)
    if intermediates:
        rec.keep("vae", image)  # refsd's ``vae`` module output is the decoded image (decode() is not forward())
        for handle in handles:
            handle.remove()
        tensors.update(rec.tensors)
    return tensors


# ---------------------------------------------------------------- 6. the declaration and the bundle


def capture_document(model_dir: Path, *, prompt: str, negative_prompt: str, seed: int, steps: int,
                     guidance: float, height: int, width: int, dtype: str, declare: str | None = None) -> dict:
    """capture.json (without the tensor table, which ``write_bundle`` builds).
    ``declare``: the precision to declare for every stage (default: the honest
    one for ``dtype``; the tests use it to declare a bf16 run as f16)."""
    precision = declare or DECLARED[dtype]
    runtime = f"PyTorch {torch.__version__} CPU ({DTYPES[dtype]})"
    stage = {"processor": "cpu", "precision": precision, "ftz": False, "fast_math": False, "runtime": runtime}
    component = {"format": "diffusers", "name": "diffusers", "version": diffusers.__version__}
    return {
        "tool": f"examples/diffusers_capture.py (diffusers {diffusers.__version__}, transformers "
                f"{transformers.__version__}, torch {torch.__version__})",
        "device": {"name": "host", "soc": None, "gpu": None, "os": platform.platform(),
                   "cpu": platform.processor() or platform.machine()},
        "runtime": {"name": "diffusers", "version": diffusers.__version__},
        "model": {"sha256": model_sha256(model_dir), "weights": dtype, "rewrites": "none",
                  "components": {c: {**component, "file": c} for c in ("text_encoder", "unet", "vae")}},
        # Guidance and the scheduler step ran on the host CPU in the models' dtype (see run()).
        "stages": {"text_encoder": dict(stage), "unet": dict(stage), "vae": dict(stage),
                   "guidance_scheduler": dict(stage)},
        "request": {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
                    "scheduler": "ddim", "guidance": guidance, "height": height, "width": width},
    }


def capture(model_dir: str | Path, out: str | Path, *, prompt: str, negative_prompt: str = "", seed: int = 0,
            steps: int = 20, guidance: float = 7.5, height: int = 512, width: int = 512, dtype: str = "fp32",
            intermediates: bool = False, fault: str | None = None, declare: str | None = None) -> Path:
    """Run and write the bundle directory ``out``; returns it."""
    model_dir = Path(model_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    request = dict(prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps, guidance=guidance,
                   height=height, width=width)
    tensors = run(model_dir, **request, dtype=dtype, intermediates=intermediates, fault=fault)
    doc = capture_document(model_dir, **request, dtype=dtype, declare=declare)
    # Checked against the model before anything is written (run() already made every 4-D tensor NHWC;
    # write_bundle(..., layout="NCHW") would transpose them instead).
    return write_bundle(out, doc, tensors, model_dir=model_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="diffusers Stable Diffusion folder")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default="")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--intermediates", action="store_true", help="also keep every module output refsd names")
    ap.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    a = ap.parse_args(argv)
    if a.dtype == "bf16":
        print("note: the capture schema has no bfloat16 precision; declaring f16, which bf16 does not meet "
              "(8 significant bits, not 11): expect the validator to refuse this run", file=sys.stderr)
    out = capture(a.model, a.out, prompt=a.prompt, negative_prompt=a.negative_prompt, seed=a.seed, steps=a.steps,
                  guidance=a.guidance, height=a.height, width=a.width, dtype=a.dtype, intermediates=a.intermediates)
    print(f"wrote {out}; check it with: refsd-validate certify {out} --model {a.model} --out <dir>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
