"""Reading untrusted files: one place for the checks every boundary needs.

Model folders, capture bundles and command-line files come from people and
devices we do not control. Everything here checks *before* use, and raises the
caller's error class (``WeightsError``, ``BundleError``, ``ValueError``) with a
one-line message that names the file:

* the file kind: only regular files are opened (a FIFO would block ``open()``
  forever, a device or directory is not a file), and the kind is checked again
  on the open descriptor, so a file swapped for a FIFO in between is caught;
* the size, against a limit, before reading;
* text: UTF-8, decoded with the offending byte's offset in the message;
* JSON: nesting at most ``MAX_JSON_DEPTH`` (CPython's parser would otherwise
  raise ``RecursionError``), no ``NaN`` / ``Infinity`` literals, no number that
  overflows to inf (``1e400``), no duplicate key in an object (which one
  would be meant?), no lone UTF-16 surrogate (``"\\ud800"``, which cannot be
  encoded back to UTF-8);
* ``.npy``: magic, version and header parsed first; the element count is a
  Python int (``np.prod`` wraps in int64); the declared data size must equal
  the bytes the file holds, so a header declaring 10^12 elements allocates
  nothing; pickles and object arrays are refused, never loaded.

Standard library and NumPy only: the validator's bundle reader uses it too.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

MAX_JSON_BYTES = 16 << 20  # a real SD config is < 10 KiB, a tokenizer's vocab.json ~2 MiB
MAX_JSON_DEPTH = 64  # diffusers / transformers configs nest 3 deep, capture.json 5
MAX_TEXT_BYTES = 16 << 20  # merges.txt is ~0.5 MiB
MAX_TENSOR_BYTES = 4 << 30  # per .npy tensor: SD 1.5's largest attention scores at 512x512 are 1 GiB
NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER_MAX = 1 << 16  # numpy itself refuses headers over 10 KB unless told otherwise

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular(path: str | os.PathLike, *, error: type[Exception] = ValueError, max_bytes: int | None = None,
                  what: str = "") -> int:
    """The size of ``path`` if it is a regular file (symlinks followed) within ``max_bytes``."""
    label = what or str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{label}: no such file") from None
    except OSError as e:
        raise error(f"{label}: cannot stat ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{label}: is {_kind(st.st_mode)}, not a regular file; refused")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{label}: {st.st_size} bytes, over the {max_bytes}-byte limit; refused unread")
    return st.st_size


def open_regular(path: str | os.PathLike, *, error: type[Exception] = ValueError, what: str = ""):
    """A binary file object of a regular file, never blocking on a FIFO."""
    label = what or str(path)
    check_regular(path, error=error, what=label)
    try:
        # O_NONBLOCK: if the path became a FIFO since the stat, open() returns instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise error(f"{label}: cannot open ({e.strerror or e})") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise error(f"{label}: replaced by a non-regular file while opening; refused")
    return f


def read_bytes(path: str | os.PathLike, max_bytes: int, *, error: type[Exception] = ValueError,
               what: str = "") -> bytes:
    """The contents of a regular file of at most ``max_bytes``."""
    label = what or str(path)
    check_regular(path, error=error, max_bytes=max_bytes, what=label)
    with open_regular(path, error=error, what=label) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{label}: grew past the {max_bytes}-byte limit while reading; refused")
    return data


def check_output_file(path: str | os.PathLike, option: str) -> None:
    """An output path the command may create or overwrite: its folder exists, and it is not
    something other than a regular file (writing to a FIFO would block until a reader comes)."""
    p = Path(path)
    if not p.parent.is_dir():
        raise ValueError(f"{option} {p}: output folder {p.parent} does not exist")
    if os.path.lexists(p) and not p.is_file():
        raise ValueError(f"{option} {p}: exists and is not a regular file; refused")


def sha256_file(path: str | os.PathLike, *, error: type[Exception] = ValueError, chunk: int = 1 << 20) -> str:
    """sha256 of a regular file's contents, read in chunks (never blocking on a FIFO)."""
    h = hashlib.sha256()
    with open_regular(path, error=error) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def decode_utf8(raw: bytes, label: str, error: type[Exception] = ValueError) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{label}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def read_text(path: str | os.PathLike, *, max_bytes: int = MAX_TEXT_BYTES, error: type[Exception] = ValueError,
              what: str = "") -> str:
    label = what or str(path)
    return decode_utf8(read_bytes(path, max_bytes, error=error, what=label), label, error)


def parse_json(raw: bytes | str, label: str, error: type[Exception] = ValueError) -> Any:
    """Strict JSON (see the module docstring); ``label`` names the source in every message."""
    text = decode_utf8(raw, label, error) if isinstance(raw, bytes) else raw

    def no_constant(c: str):
        raise ValueError(f"non-standard JSON constant {c}")

    def unique(pairs: list) -> dict:
        doc = dict(pairs)
        if len(doc) != len(pairs):
            seen = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise ValueError(f"duplicate key {dup[:80]!r} (which value is meant?)")
        return doc

    def finite(s: str) -> float:
        x = float(s)
        if not math.isfinite(x):
            raise ValueError(f"number {s[:40]} overflows to infinity")
        return x

    try:
        doc = json.loads(text, parse_constant=no_constant, parse_float=finite, object_pairs_hook=unique)
    except RecursionError:
        raise error(f"{label}: JSON nested too deeply; refused") from None
    except ValueError as e:  # JSONDecodeError, and the hooks above
        raise error(f"{label}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
    _check_tree(doc, text, label, error)
    return doc


# Text decoded from UTF-8 holds no surrogates; JSON can still spell one as an escape.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _check_tree(doc: Any, text: str, label: str, error: type[Exception]) -> None:
    # Iterative, so the check itself cannot recurse too deeply; strings are walked only when the text
    # spells a surrogate (a valid pair is fine), so a 1M-entry vocabulary costs one pass over containers.
    strings = _SURROGATE_ESCAPE.search(text) is not None
    stack = [(doc, 1, "")]
    while stack:
        node, depth, where = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise error(f"{label}: JSON nested more than {MAX_JSON_DEPTH} levels deep; refused")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                if strings and isinstance(k, str):
                    _check_string(k, label, error, where)
                if strings or isinstance(v, (dict, list)):
                    stack.append((v, depth + 1, f"{where}/{k}"))
        elif isinstance(node, str):
            _check_string(node, label, error, where)


def _check_string(s: str, label: str, error: type[Exception], where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{label}: string at {where or '(top level)'} holds a lone UTF-16 surrogate; refused") from None


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES, error: type[Exception] = ValueError,
              what: str = "") -> Any:
    label = what or str(path)
    return parse_json(read_bytes(path, max_bytes, error=error, what=label), label, error)


def npy_header(data: bytes, label: str, error: type[Exception] = ValueError) -> tuple[tuple, np.dtype, int, bool]:
    """(shape, dtype, data offset, fortran order) of the .npy bytes ``data`` (at least the header)."""

    if data[:1] == b"\x80":
        raise error(f"{label}: is a Python pickle; refused (pickled data is never loaded)")
    if data[:4] == b"PK\x03\x04":
        raise error(f"{label}: is a zip archive (.npz?), expected a single-array .npy file")
    if data[:6] != NPY_MAGIC:
        raise error(f"{label}: not an .npy file (no NumPy magic)")
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read_header[version](buf, max_header_size=_NPY_HEADER_MAX)
    except (ValueError, SyntaxError, TypeError, EOFError) as e:
        raise error(f"{label}: bad .npy header ({' '.join(str(e).split())[:200]})") from None
    if dtype.hasobject:
        raise error(f"{label}: holds a pickled object array; refused (pickled data is never loaded)")
    return tuple(shape), dtype, buf.tell(), bool(fortran)


def npy_nbytes(shape: tuple, dtype: np.dtype) -> int:
    """Exact data size in bytes, in Python ints (no int64 wraparound)."""
    return math.prod(int(s) for s in shape) * dtype.itemsize


def load_npy(path: str | os.PathLike, *, max_bytes: int = MAX_TENSOR_BYTES, error: type[Exception] = ValueError,
             what: str = "") -> np.ndarray:
    """One array from an .npy file: regular file, header checked (pickles and
    object arrays refused before any allocation), declared size equal to the
    data the file holds, at most ``max_bytes`` of data. The one .npy loader for
    untrusted files; errors are one line naming the file (``what``)."""
    label = what or str(path)
    size = check_regular(path, error=error, max_bytes=max_bytes + _NPY_HEADER_MAX, what=label)
    with open_regular(path, error=error, what=label) as f:
        shape, dtype, offset, _ = npy_header(f.read(_NPY_HEADER_MAX), label, error)
        nbytes = npy_nbytes(shape, dtype)
        if nbytes > max_bytes:
            raise error(f"{label}: declares {dtype.name} {shape} ({nbytes} bytes), over the {max_bytes}-byte limit")
        if size - offset != nbytes:
            kind = "truncated" if size - offset < nbytes else "has trailing bytes"
            raise error(f"{label}: {kind}: {size - offset} data bytes, {nbytes} declared by its header "
                        f"({dtype.name} {shape})")
        f.seek(0)
        return np.load(f, allow_pickle=False)


@functools.lru_cache(maxsize=None)
def _strict_validator_class():
    import jsonschema  # noqa: PLC0415

    base = jsonschema.Draft202012Validator
    # jsonschema's "integer" accepts 2.0; a shape or a step count written as a float is a malformed file.
    checker = base.TYPE_CHECKER.redefine("integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))
    return jsonschema.validators.extend(base, type_checker=checker)


def check_schema(doc: Any, schema: dict, label: str, error: type[Exception] = ValueError) -> None:
    """Validate ``doc`` against a JSON Schema (draft 2020-12, integers strictly integers); the
    first, most relevant violation is one line naming ``label`` and the key path."""
    import jsonschema  # noqa: PLC0415

    found = jsonschema.exceptions.best_match(_strict_validator_class()(schema).iter_errors(doc))
    if found is not None:
        where = "/".join(str(p) for p in found.absolute_path) or "(top level)"
        raise error(f"{label}: schema violation at {where}: {' '.join(found.message.split())[:300]}")
