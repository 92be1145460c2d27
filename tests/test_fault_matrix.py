"""The validator's judgement on the tiny SD 2.1 model's fault matrix, held
fixed: the verdict, the first failure and every tensor's k needed, for a good
device and five faulty ones (``bundle_helpers.FAULTS`` and swapped steps), as the validator
gave them at 435c6d0, before its code was split by idea and its certificates
learnt to explain themselves (issue 25). A refactoring of the validator that
changes any of them changes behaviour and must say so.

The recorded values are in ``data/fault_matrix.json``; ``python
tests/test_fault_matrix.py OUT.json`` writes them again from the code as it
is. k values are compared to 1e-6 relative: the judge's statistics sum in
float64 over float32 differences (``tolerance.error_stats``), so they are
reproducible to far better than that on one machine, and the rerun traces
are bit-for-bit (``refsd.blas``). The devices are the session's
(``fault_bundle``) and their reruns the session cache's, shared with
tests/test_certify.py and tests/test_fleet.py: judging is what this costs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from bundle_helpers import FAULTS, faulty_device, rewrite_bundle

from refsd_validate.certify import certify

RECORDED = Path(__file__).with_name("data") / "fault_matrix.json"


def _swap_steps(tensors):
    for kind in ("unet/step_{}/noise_pred", "scheduler/step_{}/latents"):
        tensors[kind.format(1)], tensors[kind.format(2)] = tensors[kind.format(2)], tensors[kind.format(1)]


def fault_matrix(model, good_bundle, fault_bundle, cache, tmp: Path) -> dict[str, dict]:
    """Case -> {verdict, first failure, k needed per (tensor, mode)} of each device of the matrix
    (``fault_bundle(name)``: the good device with ``bundle_helpers.FAULTS[name]``)."""
    devices = {"good": good_bundle, **{name: fault_bundle(name) for name in FAULTS},
               "steps_1_2_swapped": rewrite_bundle(good_bundle, tmp / "swap", tensors=_swap_steps)}
    out = {}
    for case, bundle in devices.items():
        cert = certify(bundle, model, cache_dir=cache)
        f = cert.first_failure
        out[case] = {"certified": cert.certified,
                     "first_failure": None if f is None else [f.name, f.mode, f.verdict.k_needed],
                     "k_needed": {f"{r.mode} {r.name}": r.verdict.k_needed for r in cert.results}}
    return json.loads(json.dumps(out).replace("Infinity", '"inf"'))


def _close(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def test_the_fault_matrix_is_judged_as_recorded(tiny_sd21, emulated_bundle, fault_bundle, certify_cache, tmp_path):
    recorded = json.loads(RECORDED.read_text())
    got = fault_matrix(tiny_sd21, emulated_bundle, fault_bundle, certify_cache, tmp_path)
    assert set(got) == set(recorded)
    for case, want in recorded.items():
        g = got[case]
        assert g["certified"] == want["certified"], case
        if want["first_failure"] is None:
            assert g["first_failure"] is None, case
        else:
            assert g["first_failure"][:2] == want["first_failure"][:2], case
            assert _close(g["first_failure"][2], want["first_failure"][2]), case
        assert set(g["k_needed"]) == set(want["k_needed"]), case
        moved = {n: (g["k_needed"][n], v) for n, v in want["k_needed"].items() if not _close(g["k_needed"][n], v)}
        assert not moved, (case, dict(list(moved.items())[:5]))


if __name__ == "__main__":  # record: python tests/test_fault_matrix.py OUT.json
    import tempfile

    from conftest import CERTIFY_INTERMEDIATES, certify_request

    from refsd.tiny import make_tiny
    from refsd_validate.capture_emulated import emulated_capture

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model = make_tiny(root / "tiny-sd21", "sd21", seed=0)
        good = emulated_capture(model, certify_request(), root / "good" / "bundle", precision="f32_f16", ftz=True,
                                declare_ftz=True, rewrites="google", intermediates=CERTIFY_INTERMEDIATES)
        made = {}

        def fault_bundle(name):
            return made.setdefault(name, faulty_device(model, root / name, FAULTS[name]))

        doc = fault_matrix(model, good, fault_bundle, root / "cache", root)
    Path(sys.argv[1]).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
