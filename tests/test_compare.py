"""refsd_validate.compare: Polygraphy semantics, metrics, and the
`refsd-validate compare` command line."""

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refsd_validate import CHECK_MODES, compare, cosine_similarity, psnr, ulp_distance_f16
from refsd.safe_io import load_npy
from refsd_validate.cli import main

ROOT = Path(__file__).resolve().parent.parent


def f64(*v):
    return np.array(v, np.float64)


# ------------------------------------------------------------------ the rule


def test_element_fails_only_past_both_tolerances():
    ref = f64(1.0, 100.0, 1e-3, 100.0)
    test = f64(1.0, 100.05, 1.05e-3, 101.0)
    # 100.05: abs 0.05 > atol but rel 5e-4 <= rtol -> passes
    # 1.05e-3: rel 0.05 > rtol but abs 5e-5 <= atol -> passes
    # 101: abs 1 > atol and rel 0.01 > rtol -> fails
    r = compare(ref, test, atol=1e-3, rtol=1e-3)
    assert not r.passed and r.mismatches == 1 and r.first_mismatch == (3,)
    assert compare(ref[:3], test[:3], atol=1e-3, rtol=1e-3).passed
    assert compare(ref, test, atol=1.0, rtol=0).passed  # atol alone covers it
    assert compare(ref, test, atol=0, rtol=0.05).passed  # rtol alone covers it


def test_relative_error_is_against_the_reference_with_polygraphy_epsilon():
    r = compare(f64(0.0, 2.0), f64(1e-6, 3.0), atol=0, rtol=0)
    assert r.reldiff.max == pytest.approx(1e-6 / 2.220446049250313e-16)
    r = compare(f64(2.0), f64(3.0), atol=0, rtol=0.5)  # rel = 1/2 against ref (1/3 against test)
    assert r.passed and r.reldiff.max == 0.5


@pytest.mark.parametrize("mode", CHECK_MODES)
def test_nan_always_fails(mode):
    ref, test = f64(1.0, 2.0, 3.0), f64(1.0, np.nan, 3.0)
    r = compare(ref, test, atol=1e30, rtol=1e30, check_mode=mode)
    assert not r.passed and r.nonfinite_mismatches == 1 and r.mismatches == 1
    assert r.required_atol == math.inf and r.required_rtol == math.inf
    assert not compare(test, test, atol=1e30, rtol=1e30, check_mode=mode).passed  # NaN vs NaN too
    # Statistics are over the comparable elements.
    assert r.absdiff.max == 0.0


@pytest.mark.parametrize("mode", CHECK_MODES)
def test_inf_mismatches_always_fail(mode):
    assert not compare(f64(1.0), f64(np.inf), atol=np.inf, rtol=np.inf, check_mode=mode).passed
    assert not compare(f64(np.inf), f64(-np.inf), atol=1e30, rtol=1e30, check_mode=mode).passed
    # Matching infs: Polygraphy's default (they fail), unless infinities_compare_equal.
    assert not compare(f64(np.inf, 1.0), f64(np.inf, 1.0), check_mode=mode).passed
    r = compare(f64(np.inf, 1.0), f64(np.inf, 1.0), check_mode=mode, infinities_compare_equal=True)
    assert r.passed and r.nonfinite_mismatches == 0


def test_statistic_modes():
    ref = np.ones(100)
    test = ref.copy()
    test[0] = 2.0  # one outlier: abs (and rel) error 1, mean 0.01, median 0
    kw = dict(atol=0.05, rtol=0.05)
    assert not compare(ref, test, check_mode="elemwise", **kw).passed
    assert not compare(ref, test, check_mode="max", **kw).passed
    assert compare(ref, test, check_mode="mean", **kw).passed
    assert compare(ref, test, check_mode="median", **kw).passed
    assert compare(ref, test, check_mode="quantile", quantile=0.98, **kw).passed
    assert not compare(ref, test, check_mode="quantile", quantile=1.0, **kw).passed
    r = compare(ref, test, check_mode="mean", **kw)
    assert r.absdiff.mean == pytest.approx(0.01) and r.absdiff.median == 0.0 and r.absdiff.max == 1.0
    assert r.mismatches == 1  # the elementwise count is reported in every mode


def test_stat_mode_needs_both_stats_past_tolerance():
    # mean abs 0.5 > atol, mean rel 0.005 <= rtol: passes (Polygraphy: failed = abs_failed and rel_failed)
    r = compare(np.full(4, 100.0), np.full(4, 100.5), atol=0.1, rtol=0.01, check_mode="mean")
    assert r.passed


def _random_pair(seed):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(500) * 10.0 ** rng.uniform(-3, 3, 500)
    ref[:5] = 0.0
    test = ref + rng.standard_normal(500) * 10.0 ** rng.uniform(-6, 0, 500)
    return ref, test


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", CHECK_MODES)
def test_reported_tolerances_are_the_smallest_that_pass(seed, mode):
    ref, test = _random_pair(seed)
    atol, rtol = 1e-5, 1e-5
    r = compare(ref, test, atol=atol, rtol=rtol, check_mode=mode, quantile=0.9)
    assert not r.passed

    def passes(a, t):
        return compare(ref, test, atol=a, rtol=t, check_mode=mode, quantile=0.9).passed

    def smaller(v):
        return np.nextafter(v, 0.0)

    for a, t, which in ((r.required_atol, rtol, 0), (atol, r.required_rtol, 1),
                        (r.atol_alone, 0.0, 0), (0.0, r.rtol_alone, 1)):
        assert passes(a, t)
        tight = (smaller(a), t) if which == 0 else (a, smaller(t))
        assert not passes(*tight)
    # With both tolerances, the requirement on one can only be lower than alone (Polygraphy's note).
    assert r.required_atol <= r.atol_alone and r.required_rtol <= r.rtol_alone


def test_passing_result_reports_zero_extra_tolerance_when_rtol_covers_everything():
    r = compare(f64(100.0), f64(100.5), atol=0.0, rtol=0.01)
    assert r.passed and r.required_atol == 0.0 and r.required_rtol == pytest.approx(0.005)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape mismatch"):
        compare(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="floating"):
        compare(np.zeros(3, np.int32), np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="check mode"):
        compare(np.zeros(3), np.zeros(3), check_mode="p99")
    with pytest.raises(ValueError, match="quantile"):
        compare(np.zeros(3), np.zeros(3), quantile=1.5)
    with pytest.raises(ValueError, match="atol"):
        compare(np.zeros(3), np.zeros(3), atol=-1.0)
    with pytest.raises(ValueError, match="rtol"):
        compare(np.zeros(3), np.zeros(3), rtol=float("nan"))


def test_mixed_dtypes_and_empty():
    ref = np.linspace(-2, 2, 11).astype(np.float32)
    r = compare(ref, ref.astype(np.float16), atol=1e-3, rtol=1e-3)
    assert r.passed and r.ref_dtype == "float32" and r.test_dtype == "float16"
    e = compare(np.zeros((0, 3)), np.zeros((0, 3)))
    assert e.passed and e.size == 0
    s = compare(np.float32(1.0), np.float32(2.0))  # 0-d
    assert not s.passed and s.first_mismatch == () and s.max_ulp_f16 == 1024


# ------------------------------------------------------------------ metrics


def test_ulp_distance_f16():
    one_up = np.float16(1.0) + np.finfo(np.float16).eps
    a = np.array([1.0, 1.0, 0.0, 65504.0, 2**-24, 1.0, 1.0], np.float32)
    b = np.array([float(one_up), 1.0, -0.0, np.inf, -(2**-24), 2.0, 1.0001], np.float32)
    d = ulp_distance_f16(a, b)
    # 1 -> next fp16: 1; equal: 0; +0/-0: 0; 65504 -> inf: 1; across zero: 2; 1 -> 2: 1024 (one binade);
    # 1.0001 rounds to 1.0 in fp16: 0
    np.testing.assert_array_equal(d, [1, 0, 0, 1, 2, 1024, 0])
    assert ulp_distance_f16(f64(np.nan), f64(1.0))[0] == math.inf
    r = compare(a, b, atol=1e9, rtol=1e9)
    assert r.max_ulp_f16 == 1024


def test_psnr():
    ref = np.zeros((2, 8, 8, 3))
    assert psnr(ref, ref + 0.1) == pytest.approx(20.0)
    assert psnr(ref, ref) == math.inf
    assert psnr(ref, ref + 25.5, data_range=255.0) == pytest.approx(20.0)
    assert math.isnan(psnr(ref, np.full_like(ref, np.nan)))
    with pytest.raises(ValueError):
        psnr(ref, ref, data_range=0)


def test_psnr_is_reported_for_images_in_unit_range_only():
    img = np.random.default_rng(0).random((1, 4, 4, 3))
    assert compare(img, img + 0.01, atol=1, rtol=1).psnr_db == pytest.approx(40.0)
    assert compare(img * 2 - 1, img * 2 - 1).psnr_db is None
    assert compare(img * 2 - 1, img * 2 - 1, data_range=2.0).psnr_db == math.inf


def test_cosine_similarity():
    x = np.array([1.0, 2.0, 3.0])
    assert cosine_similarity(x, 2 * x) == pytest.approx(1.0)
    assert cosine_similarity(x, -x) == pytest.approx(-1.0)
    assert cosine_similarity(f64(1, 0), f64(0, 1)) == 0.0
    assert cosine_similarity(np.zeros(3), np.zeros(3)) == 1.0
    assert cosine_similarity(np.zeros(3), x) == 0.0
    assert math.isnan(cosine_similarity(x, f64(1, np.nan, 3)))
    big = np.full(10, 60000.0, np.float16)  # squares overflow fp16 and float32 sums lose nothing here
    assert cosine_similarity(big, big) == pytest.approx(1.0)


def test_result_serializes_to_strict_json():
    r = compare(f64(1.0, np.nan), f64(1.0, 1.0))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["passed"] is False and d["required_atol"] == "inf" and d["max_ulp_f16"] == "inf"
    assert "FAILED" in r.summary() and "would pass with" in r.summary()


# ------------------------------------------------------------------ the CLI


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    paths = {}

    def save(name, arr, **kw):
        paths[name] = tmp_path / name
        np.save(paths[name], arr, **kw)

    save("ref.npy", ref)
    save("close.npy", ref.astype(np.float16))
    far = ref.copy()
    far[0, 0, 0, 0] += 1.0
    save("far.npy", far)
    save("shape.npy", ref[:1])
    save("int.npy", np.zeros(ref.shape, np.int32))
    save("obj.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    paths["raw.pkl"] = tmp_path / "raw.pkl"
    paths["raw.pkl"].write_bytes(pickle.dumps(ref))
    paths["text.npy"] = tmp_path / "text.npy"
    paths["text.npy"].write_text("not numpy")
    paths["arch.npz"] = tmp_path / "arch.npz"
    np.savez(paths["arch.npz"], a=ref)
    paths["missing.npy"] = tmp_path / "missing.npy"
    return {k: str(v) for k, v in paths.items()}


def test_cli_pass_and_fail(files, capsys):
    assert main(["compare", files["ref.npy"], files["close.npy"], "--atol", "1e-3", "--rtol", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "cosine similarity" in out and "fp16 ULP distance" in out
    assert main(["compare", files["ref.npy"], files["far.npy"], "--atol", "1e-3", "--rtol", "1e-3"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "first at [0, 0, 0, 0]" in out and "would pass with: atol >= 1" in out


def test_cli_check_mode_and_json(files, capsys):
    args = ["compare", files["ref.npy"], files["far.npy"], "--atol", "1e-3", "--rtol", "1e-3"]
    assert main(args + ["--check-mode", "median", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["passed"] is True and d["check_mode"] == "median" and d["mismatches"] == 1
    assert d["ref"] == files["ref.npy"]
    assert main(args + ["--check-mode", "quantile", "--quantile", "1.0", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["quantile"] == 1.0


@pytest.mark.parametrize(
    "test_file, needle",
    [
        ("missing.npy", "no such file"),
        ("text.npy", "not an .npy file"),
        ("arch.npz", "zip archive"),
        ("obj.npy", "pickled object array; refused"),
        ("raw.pkl", "Python pickle; refused"),
        ("shape.npy", "shape mismatch"),
        ("int.npy", "expected a floating dtype"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(files, capsys, test_file, needle):
    assert main(["compare", files["ref.npy"], files[test_file]]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("refsd-validate: error: ") and captured.err.count("\n") == 1
    assert needle in captured.err


def test_load_npy_never_unpickles(files, monkeypatch):
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    for name in ("obj.npy", "raw.pkl"):
        with pytest.raises(ValueError, match="refused"):
            load_npy(files[name])


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--atol", "abc"], "invalid float value"),
        (["--check-mode", "p99"], "invalid choice"),
        (["--atol", "-1"], "--atol must be a finite number >= 0"),
        (["--rtol", "inf"], "--rtol must be a finite number >= 0"),
        (["--quantile", "2"], "quantile must be in [0, 1]"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_cli_bad_options_exit_2(files, capsys, extra, needle):
    assert main(["compare", files["ref.npy"], files["ref.npy"], *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refsd-validate: error: ") and err.count("\n") == 1 and needle in err


def test_cli_subprocess_no_traceback(files):
    run = [sys.executable, "-m", "refsd_validate"]
    ok = subprocess.run(run + ["compare", files["ref.npy"], files["ref.npy"]], capture_output=True, text=True,
                        cwd=ROOT, timeout=60)
    assert ok.returncode == 0 and "PASSED" in ok.stdout
    for args in (["compare", files["ref.npy"], files["obj.npy"]], ["capture"], []):
        proc = subprocess.run(run + args, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
