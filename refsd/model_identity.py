"""A diffusers folder's identity: the sha256 of exactly the bytes the loader reads.

``model_sha256(DIR)`` hashes, in sorted order of their paths relative to DIR,
``relative path \\0 sha256(contents) \\n`` for each file that
``refsd.weights.load_pipeline`` (and so the pipeline, the exporter and the
validator's rerun) reads:

* ``model_index.json``;
* ``text_encoder/``, ``unet/``, ``vae/``: ``config.json`` and the weights as
  ``refsd.weights.find_weights`` finds them (the single ``.safetensors``, or
  the ``.safetensors.index.json`` and every shard it names, which are plain
  file names inside the component folder);
* ``tokenizer/``: the files of ``refsd.weights.TOKENIZER_FILES`` present;
* ``scheduler/scheduler_config.json``.

Nothing else: a README, an image, another variant's weights or a stray file
do not change the hash, and a byte changed in any file above does. A folder
the loader would refuse (a missing config, a shard index pointing out of the
folder, a FIFO) is refused here with the same error. Stable under copying
and re-rooting (paths are relative).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from refsd.models.loading import WeightsError
from refsd.safe_io import sha256_file
from refsd.weights import find_weights, tokenizer_files

COMPONENTS = ("text_encoder", "unet", "vae")


def model_files(model_dir: str | os.PathLike) -> list[Path]:
    """The files :func:`model_sha256` hashes (module docstring), in hashing order."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(2, "no such model folder", str(root))
    files = [root / "model_index.json", root / "scheduler" / "scheduler_config.json",
             *tokenizer_files(root / "tokenizer")]
    for comp in COMPONENTS:
        files += [root / comp / "config.json", *find_weights(root / comp)]
    return sorted(set(files), key=lambda p: p.relative_to(root).as_posix())


def model_sha256(model_dir: str | os.PathLike) -> str:
    """The identity of a diffusers folder (module docstring)."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for p in model_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p, error=WeightsError).encode()
                 + b"\n")
    return h.hexdigest()
