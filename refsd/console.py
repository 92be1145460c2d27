"""The terminal holds refsd's own lines only.

TensorFlow, absl, LiteRT and transformers write to file descriptors 1 and 2
from C++ (glog lines, "All log messages before absl::InitializeLog()", CPU
feature notes, LiteRT's delegate and teardown lines) and through Python
logging ("WARNING:absl:...", "PyTorch was not found"). While a command runs
(:func:`captured`), both descriptors point at a temporary file, and refsd
writes through its own duplicates of the original ones (``sys.stdout`` for
its report, :func:`err` for the rest). What the libraries said is dropped when the command succeeds,
kept when it fails: bad input (exit 2) stays one line, which names the file
holding it; an internal error (exit 70) prints it in full under refsd's line,
then the traceback. ``--verbose`` captures nothing: every line goes where its
library sends it.

refsd's lines: on stdout, what a command reports; on stderr, lines that
begin with the program's name (``refsd: error: ...``, ``refsd-validate:
warning: ...``, a finished stage).

Progress (:func:`progress`): a tqdm bar on a terminal; written to a file or
a pipe, one line per finished stage (``refsd: denoising: 20 steps in 3.1 s``),
never carriage returns.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from typing import Iterable, Iterator, TextIO

# Quieter at the source where a library offers it (set before it is imported); what remains is captured.
# TF_CPP_MIN_LOG_LEVEL 1 drops TensorFlow's INFO lines only: its warnings and errors stay for a failure's context.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "1", "TRANSFORMERS_VERBOSITY": "error",
                     "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}

_prog = "refsd"
_out: TextIO | None = None
_err: TextIO | None = None


def err() -> TextIO:
    """Where refsd's errors, warnings and progress go (stderr, as the command started)."""
    return _err if _err is not None else sys.stderr


def warn(message: str) -> None:
    print(f"{_prog}: warning: {' '.join(str(message).split())}", file=err(), flush=True)


class Capture:
    """The libraries' output while a command ran (``text``, after the block)."""

    text = ""


@contextlib.contextmanager
def captured(program: str, *, verbose: bool = False, keep: bool = False) -> Iterator[Capture]:
    """Run a command with descriptors 1 and 2 captured (see the module doc).
    ``keep``: leave them captured after the block (a command-line process:
    LiteRT logs its teardown at interpreter exit, after refsd's last line)."""
    global _prog, _out, _err
    saved = (_prog, _out, _err)
    cap = Capture()
    _prog = program
    if verbose:
        try:
            yield cap
        finally:
            _prog, _out, _err = saved
        return
    quieted = [key for key in QUIET_ENVIRONMENT if key not in os.environ]
    for key in quieted:
        os.environ[key] = QUIET_ENVIRONMENT[key]
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    log = tempfile.TemporaryFile()
    originals = {fd: os.dup(fd) for fd in (1, 2)}
    # refsd writes through streams on duplicates of the original descriptors. sys.stdout becomes refsd's (print()
    # is how commands report); sys.stderr stays on descriptor 2, so the libraries' Python logging and warnings are
    # captured with their C++ output. A stream that is not the process's descriptor (pytest's capture) is kept.
    stdout = sys.stdout
    _out = _own_stream(sys.stdout, 1, originals[1])
    _err = _own_stream(sys.stderr, 2, originals[2])
    for fd in originals:
        os.dup2(log.fileno(), fd)
    sys.stdout = _out
    try:
        yield cap
    finally:
        for stream in (sys.stdout, sys.stderr, _out, _err):
            with contextlib.suppress(ValueError, OSError):
                stream.flush()
        log.seek(0)
        cap.text = log.read().decode("utf-8", "replace")
        if keep:  # the process ends with the command: what the libraries say from now on is dropped
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in originals:
                os.dup2(devnull, fd)
            os.close(devnull)
        else:
            for fd, dup in originals.items():
                os.dup2(dup, fd)
                os.close(dup)
            for own, orig in ((_out, stdout), (_err, sys.stderr)):
                if own is not orig:
                    own.close()
            sys.stdout = stdout
            _prog, _out, _err = saved
            for key in quieted:  # a caller in the same process (a test, a script) gets its environment back
                os.environ.pop(key, None)
        log.close()


def _own_stream(stream: TextIO, fd: int, dup: int) -> TextIO:
    try:
        if stream.fileno() != fd:
            return stream
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return stream
    return _stream(os.dup(dup), encoding=getattr(stream, "encoding", None) or "utf-8")


def _stream(fd: int, encoding: str = "utf-8") -> TextIO:
    return open(fd, "w", buffering=1, encoding=encoding, errors="replace")  # noqa: SIM115 (closed by captured)


def context_lines(text: str) -> list[str]:
    """An internal error's context: the libraries' lines, each marked as theirs."""
    lines = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    if not lines:
        return []
    return [f"{_prog}: the libraries' output before the error ({len(lines)} lines):", *(f"  | {x}" for x in lines)]


def save_log(text: str) -> str:
    """The libraries' output kept in a file (a failure's context, where the error must stay one line)."""
    with tempfile.NamedTemporaryFile("w", prefix=f"{_prog}-", suffix=".log", delete=False,
                                     encoding="utf-8") as f:
        f.write(text)
    return f.name


# ---------------------------------------------------------------- progress


def on_terminal() -> bool:
    try:
        return err().isatty()
    except (AttributeError, ValueError):
        return False


class _Lines:
    """tqdm's interface as the loops use it, printing one line when the stage finishes."""

    def __init__(self, iterable: Iterable | None, desc: str, unit: str, total: int | None) -> None:
        self.iterable, self.desc, self.unit, self.n = iterable, desc, unit, 0
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.start = time.monotonic()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix_str(self, s: str) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        of = f"/{self.total}" if self.total is not None and self.total != self.n else ""
        print(f"{_prog}: {self.desc}: {self.n}{of} {self.unit}{'s' * (self.n != 1)} in "
              f"{time.monotonic() - self.start:.1f} s", file=err(), flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Off(_Lines):
    def close(self) -> None:
        self.closed = True


def progress(iterable: Iterable | None = None, *, desc: str, unit: str, total: int | None = None,
             enabled: bool = True):
    """A progress bar for a stage: tqdm on a terminal, else one line when it finishes; nothing when not
    ``enabled``. Iterate it, or use it as a context manager and ``update()``."""
    if not enabled:
        return _Off(iterable, desc, unit, total)
    if not on_terminal():
        return _Lines(iterable, desc, unit, total)
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=False, file=err())
