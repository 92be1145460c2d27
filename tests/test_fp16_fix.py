"""``refsd fp16-fix`` on tiny models broken in independent ways.

Each break is made in the weights (or, for the mask, in the deployment's declared
rewrites) so that it holds for any prompt and seed, not tuned to one run:

* ``scores``: a CLIP self-attention whose q and k projections are a constant
  bias ``b`` (weights zero), so every score is ``sqrt(d) b**2`` whatever the
  tokens: ``b`` sets it past 65504 (``SCORE_FP32``: even scaled, fp32 needed) or
  only its unscaled product past 65504 (``SCORE_SCALED``: ``scale_qk`` fixes it).
* ``gelu``: a GEGLU gate with the outliers SD's FF layers show (gate biases of
  41..80, the catalogue's values), under an unclipped tanh-GELU: ``x**3`` overflows.
* ``mask``: the text encoder's causal mask declared as a converter's -1e9
  (``mask@text_encoder=-1e9``): -inf in fp16.
* ``ftz``: ``conv_in``'s first group of output channels constant (weights 0, bias
  0.25), so the first resnet's GroupNorm sees a constant group; on FTZ hardware
  its eps flushes to zero and rsqrt(0) * 0 is NaN.

The expected fix sizes follow from the break: one fix per broken module, plus
(for FTZ) one eps per norm whose eps the monitor reports flushed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from refsd.fp16fix.recipe import make_recipe, read_recipe
from refsd.fp16fix.search import Search, ddmin
from refsd.models.fixes import Fix
from refsd.numerics import FP16_MAX, Precision
from refsd.pipeline import Request
from refsd.cli import main
from refsd.tiny import make_tiny
from refsd.weights import read_safetensors, write_safetensors

REQUEST = Request("a red cube", steps=1, height=16, width=16, scheduler="ddim")  # 8x8 latents: the breaks do not
# depend on the size, the cost does
F32_F16 = Precision("f32_f16")
ATTN = "text_model.encoder.layers.{}.self_attn"
FF = "mid_block.attentions.0.transformer_blocks.0.ff.net.0"
D = 8  # the tiny CLIP's head dim (32 / 4 heads)
SCORE_FP32 = 2 * FP16_MAX  # the stored score itself overflows
SCORE_SCALED = 0.6 * FP16_MAX  # only Q K^T before the 1/sqrt(d) scale overflows (sqrt(8) * 0.6 > 1)


def _edit(src, dst, component: str, fn) -> None:
    if not dst.exists():
        shutil.copytree(src, dst)
    path = dst / component / ("model.safetensors" if component == "text_encoder" else
                              "diffusion_pytorch_model.safetensors")
    state = {k: np.array(v) for k, v in read_safetensors(path).items()}
    fn(state)
    write_safetensors(path, state)


def _scores(layer: int, score: float):
    b = np.float32(np.sqrt(score / np.sqrt(D)))  # sqrt(d) b**2 = score

    def fn(state):
        for p in ("q_proj", "k_proj"):
            key = f"{ATTN.format(layer)}.{p}"
            state[f"{key}.weight"][:] = 0
            state[f"{key}.bias"][:] = b
    return fn


def _gelu(state):
    bias = state[f"{FF}.proj.bias"]
    gate = bias.shape[0] // 2
    bias[gate:gate + 6] = [41.0, -41.0, 45.5, -52.0, 64.0, -80.0]


def _constant_group(state):
    c = state["conv_in.bias"].shape[0] // 8  # the tiny UNet's norm_num_groups: one group's channels
    state["conv_in.weight"][:c] = 0
    state["conv_in.bias"][:c] = 0.25


@pytest.fixture(scope="module")
def tiny_seed(tmp_path_factory):
    made = {}

    def get(seed: int):
        if seed not in made:
            made[seed] = make_tiny(tmp_path_factory.mktemp(f"fix_tiny{seed}_") / "m", "sd21", seed)
        return made[seed]
    return get


@pytest.fixture(params=[0, 1], ids=["seed0", "seed1"])
def tiny(request, tiny_seed):
    return tiny_seed(request.param)


def _search(model, precision=F32_F16, **kw) -> Search:
    return Search(model, REQUEST, precision, measure_cost=False, **kw)


def _run(model, precision=F32_F16, **kw):
    s = _search(model, precision, **kw)
    return s, s.run()


def test_ddmin_finds_a_one_minimal_set_not_a_prefix():
    calls = []

    def test(sub):
        calls.append(tuple(sub))
        return {3, 11} <= set(sub)

    assert ddmin(list(range(16)), test) == [3, 11]
    assert ddmin([5], lambda sub: 5 in sub) == [5]


def test_fix_tokens_round_trip_and_hostile_values():
    from refsd.models.rewrites import Rewrites

    rw = Rewrites.parse("gn4d,eps@unet.mid_block.resnets.0.norm1=0.0001,fp32@unet.mid_block,mask@text_encoder=-1e9")
    assert Rewrites.parse(str(rw)) == rw
    assert rw.fix("fp32", "unet.mid_block.attentions.0").path == "unet.mid_block"  # applies below its path
    assert rw.fix("eps", "unet.mid_block.resnets.0.norm2") is None
    for bad in ("eps@x.y=1e-9", "eps@x.y", "gelu_clip@x=100", "fp32@a.b=1", "mask@t=nan", "nope@a", "eps@=1",
                "eps@a..b=0.001"):
        with pytest.raises(ValueError):
            Rewrites.parse(bad)
    with pytest.raises(ValueError, match="two eps fixes"):
        Rewrites.parse("eps@a.b=0.001,eps@a.b=0.01")


def test_healthy_model_gets_an_empty_recipe(tiny, tmp_path):
    s, r = _run(tiny)
    assert r.status == "clean" and r.chosen == [] and r.after is None
    doc = make_recipe(s, r)
    assert doc["fixes"] == [] and doc["rewrites"] == "none"
    (tmp_path / "r.json").write_text(json.dumps(doc))
    assert read_recipe(tmp_path / "r.json")["status"] == "clean"


def test_scores_past_fp16_need_that_attention_in_fp32(tiny, tmp_path):
    model = tmp_path / "m"
    _edit(tiny, model, "text_encoder", _scores(1, SCORE_FP32))
    _, r = _run(model)
    assert r.before.severe and r.status == "fixed", r.log
    assert r.fixes == [Fix("fp32", f"text_encoder.{ATTN.format(1)}")]
    assert r.after.psnr_db >= 30 and not r.after.severe


# f16 (the blocked model): the tiny VAE's plain GroupNorm sums of squares overflow there at 32x32 on
# its own (a separate, known break), so these deployments declare the fused GroupNorm kernel, and the
# fix found must be exactly the break's. f16 reruns cost 3x f32_f16's: one seed each, seed 0 and seed 1
# (~15 s each).


@pytest.mark.slow
def test_product_past_fp16_is_moved_by_scaling_q_first(tiny_seed, tmp_path):
    """In f16 the blocked Q K^T overflows before its scale: scale_qk (a rewrite) is enough."""
    model = tmp_path / "m"
    _edit(tiny_seed(0), model, "text_encoder", _scores(0, SCORE_SCALED))
    _, r = _run(model, Precision("f16"), rewrites="group_norm_fused")
    assert r.status == "fixed", r.log
    assert r.fixes == [Fix("scale_qk", f"text_encoder.{ATTN.format(0)}")]


@pytest.mark.slow
def test_gelu_outliers_get_gelu_clip_where_they_are(tiny_seed, tmp_path):
    model = tmp_path / "m"
    _edit(tiny_seed(1), model, "unet", _gelu)
    _, r = _run(model, Precision("f16"), gelu_approximate="tanh", rewrites="group_norm_fused")
    assert r.status == "fixed", r.log
    assert r.fixes == [Fix("gelu_clip", f"unet.{FF}", 10.0)]


def test_minus_1e9_mask_gets_minus_1e4_in_each_layer(tiny_seed):
    """The declared mask is a constant, independent of the weights: one seed."""
    _, r = _run(tiny_seed(1), rewrites="mask@text_encoder=-1e9")
    assert r.status == "fixed", r.log
    assert set(r.fixes) == {Fix("mask", f"text_encoder.{ATTN.format(i)}", -1e4) for i in (0, 1)}


def test_constant_group_under_ftz_gets_eps_where_it_flushes(tiny, tmp_path):
    model = tmp_path / "m"
    _edit(tiny, model, "unet", _constant_group)
    ftz = Precision("f32_f16", ftz=True)
    s, r = _run(model, ftz)
    norm = "unet.down_blocks.0.resnets.0.norm1"
    assert any(e.kind == "invalid" and e.path == norm for e in r.before.severe) or not np.isfinite(r.before.psnr_db)
    assert r.status == "fixed", r.log
    flushed = {e.path for e in s.teacher_events(frozenset()) if e.kind == "constant" and e.primitive == "eps"}
    assert {f.kind for f in r.fixes} == {"eps"} and {f.path for f in r.fixes} == flushed and norm in flushed


def test_two_independent_breaks_get_both_fixes_not_blanket_fp32(tiny_seed, tmp_path):
    model = tmp_path / "m"
    _edit(tiny_seed(0), model, "text_encoder", _scores(1, SCORE_FP32))
    _, r = _run(model, rewrites="mask@text_encoder=-1e9")
    assert r.status == "fixed", r.log
    assert set(r.fixes) == {Fix("fp32", f"text_encoder.{ATTN.format(1)}"),
                            *(Fix("mask", f"text_encoder.{ATTN.format(i)}", -1e4) for i in (0, 1))}


# ---------------------------------------------------------------- the command line and the recipe file


@pytest.fixture(scope="module")
def mask_fix(tiny_seed, tmp_path_factory):
    """``refsd fp16-fix`` on the -1e9 mask deployment: (model, its out folder, exit code)."""
    out = tmp_path_factory.mktemp("mask_fix")
    model = tiny_seed(0)
    rc = main(["fp16-fix", "--model", str(model), *REQUEST_ARGS, "--precision", "f32_f16",
               "--rewrites", "mask@text_encoder=-1e9", "--out", str(out)])
    return model, out, rc


REQUEST_ARGS = ["--prompt", REQUEST.prompt, "--steps", "1", "--height", "16", "--width", "16", "--scheduler", "ddim",
                "--quiet"]


def test_cli_writes_a_recipe_that_fp16_check_applies(mask_fix, capsys):
    model, out, rc = mask_fix
    assert rc == 0
    doc = read_recipe(out / "recipe.json")
    assert doc["status"] == "fixed" and len(doc["fixes"]) == 2
    assert all(f["why"]["kind"] == "constant" and f["why"]["primitive"] == "mask" for f in doc["fixes"])
    assert {p.name for p in out.iterdir()} >= {"recipe.json", "reference.png", "before.png", "after.png"}
    # In f32 the masked weights are exp(-1e4 - max) = 0 exactly, as with -1e9: the fix alone changes nothing.
    assert doc["fixes_cost_psnr_db"] == "inf"
    check = ["fp16-check", "--model", str(model), *REQUEST_ARGS, "--precision", "f32_f16"]
    assert main([*check, "--rewrites", "mask@text_encoder=-1e9"]) == 1
    assert main([*check, "--recipe", str(out / "recipe.json")]) == 0  # the recipe carries its deployment
    assert "no severe events" in capsys.readouterr().out.splitlines()[-1]


@pytest.mark.parametrize("edit, message", [
    (lambda d: "{not json", "--recipe"),
    (lambda d: {**d, "fixes": [{**d["fixes"][0], "kind": "blanket"}]}, "schema violation at fixes/0/kind"),
    (lambda d: {**d, "fixes": [{**d["fixes"][0], "value": -1e4 / 2}]}, "fixes/0: token"),
    (lambda d: {**d, "rewrites": "none"}, "is not deployment/rewrites plus the fixes"),
    (lambda d: {**d, "fixes": [{**d["fixes"][0], "kind": "eps", "token": "eps@" + d["fixes"][0]["path"] + "=1e-9",
                                "value": 1e-9}]}, "normal fp16"),
])
def test_a_bad_recipe_is_one_line_and_exit_2(mask_fix, tmp_path, capsys, edit, message):
    model, out, _ = mask_fix
    doc = json.loads((out / "recipe.json").read_text())
    bad = edit(doc)
    path = tmp_path / "bad.json"
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    assert main(["fp16-check", "--model", str(model), *REQUEST_ARGS, "--recipe", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and message in err[0], err


def test_export_refuses_fp32_fixes_and_keeps_the_others():
    from refsd.export.build import graph_rewrites

    with pytest.raises(ValueError, match="no per-op precision"):
        graph_rewrites("fp32@unet.mid_block")
    rw = graph_rewrites("gn4d,gn_fused@vae.decoder.conv_norm_out,scale_qk@unet.mid_block.attentions.0."
                        "transformer_blocks.0.attn1")
    assert [f.kind for f in rw.fixes] == ["scale_qk"]


@pytest.mark.slow
def test_certify_reads_the_fixes_from_the_bundles_rewrites(mask_fix, tmp_path):
    """A device running the fixed model declares the recipe's rewrites; the rerun applies them (~20 s)."""
    from refsd_validate.capture_emulated import emulated_capture
    from refsd_validate.certify import certify

    model, out, _ = mask_fix
    rewrites = read_recipe(out / "recipe.json")["rewrites"]
    bundle = emulated_capture(model, REQUEST, tmp_path / "b", precision="f32_f16", rewrites=rewrites,
                              declare_ftz=False)
    assert json.loads((bundle / "capture.json").read_text())["model"]["rewrites"] == rewrites
    cert = certify(bundle, model, mode="teacher", cache_dir=tmp_path / "cache")
    assert cert.certified, cert.first_failure


# ---------------------------------------------------------------- on real kernels


@pytest.mark.slow
def test_the_fixes_run_clean_on_litert_gpu_kernels(tiny_seed, tmp_path):
    """Every break at once on LiteRT's GPU accelerator in fp16 (lavapipe in CI), exported as declared and
    with the fixes the searches above find for each (every exportable kind: scale_qk, mask, gelu_clip,
    eps). The GPU's BATCH_MATMUL accumulates Q K^T in fp16 before the scale, so the declared deployment
    goes non-finite there; the fixed one runs finite and within the GPU capture's 30 dB of f32
    (tests/test_gpu_capture.py: a correct fp16 GPU run measured 37.8 dB). The other breaks do not break
    these kernels (Case.litert_gpu): their fixes must simply run clean. Skips without a GPU adapter
    (45-60 s with lavapipe: two exports and two captures)."""
    import ctypes.util

    pytest.importorskip("tensorflow")
    pytest.importorskip("ai_edge_litert")
    if ctypes.util.find_library("vulkan") is None:
        pytest.skip("no Vulkan loader (libvulkan1): see README 'GPU capture'")
    from refsd.image import psnr, to_image
    from refsd.models.options import ModelOptions
    from refsd.pipeline import Pipeline
    from refsd.trace import HIDDEN_STATES, IMAGE, MODELS
    from refsd_validate.fix_report import GPU_GRAPH
    from refsd_validate.gpu_certify import NO_ADAPTER, export_and_capture
    from refsd_validate.reader import read_bundle

    model = tmp_path / "m"
    _edit(tiny_seed(0), model, "text_encoder", _scores(0, SCORE_SCALED))
    _edit(tiny_seed(0), model, "unet", _gelu)
    _edit(tiny_seed(0), model, "unet", _constant_group)
    declared = ",".join(GPU_GRAPH) + ",mask@text_encoder=-1e9"
    fixes = [Fix("scale_qk", f"text_encoder.{ATTN.format(0)}"), Fix("gelu_clip", f"unet.{FF}", 10.0),
             Fix("eps", "unet.down_blocks.0.resnets.0.norm1", 1e-4),
             *(Fix("mask", f"text_encoder.{ATTN.format(i)}", -1e4) for i in (0, 1))]
    fixed = ",".join([declared, *map(str, fixes)])
    f32 = ModelOptions.make(rewrites=declared, gelu_approximate="tanh")
    ref = to_image(Pipeline(model, options={m: f32 for m in MODELS})(REQUEST, progress=False).trace[IMAGE][0])
    tensors = {}
    for name, rw in (("declared", declared), ("fixed", fixed)):
        ok, line = export_and_capture(model, tmp_path / f"t_{name}", tmp_path / f"b_{name}", REQUEST, rewrites=rw,
                                      gelu_approximate="tanh", intermediates=False)
        if not ok and NO_ADAPTER in line:
            pytest.skip(line)
        assert ok, line
        tensors[name] = read_bundle(tmp_path / f"b_{name}").tensors
    assert not np.isfinite(tensors["declared"][HIDDEN_STATES]).all()
    assert np.isfinite(tensors["fixed"][HIDDEN_STATES]).all() and np.isfinite(tensors["fixed"][IMAGE]).all()
    assert psnr(ref, to_image(tensors["fixed"][IMAGE][0])) >= 30


def test_a_fix_applies_at_its_path_and_below_only(tiny_seed):
    from refsd.monitor import monitoring
    from refsd.weights import load_text_encoder

    te = load_text_encoder(tiny_seed(0) / "text_encoder", precision="f32_f16",
                           rewrites=f"mask@text_encoder=-1e9,mask@text_encoder.{ATTN.format(0)}=-1e4")
    with monitoring() as mon:
        te(np.arange(77)[None] % 100)
    lost = {e.path for e in mon.report().events if e.severe}
    assert lost == {f"text_encoder.{ATTN.format(1)}"}  # the declared -1e9 everywhere but where the fix is


def test_the_budget_stops_the_search(tiny_seed, tmp_path):
    model = tmp_path / "m"
    _edit(tiny_seed(0), model, "text_encoder", _scores(1, SCORE_FP32))
    _, r = _run(model, max_reruns=7)  # as declared (3), teacher-forced (3), scale_qk's text encoder (1): out
    assert r.status == "budget" and r.reruns == 7 and r.after is None
    assert r.fixes == [Fix("scale_qk", f"text_encoder.{ATTN.format(1)}")]  # the rewrite tried: the best so far


@pytest.mark.parametrize("extra, needle", [
    (["--min-psnr", "nan"], "--min-psnr"),
    (["--max-reruns", "2"], "--max-reruns"),
    (["--precision", "f32"], "fp16 precision"),
    (["--rewrites", "eps@unet.conv_norm_out=1e-9"], "normal fp16"),
    (["--latents", "x.npy"], "--latents"),
])
def test_fp16_fix_bad_options_are_one_line_and_exit_2(tiny_seed, tmp_path, capsys, extra, needle):
    argv = ["fp16-fix", "--model", str(tiny_seed(0)), *REQUEST_ARGS, "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_the_fix_page_is_offline_and_names_each_fix(mask_fix, tmp_path):
    """fp16_fix.html as --verify-gpu writes it, here for a machine without a GPU adapter."""
    from refsd_validate.fix_report import render
    from refsd_validate.gpu_certify import GpuRun

    _, out, _ = mask_fix
    doc = read_recipe(out / "recipe.json")
    img = np.full((16, 16, 3), 0.5, np.float32)
    run = GpuRun(None, "LiteRT's GPU accelerator found no GPU adapter", True, tmp_path, tmp_path, tmp_path)
    page = render(doc, {"reference": img, "before": img, "after": img}, run)
    assert page.count('<img src="data:image/png;base64,') == 3 and "src=\"http" not in page
    assert all(f["token"] in page for f in doc["fixes"]) and "GPU capture skipped" in page


@pytest.mark.slow
def test_the_search_under_the_gpu_device_model_finds_scale_qk(tiny_seed, tmp_path):
    """--device-model litert-gpu: the GPU's BATCH_MATMUL accumulates in fp16 like the blocked model
    (README, 'fp16 on real GPU kernels'), so the same rewrite fixes it; its GroupNorm, GELU and
    subnormals do not break there (the declared deployment is otherwise clean). ~15 s."""
    model = tmp_path / "m"
    _edit(tiny_seed(1), model, "text_encoder", _scores(0, SCORE_SCALED))
    _, r = _run(model, Precision("f16", device_model="litert-gpu"))
    assert r.status == "fixed", r.log
    assert r.fixes == [Fix("scale_qk", f"text_encoder.{ATTN.format(0)}")]
