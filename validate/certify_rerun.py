"""Rerunning the reference on a bundle's own inputs, free-running or
teacher-forced, cached by content hash.

Free-running: the pipeline from the bundle's token ids and initial latents,
exactly ``refsd.pipeline.Pipeline``'s loop (tests/test_certify.py checks the
two agree bit for bit). Teacher-forced: each stage is fed the *device's*
inputs: the UNet at step i gets the device's hidden states and its latents
after step i-1, the decoder the device's final latents; so a tensor's error
is that step's own error, separated from the drift of the trajectory.

The run is a pure function of (the reference's code, model sha256, variant,
request, token ids, initial latents, teacher tensors, intermediates asked
for); its result is cached under ``sha256`` of those in ``cache_dir`` as a
plain .npz (read back with ``allow_pickle=False``), names in execution order.
"The code" is a hash of refsd's own source files plus NumPy's version and the
machine architecture, so an edited checkout never reads a stale rerun (a
version number would not change). The cache is kept under a byte budget by
dropping the least recently used reruns (a hit refreshes its time).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Mapping

import numpy as np

import refsd
from refsd.blas import blas_fingerprint
from refsd.monitor import location, recording
from refsd.pipeline import Pipeline
from refsd.schedulers import make_scheduler
from refsd_validate.tolerance import Variant

CACHE_BUDGET_BYTES = 4 << 30  # reruns of the real SD 2.1 at 512x512 with intermediates are ~100s of MB
BOUNDARY_INPUTS = ("text_encoder/hidden_states",)  # plus scheduler/step_{i}/latents, fed when teacher-forcing


class _Keep(dict):
    """A trace that keeps only wanted names, in the order they are produced
    (``refsd.monitor.recording`` stores every module output into it)."""

    def __init__(self, wanted: frozenset[str]) -> None:
        super().__init__()
        self.wanted = wanted

    def __setitem__(self, key, value) -> None:
        if key in self.wanted:
            super().__setitem__(key, np.array(value))


def teacher_inputs(tensors: Mapping[str, np.ndarray], steps: int) -> dict[str, np.ndarray]:
    """The tensors a teacher-forced run feeds from a device (or reference) trace."""
    names = [*BOUNDARY_INPUTS, *(f"scheduler/step_{i}/latents" for i in range(steps))]
    return {n: np.asarray(tensors[n], np.float32) for n in names}


def boundary_names(steps: int) -> list[str]:
    return ["text_encoder/hidden_states", "scheduler/timesteps",
            *(f"{s}/step_{i}/{t}" for i in range(steps) for s, t in (("unet", "noise_pred"), ("scheduler", "latents"))),
            "vae/image"]


def rerun(model_dir: str | Path, model_sha: str, variant: Variant, request: Mapping, token_ids: np.ndarray,
          latents_init: np.ndarray, *, teacher: Mapping[str, np.ndarray] | None = None,
          intermediates: frozenset[str] = frozenset(), cache_dir: str | Path | None = None,
          cache_budget: int = CACHE_BUDGET_BYTES) -> dict[str, np.ndarray]:
    """The reference trace (boundary tensors and the asked-for intermediates)
    of ``request`` under ``variant``. Cached when ``cache_dir`` is given, the
    cache pruned to ``cache_budget`` bytes."""
    ids = np.ascontiguousarray(token_ids, dtype=np.int64)
    x0 = np.ascontiguousarray(latents_init, dtype=np.float32)
    key = _cache_key(model_sha, variant, request, ids, x0, teacher, intermediates)
    path = Path(cache_dir) / f"{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            trace = {n: z[n] for n in z.files}
        os.utime(path)  # recently used
        return trace
    trace = _run(model_dir, variant, request, ids, x0, teacher, intermediates)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **trace)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
        prune_cache(path.parent, cache_budget, keep=path)
    return trace


def prune_cache(cache_dir: Path, budget: int, *, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used reruns until the cache holds at most
    ``budget`` bytes (``keep``, the one just written, stays). Returns what went."""
    entries = []
    for f in cache_dir.glob("*.npz"):
        try:
            st = f.stat()
        except FileNotFoundError:  # pruned concurrently
            continue
        entries.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in entries)
    gone = []
    for _, size, f in sorted(entries):
        if total <= budget:
            break
        if f == keep:
            continue
        f.unlink(missing_ok=True)
        total -= size
        gone.append(f)
    return gone


@functools.cache
def code_fingerprint() -> str:
    """sha256 of refsd's source files (relative path and bytes), NumPy's
    version and the machine architecture: what a cached rerun depends on."""
    root = Path(refsd.__file__).parent
    h = hashlib.sha256(f"{refsd.__version__} numpy {np.__version__} {platform.machine()}".encode())
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _run(model_dir, variant: Variant, request, ids, x0, teacher, intermediates) -> dict[str, np.ndarray]:
    pipe = Pipeline(model_dir, precision=variant.precision, ftz=variant.ftz, rewrites=variant.rewrites)
    models = pipe.components
    steps = int(request["steps"])
    sched = make_scheduler(request["scheduler"], pipe.scheduler_config)
    timesteps = sched.set_timesteps(steps)
    g = np.float32(request["guidance"])
    trace = _Keep(frozenset(intermediates) | frozenset(boundary_names(steps)))
    with recording(into=trace):
        with location("text_encoder"):
            context = np.array(models.text_encoder(ids))
        trace["text_encoder/hidden_states"] = context
        trace["scheduler/timesteps"] = np.asarray(timesteps)
        if teacher is not None:
            context = teacher["text_encoder/hidden_states"]
        x = x0
        for i in range(steps):
            x_in = sched.scale_model_input(np.concatenate([x, x]), i)
            with location("unet", i):
                noise = np.array(models.unet(x_in, timesteps[i], context))
            uncond, cond = noise[:1], noise[1:]
            x = sched.step(uncond + g * (cond - uncond), i, x)
            trace[f"unet/step_{i}/noise_pred"] = noise
            trace[f"scheduler/step_{i}/latents"] = x
            if teacher is not None:
                x = teacher[f"scheduler/step_{i}/latents"]
        with location("vae"):
            trace["vae/image"] = np.array(models.vae.decode_latents(x))
    return dict(trace)


def _cache_key(model_sha, variant, request, ids, x0, teacher, intermediates) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(blas_fingerprint(), sort_keys=True).encode())  # results depend on BLAS threads (refsd.blas)
    fields = {k: request[k] for k in ("steps", "scheduler", "guidance", "height", "width")}
    h.update(json.dumps({"code": code_fingerprint(), "model": model_sha, "variant": [variant.precision, variant.ftz,
                         variant.rewrites], "request": fields, "intermediates": sorted(intermediates)},
                        sort_keys=True).encode())
    for arr in (ids, x0):
        h.update(arr.tobytes())
    for name in sorted(teacher or {}):
        h.update(name.encode() + b"\0" + np.ascontiguousarray(teacher[name], np.float32).tobytes())
    return h.hexdigest()
