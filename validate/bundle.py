"""The capture bundle: what a device run leaves for the validator.

A bundle is a directory (or a ``.zip`` of one) holding ``capture.json``, valid
against ``schema/capture-2.schema.json`` (readers still accept version 1), and one ``.npy`` per tensor named in
its ``tensors`` table (file, dtype, shape and sha256 of the file's bytes, so
a truncated or swapped file is caught before it is compared). Light to import
(NumPy, jsonschema and refsd's NumPy-only core, no TensorFlow, PyTorch or
LiteRT): the writer runs next to an interpreter on a device host, the reader
inside CI.

Tensor names (``refsd.trace`` holds the contract; README, "Capture from your own runtime")::

    inputs/token_ids                  (2, 77) int64, [uncond, cond]
    scheduler/timesteps               (steps,) int64, as the scheduler ran them
    text_encoder/hidden_states        (2, 77, D), [uncond, cond]
    scheduler/latents_init            (1, h, w, 4), already times init_noise_sigma
    unet/step_{i}/noise_pred          (2, h, w, 4), the UNet's raw output [uncond, cond]
    scheduler/step_{i}/latents        (1, h, w, 4)
    vae/image                         (1, H, W, 3), the decoder's raw output (about [-1, 1])
    {stage}/step_{i}/{module path}    intermediates (``refsd.context.tensor_name``)

The file of tensor ``a/b/c`` is ``tensors/a/b/c.npy``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import numpy as np
from refsd_validate.declarations import refuse_bf16_precision

from refsd import trace
from refsd.models.vae import downscale
from refsd.safe_io import (
    check_schema,
    read_json,
    sha256_file,  # noqa: F401 (re-exported: hashes of files named in a bundle)
)
from refsd.trace import MODELS
from refsd.weights import model_sha256  # noqa: F401 (re-exported: a bundle names its model by this hash)

SCHEMA = "refsd-capture"
SCHEMA_VERSION = 2  # what write_bundle writes
SCHEMA_VERSIONS = (1, 2)  # what the reader accepts


def schema_path(version: int = SCHEMA_VERSION) -> Path:
    return Path(__file__).with_name("schema") / f"capture-{version}.schema.json"


TENSOR_DTYPES = ("float32", "float16", "int32", "int64")
FLOATS = ("float32", "float16")
INTS = ("int32", "int64")


class BundleError(ValueError):
    """A malformed bundle; the message is one line."""


@dataclass(frozen=True)
class ModelGeometry:
    """What a diffusers folder's configs say the boundary tensors look like."""

    text_hidden: int  # text_encoder hidden_size (D of the hidden states)
    vocab_size: int
    latent_channels: int  # unet in_channels
    unet_out_channels: int
    vae_scale: int  # image pixels per latent pixel
    image_channels: int

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelGeometry":
        root = Path(model_dir)

        def cfg(rel: str) -> dict:
            doc = read_json(root / rel, error=BundleError)
            if not isinstance(doc, dict):
                raise BundleError(f"{root / rel}: expected a JSON object")
            return doc

        def positive(doc: dict, rel: str, key: str) -> int:
            value = doc.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BundleError(f"{root / rel}: {key} must be a positive integer, got {value!r}")
            return value

        t, u, v = "text_encoder/config.json", "unet/config.json", "vae/config.json"
        text, unet, vae = cfg(t), cfg(u), cfg(v)
        blocks = vae.get("block_out_channels")
        if not isinstance(blocks, list) or not 1 <= len(blocks) <= 16:
            raise BundleError(f"{root / v}: block_out_channels must be a list of 1 to 16 entries")
        return cls(positive(text, t, "hidden_size"), positive(text, t, "vocab_size"), positive(unet, u, "in_channels"),
                   positive(unet, u, "out_channels"), downscale(blocks), positive(vae, v, "out_channels"))


def required_tensors(request: dict, geometry: ModelGeometry | None) -> dict[str, tuple[tuple | None, tuple]]:
    """Name -> (shape, allowed dtypes) of every tensor ``request`` requires, in
    pipeline order; shapes are None without the model's geometry."""
    height, width, steps = request["height"], request["width"], request["steps"]
    names = [trace.TOKEN_IDS, *trace.boundary_names(steps)]
    dtypes = {n: INTS if n == trace.TOKEN_IDS else FLOATS for n in names}
    if geometry is None:
        return {n: (None, dtypes[n]) for n in names}
    g = geometry
    if height % g.vae_scale or width % g.vae_scale:
        raise BundleError(f"request size {height}x{width} is not a multiple of the model's VAE scale {g.vae_scale}")
    h, w, c = height // g.vae_scale, width // g.vae_scale, g.latent_channels
    batch = len(trace.CFG_ORDER)
    shapes = {trace.TOKEN_IDS: (batch, trace.TOKENS), trace.HIDDEN_STATES: (batch, trace.TOKENS, g.text_hidden),
              trace.LATENTS_INIT: (1, h, w, c), trace.IMAGE: (1, height, width, g.image_channels)}
    for i in range(steps):
        shapes[trace.noise_pred(i)] = (batch, h, w, g.unet_out_channels)
        shapes[trace.latents(i)] = (1, h, w, c)
    return {n: (shapes[n], dtypes[n]) for n in names}


def tensor_file(name: str) -> str:
    """The bundle-relative file of tensor ``name``."""
    return f"tensors/{name}.npy"


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in .npy format (never a pickle: object arrays are refused)."""
    if array.dtype.name not in TENSOR_DTYPES:
        raise ValueError(f"tensor dtype {array.dtype} is not one of {', '.join(TENSOR_DTYPES)}")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def as_numpy(name: str, value) -> np.ndarray:
    """A tensor from any runtime as a NumPy array: NumPy arrays, anything with
    ``__array__`` (PyTorch on the CPU, JAX, TensorFlow eager tensors) or DLPack.
    One-line ``ValueError`` with the fix for what a bundle cannot hold."""
    if not isinstance(value, np.ndarray):
        if "bfloat16" in str(getattr(value, "dtype", "")):
            raise ValueError(f"tensor {name}: bfloat16 has no .npy dtype; widen it to float32 first (exact: every "
                             "bfloat16 value is a float32), e.g. t.float() in PyTorch")
        try:
            value = np.asarray(value) if hasattr(value, "__array__") or not hasattr(value, "__dlpack__") \
                else np.from_dlpack(value)
        except (TypeError, RuntimeError, BufferError, ValueError) as e:
            raise ValueError(f"tensor {name}: cannot be read as a NumPy array ({' '.join(str(e).split())}); "
                             "pass a NumPy array, or a CPU tensor exposing __array__ or __dlpack__") from None
    if value.dtype == np.float64:
        raise ValueError(f"tensor {name}: float64; cast it to float32 (what the reference compares; the device's "
                         "float16 or float32 values are exact in float32)")
    if value.dtype.name not in TENSOR_DTYPES:
        raise ValueError(f"tensor {name}: dtype {value.dtype} is not one of {', '.join(TENSOR_DTYPES)}")
    return value


def _to_nhwc(name: str, arr: np.ndarray, layout: str) -> np.ndarray:
    """Activations are NHWC in a bundle; a caller whose runtime is NCHW says so."""
    if layout == "NHWC" or arr.ndim != 4 or arr.dtype.kind != "f":
        return arr
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))


def check_document(doc: Mapping) -> None:
    """Raise ``ValueError`` (one line, naming the JSON path) unless ``doc`` is a
    capture.json of a version this validator reads, valid against its schema."""
    if not isinstance(doc, Mapping):
        raise ValueError("capture.json: not a JSON object")
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"capture.json: schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    version = doc.get("schema_version")
    if type(version) is not int or version not in SCHEMA_VERSIONS:  # not 2.0, not True
        raise ValueError(f"capture.json: unsupported schema_version {version!r} (this validator reads versions "
                         f"{', '.join(map(str, SCHEMA_VERSIONS))})")
    refuse_bf16_precision(doc)
    check_schema(doc, _schema(version), "capture.json")  # refsd.safe_io: integers strictly integers


@functools.cache
def _schema(version: int) -> dict:
    return json.loads(schema_path(version).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class StageDeclaration:
    """Where and in what precision one stage ran, as a bundle declares it,
    every field filled (:func:`declared_stages`)."""

    processor: str  # cpu | gpu | npu | dsp | host | other
    precision: str  # f32 | f32_f16 | f16 (refsd.numerics)
    ftz: bool | None  # fp16 subnormals flushed; None: unknown
    int8_kernels: str | None  # hybrid | dequantize, for int8 weights; else None
    fast_math: bool  # transcendentals as GPU shaders compute them
    fully_accelerated: bool | None
    fallback_ops: tuple[str, ...]
    runtime: str | None


def declared_stages(doc: Mapping) -> dict[str, StageDeclaration]:
    """Per stage (``refsd.trace.STAGES``), where and in what precision it ran,
    every field present. Version 2 declares it (``stages``); a version-1
    bundle had one delegate for the three models and ran guidance and the
    scheduler on the host in float32: its builtin CPU kernels (delegate
    ``none``) run int8 weights as hybrid kernels, a delegate dequantizes them."""
    weights = doc["model"].get("weights", "fp32")
    if doc["schema_version"] == 1:
        d = doc["runtime"]["delegate"]
        cpu = d["name"] == "none"
        model = {"processor": "cpu" if cpu else "other", "precision": d["precision"], "ftz": d.get("ftz"),
                 "int8_kernels": ("hybrid" if cpu else "dequantize") if weights == "int8" else None}
        stages = {s: dict(model) for s in MODELS}
        stages["guidance_scheduler"] = {"processor": "host", "precision": "f32", "ftz": None}
    else:
        stages = {s: dict(v) for s, v in doc["stages"].items()}
    out = {}
    for name, st in stages.items():
        kernels = st.get("int8_kernels")
        if weights == "int8" and kernels is None and name in MODELS:
            kernels = "hybrid" if st["processor"] in ("cpu", "host") else "dequantize"
        out[name] = StageDeclaration(
            st["processor"], st["precision"], st.get("ftz"), kernels if weights == "int8" else None,
            # GPU shaders' transcendentals are fast-math unless the capture says otherwise
            bool(st.get("fast_math", st["processor"] in ("gpu", "npu", "dsp"))), st.get("fully_accelerated"),
            tuple(st.get("fallback_ops", ())), st.get("runtime"))
    return out


def write_bundle(out: str | os.PathLike, capture: Mapping, tensors: Mapping[str, object], *,
                 layout: str = "NHWC", model_dir: str | os.PathLike | None = None) -> Path:
    """Write a bundle directory: ``capture`` is capture.json without ``schema``,
    ``schema_version``, ``created`` (filled here unless given) and ``tensors``
    (built here from the arrays: NumPy, or anything with ``__array__`` /
    ``__dlpack__``). ``layout="NCHW"``: every 4-D float tensor is transposed to
    NHWC (declare it only if all of them are NCHW). ``model_dir``: also check
    the model hash, every boundary tensor's shape against the model's configs
    (with a hint when a shape is an NCHW transpose) and intermediate names
    against what the reference records. Everything is checked before anything
    is written (``ValueError``, one line). Returns the directory."""
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    root = Path(out)
    arrays = {name: _to_nhwc(name, as_numpy(name, tensors[name]), layout) for name in sorted(tensors)}
    table = {name: {"file": tensor_file(name), "dtype": a.dtype.name, "shape": [int(s) for s in a.shape],
                    "sha256": "0" * 64} for name, a in arrays.items()}
    doc = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **capture, "tensors": table}
    check_document(doc)
    if model_dir is not None:
        _check_against_model(doc, arrays, model_dir)
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = npy_bytes(arr)
        path = root / tensor_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        table[name]["sha256"] = hashlib.sha256(data).hexdigest()
    (root / "capture.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return root


def _check_against_model(doc: Mapping, arrays: Mapping[str, np.ndarray], model_dir) -> None:
    from refsd.names import is_recorded, module_paths  # noqa: PLC0415

    sha = model_sha256(model_dir)
    if doc["model"]["sha256"] != sha:
        raise ValueError(f"model.sha256 is not {model_dir}'s ({sha}): use model_sha256(model_dir)")
    expected = required_tensors(doc["request"], ModelGeometry.from_dir(model_dir))
    missing = [n for n in expected if n not in arrays]
    if missing:
        raise ValueError(f"missing tensors ({len(missing)}): {', '.join(missing[:6])}")
    for name, (shape, dtypes) in expected.items():
        got = arrays[name]
        if got.dtype.name not in dtypes:
            raise ValueError(f"tensor {name}: dtype {got.dtype}, expected {' or '.join(dtypes)}")
        if tuple(got.shape) != shape:
            nchw = len(shape) == 4 and tuple(got.shape) == (shape[0], shape[3], shape[1], shape[2])
            raise ValueError(f"tensor {name}: shape {tuple(got.shape)}, the model implies {shape}"
                             + (" (NCHW: pass layout='NCHW', or transpose (0, 2, 3, 1))" if nchw else ""))
    paths = module_paths(model_dir)
    unknown = sorted(n for n in arrays if n not in expected and n != "scheduler/timesteps" and not is_recorded(n, paths))
    if unknown:
        raise ValueError(f"tensors the reference does not record ({len(unknown)}): {', '.join(unknown[:5])} "
                         "(see 'refsd-validate names --model DIR')")
    check_intermediate_shapes({n: a.shape for n, a in arrays.items() if n not in expected}, doc["request"], model_dir)


def _module_path(name: str) -> str | None:
    try:
        return trace.parse_name(name)[2]
    except ValueError:
        return None


def check_intermediate_shapes(shapes: Mapping[str, tuple], request: Mapping, model_dir) -> None:
    """Raise ``BundleError`` (one line) for the first intermediate in
    ``shapes`` (name -> shape) whose shape is not what the reference records
    at the request's size, naming an NCHW tensor as such. One f32 denoising
    step is run for the shapes (``refsd.names.recorded_shapes``), only when
    there are intermediates; names the reference does not record are skipped
    (listed elsewhere). A tensor identical for both CFG rows may be held with
    batch 1 (certify accepts it)."""
    from refsd.names import recorded_shape, recorded_shapes  # noqa: PLC0415

    inner = {n: tuple(int(d) for d in s) for n, s in shapes.items() if _module_path(n) is not None}
    if not inner:
        return
    recorded = recorded_shapes(model_dir, height=int(request["height"]), width=int(request["width"]))
    for name in trace.execution_order(list(inner)):
        want, got = recorded_shape(name, recorded), inner[name]
        if want is None or got == want.shape or (want.batch_invariant and got == (1, *want.shape[1:])):
            continue
        w = want.shape
        hint = ""
        if len(w) == 4 and got == (w[0], w[3], w[1], w[2]):
            hint = " (NCHW: bundles hold NHWC activations; transpose (0, 2, 3, 1), or write_bundle(..., layout='NCHW'))"
        elif len(w) == 3 and got == (w[0], w[2], w[1]):
            hint = " (N, C, L: bundles hold (N, L, C); transpose (0, 2, 1))"
        raise BundleError(f"tensor {name}: shape {got}, the reference records {w} at {request['height']}x"
                          f"{request['width']}{hint}")
