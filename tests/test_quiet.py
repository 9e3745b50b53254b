"""Quiet by default, everything on request: what the jobs print (unet.runtime.configure_output).

A job prints its own lines only — ``[job HH:MM:SS] message`` progress, one line per training
epoch, a summary — and Ray's console output stays in Ray's log files unless ``--verbose`` or
``UNET_VERBOSE=1``. The slow tests run the real commands in subprocesses and count their lines.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from unet import runtime
from unet.phantoms import generate

REPO = Path(__file__).resolve().parents[1]
JOBS = ("prepare", "train", "infer", "evaluate", "calibrate", "demo")
OUR_LINE = re.compile(r"^\[(prepare|train|infer|evaluate|calibrate|demo) \d\d:\d\d:\d\d\] ")
NOISE = ("ERROR", "WARNING", "Traceback")


def _env(**extra: str) -> dict[str, str]:
    """This environment without a Ray address (each command starts its own local Ray) or verbosity."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", runtime.VERBOSE_ENV)}
    return env | extra


def _run(*args: str, timeout: int = 600, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=_env(**env))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc, (proc.stdout + proc.stderr).splitlines()


@pytest.fixture
def output_state():
    """configure_output changes process-wide state: give it back after the test."""
    logger = logging.getLogger("unet")
    saved = (runtime._verbose, list(logger.handlers), logger.level)
    yield
    runtime._verbose = saved[0]
    logger.handlers[:] = saved[1]
    logger.setLevel(saved[2])


@pytest.mark.parametrize("job", JOBS)
def test_every_job_has_a_verbose_flag(job):
    module = importlib.import_module(f"jobs.{job}")
    assert "--verbose" in module.build_parser().format_help()


def test_our_lines_name_the_job_and_warnings_say_so(output_state, capsys, monkeypatch):
    monkeypatch.delenv(runtime.VERBOSE_ENV, raising=False)
    assert runtime.configure_output("infer") is False and runtime.is_quiet()
    logging.getLogger("unet.inference").info("planned %d inputs", 3)
    logging.getLogger("unet.inference").warning("odd")
    logging.getLogger("unet.inference").debug("hidden unless verbose")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(OUR_LINE.match(line) for line in lines), lines
    assert lines[0].endswith("] planned 3 inputs") and lines[1].endswith("] warning: odd")

    runtime.configure_output("evaluate")  # the demo reconfigures per job: one handler, the new name
    logging.getLogger("unet.x").info("again")
    assert capsys.readouterr().out.startswith("[evaluate ")


def test_unet_verbose_in_the_environment_turns_verbose_on(output_state, monkeypatch):
    monkeypatch.setenv(runtime.VERBOSE_ENV, "1")
    assert runtime.configure_output("train") is True and not runtime.is_quiet()
    assert logging.getLogger("unet.train").isEnabledFor(logging.DEBUG)
    monkeypatch.setenv(runtime.VERBOSE_ENV, "0")
    assert runtime.configure_output("train") is False


def test_progress_line_is_throttled_but_the_last_line_always_comes():
    lines: list[str] = []
    progress = runtime.ProgressLine(lines.append, every_s=3600)
    for i in range(1, 100):
        progress.update(f"{i}/100")
    progress.done("100/100")
    assert lines == ["100/100"]
    fast = runtime.ProgressLine(lines.append, every_s=0)
    fast.update("a")
    fast.done("a")  # not twice
    assert lines == ["100/100", "a"]


@pytest.mark.slow
def test_demo_is_quiet_and_verbose_brings_ray_back(tmp_path):
    """The demo's four steps (small sizes): few lines, none of Ray's, an epoch line and the result;
    the same demo with --verbose prints Ray's own output again."""
    out = tmp_path / "demo"
    demo = ("jobs.demo", "--out", str(out), "--num", "40", "--archive", "4", "--epochs", "2")
    _, quiet = _run(*demo)
    assert len(quiet) <= 60, "\n".join(quiet)
    assert not [line for line in quiet if any(word in line for word in NOISE)], "\n".join(quiet)
    assert not [line for line in quiet if "pid=" in line or "(RayTrainWorker" in line], "\n".join(quiet)
    # Training's own progress reaches the driver although Ray no longer forwards worker output.
    assert any(OUR_LINE.match(line) and "] epoch 2/2 " in line and "val_dice" in line for line in quiet)
    assert sum("its own logs: " in line for line in quiet) == 2  # train and infer each started a Ray
    assert "Demo finished." in quiet and quiet[-1].strip().startswith("report:")

    # Rerun: training is finished (re-exported only), inference runs again.
    _, verbose = _run(*demo, "--verbose")
    assert len(verbose) > len(quiet) + 20, "\n".join(verbose)
    assert any("Started a local Ray instance" in line for line in verbose)
    assert "Demo finished." in verbose


@pytest.mark.slow
def test_infer_prints_only_its_own_lines(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for phantom in generate(3, seed=3, size=(64, 64)):
        cv2.imwrite(str(images / f"{phantom.id}.png"), phantom.image)
    _, lines = _run("jobs.infer", "--model", "busi-unet", "--input", str(images), "--output", str(tmp_path / "masks"),
                    "--num-cpus", "2", timeout=300)
    ours = [line for line in lines if OUR_LINE.match(line)]
    assert ours and lines[:-1] == ours, "\n".join(lines)  # every line ours, then the JSON summary
    assert json.loads(lines[-1])["rows_ok"] == 3
    assert any("wrote 1 part(s)" in line for line in ours)
