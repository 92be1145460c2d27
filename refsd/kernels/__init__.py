"""The kernel switch: compiled kernels, or the NumPy definitions they stand for.

Every op, rounding rule and accumulation order is *defined* in readable NumPy
(``refsd.numerics``, ``refsd.ops``). The hot loops also exist as compiled
kernels (numba, ``refsd.kernels.fp16``) that give the same bits, proven by
``tests/test_kernels.py``. ``REFSD_KERNELS=numpy`` runs the definitions
everywhere; the default, ``numba``, runs the kernels where they exist.

If numba cannot be imported or a kernel cannot be compiled, refsd says so in
one line on stderr and runs the definitions: never a crash. Compiled code is
cached on disk (``$REFSD_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/refsd/numba``
or ``~/.cache/refsd/numba``), so each process after the first loads it
instead of compiling; where no such directory is writable it compiles into a
temporary one, for this process only.

Parallel kernels run as many threads as NumPy's BLAS: a certificate's reruns
alternate GEMMs and kernels, never both at once, and a fleet worker limited to
one BLAS thread gets one kernel thread too.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys
import tempfile
from pathlib import Path

from refsd.blas import blas_threads

ENV = "REFSD_KERNELS"
BACKENDS = ("numba", "numpy")


def requested() -> str:
    """The backend ``REFSD_KERNELS`` asks for (``numba`` when unset)."""
    value = os.environ.get(ENV, "").strip().lower() or "numba"
    if value not in BACKENDS:
        _say(f"{ENV}={os.environ.get(ENV)!r} is not one of {', '.join(BACKENDS)}; running the NumPy definitions")
        return "numpy"
    return value


_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("refsd_kernels_forced", default=None)


@contextlib.contextmanager
def using(name: str):
    """Run the enclosed code on one backend (``numpy``: the definitions),
    whatever ``REFSD_KERNELS`` says; for tests that compare the two."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(BACKENDS)}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def backend() -> str:
    """The backend in use in this process: ``numba`` or ``numpy``."""
    return "numpy" if compiled() is None else "numba"


def compiled():
    """The compiled kernel module, or None (``REFSD_KERNELS=numpy``, or numba
    unusable here: said once on stderr)."""
    forced = _FORCED.get()
    if forced == "numpy":
        return None
    return _load(forced == "numba")


@functools.cache
def _load(forced: bool):
    if not forced and requested() == "numpy":
        return None
    try:
        set_here = _configure_numba()
        from refsd.kernels import erf, fp16

        fp16.warm_up()
        erf.warm_up()
        # OpenMP has read it (the first parallel region ran): later processes and libraries keep their own.
        if "OMP_WAIT_POLICY" in set_here:
            os.environ.pop("OMP_WAIT_POLICY", None)
    except Exception as exc:  # any failure to import or compile: the definitions still run
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _say(f"compiled kernels unavailable ({type(exc).__name__}: {reason[:200]}); running the NumPy definitions")
        return None
    return fp16


def compiled_erf():
    """The compiled passes of ``refsd.ops.activations.erf``
    (``refsd.kernels.erf``), or None where ``compiled()`` is."""
    if compiled() is None:
        return None
    from refsd.kernels import erf

    return erf


def threads() -> int:
    """Threads for a parallel kernel: NumPy's BLAS thread count (all cores
    this process may use when it cannot be asked)."""
    n = blas_threads()
    if not n:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n)


def _configure_numba() -> set[str]:
    """Cache directory, thread count and how idle kernel threads wait, which
    numba and its OpenMP runtime read once, at load (the thread count also
    for threads started later, such as a Dask worker's); a caller's own
    settings stand."""
    if "numba" in sys.modules:
        return set()
    wanted = {"NUMBA_CACHE_DIR": lambda: str(cache_dir()), "NUMBA_NUM_THREADS": lambda: str(threads()),
              # Kernel threads sleep between parallel regions instead of spinning: on a loaded machine a
              # spinning team made f16 runs 4x slower than one thread (bench/README.md); passive, 1.1x.
              "OMP_WAIT_POLICY": lambda: "PASSIVE"}
    # numba's compiler rereads its NUMBA_ variables at each compilation, so those stay set.
    set_here = {key for key in wanted if not os.environ.get(key)}
    for key in set_here:
        os.environ[key] = wanted[key]()
    return set_here


def cache_dir() -> Path:
    """The first writable cache directory, else a fresh temporary one (said on stderr)."""
    for d in _cache_candidates():
        try:
            d.mkdir(parents=True, exist_ok=True)
            tempfile.NamedTemporaryFile(dir=d, prefix=".probe-").close()
        except OSError:
            continue
        return d
    d = Path(tempfile.mkdtemp(prefix="refsd-numba-"))
    _say(f"no writable cache directory for compiled kernels ({_cache_candidates()[-1]}); compiling into {d} "
         "for this process only")
    return d


def _cache_candidates() -> list[Path]:
    own = os.environ.get("REFSD_KERNEL_CACHE")
    if own:
        return [Path(own)]
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return [base / "refsd" / "numba"]


def _say(message: str) -> None:
    print(f"refsd: {message}", file=sys.stderr)
