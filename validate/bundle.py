"""The capture bundle: what a device run leaves for the validator.

A bundle is a directory (or a ``.zip`` of one) holding ``capture.json``, valid
against ``schema/capture-1.schema.json``, and one ``.npy`` per tensor named in
its ``tensors`` table (file, dtype, shape and sha256 of the file's bytes, so
a truncated or swapped file is caught before it is compared). NumPy and the
standard library only: the writer runs next to an interpreter on a device
host, the reader inside CI.

Tensor names (DESIGN, "Tensor names and the capture bundle")::

    inputs/token_ids                  (2, 77) int64, [uncond, cond]
    scheduler/timesteps               (steps,) int64, as the scheduler ran them
    text_encoder/hidden_states        (2, 77, D), [uncond, cond]
    scheduler/latents_init            (1, h, w, 4), already times init_noise_sigma
    unet/step_{i}/noise_pred          (2, h, w, 4), the UNet's raw output [uncond, cond]
    scheduler/step_{i}/latents        (1, h, w, 4)
    vae/image                         (1, H, W, 3), the decoder's raw output (about [-1, 1])
    {stage}/step_{i}/{module path}    intermediates (``refsd.monitor.tensor_name``)

The file of tensor ``a/b/c`` is ``tensors/a/b/c.npy``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import numpy as np

SCHEMA = "refsd-capture"
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("schema") / f"capture-{SCHEMA_VERSION}.schema.json"
TENSOR_DTYPES = ("float32", "float16", "int32", "int64")

# Files of a diffusers folder that define the model (weights, configs, tokenizer);
# anything else in the folder (README, images, .git) does not change the hash.
_MODEL_SUFFIXES = (".json", ".safetensors", ".txt")


def tensor_file(name: str) -> str:
    """The bundle-relative file of tensor ``name``."""
    return f"tensors/{name}.npy"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_sha256(model_dir: str | os.PathLike) -> str:
    """A diffusers folder's identity: sha256 over the sorted (relative path,
    sha256 of contents) of its config, weight and tokenizer files. Stable under
    copying and re-rooting; any changed byte of a weight changes it."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(2, "no such model folder", str(root))
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _MODEL_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise ValueError(f"{root}: no model files (.json, .safetensors, .txt) to hash")
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in .npy format (never a pickle: object arrays are refused)."""
    if array.dtype.name not in TENSOR_DTYPES:
        raise ValueError(f"tensor dtype {array.dtype} is not one of {', '.join(TENSOR_DTYPES)}")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_bundle(out: str | os.PathLike, capture: Mapping, tensors: Mapping[str, np.ndarray]) -> Path:
    """Write a bundle directory: ``capture`` is capture.json without ``schema``,
    ``schema_version``, ``created`` (filled here unless given) and ``tensors``
    (built here from the arrays). Returns the directory."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    table = {}
    for name in sorted(tensors):
        data = npy_bytes(np.asarray(tensors[name]))
        path = root / tensor_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        arr = tensors[name]
        table[name] = {"file": tensor_file(name), "dtype": np.asarray(arr).dtype.name,
                       "shape": [int(s) for s in np.shape(arr)], "sha256": hashlib.sha256(data).hexdigest()}
    doc = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **capture, "tensors": table}
    (root / "capture.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return root
