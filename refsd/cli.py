"""The ``refsd`` command line.

    refsd demo [--out DIR]
    refsd catalogue [--json FILE] [--case NAME ...]
    refsd make-tiny DIR --arch sd15|sd21 --seed N
    refsd generate --model DIR --prompt TEXT --out IMAGE.png [--trace TRACE.npz] ...
    refsd fp16-check --model DIR --prompt TEXT [--json FILE] [--fail-on KINDS] ...

Exit codes: 0 success, 1 the check ran and failed, 2 bad usage or input
(one line on stderr, ``refsd: error: ...``, never a traceback).

Adding a subcommand (``make-tiny``, ``generate``, ``fp16-check``): write an
``_add_<name>(sub)`` that adds its parser with ``sub.add_parser(...)`` and sets
``func=_cmd_<name>``, a function ``(args) -> int`` returning the exit code,
and append ``_add_<name>`` to ``SUBCOMMANDS``. Raise ``ValueError``,
``FileNotFoundError`` or ``OSError`` for bad input: ``main`` turns them into
a one-line error and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
PROG = "refsd"


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and name the help to read."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {_one_line(message)} (see '{self.prog} --help')\n")


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split())


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
    from refsd.catalogue import run_catalogue

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


# ---------------------------------------------------------------- registry
# One entry per subcommand, in the order `refsd --help` lists them.

def _add_make_tiny(sub) -> None:
    from refsd.tiny import add_make_tiny_parser

    add_make_tiny_parser(sub)


def _add_generate(sub) -> None:
    from refsd.cli_pipeline import add_generate

    add_generate(sub)


def _add_fp16_check(sub) -> None:
    from refsd.cli_pipeline import add_fp16_check

    add_fp16_check(sub)


def _add_demo(sub) -> None:
    from refsd.demo import add_demo_parser

    add_demo_parser(sub)


def _add_export(sub) -> None:
    from refsd.export.cli import add_export_parser  # noqa: PLC0415

    add_export_parser(sub)


def _add_lint_gpu(sub) -> None:
    from refsd.export.cli import add_lint_gpu_parser  # noqa: PLC0415

    add_lint_gpu_parser(sub)


def _add_golden(sub) -> None:
    from refsd.golden import add_golden_parser  # noqa: PLC0415

    add_golden_parser(sub)


SUBCOMMANDS: list[Callable] = [_add_demo, _add_catalogue, _add_make_tiny, _add_generate, _add_fp16_check,
                               _add_export, _add_lint_gpu, _add_golden]


def build_parser() -> argparse.ArgumentParser:
    from refsd import __version__

    parser = _Parser(
        prog=PROG,
        description="Numerics-grade NumPy reference of Stable Diffusion for mobile GPUs (TFLite / LiteRT).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (``python -m refsd`` exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        if isinstance(e, BrokenPipeError):  # `refsd catalogue | head`: not an error of ours
            return EXIT_FAIL
        msg = e.strerror if isinstance(e, OSError) and e.strerror and e.filename else e
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        print(f"{PROG}: error: {where}{_one_line(msg)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
