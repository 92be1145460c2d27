"""``--threads N`` for the benchmarks: BLAS thread counts must be set before
NumPy / PyTorch load their BLAS, so the option is read from ``sys.argv``
before anything else is imported (``argparse`` parses it again later)."""

from __future__ import annotations

import os

BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def threads_from_argv(argv: list[str]) -> str:
    """The value of ``--threads`` in ``argv`` (default 1: the VM's second core is shared)."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "1"


def set_blas_threads(argv: list[str]) -> None:
    for var in BLAS_THREAD_VARS:
        os.environ[var] = threads_from_argv(argv)
