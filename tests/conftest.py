"""Hypothesis profiles.

``ci``   derandomized (the same examples on every run and machine, no example
         database), no deadline (CI machines are shared and slow), 30 examples,
         and the reproduction blob printed on failure.
``dev``  randomized, 50 examples, with the example database, so a failure
         found once is replayed until fixed.

``HYPOTHESIS_PROFILE=<name>`` selects a profile explicitly; otherwise ``ci``
when the ``CI`` environment variable is set (as ``.ci/run`` does), else ``dev``.
Shrunk failures worth keeping are pinned in the tests as ``@example(...)``.
"""

import os

# Under pytest-xdist (pyproject's addopts: one worker per core) each worker keeps to one BLAS / OpenMP / PyTorch
# thread, so the two workers do not fight over two cores; numba keeps two, so that the kernels' thread-count tests
# still run a second thread. Set before anything imports numpy, torch or numba; a caller's own settings stand.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_key, "1")
    os.environ.setdefault("NUMBA_NUM_THREADS", "2")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=30,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    # No deadline here either: the machine's cores are shared, so wall-clock
    # limits would flag load, not slow code.
    deadline=None,
    max_examples=50,
    print_blob=True,
)

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


# ---------------------------------------------------------------- validator fixtures (session-scoped: the
# reference reruns are what cost, so one tiny model, one emulated device and one rerun cache serve every test)

import pytest  # noqa: E402

CERTIFY_PROMPT = "a photo of an astronaut riding a horse on mars"
# Intermediates the emulated device records: one attention block of step 2 (small, and enough to
# exercise name matching and module-path localization).
CERTIFY_INTERMEDIATES = ("unet/step_2/unet.mid_block.attentions.0",)


def certify_request():
    from refsd.pipeline import Request

    return Request(CERTIFY_PROMPT, negative_prompt="blurry", seed=3, steps=4, guidance=7.5, scheduler="ddim",
                   height=64, width=64)


@pytest.fixture(scope="session")
def tiny_sd21(tmp_path_factory):
    """The tiny SD 2.1-architecture folder (seed 0)."""
    from refsd.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-sd21"), "sd21", seed=0)


@pytest.fixture(scope="session")
def certify_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("certify-cache")


@pytest.fixture(scope="session")
def emulated_bundle(tiny_sd21, tmp_path_factory):
    """A good device: f32_f16 with Google's kernel rewrites and FTZ (declared, as for a GPU known to
    flush). Not a calibration variant (its attention kernel differs), but it shares Winograd and FTZ with
    one, so much of its noise is the same draw: ``litert_capture`` is the independent good device."""
    from refsd_validate.capture_emulated import emulated_capture

    return emulated_capture(tiny_sd21, certify_request(), tmp_path_factory.mktemp("good") / "bundle",
                            precision="f32_f16", ftz=True, declare_ftz=True, rewrites="google",
                            intermediates=CERTIFY_INTERMEDIATES)


@pytest.fixture(scope="session")
def fault_bundle(tiny_sd21, tmp_path_factory):
    """``fault_bundle(name)`` -> the good emulated device with ``bundle_helpers.FAULTS[name]`` injected,
    captured once per session (several test files judge the same faulty devices)."""
    from bundle_helpers import FAULTS, faulty_device

    made = {}

    def get(name: str):
        if name not in made:
            made[name] = faulty_device(tiny_sd21, tmp_path_factory.mktemp(name.replace(".", "_")), FAULTS[name])
        return made[name]

    return get


# ---------------------------------------------------------------- tiny .tflite exports (tests/test_export.py,
# test_lint_gpu.py, test_capture.py): each (weights, rewrites) pair is exported once per session.

import pytest  # noqa: E402

# A 16x16 image is 8x8 latents for the tiny VAE (2 blocks: scale factor 2).
EXPORT_SIZE = 16
# serial_conv_limit for the tiny exports: the tiny UNet's largest activation that no
# split can shrink is its upsampler conv, 8x8x64 = 4096 elements per image; the analog
# of the paper's failing concat conv (32x32x1920 -> 640) is up_blocks.1's 8x8x96 -> 32.
TINY_CONV_LIMIT = 4096


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    from refsd.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "sd15", "sd15", seed=0)


@pytest.fixture(scope="session")
def tiny_export(tiny_sd15, tmp_path_factory):
    """``tiny_export(weights, rewrites)`` -> export folder, built once per session."""
    cache = {}

    def get(weights: str = "fp32", rewrites: str = "none"):
        key = (weights, rewrites)
        if key not in cache:
            from refsd.export.build import export

            out = tmp_path_factory.mktemp(f"export_{weights}_{rewrites}")
            export(tiny_sd15, out, weights=weights, rewrites=rewrites, height=EXPORT_SIZE, width=EXPORT_SIZE,
                   serial_conv_limit=TINY_CONV_LIMIT, progress=False)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def litert_capture(tiny_sd21, tmp_path_factory):
    """The tiny model exported to .tflite (fp32, 64x64) and captured with LiteRT's builtin CPU kernels,
    every mapped intermediate included: a real interpreter run, not refsd's."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("ai_edge_litert")
    from refsd.export.build import export
    from refsd_validate.capture import capture

    root = tmp_path_factory.mktemp("litert")
    req = certify_request()
    export(tiny_sd21, root / "tflite", height=req.height, width=req.width, progress=False)
    return capture(root / "tflite", tiny_sd21, req, root / "bundle", intermediates=True, progress=False)
