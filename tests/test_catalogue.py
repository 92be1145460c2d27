"""The float16 exception catalogue: every broken case is flagged at the right
op path and event, every fix is clean, and `refsd catalogue` says so."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refsd import ops
from refsd.catalogue import CASES, run_case, run_catalogue
from refsd.cli import main
from refsd.context import scope
from refsd.monitor import monitoring
from refsd.numerics import precision

ROOT = Path(__file__).resolve().parent.parent

EXPECTED = {  # case -> (kind, path, op, primitive) of the first offending event
    "gelu_tanh": ("overflow", "catalogue.gelu_tanh.ff", "gelu", "pow3"),
    "group_norm_sum_squares": ("overflow", "catalogue.group_norm_sum_squares.norm1", "group_norm", "sum.accumulate"),
    "eps_ftz": ("constant", "catalogue.eps_ftz.norm", "group_norm", "eps"),
    "mask_neg_1e9": ("constant", "catalogue.mask_neg_1e9.attn2", "attention", "mask"),
    "scores_overflow": ("overflow", "catalogue.scores_overflow.attn1", "attention", "scores"),
}


@pytest.fixture(scope="module")
def results():
    return run_catalogue()


def test_catalogue_has_the_specified_cases():
    assert [c.name for c in CASES] == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_broken_variant_is_detected_at_the_expected_op(results, name):
    r = results[name]
    kind, path, op, primitive = EXPECTED[name]
    e = r.first
    assert e is not None and e.severe
    assert (e.kind, e.path, e.op, e.primitive) == (kind, path, op, primitive)
    assert r.detected
    assert not r.broken_report.clean


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fixed_variant_is_not_flagged(results, name):
    r = results[name]
    assert r.fixed_report.clean, r.fixed_report.table()
    assert not any(e.severe for e in r.fixed_report.events)
    assert r.fixed_finite
    assert r.fixed_clean and r.ok


def test_eps_ftz_story(results):
    """eps flushes to zero, then rsqrt(0) = inf, then 0 * inf = NaN, in that order."""
    events = [(e.kind, e.primitive) for e in results["eps_ftz"].broken_report.events if e.severe]
    assert events == [("constant", "eps"), ("overflow", "rsqrt"), ("invalid", "normalize")]
    assert "flushes to zero" in results["eps_ftz"].first.detail
    assert not results["eps_ftz"].broken_finite


def test_eps_ftz_without_ftz_is_only_a_warning():
    """The alternative fix (no FTZ): eps survives as a subnormal, a non-severe constant event."""
    case = next(c for c in CASES if c.name == "eps_ftz")
    with monitoring() as mon, precision("f16", ftz=False), scope(case.path):
        y = case.broken.fn()
    rep = mon.report()
    assert rep.clean and np.isfinite(y).all()
    const = [e for e in rep.events if e.kind == "constant"]
    assert len(const) == 1 and not const[0].severe and "subnormal" in const[0].detail


def test_mask_case_invalid_nan_and_uniform_fixed_row(results):
    r = results["mask_neg_1e9"]
    assert r.broken_report.has("invalid")
    assert "overflows fp16" in r.first.detail
    assert not r.broken_finite
    # The fixed run: the fully masked item (batch 1) attends uniformly, i.e. outputs mean(V).
    case = r.case
    with precision(case.fixed.precision):
        y = case.fixed.fn()
    from refsd.catalogue import _qkv_padded

    _, _, v, _ = _qkv_padded()
    expected = v[1].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(y[1], np.broadcast_to(expected, y[1].shape), atol=2e-3)


def test_mask_neg_65504_is_not_a_safe_fix():
    """Documented in the catalogue: -65504 plus a score <= -16 rounds to -inf."""
    q = np.full((1, 2, 4), 2.0, np.float32)
    k = np.full((1, 2, 4), -2.0, np.float32) * 2  # q.k / 2 = -16 for every pair
    v = np.ones((1, 2, 4), np.float32)
    mask = np.full((1, 1, 2, 2), -65504.0, np.float32)
    with monitoring() as mon, precision("f32_f16"):
        ops.attention(q, k, v, mask=mask)
    assert not mon.report().clean
    with monitoring() as mon, precision("f32_f16"):
        ops.attention(q, k, v, mask=mask * np.float32(1e4 / 65504))
    assert mon.report().clean


def test_group_norm_overflow_silently_zeroes_output(results):
    """The documented consequence: var = inf, rsqrt = 0, the output collapses (no NaN)."""
    r = results["group_norm_sum_squares"]
    assert r.broken_finite  # no NaN: the failure is silent without the monitor
    case = r.case
    with precision(case.broken.precision):
        y = case.broken.fn()
    assert np.count_nonzero(y) == 0


def test_scores_overflow_needs_fp16_storage():
    """In f32 the same attention is fine: the overflow is an fp16 storage effect."""
    case = next(c for c in CASES if c.name == "scores_overflow")
    with monitoring() as mon, precision("f32"):
        y = case.broken.fn()
    assert mon.report().clean and np.isfinite(y).all()


def test_run_case_is_deterministic():
    case = CASES[0]
    a, b = run_case(case), run_case(case)
    assert a.broken_report.to_dict() == b.broken_report.to_dict()


def test_table_and_json(results):
    text = results.table()
    for name, (kind, path, op, primitive) in EXPECTED.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(name))
        assert path in line and f"{kind} {op}/{primitive}" in line
    assert "5/5 broken cases detected" in text and text.rstrip().endswith("OK")
    d = json.loads(results.to_json())
    assert d["ok"] is True and d["detected"] == 5 and d["fixed_clean"] == 5
    by_name = {c["case"]: c for c in d["cases"]}
    for name, (kind, path, op, primitive) in EXPECTED.items():
        first = by_name[name]["broken"]["first_offending"]
        assert (first["kind"], first["path"], first["op"], first["primitive"]) == (kind, path, op, primitive)
        assert by_name[name]["broken"]["detected"] and by_name[name]["fixed"]["clean"]
        assert by_name[name]["broken"]["report"]["first_offending"]["path"] == path


def test_only_selects_cases_and_rejects_unknown():
    assert [r.name for r in run_catalogue(only=["eps_ftz"])] == ["eps_ftz"]
    with pytest.raises(ValueError, match="unknown catalogue case"):
        run_catalogue(only=["nope"])


def test_cli_catalogue_exit_code_and_json(tmp_path, capsys):
    out = tmp_path / "cat.json"
    assert main(["catalogue", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gelu_tanh" in printed and "OK" in printed
    assert json.loads(out.read_text())["ok"] is True


def test_cli_catalogue_exits_1_when_a_case_is_missed(monkeypatch, capsys):
    import refsd.catalogue as cat

    broken = cat.CASES[0]
    wrong = cat.Case(broken.name, broken.title, broken.module, "invalid", broken.expected_op,
                     broken.expected_primitive, broken.broken, broken.fixed)
    monkeypatch.setattr(cat, "CASES", (wrong,) + cat.CASES[1:])
    assert main(["catalogue"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_python_m_refsd_catalogue():
    proc = subprocess.run([sys.executable, "-m", "refsd", "catalogue"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "5/5 broken cases detected" in proc.stdout
