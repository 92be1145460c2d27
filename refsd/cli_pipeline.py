"""``refsd generate`` and ``refsd fp16-check``: the pipeline from the command line."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from refsd.limits import check_request, max_image_pixels
from refsd.monitor import EVENT_KINDS
from refsd.numerics import DEVICE_MODELS, Precision
from refsd.safe_io import check_output_file, load_npy

FAIL_ON = ("severe",) + EVENT_KINDS


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """The request fields every command that runs a pipeline takes (generate,
    fp16-check, refsd-validate capture)."""
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", choices=("ddim", "euler", "dpm++2m"), default=None,
                   help="default: the folder's scheduler class (SD 1.5 ships PNDM, which refsd does not implement)")


def _add_request_args(p: argparse.ArgumentParser, *, default_precision: str) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="diffusers-format folder (e.g. from refsd make-tiny)")
    add_prompt_args(p)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--precision", choices=("f32", "f32_f16", "f16"), default=default_precision)
    p.add_argument("--ftz", action="store_true", help="flush fp16 subnormals to zero")
    p.add_argument("--block", type=int, default=32, help="f16 accumulation block (default 32)")
    p.add_argument("--device-model", choices=tuple(DEVICE_MODELS), default=None,
                   help="f16 only: emulate a runtime's measured fp16 kernels instead of the generic model "
                        "(litert-gpu: LiteRT's GPU accelerator; README 'fp16 on real GPU kernels')")
    p.add_argument("--rewrites", default="none", help="none | paper | google | comma list of rewrite names")
    p.add_argument("--low-memory", action="store_true", help="load each model only for its stage; in f32_f16 / f16 keep weights as float16")
    p.add_argument("--latents", metavar="FILE.npy", help="initial latents to replay instead of the seed's noise")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run(args: argparse.Namespace, monitor):
    from refsd.pipeline import Pipeline, Request  # noqa: PLC0415 (keeps `refsd --help` fast)

    if args.block < 1:
        raise ValueError(f"--block must be >= 1, got {args.block}")
    check_request_args(args)
    req = Request(args.prompt, args.negative_prompt, args.seed, args.steps, args.guidance, args.scheduler,
                  args.height, args.width)
    latents = None
    if args.latents:
        latents = _load_npy(args.latents)
    precision = Precision(args.precision, args.ftz, args.block, args.device_model)  # ValueError: exit 2
    pipe = Pipeline(args.model, precision=precision, rewrites=args.rewrites, low_memory=args.low_memory)
    t0 = time.perf_counter()
    result = pipe(req, latents=latents, monitor=monitor, progress=not args.quiet)
    return req, result, time.perf_counter() - t0


def check_request_args(args: argparse.Namespace) -> None:
    """The request options' ranges (``refsd.limits``), named as options."""
    check_request(args.prompt, args.negative_prompt, args.seed, args.steps, args.guidance,
                  getattr(args, "height", 1), getattr(args, "width", 1), options=True)


def _load_npy(path: str) -> np.ndarray:
    # 32 bytes per image pixel: float64 latents of up to 4 channels at the full image size, far above
    # what any VAE scale needs, and still bounded by this machine's memory.
    label = f"--latents {path}"
    arr = load_npy(path, max_bytes=max_image_pixels() * 32, what=label)
    if arr.dtype.kind != "f":
        raise ValueError(f"{label}: expected a floating-point .npy array")
    if not np.isfinite(arr).all():
        raise ValueError(f"{label}: latents contain inf or NaN")
    return arr.astype(np.float32)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="text -> image with the NumPy reference",
                       description="Generate an image with the golden reference, optionally saving the trace of "
                       "every boundary tensor (text_encoder/hidden_states, unet/step_i/noise_pred, ...).")
    _add_request_args(p, default_precision="f32")
    p.add_argument("--out", required=True, metavar="IMAGE.png")
    p.add_argument("--trace", metavar="TRACE.npz", help="write every boundary tensor (plain arrays, no pickles)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from refsd.image import write_png  # noqa: PLC0415

    out = Path(args.out)
    check_output_file(out, "--out")
    if args.trace:
        check_output_file(args.trace, "--trace")
    req, result, seconds = _run(args, None)
    write_png(out, result.image)
    if args.trace:
        np.savez(args.trace, **{k.replace("/", "__"): v for k, v in result.trace.items()})
    print(f"wrote {out} ({result.image.shape[1]}x{result.image.shape[0]}, {req.steps} steps, {args.precision}, "
          f"rewrites {args.rewrites}) in {seconds:.1f} s, peak RSS {result.peak_rss_mb:.0f} MiB"
          + (f"; trace {args.trace} ({len(result.trace)} tensors)" if args.trace else ""))
    return 0


def add_fp16_check(sub) -> None:
    p = sub.add_parser("fp16-check", help="run the pipeline under fp16 emulation and report exceptions",
                       description="Run the pipeline with the float16 exception monitor: first offending op (with "
                       "stage and step), counts per event, the ops closest to overflow.")
    _add_request_args(p, default_precision="f16")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--top", type=int, default=10, help="how many ops closest to overflow to list")
    p.add_argument("--fail-on", default="severe", metavar="KINDS",
                   help=f"comma list of {', '.join(FAIL_ON)}: exit 1 if any occurs (default: severe = overflow, "
                   "invalid NaN, constants lost to inf/zero)")
    p.set_defaults(func=_cmd_fp16_check)


def _cmd_fp16_check(args: argparse.Namespace) -> int:
    from refsd.monitor import Monitor  # noqa: PLC0415

    kinds = [k.strip() for k in args.fail_on.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in FAIL_ON]
    if unknown:
        raise ValueError(f"--fail-on: unknown event kind(s) {', '.join(unknown)}; expected {', '.join(FAIL_ON)}")
    if args.top < 0:
        raise ValueError(f"--top must be >= 0, got {args.top}")
    if args.json:
        check_output_file(args.json, "--json")
    json_out = open(args.json, "w", encoding="utf-8") if args.json else None  # fail early on a bad path
    try:
        req, result, seconds = _run(args, Monitor())
        report = result.report
        report.closest = report.closest[: args.top]
        print(report.table())
        failed = [k for k in kinds if (not report.clean if k == "severe" else report.has(k))]
        mode = args.precision + (" ftz" if args.ftz else "") + (f" {args.device_model}" if args.device_model else "")
        print(f"\n{mode}, rewrites {args.rewrites}: {seconds:.1f} s; "
              + (f"FAIL on {', '.join(failed)}" if failed else f"no {'/'.join(kinds) or 'fail-on'} events"))
        if json_out is not None:
            doc = {"request": vars(req), "precision": args.precision, "ftz": args.ftz, "block": args.block,
                   "device_model": args.device_model, "rewrites": args.rewrites, "fail_on": kinds, "failed": failed, "report": report.to_dict()}
            json_out.write(json.dumps(doc, indent=2) + "\n")
    finally:
        if json_out is not None:
            json_out.close()
    return 1 if failed else 0
