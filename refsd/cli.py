"""The ``refsd`` command line.

    refsd demo [--out DIR]
    refsd catalogue [--json FILE] [--case NAME ...]
    refsd make-tiny DIR --arch sd15|sd21 --seed N
    refsd generate --model DIR --prompt TEXT --out IMAGE.png [--trace TRACE.npz] ...
    refsd fp16-check --model DIR --prompt TEXT [--json FILE] [--fail-on KINDS] [--recipe FILE] ...
    refsd fp16-fix --model DIR --prompt TEXT --out DIR [--min-psnr DB] [--max-reruns N] [--verify-gpu] ...
    refsd export --model DIR --out DIR [--weights fp32|fp16|int8] [--rewrites ...]
    refsd lint-gpu MODEL.tflite [--json]
    refsd golden make|verify [--dir DIR]

Exit codes (``refsd.arguments``): 0 success, 1 the check ran and failed, 2 bad
usage or input (one line on stderr, ``refsd: error: ...``, never a traceback).

Adding a subcommand: write ``_add_<name>(sub)``, which adds its parser with
``sub.add_parser(...)`` and sets ``func=_cmd_<name>``, and ``_cmd_<name>(args)
-> int`` returning the exit code; append ``_add_<name>`` to ``SUBCOMMANDS``.
Raise ``ValueError``, ``FileNotFoundError`` or ``OSError`` for bad input.
Modules that do the work are imported when the command runs, so ``refsd
--help`` stays fast and works without the ``export`` extra (TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from refsd.arguments import EXIT_FAIL, EXIT_OK, add_prompt_args, build_parser as _build, check_request_args, run
from refsd import console
from refsd.limits import check_image_size

PROG = "refsd"


# ---------------------------------------------------------------- demo


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded tiny model: catalogue, image, fp16 report",
                       description="Writes a tiny seeded SD 2.1-architecture folder, runs the float16 exception "
                       "catalogue, generates an image with the golden reference (f32) and the same request under "
                       "fp16 emulation with the exception monitor, and writes what a person wants to look at:")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--arch", choices=("sd15", "sd21"), default="sd21")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64, help="image height and width (default 64)")
    p.add_argument("--precision", choices=("f32_f16", "f16"), action="append",
                   help="fp16 mode(s) to compare with f32 (repeatable; default: f32_f16 and f16)")
    p.add_argument("--ftz", action="store_true")
    p.add_argument("--rewrites", default="none")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from refsd.demo import run_demo  # noqa: PLC0415

    return run_demo(args.out, arch=args.arch, seed=args.seed, steps=args.steps, size=args.size,
                    modes=tuple(args.precision or ("f32_f16", "f16")), ftz=args.ftz, rewrites=args.rewrites)


# ---------------------------------------------------------------- catalogue


def _add_catalogue(sub) -> None:
    p = sub.add_parser(
        "catalogue",
        help="run the float16 exception catalogue (exit 0 iff every case is detected and every fix is clean)",
        description="Run the float16 exception catalogue: each case's broken variant must be flagged at the "
        "expected op path and event, its fixed variant must not be flagged.",
    )
    p.add_argument("--json", metavar="FILE", help="also write the full results (with monitor reports) as JSON "
                   "to FILE; '-' prints JSON to stdout instead of the table")
    p.add_argument("--case", action="append", metavar="NAME", help="run only this case (repeatable)")
    p.set_defaults(func=_cmd_catalogue)


def _cmd_catalogue(args: argparse.Namespace) -> int:
    from refsd.catalogue import run_catalogue  # noqa: PLC0415

    # Open the JSON file first: an unwritable path is a usage error before any work is done.
    out = open(args.json, "w", encoding="utf-8") if args.json and args.json != "-" else None
    try:
        result = run_catalogue(only=args.case)
        if args.json == "-":
            print(result.to_json())
        else:
            print(result.table())
        if out is not None:
            out.write(result.to_json() + "\n")
    finally:
        if out is not None:
            out.close()
    return EXIT_OK if result.ok else EXIT_FAIL


# ---------------------------------------------------------------- make-tiny


def _add_make_tiny(sub) -> None:
    from refsd.tiny import ARCHES, DTYPES  # noqa: PLC0415

    p = sub.add_parser(
        "make-tiny", help="write a tiny seeded SD folder (diffusers format)",
        description="Write a complete diffusers-format Stable Diffusion folder with seeded random weights "
                    "(real module structure, small widths, real CLIP tokenizer). Deterministic byte for byte.")
    p.add_argument("dir", help="output folder (created)")
    p.add_argument("--arch", choices=ARCHES, default="sd15", help="sd15: CLIP ViT-L-style, epsilon; "
                   "sd21: OpenCLIP-style gelu, linear projections, upcast attention, v-prediction")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights as stored (default float32)")
    p.set_defaults(func=_cmd_make_tiny)


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from refsd.tiny import make_tiny  # noqa: PLC0415

    path = make_tiny(args.dir, args.arch, args.seed, dtype=args.dtype)
    print(f"wrote tiny {args.arch} (seed {args.seed}, {args.dtype}) to {path}")
    return EXIT_OK


# ---------------------------------------------------------------- generate, fp16-check


def _add_request_args(p: argparse.ArgumentParser, *, default_precision: str, one_run: bool = True) -> None:
    """The request and deployment options; ``one_run``: also those of a single run (``--low-memory``,
    ``--latents``), which a search over many runs does not take."""
    from refsd.numerics import DEVICE_MODELS, MODES  # noqa: PLC0415

    p.add_argument("--model", required=True, metavar="DIR", help="diffusers-format folder (e.g. from refsd make-tiny)")
    add_prompt_args(p)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--precision", choices=MODES, default=default_precision)
    p.add_argument("--ftz", action="store_true", help="flush fp16 subnormals to zero")
    p.add_argument("--block", type=int, default=32, help="f16 accumulation block (default 32)")
    p.add_argument("--device-model", choices=tuple(DEVICE_MODELS), default=None,
                   help="f16 only: emulate a runtime's measured fp16 kernels instead of the generic model "
                        "(litert-gpu: LiteRT's GPU accelerator; README 'fp16 on real GPU kernels')")
    p.add_argument("--rewrites", default="none", help="none | paper | google | comma list of rewrite names")
    p.add_argument("--gelu-approximate", choices=("none", "tanh"), default=None,
                   help="the GELU the deployment computes: none (erf, as diffusers; default) or tanh")
    if one_run:
        p.add_argument("--low-memory", action="store_true",
                       help="load each model only for its stage; in f32_f16 / f16 keep weights as float16")
        p.add_argument("--latents", metavar="FILE.npy", help="initial latents to replay instead of the seed's noise")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_recipe_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", metavar="FILE", help="apply a recipe from refsd fp16-fix: its rewrites and "
                   "per-module fixes are added to --rewrites, and its GELU is the deployment's")


def _deployment(args: argparse.Namespace) -> tuple[str, str]:
    """(rewrites, gelu approximation) of a command line, with ``--recipe`` applied."""
    gelu = args.gelu_approximate
    if not getattr(args, "recipe", None):
        return args.rewrites, gelu or "none"
    from refsd.fp16fix.recipe import read_recipe, recipe_rewrites  # noqa: PLC0415

    doc = read_recipe(args.recipe)
    own = doc["deployment"]["gelu_approximate"]
    if gelu is not None and gelu != own:
        raise ValueError(f"--gelu-approximate {gelu} contradicts --recipe {args.recipe} (deployment/gelu_approximate "
                         f"{own})")
    return str(recipe_rewrites(doc, args.rewrites)), own


def _run_pipeline(args: argparse.Namespace, monitor):
    from refsd.models.options import ModelOptions  # noqa: PLC0415
    from refsd.numerics import Precision  # noqa: PLC0415
    from refsd.pipeline import Pipeline, Request  # noqa: PLC0415
    from refsd.trace import MODELS  # noqa: PLC0415

    if args.block < 1:
        raise ValueError(f"--block must be >= 1, got {args.block}")
    check_request_args(args)
    req = Request(args.prompt, args.negative_prompt, args.seed, args.steps, args.guidance, args.scheduler,
                  args.height, args.width)
    latents = _read_latents(args.latents) if args.latents else None
    precision = Precision(args.precision, args.ftz, args.block, args.device_model)  # ValueError: exit 2
    rewrites, gelu = _deployment(args)
    args.rewrites = rewrites
    options = ModelOptions.make(precision=precision, rewrites=rewrites, gelu_approximate=gelu,
                                weights_f16=args.low_memory and precision.storage16)
    pipe = Pipeline(args.model, options={m: options for m in MODELS}, low_memory=args.low_memory)
    t0 = time.perf_counter()
    result = pipe(req, latents=latents, monitor=monitor, progress=not args.quiet)
    return req, result, time.perf_counter() - t0


def _read_latents(path: str):
    import numpy as np  # noqa: PLC0415

    from refsd.limits import max_image_pixels  # noqa: PLC0415
    from refsd.safe_io import load_npy  # noqa: PLC0415

    # 32 bytes per image pixel: float64 latents of up to 4 channels at the full image size, far above
    # what any VAE scale needs, and still bounded by this machine's memory.
    label = f"--latents {path}"
    arr = load_npy(path, max_bytes=max_image_pixels() * 32, what=label)
    if arr.dtype.kind != "f":
        raise ValueError(f"{label}: expected a floating-point .npy array")
    if not np.isfinite(arr).all():
        raise ValueError(f"{label}: latents contain inf or NaN")
    return arr.astype(np.float32)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="text -> image with the NumPy reference",
                       description="Generate an image with the golden reference, optionally saving the trace of "
                       "every boundary tensor (text_encoder/hidden_states, unet/step_i/noise_pred, ...).")
    _add_request_args(p, default_precision="f32")
    _add_recipe_arg(p)
    p.add_argument("--out", required=True, metavar="IMAGE.png")
    p.add_argument("--trace", metavar="TRACE.npz", help="write every boundary tensor (plain arrays, no pickles)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np  # noqa: PLC0415

    from refsd.image import write_png  # noqa: PLC0415
    from refsd.safe_io import check_output_file  # noqa: PLC0415

    out = Path(args.out)
    check_output_file(out, "--out")
    if args.trace:
        check_output_file(args.trace, "--trace")
    req, result, seconds = _run_pipeline(args, None)
    write_png(out, result.image)
    if args.trace:
        np.savez(args.trace, **{k.replace("/", "__"): v for k, v in result.trace.items()})
    print(f"wrote {out} ({result.image.shape[1]}x{result.image.shape[0]}, {req.steps} steps, {args.precision}, "
          f"rewrites {args.rewrites}) in {seconds:.1f} s, peak RSS {result.peak_rss_mb:.0f} MiB"
          + (f"; trace {args.trace} ({len(result.trace)} tensors)" if args.trace else ""))
    return EXIT_OK


def _fail_on_kinds() -> tuple[str, ...]:
    from refsd.monitor import EVENT_KINDS  # noqa: PLC0415

    return ("severe",) + EVENT_KINDS


def _add_fp16_check(sub) -> None:
    fail_on = _fail_on_kinds()
    p = sub.add_parser("fp16-check", help="run the pipeline under fp16 emulation and report exceptions",
                       description="Run the pipeline with the float16 exception monitor: first offending op (with "
                       "stage and step), counts per event, the ops closest to overflow.")
    _add_request_args(p, default_precision="f16")
    _add_recipe_arg(p)
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--top", type=int, default=10, help="how many ops closest to overflow to list")
    p.add_argument("--fail-on", default="severe", metavar="KINDS",
                   help=f"comma list of {', '.join(fail_on)}: exit 1 if any occurs (default: severe = overflow, "
                   "invalid NaN, constants lost to inf/zero)")
    p.set_defaults(func=_cmd_fp16_check)


def _cmd_fp16_check(args: argparse.Namespace) -> int:
    from refsd.monitor import Monitor  # noqa: PLC0415
    from refsd.safe_io import check_output_file  # noqa: PLC0415

    fail_on = _fail_on_kinds()
    kinds = [k.strip() for k in args.fail_on.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in fail_on]
    if unknown:
        raise ValueError(f"--fail-on: unknown event kind(s) {', '.join(unknown)}; expected {', '.join(fail_on)}")
    if args.top < 0:
        raise ValueError(f"--top must be >= 0, got {args.top}")
    if args.json:
        check_output_file(args.json, "--json")
    json_out = open(args.json, "w", encoding="utf-8") if args.json else None  # fail early on a bad path
    try:
        req, result, seconds = _run_pipeline(args, Monitor())
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
    return EXIT_FAIL if failed else EXIT_OK


# ---------------------------------------------------------------- fp16-fix


def _add_fp16_fix(sub) -> None:
    from refsd.fp16fix.search import DEFAULT_MAX_RERUNS, DEFAULT_MIN_PSNR  # noqa: PLC0415

    p = sub.add_parser(
        "fp16-fix", help="search the smallest fp16 fix of a deployment and write it as a recipe",
        description="Run the request in the declared fp16 deployment with the exception monitor; if it is not "
        "clean (a severe event, or the image below --min-psnr of f32), search the smallest fix: catalogue fixes "
        "at the modules the monitor names, then rewrites that move where fp16 overflows, then the smallest set "
        "of modules kept in fp32 (delta debugging). Writes DIR/recipe.json and the images. Exit 0 clean or "
        "fixed, 1 no fix found within the budget, 2 bad input.")
    _add_request_args(p, default_precision="f16", one_run=False)
    p.add_argument("--min-psnr", type=float, default=DEFAULT_MIN_PSNR, metavar="DB",
                   help=f"the image's PSNR against f32 a clean run needs (default {DEFAULT_MIN_PSNR:g} dB)")
    p.add_argument("--max-reruns", type=int, default=DEFAULT_MAX_RERUNS, metavar="N",
                   help=f"the search's budget: a teacher-forced stage rerun counts 1, a free-running run 3 "
                   f"(default {DEFAULT_MAX_RERUNS})")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created): recipe.json, "
                   "reference.png, before.png, after.png")
    p.add_argument("--verify-gpu", action="store_true",
                   help="then export the fixed model with fp16 weights, capture it through LiteRT's GPU accelerator "
                   "in fp16, certify it, and write DIR/fp16_fix.html (needs the export extra and a GPU adapter)")
    p.set_defaults(func=_cmd_fp16_fix)


def _cmd_fp16_fix(args: argparse.Namespace) -> int:
    from refsd.fp16fix.recipe import make_recipe  # noqa: PLC0415
    from refsd.fp16fix.search import Search  # noqa: PLC0415
    from refsd.image import write_png  # noqa: PLC0415
    from refsd.numerics import Precision  # noqa: PLC0415
    from refsd.pipeline import Request  # noqa: PLC0415

    check_request_args(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    req = Request(args.prompt, args.negative_prompt, args.seed, args.steps, args.guidance, args.scheduler,
                  args.height, args.width)
    precision = Precision(args.precision, args.ftz, args.block, args.device_model)
    say = (lambda line: None) if args.quiet else (lambda line: print(f"fp16-fix: {line}", file=sys.stderr))
    search = Search(args.model, req, precision, rewrites=args.rewrites, gelu_approximate=args.gelu_approximate or "none",
                    min_psnr=args.min_psnr, max_reruns=args.max_reruns, progress=say)
    result = search.run()
    doc = make_recipe(search, result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    write_png(out / "reference.png", result.reference_image)
    write_png(out / "before.png", result.before.image)
    if result.after is not None:
        write_png(out / "after.png", result.after.image)
    lines = {"clean": "clean as declared: no fix needed (empty recipe)",
             "fixed": f"{len(result.chosen)} fix(es) make it clean",
             "budget": f"budget of {args.max_reruns} reruns spent before a clean fix",
             "unfixed": "no fix found: the recipe lists the best candidate"}
    print(f"{lines[result.status]}: {out / 'recipe.json'} ({result.reruns} reruns, {result.seconds:.1f} s)")
    for c in result.chosen:
        print(f"  {c.level:<9} {c.fix}   removes {c.event.kind} {c.event.op}/{c.event.primitive} at {c.event.where()}")
    if result.status not in ("clean", "fixed"):
        return EXIT_FAIL
    if not args.verify_gpu:
        return EXIT_OK
    from refsd_validate.fix_report import verify_on_gpu  # noqa: PLC0415

    fp32 = [f["token"] for f in doc["fixes"] if f["kind"] == "fp32"]
    if fp32:
        print(f"not verified on the GPU: {', '.join(fp32)} keep modules in fp32, which one .tflite on LiteRT's GPU "
              "accelerator cannot express (no per-op precision): run those modules on a CPU fallback")
        return EXIT_FAIL
    after = result.after.image if result.after is not None else result.before.image
    run = verify_on_gpu(Path(args.model), out, doc, {"reference": result.reference_image,
                                                     "before": result.before.image, "after": after})
    print(run.line if run.certificate is not None else
          f"GPU capture {'skipped' if run.skipped else 'failed'}: {run.line}")
    print(f"wrote {out / 'fp16_fix.html'}")
    return EXIT_OK if run.certificate is not None and run.certificate.certified else EXIT_FAIL


# ---------------------------------------------------------------- export, lint-gpu (TensorFlow only when run)


def _add_export(sub) -> None:
    from refsd.export.build import WEIGHTS  # noqa: PLC0415 (no TensorFlow at import)
    from refsd.trace import MODELS  # noqa: PLC0415
    from refsd.models.rewrites import DEFAULT_SERIAL_CONV_LIMIT  # noqa: PLC0415

    p = sub.add_parser(
        "export", help="export text encoder, UNet and VAE decoder to .tflite (from refsd's own model classes)",
        description="Trace refsd's models with TensorFlow twins of its ops at fixed shapes and convert each "
        "component with tf.lite.TFLiteConverter. Writes DIR/{text_encoder,unet,vae}.tflite and "
        "DIR/refsd_export.json (what was built, and which tensor holds each module's output). "
        "The UNet takes the timestep as an input (one file for every step); the VAE includes "
        "latents / scaling_factor.")
    p.add_argument("--model", required=True, metavar="DIR", help="diffusers-format folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--weights", choices=WEIGHTS, default="fp32",
                   help="fp32; fp16 (float16 constants + DEQUANTIZE); int8 (per-channel weight-only via "
                   "Optimize.DEFAULT: LiteRT's CPU kernels then also quantize activations)")
    p.add_argument("--rewrites", default="none",
                   help="none | paper | comma list of fc_as_conv, serial_conv, gn4d, gelu_clip, embedding_1d, "
                   "prune=AMOUNT[:MIN_WEIGHTS] (structured pruning of convs with >= MIN_WEIGHTS weights, default "
                   "4000000; recorded in refsd_export.json); int8_weights, part of 'paper', is the --weights choice here")
    p.add_argument("--serial-conv-limit", type=int, default=DEFAULT_SERIAL_CONV_LIMIT, metavar="N",
                   help=f"serial_conv's per-image activation limit in elements (default {DEFAULT_SERIAL_CONV_LIMIT}); "
                   "lint-gpu --max-conv-activation uses the same measure")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--component", action="append", choices=MODELS,
                   help="export only this component (repeatable; default all three)")
    p.add_argument("--gelu-approximate", choices=("none", "tanh"), default=None,
                   help="the GELU the graph computes: none (erf; default) or tanh")
    _add_recipe_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from refsd.export.build import export, graph_rewrites  # noqa: PLC0415
    from refsd.trace import MODELS  # noqa: PLC0415
    from refsd.models.rewrites import Rewrites  # noqa: PLC0415

    if args.serial_conv_limit < 1:
        raise ValueError(f"--serial-conv-limit must be >= 1, got {args.serial_conv_limit}")
    check_image_size(args.height, args.width)
    rewrites, gelu = _deployment(args)
    rw = graph_rewrites(rewrites, serial_conv_limit=args.serial_conv_limit)  # bad names: error before TF loads
    if "int8_weights" in Rewrites.parse(rewrites) and args.weights != "int8":
        print(f"refsd: note: int8_weights is a weight storage choice for export; the graph uses {rw}, "
              f"weights {args.weights} (use --weights int8 for int8 weights)", file=console.err())
    manifest = export(args.model, args.out, weights=args.weights, rewrites=rw, height=args.height,
                      width=args.width, components=tuple(args.component or MODELS), progress=not args.quiet,
                      gelu_approximate=gelu)
    for name, entry in manifest["components"].items():
        print(f"{args.out}/{entry['file']}: output {'x'.join(map(str, entry['output']))}, "
              f"{len(entry['tensors'])} module outputs mapped")
    return EXIT_OK


def _add_lint_gpu(sub) -> None:
    from refsd.export.lint import DEFAULT_MAX_FC_INPUT  # noqa: PLC0415
    from refsd.models.rewrites import DEFAULT_SERIAL_CONV_LIMIT  # noqa: PLC0415

    p = sub.add_parser(
        "lint-gpu", help="check a .tflite against the TFLite GPU delegate's op set and limits (exit 1 on findings)",
        description="Per-op findings: ops without a GPU kernel (BROADCAST_TO, ...), tensors of rank > 4, "
        "non-float runtime tensors, int8 hybrid weights, op-specific rules of the delegate, and device limits on "
        "activation size (FULLY_CONNECTED input, CONV_2D input/output, per image). Exit 0 clean, 1 findings, "
        "2 bad input.")
    p.add_argument("model", metavar="MODEL.tflite")
    p.add_argument("--max-fc-input", type=int, default=DEFAULT_MAX_FC_INPUT, metavar="N",
                   help=f"FULLY_CONNECTED input elements per image (default {DEFAULT_MAX_FC_INPUT}: the paper's "
                   "1x4096x320 failed)")
    p.add_argument("--max-conv-activation", type=int, default=DEFAULT_SERIAL_CONV_LIMIT, metavar="N",
                   help=f"CONV_2D input or output elements per image (default {DEFAULT_SERIAL_CONV_LIMIT}: the "
                   "paper's 1x32x32x1920 -> 640 failed)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_lint_gpu)


def _cmd_lint_gpu(args: argparse.Namespace) -> int:
    from refsd.export.lint import Limits, lint  # noqa: PLC0415

    for opt in ("max_fc_input", "max_conv_activation"):
        if getattr(args, opt) < 1:
            raise ValueError(f"--{opt.replace('_', '-')} must be a positive integer, got {getattr(args, opt)}")
    report = lint(args.model, Limits(args.max_fc_input, args.max_conv_activation))
    print(report.to_json() if args.json else report.table())
    return EXIT_OK if report.clean else EXIT_FAIL


# ---------------------------------------------------------------- golden


def _add_golden(sub) -> None:
    from refsd.golden import DEFAULT_DIR  # noqa: PLC0415

    p = sub.add_parser("golden", help="regenerate or verify the golden regression set (golden/)",
                       description="make: regenerate op vectors (per op and precision mode) and the tiny models' "
                       "expected traces, with a sha256 manifest. verify: fail on any changed, missing or unlisted "
                       "byte. Exit 0 ok, 1 verification failed, 2 bad input.")
    p.add_argument("action", choices=("make", "verify"))
    p.add_argument("--dir", default=str(DEFAULT_DIR), help=f"golden folder (default {DEFAULT_DIR})")
    p.set_defaults(func=_cmd_golden)


def _cmd_golden(args: argparse.Namespace) -> int:
    from refsd.golden import MANIFEST, make, manifest_entries, verify  # noqa: PLC0415

    root = Path(args.dir)
    if args.action == "make":
        make(root)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print(f"wrote {root}/ ({len(manifest_entries(root))} files, {size / 1e6:.2f} MB) and {MANIFEST}")
        return EXIT_OK
    problems = verify(root)
    for line in problems:
        print(f"FAIL {line}")
    print(f"{root}: {'verified' if not problems else f'{len(problems)} problem(s)'} "
          f"({len(manifest_entries(root))} files in {MANIFEST})")
    return EXIT_FAIL if problems else EXIT_OK


# ---------------------------------------------------------------- the table
# One entry per subcommand, in the order `refsd --help` lists them.

SUBCOMMANDS: list[Callable] = [_add_demo, _add_catalogue, _add_make_tiny, _add_generate, _add_fp16_check,
                               _add_fp16_fix, _add_export, _add_lint_gpu, _add_golden]


def build_parser() -> argparse.ArgumentParser:
    from refsd import __version__  # noqa: PLC0415

    return _build(PROG, "Numerics-grade NumPy reference of Stable Diffusion for mobile GPUs (TFLite / LiteRT).",
                  SUBCOMMANDS, version=__version__)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (``python -m refsd`` exits with it)."""
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
