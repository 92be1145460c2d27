"""The reference-rerun cache on disk: one file per rerun, ``{key}.npz``,
that is trusted only after it proves what it holds.

An entry is an uncompressed .npz (``np.savez``) of the trace's arrays plus
one member, ``cache/entry``: JSON (as uint8) with the key, the key's inputs
(what ``key`` is the sha256 of), the refsd version, the names in order and
the sha256 of the arrays' content (names, dtypes, shapes, bytes). A read
checks all of it; a damaged (truncated, edited, not a zip, a member
compressed or unreadable), foreign (written under another key, or not by
refsd) or stale (another refsd version or code) entry is deleted with one
warning line on stderr, and the caller reruns. Only regular files are read,
opened without following a symlink: a symlink in the cache directory is
never followed, only removed.

Writes are atomic: a uniquely named temporary file in the same directory,
written, fsynced, then renamed over the entry (and the directory fsynced), so
a reader sees a whole entry or none, and concurrent writers of one key (two
``certify`` processes, fleet workers) each rename a whole file of the same
content: the last one wins. A failed write (a full disk) removes its
temporary file and leaves the entry absent; the run's result is still used,
only not kept. Temporary files a killed writer left are removed when older
than a day.

The cache is kept under a byte budget by dropping the least recently used
entries (a hit refreshes its time).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from refsd import __version__
from refsd.console import warn

ENTRY_MEMBER = "cache/entry"
FORMAT = 1
ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.npz")
TMP_PREFIX = ".rerun-"
STALE_TMP_SECONDS = 24 * 3600  # a writer alive this long after starting an entry is not a writer


class CacheEntryError(ValueError):
    """Why an entry on disk cannot be used."""


def key_of(inputs: Mapping) -> str:
    """The cache key: sha256 of the inputs' canonical JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def content_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode() + b"\0")
        h.update(a.data if a.size else b"")
    return h.hexdigest()


def read(cache_dir: Path, key: str, inputs: Mapping) -> dict[str, np.ndarray] | None:
    """The trace cached under ``key``, None when there is none or it cannot
    be trusted (then it is removed, with one warning line)."""
    path = cache_dir / f"{key}.npz"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            _discard(path, "a symlink (never followed)")
        else:
            warn(f"cache entry {path}: cannot be read ({e.strerror}); rerunning")
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise CacheEntryError("not a regular file")
            trace = _parse(f, key, inputs)
    except CacheEntryError as e:
        _discard(path, str(e))
        return None
    try:
        os.utime(path, follow_symlinks=False)  # recently used
    except OSError:
        pass  # removed or replaced concurrently: the trace read is whole all the same
    return trace


def _parse(f, key: str, inputs: Mapping) -> dict[str, np.ndarray]:
    size = os.fstat(f.fileno()).st_size
    try:
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
            # Stored members only, within the file: a member's size on disk is its size in memory (no bomb).
            if any(i.compress_type != zipfile.ZIP_STORED or i.file_size > size for i in infos):
                raise CacheEntryError("a member is compressed or larger than the file (not written by refsd)")
            f.seek(0)
            with np.load(f, allow_pickle=False) as z:
                arrays = {n: z[n] for n in z.files}
    except CacheEntryError:
        raise
    except Exception as e:  # noqa: BLE001 (zipfile, zlib, NumPy: a damaged file raises any of a dozen types)
        raise CacheEntryError(f"damaged ({type(e).__name__}: {e})") from None
    raw = arrays.pop(ENTRY_MEMBER, None)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise CacheEntryError("foreign (no refsd cache record)")
    try:
        entry = json.loads(raw.tobytes().decode())
        stored_inputs, names, digest = entry["inputs"], entry["names"], entry["content_sha256"]
        version, stored_key, fmt = entry["refsd_version"], entry["key"], entry["format"]
    except (ValueError, KeyError, TypeError) as e:
        raise CacheEntryError(f"damaged cache record ({e})") from None
    if fmt != FORMAT or version != __version__ or stored_inputs.get("code") != inputs.get("code"):
        raise CacheEntryError(f"stale (written by refsd {version}, other code or format)")
    if stored_key != key or key_of(stored_inputs) != key:
        raise CacheEntryError("foreign (written for another key)")
    if sorted(names) != sorted(arrays) or content_sha256(arrays) != digest:
        raise CacheEntryError("damaged (content differs from its sha256)")
    return {n: arrays[n] for n in names}


def _discard(path: Path, why: str) -> None:
    warn(f"cache entry {path}: {why}; discarded, rerunning")
    try:
        path.unlink()  # a symlink itself, never its target
    except FileNotFoundError:
        pass
    except OSError as e:
        warn(f"cache entry {path}: could not be removed ({e.strerror})")


def _save(f, arrays: Mapping[str, np.ndarray]) -> None:
    np.savez(f, **arrays)


def write(cache_dir: Path, key: str, inputs: Mapping, trace: Mapping[str, np.ndarray]) -> bool:
    """Store ``trace`` under ``key`` atomically. False (one warning line, no
    file left behind) when the disk refuses it."""
    names = list(trace)
    entry = {"format": FORMAT, "key": key, "inputs": dict(inputs), "refsd_version": __version__, "names": names,
             "content_sha256": content_sha256(trace)}
    members = {**trace, ENTRY_MEMBER: np.frombuffer(json.dumps(entry).encode(), np.uint8)}
    tmp = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=cache_dir)
        with os.fdopen(fd, "wb") as f:
            _save(f, members)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache_dir / f"{key}.npz")  # replaces a symlink itself, never writes through it
        tmp = None
        _fsync_dir(cache_dir)
        return True
    except OSError as e:
        warn(f"rerun cache {cache_dir}: entry not written ({e.strerror or e}); the rerun is used uncached")
        return False
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is atomic all the same
    finally:
        os.close(fd)


def _entries(cache_dir: Path):
    """(lstat, path) of every entry-named regular file (symlinks and foreign files are not the cache's)."""
    try:
        children = list(os.scandir(cache_dir))
    except FileNotFoundError:
        return
    for d in children:
        if not ENTRY_NAME.fullmatch(d.name):
            continue
        try:
            st = d.stat(follow_symlinks=False)
        except FileNotFoundError:  # pruned concurrently
            continue
        if stat.S_ISREG(st.st_mode):
            yield st, Path(d.path)


def cache_bytes(cache_dir: str | Path) -> int:
    return sum(st.st_size for st, _ in _entries(Path(cache_dir)))


def prune(cache_dir: Path, budget: int, *, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used entries until the cache holds at most
    ``budget`` bytes (``keep``, the one just written, stays), and temporary
    files older than a day. Returns the entries that went."""
    now = time.time()
    for d in list(os.scandir(cache_dir)) if cache_dir.is_dir() else []:
        if d.name.startswith(TMP_PREFIX):
            try:
                st = d.stat(follow_symlinks=False)
                if now - st.st_mtime > STALE_TMP_SECONDS:
                    os.unlink(d.path)
            except FileNotFoundError:
                pass
    entries = sorted((st.st_mtime, st.st_size, p) for st, p in _entries(cache_dir))
    total = sum(size for _, size, _ in entries)
    gone = []
    for _, size, p in entries:
        if total <= budget:
            break
        if p == keep:
            continue
        p.unlink(missing_ok=True)
        total -= size
        gone.append(p)
    return gone
