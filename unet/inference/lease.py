"""A lease on an inference output: one run writes an output folder at a time.

Two runs on one output (a scheduled run starting while the previous one still writes) would
delete each other's temporary files and, when new inputs arrive between their plans, write the
same image into two parts. A run therefore holds ``<output>/_lease.json`` while it works:

* taken with create-only semantics: ``link(2)`` of a written file locally (fails if the name
  exists, like ``O_EXCL``, and never shows an empty lease); on S3 a ``PUT`` with
  ``If-None-Match: *`` (AWS S3 since 2024; see :func:`create_only` for servers that ignore it);
* renewed by a thread every ``ttl / 5`` seconds and released (deleted) when the run ends;
* expired when its last renewal is older than ``ttl`` (a killed run): the next run takes it over.
  A takeover is decided by one more create-only object, ``_lease.json.takeover-<old run id>``,
  so that of two runs finding the same expired lease only one replaces it.

A run that finds a live lease refuses with one line naming the holder and its age, or, with
``wait=True`` (``--wait-for-lease``), waits until the lease is released or expires.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import threading
import time
import uuid

from .. import storage
from ..runtime import UsageError

logger = logging.getLogger("unet.inference")

__all__ = ["LEASE_NAME", "LEASE_TTL_S", "LeaseHeld", "OutputLease", "create_only"]

LEASE_NAME = "_lease.json"
LEASE_TTL_S = 300.0
WAIT_POLL_S = 5.0


class LeaseHeld(UsageError):
    """Another live run holds the output's lease."""


def create_only(uri: str, data: bytes) -> bool:
    """Write ``data`` to ``uri`` only if nothing is there; False if something is.

    Locally a hard link (``link(2)`` refuses an existing name). On S3 a conditional ``PUT``
    (``If-None-Match: *``): the server answers 412 when the key exists. A server that ignores the
    header overwrites instead; such a store cannot arbitrate two runs that start at the same moment
    (:meth:`OutputLease.acquire` warns when it sees this).
    """
    fs, path = storage.get_filesystem(uri)
    if not storage.is_s3(uri):
        # The content goes to a file of our own first, then is linked to the name: link(2) fails
        # if the name exists (like O_EXCL), and a reader never sees the lease empty.
        tmp = f"{path}.new-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as e:
            raise storage.translate_error(uri, e, "create") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return True
    from botocore.exceptions import ClientError

    bucket, _, key = path.partition("/")
    # botocore's client: pyarrow's S3 file system cannot send conditional writes.
    client = storage._s3_client(storage.s3_settings(uri))
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (409, 412):  # 412 Precondition Failed; 409 a concurrent conditional write
            return False
        raise storage.translate_error(uri, OSError(str(e)), "create") from e
    return True


def _read(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except storage.StorageNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}  # empty (a writer killed between create and write): no renewal time, so expired


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class OutputLease:
    """The lease of one run (``run_id``) on ``output``; a context manager that holds it.

    Args:
        output: the output folder/prefix URI.
        run_id: this run's id (also names its temporary folder).
        ttl_s: a lease not renewed for this long is expired.
        wait: wait for a held lease instead of refusing.
    """

    def __init__(self, output: str, run_id: str, *, ttl_s: float = LEASE_TTL_S, wait: bool = False):
        self.output, self.run_id, self.ttl_s, self.wait = output, run_id, float(ttl_s), wait
        self.uri = storage.join(output, LEASE_NAME)
        self.started = time.time()
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": platform.node(), "pid": os.getpid(),
                           "started": self.started, "renewed": time.time(), "ttl_s": self.ttl_s}).encode()

    def _describe(self, holder: dict) -> str:
        now = time.time()
        return (f"run {holder.get('run_id', '?')} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}), "
                f"started {_age(now - float(holder.get('started', now)))} ago, last renewed "
                f"{_age(now - float(holder.get('renewed', now)))} ago")

    def _expired(self, holder: dict) -> bool:
        ttl = float(holder.get("ttl_s", self.ttl_s))
        return time.time() - float(holder.get("renewed", 0.0)) > ttl

    def try_acquire(self) -> dict | None:
        """Take the lease if it is free or expired; returns None on success, else the holder."""
        if create_only(self.uri, self._record()):
            self._check_store_arbitrates()
            return None
        holder = _read(self.uri)
        if holder is None:  # released between our two requests
            return self.try_acquire()
        if not self._expired(holder):
            return holder
        # Expired: one contender wins the takeover marker of that holder, then replaces the lease.
        marker = storage.join(self.output, f"{LEASE_NAME}.takeover-{holder.get('run_id', 'unknown')}")
        if not create_only(marker, self.run_id.encode()):
            return holder
        try:
            current = _read(self.uri)
            if current is not None and current.get("run_id") != holder.get("run_id"):
                return current  # another run took it over and already released the marker
            logger.warning("taking over the expired lease on %s: %s", self.output, self._describe(holder))
            storage.delete(self.uri, missing_ok=True)
            if not create_only(self.uri, self._record()):
                return _read(self.uri) or holder
            return None
        finally:
            storage.delete(marker, missing_ok=True)

    def _check_store_arbitrates(self) -> None:
        """A second create-only write of our own lease must be refused; if the store accepts it,
        it ignores the condition (some S3-compatible servers) and two runs starting in the same
        moment could both write."""
        if storage.is_s3(self.uri) and create_only(self.uri, self._record()):
            logger.warning("%s ignores conditional writes (If-None-Match); the output lease cannot stop two "
                           "runs that start at the same moment", self.uri)

    def acquire(self) -> None:
        """Take the lease, waiting if ``wait``; raises :class:`LeaseHeld` naming the holder."""
        announced = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                break
            if not self.wait:
                raise LeaseHeld(f"{self.output} is being written by {self._describe(holder)}; its lease "
                                f"expires {self.ttl_s:g} s after its last renewal. Rerun later, or pass "
                                f"--wait-for-lease to wait for it")
            if not announced:
                logger.info("waiting for the lease on %s, held by %s", self.output, self._describe(holder))
                announced = True
            time.sleep(min(WAIT_POLL_S, self.ttl_s / 5))
        self._thread = threading.Thread(target=self._renew_loop, name="unet-infer-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 5):
            try:
                self.renew()
            except OSError as e:  # a store hiccup: the next renewal may work before the lease expires
                logger.warning("could not renew the lease on %s: %s", self.output, e)

    def renew(self) -> None:
        holder = _read(self.uri)
        if holder is None or holder.get("run_id") != self.run_id:
            if not self.lost:
                logger.error("lost the lease on %s (now %s)", self.output,
                             self._describe(holder) if holder else "free")
            self.lost = True
            return
        storage.write_bytes(self.uri, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = _read(self.uri)
        if holder is not None and holder.get("run_id") == self.run_id:
            storage.delete(self.uri, missing_ok=True)

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        # The run's parts are committed (or it failed anyway): a store that cannot be reached now
        # costs the next run a wait until the lease expires, not the run's result.
        try:
            self.release()
        except OSError as e:
            logger.warning("could not release the lease on %s (%s); it expires %g s after its last renewal",
                           self.output, e, self.ttl_s)
