"""Fault drills: make one process die once, at a named place, so tests can prove recovery.

One mechanism for every job, kept out of user-facing settings: the driver reads the environment
variable ``UNET_FAULT_DRILL`` (set by a test) and hands the drill to the workers it starts
(training: in the loop config; inference: to the model actors). A drill fires at most once per
marker file: the process that fires creates the marker first, so a restarted worker runs on.

Sites: ``train`` (``at`` = epoch, at its end, before the checkpoint is reported; ``rank``
selects the worker) and ``infer`` (``at`` = the model actor's batch call number).

Example (in a test)::

    monkeypatch.setenv(DRILL_ENV, drill("train", at=2, marker=tmp_path / "crashed", rank=1))
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["DRILL_ENV", "SITES", "current", "drill", "maybe_crash"]

DRILL_ENV = "UNET_FAULT_DRILL"
SITES = ("train", "infer")


def drill(site: str, *, at: int, marker: str | os.PathLike, rank: int = 0) -> str:
    """The ``UNET_FAULT_DRILL`` value for one crash of ``rank`` at ``site`` number ``at``."""
    if site not in SITES:
        raise ValueError(f"fault drill site {site!r}; choose one of {', '.join(SITES)}")
    return json.dumps({"site": site, "at": int(at), "rank": int(rank), "marker": str(marker)})


def current() -> dict | None:
    """The drill set in this (driver) process's environment, or None."""
    value = os.environ.get(DRILL_ENV)
    if not value:
        return None
    try:
        spec = json.loads(value)
        if spec["site"] not in SITES:
            raise ValueError(spec["site"])
        return {"site": spec["site"], "at": int(spec["at"]), "rank": int(spec.get("rank", 0)),
                "marker": str(spec["marker"])}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{DRILL_ENV}={value!r}: expected the JSON that unet.faults.drill() writes") from e


def maybe_crash(spec: dict | None, site: str, at: int, rank: int = 0,
                before_exit: Callable[[], None] | None = None) -> None:
    """Exit this process (``os._exit(1)``) if ``spec`` names this site, number and rank and its
    marker does not exist yet; ``before_exit`` runs after the marker is written."""
    if not spec or spec["site"] != site or spec["at"] != at or spec["rank"] != rank:
        return
    marker = Path(spec["marker"])
    if marker.exists():
        return
    marker.write_text(f"{site} drill: pid {os.getpid()} rank {rank} exits at {at}\n")
    if before_exit is not None:
        before_exit()
    print(f"fault drill: {site} rank {rank} exits at {at}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
