"""``refsd-validate certify-fleet`` on a 2-worker Dask ``LocalCluster``.

Three devices of one request on the tiny SD 2.1 model (the good emulated
device, one with a +1 % UNet bias from step 1, one with a NaN at step 2): the
fleet gives each bundle the verdict and localization that certifying it alone
gives, runs the shared calibration once (one set of calibration runs plus one
teacher-forced run per bundle), and writes fleet.json and an offline fleet.html.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import types

import numpy as np
import pytest
from refsd_validate.certify import certify
from refsd_validate.plan import prepare
from refsd_validate import fleet
from refsd_validate.cli import main
from bundle_helpers import rewrite_bundle


@pytest.fixture(scope="module")
def fleet_bundles(emulated_bundle, fault_bundle):
    return [emulated_bundle, fault_bundle("bias_1pct_from_step_1"), fault_bundle("nan_at_step_2")]


@pytest.fixture(scope="module")
def fleet_run(fleet_bundles, tiny_sd21, tmp_path_factory):
    out = tmp_path_factory.mktemp("fleet") / "out"
    cache = tmp_path_factory.mktemp("fleet-cache")
    environ = dict(os.environ)
    rc = main(["certify-fleet", *map(str, fleet_bundles), "--model", str(tiny_sd21), "--out", str(out),
               "--cache", str(cache), "--workers", "2"])
    return rc, out, json.loads((out / "fleet.json").read_text()), (environ, dict(os.environ))


def test_fleet_leaves_the_environment_as_it_found_it(fleet_run):
    """Dask's nanny sets OMP/MKL/OPENBLAS_NUM_THREADS=1 in its parent's environment; processes started after
    a fleet must not inherit that (a diffusers device run in a subprocess computed other bits)."""
    before, after = fleet_run[3]
    assert after == before


def test_fleet_gives_the_verdicts_of_one_by_one(fleet_run, fleet_bundles, tiny_sd21, certify_cache):
    rc, out, doc, _ = fleet_run
    assert rc == 1  # one bundle (at least) is not certified
    assert [b["verdict"] for b in doc["bundles"]] == ["certified", "not certified", "not certified"]
    for entry, bundle in zip(doc["bundles"], fleet_bundles):
        alone = certify(bundle, tiny_sd21, cache_dir=certify_cache)
        first = alone.first_failure
        assert entry["verdict"] == ("certified" if alone.certified else "not certified")
        assert entry["first_failure"] == (None if first is None else f"{first.name} ({first.mode})")
        fleet_first = json.loads((out / entry["certificate"]).read_text())["first_failure"]
        alone_first = alone.to_dict()["first_failure"]
        # k_needed may differ in its last digits: each worker's BLAS runs cores / workers threads (refsd.blas)
        drop_k = {"k_needed"}
        assert (fleet_first and {a: b for a, b in fleet_first.items() if a not in drop_k}) == \
            (alone_first and {a: b for a, b in alone_first.items() if a not in drop_k})
    assert doc["bundles"][1]["first_failure"] == "unet/step_1/noise_pred (teacher)"
    assert doc["bundles"][2]["first_failure"] == "unet/step_2/noise_pred (teacher)"


def test_fleet_runs_shared_calibration_once(fleet_run, fleet_bundles, tiny_sd21):
    _, _, doc, _ = fleet_run
    plans = [prepare(b, tiny_sd21) for b in fleet_bundles]
    v, c = len(plans[0].variants), len(plans[0].complement)
    per_bundle = len(plans[0].jobs())
    assert per_bundle == 2 * v + 3  # reference, V free, V teacher-forced, the device's teacher-forced, original
    assert c == 0  # FTZ declared: nothing halved (test_fleet_completes_a_half_design_it_rejects has the other case)
    assert doc["counts"] == {"bundles": 3, "reruns_needed": 3 * per_bundle,
                             # one reference, its calibration and the original model's run shared; one per device
                             "reruns_run": 2 * v + 2 + 3, "local_workers": 2}


def test_fleet_completes_a_half_design_it_rejects(fleet_bundles, tiny_sd21, certify_cache, tmp_path, capsys):
    """The device with a NaN at step 2, FTZ undeclared: its half-fraction calibration rejects it with a
    non-finite tensor (which a run of the other half might share), so the fleet runs the rest of the design, as
    certify does, and gives the verdict, first failure and design of certifying it alone."""
    def unknown_ftz(doc):
        for s in ("text_encoder", "unet", "vae"):
            doc["stages"][s]["ftz"] = None

    bundle = rewrite_bundle(fleet_bundles[2], tmp_path / "nan", doc=unknown_ftz)
    plan = prepare(bundle, tiny_sd21)
    assert plan.complement
    out = tmp_path / "fleet"
    rc = main(["certify-fleet", str(bundle), "--model", str(tiny_sd21), "--out", str(out), "--cache",
               str(certify_cache), "--workers", "1", "--mode", "teacher"])
    printed = capsys.readouterr().out
    doc = json.loads((out / "fleet.json").read_text())
    fleet_cert = json.loads((out / doc["bundles"][0]["certificate"]).read_text())
    alone = certify(bundle, tiny_sd21, mode="teacher", cache_dir=certify_cache)
    assert rc == 1 and not alone.certified
    assert fleet_cert["rule"]["calibration_design"] == alone.rule["calibration_design"]
    assert alone.rule["calibration_design"].startswith("full factorial design")
    assert fleet_cert["rule"]["calibration_variants"] == [v.label for v in plan.variants + plan.complement]
    assert fleet_cert["first_failure"]["tensor"] == alone.first_failure.name == "unet/step_2/noise_pred"
    # the bundle's line is its certificate's verdict as the explanation words it
    assert f"{bundle} [" in printed and alone.explanation.line("verdict").text in printed
    # reference, V + C teacher-forced calibration runs, the device's teacher-forced run, the original model
    assert doc["counts"]["reruns_run"] == len(plan.variants) + len(plan.complement) + 3


def test_fleet_html_is_a_devices_by_requests_table_offline(fleet_run):
    _, out, doc, _ = fleet_run
    page = (out / "fleet.html").read_text()
    assert "1 of 3 bundles certified" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # offline: nothing fetched
    for entry in doc["bundles"]:
        assert entry["device"] in page and entry["request"].replace("'", "&#x27;") in page
        assert (out / entry["certificate"]).is_file()
        # the judge's explanation, as certificate.json holds it: worded once
        cert = json.loads((out / entry["certificate"]).read_text())
        assert entry["explanation"] == cert["explanation"]
        verdict = entry["explanation"]["lines"][0]
        assert verdict["kind"] == "verdict" and (entry["verdict"] == "certified" or html.escape(verdict["text"]) in page)
    # rejections grouped by first failing module, and by what the bundles declare about the device
    assert [e["first_failing_module"] for e in doc["bundles"]] == [None, "unet", "unet"]
    assert "Rejections by first failing module" in page
    for key in fleet.DECLARED:
        assert f"by declared {key}" in page
    assert "<td>None</td><td><code>unet</code></td><td>2 of 3</td>" in page  # soc unknown on every device


def test_fleet_bad_bundle_is_one_line_exit_2(fleet_bundles, tiny_sd21, tmp_path, capsys):
    missing = tmp_path / "nope"
    rc = main(["certify-fleet", str(fleet_bundles[0]), str(missing), "--model", str(tiny_sd21),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and str(missing) in err and len(err.strip().splitlines()) == 1
    rc = main(["certify-fleet", str(fleet_bundles[0]), str(fleet_bundles[0]), "--model", str(tiny_sd21),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "twice" in err
    rc = main(["certify-fleet", str(fleet_bundles[0]), "--model", str(tiny_sd21), "--out", str(tmp_path / "o"),
               "--workers", "0"])
    assert rc == 2 and "--workers" in capsys.readouterr().err


def test_a_local_cluster_gets_the_workers_the_memory_holds(fleet_bundles, tiny_sd21, monkeypatch):
    """Two SD 2.1 calibration runs with Winograd do not fit in 24 GB: the kernel killed a worker. The local
    cluster is sized to the memory available, says so, and gives the spare cores to the workers' BLAS."""
    import psutil

    plans = [prepare(b, tiny_sd21) for b in fleet_bundles]
    need = fleet.largest_rerun(plans)

    def available(bytes_):
        monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=bytes_))

    available(int(1.5 * need / fleet.MEMORY_SHARE))
    workers, threads, notice = fleet.local_workers(plans, 2)
    assert (workers, threads) == (1, fleet.cores()) and notice.startswith("certify-fleet: 1 worker instead of 2")
    available(int(2.5 * need / fleet.MEMORY_SHARE))
    assert fleet.local_workers(plans, 2) == (2, max(1, fleet.cores() // 2), None)
    assert fleet.local_workers(plans, 4)[0] == 2
    available(0)
    assert fleet.local_workers(plans, 2)[0] == 1  # never none: one rerun at a time is what certify does


def test_the_memory_estimate_holds_the_winograd_transforms_a_run_caches(fleet_bundles, tiny_sd21, monkeypatch):
    """rerun_memory_bytes counts 8 bytes per 3x3 kernel value for the fp16 Winograd transforms a run keeps
    (refsd.ops.winograd); what a run with Winograd actually keeps is within that and not far below it."""
    from refsd.ops import winograd

    kept = []
    readonly = winograd._readonly
    monkeypatch.setattr(winograd, "_readonly", lambda a: kept.append(a.nbytes) or readonly(a))
    plan = prepare(fleet_bundles[0], tiny_sd21)  # deployed with Google's kernels, Winograd among them
    job = next(j for j in plan.jobs() if j.role == "free")
    plain = dataclasses.replace(job, deployment=dataclasses.replace(job.deployment, rewrites="none"),
                                variant=plan.variants[0])
    assert "winograd" not in plan.variants[0].label
    job.run()
    values, conv3, _ = fleet._model_sizes(str(tiny_sd21))
    assert fleet.rerun_memory_bytes(job) - fleet.rerun_memory_bytes(plain) == 8 * conv3
    # the VAE encoder's and the downsamplers' 3x3 kernels are counted but never transformed
    assert 0.5 * 8 * conv3 <= sum(kept) <= 8 * conv3


def test_workers_that_die_end_the_fleet_in_one_line(fleet_bundles, tiny_sd21, tmp_path, monkeypatch, capsys):
    """A worker the out-of-memory killer ends is restarted and its task retried; when the workers running a
    rerun keep dying, the fleet ends with one line naming it, exit 2, not Dask's KilledWorker traceback."""
    import dask

    def dying(plans, client, futures):
        per_plan = {}
        for p in plans:
            futures[f"dies-{p}"] = client.submit(os._exit, 1, key=f"dies-{p}", pure=False)
            per_plan[p] = {("reference", 0): futures[f"dies-{p}"]}
        return per_plan

    monkeypatch.setattr(fleet, "schedule", dying)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        rc = main(["certify-fleet", str(fleet_bundles[0]), "--model", str(tiny_sd21), "--out", str(tmp_path / "o"),
                   "--workers", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "dies-0" in err[0] and "died 1 time " in err[0] and "--workers" in err[0]


@pytest.fixture
def restored_environ():
    """A LocalCluster's nanny writes its workers' pre-spawn variables into this process's environment."""
    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)


def test_local_workers_run_without_dasks_malloc_trim_threshold(restored_environ):
    """Dask's nanny gives its workers MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's adaptive mmap
    threshold: every large temporary is fresh pages (an SD 2.1 f32_f16 UNet forward: 40x the page faults,
    1.3x the time). The fleet's own cluster leaves it unset and gives the workers their share of the cores."""
    from distributed import Client

    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # a caller's own setting would stand
        os.environ.pop(v, None)  # (as under the test suite's workers: tests/conftest.py); restored_environ restores
    with fleet.local_cluster(1, 2) as cluster, Client(cluster) as client:
        env = client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_"), client.run(os.getenv, "OPENBLAS_NUM_THREADS")
        assert fleet.cluster_warnings(client, 1 << 20) == []
    assert list(env[0].values()) == [None] and list(env[1].values()) == ["2"]


def test_a_running_clusters_workers_are_warned_about(restored_environ):
    """--dask: workers whose memory limit is below what a rerun needs, or that run with Dask's trim threshold,
    are named on stderr before any rerun."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None, memory_limit="300MB") as cluster, \
            Client(cluster) as client:
        lines = fleet.cluster_warnings(client, 1 << 30)
    assert len(lines) == 2
    assert "memory limit below the about 1.0 GiB" in lines[0] and "MALLOC_TRIM_THRESHOLD_" in lines[1]
