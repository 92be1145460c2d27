"""refsd.schedulers against diffusers' schedulers, step by step on identical inputs.

Two comparisons per (scheduler, config, steps), fed the same random model outputs:

* teacher-forced: at every step both schedulers get the *same* sample (diffusers'
  trajectory, NCHW for torch and NHWC for us); our multistep history is built from
  our own data predictions of those inputs. This is the per-step error: <= 1e-6
  relative (max|a - b| / max|b|).
* free-running: each scheduler runs its own loop; the drift (from one-ulp differences
  in scalar coefficients: torch's sqrt/log/exp are not correctly rounded on CPU, ours
  are) stays <= FREE_RUN_RTOL.

Run with ``-s`` to print the measured maxima.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from refsd import schedulers as S
from refsd.schedulers import make_scheduler
from refsd.weights import WeightsError, load_scheduler_config

STEP_RTOL = 1e-6
FREE_RUN_RTOL = 5e-6  # 50 steps measured <= ~2.5e-6: per-step ~1e-7 accumulated along the trajectory
# Named overrides of STEP_RTOL, each with its reason. DPM-Solver++ forms h = lambda_t - lambda_s
# and exp(-h) - 1 by cancellation, so torch's ~1-ulp log/exp errors are amplified by ~1/h
# (h ~ 0.05 at 50 steps). With epsilon / v targets the amplified term stays small next to
# (sigma_t / sigma_s) * x (measured <= 6.5e-7 over 6 seeds); a random 'sample' target or
# the heun D1 term weighs it more: measured up to 1.24e-6 over 6 seeds x {4, 20, 50} steps.
STEP_RTOL_OVERRIDES = {
    ("dpm++2m", "sample-pred"): 2e-6,
    ("dpm++2m", "heun"): 2e-6,
}

SD15 = dict(  # runwayml/stable-diffusion-v1-5 scheduler_config.json (PNDMScheduler) plus explicit spacing
    _class_name="PNDMScheduler",
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
    clip_sample=False,
    prediction_type="epsilon",
    timestep_spacing="leading",
)
SD21 = dict(SD15, _class_name="DDIMScheduler", prediction_type="v_prediction")  # stabilityai/stable-diffusion-2-1

CONFIGS = {
    "sd15": SD15,
    "sd21": SD21,
    "sd21-trailing": dict(SD21, timestep_spacing="trailing"),
    "sd21-linspace": dict(SD21, timestep_spacing="linspace"),
}
NAMES = ("ddim", "euler", "dpm++2m")
SHAPE_NHWC = (2, 6, 5, 4)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def _diffusers(name: str, config: dict):
    diffusers = pytest.importorskip("diffusers")
    cls = {
        "ddim": diffusers.DDIMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "dpm++2m": diffusers.DPMSolverMultistepScheduler,
    }[name]
    return cls.from_config(config)


def compare(name: str, config: dict, steps: int, seed: int = 0) -> dict:
    """Run ours (teacher-forced and free-running) and diffusers; return the worst relative errors."""
    torch = pytest.importorskip("torch")
    ref = _diffusers(name, config)
    forced = make_scheduler(name, config)
    free = make_scheduler(name, config)
    ref.set_timesteps(steps)
    forced.set_timesteps(steps)
    free.set_timesteps(steps)

    ref_t = ref.timesteps.numpy()
    assert forced.timesteps.dtype == ref_t.dtype, (forced.timesteps.dtype, ref_t.dtype)
    np.testing.assert_array_equal(forced.timesteps, ref_t)
    # The schedule: betas and alphas_cumprod bit for bit (torch.linspace / cumprod emulation).
    np.testing.assert_array_equal(forced.betas, ref.betas.numpy())
    np.testing.assert_array_equal(forced.alphas_cumprod, ref.alphas_cumprod.numpy())
    if hasattr(ref, "sigmas"):
        np.testing.assert_allclose(forced.sigmas, ref.sigmas.numpy(), rtol=3e-7, atol=0)
    ins = float(ref.init_noise_sigma)
    assert abs(forced.init_noise_sigma - ins) <= 3e-7 * ins

    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    to_np = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(SHAPE_NHWC).astype(np.float32)
    x_ref = to_t(noise) * ref.init_noise_sigma
    x_free = noise * np.float32(free.init_noise_sigma)
    worst = {"step": 0.0, "scale": 0.0, "free": 0.0}
    for i, t in enumerate(ref.timesteps):
        mo = rng.standard_normal(SHAPE_NHWC).astype(np.float32)
        x_ref_np = to_np(x_ref)

        scaled_ref = to_np(ref.scale_model_input(x_ref, t))
        worst["scale"] = max(worst["scale"], _rel(forced.scale_model_input(x_ref_np, i), scaled_ref))

        x_next_ref = ref.step(to_t(mo), t, x_ref).prev_sample
        x_next_forced = forced.step(mo, i, x_ref_np)
        assert x_next_forced.dtype == np.float32 and x_next_forced.shape == SHAPE_NHWC
        worst["step"] = max(worst["step"], _rel(x_next_forced, to_np(x_next_ref)))

        free.scale_model_input(x_free, i)
        x_free = free.step(mo, i, x_free)
        worst["free"] = max(worst["free"], _rel(x_free, to_np(x_next_ref)))
        x_ref = x_next_ref
    return worst


def _check(name, config, steps, label):
    w = compare(name, config, steps)
    step_rtol = STEP_RTOL_OVERRIDES.get((name, label), STEP_RTOL)
    print(f"\n{name:8s} {label:16s} steps={steps:2d}  step {w['step']:.2e}  scale_in {w['scale']:.2e}  "
          f"free-run {w['free']:.2e}")
    assert w["step"] <= step_rtol, w
    assert w["scale"] <= STEP_RTOL, w
    assert w["free"] <= FREE_RUN_RTOL, w


# diffusers 0.42 + numpy 2: "__array__ implementation doesn't accept a copy keyword" (theirs)
NO_DIFFUSERS_WARNINGS = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.conformance
@NO_DIFFUSERS_WARNINGS
@pytest.mark.parametrize("steps", [4, 20, 50])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers(name, config, steps):
    _check(name, CONFIGS[config], steps, config)


# The SD 1.5 file as shipped: no timestep_spacing / prediction_type, so each scheduler takes
# its diffusers class's defaults (DDIM leading, Euler and DPM linspace).
SD15_RAW = {k: v for k, v in SD15.items() if k not in ("timestep_spacing", "prediction_type")}

# Other supported settings, each at a step count where it matters.
VARIANTS = [
    ("ddim", "sd15-raw", SD15_RAW, 20),
    ("euler", "sd15-raw", SD15_RAW, 20),
    ("dpm++2m", "sd15-raw", SD15_RAW, 20),
    ("ddim", "linear-betas", dict(SD15, beta_schedule="linear", beta_start=0.0001, beta_end=0.02), 20),
    ("ddim", "cosine-betas", dict(SD15, beta_schedule="squaredcos_cap_v2"), 20),
    ("ddim", "sample-pred", dict(SD15, prediction_type="sample"), 20),
    ("ddim", "clip+alpha-one", dict(SD15, clip_sample=True, clip_sample_range=1.5, set_alpha_to_one=True), 20),
    ("ddim", "trained-betas", dict(SD15, trained_betas=list(np.linspace(1e-4, 0.02, 1000))), 10),
    ("euler", "sample-pred", dict(SD15, prediction_type="sample"), 20),
    ("euler", "sigma-min-final", dict(SD21, final_sigmas_type="sigma_min"), 20),
    # leading spacing: with linspace/trailing the first sigma is ~2e4 and dwarfs every later error
    ("euler", "cosine-betas", dict(SD15, beta_schedule="squaredcos_cap_v2"), 20),
    ("dpm++2m", "sample-pred", dict(SD15, prediction_type="sample"), 20),
    ("dpm++2m", "no-lower-final", dict(SD21, lower_order_final=False), 10),
    ("dpm++2m", "euler-at-final", dict(SD21, euler_at_final=True, final_sigmas_type="sigma_min"), 20),
    ("dpm++2m", "sigma-min-final", dict(SD21, final_sigmas_type="sigma_min", lower_order_final=False), 20),
    ("dpm++2m", "heun", dict(SD15, solver_type="heun"), 20),
    ("dpm++2m", "karras", dict(SD15, use_karras_sigmas=True), 20),
    ("dpm++2m", "cosine+lambda-clip", dict(SD15, beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), 20),
    ("dpm++2m", "linear-betas", dict(SD15, beta_schedule="linear", beta_start=0.0001, beta_end=0.02), 20),
]


@pytest.mark.conformance
@NO_DIFFUSERS_WARNINGS
@pytest.mark.parametrize("name,label,config,steps", VARIANTS, ids=[f"{v[0]}-{v[1]}" for v in VARIANTS])
def test_variants_match_diffusers(name, label, config, steps):
    _check(name, config, steps, label)


@pytest.mark.conformance
@NO_DIFFUSERS_WARNINGS
def test_euler_karras_matches_diffusers():
    # Karras timesteps are fractional and come from the training sigmas, whose torch sqrt may
    # differ by one ulp from ours: timesteps agree to float32 rounding rather than exactly.
    torch = pytest.importorskip("torch")
    cfg = dict(SD15, use_karras_sigmas=True)
    ref, ours = _diffusers("euler", cfg), make_scheduler("euler", cfg)
    ref.set_timesteps(20)
    ours.set_timesteps(20)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=3e-7)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SHAPE_NHWC).astype(np.float32) * np.float32(ours.init_noise_sigma)
    xr = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    for i, t in enumerate(ref.timesteps):
        mo = rng.standard_normal(SHAPE_NHWC).astype(np.float32)
        ref.scale_model_input(xr, t)
        expected = ref.step(torch.from_numpy(np.ascontiguousarray(mo.transpose(0, 3, 1, 2))), t, xr).prev_sample
        got = ours.step(mo, i, xr.numpy().transpose(0, 2, 3, 1))
        assert _rel(got, expected.numpy().transpose(0, 2, 3, 1)) <= STEP_RTOL
        xr = expected


# ----------------------------------------------------------------------------------------
# No diffusers needed below
# ----------------------------------------------------------------------------------------


def test_torch_linspace_emulation_known_values():
    # torch.linspace(0.1, 0.3, 17, dtype=float32) differs from np.linspace(..., dtype=float32)
    b = S.torch_linspace_f32(0.1, 0.3, 17)
    assert b.dtype == np.float32 and b[0] == np.float32(0.1) and b[-1] == np.float32(0.3)
    assert S.torch_linspace_f32(0.5, 0.7, 1).tolist() == [np.float32(0.5)]


def test_api_shapes_dtypes_and_layout_independence():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    eps = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    for name in NAMES:
        s = make_scheduler(name, SD21)
        ts = s.set_timesteps(5)
        assert ts is s.timesteps and len(ts) == 5 and s.num_inference_steps == 5
        assert isinstance(s.init_noise_sigma, float)
        y, y_t = x, x.transpose(0, 3, 1, 2)
        s2 = make_scheduler(name, SD21)
        s2.set_timesteps(5)
        for i in range(5):
            y_in = s.scale_model_input(y, i)
            assert y_in.dtype == np.float32
            y = s.step(eps, i, y)
            y_t = s2.step(eps.transpose(0, 3, 1, 2), i, y_t)
            np.testing.assert_array_equal(y, y_t.transpose(0, 2, 3, 1))  # elementwise: layout-free
        assert np.all(np.isfinite(y))
        # set_timesteps resets the multistep state: a rerun reproduces the result bit for bit
        s.set_timesteps(5)
        z = x
        for i in range(5):
            z = s.step(eps, i, z)
        np.testing.assert_array_equal(z, y)


def test_timestep_dtypes_match_diffusers_conventions():
    assert make_scheduler("ddim", SD15).set_timesteps(4).tolist() == [751, 501, 251, 1]
    assert make_scheduler("euler", SD15).set_timesteps(4).dtype == np.float32
    assert make_scheduler("dpm++2m", SD15).set_timesteps(4).tolist() == [801, 601, 401, 201]


def test_default_scheduler_from_class_name():
    assert isinstance(make_scheduler(None, SD21), S.DDIMScheduler)
    assert isinstance(make_scheduler(None, dict(SD15, _class_name="EulerDiscreteScheduler")), S.EulerDiscreteScheduler)
    assert isinstance(
        make_scheduler(None, dict(SD15, _class_name="DPMSolverMultistepScheduler")), S.DPMSolverMultistepScheduler
    )
    with pytest.raises(ValueError, match=r"PNDMScheduler.*not implemented.*'ddim', 'euler', 'dpm\+\+2m'"):
        make_scheduler(None, SD15)
    with pytest.raises(ValueError, match="no _class_name"):
        make_scheduler(None, {"beta_schedule": "linear"})
    # asked explicitly, a PNDM config runs as DDIM; other schedulers' keys are ignored and listed
    s = make_scheduler("ddim", SD15)
    assert "skip_prk_steps" in s.ignored_config_keys and "_class_name" in s.ignored_config_keys
    assert make_scheduler("DDIM", SD15).name == "ddim"


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown scheduler 'pndm'.*'ddim', 'euler', 'dpm\+\+2m'"):
        make_scheduler("pndm", SD15)
    with pytest.raises(ValueError, match="must be a JSON object"):
        make_scheduler("ddim", [("beta_schedule", "linear")])


@pytest.mark.parametrize(
    "name,key,value",
    [
        ("ddim", "beta_schedule", "cosine"),
        ("ddim", "prediction_type", "flow_prediction"),
        ("ddim", "timestep_spacing", "uniform"),
        ("ddim", "thresholding", True),
        ("ddim", "rescale_betas_zero_snr", True),
        ("ddim", "clip_sample", "yes"),
        ("ddim", "num_train_timesteps", 0),
        ("ddim", "steps_offset", 1.5),
        ("ddim", "beta_start", "small"),
        ("ddim", "trained_betas", [[0.1]]),
        ("euler", "interpolation_type", "log_linear"),
        ("euler", "timestep_type", "continuous"),
        ("euler", "use_exponential_sigmas", True),
        ("euler", "final_sigmas_type", "max"),
        ("dpm++2m", "algorithm_type", "sde-dpmsolver++"),
        ("dpm++2m", "solver_order", 3),
        ("dpm++2m", "solver_type", "bh2"),
        ("dpm++2m", "variance_type", "learned_range"),
        ("dpm++2m", "use_lu_lambdas", True),
        ("dpm++2m", "lower_order_final", "false"),
    ],
)
def test_unsupported_config_value_names_key_and_value(name, key, value):
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}")):
        make_scheduler(name, dict(SD15, **{key: value}))


def test_trained_betas_length_must_match():
    with pytest.raises(ValueError, match="trained_betas has 3 values"):
        make_scheduler("ddim", dict(SD15, trained_betas=[0.1, 0.2, 0.3]))


def test_set_timesteps_and_step_errors():
    for name in NAMES:
        s = make_scheduler(name, SD15)
        with pytest.raises(RuntimeError, match="set_timesteps"):
            s.step(np.zeros(3, np.float32), 0, np.zeros(3, np.float32))
        with pytest.raises(ValueError, match="positive integer"):
            s.set_timesteps(0)
        with pytest.raises(ValueError, match="exceeds num_train_timesteps=1000"):
            s.set_timesteps(1001)
        s.set_timesteps(4)
        with pytest.raises(IndexError, match=r"\[0, 4\)"):
            s.step(np.zeros(3, np.float32), 4, np.zeros(3, np.float32))
    dpm = make_scheduler("dpm++2m", SD15)
    dpm.set_timesteps(4)
    dpm.step(np.zeros(3, np.float32), 0, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="expected 1, got 2"):
        dpm.step(np.zeros(3, np.float32), 2, np.ones(3, np.float32))


def test_from_config_file(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "scheduler").mkdir()
    cfg_file = tmp_path / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps(SD21))
    for p in (tmp_path, tmp_path / "scheduler"):  # model folder, scheduler folder
        s = make_scheduler(None, load_scheduler_config(p))
        assert isinstance(s, S.DDIMScheduler) and s.config.prediction_type == "v_prediction"
    assert isinstance(make_scheduler("euler", load_scheduler_config(tmp_path)), S.EulerDiscreteScheduler)
    assert load_scheduler_config(tmp_path) == json.loads(json.dumps(SD21))

    with pytest.raises(WeightsError, match="no such folder"):
        load_scheduler_config(tmp_path / "nope")
    with pytest.raises(WeightsError, match="missing scheduler_config.json"):
        load_scheduler_config(_empty(tmp_path))
    cfg_file.write_text('{"beta_schedule": "linear",\n "steps_offset": }')
    with pytest.raises(ValueError, match=r"not valid JSON.*line 2"):
        load_scheduler_config(tmp_path)
    cfg_file.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_scheduler_config(tmp_path)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d
