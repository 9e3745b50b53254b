"""The console commands (``unet-infer``, ``unet-evaluate``, ...) from ``[project.scripts]``.

Each must be the same program as ``python -m jobs.<name>``: same help, exit code 2 and one line on
stderr for bad use. The commands are installed by ``pip install -e .``; after editing
``[project.scripts]`` run ``pip install --no-deps -e .`` again.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
BIN = Path(sys.executable).parent  # the environment running the tests, where pip puts the commands


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "100"}  # argparse wraps help to the terminal width
    env.pop("UNET_DEBUG", None)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def _command(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{path} missing: run `pip install --no-deps -e .` after editing [project.scripts]"
    return str(path)


def test_every_job_has_a_command_named_after_it():
    jobs = {p.stem for p in (REPO / "jobs").glob("*.py") if p.stem != "__init__"}
    assert {f"jobs.{job}:cli" for job in jobs} <= set(SCRIPTS.values())
    for name, target in SCRIPTS.items():
        assert target == f"jobs.{name.removeprefix('unet-')}:cli", (name, target)


def test_installed_commands_match_pyproject():
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")
                 if ep.dist is not None and ep.dist.name == "unet-ray"}
    assert installed == SCRIPTS, "stale install: run `pip install --no-deps -e .`"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_command_runs_the_jobs_main_under_run_main(name, monkeypatch):
    """The entry is an importable callable taking no arguments that hands the job's ``main`` to
    ``run_main`` (which turns bad use into one line and exit code 2)."""
    module_name, _, attr = SCRIPTS[name].partition(":")
    module = importlib.import_module(module_name)
    entry = getattr(module, attr)
    assert callable(entry)
    inspect.signature(entry).bind()  # console-script wrappers call it with no arguments
    calls = []
    monkeypatch.setattr(module, "run_main", lambda main, *args, **kwargs: calls.append((main, args, kwargs)) or 7)
    assert entry() == 7
    assert calls == [(module.main, (), {})]


@pytest.mark.parametrize("job", ["infer", "evaluate"])
def test_command_help_is_the_modules_help(job, tmp_path):
    script = _run([_command(f"unet-{job}"), "--help"], cwd=tmp_path)  # not the repo: the installed command
    module = _run([sys.executable, "-m", f"jobs.{job}", "--help"], cwd=REPO)
    assert script.returncode == module.returncode == 0, script.stderr
    assert script.stdout == module.stdout
    assert script.stdout.startswith(f"usage: python -m jobs.{job} ")


def test_bad_flag_exits_2_with_usage(tmp_path):
    argv = ["--model", "m", "--input", "i", "--output", "o", "--no-such-flag"]  # required ones first
    script = _run([_command("unet-infer"), *argv], cwd=tmp_path)
    module = _run([sys.executable, "-m", "jobs.infer", *argv], cwd=REPO)
    assert script.returncode == module.returncode == 2
    assert script.stderr == module.stderr
    assert "unrecognized arguments: --no-such-flag" in script.stderr and "Traceback" not in script.stderr


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    """Errors after argument parsing go through run_main too: no traceback, named after the command."""
    proc = _run([_command("unet-evaluate"), "--model", "no-such-model", "--data", str(tmp_path),
                 "--out", str(tmp_path / "o")], cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("unet-evaluate: error: "), proc.stderr
    assert "'no-such-model'" in lines[0]
