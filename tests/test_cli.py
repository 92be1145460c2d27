"""The `refsd` command line: usage errors are one line and exit 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from refsd.cli import main

ROOT = Path(__file__).resolve().parent.parent


def refsd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refsd", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["--bogus"], "error:"),
        (["catalogue", "--bogus"], "unrecognized arguments: --bogus"),
        (["catalogue", "--json"], "expected one argument"),
        ([], "required"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, needle):
    proc = refsd(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("refsd: error: ") and needle in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize(
    "args, needle",
    [
        (["catalogue", "--case", "no_such_case"], "unknown catalogue case(s) no_such_case"),
        (["catalogue", "--json", "/nonexistent-dir/x.json"], "No such file or directory"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle):
    proc = refsd(*args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("refsd: error: ")
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_help_and_version_exit_0():
    proc = refsd("--help")
    assert proc.returncode == 0 and "catalogue" in proc.stdout
    proc = refsd("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("refsd ")


def test_main_returns_exit_codes_in_process(capsys):
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refsd: error: ") and err.count("\n") == 1
    assert main(["catalogue", "--case", "eps_ftz"]) == 0
    assert main(["--help"]) == 0


def test_expected_errors_from_a_subcommand_become_one_line(monkeypatch, capsys):
    import refsd.catalogue as cat

    def boom(*a, **k):
        raise ValueError("bad weights\nsecond line")

    monkeypatch.setattr(cat, "run_catalogue", boom)
    assert main(["catalogue"]) == 2
    assert capsys.readouterr().err == "refsd: error: bad weights second line\n"
