"""The ``refsd-validate`` command line.

    refsd-validate compare REF.npy TEST.npy [--atol A] [--rtol R]
                   [--check-mode elemwise|max|mean|median|quantile] [--quantile Q] [--json]

Exit codes: 0 the comparison passed, 1 it failed, 2 bad input (missing file,
not an .npy, pickled payload, shape mismatch, non-floating dtype, bad option),
reported as one line on stderr, never a traceback.

Tensors are read with ``np.load(allow_pickle=False)`` after checking the NumPy
magic: pickles (bare, or object arrays inside an .npy) are refused, never
executed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import NoReturn, Sequence

import numpy as np

from refsd.safe_io import load_npy as safe_load_npy
from refsd_validate.compare import CHECK_MODES, DEFAULT_ATOL, DEFAULT_QUANTILE, DEFAULT_RTOL, compare
from refsd_validate.reader import MAX_TENSOR_BYTES  # the same bound as a capture bundle's tensors

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2
PROG = "refsd-validate"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{PROG}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def load_npy(path: str | Path) -> np.ndarray:
    """Load one array from an .npy file, refusing anything that is not one
    (``refsd.safe_io.load_npy``: header and size checked before any allocation).

    Raises ``ValueError`` with a one-line message naming the file."""
    return safe_load_npy(path, max_bytes=MAX_TENSOR_BYTES)


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
    for opt in ("atol", "rtol"):  # the library takes inf (Polygraphy's "ignore"); from a command line it is absurd
        value = getattr(args, opt)
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"--{opt} must be a finite number >= 0, got {value!r}")
    ref, test = load_npy(args.ref), load_npy(args.test)
    result = compare(ref, test, atol=args.atol, rtol=args.rtol, check_mode=args.check_mode,
                     quantile=args.quantile, name=Path(args.test).name)
    if args.json:
        print(json.dumps({"ref": str(args.ref), "test": str(args.test), **result.to_dict()}, indent=2))
    else:
        print(f"ref  {args.ref}\ntest {args.test}")
        print(result.summary())
    return EXIT_PASS if result.passed else EXIT_FAIL


def _add_certify(sub) -> None:
    from refsd_validate.certify_cli import add_certify_parser, add_fleet_parser  # noqa: PLC0415

    add_certify_parser(sub)
    add_fleet_parser(sub)


def _add_capture(sub) -> None:
    from refsd_validate.capture import add_capture_parser  # noqa: PLC0415

    add_capture_parser(sub)


def _add_check_and_names(sub) -> None:
    from refsd_validate.bundle_check import add_parsers  # noqa: PLC0415

    add_parsers(sub)


# Further subcommands are registered here.
SUBCOMMANDS = [_add_compare, _add_certify, _add_capture, _add_check_and_names]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Validate tensors from a device against the refsd reference.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error (already printed)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    try:
        return args.func(args)
    except BrokenPipeError:
        return EXIT_FAIL
    except (ValueError, FileNotFoundError, OSError) as e:
        if isinstance(e, OSError) and e.filename and e.strerror:
            msg = f"{e.filename}: {e.strerror}"
        else:
            msg = " ".join(str(e).split())
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
