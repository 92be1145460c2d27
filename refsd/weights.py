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

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from refsd.models.clip_text import ClipTextConfig, ClipTextModel
from refsd.models.module import ModelOptions, WeightsError, read_config
from refsd.models.unet import UNet2DConditionModel, UNetConfig
from refsd.models.vae import AutoencoderKL, VaeConfig

__all__ = [
    "Components", "WeightsError", "find_weights", "load_component_state", "load_pipeline", "load_scheduler_config",
    "load_text_encoder", "load_tokenizer", "load_unet", "load_vae", "read_safetensors", "write_safetensors",
]

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {np.dtype(v).str: k for k, v in _DTYPES.items() if k != "BF16"}
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024


# ---------------------------------------------------------------- safetensors


def read_safetensors(path: str | os.PathLike, *, metadata: bool = False):
    """{name: array} memory-mapped read-only from a ``.safetensors`` file
    (bfloat16 is widened to float32, the only copy made). With
    ``metadata=True`` returns ``(tensors, metadata_dict)``."""
    path = Path(path)
    _refuse_pickle(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise WeightsError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    data_len = size - start
    buf = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(data_len,)) if data_len > 0 else \
        np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        try:
            dtype_name, shape, (a, b) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt header entry for {name!r}: {info!r}") from None
        if dtype_name not in _DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        dt = _DTYPES[dtype_name]
        count = int(np.prod(shape, dtype=np.int64))
        if not (0 <= a <= b <= data_len) or b - a != count * dt.itemsize:
            raise WeightsError(f"{path}: tensor {name!r} offsets {a}..{b} do not fit shape {shape} {dtype_name} "
                               f"in {data_len} data bytes (truncated or corrupt file)")
        arr = buf[a:b].view(dt).reshape(shape)
        if dtype_name == "BF16":
            arr = (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
        out[name] = arr
    return (out, meta) if metadata else out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as safetensors, deterministically: keys sorted, data
    in key order, compact JSON header padded with spaces to 8 bytes,
    ``metadata`` (default ``{"format": "pt"}``, which transformers requires)."""
    meta = {"format": "pt"} if metadata is None else dict(metadata)
    header: dict[str, Any] = {"__metadata__": {k: str(meta[k]) for k in sorted(meta)}} if meta else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])  # (not ascontiguousarray: it turns a 0-d array into 1-d)
        key = arr.dtype.newbyteorder("<").str if arr.dtype.itemsize > 1 else arr.dtype.str
        if key not in _NAMES:
            raise ValueError(f"write_safetensors: unsupported dtype {arr.dtype} for {name!r}")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[key], "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for data in blobs:
            f.write(data)
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
    """The safetensors file(s) of one component folder: ``<name>.safetensors``
    (``<name>.<variant>.safetensors`` with a variant, e.g. ``fp16``), the shards
    of a ``.safetensors.index.json``, or the only ``*.safetensors`` there.
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
        if single.is_file():
            return [single]
        index = d / f"{stem}{suffix}.index.json"
        if index.is_file():
            weight_map = read_config(index).get("weight_map", {})
            return [d / f for f in sorted(set(weight_map.values()))]
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
    state: dict[str, np.ndarray] = {}
    for f in find_weights(component_dir, variant=variant):
        part = read_safetensors(f)
        dup = sorted(set(part) & set(state))
        if dup:
            raise WeightsError(f"{f}: keys already loaded from another shard: {', '.join(dup[:10])}")
        state.update(part)
    return state


def _config(component_dir: Path, name: str = "config.json") -> dict:
    path = component_dir / name
    if not path.is_file():
        raise WeightsError(f"{component_dir}: missing {name}")
    return read_config(path)


def _options(options: ModelOptions | None, kw: dict) -> ModelOptions:
    if options is not None:
        if kw:
            raise TypeError("pass either options= or precision=/rewrites=/..., not both")
        return options
    return ModelOptions.make(**kw)


def load_text_encoder(path: str | os.PathLike, *, options: ModelOptions | None = None, variant: str | None = None,
                      **option_kw) -> ClipTextModel:
    """``text_encoder/`` (or a folder containing it) -> ``ClipTextModel``.
    ``option_kw``: ``precision``, ``rewrites``, ``ops``, ``gelu_approximate``, rewrite parameters."""
    d = _component(path, "text_encoder")
    model = ClipTextModel(ClipTextConfig.from_dict(_config(d), source=str(d / "config.json")),
                          options=_options(options, option_kw))
    model.load_state_dict(load_component_state(d, variant=variant), source=str(d))
    return model


def load_unet(path: str | os.PathLike, *, options: ModelOptions | None = None, variant: str | None = None,
              **option_kw) -> UNet2DConditionModel:
    d = _component(path, "unet")
    model = UNet2DConditionModel(UNetConfig.from_dict(_config(d), source=str(d / "config.json")),
                                 options=_options(options, option_kw))
    model.load_state_dict(load_component_state(d, variant=variant), source=str(d))
    return model


def load_vae(path: str | os.PathLike, *, options: ModelOptions | None = None, variant: str | None = None,
             **option_kw) -> AutoencoderKL:
    d = _component(path, "vae")
    model = AutoencoderKL(VaeConfig.from_dict(_config(d), source=str(d / "config.json")),
                          options=_options(options, option_kw))
    model.load_state_dict(load_component_state(d, variant=variant), source=str(d))
    return model


def load_tokenizer(path: str | os.PathLike):
    """``tokenizer/`` -> transformers ``CLIPTokenizer`` from the folder's own
    vocab.json / merges.txt (or tokenizer.json, as transformers 5 saves it);
    never the hub."""
    d = _component(path, "tokenizer")
    if not ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()) and not (d / "tokenizer.json").is_file():
        raise WeightsError(f"{d}: no tokenizer files (expected vocab.json and merges.txt, or tokenizer.json)")
    from transformers import CLIPTokenizer  # noqa: PLC0415 (only the tokenizer needs transformers)

    return CLIPTokenizer.from_pretrained(str(d), local_files_only=True)


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
    if not index_path.is_file():
        pickles = sorted(p.glob("*.ckpt")) + sorted(p.glob("*.bin")) if p.is_dir() else []
        if pickles:
            raise WeightsError(_pickle_message(pickles))
        raise WeightsError(f"{p}: not a diffusers folder (no model_index.json)")
    index = read_config(index_path)
    missing = [c for c in ("text_encoder", "unet", "vae", "tokenizer", "scheduler") if not (p / c).is_dir()]
    if missing:
        raise WeightsError(f"{p}: missing component folder(s) {', '.join(missing)}")
    opts = _options(options, option_kw)
    return Components(
        path=p,
        model_index=index,
        text_encoder=load_text_encoder(p / "text_encoder", options=opts, variant=variant),
        unet=load_unet(p / "unet", options=opts, variant=variant),
        vae=load_vae(p / "vae", options=opts, variant=variant),
        tokenizer=load_tokenizer(p / "tokenizer") if tokenizer else None,
        scheduler_config=load_scheduler_config(p / "scheduler"),
    )
