"""The reference-rerun cache (``refsd_validate.rerun_cache``): an entry is used
only when it proves its key's inputs, refsd version and content; anything else
on disk is discarded with one warning line and recomputed; writes are atomic,
safe between concurrent writers, and leave nothing behind on a full disk."""

from __future__ import annotations

import errno
import os
import threading
import time
import zipfile

import numpy as np
import pytest

from refsd_validate import certify_rerun, rerun_cache
from refsd_validate.certify_rerun import ORIGINAL_DEPLOYMENT
from refsd_validate.tolerance import REFERENCE_RUN

REQUEST = {"steps": 1, "scheduler": "ddim", "guidance": 7.5, "height": 8, "width": 8}
IDS, X0 = np.zeros((2, 77), np.int64), np.arange(16, dtype=np.float32).reshape(1, 2, 2, 4)


def _trace(seed=0):
    rng = np.random.default_rng(seed)
    return {"text_encoder/hidden_states": rng.normal(size=(2, 77, 8)).astype(np.float32),
            "unet/step_0/noise_pred": rng.normal(size=(2, 2, 2, 4)).astype(np.float32),
            "timesteps": np.array([999], np.int64)}


def _inputs(**change):
    inputs = certify_rerun._key_inputs("0" * 64, ORIGINAL_DEPLOYMENT, REFERENCE_RUN, REQUEST, IDS, X0, None, frozenset())
    return {**inputs, **change}


@pytest.fixture
def entry(tmp_path):
    inputs = _inputs()
    key = rerun_cache.key_of(inputs)
    assert rerun_cache.write(tmp_path, key, inputs, _trace())
    return tmp_path, key, inputs, tmp_path / f"{key}.npz"


def _one_warning(capsys, *words):
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    # A library call warns as refsd (refsd.console); through refsd-validate's command line, as that.
    assert err[0].startswith("refsd: warning: ") and all(w in err[0] for w in words), err
    return err[0]


def test_an_entry_reads_back_exactly_in_order(entry, capsys):
    folder, key, inputs, path = entry
    got = rerun_cache.read(folder, key, inputs)
    want = _trace()
    assert list(got) == list(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and got[n].tobytes() == want[n].tobytes()
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # no temporary file left


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_data_byte(p):
    data = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo("unet/step_0/noise_pred.npy")
    data[info.header_offset + 30 + len(info.filename) + 128 + 5] ^= 0x40  # inside the array data, past the .npy header
    p.write_bytes(bytes(data))


def _edit_consistently(p):
    # An edited array written back as a valid zip (CRCs right): only the record's sha256 can tell.
    with np.load(p) as z:
        arrays = {n: z[n] for n in z.files}
    arrays["unet/step_0/noise_pred"] = arrays["unet/step_0/noise_pred"] * np.float32(1.01)
    np.savez(p, **arrays)


def _append(p):
    p.write_bytes(p.read_bytes() + b"\0" * 100)


def _compressed(p):
    with np.load(p) as z:
        arrays = {n: z[n] for n in z.files}
    np.savez_compressed(p, **arrays)


def _not_a_zip(p):
    p.write_bytes(b"refsd? no")


@pytest.mark.parametrize("damage, words", [(_truncate, "damaged"), (_flip_data_byte, "CRC"),
                                           (_edit_consistently, "sha256"), (_compressed, "compressed"),
                                           (_not_a_zip, "damaged")])
def test_a_damaged_entry_is_discarded_with_one_line(entry, capsys, damage, words):
    folder, key, inputs, path = entry
    damage(path)
    assert rerun_cache.read(folder, key, inputs) is None
    _one_warning(capsys, str(path), words, "discarded")
    assert not path.exists()


def test_trailing_bytes_never_change_what_is_read(entry, capsys):
    # Bytes after the zip's end record leave every member intact: the entry still proves its content.
    folder, key, inputs, path = entry
    _append(path)
    got = rerun_cache.read(folder, key, inputs)
    assert capsys.readouterr().err == ""
    assert list(got) == list(_trace()) and all(got[n].tobytes() == v.tobytes() for n, v in _trace().items())


def test_a_foreign_entry_is_discarded(entry, tmp_path, capsys):
    folder, key, inputs, path = entry
    other = _inputs(model="1" * 64)
    other_key = rerun_cache.key_of(other)
    os.rename(path, folder / f"{other_key}.npz")  # a whole, valid entry under another key's name
    assert rerun_cache.read(folder, other_key, other) is None
    _one_warning(capsys, "foreign", "another key")
    np.savez(path, **_trace())  # an .npz refsd did not write
    assert rerun_cache.read(folder, key, inputs) is None
    _one_warning(capsys, "foreign")


def test_a_stale_entry_is_discarded(entry, capsys, monkeypatch):
    folder, key, inputs, path = entry
    monkeypatch.setattr(rerun_cache, "__version__", "999.0")
    assert rerun_cache.read(folder, key, inputs) is None
    _one_warning(capsys, "stale", "0.1")
    assert not path.exists()


def test_a_symlink_is_never_followed(entry, tmp_path_factory, capsys):
    folder, key, inputs, path = entry
    outside = tmp_path_factory.mktemp("outside") / "entry.npz"
    os.replace(path, outside)  # a perfectly valid entry, reached through a link out of the cache
    path.symlink_to(outside)
    assert rerun_cache.read(folder, key, inputs) is None
    _one_warning(capsys, "symlink")
    assert not path.is_symlink() and outside.is_file()  # the link went, its target did not
    # Writing replaces a link, never writes through it; pruning and sizing ignore links.
    path.symlink_to(outside)
    before = outside.read_bytes()
    assert rerun_cache.write(folder, key, inputs, _trace(1))
    assert outside.read_bytes() == before and not path.is_symlink()
    (folder / ("f" * 64 + ".npz")).symlink_to(outside)
    assert rerun_cache.cache_bytes(folder) == path.stat().st_size
    assert rerun_cache.prune(folder, 0) == [path] and outside.is_file()


def test_a_full_disk_leaves_no_partial_entry(tmp_path, capsys, monkeypatch):
    inputs = _inputs()
    key = rerun_cache.key_of(inputs)

    def enospc(f, arrays):
        f.write(b"PK\x03\x04" + b"\0" * 4096)  # a part of the entry reached the file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rerun_cache, "_save", enospc)
    assert rerun_cache.write(tmp_path, key, inputs, _trace()) is False
    _one_warning(capsys, "No space left", "not written")
    assert list(tmp_path.iterdir()) == []
    # Through the rerun itself: the result is used, nothing is kept, and the next call reruns.
    calls = []
    monkeypatch.setattr(certify_rerun, "_run", lambda *a: calls.append(1) or _trace())
    for _ in range(2):
        got = certify_rerun.rerun("m", "0" * 64, ORIGINAL_DEPLOYMENT, REFERENCE_RUN, REQUEST, IDS, X0, cache_dir=tmp_path)
        assert got.keys() == _trace().keys()
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_a_damaged_entry_is_recomputed_by_the_rerun(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(certify_rerun, "_run", lambda *a: calls.append(1) or _trace(len(calls)))
    stats = certify_rerun.CacheStats()

    def run():
        return certify_rerun.rerun("m", "0" * 64, ORIGINAL_DEPLOYMENT, REFERENCE_RUN, REQUEST, IDS, X0, cache_dir=tmp_path,
                                   stats=stats)

    first = run()
    (path,) = tmp_path.iterdir()
    assert run()["unet/step_0/noise_pred"].tobytes() == first["unet/step_0/noise_pred"].tobytes()
    _truncate(path)
    again = run()
    _one_warning(capsys, "damaged")
    assert len(calls) == 2 and (stats.hits, stats.misses) == (1, 2)
    assert run()["unet/step_0/noise_pred"].tobytes() == again["unet/step_0/noise_pred"].tobytes()  # rewritten whole
    assert capsys.readouterr().err == ""


def test_concurrent_writers_and_readers_of_one_key(tmp_path, capsys):
    inputs = _inputs()
    key = rerun_cache.key_of(inputs)
    want = _trace()
    stop, seen, errors = threading.Event(), [], []

    def writer():
        try:
            for _ in range(15):
                assert rerun_cache.write(tmp_path, key, inputs, want)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    def reader():
        while not stop.is_set():
            got = rerun_cache.read(tmp_path, key, inputs)
            if got is not None:
                seen.append(all(got[n].tobytes() == v.tobytes() for n, v in want.items()))

    threads = [threading.Thread(target=writer) for _ in range(4)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()
    assert errors == [] and seen and all(seen)
    assert capsys.readouterr().err == ""  # no reader ever saw a partial entry
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.npz"]


def test_prune_drops_least_recently_used_and_old_temporaries(tmp_path):
    files = []
    for i in range(4):
        f = tmp_path / f"{i:064x}.npz"
        f.write_bytes(b"x" * 1000)
        os.utime(f, (1000 + i, 1000 + i))
        files.append(f)
    os.utime(files[0], (5000, 5000))  # 0 was just read: now the most recent
    foreign = tmp_path / "notes.txt"
    foreign.write_bytes(b"y" * 10000)  # not the cache's: neither counted nor removed
    old_tmp, new_tmp = tmp_path / ".rerun-a.tmp", tmp_path / ".rerun-b.tmp"
    old_tmp.write_bytes(b"z")
    new_tmp.write_bytes(b"z")
    os.utime(old_tmp, (time.time() - 2 * rerun_cache.STALE_TMP_SECONDS,) * 2)
    gone = rerun_cache.prune(tmp_path, 2500, keep=files[3])
    assert gone == [files[1], files[2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([files[0].name, files[3].name, "notes.txt",
                                                                 new_tmp.name])
    assert rerun_cache.prune(tmp_path, 2500) == []
