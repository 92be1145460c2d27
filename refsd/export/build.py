"""Build the .tflite files of a diffusers folder from refsd's own model classes.

One model definition, two executors: each component is loaded with
``ModelOptions.make(ops=refsd.export.tf_ops, rewrites=...)`` and its
``graph`` is traced into a ``tf.function`` at fixed shapes, then converted
with ``tf.lite.TFLiteConverter`` (builtin ops only, so an op without a
builtin kernel fails the export instead of silently needing Flex):

===============  =====================================================  ==========================
component        inputs                                                 output
===============  =====================================================  ==========================
text_encoder     ``input_ids`` (2, 77) int32, [uncond, cond]            (2, 77, D) hidden states
unet             ``sample`` (2, h, w, 4), ``timestep`` (1,) float32,    (2, h, w, 4) model output
                 ``encoder_hidden_states`` (2, 77, D)
vae              ``latents`` (1, h, w, 4)                               (1, H, W, 3) image
===============  =====================================================  ==========================

The UNet's timestep is an input, so one file serves every step; the VAE
includes ``latents / scaling_factor`` (it is ``decode_latents``).

``prune=AMOUNT[:MIN_WEIGHTS]`` among the rewrites exports the pruned model
(pruned as the loaders prune it: ``RootModel.deploy``); the manifest's
``rewrites`` then carries the token, so a bundle can declare the same pruning.

Weights: ``fp32``; ``fp16`` (float16 constants plus DEQUANTIZE ops, what the
GPU delegate reads natively; the timestep frequency table is then built as an
fp16-exact pair, see ``tf_ops.timestep_embedding``); ``int8`` (``Optimize.DEFAULT`` without a
representative dataset: per-channel int8 weights, and LiteRT's CPU kernels
then run *hybrid*, quantizing activations on the fly too).

``refsd_export.json`` beside the files records what was built (model sha256,
weights, rewrites, shapes, each file's sha256) and, per component, which
TFLite tensor holds each module's output (``tensors``: module path ->
TFLite tensor name and shape), found by tracing under
``refsd.context.recording()``: the capture runner names intermediates with it.
Modules whose output the converter folded into a later op (LayerNorm's affine
into the next FullyConnected) have no tensor and are not listed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from refsd import console
from refsd.export.tflite_edit import widen_gather_tables
from refsd.models.rewrites import Rewrites
from refsd.safe_io import read_json
from refsd.trace import CFG_ORDER, MODELS, TOKENS

WEIGHTS = ("fp32", "fp16", "int8")
# Rewrites that change the graph; the rest of refsd's rewrites are GPU kernel
# fusions (the delegate's business, not a graph) or, int8_weights, a storage choice (--weights int8).
GRAPH_REWRITES = ("fc_as_conv", "serial_conv", "gn4d", "gelu_clip", "embedding_1d", "prune")  # prune: the pruned weights
MANIFEST = "refsd_export.json"
BATCH = len(CFG_ORDER)  # [uncond, cond], as the pipeline runs the text encoder and the UNet


def graph_rewrites(spec="none", **params) -> Rewrites:
    """The rewrites an export applies: ``spec`` parsed as ``Rewrites.parse``,
    ``int8_weights`` dropped (weights are stored as ``--weights`` says), kernel
    fusions refused with a message (a .tflite cannot express them). Per-module
    fixes (``refsd.models.fixes``) are kept, but ``gn_fused`` (a kernel, the graph
    unchanged) and ``fp32`` (refused: no per-op precision in one .tflite)."""
    rw = Rewrites.parse(spec, **params)
    fusions = [n for n in rw if n not in GRAPH_REWRITES and n != "int8_weights"]
    if fusions:
        raise ValueError(f"rewrite{'s' * (len(fusions) > 1)} {', '.join(fusions)} "
                         f"{'are GPU kernel fusions' if len(fusions) > 1 else 'is a GPU kernel fusion'}, "
                         f"not a graph: export supports {', '.join(GRAPH_REWRITES)} (and int8_weights via "
                         "--weights int8)")
    fp32 = [str(f) for f in rw.fixes if f.kind == "fp32"]
    if fp32:
        raise ValueError(f"fix{'es' * (len(fp32) > 1)} {', '.join(fp32)} keep modules in fp32: one .tflite has no "
                         "per-op precision on a GPU accelerator, and export does not split out an fp32 sub-model; "
                         "run those modules on a CPU fallback")
    # gn_fused is a kernel choice (float32 sums inside GroupNorm): the graph is the plain one.
    return replace(rw, names=frozenset(n for n in rw if n in GRAPH_REWRITES),
                   fixes=tuple(f for f in rw.fixes if f.kind != "gn_fused"))


def input_specs(component: str, model, height: int, width: int) -> dict[str, tuple[tuple, str]]:
    """{input name: (shape, dtype)} of a component's graph at this image size."""
    if component == "text_encoder":
        return {"input_ids": ((BATCH, TOKENS), "int32")}
    if component == "unet":
        c = model.config
        ctx = c.per_block("cross_attention_dim")[0]
        return {"sample": ((BATCH, height, width, c.in_channels), "float32"), "timestep": ((1,), "float32"),
                "encoder_hidden_states": ((BATCH, TOKENS, ctx), "float32")}
    return {"latents": ((1, height, width, model.config.latent_channels), "float32")}


def _trace(model, specs: dict):
    """(concrete function, {module path: (TF op of its output, its shape)}) of ``model.graph``."""
    import tensorflow as tf  # noqa: PLC0415

    from refsd.context import location, recording  # noqa: PLC0415

    recorded: dict = {}
    signature = [tf.TensorSpec(shape, getattr(tf, dtype), name=name) for name, (shape, dtype) in specs.items()]

    def fn(*inputs):
        with location(model._name), recording(recorded):
            return model.run_graph(*inputs)

    concrete = tf.function(fn, input_signature=signature, autograph=False).get_concrete_function()
    prefix = f"{model._name}/"
    ops = {name[len(prefix):]: (t.op.name, [int(d) for d in t.shape]) for name, t in recorded.items()
           if hasattr(t, "op")}
    return concrete, ops


def _convert(concrete, weights: str) -> bytes:
    import tensorflow as tf  # noqa: PLC0415

    conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if weights in ("fp16", "int8"):
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if weights == "fp16":
        conv.target_spec.supported_types = [tf.float16]
    return conv.convert()


def _tensor_map(model_bytes: bytes, concrete, ops: dict[str, tuple[str, list]]) -> dict[str, dict]:
    """Module path -> {"tensor": name of the TFLite tensor holding its output, "shape"}.

    TFLite names the output of fused ops by their TF ops joined with ';'
    (``...layer_norm1/add_1;...q_proj/MatMul;...q_proj/add``: LayerNorm's affine
    folded into the next FullyConnected). Such a tensor holds the value of the
    *last* of them in graph order, so it stands for that op only; a module whose
    output op was folded into a later op has no tensor and is left out. The
    graph output is renamed by the converter and found by position."""
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

    order = {op.name: i for i, op in enumerate(concrete.graph.get_operations())}

    def op_of(part: str) -> str:
        # The converter makes tensor names unique by appending digits ("q_proj/add1").
        return part if part in order else part.rstrip("0123456789")

    interp = Interpreter(model_content=model_bytes)
    details = {d["index"]: (d["name"], [int(s) for s in d["shape"]]) for d in interp.get_tensor_details()}
    by_op: dict[str, tuple[str, list]] = {}
    for op in interp._get_ops_details():  # the public API has no op list
        for idx in op["outputs"]:
            name = details[idx][0]
            last = max((op_of(p) for p in name.split(";")), key=lambda part: order.get(part, -1))
            by_op[last] = details[idx]
    out = concrete.structured_outputs.op
    while out.type == "Identity":  # tf.function's output wrapper
        out = out.inputs[0].op
    by_op[out.name] = details[interp.get_output_details()[0]["index"]]
    # A tensor whose shape differs from the traced one carries a name the converter
    # moved while reordering (a RESHAPE hoisted above a FULLY_CONNECTED takes the
    # FC's name): not the module's output. tests/test_export.py checks the values.
    return {path: {"tensor": by_op[op][0], "shape": shape} for path, (op, shape) in ops.items()
            if op in by_op and by_op[op][1] == shape}


def export(model_dir, out, *, weights: str = "fp32", rewrites="none", height: int = 512, width: int = 512,
           serial_conv_limit: int | None = None, components=MODELS, progress: bool = True,
           gelu_approximate: str = "none") -> dict:
    """Export the components of a diffusers folder to ``out``/{component}.tflite
    and write ``out``/refsd_export.json; returns the manifest. ``gelu_approximate``:
    the GELU of the graph (``"tanh"``: the unfused tanh form, e.g. under a recipe's ``gelu_clip``)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    unknown = [c for c in components if c not in MODELS]
    if unknown:
        raise ValueError(f"unknown component {unknown[0]!r}; expected some of {', '.join(MODELS)}")
    params = {} if serial_conv_limit is None else {"serial_conv_limit": serial_conv_limit}
    rw = graph_rewrites(rewrites, **params)
    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(2, "not a diffusers folder (no model_index.json)", str(model_dir))
    from refsd.models.vae import VaeConfig  # noqa: PLC0415
    from refsd.weights import read_config  # noqa: PLC0415

    vae_config = model_dir / "vae" / "config.json"
    scale = VaeConfig.from_dict(read_config(vae_config), source=str(vae_config)).downscale
    if height < scale or width < scale or height % scale or width % scale:
        raise ValueError(f"height and width must be positive multiples of the VAE scale factor {scale}, "
                         f"got {height}x{width}")
    h, w = height // scale, width // scale
    from refsd.weights import check_component  # noqa: PLC0415

    for name in components:  # before TensorFlow loads: bad weights are one line in seconds, not a broken .tflite
        check_component(model_dir, name)
    out = Path(out)
    _check_out(out)

    from refsd.weights import model_sha256  # noqa: PLC0415
    from refsd.models.options import ModelOptions  # noqa: PLC0415
    from refsd.weights import load_model  # noqa: PLC0415

    tf_ops = _tf_namespace()
    options = ModelOptions.make(ops=tf_ops, rewrites=rw, gelu_approximate=gelu_approximate)
    manifest = {"format": "refsd-export", "version": 1, "model_sha256": model_sha256(model_dir),
                "weights": weights, "rewrites": str(rw), "serial_conv_limit": rw.serial_conv_limit,
                "gelu_approximate": gelu_approximate,
                "height": height, "width": width, "components": {}}
    bar = console.progress(components, desc="export", unit="model", enabled=progress)
    for name in bar:
        bar.set_postfix_str(f"{name}: tracing")
        model = load_model(model_dir / name, name, options=options)
        specs = input_specs(name, model, h, w)
        with tf_ops.fp16_exact_constants(weights == "fp16"):
            concrete, ops = _trace(model, specs)
        bar.set_postfix_str(f"{name}: converting ({weights})")
        data = _convert(concrete, weights)
        if weights == "fp16" and "embedding_1d" in rw:
            data = widen_gather_tables(data)  # else the GPU delegate refuses the 1-D GATHER (see tflite_edit)
        fname = f"{name}.tflite"
        tmp = out / (fname + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, out / fname)
        manifest["components"][name] = {
            "file": fname, "sha256": hashlib.sha256(data).hexdigest(),
            "inputs": {k: {"shape": list(s), "dtype": d} for k, (s, d) in specs.items()},
            "output": [int(s) for s in concrete.structured_outputs.shape],
            "tensors": _tensor_map(data, concrete, ops),
        }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def _check_out(out: Path) -> None:
    """``--out`` is a folder this process can create and write in (checked by writing a file there)."""
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def read_manifest(tflite_dir) -> dict:
    """``refsd_export.json`` of an export folder, with a one-line error if absent or not one."""
    path = Path(tflite_dir) / MANIFEST
    if not os.path.lexists(path):
        raise FileNotFoundError(2, f"no {MANIFEST} (not a folder written by 'refsd export')", str(tflite_dir))
    doc = read_json(path)  # refsd.safe_io: never blocks on a FIFO; UTF-8, strict JSON, nesting bounded
    if not isinstance(doc, dict) or doc.get("format") != "refsd-export":
        raise ValueError(f"{path}: not a refsd export manifest")
    return doc


def _tf_namespace():
    """``refsd.export.tf_ops`` with TensorFlow's NumPy behaviour on: the model
    code reshapes activations with ``.reshape`` (as on NumPy arrays), which
    tf.Tensor has only then. ``prefer_float32`` keeps Python floats float32."""
    import tensorflow as tf  # noqa: PLC0415

    tf.experimental.numpy.experimental_enable_numpy_behavior(prefer_float32=True)
    from refsd.export import tf_ops  # noqa: PLC0415

    return tf_ops


__all__ = ["BATCH", "GRAPH_REWRITES", "MANIFEST", "WEIGHTS", "export", "graph_rewrites",
           "input_specs", "read_manifest"]
