"""Determinism as the README states it: bit for bit for the same BLAS thread count,
and the certify rerun cache never reuses a rerun made under another count."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from refsd.blas import blas_fingerprint
from refsd_validate import certify_rerun
from refsd_validate.tolerance import REFERENCE_RUN


def _python(code: str, threads: int) -> str:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_fingerprint_reports_the_blas_thread_count():
    code = "from refsd.blas import blas_threads; print(blas_threads())"
    assert [_python(code, n).strip() for n in (1, 2)] == ["1", "2"]


def test_same_thread_count_same_bits(tiny_sd21, tmp_path):
    # Two processes, one BLAS thread each: the f32_f16 trace (where fp16 rounding amplifies any
    # summation-order difference) is bit-identical.
    for i in range(2):
        _python(f"from refsd.pipeline import Pipeline, Request; import numpy as np\n"
                f"r = Pipeline({str(tiny_sd21)!r}, precision='f32_f16')(Request('a cat', steps=2, height=16, "
                f"width=16, scheduler='ddim'), progress=False)\n"
                f"np.savez({str(tmp_path / f't{i}.npz')!r}, **{{k.replace('/', '__'): v for k, v in r.trace.items()}})",
                1)
    a, b = (np.load(p) for p in sorted(tmp_path.glob("t*.npz")))
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        assert a[name].tobytes() == b[name].tobytes(), name


def test_cache_key_includes_the_blas_conditions(monkeypatch):
    request = {"steps": 2, "scheduler": "ddim", "guidance": 7.5, "height": 16, "width": 16}
    ids, x0 = np.zeros((2, 77), np.int64), np.zeros((1, 8, 8, 4), np.float32)

    def key(threads):
        monkeypatch.setattr(certify_rerun, "blas_fingerprint", lambda: {**blas_fingerprint(), "threads": threads})
        return certify_rerun._cache_key("m" * 64, certify_rerun.ORIGINAL_DEPLOYMENT, REFERENCE_RUN, request, ids, x0, None,
                                        frozenset())

    assert key(1) == key(1) != key(2)
