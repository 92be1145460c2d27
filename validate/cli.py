"""The ``refsd-validate`` command line.

    refsd-validate compare REF.npy TEST.npy [--atol A] [--rtol R]
                   [--check-mode elemwise|max|mean|median|quantile] [--quantile Q] [--json]
    refsd-validate certify BUNDLE --model DIR --out DIR [--mode free|teacher|both] [--tflite DIR] ...
    refsd-validate capture --tflite DIR --model DIR --prompt TEXT --out BUNDLE [--accelerator cpu|gpu] ...
    refsd-validate check BUNDLE [--model DIR]
    refsd-validate names --model DIR [--steps N] [--height H] [--width W] [--json]

Exit codes (``refsd.arguments``): 0 pass / certified, 1 failed / not
certified, 2 bad input (missing file, not an .npy, pickled payload, shape
mismatch, non-floating dtype, malformed bundle, bad option), reported as one
line on stderr, never a traceback; certify: 3 certified but the deployment
costs more than ``--max-deployment-cost`` allows.

Tensors are read with ``refsd.safe_io.load_npy`` (NumPy magic and header
checked, ``np.load(allow_pickle=False)``): pickles (bare, or object arrays
inside an .npy) are refused, never executed.

Adding a subcommand: ``_add_<name>(sub)`` adds its parser and sets
``func=_cmd_<name>``; append it to ``SUBCOMMANDS``. The engines (certify,
capture) are imported when their command runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from refsd_validate.compare import CHECK_MODES, DEFAULT_ATOL, DEFAULT_QUANTILE, DEFAULT_RTOL
from refsd_validate.declarations import declared_stage

from refsd.arguments import EXIT_FAIL, EXIT_OK, add_prompt_args, check_request_args, run
from refsd.arguments import build_parser as _build

PROG = "refsd-validate"
EXIT_COST_GATE = 3  # certify: the device certifies, the deployment fails --max-deployment-cost


# ---------------------------------------------------------------- compare


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare a test tensor against a reference tensor (Polygraphy semantics)",
        description="Compare TEST against REF: an element fails only if |test - ref| > atol AND "
        "|test - ref| > rtol * |ref|; NaN and unmatched inf always fail. Prints error statistics, "
        "the tolerances that would have passed, cosine similarity, fp16 ULP distance and, for "
        "references in [0, 1], PSNR. Exit 0 pass, 1 fail, 2 bad input.",
    )
    p.add_argument("ref", metavar="REF.npy", help="reference tensor (.npy)")
    p.add_argument("test", metavar="TEST.npy", help="tensor under test (.npy), same shape")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"absolute tolerance (default {DEFAULT_ATOL:g})")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"relative tolerance (default {DEFAULT_RTOL:g})")
    p.add_argument("--check-mode", choices=CHECK_MODES, default="elemwise",
                   help="statistic checked against the tolerances (default elemwise)")
    p.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE,
                   help=f"quantile for --check-mode quantile, in [0, 1] (default {DEFAULT_QUANTILE:g})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from refsd_validate.compare import compare  # noqa: PLC0415

    from refsd.safe_io import load_npy  # noqa: PLC0415

    for opt in ("atol", "rtol"):  # the library takes inf (Polygraphy's "ignore"); from a command line it is absurd
        value = getattr(args, opt)
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"--{opt} must be a finite number >= 0, got {value!r}")
    ref, test = load_npy(args.ref), load_npy(args.test)  # at most a bundle tensor's size each
    result = compare(ref, test, atol=args.atol, rtol=args.rtol, check_mode=args.check_mode,
                     quantile=args.quantile, name=Path(args.test).name)
    if args.json:
        print(json.dumps({"ref": str(args.ref), "test": str(args.test), **result.to_dict()}, indent=2))
    else:
        print(f"ref  {args.ref}\ntest {args.test}")
        print(result.summary())
    return EXIT_OK if result.passed else EXIT_FAIL


# ---------------------------------------------------------------- certify


def _add_certify(sub) -> None:
    p = sub.add_parser(
        "certify", help="certify a device capture bundle against the reference",
        description="Rerun the reference on the bundle's own inputs (free-running and teacher-forced), judge every "
        "tensor against k times its float16 noise floor (calibrated from the reference's own precision "
        "variants), localize the first failing tensor, and write certificate.json, report.html and Model Explorer "
        "node data. Exit 0 certified, 1 not certified, 2 bad input.")
    p.add_argument("bundle", metavar="BUNDLE", help="capture bundle: directory or .zip")
    p.add_argument("--model", required=True, metavar="DIR", help="the diffusers folder the capture was exported from")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    _add_certify_options(p)
    p.set_defaults(func=_cmd_certify)


def _add_certify_fleet(sub) -> None:
    p = sub.add_parser(
        "certify-fleet", help="certify many capture bundles of one model, reruns shared and run on Dask",
        description="Certify each bundle as 'certify' does, the reference reruns run as Dask tasks keyed by their "
        "content hash: identical reruns (the calibration of bundles of one request) run once, independent ones in "
        "parallel. Writes one certificate folder per bundle, fleet.json and fleet.html (devices x requests). "
        "Exit 0 all certified, 1 any not certified, 2 bad input (any bundle), 3 all certified but a deployment "
        "fails --max-deployment-cost.")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="capture bundles: directories or .zip")
    p.add_argument("--model", required=True, metavar="DIR", help="the diffusers folder the captures were exported from")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--dask", metavar="ADDRESS", help="a running Dask scheduler (tcp://host:8786) whose workers see "
                   "--model and --cache (default: a local cluster of --workers processes)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="local cluster size, 1 to 64 (default 2)")
    _add_certify_options(p)
    p.set_defaults(func=_cmd_certify_fleet)


def _add_certify_options(p) -> None:
    """The options 'certify' and 'certify-fleet' share."""
    from refsd_validate.certify import RUN_MODES  # noqa: PLC0415
    from refsd_validate.tolerance import MAX_K, K  # noqa: PLC0415

    p.add_argument("--mode", choices=RUN_MODES, default="both", help="free-running, teacher-forced, or both (default)")
    p.add_argument("--cache", metavar="DIR", help="reference rerun cache (default $XDG_CACHE_HOME/refsd/certify)")
    p.add_argument("--cache-gb", type=float, default=8.0, metavar="GB",
                   help="keep at most this much in the cache, least recently used reruns dropped first (default 8)")
    p.add_argument("--tflite", metavar="DIR", help="the export folder the bundle ran (refsd_export.json + .tflite, "
                   "matched by sha256): int8 weights and scales are read from its .tflite files, and Model Explorer "
                   "node data is keyed by its TFLite tensor names instead of module paths")
    p.add_argument("--k", type=float, default=K, help=f"tolerance in noise floors, in (0, {MAX_K:g}] (default {K:g}; "
                   "see the certificate)")
    p.add_argument("--strict", action="store_true", help="refuse intermediates the reference does not record "
                   "(default: list them in the certificate and skip them)")
    p.add_argument("--max-deployment-cost", metavar="psnr:DB|rel:X", help="also gate what the deployment costs "
                   "against the original fp32 model: image PSNR at least DB, or worst boundary tensor relative error "
                   "at most X; exit 3 when the device certifies but the deployment fails the gate")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")


def _certify_options(args: argparse.Namespace) -> dict:
    """The shared options, checked, as ``certify`` / ``certify_fleet`` keywords."""
    from refsd_validate.bundle import BundleError  # noqa: PLC0415
    from refsd_validate.certify import CostGate  # noqa: PLC0415
    from refsd_validate.tolerance import MAX_K  # noqa: PLC0415

    if not (math.isfinite(args.cache_gb) and 0 < args.cache_gb <= 1024):
        raise BundleError(f"--cache-gb must be in (0, 1024], got {args.cache_gb:g}")
    if not (math.isfinite(args.k) and 0 < args.k <= MAX_K):
        raise BundleError(f"--k must be in (0, {MAX_K:g}], got {args.k:g}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out}: exists and is not a directory")
    gate = CostGate.parse(args.max_deployment_cost) if args.max_deployment_cost is not None else None
    return {"mode": args.mode, "cache_dir": args.cache, "k": args.k, "cache_budget": int(args.cache_gb * (1 << 30)),
            "tflite_dir": args.tflite, "strict": args.strict, "max_deployment_cost": gate,
            "progress": not args.quiet and sys.stderr.isatty()}


def _cmd_certify(args: argparse.Namespace) -> int:
    from refsd_validate.certify import certify, tflite_tensor_names, write_outputs  # noqa: PLC0415

    options = _certify_options(args)
    names = tflite_tensor_names(args.tflite) if args.tflite else None
    cert = certify(args.bundle, args.model, **options)
    out = Path(args.out)
    write_outputs(cert, out, names)
    for line in summary_lines(cert, args.k, out):
        print(line)
    if not cert.certified:
        return EXIT_FAIL
    return EXIT_COST_GATE if cert.cost_gate_failed else EXIT_OK


def _cmd_certify_fleet(args: argparse.Namespace) -> int:
    from refsd_validate.bundle import BundleError  # noqa: PLC0415
    from refsd_validate.fleet import certify_fleet  # noqa: PLC0415

    if not 1 <= args.workers <= 64:
        raise BundleError(f"--workers must be in 1..64, got {args.workers}")
    options = _certify_options(args)
    entries, counts = certify_fleet(args.bundles, args.model, args.out, dask=args.dask, workers=args.workers,
                                    **options)
    for e in entries:
        first = e.certificate.first_failure
        print(f"{'CERTIFIED' if e.certificate.certified else 'NOT CERTIFIED'}: {e.bundle} [{e.device}; {e.request}]"
              + (f": first failing tensor {first.name} ({first.mode})" if first else ""))
    print(f"{sum(e.certificate.certified for e in entries)} of {len(entries)} certified; {counts['reruns_run']} "
          f"distinct reruns for {counts['reruns_needed']} needed; {args.out}/fleet.html")
    if not all(e.certificate.certified for e in entries):
        return EXIT_FAIL
    return EXIT_COST_GATE if any(e.certificate.cost_gate_failed for e in entries) else EXIT_OK


def summary_lines(cert, k: float, out: Path) -> list[str]:
    """certify's report on the terminal: the verdict first, with the cause an
    exact check gives when one explains the failure; then what was not judged,
    calibration runs that overflowed, and the deployment's cost."""
    f = cert.first_failure
    exact_bad = [c for c in cert.exact_checks if not c["passed"]]
    if cert.certified:
        lines = [f"CERTIFIED: every tensor within k={k:g} noise floors ({len(cert.results)} checks); {out}/"]
    elif exact_bad:  # a wrong token id or timestep explains every numeric failure after it
        c = exact_bad[0]
        lines = [f"NOT CERTIFIED: {c['tensor']}: {c['detail']}; {out}/"]
    elif cert.hint:
        lines = [f"NOT CERTIFIED: {cert.hint}; {out}/"]
    else:
        where = (f"{f.name} ({f.mode}; stage {declared_stage(f.stage)}"
                 + (f", step {f.step}" if f.step is not None else "")
                 + (f", module {f.module_path}" if f.module_path else "") + f"): {', '.join(f.verdict.failed)}, "
                 f"needs k={f.verdict.k_needed:.3g}")
        lines = [f"NOT CERTIFIED: first failing tensor {where}; {out}/"]
    o = cert.overflow_before_failure
    if o is not None:
        where = f"{o['op']} (stage {o['stage']}, step {o['step']})" if o["op"] else o["detail"]
        if "calibration_overflow" in f.verdict.failed:
            lines.append(f"  the declared precision overflows here: calibration variant {o['variant']} first at "
                         f"{where}; a finite device did not compute as declared")
        else:
            lines.append(f"  the deployment overflows fp16 before this tensor in calibration variant {o['variant']}, "
                         f"first at {where}: a device computing as declared can fail here too, so this may be the "
                         "model's fp16 headroom, not the device ('refsd fp16-check' shows the op)")
    not_checked = [c for c in cert.exact_checks if not c.get("checked", True)]
    for c in not_checked:
        lines.append(f"  {c['tensor']}: {c['detail']}")
    if cert.unknown_intermediates:
        lines.append(f"  {len(cert.unknown_intermediates)} intermediates not judged (the reference does not record "
                     "them; see certificate.json not_judged, 'refsd-validate names')")
    if cert.not_observable:
        lines.append(f"  {len(cert.not_observable)} intermediates not judged (not observable on this device)")
    res = cert.resolution
    if res is not None:
        weak = " (weak: a 1 % gain error at one step can pass)" if res["gain_every_step"] > 0.01 else ""
        lines.append(f"resolution: a gain error on the UNet output is rejected above {res['gain_every_step']:.2%} at "
                     f"any step, above {res['gain_best_step']:.2%} at the best-resolved step{weak}")
    if cert.declaration_cost is not None:
        lines.append(f"  {cert.declaration_cost['statement']}")
    rc = cert.provenance.get("rerun_cache")
    if rc:
        lines.append(f"rerun cache: {rc['hits']} hits, {rc['misses']} reruns ({rc['hit_rate']:.0%} hit rate), "
                     f"{rc['bytes_after'] / 2**30:.2f} of {rc['budget_bytes'] / 2**30:.0f} GiB used, {rc['evicted']} evicted")
    cost = cert.deployment_cost
    if cost:
        gate = cost.get("gate")
        verdict = "" if gate is None else (" (within" if gate["passed"] else " (FAILS") + \
            f" --max-deployment-cost {gate['kind']}:{gate['limit']:g})"
        lines.append(f"deployment cost ({cost['deployment']} vs {cost['original']}): image PSNR "
                     f"{cost['image_psnr_db']:.1f} dB, worst relative error {cost['worst_rel_peak']:.3g}"
                     f" at {cost['worst_tensor']}{verdict}")
    return lines


# ---------------------------------------------------------------- capture


def _add_capture(sub) -> None:
    from refsd_validate.capture import ACCELERATORS, PRECISIONS  # noqa: PLC0415
    from refsd_validate.capture_gpu import GPU_PRECISIONS  # noqa: PLC0415

    p = sub.add_parser(
        "capture", help="run exported .tflite files with LiteRT and write a capture bundle",
        description="Run the text encoder, UNet (every step) and VAE exported by 'refsd export' with LiteRT's "
        "Interpreter through refsd's pipeline loop (same tokenizer, seeded noise, scheduler, guidance) and "
        "write a capture bundle (capture.json + .npy tensors).")
    p.add_argument("--tflite", required=True, metavar="DIR", help="folder written by 'refsd export'")
    p.add_argument("--model", required=True, metavar="DIR", help="the diffusers folder it was exported from")
    add_prompt_args(p)
    p.add_argument("--out", required=True, metavar="BUNDLE", help="bundle directory to write")
    p.add_argument("--delegate", metavar="LIB.so", help="external delegate library to load")
    p.add_argument("--delegate-precision", choices=PRECISIONS, help="the delegate's precision (required with "
                   "--delegate; recorded in the bundle)")
    p.add_argument("--accelerator", choices=ACCELERATORS, default="cpu",
                   help="cpu (default): LiteRT's Interpreter; gpu: LiteRT's GPU accelerator (WebGPU on the "
                   "machine's Vulkan driver), the adapter recorded as reported")
    p.add_argument("--gpu-precision", choices=tuple(GPU_PRECISIONS), default="fp16",
                   help="with --accelerator gpu: fp16 (default) or fp32 kernels")
    p.add_argument("--allow-cpu-fallback", action="store_true",
                   help="with --accelerator gpu: capture even if some ops fall back to the CPU (recorded per "
                   "component); without it such a component is refused")
    p.add_argument("--intermediates", action="store_true", help="also capture every module output the export maps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_capture)


def _cmd_capture(args: argparse.Namespace) -> int:
    from refsd_validate.capture import capture  # noqa: PLC0415
    from refsd_validate.capture_gpu import divert_native_stderr  # noqa: PLC0415

    from refsd.export.build import read_manifest  # noqa: PLC0415
    from refsd.pipeline import Request  # noqa: PLC0415

    check_request_args(args)
    manifest = read_manifest(args.tflite)
    req = Request(args.prompt, args.negative_prompt, args.seed, args.steps, args.guidance, args.scheduler,
                  manifest["height"], manifest["width"])
    if args.accelerator == "cpu" and args.allow_cpu_fallback:
        raise ValueError("--allow-cpu-fallback applies to --accelerator gpu only")
    if args.accelerator == "gpu":
        divert_native_stderr()
    out = capture(args.tflite, args.model, req, args.out, delegate=args.delegate, intermediates=args.intermediates,
                  delegate_precision=args.delegate_precision, accelerator=args.accelerator,
                  gpu_precision=args.gpu_precision, allow_cpu_fallback=args.allow_cpu_fallback,
                  progress=not args.quiet)
    print(f"wrote capture bundle {out}")
    return EXIT_OK


# ---------------------------------------------------------------- check, names


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="check a bundle without rerunning anything",
                       description="Read a capture bundle as certify would (schema, files, sha256, dtypes, shapes "
                       "against the model) and say what certify will and will not compare. Exit 0 or 2.")
    p.add_argument("bundle", metavar="BUNDLE", help="capture bundle: directory or .zip")
    p.add_argument("--model", metavar="DIR", help="the diffusers folder it was captured from")
    p.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    from refsd_validate.bundle_check import check_bundle  # noqa: PLC0415

    for line in check_bundle(args.bundle, args.model):
        print(line)
    print("OK: certify can run on this bundle")
    return EXIT_OK


def _add_names(sub) -> None:
    p = sub.add_parser("names", help="list the tensor names the reference records for a model",
                       description="Every boundary tensor and module output the reference records, with shape, "
                       "layout and meaning: the names a bundle from any runtime uses. Runs one denoising step.")
    p.add_argument("--model", required=True, metavar="DIR", help="diffusers folder")
    p.add_argument("--steps", type=int, default=1, help="steps of the request (names repeat per step; default 1)")
    p.add_argument("--height", type=int, default=512, help="image height (default 512)")
    p.add_argument("--width", type=int, default=512, help="image width (default 512)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_names)


def _cmd_names(args: argparse.Namespace) -> int:
    from refsd_validate.bundle import BundleError  # noqa: PLC0415

    from refsd.names import recorded_names  # noqa: PLC0415

    if not 1 <= args.steps <= 1000:
        raise BundleError(f"--steps must be in [1, 1000], got {args.steps}")
    for opt in ("height", "width"):
        v = getattr(args, opt)
        if not 8 <= v <= 4096:
            raise BundleError(f"--{opt} must be in [8, 4096], got {v}")
    if not (Path(args.model) / "model_index.json").is_file():
        raise BundleError(f"--model {args.model}: not a diffusers folder (no model_index.json)")
    infos = recorded_names(args.model, steps=args.steps, height=args.height, width=args.width)
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=1))
        return EXIT_OK
    for i in infos:
        print(f"{i.name}\t{'x'.join(map(str, i.shape))}\t{i.layout}\t{i.meaning}")
    return EXIT_OK


# ---------------------------------------------------------------- the table
# One entry per subcommand, in the order `refsd-validate --help` lists them.

SUBCOMMANDS = [_add_compare, _add_certify, _add_certify_fleet, _add_capture, _add_check, _add_names]


def build_parser() -> argparse.ArgumentParser:
    return _build(PROG, "Validate tensors from a device against the refsd reference.", SUBCOMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
