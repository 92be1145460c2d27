"""``refsd-validate certify``: judge a device capture against the reference.

    refsd-validate certify BUNDLE --model DIR [--mode free|teacher|both] --out DIR [--cache DIR] [--k K]

The path of a certificate (docs/architecture.md):

1. ``plan.prepare``: read the bundle strictly (``reader.py``); its model
   sha256 must be the folder's. The reference is **the model as deployed**
   (``certify_rerun.Deployment``: weights as stored, rewrites, int8 kernels);
   the calibration runs follow the bundle's declaration of where and in what
   precision each stage ran (``tolerance.calibration_variants``), half of a
   factorial design where it factors (``tolerance.half_fraction``).
2. :func:`certify_plans` (this module, the one driver: ``certify`` runs the
   reruns here in order, ``certify-fleet`` as Dask tasks): the reference
   first (``judge.check_reference``: a bad request fails before any
   calibration run), then the calibration runs free-running and
   teacher-forced, the device-fed run and the original model's run.
3. ``judge.judge_certificate``: every tensor against k times its noise
   floor, the first failure (teacher-forced first), the exact checks, the
   deployment's cost, and the explanation (``explain.py``).
4. Where a half design rejects and the rest could change the rejection
   (:func:`needs_full_design`), the rest runs and the bundle is judged on the
   full design.
5. ``outputs.write_outputs``: certificate.json, report.html, Model Explorer
   node data.

Exit 0 certified, 1 not certified, 2 bad input, 3 certified but the deployment
costs more than ``--max-deployment-cost`` allows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from refsd_validate.certificate import Certificate
from refsd_validate.certify_rerun import CACHE_BUDGET_BYTES, CacheStats
from refsd_validate.judge import check_reference, judge_certificate
from refsd_validate.plan import CostGate, Plan, prepare
from refsd_validate.tolerance import FULL_DESIGN_WIDENING, K

from refsd import console

Traces = dict[tuple[str, int], dict]
# Runs every plan's reruns not yet in its traces (plan index -> plan, plan index -> traces so far, the check to
# make on each reference trace as soon as it exists) and adds them to those traces.
Executor = Callable[[dict[int, Plan], dict[int, Traces], Callable[[Plan, dict], None]], None]


def certify_plans(plans: list[Plan], execute: Executor, stats: CacheStats | None = None,
                  on_round: Callable[[int], None] | None = None) -> tuple[list[Plan], list[Certificate]]:
    """The one certification driver: run each plan's reruns with ``execute``
    (the reference checked first), judge each plan, and where a half design's
    rejection could change on the full design (:func:`needs_full_design`)
    complete that plan and run only its new reruns. ``on_round(n)`` is told
    the number of plans of each round after the first. Returns the plans as
    judged (completed where they were) and their certificates."""
    plans = list(plans)
    traces: dict[int, Traces] = {p: {} for p in range(len(plans))}
    certs: dict[int, Certificate] = {}
    todo = dict(enumerate(plans))
    while todo:
        execute(todo, traces, check_reference)
        for p, plan in todo.items():
            plans[p] = plan
            certs[p] = judge_certificate(plan, traces[p], stats)
        todo = {p: plan.completed(because) for p, plan in todo.items()
                if (because := needs_full_design(plan, certs[p]))}
        if todo and on_round is not None:
            on_round(len(todo))
    return plans, [certs[p] for p in range(len(plans))]


def certify(bundle_path: str | Path, model_dir: str | Path, *, mode: str = "both",
            cache_dir: str | Path | None = None, k: float = K, cache_budget: int = CACHE_BUDGET_BYTES,
            tflite_dir: str | Path | None = None, strict: bool = False,
            max_deployment_cost: CostGate | None = None, progress: bool = False) -> Certificate:
    """Judge a bundle (see the module docstring). Raises ``BundleError`` for bad input."""
    plan = prepare(bundle_path, model_dir, mode=mode, cache_dir=cache_dir, k=k, cache_budget=cache_budget,
                   tflite_dir=tflite_dir, strict=strict, max_deployment_cost=max_deployment_cost)
    stats = CacheStats()
    with console.progress(total=0, desc="certify: reference reruns", unit="run", enabled=progress) as bar:
        def execute(todo: dict[int, Plan], traces: dict[int, Traces], check) -> None:
            for p, plan in todo.items():
                mine = traces[p]
                jobs = [j for j in plan.jobs() if (j.role, j.index) not in mine]
                bar.total += len(jobs)
                for job in jobs:
                    mine[job.role, job.index] = job.run(mine.get(("reference", 0)), cache_dir=plan.cache,
                                                        cache_budget=plan.cache_budget, stats=stats)
                    bar.update()
                    if job.role == "reference":  # before the calibration runs: a bad request fails fast
                        check(plan, mine[job.role, job.index])

        def next_round(_: int) -> None:
            bar.set_description("certify: rejected by the half design, running the rest")

        _, (cert,) = certify_plans([plan], execute, stats, next_round)
    return cert


def needs_full_design(plan: Plan, cert: Certificate) -> str | None:
    """Why the rest of a half-fraction design (``tolerance.half_fraction``)
    could change this rejection's verdict, first failure or its explanation, so
    that the bundle must be judged again on the full design (None: it could
    not). The reasons:

    * the rest holds an f16 run with plain kernels and the half none (f16 with
      FTZ declared): there the kernels and the f16 mode interact where fp16
      overflows (a plain f16 GroupNorm's sum of squares; Google's kernels and
      f32_f16 do not), and the certificate names such an overflow;
    * the first failure could pass on the full design: every calibration run
      of the half is non-finite there (no floor; a run of the rest may give
      one), or it needs k <= k * FULL_DESIGN_WIDENING (the rest may widen its
      floor that far);
    * the device went non-finite, or the half's runs did, and no calibration
      run of the half overflowed at or before the first failure: the rest may
      hold the run that explains it. When the half already names that
      overflow the rest would only name more runs, and a non-finite device
      tensor fails on any floors. (An f16 device on SD 2.1 that overflows as
      the emulation does, FTZ unknown, ran 18 reruns instead of 10 before this
      exception: bench/README.)

    Otherwise the first failing tensor fails on the full design too (floors
    only widen): the same verdict and first failure; later tensors are judged
    on the half's floors. Never when an exact check (token ids, timesteps)
    fails: no floor changes that."""
    first = cert.first_failure
    if not plan.complement or first is None or not all(c["passed"] for c in cert.exact_checks):
        return None
    if _plain_f16(plan.complement) and not _plain_f16(plan.variants):
        return "f16 declared with FTZ: the half holds no f16 run with plain kernels"
    if "calibration_overflow" in first.verdict.failed:
        return f"no run of the half gives {first.name} a floor"
    if first.verdict.k_needed <= plan.k * FULL_DESIGN_WIDENING:
        return (f"{first.name} needs k {first.verdict.k_needed:.3g}, within the {FULL_DESIGN_WIDENING:g}x the rest "
                "may widen a floor")
    if cert.overflow_before_failure is None and any(
            {"nonfinite", "calibration_overflow"} & set(r.verdict.failed) for r in cert.results):
        return "non-finite tensors, and no run of the half overflows at or before the first failure"
    return None


def _plain_f16(variants) -> bool:
    return any(sv.precision == "f16" and sv.kernels == "none" for v in variants for sv in v.stages)
