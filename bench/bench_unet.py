"""One UNet forward of the SD 2.1-base architecture: refsd (float32, NumPy)
against diffusers (float32, PyTorch CPU) on identical weights and inputs.

    python bench/bench_unet.py [--sizes 32 64] [--threads 1] [--cache DIR]

Weights: diffusers' own initialization of ``UNet2DConditionModel`` with the
stabilityai/stable-diffusion-2-1-base UNet config (865M parameters, seed 0),
saved once with ``save_pretrained`` as safetensors in ``--cache`` and loaded
from there by both sides (diffusers ``from_pretrained``, ``refsd.weights.load_unet``).

Inputs: latents N(0, 1) of (1, S, S, 4) duplicated to batch 2 (classifier-free
guidance runs cond and uncond together), timestep 981, text hidden states
N(0, 1) of (2, 77, 1024). Per size: wall time of one forward each (after a
warm-up at the smallest size), the ratio refsd / diffusers, and the
conformance ``max|a - b| / max|b|`` (bound 1e-4). Both libraries get the same
thread count (``--threads``, default 1: on a shared VM extra threads measure
the neighbours). Prints a Markdown table; bench/README.md records the figures.
Not run in CI.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path


if __name__ == "__main__":
    from blas_threads import set_blas_threads

    set_blas_threads(sys.argv[1:])

import numpy as np  # noqa: E402

SD21_BASE_UNET = {  # stabilityai/stable-diffusion-2-1-base, unet/config.json
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}
BOUND = 1e-4


def ensure_weights(cache: Path) -> Path:
    import torch
    from diffusers import UNet2DConditionModel

    if (cache / "diffusion_pytorch_model.safetensors").is_file() and (cache / "config.json").is_file():
        return cache
    print(f"initializing the SD 2.1-base UNet with diffusers (seed 0) and saving to {cache} ...", flush=True)
    torch.manual_seed(0)
    model = UNet2DConditionModel(**SD21_BASE_UNET)
    cache.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cache, safe_serialization=True)
    return cache


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sizes (default 32 64)")
    p.add_argument("--threads", type=int, default=1, help="threads for both BLAS and PyTorch (default 1)")
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "refsd" / "bench-sd21-base-unet"
    p.add_argument("--cache", type=Path, default=default_cache, help=f"weights folder (default {default_cache})")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up forward")
    args = p.parse_args(argv)

    import torch
    from diffusers import UNet2DConditionModel

    from refsd import weights

    torch.set_num_threads(args.threads)
    folder = ensure_weights(args.cache)
    t0 = time.perf_counter()
    theirs = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    t_load_theirs = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = weights.load_unet(folder)
    t_load_ours = time.perf_counter() - t0
    print(f"loaded: diffusers {t_load_theirs:.1f} s, refsd {t_load_ours:.1f} s "
          f"({ours.parameter_count() / 1e6:.0f}M parameters), threads {args.threads}", flush=True)

    rng = np.random.default_rng(0)
    ctx = rng.standard_normal((2, 77, 1024)).astype(np.float32)

    def inputs(size):
        lat = rng.standard_normal((1, size, size, 4)).astype(np.float32)
        return np.concatenate([lat, lat])

    def run_theirs(x):
        with torch.no_grad():
            y = theirs(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), 981,
                       torch.from_numpy(ctx)).sample
        return y.numpy().transpose(0, 2, 3, 1)

    if not args.no_warmup:
        w = inputs(min(args.sizes) // 2 or 8)
        run_theirs(w)
        ours(w, 981, ctx)

    rows = []
    for size in args.sizes:
        x = inputs(size)
        t0 = time.perf_counter()
        ref = run_theirs(x)
        t_theirs = time.perf_counter() - t0
        t0 = time.perf_counter()
        y = ours(x, 981, ctx)
        t_ours = time.perf_counter() - t0
        err = float(np.abs(y.astype(np.float64) - ref).max() / np.abs(ref).max())
        rows.append((size, t_theirs, t_ours, err))
        print(f"{size}x{size}: diffusers {t_theirs:.2f} s, refsd {t_ours:.2f} s, ratio {t_ours / t_theirs:.2f}, "
              f"max rel error {err:.2e} ({'ok' if err <= BOUND else 'FAIL'}), peak RSS {peak_rss_gb():.1f} GB",
              flush=True)

    print()
    print(f"| latents (batch 2) | diffusers fp32 | refsd f32 | refsd / diffusers | max rel error (<= {BOUND:g}) |")
    print("|---|---|---|---|---|")
    for size, a, b, err in rows:
        print(f"| {size}x{size} | {a:.2f} s | {b:.2f} s | {b / a:.2f} | {err:.2e} |")
    return 0 if all(err <= BOUND for *_, err in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
