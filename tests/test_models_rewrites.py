"""Rewrites at model level: the text encoder, UNet and VAE built with each
equivalence rewrite (and the equivalence parts of the 'paper' and 'google'
presets) stay within the float32 bound of the plain model; int8 weights and
structured pruning change the model and are measured and reported.

The bound, elementwise: ``|y_rw - y| <= BUDGET * u * max|y|`` with
``u = 2**-24`` (float32 unit roundoff) and ``BUDGET = 256``, the float32
entry of refsd's rounding-budget table (refsd/testing/rounding_budgets.py): a rewrite in
float32 only reorders sums or moves where float32 roundings happen, each
rewritten op adds a few ``u`` of its output's magnitude, and the tiny models
chain ~30 such ops with residual adds, so the accumulated error is tens of
``u`` (measured: 0 for fc_as_conv / gn4d / gelu_clip / gelu_fused /
softmax_partial_fused, 7-20 u for flash_attention, serial_conv and
group_norm_fused). Winograd F(4x4, 3x3) is the exception in kind: its
transforms multiply rounding errors by their coefficients (up to 2.5 in B^T
and 2.8 in A^T with LiteRT's interpolation points), so the op-level bound is stated against
``winograd_error_scale``, several times ``|y|`` (tolerance.winograd_budget);
at model level that is ``WINOGRAD_BUDGET = 2 * BUDGET`` (measured 40-60 u on
these inputs, up to ~100 u on others).

``gelu_clip`` rewrites *tanh*-GELU (its input clipping is exact because tanh
has saturated for |x| > 10); the models compute erf-GELU like diffusers, so
gelu_clip is compared against the same model built with
``gelu_approximate="tanh"``, and the tanh-vs-erf difference is reported.
"""

from __future__ import annotations

import numpy as np
import pytest

from refsd import weights
from refsd.models import EQUIVALENCE, prune
from refsd.monitor import monitoring
from refsd.numerics import U_F32
from refsd.tiny import make_tiny

BUDGET = 256
WINOGRAD_BUDGET = 2 * BUDGET
SERIAL_LIMIT = 4096  # elements per image: the tiny models' 16x16x32 activations exceed it, so convs serialize

# The op each rewrite puts into the graph, per component that has the replaced op.
REWRITTEN_OP = {
    "fc_as_conv": "fc_as_conv", "serial_conv": "serial_conv", "gn4d": "gn4d", "gelu_clip": "geglu_clip",
    "softmax_partial_fused": "softmax_partial_fused", "flash_attention": "flash_attention",
    "winograd": "conv2d_winograd", "gelu_fused": "geglu_fused", "group_norm_fused": "group_norm_fused",
    "embedding_1d": "embedding_1d",
}
NO_OP_IN = {  # (component, rewrite) pairs where the model has no op to rewrite
    ("text_encoder", "serial_conv"), ("text_encoder", "gn4d"), ("text_encoder", "winograd"),
    ("text_encoder", "group_norm_fused"), ("vae", "gelu_clip"), ("vae", "gelu_fused"),
    ("unet", "embedding_1d"), ("vae", "embedding_1d"),
}
PRESET_EQUIVALENT = {
    "paper-equivalent": "fc_as_conv,serial_conv,gn4d,gelu_clip,embedding_1d",  # 'paper' minus int8_weights
    "google": "google",
}
LOADERS = {"text_encoder": weights.load_text_encoder, "unet": weights.load_unet, "vae": weights.load_vae}


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def tiny(request, tmp_path_factory):
    return request.param, make_tiny(tmp_path_factory.mktemp(request.param), request.param, seed=0)


def _inputs(component: str):
    rng = np.random.default_rng(11)
    if component == "text_encoder":
        return (np.array([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70,
                          [49406, 49407] + [0] * 75]),)
    if component == "unet":
        lat = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
        return np.concatenate([lat, lat]), 981, rng.standard_normal((2, 77, 32)).astype(np.float32)
    return (rng.standard_normal((2, 16, 16, 4)).astype(np.float32),)


def _run(path, component, monitor=False, **kw):
    model = LOADERS[component](path / component, **kw)
    args = _inputs(component)
    if not monitor:
        return model(*args), None
    with monitoring() as mon:
        y = model(*args)
    return y, {op for (_, _, op) in mon.stats}


def _rel_u(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / (U_F32 * np.abs(b).max()))


_BASE: dict = {}


def _base(path, component, approx="none"):
    key = (str(path), component, approx)
    if key not in _BASE:
        _BASE[key] = _run(path, component, gelu_approximate=approx)[0]
    return _BASE[key]


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae"])
@pytest.mark.parametrize("rewrite", list(EQUIVALENCE) + list(PRESET_EQUIVALENT))
def test_equivalence_rewrite_within_f32_bound(tiny, component, rewrite, record_property):
    arch, path = tiny
    spec = PRESET_EQUIVALENT.get(rewrite, rewrite)
    clip = "gelu_clip" in spec
    y, ops = _run(path, component, monitor=True, rewrites=spec, serial_conv_limit=SERIAL_LIMIT)
    ref = _base(path, component, "tanh" if clip else "none")
    if rewrite in REWRITTEN_OP and (component, rewrite) not in NO_OP_IN:
        want = REWRITTEN_OP[rewrite]
        if component == "text_encoder" and rewrite in ("gelu_clip", "gelu_fused"):
            want = rewrite if arch == "sd21" else None  # SD 1.x CLIP uses quick_gelu: nothing to rewrite
        if want:
            assert want in ops, f"{rewrite} did not reach the graph of {component} (ops: {sorted(ops)})"
    budget = WINOGRAD_BUDGET if "winograd" in spec or spec == "google" else BUDGET
    err = _rel_u(y, ref)
    record_property(f"{arch}.{component}.{rewrite}.err_u", err)
    print(f"\n{arch} {component} {rewrite}: max|y_rw - y| = {err:.1f} u * max|y| (budget {budget})")
    assert y.shape == ref.shape
    assert err <= budget, f"{rewrite} on {component}: {err:.1f} u * max|y| > {budget} u"


@pytest.mark.parametrize("component", ["text_encoder", "unet"])
def test_tanh_vs_erf_gelu_reported(tiny, component, record_property):
    """Not a rewrite: the approximation a converter may choose. Measured only."""
    arch, path = tiny
    err = _rel_u(_base(path, component, "tanh"), _base(path, component))
    record_property(f"{arch}.{component}.tanh_vs_erf_rel", err * U_F32)
    print(f"\n{arch} {component}: tanh-GELU vs erf-GELU max rel error {err * U_F32:.2e}")
    assert np.isfinite(err)


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae"])
def test_int8_weights_error_reported(tiny, component, record_property):
    arch, path = tiny
    y, ops = _run(path, component, monitor=True, rewrites="int8_weights")
    assert "dequantize_int8" in ops
    ref = _base(path, component)
    err = _rel_u(y, ref) * U_F32
    record_property(f"{arch}.{component}.int8_rel", err)
    print(f"\n{arch} {component}: int8 weights max|y_int8 - y| / max|y| = {err:.2e}")
    assert np.isfinite(y).all() and np.isfinite(err) and err > 0


def test_int8_dequantized_weights_within_half_a_step(tiny):
    _, path = tiny
    unet = weights.load_unet(path / "unet", rewrites="int8_weights")
    conv = unet.down_blocks[0].resnets[0].conv1
    w, deq = np.asarray(conv.weight), conv.effective_weight()
    assert conv.int8.q.dtype == np.int8
    step = conv.int8.scale.reshape(1, 1, 1, -1)
    # ops.dequantize_int8's documented bound (fp16 normal range; 2**-25: fp16's floor below it)
    assert np.all(np.abs(deq - w) <= (step / 2 + 2.0**-11 * np.abs(w)) * (1 + 2.0**-10) + 2.0**-25)


@pytest.mark.parametrize("component", ["unet", "vae"])
def test_pruning_error_reported(tiny, component, record_property):
    arch, path = tiny
    model = LOADERS[component](path / component)
    pruned = prune(model, amount=0.25, min_weights=3 * 3 * 64 * 64)  # the tiny models' largest convs
    assert pruned and all(p.kept < p.total and p.weights_after < p.weights_before for p in pruned)
    assert all(p.path.startswith(component + ".") for p in pruned)
    y = model(*_inputs(component))
    ref = _base(path, component)
    err = _rel_u(y, ref) * U_F32
    record_property(f"{arch}.{component}.prune25_rel", err)
    print(f"\n{arch} {component}: pruning 25% input channels of {len(pruned)} convs: "
          f"max|y_pruned - y| / max|y| = {err:.2e}")
    assert np.isfinite(y).all() and np.isfinite(err)


def test_pruning_zero_amount_is_identity_and_int8_requantizes(tiny):
    _, path = tiny
    vae = weights.load_vae(path / "vae")
    assert prune(vae, amount=0.0, min_weights=1) == []
    with pytest.raises(ValueError):
        prune(vae, amount=1.0)
    q = weights.load_vae(path / "vae", rewrites="int8_weights")
    conv = q.decoder.conv_in
    before = conv.int8.q.shape
    prune(q, amount=0.5, min_weights=1)
    assert conv.int8.q.shape[2] == before[2] - before[2] // 2
