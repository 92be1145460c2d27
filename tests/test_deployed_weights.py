"""The model as deployed: weights as stored in the .tflite and the kernels that ran them.

Exports: the tiny sd15 and sd21 models at 64x64 (``refsd export --height 64
--width 64``, default serial_conv limit, so no conv is split), int8 with
``none`` and ``paper`` rewrites, each built once per session; fp16 and the
pruned fp32 export are conftest's 16x16 ones (``tiny_export``).

Statistic: ``rel(a, b) = max|a - b| / max|b|``.

What is asserted, and why these bounds:

* **Weights, bit for bit.** refsd's ``quantize_int8`` of the checkpoint weight
  (times the folded LayerNorm gamma where the converter folded one) equals the
  converter's int8 values and scales exactly, for every int8 tensor; and refsd
  quantizes exactly the tensors the converter quantizes.
* **Hybrid kernels, op by op** (``conformance``). Every hybrid FULLY_CONNECTED
  and CONV_2D of the export is rerun with refsd's op on LiteRT's own input
  tensor. The int32 sums are exact on both sides, so where the int8 activations
  agree the outputs differ only by float32 roundings: the conversion of the sum
  (exact below 2**24), the product of the two scales (in either order: 1 u32),
  the product with the sum and the bias add (1 u32 each), all relative to
  max|y|: <= 4 u32 = 2.4e-7; bound ``KERNEL_TOL`` = 1e-6. An output beyond it
  comes from an activation whose quantization landed on the other side of a
  rounding tie (one int8 input one step off moves the <= fan-out = KH*KW*Cout
  outputs it feeds). Such flips are counted (at least n_bad / fan_out per op)
  and bounded: ``MAX_FLIP_RATE`` = 1e-5 of the activations quantized (measured:
  0 to 1 per 10**6, see the printout).
* **Components end to end** (``conformance``): measured and printed, not bounded
  tightly, because no bound short of the quantization step exists. A hybrid
  layer quantizes its input to 1/255 of its range, so any float32 difference
  upstream (GroupNorm, softmax, GELU kernels a few ulp apart: ~1e-6 relative,
  ~3e-4 of a quantization step) moves an activation across a rounding boundary
  with probability ~1e-4 per element; each such flip moves outputs by a full
  step (~1e-3 relative), which causes more flips downstream. The text encoder
  (few layers) stays at float32 noise; the UNet and the VAE diverge to the
  quantization-noise level. What is asserted: the hybrid rerun is no further
  from LiteRT than dequantized weights are (``<=``, with margin 2 for the chaotic
  part), and the text encoder is within the float32 bound where no flip
  occurred.
* **fp16 weights**: refsd ``weights="fp16"`` (precision f32) against LiteRT on
  the fp16 export must be closer than refsd's fp32 weights are (UNet, VAE): the
  rounding of the stored parameters is reproduced; what remains is the
  converter's constant folding, rounded after folding (``fp16(W * gamma)`` for
  LayerNorm affines folded into the next FC, scalar factors folded into convs),
  which refsd does not read back for fp16. In the text encoder, where every
  LayerNorm is folded, rounding W and gamma separately is no closer than not
  rounding (measured 1.1e-3 vs 7.2e-4): only printed there.
* **Pruning** declared as the rewrite ``prune=0.5:30000`` is exported and rerun
  identically: fp32 bound (1e-5, as tests/test_export.py).
"""

from __future__ import annotations


import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

from litert_helpers import manifest, run
from refsd import weights
from refsd.export.tflite_weights import read_int8_tflite, read_int8_weights
from refsd.models.loading import round_bf16
from refsd.models.module import Conv2d, Embedding, Linear
from refsd.models.options import Int8Weight, ModelOptions
from refsd.models.rewrites import Rewrites
from refsd.numerics import round_f16
from refsd.ops.hybrid import conv2d_hybrid_int8, linear_hybrid_int8, quantize_activations
from refsd.ops.quant import quantize_int8

SIZE = 64
FP32_TOL = 1e-5
KERNEL_TOL = 1e-6
MAX_FLIP_RATE = 1e-5
COMPONENTS = ("text_encoder", "unet", "vae")
LOADERS = {"text_encoder": weights.load_text_encoder, "unet": weights.load_unet, "vae": weights.load_vae}
PRUNE = "prune=0.5:30000"  # half the input channels of the tiny models' 3x3 convs over >= 64 channels


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="session")
def models(tiny_sd15, tiny_sd21):
    return {"sd15": tiny_sd15, "sd21": tiny_sd21}


@pytest.fixture(scope="session")
def deployed(models, tmp_path_factory):
    """``deployed(arch, weights, rewrites)`` -> export folder at 64x64, built once per session."""
    cache = {}

    def get(arch: str, stored: str, rewrites: str = "none"):
        key = (arch, stored, rewrites)
        if key not in cache:
            from refsd.export.build import export

            out = tmp_path_factory.mktemp(f"deployed_{arch}_{stored}")
            export(models[arch], out, weights=stored, rewrites=rewrites, height=SIZE, width=SIZE, progress=False)
            cache[key] = out
        return cache[key]

    return get






def feeds(folder) -> dict:
    shapes = {n: {k: v["shape"] for k, v in c["inputs"].items()} for n, c in manifest(folder)["components"].items()}
    rng = np.random.default_rng(7)
    return {
        "text_encoder": {"input_ids": rng.integers(0, 49408, shapes["text_encoder"]["input_ids"]).astype(np.int32)},
        "unet": {"sample": rng.standard_normal(shapes["unet"]["sample"]).astype(np.float32),
                 "timestep": np.array([501.0], np.float32),
                 "encoder_hidden_states": rng.standard_normal(shapes["unet"]["encoder_hidden_states"])
                 .astype(np.float32)},
        "vae": {"latents": rng.standard_normal(shapes["vae"]["latents"]).astype(np.float32)},
    }




def rerun(model_dir, folder, name, feed, **options):
    """refsd on the export's graph rewrites (and pruning) with ``options``."""
    from refsd.export.build import graph_rewrites

    m = manifest(folder)
    rw = graph_rewrites(m["rewrites"], serial_conv_limit=m["serial_conv_limit"])
    model = LOADERS[name](model_dir / name, options=ModelOptions.make(rewrites=rw, **options))
    if name == "text_encoder":
        return model(feed["input_ids"].astype(np.int64))
    if name == "unet":
        return model(feed["sample"], feed["timestep"][0], feed["encoder_hidden_states"])
    return model.decode_latents(feed["latents"])


# ---------------------------------------------------------------- weights, bit for bit


@pytest.mark.conformance
@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_quantize_int8_is_the_converters_bit_for_bit(models, deployed, arch):
    folder = deployed(arch, "int8")
    for name in COMPONENTS:
        state = weights.load_component_state(models[arch] / name)
        values = read_int8_tflite(folder / f"{name}.tflite", name)
        own = LOADERS[name](models[arch] / name, options=ModelOptions.make(weights="int8"))
        layers = {f"{p}.weight": m for p, m in own.named_modules() if isinstance(m, (Linear, Conv2d, Embedding))}
        # the same tensors are int8: refsd's eligibility rule is the converter's (the exported
        # VAE is decode_latents: its encoder and quant_conv are not in the graph)
        used = {k for k, m in layers.items() if m.int8 is not None and not k.startswith(("encoder.", "quant_conv."))}
        assert set(values) == used, name
        for key, v in values.items():
            w = np.asarray(state[key], np.float32)
            if v.fold is not None:
                w = w * np.asarray(state[f"{v.fold}.weight"], np.float32)[None, :]  # W * gamma
            mod = layers[key]
            if isinstance(mod, Conv2d):
                w = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO, refsd's layout (the reader converts OHWI)
            q, scale = quantize_int8(w, axis=mod._axis)
            got_q = mod._own_layout(v.q)
            assert np.array_equal(got_q, q) and np.array_equal(v.scale, scale), key
            if v.fold is None:  # refsd's own quantization of the loaded model is the same
                assert np.array_equal(mod.int8.q, q) and np.array_equal(mod.int8.scale, scale), key


# ---------------------------------------------------------------- hybrid kernels, op by op


def _hybrid_ops(path):
    """(kind, input index, output index, int8 weight in refsd layout, scales, bias index or None,
    FC asymmetric option, conv stride, conv padding) of every hybrid op, from the flatbuffer."""
    raw = path.read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(raw, 0))
    graph = model.subgraphs[0]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        kind = names[max(code.builtinCode, code.deprecatedBuiltinCode)]
        if kind not in ("FULLY_CONNECTED", "CONV_2D"):
            continue
        t = graph.tensors[op.inputs[1]]
        if t.type != schema.TensorType.INT8:
            continue
        q = np.frombuffer(np.asarray(model.buffers[t.buffer].data, np.uint8).tobytes(), np.int8).reshape(t.shape)
        bias = op.inputs[2] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
        opt = op.builtinOptions
        if kind == "FULLY_CONNECTED":
            yield kind, op.inputs[0], op.outputs[0], q, t.quantization.scale, bias, opt.asymmetricQuantizeInputs, 1, 0
        else:
            yield (kind, op.inputs[0], op.outputs[0], np.ascontiguousarray(q.transpose(1, 2, 3, 0)),
                   t.quantization.scale, bias, True, (opt.strideH, opt.strideW), opt.padding)


def _same_padding(x_shape, kernel, stride):
    """TFLite's SAME padding as refsd's ((top, bottom), (left, right))."""
    pads = []
    for n, k, s in zip(x_shape[1:3], kernel, stride):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


@pytest.mark.conformance
@pytest.mark.parametrize("arch, rewrites", [("sd15", "none"), ("sd15", "paper"), ("sd21", "none"), ("sd21", "paper"),
                                            ("sd15", "paper-16x16-split")])
def test_hybrid_kernels_match_litert_op_by_op(deployed, tiny_export, arch, rewrites):
    # the last: conftest's 16x16 export, whose paper graph has serialized convs
    folder = tiny_export("int8", "paper") if rewrites.endswith("split") else deployed(arch, "int8", rewrites)
    inputs = feeds(folder)
    report = {}
    for name in COMPONENTS:
        _, it = run(folder, name, inputs[name], preserve=True)
        flips = quantized = ops = 0
        for kind, xi, yi, q, scale, bi, asym, stride, pad in _hybrid_ops(folder / f"{name}.tflite"):
            x, y = it.get_tensor(xi), it.get_tensor(yi)
            b = None if bi is None else it.get_tensor(bi)
            if kind == "FULLY_CONNECTED":
                got = linear_hybrid_int8(x.reshape(-1, q.shape[1]), q, scale, b, asymmetric=bool(asym))
                fan_out = q.shape[0]
            else:
                padding = _same_padding(x.shape, q.shape[:2], stride) if pad == schema.Padding.SAME else 0
                got = conv2d_hybrid_int8(x, q, scale, b, stride=stride, padding=padding)
                fan_out = q.shape[0] * q.shape[1] * q.shape[3]
            bad = int((np.abs(got.reshape(y.shape) - y) > KERNEL_TOL * np.abs(y).max()).sum())
            flips += -(-bad // fan_out)
            quantized += x.size
            ops += 1
        report[name] = (ops, flips, quantized)
        assert ops > 0
        assert flips <= MAX_FLIP_RATE * quantized, (name, flips, quantized)
    print(f"\n{arch} {rewrites}: hybrid ops rerun on LiteRT's inputs (ops, activation flips, activations): {report}")


# ---------------------------------------------------------------- components end to end


@pytest.mark.conformance
@pytest.mark.parametrize("rewrites", ["none", "paper"])
@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_int8_components_against_litert(models, deployed, arch, rewrites):
    folder = deployed(arch, "int8", rewrites)
    values = read_int8_weights(folder)
    inputs = feeds(folder)
    rows = []
    for name in COMPONENTS:
        got, _ = run(folder, name, inputs[name])
        hybrid = rerun(models[arch], folder, name, inputs[name], weights="int8", int8_kernels="hybrid",
                       int8_values=values)
        dequant = rerun(models[arch], folder, name, inputs[name], weights="int8", int8_kernels="dequantize",
                        int8_values=values)
        e_h, e_d = rel(hybrid, got), rel(dequant, got)
        rms = float(np.sqrt(np.mean((hybrid.astype(np.float64) - got) ** 2) / np.mean(got.astype(np.float64) ** 2)))
        rows.append(f"{name}: hybrid {e_h:.1e} (rms {rms:.1e}), dequantized {e_d:.1e}")
        assert np.isfinite(hybrid).all()
        assert e_h <= 2 * e_d, (name, e_h, e_d)
        if name == "text_encoder":
            assert e_h <= FP32_TOL, e_h
    print(f"\n{arch} int8 {rewrites} vs LiteRT CPU: " + "; ".join(rows))


@pytest.mark.conformance
def test_serialized_conv_parts_are_quantized_and_run_per_part(models, tiny_export):
    """conftest's 16x16 paper export splits the tiny UNet's 8x8x96 convs (serial_conv_limit
    4096): the converter quantizes each part on its own, and each hybrid part quantizes its
    slice of the input on its own."""
    folder = tiny_export("int8", "paper")
    values = read_int8_weights(folder)
    split = {k: v for k, v in values["unet"].items() if v.scale.ndim == 2}
    assert split
    limit = manifest(folder)["serial_conv_limit"]
    own = weights.load_unet(models["sd15"] / "unet", weights="int8", rewrites="paper", serial_conv_limit=limit)
    convs = dict(own.named_modules())
    for key, v in split.items():
        q, scale = convs[key[: -len(".weight")]]._int8_split(v.scale.shape[0])
        assert np.array_equal(q, v.q) and np.array_equal(scale, v.scale), key
    feed = feeds(folder)["unet"]
    got, _ = run(folder, "unet", feed)
    hybrid = rerun(models["sd15"], folder, "unet", feed, weights="int8", int8_kernels="hybrid", int8_values=values)
    dequant = rerun(models["sd15"], folder, "unet", feed, weights="int8", int8_kernels="dequantize", int8_values=values)
    print(f"\nsd15 int8 paper 16x16 (split convs) UNet vs LiteRT: hybrid {rel(hybrid, got):.1e}, "
          f"dequantized {rel(dequant, got):.1e}")
    assert rel(hybrid, got) <= 2 * rel(dequant, got)


# ---------------------------------------------------------------- fp16 weights


@pytest.mark.conformance
def test_fp16_weights_reproduce_the_stored_parameters(models, tiny_export):
    folder = tiny_export("fp16", "none")  # shared with tests/test_export.py (16x16)
    inputs = feeds(folder)
    rows = []
    for name in COMPONENTS:
        got, _ = run(folder, name, inputs[name])
        e16 = rel(rerun(models["sd15"], folder, name, inputs[name], weights="fp16"), got)
        e32 = rel(rerun(models["sd15"], folder, name, inputs[name]), got)
        rows.append(f"{name}: fp16 weights {e16:.1e}, fp32 weights {e32:.1e}")
        if name != "text_encoder":  # there the converter folds each LayerNorm into fp16(W * gamma)
            assert e16 < e32, (name, e16, e32)
    print("\nsd15 fp16 export vs refsd f32: " + "; ".join(rows))


# ---------------------------------------------------------------- pruning as a deployment


def test_pruned_export_reruns_with_the_declared_rewrite(models, tiny_export):
    folder = tiny_export("fp32", PRUNE)  # conftest's 16x16 export of the tiny sd15
    assert PRUNE in manifest(folder)["rewrites"]
    inputs = feeds(folder)
    for name in ("unet", "vae"):
        got, _ = run(folder, name, inputs[name])
        pruned = rerun(models["sd15"], folder, name, inputs[name])
        assert rel(pruned, got) <= FP32_TOL, name
        unpruned = LOADERS[name](models["sd15"] / name)
        if name == "vae":
            assert rel(unpruned.decode_latents(inputs[name]["latents"]), got) > 100 * FP32_TOL  # it really pruned


# ---------------------------------------------------------------- the API (no LiteRT)


def test_storage_options_round_every_parameter(tiny_sd15):
    for stored, rounding in (("fp16", round_f16), ("bf16", round_bf16)):
        vae = weights.load_vae(tiny_sd15 / "vae", weights=stored)
        for key, w in vae.named_parameters():
            assert np.array_equal(rounding(w), w), (stored, key)
    # bf16 keeps 8 significant bits: 1 + 2**-8 lies halfway between 1 and 1 + 2**-7 (ties to even)
    x = np.array([1.0, 1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 1 + 2.0**-8 + 2.0**-20], np.float32)
    np.testing.assert_array_equal(round_bf16(x), [1.0, 1.0, 1 + 2.0**-6, -1.0, 1 + 2.0**-7])


def test_int8_weights_rewrite_is_the_dequantize_option(tiny_sd15):
    rng = np.random.default_rng(3)
    args = (rng.standard_normal((2, 8, 8, 4)).astype(np.float32), 301.0,
            rng.standard_normal((2, 77, 32)).astype(np.float32))
    a = weights.load_unet(tiny_sd15 / "unet", rewrites="int8_weights")(*args)
    b = weights.load_unet(tiny_sd15 / "unet", weights="int8", int8_kernels="dequantize")(*args)
    assert np.array_equal(a, b)


def test_int8_values_replace_refsd_quantization(tiny_sd15):
    unet = weights.load_unet(tiny_sd15 / "unet", weights="int8")
    conv = unet.conv_out
    q = np.ones_like(conv.int8.q)
    scale = np.full(conv.int8.scale.shape, 0.5, np.float32)
    given = weights.load_unet(tiny_sd15 / "unet", weights="int8", int8_values={"unet": {"conv_out.weight": (q, scale)}})
    assert isinstance(given.conv_out.int8, Int8Weight) and np.array_equal(given.conv_out.int8.q, q)
    assert given.conv_in.int8 is None  # values given: exactly those listed are int8
    with pytest.raises(weights.WeightsError, match="conv_nope.weight"):
        weights.load_unet(tiny_sd15 / "unet", weights="int8", int8_values={"unet": {"conv_nope.weight": (q, scale)}})
    with pytest.raises(weights.WeightsError, match="do not match"):
        weights.load_unet(tiny_sd15 / "unet", weights="int8", int8_values={"unet": {"conv_out.weight": (q[..., :2], scale)}})


@pytest.mark.parametrize("kwargs, message", [
    ({"weights": "int4"}, "unknown weights 'int4'"),
    ({"int8_kernels": "npu"}, "unknown int8_kernels 'npu'"),
    ({"int8_values": {}}, "need weights='int8'"),
    ({"weights": "int8", "int8_values": {"vea": {}}}, "unknown component 'vea'"),
    ({"weights": "fp16", "rewrites": "int8_weights"}, "contradicts weights='fp16'"),
    ({"rewrites": "prune=1.5"}, "prune amount must lie in \\[0, 1\\), got 1.5"),
    ({"rewrites": "pruning"}, "unknown rewrite 'pruning'"),
])
def test_unknown_values_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        ModelOptions.make(**kwargs)
    assert "\n" not in str(e.value)


def test_pruning_is_applied_by_the_loader(tiny_sd15):
    unet = weights.load_unet(tiny_sd15 / "unet", rewrites=PRUNE)
    kept = {p: m.in_keep.size for p, m in unet.named_modules() if isinstance(m, Conv2d) and m.in_keep is not None}
    assert kept and all(m.weight.shape[2] == kept[p] for p, m in unet.named_modules() if p in kept)
    assert str(Rewrites.parse(str(unet.rewrites))) == str(unet.rewrites) and PRUNE in str(unet.rewrites)


# ---------------------------------------------------------------- the hybrid ops against integer oracles


def test_quantize_activations_reconstructs_within_half_a_step():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 257)) * rng.uniform(0.01, 10, (6, 1))).astype(np.float32)
    x[1] = np.abs(x[1])  # all positive: rmin = 0, zero point -128
    x[2] = 0  # a zero row
    for asym in (True, False):
        qc, s, off = quantize_activations(x, asymmetric=asym)
        assert off[1] == (-128 if asym else 0)  # an all-positive row: rmin = 0 sits at qmin
        assert np.array_equal(qc, np.round(qc)) and np.abs(qc).max() <= 255
        err = np.abs(qc * s[:, None].astype(np.float64) - x)
        # half a step, + float32 noise of the scale and of x * (1 / scale) (a few u32 of 255 steps)
        assert np.all(err <= s[:, None] * (0.5 + 1e-4)), asym
        assert s[2] == 1 and np.all(qc[2] == 0)


@pytest.mark.parametrize("k", [64, 700])  # 700 * 255 * 128 > 2**24: the float64 path
def test_linear_hybrid_is_the_integer_formula(k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((5, k)).astype(np.float32)
    q = rng.integers(-127, 128, (9, k)).astype(np.int8)
    scale = rng.uniform(1e-3, 1e-2, 9).astype(np.float32)
    b = rng.standard_normal(9).astype(np.float32)
    qc, sx, _ = quantize_activations(x, asymmetric=True)
    acc = qc.astype(np.int64) @ q.T.astype(np.int64)  # the int32 sums, exactly
    want = acc.astype(np.float32) * (sx[:, None] * scale[None, :]) + b
    assert np.array_equal(linear_hybrid_int8(x, q, scale, b), want)


def test_conv_hybrid_is_the_integer_formula():
    """K = 3*3*96 = 864 > 514: the blocked float32 sums against a float64 oracle (exact: |sum| < 2**53),
    weights over the full int8 range (-128 included), zero padding contributing 0."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 6, 96)).astype(np.float32)
    q = rng.integers(-128, 128, (3, 3, 96, 5)).astype(np.int8)
    scale = rng.uniform(1e-3, 1e-2, 5).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    qc, sx, _ = quantize_activations(x.reshape(2, -1), asymmetric=True)
    xp = np.pad(qc.reshape(x.shape).astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    acc = np.zeros((2, 6, 6, 5))
    for i in range(3):
        for j in range(3):
            acc += np.einsum("nhwc,co->nhwo", xp[:, i:i + 6, j:j + 6], q[i, j].astype(np.float64))
    want = (acc.astype(np.float32) * scale) * sx[:, None, None, None] + b
    assert np.array_equal(conv2d_hybrid_int8(x, q, scale, b, padding=1), want)
