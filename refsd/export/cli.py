"""``refsd export`` and ``refsd lint-gpu`` (registered by ``refsd.cli``).

TensorFlow is imported only when a command runs, so ``refsd --help`` stays fast
and works without the ``export`` extra."""

from __future__ import annotations

import argparse
import sys

from refsd.models.rewrites import DEFAULT_SERIAL_CONV_LIMIT, Rewrites


def add_export_parser(sub) -> None:
    from refsd.export.build import COMPONENTS, WEIGHTS  # noqa: PLC0415 (no TensorFlow at import)

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
    p.add_argument("--component", action="append", choices=COMPONENTS,
                   help="export only this component (repeatable; default all three)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from refsd.export.build import COMPONENTS, export, graph_rewrites  # noqa: PLC0415

    if args.serial_conv_limit < 1:
        raise ValueError(f"--serial-conv-limit must be >= 1, got {args.serial_conv_limit}")
    rw = graph_rewrites(args.rewrites, serial_conv_limit=args.serial_conv_limit)  # bad names: error before TF loads
    if "int8_weights" in Rewrites.parse(args.rewrites) and args.weights != "int8":
        print(f"refsd: note: int8_weights is a weight storage choice for export; the graph uses {rw}, "
              f"weights {args.weights} (use --weights int8 for int8 weights)", file=sys.stderr)
    manifest = export(args.model, args.out, weights=args.weights, rewrites=rw, height=args.height,
                      width=args.width, components=tuple(args.component or COMPONENTS), progress=not args.quiet)
    for name, entry in manifest["components"].items():
        print(f"{args.out}/{entry['file']}: output {'x'.join(map(str, entry['output']))}, "
              f"{len(entry['tensors'])} module outputs mapped")
    return 0


def add_lint_gpu_parser(sub) -> None:
    from refsd.export.lint import DEFAULT_MAX_FC_INPUT  # noqa: PLC0415

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

    report = lint(args.model, Limits(args.max_fc_input, args.max_conv_activation))
    print(report.to_json() if args.json else report.table())
    return 0 if report.clean else 1
