"""Command-line plumbing shared by the jobs: turn bad use into one clear line and exit code 2.

A job's ``main`` raises the library's ordinary errors for bad input — a URI that does not exist
(:class:`unet.storage.StorageError`, ``FileNotFoundError``), an unknown model name (``KeyError``),
an artifact whose weights do not fit its architecture or a cluster too small for the request
(``ValueError``, :class:`UsageError`). Users should see the message, not a 60-line traceback —
and not a Ray traceback wall either, so errors that come back wrapped in a ``RayTaskError`` are
unwrapped to their cause first. Programming errors (``TypeError``, ``AssertionError``, ...) keep
their traceback. Set ``UNET_DEBUG=1`` to get the full traceback for every error.

Usage, at the bottom of ``jobs/<name>.py``::

    if __name__ == "__main__":
        raise SystemExit(run_main(main))
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from .runtime import UsageError

__all__ = ["EXIT_USAGE", "add_s3_arguments", "apply_s3_arguments", "format_error", "run_main", "user_error"]

# Same code argparse uses for bad arguments: "you called it wrong", not "it crashed".
EXIT_USAGE = 2


# Error types whose message is meant for the user. OSError covers StorageError and friends.
_USER_ERRORS: tuple[type[BaseException], ...] = (UsageError, ValueError, KeyError, OSError)


def _unwrap_ray(error: BaseException) -> BaseException:
    """The user-facing cause of an error raised inside a Ray task or actor, else ``error`` itself."""
    try:
        from ray.exceptions import RayTaskError
    except ImportError:  # jobs that never import Ray still get clean errors
        return error
    while isinstance(error, RayTaskError) and getattr(error, "cause", None) is not None:
        error = error.cause
    return error


def user_error(error: BaseException) -> BaseException | None:
    """The error to report in one line if ``error`` is bad use (after unwrapping Ray), else None."""
    cause = _unwrap_ray(error)
    return cause if isinstance(cause, _USER_ERRORS) else None


def format_error(error: BaseException) -> str:
    """One line: the message only (KeyError's quotes removed, newlines folded)."""
    if isinstance(error, KeyError) and len(error.args) == 1:
        message = str(error.args[0])
    else:
        message = str(error) or type(error).__name__
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _prog() -> str:
    # Under `python -m jobs.evaluate`, __main__'s spec names the module the user typed.
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name else os.path.basename(sys.argv[0] or "unet")


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
             *, prog: str | None = None) -> int:
    """Call ``main(argv)``; return its exit code, or print bad use as one line and return 2.

    ``KeyboardInterrupt`` returns 130 with a one-line note. Anything that is not bad use
    propagates with its traceback (a bug should be loud). ``UNET_DEBUG=1`` re-raises everything.
    """
    debug = os.environ.get("UNET_DEBUG", "") not in ("", "0")
    try:
        code = main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog or _prog()}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - filtered just below; everything else re-raised
        cause = user_error(error)
        if cause is None or debug:
            raise
        print(f"{prog or _prog()}: error: {format_error(cause)}", file=sys.stderr)
        return EXIT_USAGE
    return 0 if code is None else int(code)


_S3_FLAGS = (("endpoint", "AWS_ENDPOINT_URL"), ("access_key", "AWS_ACCESS_KEY_ID"),
             ("secret_key", "AWS_SECRET_ACCESS_KEY"), ("region", "AWS_REGION"))


def add_s3_arguments(parser) -> None:
    """``--endpoint``/``--access-key``/``--secret-key``/``--region`` (default: the AWS_* environment)."""
    group = parser.add_argument_group("S3 (default: AWS_* environment variables)")
    group.add_argument("--endpoint", "--endpoint-url", dest="endpoint", default=None, metavar="URL",
                       help="S3 endpoint URL, e.g. http://127.0.0.1:8333 (sets AWS_ENDPOINT_URL)")
    group.add_argument("--access-key", default=None, help="S3 access key id (sets AWS_ACCESS_KEY_ID)")
    group.add_argument("--secret-key", default=None,
                       help="S3 secret key (sets AWS_SECRET_ACCESS_KEY); never printed or recorded")
    group.add_argument("--region", default=None, help="S3 region (sets AWS_REGION)")


def apply_s3_arguments(args) -> None:
    """Flags win over the environment for this process, so every S3 client it makes (and the file
    systems pickled to Ray workers) uses the same settings."""
    for flag, var in _S3_FLAGS:
        if getattr(args, flag, None):
            os.environ[var] = getattr(args, flag)
            if var == "AWS_ENDPOINT_URL":
                os.environ.pop("AWS_ENDPOINT_URL_S3", None)  # it would win over the flag otherwise
