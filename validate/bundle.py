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

from refsd.safe_io import sha256_file  # noqa: F401 (re-exported: hashes of files named in a bundle)

SCHEMA = "refsd-capture"
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("schema") / f"capture-{SCHEMA_VERSION}.schema.json"
TENSOR_DTYPES = ("float32", "float16", "int32", "int64")



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


def __getattr__(name: str):
    # ``model_sha256`` moved next to the loader whose reads it covers (refsd.model_identity); re-exported
    # lazily so that writing a bundle on a device host still imports NumPy and the standard library only.
    if name == "model_sha256":
        from refsd.model_identity import model_sha256  # noqa: PLC0415

        return model_sha256
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
