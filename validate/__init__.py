"""refsd_validate: certify tensors from a device against the reference.

Import name ``refsd_validate`` (the directory is ``validate/``, mapped by
``pyproject.toml``'s ``package-dir``). ``compare`` has Polygraphy's semantics:
an element fails only past both ``atol`` and ``rtol * |ref|``; NaN always fails.
"""

from refsd_validate.compare import (
    CHECK_MODES,
    CompareResult,
    ErrorStats,
    compare,
    cosine_similarity,
    psnr,
    ulp_distance_f16,
)

__all__ = ["CHECK_MODES", "CompareResult", "ErrorStats", "compare", "cosine_similarity", "psnr", "ulp_distance_f16"]
