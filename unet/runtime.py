"""Where a job runs and what it prints: joining or starting Ray, refusing requests no node can
serve, and keeping Ray's own console output out of the job's.

Used by training (:mod:`unet.training`) and inference (:mod:`unet.inference`) alike, so the same
kind of refusal reads the same and raises the same :class:`UsageError` in both.

Output: a job is quiet by default. It prints its own lines only (``[job HH:MM:SS] message``:
progress at most every ~10 s, one line per training epoch, a summary at the end); Ray's console
output (worker output, progress tables, start-up banners, warnings) stays in Ray's log files,
``<Ray temp dir>/<session>/logs`` (default ``/tmp/ray/session_*/logs``), whose path the job prints
once when it starts Ray. ``--verbose`` (every job) or ``UNET_VERBOSE=1`` shows Ray's output again.
A job calls :func:`configure_output` first; :func:`init_ray` then applies it to Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator

__all__ = ["PROGRESS_EVERY_S", "SUBMITTED_JOB_ENV", "VERBOSE_ENV", "ProgressLine", "UsageError", "cluster_scope",
           "configure_output", "init_ray", "require_driver_cpus", "require_shared_paths",
           "is_quiet", "local_ray_options", "quiet_native_stderr", "ray_logs_dir", "require_cuda"]

VERBOSE_ENV = "UNET_VERBOSE"
PROGRESS_EVERY_S = 10.0

# None until a job calls configure_output (library use, tests): then Ray keeps all its defaults.
_verbose: bool | None = None
# Ray Data settings as they were before quiet mode changed them (restored by a verbose job).
_saved_ray_data: dict = {}


class UsageError(ValueError):
    """Bad use: a bad flag or setting, an unknown model, a cluster that cannot fit the request.

    ``unet.cli.run_main`` shows it as one line with exit code 2. A ``ValueError``, so code and
    tests that check a bad value with ``except ValueError`` still catch it."""


def init_ray(address: str | None = None, num_cpus: int | None = None, *, verbose: bool | None = None) -> bool:
    """Connect the job to its Ray; returns True if this call started (or joined) Ray.

    Order: an already initialised Ray (tests, the demo, notebooks) -> ``address`` (``auto`` = the
    cluster ``ray start`` made on this machine) -> ``$RAY_ADDRESS`` (set by ``ray job submit``) -> a
    new private local Ray with ``num_cpus`` (default: this machine's CPUs). The last one is explicit
    (``address="local"``): plain ``ray.init()`` would silently join any ``ray start`` cluster it
    finds and then ignore ``num_cpus``.

    ``verbose`` (default: what :func:`configure_output` set; Ray's defaults if it was never called):
    when False, workers' output is not forwarded to this process (``log_to_driver=False``; it
    stays in the workers' log files), Ray's driver logger shows errors only, Ray Data shows no
    progress bars, banners or console logs, and one line of ours says where Ray's logs are.
    An already initialised Ray keeps its settings; only Ray Data's are applied.
    """
    import ray

    quiet = verbose is False or (verbose is None and _verbose is False)
    if quiet or _saved_ray_data:
        _quiet_ray_data(quiet)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    options = {"address": address} if address else local_ray_options(num_cpus)
    if quiet:
        options |= {"log_to_driver": False, "logging_level": logging.ERROR}
    ray.init(**options)
    if quiet:
        where = f"joined {address}" if address else f"local, {options['num_cpus']} CPUs"
        logging.getLogger("unet.runtime").info("Ray %s (%s); its own logs: %s (--verbose or %s=1 shows them here)",
                                               ray.__version__, where, ray_logs_dir(), VERBOSE_ENV)
    return True


def ray_logs_dir() -> str:
    """This node's log folder of the Ray session this process is connected to."""
    import ray

    context = ray.get_runtime_context()
    return os.path.join(context.get_temp_dir(), context.get_session_name(), "logs")


def local_ray_options(num_cpus: int | None = None) -> dict:
    """``ray.init`` arguments for a private local Ray. Its workers get this checkout on their
    ``PYTHONPATH`` so ``unet`` and ``jobs`` import there even when the package is not installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {"address": "local", "num_cpus": num_cpus or os.cpu_count() or 1, "include_dashboard": False,
            "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}}


def require_cuda(gpus: float, flag: str) -> None:
    """Fail fast, in one line, when Ray can schedule GPU work but torch there cannot use a GPU.

    Runs one tiny task that asks Ray for ``gpus`` GPU (as a worker will) and reports what torch
    sees on the node where Ray put it. Ray's GPUs can be logical (``ray start --num-gpus``) or
    the node's torch a CPU build; the run would otherwise fail later, once per retry, inside Ray.
    """
    import ray

    @ray.remote(num_cpus=0, num_gpus=gpus)
    def probe() -> dict:
        import platform

        import torch

        return {"cuda": torch.cuda.is_available(), "torch": torch.__version__, "host": platform.node(),
                "node": ray.get_runtime_context().get_node_id()[:8],
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    seen = ray.get(probe.remote())
    if not seen["cuda"]:
        raise UsageError(f"{flag}: Ray gave the task GPU {', '.join(seen['gpu_ids'])} on node {seen['node']} "
                         f"({seen['host']}), but "
                         f"torch {seen['torch']} there sees no CUDA device; install a CUDA build of torch on "
                         f"the GPU nodes or run without {flag}")


# Ray's job supervisor sets this for every `ray job submit` entrypoint (ray/_private/runtime_env/constants.py).
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def cluster_scope(address: str | None = None) -> str | None:
    """Why this job's files must be on shared storage, or None when one machine does everything.

    A job submitted with ``ray job submit`` runs its driver on some cluster node, in a fresh working
    directory (``runs/`` is not uploaded), and its tasks on others; a Ray that spans more than one
    node spreads tasks over them. Either way a local path means a different folder, or none, on
    each node. The Ray looked at: the one this process is connected to, else the cluster at
    ``address`` (default ``$RAY_ADDRESS``; joined for a moment to count its nodes), else none (a
    private local Ray has one node).
    """
    if os.environ.get(SUBMITTED_JOB_ENV):
        return "was submitted with `ray job submit`: its driver and tasks run on cluster nodes"
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or ""
    # http(s):// is the job API of a cluster this process is not part of (the laptop of
    # docs/operations.md): work done here stays here.
    joined = not ray.is_initialized() and address not in ("", "local") and not address.startswith("http")
    if not ray.is_initialized() and not joined:
        return None
    if joined:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except ConnectionError:  # no cluster there: this job will run on its own (or fail saying so)
            return None
    try:
        alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    finally:
        if joined:
            ray.shutdown()
    return f"runs on a Ray cluster of {alive} nodes" if alive > 1 else None


def require_shared_paths(paths: dict[str, str | None], address: str | None = None) -> None:
    """Refuse, in one line, a local path among ``{flag: uri}`` when :func:`cluster_scope` says the
    job's files must be shared. ``s3://`` is shared; so is ``file:///abs/path``, which says "every
    node mounts this path" (NFS, EFS); a plain or relative path is not."""
    if all(not uri or _is_shared(uri) for uri in paths.values()):
        return  # nothing to refuse: no need to look at the cluster
    scope = cluster_scope(address)
    if scope is None:
        return
    for flag, uri in paths.items():
        if uri and not _is_shared(uri):
            raise UsageError(f"{flag} {uri}: a local path, but this job {scope}. Use a shared URI: "
                             f"s3://bucket/prefix (or file:///abs/path for a file system every node mounts there)")


def _is_shared(uri: str) -> bool:
    from .storage import is_shared

    return is_shared(uri)


def require_driver_cpus(job: str) -> None:
    """A submitted job whose driver does the work itself (``jobs.prepare``, ``jobs.evaluate``) must
    not run on a node that advertises no CPUs: that is the operator saying "no work here"
    (``cluster.yaml``'s head). Ray places the entrypoint on the head unless it asks for resources."""
    if not os.environ.get(SUBMITTED_JOB_ENV):
        return
    import ray

    init_ray()
    node_id = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node_id), 0)
    if cpus <= 0:
        raise UsageError(f"{job} does its work in the driver, and this driver runs on a node with no CPUs for "
                         f"work (the head). Submit it with `ray job submit --entrypoint-num-cpus 4 ...` so Ray "
                         f"runs it on a worker node")


# ---------------------------------------------------------------------------------------------
# What a job prints
# ---------------------------------------------------------------------------------------------

class _Console(logging.StreamHandler):
    """Our lines, on whatever ``sys.stdout`` is when they are written: the demo runs several jobs
    in one process, and tests capture ``sys.stdout``."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; it is always looked up instead
        pass


class _JobFormatter(logging.Formatter):
    """``[job HH:MM:SS] message``; warnings and errors say so after the time."""

    def __init__(self, job: str):
        super().__init__(datefmt="%H:%M:%S")
        self.job = job

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        line = f"[{self.job} {self.formatTime(record, self.datefmt)}] {level}{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_output(job: str, verbose: bool = False) -> bool:
    """Set up what the job ``job`` prints; call once at the start of a job's ``main``.

    Our ``unet.*`` loggers print ``[job HH:MM:SS] message`` lines on stdout (INFO, or DEBUG when
    verbose); they still propagate, so pytest's ``caplog`` sees them. ``verbose`` (``--verbose``,
    or ``UNET_VERBOSE=1`` in the environment) decides how :func:`init_ray` sets up Ray: quiet
    unless verbose. Returns the verbosity used. Calling it again (the demo runs every job in one
    process) replaces the previous set-up.
    """
    global _verbose
    verbose = bool(verbose) or os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")
    _verbose = verbose
    logger = logging.getLogger("unet")
    for handler in [h for h in logger.handlers if isinstance(h, _Console)]:
        logger.removeHandler(handler)
    handler = _Console()
    handler.setFormatter(_JobFormatter(job))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    return verbose


def is_quiet() -> bool:
    """True when the job asked for quiet output (:func:`configure_output` without verbose)."""
    return _verbose is False


# Ray Data's driver-side chatter: progress bars (a table of operators every few seconds when
# stdout is not a terminal) and stats. Quiet jobs print their own progress instead
# (unet.inference.run). The "Starting execution" line stays on: with the console handler at ERROR
# it reaches only the ray-data log file, from which the benchmarks read their timeline.
_RAY_DATA_QUIET = {"enable_progress_bars": False, "enable_auto_log_stats": False}


def _quiet_ray_data(quiet: bool) -> None:
    """Ray Data in this process: quiet (settings above; its console log handler at ERROR, its log
    file ``logs/ray-data/`` keeps everything) or back to what it was before."""
    import ray.data

    context = ray.data.DataContext.get_current()
    consoles = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    if quiet:
        if not _saved_ray_data:
            _saved_ray_data.update({name: getattr(context, name) for name in _RAY_DATA_QUIET},
                                   consoles={h: h.level for h in consoles})
        for name, value in _RAY_DATA_QUIET.items():
            setattr(context, name, value)
        for h in consoles:
            h.setLevel(logging.ERROR)
    elif _saved_ray_data:
        levels = _saved_ray_data.pop("consoles")
        for name, value in _saved_ray_data.items():
            setattr(context, name, value)
        for h in consoles:
            h.setLevel(levels.get(h, logging.INFO))
        _saved_ray_data.clear()


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """While quiet and connected to Ray: what is written to this process's stderr (file
    descriptor 2) goes to ``<Ray logs>/unet-driver-<pid>.err`` instead, until the block ends.

    Why: Ray's C++ core writes its ERROR lines to the driver's stderr besides its log file
    (``python-core-driver-*.log``), and Ray Data 2.60 makes one for every actor pool it starts —
    "... has constructor arguments in the object store and max_restarts > 0"
    (ray-project/ray#57733). It is a false alarm for Ray Data's pools, whose arguments Ray Data
    holds for the whole run. Exceptions raised in the block are printed after it, as usual.
    """
    import ray

    if not is_quiet() or not ray.is_initialized():
        yield
        return
    path = os.path.join(ray_logs_dir(), f"unet-driver-{os.getpid()}.err")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as sink:
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class ProgressLine:
    """At most one progress line every ``every_s`` seconds, however often it is updated.

    ``update(text)`` passes ``text`` to ``log`` only when ``every_s`` seconds have passed since the
    last line (or since the start); ``done(text)`` always does, unless ``text`` was the last line.
    """

    def __init__(self, log: Callable[[str], None], every_s: float = PROGRESS_EVERY_S):
        self._log, self.every_s = log, every_s
        self._last_time, self._last_text = time.monotonic(), None

    def update(self, text: str) -> None:
        if time.monotonic() - self._last_time >= self.every_s:
            self._emit(text)

    def done(self, text: str) -> None:
        if text != self._last_text:
            self._emit(text)

    def _emit(self, text: str) -> None:
        self._log(text)
        self._last_time, self._last_text = time.monotonic(), text
