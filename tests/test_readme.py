"""The README is true: its set-up commands are the ones CI runs, its Python
examples run, its command lines parse, its Public API table imports."""

import argparse
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_two_commands():
    assert len(_readme_commands()) == 2


def test_ci_runs_the_readme_test_command():
    test_cmd = _readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, f".ci/run does not run the README's test command: {test_cmd}"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_examples_run(index):
    """Every Python block runs as written; a block defining test_* functions has them called."""
    namespace = {"__name__": f"readme_block_{index}"}
    exec(compile(_blocks("python")[index], f"README.md python block {index}", "exec"), namespace)  # noqa: S102
    for name, value in namespace.items():
        if name.startswith("test_") and callable(value):
            value()


def _commands() -> list[str]:
    """The refsd / refsd-validate command lines of the README's shell blocks, continuation lines joined."""
    out = []
    for block in _blocks("sh")[1:]:  # the first block is the set-up (test_readme_opens_with_two_commands)
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split("  #", 1)[0].strip()
            if cmd.startswith(("refsd ", "refsd-validate ")):
                out.append(cmd)
    return out


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_readme_commands_parse():
    """Each command's subcommand exists, its --help renders, and every option it spells is the subcommand's."""
    from refsd import cli as refsd_cli
    from refsd_validate import cli as validate_cli

    commands = _commands()
    assert len(commands) >= 13
    for cmd in commands:
        prog, sub, *rest = cmd.split()
        parser = (refsd_cli if prog == "refsd" else validate_cli).build_parser()
        subparser = _subparser(parser, sub)
        assert subparser.format_help()
        known = {o for a in subparser._actions for o in a.option_strings}
        spelled = {t.split("=")[0].strip("[]|") for t in rest if t.lstrip("[").startswith("--")}
        assert spelled <= known, (cmd, spelled - known)


def _api_rows() -> list[tuple[list[str], str]]:
    text = (ROOT / "README.md").read_text().split("## Public API", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if len(cells) >= 2:
            modules, last = [], ""
            for m in re.findall(r"`([\w.]+)`", cells[0]):
                last = last.rsplit(".", 1)[0] + m if m.startswith(".") else m
                modules.append(last)
            rows.append((modules, "|".join(cells[1:])))
    return rows


def test_readme_public_api_imports():
    """Every name the Public API table lists imports from its row's module(s), with the keywords it shows."""
    rows = _api_rows()
    assert len(rows) >= 15
    for modules, what in rows:
        mods = [importlib.import_module(m) for m in modules]
        for ref in re.findall(r"`([^`]+)`", what):
            m = re.match(r"([A-Za-z_][\w.]*)(\((.*)\))?$", ref)
            if m is None or not m.group(1)[0].isalpha():
                continue
            if m.group(1).split(".")[0] in ("refsd", "refsd_validate"):  # a module named in passing
                importlib.import_module(m.group(1))
                continue
            path = m.group(1).split(".")
            found = None
            for mod in mods:
                obj = mod
                for part in path:
                    if not hasattr(obj, part) and inspect.ismodule(obj):
                        try:
                            importlib.import_module(f"{obj.__name__}.{part}")
                        except ImportError:
                            pass
                    obj = getattr(obj, part, None)
                if obj is not None:
                    found = obj
                    break
            assert found is not None, f"{ref} is not in {', '.join(modules)}"
            keywords = re.findall(r"(\w+)=", m.group(3) or "")
            if keywords:
                params = inspect.signature(found).parameters
                assert set(keywords) <= set(params), (ref, set(keywords) - set(params))
