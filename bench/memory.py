"""The memory of a process and all its descendants, read with psutil, once or sampled in the background.

Ray's GCS, raylet, dashboard/agents and workers all run below the driver, so the tree under a job's
process is the whole job. Three sums per tree:

* RSS — counts pages shared between processes (libraries, the plasma object store mapped into
  every worker) once per process;
* PSS — splits shared pages between their users, so its sum is the real footprint;
* USS — the pages only one process holds (what ending that process would give back).
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

import psutil

MiB = 1024 * 1024


class TreeMemory(NamedTuple):
    """Summed memory of a process tree, in bytes."""

    processes: int
    rss: int
    pss: int
    uss: int


def tree_memory(pid: int) -> TreeMemory:
    """RSS, PSS and USS summed over ``pid`` and every process below it; a process that ends (or
    may not be read) while it is measured counts 0 bytes, a ``pid`` already gone gives all zeros."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return TreeMemory(0, 0, 0, 0)
    rss = pss = uss = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # ended between listing and reading
            continue
        rss += info.rss
        pss += info.pss
        uss += info.uss
    return TreeMemory(len(procs), rss, pss, uss)


class TreeMemorySampler(threading.Thread):
    """Samples :func:`tree_memory` of a process every ``interval`` seconds until stopped.

    RSS and PSS scale the same way when memory is flat; PSS is the footprint (see the module
    docstring).
    """

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[dict] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._stop_event.is_set():
            mem = tree_memory(self.pid)
            self.samples.append({"t": round(time.monotonic() - start, 2), "processes": mem.processes,
                                 "rss_mib": round(mem.rss / MiB, 1), "pss_mib": round(mem.pss / MiB, 1),
                                 "uss_mib": round(mem.uss / MiB, 1)})
            self._stop_event.wait(self.interval)

    def stop(self) -> dict:
        self._stop_event.set()
        self.join()
        s = self.samples
        if not s:
            return {"samples": 0}
        return {"samples": len(s), "peak_rss_mib": max(x["rss_mib"] for x in s),
                "peak_pss_mib": max(x["pss_mib"] for x in s), "peak_uss_mib": max(x["uss_mib"] for x in s),
                "peak_processes": max(x["processes"] for x in s)}
