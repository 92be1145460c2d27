"""Reading a capture bundle: strict, safe, and one clear line for every fault.

A bundle (a directory, or a ``.zip`` of one, with or without a single top
folder) comes from a device we do not control, so nothing in it is trusted:

* ``capture.json`` is at most 4 MiB of strict UTF-8 JSON
  (``refsd.safe_io.parse_json``: no NaN / inf / ``1e400``, no duplicate keys,
  no lone surrogates, nesting bounded), of schema ``refsd-capture`` version 2
  or 1, valid against that version's ``schema/capture-{version}.schema.json``
  (integers strictly integers: ``2.0`` is not a shape; ``Bundle.stages`` reads
  both versions' declaration of where each stage ran), its request within
  ``refsd.limits``' ranges;
* a tensor's file is named ``tensors/...npy`` with no ``.``/``..`` parts; in a
  directory it must resolve inside the bundle (a symlink out is refused), in a
  zip it must be a regular member (no symlink, no duplicate, not encrypted);
* sizes are checked *before* reading: the declared shape and dtype fix the
  data size, so a file (or a zip member's declared and actual size) larger
  than that plus a 16 KiB header allowance is refused unread: no zip bomb;
  a zip member is inflated in pieces under that byte budget whatever its
  headers claim (stored, deflate and bzip2; methods that cannot be bounded
  are refused), then its size and CRC-32 are checked; a zip of more than
  ``MAX_ZIP_MEMBERS`` members is refused from its end record;
* the .npy header is parsed first (pickles and object arrays refused: only
  ``np.load(..., allow_pickle=False)`` ever runs), then dtype, shape, the
  exact data length (a truncated file is named as such) and the sha256 in
  ``capture.json`` are checked;
* boundary tensors must have the shapes the model's configs imply
  (:class:`ModelGeometry`), token ids must be integers in the vocabulary,
  initial latents finite; every missing boundary tensor is listed.

Every fault raises :class:`BundleError` (a ``ValueError``) whose message is
one line; the CLI prints it and exits 2. NumPy, jsonschema, the standard
library, and refsd's input checks only (``refsd.safe_io``, ``refsd.limits``,
shared with the model loader); no refsd numerics: the validator must not
trust the reference.
"""

from __future__ import annotations

import functools

import bz2
import collections
import hashlib
import io
import math
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from refsd_validate.bundle import (
    FLOATS,
    INTS,
    BundleError,
    ModelGeometry,
    check_document,
    StageDeclaration,
    declared_stages,
    required_tensors,
)

from refsd.limits import check_request
from refsd.trace import parse_intermediate
from refsd.safe_io import MAX_TENSOR_BYTES, npy_header, open_regular, parse_json

MAX_CAPTURE_JSON = 4 << 20
NPY_HEADER_ALLOWANCE = 16 << 10  # real .npy headers are 128-4096 bytes


@dataclass
class Bundle:
    """A validated bundle. ``tensors`` holds the boundary tensors and inputs;
    intermediates (possibly large) are re-read, and re-verified, by ``tensor()``."""

    source: Path
    capture: dict
    sha256: str  # of capture.json's bytes, which pin every tensor file by sha256
    tensors: dict[str, np.ndarray]
    intermediates: list[str] = field(default_factory=list)
    _files: "_Files | None" = None

    @property
    def request(self) -> dict:
        return self.capture["request"]

    @functools.cached_property
    def stages(self) -> dict[str, StageDeclaration]:
        """Where and in what precision each stage ran (``bundle.declared_stages``), read once."""
        return declared_stages(self.capture)

    def tensor(self, name: str) -> np.ndarray:
        if name in self.tensors:
            return self.tensors[name]
        if name not in self.intermediates:
            raise KeyError(name)
        return _load_tensor(self._files, name, self.capture["tensors"][name])


def read_bundle(path: str | Path, geometry: ModelGeometry | None = None) -> Bundle:
    """Read and check a bundle; ``geometry`` (from the model folder) adds the
    shape checks of the boundary tensors. Raises :class:`BundleError`."""
    src = Path(path)
    files = _ZipFiles(src) if src.is_file() else _DirFiles(src)
    raw = files.read("capture.json", MAX_CAPTURE_JSON)
    doc = _parse_capture(raw)
    request, table = doc["request"], doc["tensors"]
    expected = required_tensors(request, geometry)
    missing = [n for n in expected if n not in table]
    if missing:
        raise BundleError(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    intermediates = []
    for name, entry in table.items():
        if name in expected or name == "scheduler/timesteps":
            continue
        parsed = parse_intermediate(name)
        if parsed is None:
            raise BundleError(f"tensor {name}: not a boundary tensor of this request ({request['steps']} steps) "
                              "nor an intermediate named {stage}/step_{i}/{module path}")
        step = parsed[1]
        if step is not None and step >= request["steps"]:
            raise BundleError(f"tensor {name}: step {step} is past the request's {request['steps']} steps")
        if entry["dtype"] not in FLOATS:
            raise BundleError(f"tensor {name}: dtype {entry['dtype']}; intermediates are float32 or float16")
        intermediates.append(name)

    tensors = {}
    for name, entry in table.items():
        shape, dtypes = expected.get(name, (None, FLOATS + INTS))
        if name == "scheduler/timesteps":
            shape, dtypes = (request["steps"],), INTS
        if entry["dtype"] not in dtypes:
            raise BundleError(f"tensor {name}: dtype {entry['dtype']}, expected {' or '.join(dtypes)}")
        if shape is not None and tuple(entry["shape"]) != shape:
            got = tuple(entry["shape"])
            nchw = len(shape) == 4 and got == (shape[0], shape[3], shape[1], shape[2])
            raise BundleError(f"tensor {name}: shape {got}, expected {shape} for this model and request"
                              + (" (NCHW? bundles hold NHWC activations: transpose (0, 2, 3, 1), or write the "
                                 "bundle with write_bundle(..., layout='NCHW'))" if nchw else ""))
        if math.prod(entry["shape"]) == 0:
            raise BundleError(f"tensor {name}: empty (shape {tuple(entry['shape'])})")
        arr = _load_tensor(files, name, entry)
        if name in intermediates:
            continue  # verified; re-read on use
        tensors[name] = arr
    _check_inputs(tensors, geometry)
    return Bundle(src, doc, hashlib.sha256(raw).hexdigest(), tensors, intermediates, files)


def _check_inputs(tensors: dict, geometry: ModelGeometry | None) -> None:
    ids = tensors.get("inputs/token_ids")
    if ids is not None and geometry is not None and (ids.min() < 0 or ids.max() >= geometry.vocab_size):
        raise BundleError(f"tensor inputs/token_ids: ids must lie in [0, {geometry.vocab_size}), found "
                          f"{int(ids.min())}..{int(ids.max())}")
    lat = tensors.get("scheduler/latents_init")
    if lat is not None and not np.isfinite(lat).all():
        raise BundleError("tensor scheduler/latents_init: holds NaN or inf; the initial noise must be finite")


def _parse_capture(raw: bytes) -> dict:
    doc = parse_json(raw, "capture.json", BundleError)
    try:
        check_document(doc)
        request = doc["request"]
        check_request(request["prompt"], request["negative_prompt"], request["seed"], request["steps"],
                      request["guidance"], request["height"], request["width"], prefix="capture.json: request/")
    except ValueError as e:
        raise BundleError(str(e)) from None
    return doc


def _load_tensor(files: "_Files", name: str, entry: dict) -> np.ndarray:
    dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise BundleError(f"tensor {name}: declared {nbytes} bytes, over the {MAX_TENSOR_BYTES}-byte limit")
    rel = entry["file"]
    parts = PurePosixPath(rel).parts
    if any(p in (".", "..") for p in parts) or "\\" in rel:
        raise BundleError(f"tensor {name}: file {rel!r} escapes the bundle")
    data = files.read(rel, nbytes + NPY_HEADER_ALLOWANCE, what=f"tensor {name}")
    where = f"tensor {name} ({rel})"
    file_shape, file_dtype, offset, _ = npy_header(data, where, BundleError)
    if file_dtype.name != dtype.name or tuple(file_shape) != shape:
        raise BundleError(f"{where}: file holds {file_dtype.name} {tuple(file_shape)}, capture.json declares "
                          f"{dtype.name} {shape}")
    have = len(data) - offset
    if have != nbytes:
        kind = "truncated" if have < nbytes else "has trailing bytes"
        raise BundleError(f"{where}: {kind}: {have} data bytes, {nbytes} expected for {dtype.name} {shape}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BundleError(f"{where}: sha256 differs from capture.json (file changed after capture)")
    return np.load(io.BytesIO(data), allow_pickle=False)


class _Files:
    def read(self, rel: str, limit: int, what: str = "") -> bytes:  # pragma: no cover - interface
        raise NotImplementedError


class _DirFiles(_Files):
    def __init__(self, root: Path) -> None:
        if not root.exists():
            raise BundleError(f"{root}: no such bundle (directory or .zip)")
        self.root = root.resolve()

    def read(self, rel: str, limit: int, what: str = "") -> bytes:
        what = what or rel
        p = self.root / rel
        try:
            real = p.resolve(strict=True)
        except FileNotFoundError:
            raise BundleError(f"{what}: file {rel} is missing from the bundle") from None
        except (OSError, RuntimeError) as e:  # symlink loops
            raise BundleError(f"{what}: cannot resolve {rel} ({_one_line(e)})") from None
        if not real.is_relative_to(self.root):
            raise BundleError(f"{what}: {rel} resolves outside the bundle (symlink?); refused")
        st = real.stat()
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{what}: {rel} is not a regular file")
        if st.st_size > limit:
            raise BundleError(f"{what}: {rel} is {st.st_size} bytes, over the {limit}-byte limit; refused unread")
        with open_regular(real, error=BundleError, what=f"{what}: {rel}") as f:
            data = f.read(limit + 1)
        if len(data) > limit:  # grew since stat
            raise BundleError(f"{what}: {rel} is over the {limit}-byte limit; refused")
        return data


class _ZipFiles(_Files):
    """A zipped bundle. Members are inflated by :func:`_inflate` under a byte budget, whatever their
    headers claim; only the methods it can bound are accepted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open_regular(path, error=BundleError) as f:
                # The end record only: the member count before parsing 150k entries (a private helper of
                # zipfile's; without it the count is checked after parsing, which is linear anyway).
                end_record = getattr(zipfile, "_EndRecData", None)
                end = end_record(f) if end_record is not None else None
                if end is not None:
                    _check_member_count(path, end[_ECD_ENTRIES_TOTAL])
                with zipfile.ZipFile(f) as zf:
                    infos = zf.infolist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"{path}: neither a bundle directory nor a readable .zip ({_one_line(e)})") from None
        _check_member_count(path, len(infos))
        counts = collections.Counter(i.filename for i in infos)
        dupes = sorted(n for n, c in counts.items() if c > 1)
        if dupes:
            raise BundleError(f"{path}: duplicate zip members {', '.join(dupes[:5])}; refused (which one is meant?)")
        for info in infos:
            n = info.filename
            if n.startswith("/") or "\\" in n or ".." in PurePosixPath(n).parts or re.match(r"^[A-Za-z]:", n):
                raise BundleError(f"{path}: zip member {n!r} escapes the bundle; refused")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BundleError(f"{path}: zip member {n!r} is a symlink; refused")
        self.infos = {i.filename: i for i in infos if not i.is_dir()}
        self.prefix = ""
        if "capture.json" not in self.infos:  # a zip of the bundle folder itself
            tops = {n.split("/", 1)[0] for n in self.infos}
            if len(tops) == 1 and f"{next(iter(tops))}/capture.json" in self.infos:
                self.prefix = next(iter(tops)) + "/"

    def read(self, rel: str, limit: int, what: str = "") -> bytes:
        what = what or rel
        info = self.infos.get(self.prefix + rel)
        if info is None:
            raise BundleError(f"{what}: file {rel} is missing from the bundle")
        if info.flag_bits & 0x1:
            raise BundleError(f"{what}: zip member {rel} is encrypted")
        if info.compress_type not in _INFLATERS:
            raise BundleError(f"{what}: zip member {rel} uses compression method {info.compress_type}; only stored, "
                              "deflate and bzip2 can be inflated under a byte budget, so it is refused")
        if info.file_size > limit:
            raise BundleError(f"{what}: zip member {rel} is {info.file_size} bytes uncompressed, over the "
                              f"{limit}-byte limit; refused unread (zip bomb?)")
        try:
            with open_regular(self.path, error=BundleError) as f:
                data = _inflate(f, info, limit)
        except (zlib.error, OSError, EOFError, ValueError) as e:
            if isinstance(e, BundleError):
                raise BundleError(f"{what}: zip member {rel} {e}") from None
            raise BundleError(f"{what}: zip member {rel} unreadable ({_one_line(e)})") from None
        return data


MAX_ZIP_MEMBERS = 100_000  # a 512x512 run with every intermediate of 50 steps has ~75k tensors
_ECD_ENTRIES_TOTAL = 4  # zipfile's index of the total entry count in the end-of-central-directory record
_CHUNK = 1 << 16
# Decompressors that stop at max_length: zlib (deflate, raw stream) and bz2. LZMA in a zip carries its own
# properties header and zipfile's wrapper decompresses without a bound, so it is refused with the rest.
_INFLATERS = {zipfile.ZIP_STORED: None, zipfile.ZIP_DEFLATED: lambda: zlib.decompressobj(-15),
              zipfile.ZIP_BZIP2: bz2.BZ2Decompressor}


def _check_member_count(path: Path, count: int) -> None:
    if count > MAX_ZIP_MEMBERS:
        raise BundleError(f"{path}: {count} zip members, over the limit of {MAX_ZIP_MEMBERS}; refused")


def _inflate(f, info: zipfile.ZipInfo, limit: int) -> bytes:
    """Member ``info``'s bytes, inflated in ``_CHUNK`` pieces with the output never past ``limit + 1``
    bytes, whatever the headers say; the result must match the declared size and CRC-32."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise BundleError("has a corrupt local header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    make = _INFLATERS[info.compress_type]
    d = make() if make else None
    out = bytearray()
    left = info.compress_size
    while left > 0:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            raise BundleError("is truncated")
        left -= len(chunk)
        if d is None:
            out += chunk
        elif isinstance(d, bz2.BZ2Decompressor):
            out += d.decompress(chunk, limit + 1 - len(out))
            while not d.needs_input and not d.eof and len(out) <= limit:
                out += d.decompress(b"", limit + 1 - len(out))
        else:
            while chunk and len(out) <= limit:
                out += d.decompress(chunk, limit + 1 - len(out))
                chunk = d.unconsumed_tail
        if len(out) > limit:
            raise BundleError(f"inflates past the {limit}-byte limit; refused (zip bomb?)")
    if d is not None and not d.eof:
        raise BundleError("is truncated (compressed stream ends early)")
    if len(out) != info.file_size or zlib.crc32(out) != info.CRC:
        raise BundleError("is corrupt (size or CRC-32 differs from the zip directory)")
    return bytes(out)


def _one_line(e: object) -> str:
    return " ".join(str(e).split())
