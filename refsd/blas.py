"""What refsd's results depend on besides its inputs: the BLAS and its thread count.

float32 matmuls and convolutions run on NumPy's BLAS, whose summation order
may depend on the library, its CPU kernel and how many threads it splits a
product over (which kernel and partition it picks depends on the shapes and
the thread count). So a trace is bit-identical for the same inputs, refsd
sources, NumPy / BLAS build, CPU kernel and **BLAS thread count**; with 1
thread instead of 2, ``f32_f16`` latents were seen to move by 2.8e-2 (a few
float32 ulp, amplified by fp16 rounding). The certify rerun cache keys on
:func:`blas_fingerprint`, so a rerun made under other conditions is never
reused.
"""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np


@functools.lru_cache(maxsize=None)
def _openblas():
    """NumPy's OpenBLAS as a ctypes library and its symbol prefix/suffix, or None."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            for suffix in ("64_", ""):
                if hasattr(lib, f"{prefix}openblas_get_num_threads{suffix}"):
                    return lib, prefix, suffix
    return None


def blas_threads() -> int | None:
    """The thread count NumPy's BLAS uses now (None when it cannot be asked)."""
    found = _openblas()
    if found is None:
        value = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        return int(value) if value and value.isdigit() else None
    lib, prefix, suffix = found
    return int(getattr(lib, f"{prefix}openblas_get_num_threads{suffix}")())


def blas_fingerprint() -> dict:
    """The conditions a float32 result depends on besides its inputs (module docstring)."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        name = f"{blas.get('name')} {blas.get('version')}"
    except (KeyError, TypeError, AttributeError):  # NumPy builds without the config dicts
        name = "unknown"
    found = _openblas()
    if found is not None:
        lib, prefix, suffix = found
        get_config = getattr(lib, f"{prefix}openblas_get_config{suffix}", None)  # names the CPU kernel too
        if get_config is not None:
            get_config.restype = ctypes.c_char_p
            name += " " + " ".join(get_config().decode("ascii", "replace").split())
    return {"numpy": np.__version__, "blas": name, "threads": blas_threads()}
