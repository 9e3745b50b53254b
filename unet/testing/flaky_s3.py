"""A flaky object store for the tests: an HTTP proxy on loopback in front of an S3 server that fails
a seeded share of the requests, the way a real store and network fail.

Failure kinds (:data:`KINDS`):

* ``500`` / ``503``: an S3 error response (``InternalError`` / ``SlowDown``), the request is not
  passed on;
* ``reset``: the connection is dropped without an answer;
* ``stall``: no answer for ``stall_s`` seconds (past the S3 clients' timeouts), then dropped;
* ``truncate``: the server's answer with its full ``Content-Length`` but only half the body, then
  dropped (GET requests with a body; other requests that draw it get a ``503`` instead).

Whether the n-th request for the same method and URL fails, and how, is a function of
``(seed, method, URL, n)`` alone (a multipart upload's id left out of the URL), so a failure
replays with the same seed whatever the order in which concurrent clients send their requests.
With ``first_attempts=k`` only ``n < k`` may fail: ``rate=1.0, first_attempts=1`` fails every
request once and lets its retry through. :attr:`FlakyS3Proxy.counts` counts the requests and
the failures injected, by kind; :meth:`FlakyS3Proxy.summary` says it in one line.

The proxy passes the client's ``Host`` header on, so AWS signatures made for the proxy's address
stay valid at the server. Example (``tests/test_faults.py``)::

    with running_s3_server() as server, FlakyS3Proxy(server.endpoint, rate=0.1, seed=1) as proxy:
        env = {**server.env(), "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "8"}
        ...  # run a job with env
        print(proxy.summary())
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import re
import threading
from collections.abc import Sequence

__all__ = ["KINDS", "FlakyS3Proxy"]

KINDS = ("500", "503", "reset", "stall", "truncate")

# Hop-by-hop headers (RFC 9110) and the ones the HTTP stack recomputes.
_SKIP_REQUEST = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
                 "expect", "content-length"}
_SKIP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}

_UPLOAD_ID = re.compile(r"uploadId=[^&]*")

_ERRORS = {"500": ("InternalError", "We encountered an internal error. Please try again."),
           "503": ("SlowDown", "Please reduce your request rate.")}


class FlakyS3Proxy:
    """Proxy ``upstream`` (``http://host:port``) on ``http://127.0.0.1:<port>``, failing ``rate`` of
    the requests with the ``kinds`` of failure, chosen by ``seed`` (only the first ``first_attempts``
    attempts of a request, when given). A context manager: the proxy
    serves from a background thread while the block runs."""

    def __init__(self, upstream: str, *, rate: float = 0.1, seed: int = 0, kinds: Sequence[str] = KINDS,
                 stall_s: float = 5.0, first_attempts: int | None = None):
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            raise ValueError(f"kinds={list(kinds)!r}: choose from {', '.join(KINDS)}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate={rate!r} must be in [0, 1]")
        self.upstream = upstream.rstrip("/")
        self.rate, self.seed, self.kinds, self.stall_s = float(rate), int(seed), tuple(kinds), float(stall_s)
        self.first_attempts = first_attempts
        self.counts: collections.Counter[str] = collections.Counter()  # "requests" and one entry per kind
        self.endpoint = ""
        self._seen: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    # -- the decision -------------------------------------------------------------------------

    def decide(self, method: str, url: str) -> str | None:
        """The failure for this request (None: pass it on); counts it."""
        # The server's random upload ids would make a multipart upload's draws differ from run to run.
        key = f"{method} {_UPLOAD_ID.sub('uploadId=*', url)}"
        with self._lock:
            n = self._seen[key]
            self._seen[key] += 1
            self.counts["requests"] += 1
        if self.first_attempts is not None and n >= self.first_attempts:
            return None
        digest = hashlib.blake2b(f"{self.seed}|{key}|{n}".encode(), digest_size=16).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        if draw >= self.rate:
            return None
        return self.kinds[int.from_bytes(digest[8:], "big") % len(self.kinds)]

    def _count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    @property
    def failures(self) -> int:
        """Failures injected so far (all kinds)."""
        with self._lock:
            return sum(v for k, v in self.counts.items() if k != "requests")

    def summary(self) -> str:
        with self._lock:
            kinds = ", ".join(f"{k} {self.counts[k]}" for k in KINDS if self.counts[k])
            requests = self.counts["requests"]
        return (f"flaky S3 (seed {self.seed}, rate {self.rate:.0%}): {requests} requests, "
                f"{self.failures} failures injected ({kinds or 'none'})")

    # -- serving ------------------------------------------------------------------------------

    async def _handle(self, request):
        from aiohttp import web

        body = await request.read()
        kind = self.decide(request.method, request.raw_path)
        if kind == "truncate" and request.method != "GET":
            kind = "503"
        if kind in _ERRORS:
            self._count(kind)
            code, message = _ERRORS[kind]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                   f"</Message><Resource>{request.path}</Resource><RequestId>flaky</RequestId></Error>")
            return web.Response(status=int(kind), body=xml.encode(), content_type="application/xml")
        if kind in ("reset", "stall"):
            self._count(kind)
            if kind == "stall":
                await asyncio.sleep(self.stall_s)
            request.transport.abort()
            raise ConnectionResetError(f"flaky S3: {kind}")
        status, headers, data = await self._forward(request, body)
        if kind == "truncate" and len(data) >= 2:
            self._count(kind)
            transport = request.transport  # taken before the response starts: the drop must happen
            response = web.StreamResponse(status=status, headers=headers)
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            await asyncio.sleep(0.05)  # let the half body leave before the connection drops
            if transport is None or transport.is_closing():
                raise RuntimeError("flaky S3: no connection left to drop after a truncated body")
            transport.abort()
            raise ConnectionResetError("flaky S3: truncated body")
        if request.method == "HEAD":  # no body; Content-Length (the object's size) as the server said
            response = web.StreamResponse(status=status, headers=headers)
            if "Content-Length" in headers:
                response.content_length = int(headers["Content-Length"])
            return response
        return web.Response(status=status, headers=headers, body=data)

    async def _forward(self, request, body: bytes):
        import yarl

        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_REQUEST}
        url = yarl.URL(self.upstream + request.raw_path, encoded=True)
        async with self._session.request(request.method, url, headers=headers, data=body if body else None,
                                         allow_redirects=False) as resp:
            data = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _SKIP_RESPONSE}
            if request.method == "HEAD" and "Content-Length" in resp.headers:
                out["Content-Length"] = resp.headers["Content-Length"]
            return resp.status, out, data

    async def _serve(self) -> None:
        import aiohttp
        from aiohttp import web

        self._stop = asyncio.Event()
        self._session = aiohttp.ClientSession(auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=120))
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await self._session.close()

    def _run(self) -> None:
        import logging

        # A dropped connection is the point here, not news: keep aiohttp's handler errors quiet.
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported by __enter__ when start-up fails
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    def __enter__(self) -> FlakyS3Proxy:
        self._thread = threading.Thread(target=self._run, name="flaky-s3-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or not self.endpoint:
            raise RuntimeError(f"flaky S3 proxy did not start: {self._error}")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)
