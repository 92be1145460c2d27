"""What an ``f16`` declaration costs a certificate (issue 28).

A UNet declared ``f16`` is calibrated with runs that do fp16 arithmetic
inside ops (refsd's emulation) besides ``f32_f16`` runs, and every tensor's
offset and gain floors are at least ``tolerance.SYSTEMATIC_F16`` fp16 unit
roundoffs (a coefficient rounded to fp16), so an f16 certificate cannot
resolve a gain error below 4 x 2^-11 = 0.2 % on the UNet output, and its f16
calibration runs (fp16 accumulation, other kernels) may spread wider: measured
on a correct diffusers fp16 device (tiny SD 2.1, 64x64, 4 steps) 0.21 %
declared ``f16``, 0.0093 % from the design's ``f32_f16`` runs alone. A device
whose ops compute in fp32 and round once (PyTorch's fp16 on a CPU) declared
``f16`` is judged against freedom it does not use; a fault between the two
resolutions passes.

So a certificate whose UNet is declared ``f16`` states, beside its
resolution, the resolution the design's ``f32_f16`` runs alone give on the
same tensors, and the first UNet tensor the device fails against those runs'
floors by more than other kernels could widen them. (Those runs are part of the ``f16`` design, plain kernels only; a
certificate declared ``f32_f16`` also has runs with other kernels, so its
floors may be wider: this says what the declaration adds, not what the other
certificate would conclude.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from refsd import trace
from refsd.numerics import U_F16
from refsd_validate.tolerance import judge, noise_floor, systematic

# The f32_f16 runs of an f16 design have plain kernels only; runs with other kernels widen f32_f16 floors by 1.5-4x
# (tolerance.py, measured on the tiny model). A device is said to fail the stricter floors only past KERNELS_WIDENING
# times k: measured on tiny SD 2.1 (64x64, 4 steps, every intermediate, declared f16), a correct diffusers fp16
# device's largest k against those floors was 5.5 (a gain), a 1 % attention temperature's 75.5 at the first attention.
KERNELS_WIDENING = 4.0


def f16_declaration_cost(variants: Sequence, traces: dict, ref: dict, expected: dict, device, order: list[str],
                         usable_until: list[int], stages: dict, mode: str, k: float, se_scale: float,
                         gain_every_step: float) -> dict | None:
    """For a UNet declared ``f16``: {"declared", "gain_every_step": the
    certificate's UNet-output resolution, "f32_f16_runs_gain_every_step": the
    same from the design's f32_f16 runs alone, "ratio", "runs": their labels,
    "stricter_first_failure": the first UNet tensor the device fails against
    those runs' floors at KERNELS_WIDENING times k (name, k) or None,
    "statement"}; None otherwise, or when
    the design has no usable f32_f16 run. ``expected``: the mode's reference
    trace, ``device(name)``: the device's tensor, ``usable_until[i]``: the
    index in ``order`` from which run ``i`` of ``mode`` is no calibration
    (``certify._cut``)."""
    if stages["unet"].precision != "f16":
        return None
    chosen = [i for i, v in enumerate(variants) if v.stage("unet").precision == "f32_f16"]
    gains, failure = [], None
    for j, n in enumerate(order):
        stage, step, path = trace.parse_name(n)
        if stage != "unet":
            continue
        runs = [(traces[mode, i][n], variants[i].scale) for i in chosen if j < usable_until[i]
                and np.isfinite(traces[mode, i][n]).all()]
        if not runs:
            return None
        floor = noise_floor(ref[n], runs, "f32_f16", se_scale)
        if path is None:
            gains.append(k * floor.gain)
        if failure is None:
            verdict = judge(expected[n], device(n), floor, k * KERNELS_WIDENING)
            if not verdict.passed:
                failure = {"tensor": n, "k_needed": verdict.k_needed, "failed": list(verdict.failed)}
    if not gains:
        return None
    stricter = max(gains)
    # Whether the f16 floor's minimum, not an f16 calibration run's spread, sets the resolution at every step
    # (tiny SD 2.1, 64x64, diffusers fp16 declared f16: at the best step it does; at another, an f16 run with other
    # kernels spreads 8 % wider).
    pinned = gain_every_step <= k * systematic("f16", "unet") * U_F16 * (1 + 1e-9)
    return {"declared": "f16", "mode": mode, "gain_every_step": gain_every_step,
            "f32_f16_runs_gain_every_step": stricter, "ratio": gain_every_step / stricter if stricter else None,
            "runs": [variants[i].label for i in chosen],
            "minimum_sets_it": pinned, "stricter_first_failure": failure,
            "statement": _statement(gain_every_step, stricter, pinned, failure)}


# Below this ratio of the two resolutions the f16 declaration is said to cost nothing: floors of two designs differ
# by that much from which runs happen to be drawn.
NEGLIGIBLE_RATIO = 1.5


def _statement(gain_every_step: float, stricter: float, pinned: bool, failure: dict | None) -> str:
    head = (f"the UNet is declared f16: a gain error on its output is rejected above {100 * gain_every_step:.2g} %"
            + (f" (the f16 floor's minimum, {systematic('f16', 'unet'):g} fp16 unit roundoff of gain, sets it)"
               if pinned else ""))
    if failure is None and gain_every_step <= NEGLIGIBLE_RATIO * stricter:
        return head + f"; this design's f32_f16 runs alone give {100 * stricter:.2g} %: here f16 costs no resolution"
    return (head + f"; this design's f32_f16 runs alone would reject above {100 * stricter:.2g} %"
            + ("" if failure is None else
               f", and against their floors this device first fails at {failure['tensor']} "
               f"(k {failure['k_needed']:.3g}, more than {KERNELS_WIDENING:g} k: beyond what runs with "
               "other kernels widen them)")
            + ". Faults between the two pass under f16: declare f32_f16 where each op computes in fp32 "
            "and rounds its output once (PyTorch's fp16 on a CPU)")
