"""The benchmark harness: threads, machine, results, and running jobs as subprocesses.

Every benchmark compares the project against a baseline measured *in the same run* (on a shared
machine absolute numbers drift by 2x within minutes; a ratio of two numbers taken side by side
drifts much less), prints its figures, writes ``bench/results/<name>.json`` and ends with one line::

    ratio <what> = 0.93 (goal >= 0.90) MET

Inputs come from :mod:`bench.archives`; the memory of a job's process tree from :mod:`bench.memory`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.memory import TreeMemorySampler

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


# ---------------------------------------------------------------------------------------------
# Machine, threads, results
# ---------------------------------------------------------------------------------------------

def set_threads(n: int) -> None:
    """Use ``n`` intra-op threads in this process (torch and OpenCV)."""
    import cv2
    import torch

    torch.set_num_threads(max(1, int(n)))
    cv2.setNumThreads(max(1, int(n)))


def machine_info() -> dict:
    """What the numbers were measured on (load average included: the machine may be shared)."""
    import torch

    info = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_result(name: str, result: dict) -> Path:
    """Write ``bench/results/<name>.json`` (with the load average at the end of the run);
    ``$UNET_BENCH_RESULTS`` names another folder (the smoke tests use it)."""
    result = dict(result)
    result.setdefault("machine", {})["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    folder = Path(os.environ.get("UNET_BENCH_RESULTS") or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return path


def ratio_line(what: str, value: float, goal: float, higher_is_better: bool = True) -> str:
    """The last line every benchmark prints."""
    met = value >= goal if higher_is_better else value <= goal
    op = ">=" if higher_is_better else "<="
    return f"ratio {what} = {value:.2f} (goal {op} {goal:.2f}) {'MET' if met else 'NOT MET'}"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def say(message: str) -> None:
    print(message, flush=True)


def announce_machine(extra: str = "") -> dict:
    """:func:`machine_info`, after printing its first line (``extra`` appended to it)."""
    info = machine_info()
    say(f"machine: {info['cpus']} CPUs, load average {info['loadavg_start']}, torch {info['torch']}{extra}")
    return info


def finish(name: str, result: dict, argv: Sequence[str] | None, label: str, ratio: float, goal: float, *,
           notes: Sequence[str] = (), higher_is_better: bool = True) -> dict:
    """The end of every benchmark's ``main()``: add the command line to ``result`` (as
    ``python -m bench.<result["benchmark"]> <argv>``), write ``bench/results/<name>.json``, print
    ``notes``, the results path and, last, the ratio line; return ``result``."""
    args = argv if argv is not None else sys.argv[1:]
    result["command"] = " ".join([f"python -m bench.{result['benchmark']}", *args])
    path = write_result(name, result)
    for note in notes:
        say(note)
    say(f"results: {path}")
    say(ratio_line(label, ratio, goal, higher_is_better))
    return result


@contextlib.contextmanager
def work_dir(keep: str | None, prefix: str) -> Iterator[Path]:
    """The folder ``keep`` (created if missing, left in place), else a new temporary folder
    named ``<prefix>...`` that is removed on exit."""
    work = Path(keep or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The infer job's arguments
# ---------------------------------------------------------------------------------------------

def input_job_args(kind: str) -> list[str]:
    """Extra ``jobs.infer`` flags an input kind needs."""
    return ["--image-column", "image", "--id-column", "id"] if kind == "parquet" else []


def add_infer_args(p: argparse.ArgumentParser, *, n: int, size: int, input_size: int,
                   n_help: str = "images in the archive", workers: int | None = 1,
                   workers_help: str = "model actors (default 1)", cpus_per_worker: float | None = 1.0,
                   cpus_help: str | None = None) -> None:
    """The flags the inference benchmarks share: the archive, the job's resources (what
    :func:`infer_job_args` reads, besides the script's own ``--gpu``) and ``--workdir``."""
    p.add_argument("--n", type=int, default=n, help=f"{n_help} (default {n})")
    p.add_argument("--size", type=int, default=size, help=f"side of the stored images (default {size})")
    p.add_argument("--input-size", type=int, default=input_size, help=f"model input side (default {input_size})")
    p.add_argument("--input-kind", choices=("folder", "parquet", "tar"), default="folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=workers, help=workers_help)
    p.add_argument("--cpus-per-worker", type=float, default=cpus_per_worker, help=cpus_help)
    p.add_argument("--gpus-per-worker", type=float, default=1.0,
                   help="with --gpu: GPU share of each model actor (default 1; 0.25: four actors per GPU)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the job's local Ray (default: all)")
    p.add_argument("--workdir", default=None, help="keep inputs/outputs here (default: a temp dir, removed)")


def infer_job_args(args: argparse.Namespace, model_ref: str) -> list[str]:
    """``python -m jobs.infer`` arguments from the flags of :func:`add_infer_args` and ``--workers``,
    ``--cpus-per-worker``, ``--gpu`` (no ``--input``/``--output``: the caller adds them)."""
    job = ["-m", "jobs.infer", "--model", model_ref, "--batch-size", str(args.batch_size),
           "--workers", str(args.workers), "--cpus-per-worker", str(args.cpus_per_worker),
           *input_job_args(args.input_kind)]
    if args.num_cpus:
        job += ["--num-cpus", str(args.num_cpus)]
    if args.gpu:
        job += ["--gpus-per-worker", f"{args.gpus_per_worker:g}"]
    return job


# ---------------------------------------------------------------------------------------------
# Running a job as a subprocess (fresh Ray per run), sampling its memory if asked
# ---------------------------------------------------------------------------------------------

def job_env() -> dict:
    """Environment for a job subprocess: this checkout importable, no cluster to join by accident."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("RAY_DEDUP_LOGS", "1")
    return env


@dataclass
class JobRun:
    pid: int
    returncode: int
    wall_s: float
    stdout: str
    stderr: str
    memory: dict | None
    loadavg_1m: float = float("nan")  # at the end of the run

    def last_json(self) -> dict:
        """The last stdout line that parses as a JSON object (jobs.infer prints its summary last)."""
        for line in reversed(self.stdout.splitlines()):
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    return json.loads(line)
        raise RuntimeError(f"no JSON summary in the job's output; stderr tail:\n{self.stderr[-3000:]}")


def run_job(args: Sequence[str], *, sample_memory: bool = False, timeout: float = 1800,
            log_dir: Path | None = None) -> JobRun:
    """Run ``python <args>`` from the repo root; raise with the output tail if it fails."""
    cmd = [sys.executable, *args]
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="unet-bench-log-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    t0 = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=out, stderr=err)
        sampler = TreeMemorySampler(proc.pid) if sample_memory else None
        if sampler:
            sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # let Ray shut its processes down
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            memory = sampler.stop() if sampler else None
    run = JobRun(proc.pid, rc, time.perf_counter() - t0, out_path.read_text(errors="replace"),
                 err_path.read_text(errors="replace"), memory, round(os.getloadavg()[0], 1))
    if sampler:
        run.memory["series"] = sampler.samples
    if rc != 0:
        raise RuntimeError(f"command failed with exit code {rc}: {' '.join(cmd)}\n"
                           f"stdout tail:\n{run.stdout[-3000:]}\nstderr tail:\n{run.stderr[-3000:]}")
    return run


# ---------------------------------------------------------------------------------------------
# The infer job's throughput, with and without its fixed start-up
# ---------------------------------------------------------------------------------------------

def count_ok_rows(output_uri: str) -> int:
    """Rows with status "ok" in a ``jobs.infer`` output folder."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from unet import storage

    fs, path = storage.get_filesystem(output_uri)
    status = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["status"]).column("status")
    return int(pc.sum(pc.equal(status, "ok")).as_py() or 0)


_TS = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


def _log_time(stamp: str) -> float:
    import datetime as dt

    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def ray_data_timeline(driver_pid: int) -> dict | None:
    """What Ray Data logged about the (last) Dataset a finished driver ran, or None if not found.

    Ray writes ``<temp dir>/session_<date>_<driver pid>/logs/ray-data/ray-data-<dataset>.log``
    with DEBUG detail: when execution started, when each operator's first task was submitted,
    when it finished, and each operator's final metrics — among them ``function_body_time_s``,
    the seconds spent inside the user function (for the model actor: the forward passes on
    batches already in memory). This is Ray's log format, not an API: if it changes, the
    benchmarks fall back to their other figures.
    """
    import ast
    import glob

    temp = os.environ.get("RAY_TMPDIR", "/tmp") + "/ray"
    logs = sorted(glob.glob(f"{temp}/session_*_{driver_pid}/logs/ray-data/ray-data-*_*.log"), key=os.path.getmtime)
    logs = [p for p in logs if not os.path.basename(p).startswith("ray-data-train")]
    if not logs:
        return None
    text = Path(logs[-1]).read_text(errors="replace")
    start = re.search(_TS + r".*Starting execution of Dataset", text)
    end = re.search(_TS + r".*execution finished in ([\d.]+) seconds", text)
    if not (start and end):
        return None
    operators = {}
    for m in re.finditer(r"Operator \w+\[(.+?)\] completed\. Operator Metrics:\n(\{.*\})", text):
        name, body = m.group(1), m.group(2)
        metrics = {}
        for key in ("function_body_time_s", "rows_task_outputs_generated", "num_tasks_finished",
                    "task_completion_time_s", "block_transform_time_s", "bytes_outputs_of_finished_tasks"):
            km = re.search(rf"'{key}': ([\d.eE+-]+|None)", body)
            metrics[key] = None if not km or km.group(1) == "None" else ast.literal_eval(km.group(1))
        first = re.search(_TS + rf".*Executing map task of operator {re.escape(name)} with task index 0\b", text)
        metrics["first_task_t"] = round(_log_time(first.group(1)) - _log_time(start.group(1)), 3) if first else None
        operators[name] = metrics
    return {"log": logs[-1], "execution_s": float(end.group(2)),
            "start": _log_time(start.group(1)), "end": _log_time(end.group(1)), "operators": operators}


@contextlib.contextmanager
def running_ray(num_cpus: int | None = None) -> Iterator[tuple[str, int]]:
    """A local Ray started once with ``ray start --head`` (as a machine that runs jobs keeps one),
    for jobs to join with ``--address``; yields (address, the pid that names its session folder).
    Stopped on exit by signalling its ``ray start --block`` process, never ``ray stop`` (which
    would stop every Ray on the machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray_cli = Path(sys.executable).with_name("ray")
    cmd = [str(ray_cli), "start", "--head", f"--port={port}", "--include-dashboard=false",
           "--disable-usage-stats", "--block", *([f"--num-cpus={num_cpus}"] if num_cpus else [])]
    log = tempfile.NamedTemporaryFile(prefix="unet-bench-ray-", suffix=".log", delete=False)
    # No token auth between this private Ray and its jobs (job_env passes the setting on to them).
    saved_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in Path(log.name).read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {Path(log.name).read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        yield address, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if saved_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_auth


def measure_infer_job(job_args: Sequence[str], *, input_uri: str, n: int, output: str, workers: int,
                      log_dir: Path, ray_pid: int | None = None) -> dict:
    """Run ``jobs.infer`` over ``n`` images and take its rates apart (see ``ray_data_timeline``).

    Returns, besides the job's summary:

    ``ray_pid``: the pid naming the Ray session the job joined (:func:`running_ray`); default: the
    job's own (it started its own Ray).

    * ``wall_images_per_s`` — n / the ``wall_s`` of the job's summary: all of ``run_inference``
      (model load, listing, plan, pipeline, parts), not the interpreter start or ``ray.init``;
    * ``startup_s`` — from the pipeline's start to the model actor's first batch: Ray starting
      the actor's process (importing torch, unpickling the model), tens of seconds on a loaded
      2-CPU machine and the same for any archive size;
    * ``pipeline_images_per_s`` — n / (pipeline end - the model's first batch): the rate of the
      whole pipeline (read, decode, model, post-processing, delivery to the driver) once the
      model runs;
    * ``actor_model_images_per_s`` — n x workers / the model actors' time inside ``Predictor``
      (normalise + forward + sigmoid on a batch already in memory): the model-only rate measured
      inside the job, at the same moment, under the same machine load;
    * ``model_busy`` = pipeline rate / actor model rate: the fraction of the time the model was
      working — 1.0 means the pipeline around it costs nothing.
    """
    run = run_job([*job_args, "--input", input_uri, "--output", output], log_dir=log_dir)
    summary = run.last_json()
    ok = count_ok_rows(output)
    if ok != n or summary.get("rows_ok") != n:
        raise RuntimeError(f"the job wrote {ok} ok rows for {n} images ({output}): {summary}")
    out = {"images": n, "wall_s": summary["wall_s"], "process_wall_s": round(run.wall_s, 2), "summary": summary,
           "wall_images_per_s": n / summary["wall_s"], "loadavg_1m_at_end": run.loadavg_1m}
    timeline = ray_data_timeline(ray_pid or run.pid)
    out["ray_data"] = timeline
    predictor = (timeline or {}).get("operators", {}).get("MapBatches(Predictor)")
    if predictor and predictor.get("first_task_t") is not None and predictor.get("function_body_time_s"):
        span = timeline["end"] - timeline["start"] - predictor["first_task_t"]
        out["startup_s"] = predictor["first_task_t"]
        out["pipeline_s"] = round(span, 3)
        out["pipeline_images_per_s"] = n / span
        out["actor_model_s"] = predictor["function_body_time_s"]
        out["actor_model_images_per_s"] = n * workers / predictor["function_body_time_s"]
        out["model_busy"] = out["pipeline_images_per_s"] / out["actor_model_images_per_s"]
    out["bytes_per_image"] = stage_bytes_per_image(timeline, n)
    return out


def stage_bytes_per_image(timeline: dict | None, n: int) -> dict[str, int]:
    """Bytes each pipeline step handed to the next (its finished tasks' output blocks in the object
    store), per image: what crosses between processes (and, on a GPU node, what the actor must
    receive and send back). Shown here, on CPU, a regression costs nothing yet; on a GPU it does."""
    out = {}
    for name, metrics in ((timeline or {}).get("operators") or {}).items():
        if metrics.get("bytes_outputs_of_finished_tasks"):
            step = "+".join(re.findall(r"MapBatches\((\w+)\)", name)) or name  # fused steps: "a+b"
            out[step] = round(metrics["bytes_outputs_of_finished_tasks"] / n)
    return out
