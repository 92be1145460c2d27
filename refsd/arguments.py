"""Command-line plumbing shared by ``refsd`` (``refsd.cli``) and
``refsd-validate`` (``refsd_validate.cli``): the exit-code contract, a parser
whose usage errors are one line, the runner that turns bad input into one
line and exit 2, and the request options every command that runs a pipeline
takes.

Exit codes: 0 success, 1 the check ran and failed, 2 bad usage or input (one
line on stderr, ``PROG: error: ...``, never a traceback). A command is a
function ``(args) -> int`` set as the parser's ``func``; it raises
``ValueError``, ``FileNotFoundError`` or ``OSError`` for bad input.
"""

from __future__ import annotations

import argparse
import traceback
from typing import Callable, Iterable, NoReturn, Sequence

from refsd import console
from refsd.limits import check_request

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130
EXIT_CRASH = 70  # EX_SOFTWARE: an internal error (a bug), reported with its traceback


def one_line(msg: object) -> str:
    return " ".join(str(msg).split())


class OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line, exit 2, and name the help to read."""

    def error(self, message: str) -> NoReturn:
        prog = self.prog.split()[0]
        self.exit(EXIT_USAGE, f"{prog}: error: {one_line(message)} (see '{self.prog} --help')\n")


def build_parser(prog: str, description: str, commands: Iterable[Callable], *,
                 version: str | None = None) -> argparse.ArgumentParser:
    """A parser with one subcommand per entry of ``commands``: each is called
    with the subparsers object and adds its parser (``sub.add_parser``)."""
    parser = OneLineParser(prog=prog, description=description)
    if version is not None:
        parser.add_argument("--version", action="version", version=f"{prog} {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)
    for add in commands:
        add(sub)
    for command in sub.choices.values():
        command.add_argument("--verbose", action="store_true",
                             help="let TensorFlow, LiteRT, absl and transformers print their own logs (by default "
                             "captured, and shown only under an error)")
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the chosen command with the libraries' output
    captured (``refsd.console``; ``argv`` None: a command-line process, kept
    captured to its end); returns the exit code."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    with console.captured(parser.prog, verbose=args.verbose, keep=argv is None) as cap:
        rc, line, crash = _call(parser.prog, args)
    if line is not None:
        if cap.text.strip() and crash is None:  # bad input stays one line: the libraries' output is in a file
            line += f" (what the libraries printed before it: {console.save_log(cap.text)})"
        print(line, file=console.err())
    if crash is not None:
        for context in console.context_lines(cap.text):
            print(context, file=console.err())
        print("".join(traceback.format_exception(crash)).rstrip(), file=console.err())
    return rc


def _call(prog: str, args: argparse.Namespace) -> tuple[int, str | None, BaseException | None]:
    """(exit code, refsd's error line if the command failed, the exception if it was unexpected)."""
    try:
        return args.func(args), None, None
    except (ValueError, FileNotFoundError, OSError) as e:
        if isinstance(e, BrokenPipeError):  # `refsd catalogue | head`: not an error of ours
            return EXIT_FAIL, None, None
        msg = e.strerror if isinstance(e, OSError) and e.strerror and e.filename else e
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        return EXIT_USAGE, f"{prog}: error: {where}{one_line(msg)}", None
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED, f"{prog}: interrupted", None
    except Exception as e:  # noqa: BLE001 (a bug: its traceback is printed after the libraries' output)
        return EXIT_CRASH, f"{prog}: internal error: {type(e).__name__}: {one_line(e)} (a bug in {prog}; the " \
            "libraries' output and the traceback follow)", e


# ---------------------------------------------------------------- request options


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """The request fields every command that runs a pipeline takes (refsd
    generate and fp16-check, refsd-validate capture)."""
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", choices=("ddim", "euler", "dpm++2m"), default=None,
                   help="default: the folder's scheduler class (SD 1.5 ships PNDM, which refsd does not implement)")


def check_request_args(args: argparse.Namespace) -> None:
    """The request options' ranges (``refsd.limits``), named as options."""
    check_request(args.prompt, args.negative_prompt, args.seed, args.steps, args.guidance,
                  getattr(args, "height", 1), getattr(args, "width", 1), options=True)
