"""The pipeline end to end against diffusers' StableDiffusionPipeline on the
same tiny folders, the same initial latents, 4 steps, guidance 7.5.

Bound: decoded image (0..1) max abs difference <= 1e-4 in f32. Each model
conforms to ~1e-6 relative (test_models_conformance); through 4 guided steps
(guidance 7.5 amplifies the cond - uncond difference) and the decoder that
stays ~1e-6, and 1e-4 is 1/40 of an 8-bit grey level.
"""

from __future__ import annotations

import numpy as np
import pytest

from refsd.monitor import Monitor
from refsd.pipeline import Pipeline, Request, initial_latents
from refsd.tiny import make_tiny

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT = "a photo of a cat"
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpm++2m": "DPMSolverMultistepScheduler"}


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def tiny(request, tmp_path_factory):
    return request.param, make_tiny(tmp_path_factory.mktemp(request.param), request.param, seed=0)


def _diffusers_image(path, scheduler: str, latents_nhwc: np.ndarray, negative: str, steps=4, size=32):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    cls = getattr(diffusers, SCHEDULERS[scheduler])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    lat = torch.from_numpy(np.ascontiguousarray(latents_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5,
                   height=size, width=size, latents=lat, output_type="np")
    return out.images[0]


@pytest.mark.conformance
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++2m"])
def test_pipeline_matches_diffusers(tiny, scheduler):
    arch, path = tiny
    pipe = Pipeline(path)
    req = Request(PROMPT, negative_prompt="blurry", steps=4, guidance=7.5, scheduler=scheduler, height=32, width=32)
    # diffusers multiplies supplied latents by init_noise_sigma, as refsd does with its seeded noise.
    noise = initial_latents(req.seed, 16, 16)  # the tiny VAE's scale factor is 2
    ours = pipe(req, progress=False)
    ref = _diffusers_image(path, scheduler, noise, "blurry")
    err = float(np.abs(ours.image - ref).max())
    print(f"\n{arch} {scheduler}: image max abs diff {err:.2e}")
    assert ours.image.shape == ref.shape == (32, 32, 3)
    assert err <= 1e-4, f"{arch} {scheduler}: image differs from diffusers by {err:.3e} > 1e-4"


def test_trace_names_and_shapes(tiny):
    _, path = tiny
    res = Pipeline(path)(Request(PROMPT, steps=2, scheduler="ddim", height=32, width=32), progress=False)
    t = res.trace
    assert t["text_encoder/hidden_states"].shape[:2] == (2, 77)
    assert t["scheduler/latents_init"].shape == (1, 16, 16, 4)
    for i in range(2):
        assert t[f"unet/step_{i}/noise_pred"].shape == (2, 16, 16, 4)
        assert t[f"scheduler/step_{i}/latents"].shape == (1, 16, 16, 4)
    assert t["vae/image"].shape == (1, 32, 32, 3)
    assert np.array_equal(res.image, np.clip(t["vae/image"][0] / 2 + 0.5, 0, 1))


def test_supplied_latents_replay_the_seed(tiny):
    _, path = tiny
    pipe = Pipeline(path)
    req = Request(PROMPT, steps=2, scheduler="ddim", height=32, width=32, seed=7)
    a = pipe(req, progress=False)
    b = pipe(Request(PROMPT, steps=2, scheduler="ddim", height=32, width=32, seed=999),
             latents=a.trace["scheduler/latents_init"], progress=False)
    assert np.array_equal(a.image, b.image)
    with pytest.raises(ValueError, match="multiples of the VAE scale factor"):
        pipe(Request(PROMPT, steps=1, height=33, width=32, scheduler="ddim"), progress=False)
    with pytest.raises(ValueError, match="initial latents must have shape"):
        pipe(req, latents=np.zeros((1, 4, 4, 4), np.float32), progress=False)


def test_low_memory_mode_frees_each_model_when_its_stage_ends(tiny, monkeypatch):
    """Staged loading drops a stage's model before the next one loads, by reference counting alone (the
    pipeline runs no garbage collection): no model, and no weight array of one, outlives its stage."""
    import gc
    import weakref

    _, path = tiny
    low = Pipeline(path, precision="f16", low_memory=True)
    load, alive = low._load, {}

    def tracked(name):
        model = load(name)
        alive[name] = [weakref.ref(model)] + [weakref.ref(w) for _, w in model.named_parameters()]
        return model

    def at_step(i, trace):
        assert all(r() is None for r in alive["text_encoder"]), "the text encoder outlived its stage"

    monkeypatch.setattr(low, "_load", tracked)
    gc.disable()
    try:
        low(Request(PROMPT, steps=2, scheduler="ddim", height=32, width=32), progress=False, on_step=at_step)
        assert set(alive) == {"text_encoder", "unet", "vae"}
        assert all(r() is None for refs in alive.values() for r in refs), {n: sum(r() is not None for r in refs)
                                                                          for n, refs in alive.items()}
    finally:
        gc.enable()


@pytest.mark.parametrize("precision", ["f32", "f32_f16", "f16"])
def test_low_memory_mode_is_bitwise_identical(tiny, precision):
    # Staged loading, and in fp16-storage modes float16 weight arrays, change
    # where the weights live, never a bit of the result.
    _, path = tiny
    req = Request(PROMPT, steps=2, scheduler="euler", height=32, width=32)
    a = Pipeline(path, precision=precision)(req, progress=False)
    low = Pipeline(path, precision=precision, low_memory=True)
    b = low(req, progress=False)
    assert np.array_equal(a.image.view(np.uint32), b.image.view(np.uint32))
    assert a.trace.keys() == b.trace.keys()
    for name in a.trace:
        assert np.array_equal(np.asarray(a.trace[name]).view(np.uint32), np.asarray(b.trace[name]).view(np.uint32)), name
    assert b.peak_rss_mb > 0
    unet = low.model("unet")
    dtypes = {w.dtype for _, w in unet.named_parameters()}
    assert dtypes == ({np.dtype(np.float16)} if precision != "f32" else {np.dtype(np.float32)})


def test_fp16_check_tiny_is_clean_in_f32_f16(tiny):
    _, path = tiny
    res = Pipeline(path, precision="f32_f16")(Request(PROMPT, steps=2, scheduler="ddim", height=32, width=32),
                                              monitor=Monitor(), progress=False)
    assert res.report.clean, res.report.table()
    assert np.isfinite(res.image).all()


@pytest.mark.parametrize("bad_request", [
    dict(steps=0), dict(height=0), dict(width=-8), dict(seed=-1),
])
def test_bad_requests(bad_request):
    with pytest.raises(ValueError):
        Request(PROMPT, **bad_request)
