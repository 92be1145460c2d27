"""``refsd-validate certify-fleet``: certify many bundles of one model, the
reference reruns as Dask tasks keyed by their content hash.

A device lab captures R requests on D devices. Each certificate needs the
reference, V calibration runs free-running and V fed the reference's own
trajectory, the original model's run and one run fed the device's trajectory
(``plan.Plan.jobs``). All but the last depend only on the model, the
deployment, the declared stages and the request, so bundles of one request and
deployment share them: their ``RerunJob.key`` is the same, and a Dask graph
runs a key once. N bundles of one request cost one set of calibration runs plus
N teacher-forced runs, and independent runs go in parallel on the workers.

Each certificate is then judged in this process by the driver ``certify``
uses (``certify.certify_plans``; this module supplies its executor), so a
fleet gives the same verdicts as certifying its bundles one by one.

A local cluster gets no more workers than that many reruns fit in the memory
available (:func:`rerun_memory_bytes`; an SD 2.1 calibration run with Winograd
holds ~10-12 GB, so two of them do not fit on a 24 GB machine and the kernel
kills one), and the cores are shared out as BLAS threads among its workers
(Dask's nanny would set ``OPENBLAS_NUM_THREADS=1``). A trace depends on the
BLAS thread count (``refsd.blas``) and the rerun cache keys on it, so a
fleet's cached reruns serve later fleets and single-bundle certifications
that ran with as many threads. Workers of a ``--dask`` cluster should run
without Dask's ``MALLOC_TRIM_THRESHOLD_`` (:func:`local_cluster` says why).
"""

from __future__ import annotations

import functools
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from string import Template

from refsd_validate.certificate import Certificate
from refsd_validate.certify import certify_plans
from refsd_validate.certify_rerun import CACHE_BUDGET_BYTES, RerunJob, model_options
from refsd_validate.outputs import tflite_tensor_names, write_outputs
from refsd_validate.plan import Plan, check_model_dir, prepare
from refsd_validate.reader import BundleError
from refsd_validate.tolerance import K

from refsd import console
from refsd.models.vae import VaeConfig
from refsd.trace import MODELS
from refsd.weights import load_component_state, read_config

FLEET = "refsd-fleet"


@dataclass
class FleetEntry:
    bundle: str
    device: str
    request: str
    certificate: Certificate
    out: Path
    declared: dict  # what the bundle declares about the device: soc, gpu, driver, runtime (device_declaration)

    @property
    def failing_module(self) -> str | None:
        """The first failure's module path, or its stage for a boundary tensor (None: none, or an exact check)."""
        first = self.certificate.first_failure
        return None if first is None else (first.module_path or first.stage)

    def to_dict(self) -> dict:
        cert, first = self.certificate, self.certificate.first_failure
        worst = max((r.verdict.k_needed for r in cert.results), default=0.0)
        return {"bundle": self.bundle, "device": self.device, "request": self.request, "declared": self.declared,
                "verdict": "certified" if cert.certified else "not certified",
                "worst_k": worst if worst != float("inf") else "inf",
                "first_failure": None if first is None else f"{first.name} ({first.mode})",
                "first_failing_module": self.failing_module,
                "explanation": cert.explanation.to_dict(),
                "certificate": f"{self.out.name}/certificate.json"}  # relative to the fleet folder


DECLARED = ("soc", "gpu", "driver", "runtime")


def device_declaration(plan: Plan) -> dict:
    """What a bundle declares about the device it ran on, for grouping a fleet's rejections."""
    d, r = plan.bundle.capture["device"], plan.bundle.capture["runtime"]
    delegate = (r.get("delegate") or {}).get("name")
    return {"soc": d.get("soc"), "gpu": d.get("gpu"), "driver": (r.get("accelerator") or {}).get("driver"),
            "runtime": f"{r['name']} {r['version']}" + (f" ({delegate})" if delegate else "")}


def device_label(plan: Plan) -> str:
    d, r = plan.bundle.capture["device"], plan.bundle.capture["runtime"]
    delegate = (r.get("delegate") or {}).get("name")
    return f"{d['name']} ({r['name']}{', ' + delegate if delegate else ''})"


def request_label(plan: Plan) -> str:
    q = plan.bundle.request
    return f"{q['prompt'][:40]!r} seed {q.get('seed')}, {q['width']}x{q['height']}, {q['steps']} {q['scheduler']} steps"


# The share of the memory available when the fleet starts that its local workers' reruns may take together: the
# rest is for the client (it holds every rerun's trace until the certificates are judged), Dask and the machine.
MEMORY_SHARE = 0.8
PROCESS_BYTES = 1 << 29


@functools.lru_cache(maxsize=8)
def _model_sizes(model_dir: str) -> tuple[int, int, int]:
    """(values in the checkpoint, of them in 3x3 convolution kernels, the VAE's
    channels at full resolution), from the safetensors headers (memory-mapped,
    nothing read)."""
    values = conv3 = 0
    for model in MODELS:
        for w in load_component_state(Path(model_dir) / model).values():
            values += w.size
            conv3 += w.size if w.ndim == 4 and w.shape[2:] == (3, 3) else 0
    path = Path(model_dir) / "vae" / "config.json"
    return values, conv3, VaeConfig.from_dict(read_config(path), str(path)).block_out_channels[0]


def rerun_memory_bytes(job: RerunJob) -> int:
    """About the peak memory of one rerun, on the high side: the process
    itself (Python, NumPy, the tokenizer, a Dask worker: ``PROCESS_BYTES``);
    the model in float32 (4 bytes a value); in fp16-storage runs with
    Winograd, the cached fp16 weight transforms (a 3x3 kernel's 6x6 tile: 4x
    its values, 2 bytes each, ``refsd.ops.winograd``); and the VAE decoder's
    full-resolution convolutions (im2col patches of 9 x its channels in
    float32, three such buffers live). Against the peak RSS measured on the
    SD 2.1-base architecture (bench/README, certification cost): 10.2 GiB for
    9.5 measured (128x128, Winograd), 10.8 for 10.1 (256x256), 13.3 for 12.4
    (512x512), 5.5 for 5.0 (128x128, plain)."""
    values, conv3, channels = _model_sizes(job.model_dir)
    winograd = any("winograd" in o.rewrites and o.precision.storage16
                   for o in model_options(job.deployment, job.variant).values())
    pixels = int(job.request["width"]) * int(job.request["height"])
    return PROCESS_BYTES + 4 * values + (8 * conv3 if winograd else 0) + 3 * 9 * 4 * channels * pixels


def largest_rerun(plans: list[Plan]) -> int:
    """:func:`rerun_memory_bytes` of the largest rerun the plans (or their full designs) may need."""
    return max(rerun_memory_bytes(job) for plan in plans for p in (plan, plan.completed()) for job in p.jobs())


def local_workers(plans: list[Plan], asked: int) -> tuple[int, int, str | None]:
    """(workers, BLAS threads each, a notice or None) for a local cluster:
    at most ``asked``, no more than the largest rerun fits into
    ``MEMORY_SHARE`` of the memory available that many times, and the
    machine's cores shared out among them."""
    import psutil  # noqa: PLC0415 (a dependency of Dask's)

    need = largest_rerun(plans)
    available = psutil.virtual_memory().available
    fit = max(1, int(MEMORY_SHARE * available // need))
    workers = min(asked, fit)
    notice = None
    if workers < asked:
        notice = (f"certify-fleet: {workers} worker{'s' * (workers > 1)} instead of {asked}: a rerun of this model "
                  f"at {plans[0].bundle.request['width']}x{plans[0].bundle.request['height']} needs about "
                  f"{need / 2**30:.1f} GiB and {available / 2**30:.1f} GiB is available")
    return workers, max(1, cores() // workers), notice


def cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_cluster(workers: int, threads: int):
    """A Dask ``LocalCluster`` of ``workers`` processes for reruns, each with
    ``threads`` BLAS threads. No per-worker memory limit: Dask's default (the
    machine's memory / workers) restarts a worker that holds a real SD 2.1
    rerun and recomputes its tasks (``local_workers`` sizes the cluster to the
    memory instead). And no ``MALLOC_TRIM_THRESHOLD_``, which Dask's nanny
    sets to 65536 by default: it turns off glibc's adaptive mmap threshold, so
    every large temporary array is fresh pages, faulted in again (an SD 2.1
    f32_f16 UNet forward: 40x the page faults, 1.3x the time)."""
    from dask import config as dask_config  # noqa: PLC0415 (only certify-fleet needs Dask)
    from distributed import LocalCluster  # noqa: PLC0415

    spawn = {f"distributed.nanny.pre-spawn-environ.{v}": threads
             for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    spawn["distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"] = None
    with dask_config.set(spawn):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                            memory_limit=0)


def cluster_warnings(client, need: int) -> list[str]:
    """What may go wrong on a running cluster's workers (``--dask``): a memory
    limit below ``need`` bytes (Dask restarts a worker that reaches it), and
    Dask's ``MALLOC_TRIM_THRESHOLD_`` (see :func:`local_cluster`)."""
    out = []
    small = sorted(w for w, info in client.scheduler_info()["workers"].items()
                   if 0 < (info.get("memory_limit") or 0) < need)
    if small:
        out.append(f"certify-fleet: {len(small)} of the cluster's workers ({small[0]}, ...) have a memory limit below "
                   f"the about {need / 2**30:.1f} GiB a rerun of this model may need: Dask restarts a worker that "
                   "reaches its limit")
    trimmed = sorted(w for w, v in client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").items() if v)
    if trimmed:
        out.append(f"certify-fleet: {len(trimmed)} of the cluster's workers ({trimmed[0]}, ...) run with "
                   "MALLOC_TRIM_THRESHOLD_ set (Dask's nanny sets 65536): refsd's reruns take about 1.3x longer there; "
                   "start them with the Dask config distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_: null")
    return out


def schedule(plans: dict[int, Plan], client, futures: dict[str, object]) -> dict[int, dict[tuple[str, int], object]]:
    """Submit every plan's reruns to ``client``, one task per distinct content
    key (a job fed the reference's trajectory depends on that reference's
    task); ``futures`` (by key) holds those already submitted, and gains the
    new ones. Returns, per plan, its futures keyed (role, index)."""
    per_plan = {}
    for p, plan in plans.items():
        jobs = plan.jobs()
        ref_job = jobs[0]
        ref_key = ref_job.key()
        mine = {}
        for job in jobs:
            key = f"rerun-{job.key(ref_key)}"
            if key not in futures:
                ref = futures[f"rerun-{ref_key}"] if job.teacher == "reference" else None
                futures[key] = client.submit(job.run, ref, cache_dir=str(plan.cache), cache_budget=plan.cache_budget,
                                             key=key, pure=False)
            mine[job.role, job.index] = futures[key]
        per_plan[p] = mine
    return per_plan


def certify_fleet(bundles: list[str | Path], model_dir: str | Path, out: str | Path, *, dask: str | None = None,
                  workers: int = 2, mode: str = "both", cache_dir: str | Path | None = None, k: float = K,
                  cache_budget: int = CACHE_BUDGET_BYTES, tflite_dir: str | Path | None = None, strict: bool = False,
                  max_deployment_cost=None, progress: bool = False) -> tuple[list[FleetEntry], dict]:
    """Certify ``bundles`` against ``model_dir``; write one certificate folder
    per bundle under ``out`` plus ``fleet.json`` and ``fleet.html``. ``dask``:
    a scheduler address (``tcp://host:8786``) whose workers see ``model_dir``
    and the cache; default a ``LocalCluster`` of ``workers`` processes.
    Returns the entries and the run's task counts. Raises ``BundleError`` for
    bad input (any bundle: nothing is certified then). A script calling it
    needs the ``if __name__ == "__main__":`` guard: the local cluster's
    workers are spawned processes, which import the script again."""
    from distributed import Client, KilledWorker, as_completed  # noqa: PLC0415 (only this command needs Dask)

    if not bundles:
        raise BundleError("certify-fleet: no bundles given")
    if len({str(Path(b).resolve()) for b in bundles}) != len(bundles):
        raise BundleError("certify-fleet: a bundle is given twice")
    check_model_dir(model_dir)  # once, not blamed on a bundle
    plans = []
    for b in bundles:
        try:
            plans.append(prepare(b, model_dir, mode=mode, cache_dir=cache_dir, k=k, cache_budget=cache_budget,
                                 tflite_dir=tflite_dir, strict=strict, max_deployment_cost=max_deployment_cost))
        except BundleError as e:
            raise BundleError(f"{b}: {e}") from None
    out = Path(out)
    tflite_names = tflite_tensor_names(tflite_dir) if tflite_dir else None
    cluster = None
    # A LocalCluster's nanny sets OMP/MKL/OPENBLAS_NUM_THREADS=1 (and more) in this process's environment for
    # its workers and leaves them there: every process the caller starts afterwards would run single-threaded
    # BLAS and PyTorch, and compute other bits (refsd.blas). Put the environment back when done.
    environ = dict(os.environ)
    if dask is None:
        workers, threads, notice = local_workers(plans, workers)
        if notice:
            print(notice, file=console.err())
        cluster = local_cluster(workers, threads)
    try:
        try:
            client = Client(cluster if cluster is not None else dask, timeout="30s")
        except (OSError, TimeoutError, ValueError) as e:
            raise BundleError(f"--dask {dask}: cannot reach the scheduler ({' '.join(str(e).split())})") from None
        with client:
            if cluster is None:
                for line in cluster_warnings(client, largest_rerun(plans)):
                    print(line, file=console.err())
            futures: dict[str, object] = {}
            with console.progress(total=0, desc="certify-fleet: reference reruns", unit="run", enabled=progress) as bar:
                def execute(todo: dict[int, Plan], traces: dict[int, dict], check) -> None:
                    before = len(futures)
                    per_plan = schedule(todo, client, futures)
                    bar.total += len(futures) - before
                    bar.refresh()
                    for _ in as_completed(list(futures.values())[before:]):
                        bar.update()
                    for p, plan in todo.items():
                        try:
                            traces[p].update({role: f.result() for role, f in per_plan[p].items()})
                        except KilledWorker as e:
                            raise BundleError(
                                f"certify-fleet: the workers running {e.task} died "
                                f"{e.allowed_failures + 1} time{'s' * (e.allowed_failures > 0)} "
                                f"(out of memory? a rerun of this model needs up to about "
                                f"{largest_rerun([plan]) / 2**30:.1f} GiB): use fewer "
                                "--workers, or workers with more memory") from None
                        check(plan, traces[p]["reference", 0])

                plans, certs = certify_plans(plans, execute)
            entries = []
            for p, (plan, cert) in enumerate(zip(plans, certs)):
                where = out / _folder(p, plan)
                write_outputs(cert, where, tflite_names)
                entries.append(FleetEntry(str(plan.bundle.source), device_label(plan), request_label(plan), cert,
                                          where, device_declaration(plan)))
    finally:
        if cluster is not None:
            cluster.close()
        os.environ.clear()
        os.environ.update(environ)
    counts = {"bundles": len(plans), "reruns_needed": sum(len(plan.jobs()) for plan in plans),
              "reruns_run": len(futures), "local_workers": None if dask is not None else workers}
    write_fleet(entries, counts, out)
    return entries, counts


def _folder(p: int, plan: Plan) -> str:
    stem = Path(str(plan.bundle.source)).name.removesuffix(".zip")
    return f"{p:03d}_{''.join(c if c.isalnum() or c in '-_.' else '_' for c in stem)[:60]}"


def write_fleet(entries: list[FleetEntry], counts: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"fleet": FLEET, "version": 1, "counts": counts, "bundles": [e.to_dict() for e in entries]}
    (out / "fleet.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (out / "fleet.html").write_text(render_fleet(entries, counts), encoding="utf-8")


_PAGE = Template("""<!doctype html>
<html><head><meta charset="utf-8"><title>refsd fleet: $certified of $total certified</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 2em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
.ok { background: #e3f6e3; } .bad { background: #fbe1e1; } .none { color: #999; }
</style></head><body>
<h1>refsd fleet: $certified of $total bundles certified</h1>
<p>Devices (rows) by requests (columns): the verdict, the worst k needed (the tolerance is k = $k noise floors),
and the first failing tensor. $reruns distinct reference reruns for $needed the certificates needed (the rest
shared between bundles of one request).</p>
<table><tr><th>device</th>$head</tr>
$rows
</table>
$groups
</body></html>
""")


def render_fleet(entries: list[FleetEntry], counts: dict) -> str:
    devices = list(dict.fromkeys(e.device for e in entries))
    requests = list(dict.fromkeys(e.request for e in entries))
    cells = {}
    for e in entries:
        cells.setdefault((e.device, e.request), []).append(e)
    rows = []
    for d in devices:
        tds = []
        for r in requests:
            parts = []
            for e in cells.get((d, r), []):
                x = e.to_dict()
                link = html.escape(f"{e.out.name}/report.html")
                k_text = x["worst_k"] if isinstance(x["worst_k"], str) else f"{x['worst_k']:.2f}"
                verdict_line = e.certificate.explanation.line("verdict")
                parts.append(f'<a href="{link}">{html.escape(x["verdict"])}</a>, worst k {k_text}'
                             + ("" if e.certificate.certified else f"<br>{html.escape(verdict_line.text)}"))
            cls = "none" if not parts else ("ok" if all(e.certificate.certified for e in cells[d, r]) else "bad")
            tds.append(f'<td class="{cls}">' + ("<hr>".join(parts) or "no bundle") + "</td>")
        rows.append(f"<tr><th>{html.escape(d)}</th>{''.join(tds)}</tr>")
    k = entries[0].certificate.rule["k"] if entries else K
    return _PAGE.substitute(groups=_groups(entries), certified=sum(e.certificate.certified for e in entries), total=len(entries), k=k,
                            reruns=counts["reruns_run"], needed=counts["reruns_needed"],
                            head="".join(f"<th>{html.escape(r)}</th>" for r in requests), rows="\n".join(rows))


def _groups(entries: list[FleetEntry]) -> str:
    """The rejections grouped by first failing module, and by what the bundles
    declare about the device against that module: "every device with driver X
    fails at module Y" at a glance."""
    rejected = [e for e in entries if not e.certificate.certified]
    if not rejected:
        return ""
    by_module: dict[str, list[FleetEntry]] = {}
    for e in rejected:
        by_module.setdefault(e.failing_module or "(an exact check)", []).append(e)
    rows = "".join(f"<tr><td><code>{html.escape(m)}</code></td><td>{len(es)}</td><td>"
                   + "<br>".join(html.escape(f"{e.device}; {e.request}") for e in es) + "</td></tr>"
                   for m, es in sorted(by_module.items(), key=lambda kv: -len(kv[1])))
    out = ["<h2>Rejections by first failing module</h2><table><tr><th>module</th><th>bundles</th>"
           f"<th>devices</th></tr>{rows}</table>"]
    for key in DECLARED:
        counts: dict[tuple[str, str], list[FleetEntry]] = {}
        for e in rejected:
            counts.setdefault((str(e.declared.get(key)), e.failing_module or "(an exact check)"), []).append(e)
        total = {}
        for e in entries:
            total[str(e.declared.get(key))] = total.get(str(e.declared.get(key)), 0) + 1
        rows = "".join(f"<tr><td>{html.escape(v)}</td><td><code>{html.escape(m)}</code></td>"
                       f"<td>{len(es)} of {total[v]}</td></tr>" for (v, m), es in sorted(counts.items()))
        out.append(f"<h3>by declared {key}</h3><table><tr><th>{key}</th><th>first failing module</th>"
                   f"<th>rejected</th></tr>{rows}</table>")
    return "\n".join(out)


__all__ = ["FLEET", "FleetEntry", "certify_fleet", "render_fleet", "schedule", "write_fleet"]
