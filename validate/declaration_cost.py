"""What an ``f16`` declaration costs a certificate (issue 28).

A UNet declared ``f16`` is calibrated with runs that do fp16 arithmetic
inside ops (refsd's emulation: partial sums and intermediate values rounded
to fp16) besides ``f32_f16`` runs, and the floor is the widest run's. A device
whose ops compute in fp32 and round once (PyTorch's fp16 on a CPU) declared
``f16`` is judged against noise it does not have: a fault between the two
floors passes. Measured on held-out tiny models (bench/README.md, the fault
matrix): a 1 % attention temperature from step 1 certified under ``f16``
(worst k 3.68) and was rejected under ``f32_f16``.

So a certificate whose UNet is declared ``f16`` states, beside its
resolution, the resolution the design's ``f32_f16`` runs alone would give on
the same tensors: how much coarser the declaration made it. (Those runs are
part of the ``f16`` design; a certificate declared ``f32_f16`` also has runs
with other kernels, so its own floors may be wider than this figure: it is
what the f16 arithmetic adds, not a promise of the other certificate.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from refsd import trace


def f16_declaration_cost(variants: Sequence, traces: dict, ref: dict, order: list[str], usable_until: dict,
                         stages: dict, mode: str, k: float, se_scale: float, gain_every_step: float) -> dict | None:
    """For a UNet declared ``f16``: {"declared": ..., "gain_every_step": the
    certificate's UNet-output resolution, "f32_f16_runs_gain_every_step": the
    same from the design's f32_f16 runs alone, "ratio", "runs": their labels};
    None otherwise, or when the design has no usable f32_f16 run.
    ``usable_until[i]``: the index in ``order`` from which run ``i`` of
    ``mode`` is no calibration (``certify._cut``)."""
    from refsd_validate.tolerance import SYSTEMATIC_F16, noise_floor  # noqa: PLC0415

    from refsd.numerics import U_F16  # noqa: PLC0415

    if stages["unet"]["precision"] != "f16":
        return None
    chosen = [i for i, v in enumerate(variants) if v.stage("unet").precision == "f32_f16"]
    gains = []
    for j, n in enumerate(order):
        stage, step, path = trace.parse_name(n)
        if stage != "unet" or path is not None:
            continue
        runs = [(traces[mode, i][n], variants[i].scale) for i in chosen if j < usable_until[i]
                and np.isfinite(traces[mode, i][n]).all()]
        if not runs:
            return None
        gains.append(k * noise_floor(ref[n], runs, "f32_f16", se_scale).gain)
    if not gains:
        return None
    stricter = max(gains)
    # Measured (tiny SD 2.1, 64x64, diffusers fp16 declared f16): the UNet output's gain floor is exactly
    # this minimum, not any calibration run's spread (theirs was 34x smaller).
    pinned = gain_every_step <= k * SYSTEMATIC_F16 * U_F16 * (1 + 1e-9)
    return {"declared": "f16", "mode": mode, "gain_every_step": gain_every_step,
            "f32_f16_runs_gain_every_step": stricter, "ratio": gain_every_step / stricter if stricter else None,
            "runs": [variants[i].label for i in chosen],
            "minimum_sets_it": pinned,
            "statement": (f"the UNet is declared f16: a gain error on its output is rejected above "
                          f"{100 * gain_every_step:.2g} %"
                          + (f" (the f16 floor's minimum, {SYSTEMATIC_F16} fp16 unit roundoffs of gain, sets it)"
                             if pinned else "")
                          + f"; this design's f32_f16 runs alone would reject above {100 * stricter:.2g} %. Faults "
                          "between the two pass under f16: declare f32_f16 where each op computes in fp32 and rounds "
                          "its output once (PyTorch's fp16 on a CPU)")}
