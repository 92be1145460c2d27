"""The ``certify`` subcommand's command line, kept free of heavy imports so
``refsd-validate --help`` and ``compare`` stay fast: the engine
(``certify.py``) is imported only when the command runs."""

from __future__ import annotations

import os
from pathlib import Path

from refsd.limits import real
from refsd_validate.tolerance import K

# Past twice the calibrated k a certificate stops saying "within the noise of a correct implementation":
# at k = 17.7 a +1 % bias on the UNet output certifies (refsd_validate.tolerance).
K_MAX = 2 * K
MAX_CACHE_GB = 1024.0

MODES = ("free", "teacher", "both")


def default_cache_dir() -> Path:
    """Reference reruns are cached here unless ``--cache`` says otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "refsd" / "certify"


def add_certify_parser(sub) -> None:
    p = sub.add_parser(
        "certify", help="certify a device capture bundle against the reference",
        description="Rerun the reference on the bundle's own inputs (free-running and teacher-forced), judge every "
        "tensor against k times its float16 noise floor (calibrated from the reference's own precision "
        "variants), localize the first failing tensor, and write certificate.json, report.html and Model Explorer "
        "node data. Exit 0 certified, 1 not certified, 2 bad input.")
    p.add_argument("bundle", metavar="BUNDLE", help="capture bundle: directory or .zip")
    p.add_argument("--model", required=True, metavar="DIR", help="the diffusers folder the capture was exported from")
    p.add_argument("--mode", choices=MODES, default="both", help="free-running, teacher-forced, or both (default)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--cache", metavar="DIR", help=f"reference rerun cache (default {default_cache_dir()})")
    p.add_argument("--cache-gb", type=float, default=4.0, metavar="GB",
                   help=f"keep at most this much in the cache, in (0, {MAX_CACHE_GB:g}], least recently used reruns "
                   "dropped first (default 4)")
    p.add_argument("--tflite", metavar="DIR", help="the export folder (refsd_export.json): Model Explorer node data "
                   "keyed by its TFLite tensor names instead of module paths")
    p.add_argument("--k", type=float, default=K,
                   help=f"tolerance in noise floors, in (0, {K_MAX:g}] (default {K:g}; see the certificate)")
    p.set_defaults(func=_cmd_certify)


def _cmd_certify(args) -> int:
    from refsd_validate.certify import certify, tflite_tensor_names, write_outputs  # noqa: PLC0415
    from refsd_validate.reader import BundleError  # noqa: PLC0415

    real(args.cache_gb, "--cache-gb", 0, MAX_CACHE_GB, open_lo=True)
    real(args.k, "--k", 0, K_MAX, open_lo=True)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out}: exists and is not a directory")
    names = tflite_tensor_names(args.tflite) if args.tflite else None
    cert = certify(args.bundle, args.model, mode=args.mode, cache_dir=args.cache, k=args.k,
                   cache_budget=int(args.cache_gb * (1 << 30)))
    write_outputs(cert, out, names)
    f = cert.first_failure
    if cert.certified:
        print(f"CERTIFIED: every tensor within k={args.k:g} noise floors ({len(cert.results)} checks); {out}/")
        return 0
    where = (f"{f.name} ({f.mode}; stage {f.stage}" + (f", step {f.step}" if f.step is not None else "")
             + (f", module {f.module_path}" if f.module_path else "") + f"): {', '.join(f.verdict.failed)}, "
             f"needs k={f.verdict.k_needed:.3g}") if f is not None else \
        next(c["tensor"] + ": " + c["detail"] for c in cert.exact_checks if not c["passed"])
    print(f"NOT CERTIFIED: first failing tensor {where}; {out}/")
    return 1
