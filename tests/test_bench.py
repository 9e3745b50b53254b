"""The benchmark scripts still run end to end, with tiny sizes, as a user runs them.

Smoke tests only: they check that each script finishes, ends with its ratio line and writes its
JSON (to a temporary folder, not bench/results). The figures at these sizes mean nothing and are
not asserted: speed lives in the benchmarks themselves (bench/README.md), never in tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.memory import tree_memory

REPO = Path(__file__).resolve().parents[1]
RATIO_LINE = re.compile(r"^ratio \S+ = \d+\.\d\d \(goal [<>]= \d+\.\d\d\) (MET|NOT MET)$")

TINY_INFER = ["--n", "16", "--size", "48", "--input-size", "32", "--batch-size", "8"]
CASES = {  # "<module> [variant]" -> arguments
    "infer_efficiency": TINY_INFER,
    "infer_efficiency --s3": [*TINY_INFER, "--s3"],
    "infer_vs_naive": [*TINY_INFER, "--rounds", "1", "--sizes", "square", "--model", "random"],
    "infer_memory": ["--n", "8", "--factor", "2", "--size", "32", "--input-size", "32"],
    "train_throughput": ["--num", "24", "--size", "48", "--image-size", "32", "--epochs", "2", "--batch-size", "4"],
    "model_speed": ["--no-compile", "--rounds", "1", "--iters", "1", "--batch-size", "2", "--input-size", "32"],
}


def run_script(argv: list[str], **env) -> subprocess.CompletedProcess:
    """A benchmark as its own process, starting its own local Ray (never joining $RAY_ADDRESS)."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env}
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_benchmark_runs_and_ends_with_its_ratio(case, tmp_path):
    name = case.split()[0]
    if name == "model_speed" and importlib.util.find_spec("monai") is None:
        pytest.skip("MONAI is installed for the benchmark only (pip install --no-deps monai)")
    proc = run_script(["-m", f"bench.{name}", *CASES[case]], UNET_BENCH_RESULTS=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert RATIO_LINE.match(last), last
    (result_file,) = tmp_path.glob("*.json")
    result = json.loads(result_file.read_text())
    assert result["benchmark"] == name and "ratio" in result and "machine" in result
    assert result["command"].startswith(f"python -m bench.{name}")
    if name == "model_speed":  # the two backends of jobs.infer, side by side
        assert result["onnxruntime_vs_torch"] > 0 and "ours_onnxruntime" in result["median_images_per_s"]
    if name == "infer_vs_naive":
        assert result["onnxruntime"]["ratio_vs_torch_job"] > 0 and len(result["onnxruntime"]["jobs"]) == 1


@pytest.mark.slow
def test_data_memory_benchmark_streams_every_row(tmp_path):
    out = tmp_path / "data_memory.json"
    proc = run_script(["bench/data_memory.py", "--rows", "60", "--png-side", "64", "--shard-rows", "20",
                       "--object-store-mb", "80", "--size", "32", "--batch-size", "8", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rows"] == result["expected_rows"] == 60


def test_tree_memory_counts_a_process_and_its_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mem = tree_memory(os.getpid())
        assert mem.processes >= 2  # this process and the child (pytest may have more)
        assert 0 < mem.uss <= mem.pss <= mem.rss
        alone = tree_memory(child.pid)
        assert alone.processes == 1 and alone.pss > 0
    finally:
        child.kill()
        child.wait()
    assert tree_memory(child.pid) == (0, 0, 0, 0)  # gone: nothing to count


def test_amortised_from_solves_for_the_archive_size_where_the_job_catches_up():
    from bench.infer_vs_naive import amortised_from

    # job: 10 s + n/100 images/s; loop: 2 s + n/50: equal at n = 800, 0.9x at n = (9 - 2)/(1/50 - 0.9/100)
    assert amortised_from(10.0, 100.0, 2.0, 50.0, 1.0) == pytest.approx(800.0)
    assert amortised_from(10.0, 100.0, 2.0, 50.0, 0.9) == pytest.approx(7.0 / (0.02 - 0.009))
    assert amortised_from(10.0, 40.0, 2.0, 50.0, 1.0) is None  # slower per image: never
    assert amortised_from(1.0, 100.0, 2.0, 50.0, 1.0) == 0.0  # faster from the first image
