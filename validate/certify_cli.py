"""The ``certify`` subcommand's command line, kept free of heavy imports so
``refsd-validate --help`` and ``compare`` stay fast: the engine
(``certify.py``) is imported only when the command runs."""

from __future__ import annotations

import sys
from pathlib import Path

from refsd_validate.tolerance import K, MAX_K

MODES = ("free", "teacher", "both")  # certify.MODES, kept here so --help needs no engine import


def add_certify_parser(sub) -> None:
    p = sub.add_parser(
        "certify", help="certify a device capture bundle against the reference",
        description="Rerun the reference on the bundle's own inputs (free-running and teacher-forced), judge every "
        "tensor against k times its float16 noise floor (calibrated from the reference's own precision "
        "variants), localize the first failing tensor, and write certificate.json, report.html and Model Explorer "
        "node data. Exit 0 certified, 1 not certified, 2 bad input.")
    p.add_argument("bundle", metavar="BUNDLE", help="capture bundle: directory or .zip")
    p.add_argument("--model", required=True, metavar="DIR", help="the diffusers folder the capture was exported from")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    _add_common(p)
    p.set_defaults(func=_cmd_certify)


def add_fleet_parser(sub) -> None:
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
    _add_common(p)
    p.set_defaults(func=_cmd_fleet)


def _add_common(p) -> None:
    """The options 'certify' and 'certify-fleet' share."""
    p.add_argument("--mode", choices=MODES, default="both", help="free-running, teacher-forced, or both (default)")
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


def _options(args) -> dict:
    """The shared options, checked, as ``certify`` / ``certify_fleet`` keywords."""
    import math  # noqa: PLC0415

    from refsd_validate.certify import CostGate  # noqa: PLC0415
    from refsd_validate.reader import BundleError  # noqa: PLC0415

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


def _cmd_certify(args) -> int:
    from refsd_validate.certify import certify, tflite_tensor_names, write_outputs  # noqa: PLC0415

    options = _options(args)
    names = tflite_tensor_names(args.tflite) if args.tflite else None
    cert = certify(args.bundle, args.model, **options)
    out = Path(args.out)
    write_outputs(cert, out, names)
    for line in summary_lines(cert, args.k, out):
        print(line)
    if not cert.certified:
        return 1
    return 3 if cert.cost_gate_failed else 0


def _cmd_fleet(args) -> int:
    from refsd_validate.fleet import certify_fleet  # noqa: PLC0415
    from refsd_validate.reader import BundleError  # noqa: PLC0415

    if not 1 <= args.workers <= 64:
        raise BundleError(f"--workers must be in 1..64, got {args.workers}")
    options = _options(args)
    entries, counts = certify_fleet(args.bundles, args.model, args.out, dask=args.dask, workers=args.workers,
                                    **options)
    for e in entries:
        first = e.certificate.first_failure
        print(f"{'CERTIFIED' if e.certificate.certified else 'NOT CERTIFIED'}: {e.bundle} [{e.device}; {e.request}]"
              + (f": first failing tensor {first.name} ({first.mode})" if first else ""))
    print(f"{sum(e.certificate.certified for e in entries)} of {len(entries)} certified; {counts['reruns_run']} "
          f"distinct reruns for {counts['reruns_needed']} needed; {args.out}/fleet.html")
    if not all(e.certificate.certified for e in entries):
        return 1
    return 3 if any(e.certificate.cost_gate_failed for e in entries) else 0


def summary_lines(cert, k: float, out: Path) -> list[str]:
    """The CLI's report: the verdict first, with the cause an exact check gives
    when one explains the failure; then what was not judged, calibration
    variants that overflowed, and the deployment's cost."""
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
        where = (f"{f.name} ({f.mode}; stage {f.stage}" + (f", step {f.step}" if f.step is not None else "")
                 + (f", module {f.module_path}" if f.module_path else "") + f"): {', '.join(f.verdict.failed)}, "
                 f"needs k={f.verdict.k_needed:.3g}")
        lines = [f"NOT CERTIFIED: first failing tensor {where}; {out}/"]
    if f is not None and "calibration_overflow" in f.verdict.failed and cert.calibration_overflows:
        o = cert.calibration_overflows[0]
        lines.append(f"  the declared precision overflows here: calibration variant {o['variant']} first at "
                     f"{o['op']} (stage {o['stage']}, step {o['step']}); a finite device did not compute as declared")
    not_checked = [c for c in cert.exact_checks if not c.get("checked", True)]
    for c in not_checked:
        lines.append(f"  {c['tensor']}: {c['detail']}")
    if cert.unknown_intermediates:
        lines.append(f"  {len(cert.unknown_intermediates)} intermediates not judged (the reference does not record "
                     "them; see certificate.json not_judged, 'refsd-validate names')")
    if cert.not_observable:
        lines.append(f"  {len(cert.not_observable)} intermediates not judged (not observable on this device)")
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
