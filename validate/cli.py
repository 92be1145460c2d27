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
import sys
from pathlib import Path
from typing import NoReturn, Sequence

import numpy as np

from refsd_validate.compare import CHECK_MODES, DEFAULT_ATOL, DEFAULT_QUANTILE, DEFAULT_RTOL, compare

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2
PROG = "refsd-validate"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{PROG}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def load_npy(path: str | Path) -> np.ndarray:
    """Load one array from an .npy file, refusing anything that is not one.

    Raises ``FileNotFoundError`` or ``ValueError`` with a one-line message."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise ValueError(f"{p}: is a directory, expected an .npy file")
    with open(p, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if magic.startswith(_ZIP_MAGIC):
        raise ValueError(f"{p}: is a zip archive (.npz?), expected a single-array .npy file")
    if magic[:1] == b"\x80":
        raise ValueError(f"{p}: is a Python pickle; refused (pickled data is never loaded)")
    if magic != _NPY_MAGIC:
        raise ValueError(f"{p}: not an .npy file (no NumPy magic header)")
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise ValueError(f"{p}: holds a pickled object array; refused (pickled data is never loaded)") from None
        raise ValueError(f"{p}: not a valid .npy file ({' '.join(str(e).split())})") from None
    except EOFError:
        raise ValueError(f"{p}: truncated .npy file") from None
    return arr


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
    from refsd_validate.certify_cli import add_certify_parser  # noqa: PLC0415

    add_certify_parser(sub)


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
