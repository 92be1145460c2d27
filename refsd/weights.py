"""Load a diffusers-format Stable Diffusion folder::

    sd/
      model_index.json
      text_encoder/  config.json  model.safetensors
      tokenizer/     vocab.json  merges.txt  tokenizer_config.json  special_tokens_map.json
      unet/          config.json  diffusion_pytorch_model.safetensors
      vae/           config.json  diffusion_pytorch_model.safetensors
      scheduler/     scheduler_config.json

Weights are read from safetensors only, memory-mapped (the 8-byte little-endian
header length, the JSON header, then ``np.memmap`` of the data: nothing is read
until used), float32 / float16 / bfloat16 as stored; a model converts them once
(conv OIHW -> HWIO, fp16 rounding in fp16-storage modes). Loading is strict:
a missing or unexpected key or a shape mismatch is one ``WeightsError``
naming the keys. PyTorch pickles (``.bin``, ``.ckpt``, ``.pt``) are refused,
never unpickled: unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from refsd.models.clip_text import ClipTextConfig, ClipTextModel
from refsd.models.loading import WeightsError, drop_mapped_pages
from refsd.models.options import ModelOptions
from refsd.models.unet import UNet2DConditionModel, UNetConfig
from refsd.models.vae import AutoencoderKL, VaeConfig
from refsd.safe_io import check_regular, check_schema, open_regular, parse_json, read_json, read_text, sha256_file
from refsd.trace import MODELS

__all__ = [
    "MODEL_CLASSES", "Components", "WeightsError", "find_weights", "load_component_state", "load_model", "load_pipeline",
    "load_scheduler_config", "load_text_encoder", "load_tokenizer", "load_unet", "load_vae", "model_files",
    "model_sha256", "read_config", "read_safetensors", "write_safetensors",
]

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {np.dtype(v).str: k for k, v in _DTYPES.items() if k != "BF16"}
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# What transformers' CLIPTokenizer reads from tokenizer/ (those present).
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                   "merges.txt", "tokenizer.json")
# A shard index: every tensor mapped to a plain file name of the component folder (never a path out of it).
_INDEX_SCHEMA = {
    "type": "object", "required": ["weight_map"],
    "properties": {"weight_map": {"type": "object", "minProperties": 1,
                                  "additionalProperties": {"type": "string",
                                                           "pattern": "^[^/\\\\]+\\.safetensors$"}}}}


# ---------------------------------------------------------------- safetensors


def read_safetensors(path: str | os.PathLike, *, metadata: bool = False):
    """{name: array} memory-mapped read-only from a ``.safetensors`` file
    (bfloat16 is widened to float32, the only copy made). With
    ``metadata=True`` returns ``(tensors, metadata_dict)``.

    Why not ``safetensors.numpy.load_file`` / ``safe_open(...).get_tensor``: they
    copy each tensor into memory (a 5 GB checkpoint is 5 GB of RSS before the
    model converts anything) and do not read bfloat16 into NumPy. Here every
    tensor is an ``np.memmap`` view of the file: nothing is read until used, and
    once a model holds its converted copy the loader drops the tensor's mapped
    pages (``refsd.models.loading.drop_mapped_pages``, which needs the mmap).

    The header is first checked by the ``safetensors`` library's own parser,
    stricter than a hand check: integer offsets and shapes, string dtypes,
    tensors contiguous and non-overlapping from offset 0, exactly covering
    the data (no byte shared by two tensors, none unaccounted for)."""
    path = Path(path)
    _refuse_pickle(path)
    size = check_regular(path, error=WeightsError)
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    try:
        with safe_open(path, framework="numpy"):
            pass
    except SafetensorError as e:
        raise WeightsError(f"{path}: corrupt safetensors file ({' '.join(str(e).split())[:300]})") from None
    with open_regular(path, error=WeightsError) as f:
        (n,) = struct.unpack("<Q", f.read(8))  # the library checked: 8 + n <= size, n within its limit
        header = parse_json(f.read(n), f"{path} (safetensors header)", WeightsError)
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    data_len = size - start
    buf = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(data_len,)) if data_len > 0 else \
        np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        dtype_name, shape, (a, b) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype_name not in _DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        arr = buf[a:b].view(_DTYPES[dtype_name]).reshape(shape)
        if dtype_name == "BF16":
            arr = (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
        out[name] = arr
    return (out, meta) if metadata else out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as safetensors with the ``safetensors`` library
    (deterministic: its layout orders tensors by dtype alignment, then name),
    ``metadata`` (default ``{"format": "pt"}``, which transformers requires),
    atomically (a temporary file renamed into place)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    meta = {"format": "pt"} if metadata is None else dict(metadata)
    arrays = {}
    for name, value in tensors.items():
        arr = np.asarray(value)
        key = arr.dtype.newbyteorder("<").str if arr.dtype.itemsize > 1 else arr.dtype.str
        if key not in _NAMES:
            raise ValueError(f"write_safetensors: unsupported dtype {arr.dtype} for {name!r}")
        # (not np.ascontiguousarray: it turns a 0-d array into 1-d)
        arrays[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    tmp = Path(str(path) + ".tmp")
    save_file(arrays, tmp, metadata={k: str(v) for k, v in meta.items()} or None)
    os.replace(tmp, path)


# ---------------------------------------------------------------- components


_WEIGHT_NAMES = {
    "text_encoder": "model",
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
}


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise WeightsError(_pickle_message([path]))


def _pickle_message(found: list[Path]) -> str:
    names = ", ".join(str(p) for p in found)
    return (
        f"refusing PyTorch pickle checkpoint(s) {names}: unpickling runs arbitrary code, so refsd reads "
        "safetensors only. Convert once, in an environment you trust (PyTorch + diffusers), e.g. in python:\n"
        "  a diffusers folder: StableDiffusionPipeline.from_pretrained(IN).save_pretrained(OUT, "
        "safe_serialization=True)\n"
        "  one component:      UNet2DConditionModel / AutoencoderKL / transformers.CLIPTextModel\n"
        "                      .from_pretrained(IN/<component>).save_pretrained(OUT/<component>, "
        "safe_serialization=True)\n"
        "  a single .ckpt:     StableDiffusionPipeline.from_single_file(CKPT).save_pretrained(OUT, "
        "safe_serialization=True)"
    )


def find_weights(component_dir: str | os.PathLike, *, variant: str | None = None) -> list[Path]:
    """The files the weights of one component folder are read from:
    ``<name>.safetensors`` (``<name>.<variant>.safetensors`` with a variant,
    e.g. ``fp16``), or a ``.safetensors.index.json`` followed by the shards it
    names (plain file names in the folder, never a path out of it), or the only
    ``*.safetensors`` there.
    A folder holding only pickles is refused with how to convert."""
    d = Path(component_dir)
    if d.is_file():
        _refuse_pickle(d)
        return [d]
    if not d.is_dir():
        raise WeightsError(f"{d}: no such component folder")
    base = _WEIGHT_NAMES.get(d.name)
    stems = [base] if base else []
    stems += [s for s in ("diffusion_pytorch_model", "model") if s not in stems]
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for stem in stems:
        single = d / f"{stem}{suffix}"
        if single.exists():
            return [single]
        index = d / f"{stem}{suffix}.index.json"
        if index.exists():
            return [index, *sorted({d / f for f in shard_map(index).values()})]
    candidates = sorted(p for p in d.glob("*.safetensors"))
    if variant is None:
        candidates = [p for p in candidates if p.name.count(".") == 1] or candidates
    if len(candidates) == 1:
        return candidates
    pickles = sorted(p for p in d.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if not candidates and pickles:
        raise WeightsError(_pickle_message(pickles))
    if not candidates:
        raise WeightsError(f"{d}: no safetensors weights found (expected {stems[0]}{suffix})")
    raise WeightsError(f"{d}: several safetensors files and no index; pass variant= to choose among "
                       f"{', '.join(p.name for p in candidates)}")


def load_component_state(component_dir: str | os.PathLike, *, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of a component folder, memory-mapped; duplicate keys across shards are an error."""
    files = find_weights(component_dir, variant=variant)
    index = shard_map(files.pop(0)) if files[0].name.endswith(".index.json") else None
    state: dict[str, np.ndarray] = {}
    for f in files:
        part = read_safetensors(f)
        dup = sorted(set(part) & set(state))
        if dup:
            raise WeightsError(f"{f}: keys already loaded from another shard: {', '.join(dup[:10])}")
        if index is not None:
            stray = sorted(k for k in part if index.get(k) != f.name)
            if stray:
                raise WeightsError(f"{f}: holds tensors its index does not map to it: {', '.join(stray[:10])}")
        state.update(part)
    if index is not None and set(index) - set(state):
        absent = sorted(set(index) - set(state))
        raise WeightsError(f"{files[0].parent}: tensors the index maps to a shard are in none: "
                           f"{', '.join(absent[:10])}")
    return state


def read_config(path: str | os.PathLike) -> dict:
    """A JSON object from a config file, read strictly (``refsd.safe_io.read_json``)."""
    doc = read_json(path, error=WeightsError)
    if not isinstance(doc, dict):
        raise WeightsError(f"{path}: expected a JSON object, got a JSON {type(doc).__name__}")
    return doc


def shard_map(index: Path) -> dict[str, str]:
    """tensor name -> shard file name of a ``*.safetensors.index.json`` (checked: plain file names only)."""
    doc = read_config(index)
    check_schema(doc, _INDEX_SCHEMA, str(index), WeightsError)
    return doc["weight_map"]


def _config(component_dir: Path, name: str = "config.json") -> dict:
    path = component_dir / name
    if not os.path.lexists(path):
        raise WeightsError(f"{component_dir}: missing {name}")
    return read_config(path)


def _build(model_cls, config_cls, d: Path, options: ModelOptions):
    """A model from ``d/config.json``; a config that types check but cannot build a model (groups that do
    not divide the channels, heads that do not divide the width) is named as that file's fault."""
    source = str(d / "config.json")
    config = config_cls.from_dict(_config(d), source=source)
    try:
        return model_cls(config, options=options)
    except ValueError as e:
        raise WeightsError(f"{source}: {' '.join(str(e).split())}") from None


def _options(options: ModelOptions | None, kw: dict) -> ModelOptions:
    if options is not None:
        if kw:
            raise TypeError("pass either options= or precision=/rewrites=/..., not both")
        return options
    return ModelOptions.make(**kw)


# model -> (model class, config class), in ``refsd.trace.MODELS``' order
MODEL_CLASSES = dict(zip(MODELS, ((ClipTextModel, ClipTextConfig), (UNet2DConditionModel, UNetConfig),
                                  (AutoencoderKL, VaeConfig))))


def load_model(path: str | os.PathLike, component: str, *, options: ModelOptions | None = None,
               variant: str | None = None, **option_kw):
    """``<component>/`` (or a folder containing it) -> its model (``MODEL_CLASSES``), built
    from its ``config.json`` and loaded strictly from its safetensors weights.
    ``option_kw``: ``precision``, ``rewrites``, ``ops``, ``gelu_approximate``, rewrite
    parameters (or ``options=``, not both)."""
    if component not in MODEL_CLASSES:
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(MODELS)}")
    model_cls, config_cls = MODEL_CLASSES[component]
    d = _component(path, component)
    model = _build(model_cls, config_cls, d, _options(options, option_kw))
    model.load_state_dict(load_component_state(d, variant=variant), source=str(d))
    return model


FINITE_CHUNK = 1 << 22  # elements per finiteness test: 4 MiB of booleans, whatever the tensor's size


def check_component(path: str | os.PathLike, component: str) -> None:
    """Refuse what ``load_model`` would refuse (config, keys, shapes), and any
    floating tensor holding NaN or inf, without loading the weights: tensors
    are read through their memory map in chunks and their pages dropped, so
    memory stays bounded whatever the checkpoint's size. For commands that
    hand the weights to another runtime (``refsd export``), where a
    non-finite weight would be a silently broken artifact."""
    model_cls, config_cls = MODEL_CLASSES[component]
    d = _component(path, component)
    state = _build(model_cls, config_cls, d, ModelOptions.make()).check_state_dict(load_component_state(d),
                                                                                   source=str(d))
    for name, arr in state.items():
        if not (isinstance(arr, np.ndarray) and arr.dtype.kind == "f"):
            continue
        flat = arr.reshape(-1)
        for start in range(0, flat.size, FINITE_CHUNK):
            part = flat[start:start + FINITE_CHUNK]
            bad = np.count_nonzero(~np.isfinite(part))
            drop_mapped_pages(part)
            if bad:
                raise WeightsError(f"{d}: tensor {name!r} holds non-finite values (NaN or inf, {bad} in elements "
                                   f"{start}..{start + part.size - 1} of {flat.size})")


def load_text_encoder(path: str | os.PathLike, **kw) -> ClipTextModel:
    """``text_encoder/`` (or a folder containing it) -> ``ClipTextModel`` (``load_model``)."""
    return load_model(path, "text_encoder", **kw)


def load_unet(path: str | os.PathLike, **kw) -> UNet2DConditionModel:
    """``unet/`` (or a folder containing it) -> ``UNet2DConditionModel`` (``load_model``)."""
    return load_model(path, "unet", **kw)


def load_vae(path: str | os.PathLike, **kw) -> AutoencoderKL:
    """``vae/`` (or a folder containing it) -> ``AutoencoderKL`` (``load_model``)."""
    return load_model(path, "vae", **kw)


def tokenizer_files(path: str | os.PathLike) -> list[Path]:
    """The files of ``tokenizer/`` that transformers' ``CLIPTokenizer`` reads, those present."""
    d = _component(path, "tokenizer")
    return [d / name for name in TOKENIZER_FILES if os.path.lexists(d / name)]


def load_tokenizer(path: str | os.PathLike):
    """``tokenizer/`` -> transformers ``CLIPTokenizer`` from the folder's own
    vocab.json / merges.txt (or tokenizer.json, as transformers 5 saves it);
    never the hub. Every file is checked before transformers sees it (a
    regular file, UTF-8, a JSON object where JSON is expected, vocabulary ids
    non-negative integers); ``tokenizer_config.json`` is required: without it
    transformers silently falls back to its own special tokens (SD 2.1 pads
    with ``!``, the default would pad with ``<|endoftext|>``: other ids, another image)."""
    d = _component(path, "tokenizer")
    present = {p.name for p in tokenizer_files(d)}
    if "tokenizer_config.json" not in present:
        raise WeightsError(f"{d / 'tokenizer_config.json'}: missing; refused rather than tokenizing with "
                           "transformers' default special tokens")
    if not {"vocab.json", "merges.txt"} <= present and "tokenizer.json" not in present:
        raise WeightsError(f"{d}: no tokenizer files (expected vocab.json and merges.txt, or tokenizer.json)")
    for name in present - {"merges.txt"}:
        doc = read_config(d / name)
        if name == "vocab.json" and not all(type(v) is int and v >= 0 for v in doc.values()):
            raise WeightsError(f"{d / name}: every token id must be a non-negative integer")
    if "merges.txt" in present:
        read_text(d / "merges.txt", error=WeightsError)
    from transformers import CLIPTokenizer  # noqa: PLC0415 (only the tokenizer needs transformers)

    try:
        return CLIPTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises bare Exception for files it cannot parse
        msg = " ".join(str(e).split())[:200]
        raise WeightsError(f"{d}: transformers cannot build a CLIPTokenizer from these files "
                           f"({type(e).__name__}: {msg})") from None


def load_scheduler_config(path: str | os.PathLike) -> dict:
    d = _component(path, "scheduler")
    return _config(d, "scheduler_config.json")


def _component(path, name: str) -> Path:
    """Accept either the component folder itself or the pipeline folder."""
    p = Path(path)
    if (p / name).is_dir() and (p / "model_index.json").is_file():
        return p / name
    if p.is_file():
        _refuse_pickle(p)
        raise WeightsError(f"{p}: expected a {name}/ folder of a diffusers pipeline, got a file")
    if not p.is_dir():
        raise WeightsError(f"{p}: no such folder")
    return p


@dataclass
class Components:
    """A loaded pipeline folder."""

    path: Path
    model_index: dict
    text_encoder: ClipTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizer: Any
    scheduler_config: dict


def load_pipeline(path: str | os.PathLike, *, options: ModelOptions | None = None, variant: str | None = None,
                  tokenizer: bool = True, **option_kw) -> Components:
    """Everything a text-to-image run needs from a diffusers folder, with one
    set of model options (precision, rewrites) for all three models."""
    p = Path(path)
    if p.is_file():
        _refuse_pickle(p)
    index_path = p / "model_index.json"
    if not os.path.lexists(index_path):
        pickles = sorted(p.glob("*.ckpt")) + sorted(p.glob("*.bin")) if p.is_dir() else []
        if pickles:
            raise WeightsError(_pickle_message(pickles))
        raise WeightsError(f"{p}: not a diffusers folder (no model_index.json)")
    index = read_config(index_path)
    missing = [c for c in (*MODELS, "tokenizer", "scheduler") if not (p / c).is_dir()]
    if missing:
        raise WeightsError(f"{p}: missing component folder(s) {', '.join(missing)}")
    opts = _options(options, option_kw)
    return Components(
        path=p,
        model_index=index,
        text_encoder=load_model(p / "text_encoder", "text_encoder", options=opts, variant=variant),
        unet=load_model(p / "unet", "unet", options=opts, variant=variant),
        vae=load_model(p / "vae", "vae", options=opts, variant=variant),
        tokenizer=load_tokenizer(p / "tokenizer") if tokenizer else None,
        scheduler_config=load_scheduler_config(p / "scheduler"),
    )


# ---------------------------------------------------------------- model identity


def model_files(model_dir: str | os.PathLike) -> list[Path]:
    """The files :func:`model_sha256` hashes, in hashing order."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(2, "no such model folder", str(root))
    files = [root / "model_index.json", root / "scheduler" / "scheduler_config.json",
             *tokenizer_files(root / "tokenizer")]
    for comp in MODELS:
        files += [root / comp / "config.json", *find_weights(root / comp)]
    return sorted(set(files), key=lambda p: p.relative_to(root).as_posix())


def model_sha256(model_dir: str | os.PathLike) -> str:
    """The identity of a diffusers folder: the sha256 of exactly the bytes the loader reads.

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
    root = Path(model_dir)
    h = hashlib.sha256()
    for p in model_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p, error=WeightsError).encode()
                 + b"\n")
    return h.hexdigest()
