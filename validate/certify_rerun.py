"""Rerunning the reference on a bundle's own inputs, free-running or
teacher-forced, for the model as deployed, cached by content hash.

The run is ``refsd.pipeline.Pipeline`` itself (its loop, its teacher forcing:
each stage fed the *device's* inputs, so a tensor's error is that step's own
error, separated from the drift of the trajectory), with one ``ModelOptions``
per model built from the :class:`Deployment` (weights as stored, the graph's
rewrites, how int8 weights ran) and the ``CalibrationRun``: each stage's
``RunSettings`` (:func:`stage_settings`: precision, FTZ, device model,
perturbed transcendentals, either-rounding, weight jitter) and other kernels.

The run is a pure function of (the reference's code, model sha256,
deployment, each stage's settings and kernels (:func:`run_content`), request,
token ids, initial latents, teacher tensors, intermediates asked for); its
result is cached under ``sha256`` of those in ``cache_dir``
(``refsd_validate.rerun_cache``: each entry proves its key's inputs, version
and content before it is used), names in execution order.
"The code" is a hash of refsd's own source files plus NumPy's version and the
machine architecture, so an edited checkout never reads a stale rerun (a
version number would not change).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from refsd_validate import rerun_cache
from refsd_validate.tolerance import CalibrationRun

import refsd
from refsd.trace import (
    HIDDEN_STATES,
    LATENTS_INIT,
    MODELS,
    STAGES,
    TIMESTEPS,
    boundary_names,
    execution_order,
    latents,
    parse_name,
)
from refsd.blas import blas_fingerprint
from refsd.context import recording
from refsd.models.options import ModelOptions
from refsd.models.rewrites import EXCLUSIVE, Rewrites
from refsd.monitor import Monitor
from refsd.numerics import Precision, RunSettings
from refsd.pipeline import Pipeline, Request

# Reruns of the real SD 2.1 at 512x512 with intermediates are ~100s of MB; 50 certifications of the tiny model at
# 64x64 with every intermediate wrote ~5 GB. Least-recently-used eviction keeps the calibration runs that bundles of
# one request share (each certification hits them again), and drops the per-bundle teacher-forced runs first.
CACHE_BUDGET_BYTES = 8 << 30


@dataclass
class CacheStats:
    """What the rerun cache did for one certification (reported in the certificate and on the CLI)."""

    hits: int = 0
    misses: int = 0
    bytes_after: int = 0
    evicted: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def to_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate, "bytes_after": self.bytes_after,
                "evicted": self.evicted}


@dataclass(frozen=True)
class Deployment:
    """The model as deployed: weights as stored (``fp32`` | ``fp16`` | ``bf16``
    | ``int8``), the graph rewrites it runs (a ``Rewrites`` spec), and per
    model how its int8 weights ran (``hybrid`` | ``dequantize``, None without
    int8). ``int8_source``: an export folder whose .tflite files hold the int8
    values and scales (else refsd quantizes as the exporter does)."""

    weights: str = "fp32"
    rewrites: str = "none"
    int8_kernels: tuple[str | None, ...] = (None, None, None)  # per refsd.trace.MODELS
    int8_source: str | None = None

    @classmethod
    def of_bundle(cls, capture: Mapping, stages: Mapping, int8_source: str | None = None) -> "Deployment":
        """The deployment a capture.json describes; ``stages``: its ``bundle.declared_stages``."""
        weights = capture["model"].get("weights", "fp32")
        return cls(weights, str(Rewrites.parse(capture["model"].get("rewrites", "none"))),
                   tuple(stages[m].int8_kernels if weights == "int8" else None for m in MODELS),
                   int8_source if weights == "int8" else None)

    @property
    def label(self) -> str:
        kernels = sorted({k for k in self.int8_kernels if k})
        return f"weights {self.weights}" + (f" ({'/'.join(kernels)})" if kernels else "") + f", rewrites {self.rewrites}"


ORIGINAL_DEPLOYMENT = Deployment()  # the checkpoint as published: fp32 weights, no rewrites


def stage_settings(variant: CalibrationRun) -> dict[str, RunSettings]:
    """The settings each stage (``refsd.trace.STAGES``) runs under in
    ``variant``: its precision, FTZ, device model and weight jitter, and the
    run's transcendental ulps and either-rounding (run-wide: only the stages
    that vary them have transcendentals perturbed enough to matter / hybrid
    kernels)."""
    return {name: RunSettings(Precision(sv.precision, sv.ftz, device_model=sv.device_model),
                              transcendental_ulps=variant.libm_ulps, either_rounding=variant.either_rounding,
                              weight_jitter=sv.weight_jitter)
            for name, sv in zip(STAGES, variant.stages)}


def run_content(variant: CalibrationRun) -> dict:
    """What a rerun of a deployment computes under, as JSON (part of its cache
    key): each stage's settings' content and the kernels it adds."""
    return {name: {**s.content(), "kernels": variant.stage(name).kernels}
            for name, s in stage_settings(variant).items()}


def model_options(deployment: Deployment, variant: CalibrationRun) -> dict[str, ModelOptions]:
    """One ``ModelOptions`` per model: the deployment's weights and rewrites
    under the stage's settings, plus the variant's kernel rewrites where
    they do not replace an op the deployment already rewrote."""
    out = {}
    settings = stage_settings(variant)
    for model, kernels in zip(MODELS, deployment.int8_kernels):
        sv = variant.stage(model)
        deployed = Rewrites.parse(deployment.rewrites)
        taken = {x for a, b in EXCLUSIVE for x in (a, b) if a in deployed or b in deployed}
        extra = [n for n in Rewrites.parse(sv.kernels) if n not in taken]
        rw = Rewrites.parse([*deployed, *extra], **{f.name: getattr(deployed, f.name)
                                                   for f in dataclasses.fields(deployed) if f.name != "names"})
        out[model] = ModelOptions.make(settings=settings[model], rewrites=rw,
                                       **_weight_options(deployment, kernels))
    return out


def _weight_options(deployment: Deployment, kernels: str | None) -> dict:
    if deployment.weights == "fp32":
        return {}
    opts = {"weights": deployment.weights}
    if deployment.weights == "int8":
        opts["int8_kernels"] = kernels or "dequantize"
        if deployment.int8_source is not None:
            opts["int8_values"] = _int8_values(deployment.int8_source)
    return opts


@functools.lru_cache(maxsize=4)
def _int8_values(folder: str) -> dict:
    """The int8 values and per-channel scales stored in an export's .tflite files (read once per folder)."""
    from refsd.export.tflite_weights import read_int8_weights  # noqa: PLC0415 (needs ai-edge-litert's schema)

    return read_int8_weights(folder)


class _Keep(dict):
    """A trace that keeps only wanted names, in the order they are produced
    (``refsd.context.recording`` stores every module output into it)."""

    def __init__(self, wanted: frozenset[str]) -> None:
        super().__init__()
        self.wanted = wanted
        self.sequence: list[str] = []  # every module output's name, wanted or not, in order

    def __setitem__(self, key, value) -> None:
        self.sequence.append(key)
        if key in self.wanted:
            super().__setitem__(key, np.array(value))


def teacher_inputs(tensors: Mapping[str, np.ndarray], steps: int) -> dict[str, np.ndarray]:
    """The tensors a teacher-forced run feeds from a device (or reference) trace."""
    wanted = [HIDDEN_STATES, *(latents(i) for i in range(steps))]
    return {n: np.asarray(tensors[n], np.float32) for n in wanted}


def rerun(model_dir: str | Path, model_sha: str, deployment: Deployment, variant: CalibrationRun, request: Mapping,
          token_ids: np.ndarray, latents_init: np.ndarray, *, teacher: Mapping[str, np.ndarray] | None = None,
          intermediates: frozenset[str] = frozenset(), cache_dir: str | Path | None = None,
          cache_budget: int = CACHE_BUDGET_BYTES, monitor=None, stats: CacheStats | None = None) -> dict[str, np.ndarray]:
    """The reference trace (boundary tensors and the asked-for intermediates)
    of ``request`` for ``deployment`` under ``variant``. Cached when
    ``cache_dir`` is given (and no ``monitor`` watches the run), the cache
    pruned to ``cache_budget`` bytes."""
    ids = np.ascontiguousarray(token_ids, dtype=np.int64)
    x0 = np.ascontiguousarray(latents_init, dtype=np.float32)
    inputs = _key_inputs(model_sha, deployment, variant, request, ids, x0, teacher, intermediates)
    key = rerun_cache.key_of(inputs)
    cache = Path(cache_dir) if cache_dir is not None and monitor is None else None
    stats = stats if stats is not None else CacheStats()
    if cache is not None:
        trace = rerun_cache.read(cache, key, inputs)
        if trace is not None:
            stats.hits += 1
            return trace
    stats.misses += 1
    trace = _run(model_dir, deployment, variant, request, ids, x0, teacher, intermediates, monitor)
    if cache is not None and rerun_cache.write(cache, key, inputs, trace):
        stats.evicted += len(rerun_cache.prune(cache, cache_budget, keep=cache / f"{key}.npz"))
    return trace


@functools.cache
def code_fingerprint() -> str:
    """sha256 of refsd's source files and of this module and the variants'
    (relative path and bytes: a rerun is their function), NumPy's version and
    the machine architecture: what a cached rerun depends on."""
    root = Path(refsd.__file__).parent
    h = hashlib.sha256(f"{refsd.__version__} numpy {np.__version__} {platform.machine()}".encode())
    here = Path(__file__).parent
    files = [(f.relative_to(root).as_posix(), f) for f in sorted(root.rglob("*.py"))]
    files += [(f"refsd_validate/{name}", here / name) for name in ("certify_rerun.py", "tolerance.py")]
    for rel, f in files:
        h.update(rel.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


OVERFLOW_KEY = "meta/first_severe_event"  # in a trace: JSON bytes (uint8) of the run's first fp16 overflow, if any


def _run(model_dir, deployment: Deployment, variant: CalibrationRun, request, ids, x0, teacher, intermediates,
         monitor) -> dict[str, np.ndarray]:
    pipe = Pipeline(model_dir, options=model_options(deployment, variant),
                    guidance_precision=stage_settings(variant)["guidance_scheduler"].precision)
    req = Request(prompt="", steps=int(request["steps"]), guidance=float(request["guidance"]),
                  scheduler=request["scheduler"], height=int(request["height"]), width=int(request["width"]))
    steps = req.steps
    keep = _Keep(frozenset(intermediates))
    # An fp16 run can overflow inside an op and still return finite tensors (a GroupNorm whose sum of squares
    # is inf divides by it: its output is beta), so finiteness alone cannot say a run is a fair calibration:
    # the monitor's first severe event (overflow, invalid) is kept with the trace.
    # Underflows are not collected: they are the precision itself, and counting them costs a fused fp16 sum
    # its speed.
    if monitor is None and any(sv.precision != "f32" for sv in variant.stages):
        monitor = Monitor(underflow=False)
    with recording(into=keep):
        result = pipe(req, latents=x0, token_ids=ids, teacher=teacher, monitor=monitor, progress=False)
    wanted = (set(boundary_names(steps)) | {TIMESTEPS}) - {LATENTS_INIT}  # an input, not a result
    trace = {n: v for n, v in result.trace.items() if n in wanted}
    trace.update(keep)
    trace = {n: trace[n] for n in execution_order(trace)}
    # Constants lost to fp16 (eps flushed by FTZ) are severe in a report but are the precision itself, not an overflow.
    severe = next((e for e in monitor.events if e.kind in ("overflow", "invalid")), None) if monitor else None
    if severe is not None:
        event = {"op": f"{severe.path} ({severe.op}/{severe.primitive})", "stage": severe.stage, "step": severe.step,
                 "detail": f"{severe.kind}: {severe.detail}", "unaffected": _recorded_before(keep, severe)}
        trace[OVERFLOW_KEY] = np.frombuffer(json.dumps(event).encode(), np.uint8)
    return trace


def _recorded_before(keep: _Keep, event) -> list[str]:
    """The kept module outputs recorded before the overflowing module began to
    output (itself, or one of its children): computed before the overflow, so
    still fair calibration. Empty when the module is not found (conservative)."""
    def inside(name: str) -> bool:
        stage, step, path = parse_name(name)
        path = (path or "").split("#", 1)[0]
        return (stage, step) == (event.stage, event.step) and (path == event.path or path.startswith(event.path + "."))

    first = next((i for i, n in enumerate(keep.sequence) if inside(n)), None)
    return [] if first is None else [n for n in keep.sequence[:first] if n in keep]


def first_severe_event(trace: Mapping[str, np.ndarray]) -> dict | None:
    """The run's first fp16 overflow / invalid event ({op, stage, step, detail}), None if it had none."""
    raw = trace.get(OVERFLOW_KEY)
    return None if raw is None else json.loads(np.asarray(raw, np.uint8).tobytes().decode())


def _key_inputs(model_sha, deployment, variant, request, ids, x0, teacher, intermediates) -> dict:
    """What a rerun is a function of, as JSON (arrays by sha256): its cache key hashes this and its entry keeps it."""
    def digest(arr) -> str:
        return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()

    return {"blas": blas_fingerprint(),  # results depend on BLAS threads (refsd.blas)
            "code": code_fingerprint(), "model": model_sha, "deployment": dataclasses.asdict(deployment),
            "int8_source": _source_digest(deployment.int8_source), "run": run_content(variant),
            "request": {k: request[k] for k in ("steps", "scheduler", "guidance", "height", "width")},
            "intermediates": sorted(intermediates), "token_ids": digest(ids), "latents_init": digest(x0),
            "teacher": {n: digest(np.asarray(teacher[n], np.float32)) for n in sorted(teacher or {})}}


def _cache_key(model_sha, deployment, variant, request, ids, x0, teacher, intermediates) -> str:
    return rerun_cache.key_of(_key_inputs(model_sha, deployment, variant, request, ids, x0, teacher, intermediates))


def _source_digest(folder: str | None) -> str | None:
    """The export manifest's bytes pin every .tflite by sha256: its hash names the int8 values."""
    if folder is None:
        return None
    return hashlib.sha256((Path(folder) / "refsd_export.json").read_bytes()).hexdigest()


@dataclass(frozen=True, eq=False)
class RerunJob:
    """One reference run a certificate needs, self-contained (it pickles: a
    fleet ships it to a Dask worker). ``teacher``: None free-running;
    ``"reference"`` fed the trajectory of the reference run (given to
    :meth:`run`, so the job's identity is that run's key plus its own
    settings); ``"tensors"`` fed ``teacher_tensors`` (a device's trajectory)."""

    role: str  # reference | free | teacher | device_teacher | original (what certify uses the trace for)
    index: int  # the calibration variant's index (0 for the others)
    variant: CalibrationRun
    deployment: Deployment
    intermediates: frozenset[str]
    teacher: str | None
    model_dir: str
    model_sha: str
    request: Mapping
    token_ids: np.ndarray
    latents_init: np.ndarray
    teacher_tensors: Mapping[str, np.ndarray] | None = None

    def key(self, reference_key: str | None = None) -> str:
        """The content hash of the run (its cache key). A job fed the reference's
        trajectory is named by that reference's key and its own settings."""
        if self.teacher == "reference":
            if reference_key is None:
                raise ValueError("a job fed the reference's trajectory is keyed by the reference run's key")
            h = hashlib.sha256(b"teacher-forced on reference " + reference_key.encode())
            h.update(json.dumps({"run": run_content(self.variant),
                                 "deployment": dataclasses.asdict(self.deployment),
                                 "intermediates": sorted(self.intermediates)}, sort_keys=True).encode())
            return h.hexdigest()
        return _cache_key(self.model_sha, self.deployment, self.variant, self.request,
                          np.ascontiguousarray(self.token_ids, dtype=np.int64),
                          np.ascontiguousarray(self.latents_init, dtype=np.float32),
                          self.teacher_tensors, self.intermediates)

    def run(self, reference: Mapping[str, np.ndarray] | None = None, *, cache_dir: str | Path | None = None,
            cache_budget: int = CACHE_BUDGET_BYTES, stats: CacheStats | None = None) -> dict[str, np.ndarray]:
        teacher = self.teacher_tensors
        if self.teacher == "reference":
            if reference is None:
                raise ValueError("this job is fed the reference's trajectory: pass the reference trace")
            teacher = teacher_inputs(reference, int(self.request["steps"]))
        return rerun(self.model_dir, self.model_sha, self.deployment, self.variant, self.request, self.token_ids,
                     self.latents_init, teacher=teacher, intermediates=self.intermediates, cache_dir=cache_dir,
                     cache_budget=cache_budget, stats=stats)
