"""How far a correct runtime's transcendental functions may be from NumPy's.

exp, sin, cos, tanh, erf and rsqrt have no single correct float32 result in
practice: libm, PyTorch's Sleef, and GPU shaders each return values a few
ulp apart (Vulkan's precision rules allow ``exp`` 3 + 2|x| ulp, ``sin`` /
``cos`` 2^-11 absolute; CPU libraries stay within ~1-4 ulp). Usually that
is noise below a kernel's summation order, but some arguments amplify it:
the timestep embedding takes ``sin(t * exp(c i))`` with ``t`` up to ~1000, so
a 1-ulp change of ``exp`` moves the sine's argument by up to ~6e-5 rad.

A validator calibration run therefore reruns the reference with every such
result perturbed by ``ulps`` units in the last place (relative
``ulps * 2^-23``), each element by a fixed pseudo-random sign. The spread of
that run around the plain reference is what a correct runtime's libm may
cost, amplification included, and goes into the noise floor. Ops call
:func:`perturb` on the result of each transcendental; it returns its input
untouched unless the run's settings ask for it
(``refsd.numerics.RunSettings.transcendental_ulps``, 0 by default), so
ordinary runs are bit-identical to plain NumPy.
"""

from __future__ import annotations

import numpy as np

from refsd.numerics import current_settings

ULP_F32 = 2.0**-23  # float32 spacing at 1
# A fixed sign pattern, tiled over a tensor: reproducible (the cache keys runs by their settings),
# uncorrelated with the data, and free of the systematic bias a constant sign would add.
_SIGNS = np.where(np.random.default_rng(20261129).random(1 << 16) < 0.5, -1.0, 1.0).astype(np.float32)


def perturb(y: np.ndarray) -> np.ndarray:
    """``y * (1 + s * ulps * 2^-23)`` with a fixed pseudo-random sign ``s`` per
    element, in place for a float32 array; ``y`` itself when not perturbing
    (``ulps``: the run's ``transcendental_ulps``)."""
    ulps = current_settings().transcendental_ulps
    if not ulps:
        return y
    y = np.asarray(y, np.float32)
    if not y.flags.writeable or not y.flags.c_contiguous:
        y = np.array(y, np.float32)
    flat = y.reshape(-1)
    rel = np.float32(ulps * ULP_F32)
    for s0 in range(0, flat.size, _SIGNS.size):
        part = flat[s0 : s0 + _SIGNS.size]
        part *= np.float32(1) + rel * _SIGNS[: part.size]
    return y
