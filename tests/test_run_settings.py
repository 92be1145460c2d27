"""The run settings: one immutable object that every op reads, set for a block,
carried by a model, and the content of a rerun's cache key."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from refsd_validate import certify_rerun
from refsd_validate.tolerance import REFERENCE_RUN, CalibrationRun, StageVariant

from refsd import ops
from refsd.context import record, recording
from refsd.models.options import ModelOptions
from refsd.numerics import Precision, RunSettings, current_precision, current_settings, precision, run_settings
from refsd.ops.hybrid import quantize_activations
from refsd.ops.transcendental import perturb
from refsd.trace import STAGES


def test_settings_are_immutable_and_checked():
    s = RunSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.transcendental_ulps = 1.0
    with pytest.raises(ValueError, match="ulps"):
        RunSettings(transcendental_ulps=-1)
    with pytest.raises(ValueError, match="ulps"):
        RunSettings(transcendental_ulps=float("nan"))
    with pytest.raises(TypeError, match="Precision"):
        RunSettings(precision="f16")


def test_each_entry_point_sets_one_field_of_the_one_object():
    outer = RunSettings(Precision("f32_f16"), transcendental_ulps=4, either_rounding=True)
    with run_settings(outer):
        with precision("f16", ftz=True) as p:
            now = current_settings()
            assert now.precision == p == current_precision()
            assert (now.transcendental_ulps, now.either_rounding) == (4.0, True)
        with recording() as rec:
            assert current_settings().recorder is rec
            assert current_settings() == outer  # the recorder is what is kept, not how it computes
            record("unet.x", np.zeros(2, np.float32))
        assert list(rec) and current_settings().recorder is None
        assert current_settings() is outer
    assert current_settings() == RunSettings()


def test_ops_read_the_settings():
    y = np.full(8, 2.0, np.float32)
    assert perturb(y) is y
    with run_settings(transcendental_ulps=4):
        moved = perturb(y.copy())
    assert np.all(np.abs(moved / y - 1) == np.float32(4 * 2.0**-23))
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    plain = quantize_activations(x, asymmetric=True)[0]
    with run_settings(either_rounding=True):
        either = quantize_activations(x, asymmetric=True)[0]
    assert not np.array_equal(plain, either) and np.abs(plain - either).max() == 1
    with precision("f32_f16"):
        assert np.array_equal(ops.add(x, x), (x.astype(np.float16) * 2).astype(np.float32))


def test_a_model_carries_its_settings():
    s = RunSettings(Precision("f16"), transcendental_ulps=4, weight_jitter=True)
    opts = ModelOptions.make(settings=s, weights="fp16")
    assert opts.settings is s and opts.precision == s.precision and opts.weight_jitter
    assert ModelOptions.make(precision="f16", weight_jitter=True, weights="fp16").settings == \
        RunSettings(Precision("f16"), weight_jitter=True)
    with pytest.raises(ValueError, match="not both"):
        ModelOptions.make(settings=s, precision="f16", weights="fp16")
    with pytest.raises(ValueError, match="weight_jitter"):
        ModelOptions.make(settings=RunSettings(weight_jitter=True))
    with pytest.raises(ValueError, match="record"):
        ModelOptions.make(settings=RunSettings(recorder={}))


def test_a_rerun_runs_and_is_keyed_by_its_stages_settings():
    unet = StageVariant("f16", True, "winograd", 4.0, weight_jitter=True, device_model="litert-gpu")
    text = StageVariant("f32", either_rounding=True)
    run = CalibrationRun((text, unet, StageVariant(), StageVariant("f32_f16")))
    got = certify_rerun.stage_settings(run)
    assert list(got) == list(STAGES)
    assert got["unet"] == RunSettings(Precision("f16", True, device_model="litert-gpu"), 4.0, True, True)
    # transcendental ulps and either-rounding are the run's, every stage alike
    assert all(s.transcendental_ulps == 4.0 and s.either_rounding for s in got.values())
    assert got["guidance_scheduler"].precision == Precision("f32_f16")
    content = certify_rerun.run_content(run)
    assert content["unet"] == {**got["unet"].content(), "kernels": "winograd"}
    # the spread's scale is how a run is used, not what it computes
    assert certify_rerun.run_content(dataclasses.replace(run, scale=0.5)) == content
    assert certify_rerun.run_content(REFERENCE_RUN) != content
