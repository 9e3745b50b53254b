"""Command-line plumbing shared by the jobs: one clear line for bad use and storage failures.

:func:`run_main` sorts what a job's ``main`` raises into three kinds, each with its exit code:

* **bad use** (exit 2, like argparse): :class:`unet.runtime.UsageError` (a bad flag value, an
  unknown model, a cluster too small for the request), a path or URI that does not exist
  (``FileNotFoundError``, :class:`unet.storage.StorageNotFoundError`) or may not be read
  (``PermissionError``). One line: the message.
* **storage or network failure** (exit 3, :data:`EXIT_STORAGE`): any other ``OSError`` — an S3
  endpoint that does not answer, a request that failed after the client's retries, a reset
  connection, a full disk. One line naming the URI (the message of
  :class:`unet.storage.StorageError` does) and the advice to run the same command again.
* **anything else is a bug** (exit 1): ``KeyError``, ``ValueError``, ``TypeError`` ... keep their
  traceback. Code that checks user input raises ``UsageError`` (a ``ValueError``), or interprets
  the arguments inside :func:`usage_errors`, which turns the ``ValueError``/``KeyError`` of a
  validator into a ``UsageError``.

Errors that come back wrapped in a ``RayTaskError`` are unwrapped to their cause first, so a
storage error inside a Ray task is not a 60-line traceback wall. ``UNET_DEBUG=1`` re-raises every
error with its traceback.

Usage, at the bottom of ``jobs/<name>.py``::

    if __name__ == "__main__":
        raise SystemExit(run_main(main))
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from .runtime import UsageError

__all__ = ["EXIT_STORAGE", "EXIT_USAGE", "add_s3_arguments", "apply_s3_arguments", "error_kind", "format_error",
           "run_main", "usage_errors", "user_error"]

# Same code argparse uses for bad arguments: "you called it wrong", not "it crashed".
EXIT_USAGE = 2
# The store or the network failed: nothing is wrong with the command; running it again may work.
EXIT_STORAGE = 3
STORAGE_ADVICE = ("a storage or network failure, not a bug: check that the store is reachable, then run "
                  "the same command again")

# OSErrors that mean "this path/URI does not exist or may not be read": the user's to fix.
_USAGE_OS_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError,
                                                     NotADirectoryError)


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Treat a ``ValueError``/``KeyError`` raised inside as bad use (:class:`UsageError`).

    For the part of a job that interprets its arguments (flags, config files, model names), where
    a validator's ``ValueError`` is about the user's input; the same error later in the job is a
    bug and keeps its traceback.
    """
    try:
        yield
    except UsageError:
        raise
    except (ValueError, KeyError) as e:
        raise UsageError(format_error(e)) from e


def _unwrap_ray(error: BaseException) -> BaseException:
    """The user-facing cause of an error raised inside a Ray task or actor, else ``error`` itself."""
    try:
        from ray.exceptions import RayTaskError
    except ImportError:  # jobs that never import Ray still get clean errors
        return error
    while isinstance(error, RayTaskError) and getattr(error, "cause", None) is not None:
        error = error.cause
    return error


def error_kind(error: BaseException) -> tuple[str, BaseException]:
    """``("usage" | "storage" | "bug", cause)`` for an error a job raised (after unwrapping Ray)."""
    cause = _unwrap_ray(error)
    from .storage import StorageNotFoundError, StoragePermissionError

    if isinstance(cause, (UsageError, StorageNotFoundError, StoragePermissionError, *_USAGE_OS_ERRORS)):
        return "usage", cause
    if isinstance(cause, OSError):  # ConnectionError, TimeoutError, StorageError, pyarrow's S3 errors
        return "storage", cause
    return "bug", cause


def user_error(error: BaseException) -> BaseException | None:
    """The error to report in one line if ``error`` is bad use (after unwrapping Ray), else None."""
    kind, cause = error_kind(error)
    return cause if kind == "usage" else None


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
    """Call ``main(argv)``; return its exit code, or report an error in one line (see the module doc).

    Bad use returns 2, a storage/network failure 3, ``KeyboardInterrupt`` 130 with a one-line note.
    Anything else is a bug and propagates with its traceback (exit 1). ``UNET_DEBUG=1`` re-raises
    everything.
    """
    debug = os.environ.get("UNET_DEBUG", "") not in ("", "0")
    try:
        code = main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog or _prog()}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted just below; bugs re-raised
        kind, cause = error_kind(error)
        if kind == "bug" or debug:
            raise
        if kind == "storage":
            print(f"{prog or _prog()}: error: {format_error(cause)} ({STORAGE_ADVICE})", file=sys.stderr)
            return EXIT_STORAGE
        print(f"{prog or _prog()}: error: {format_error(cause)}", file=sys.stderr)
        return EXIT_USAGE
    return 0 if code is None else int(code)


_S3_FLAGS = (("endpoint", "AWS_ENDPOINT_URL"), ("region", "AWS_REGION"), ("profile", "AWS_PROFILE"),
             ("credentials_file", "AWS_SHARED_CREDENTIALS_FILE"))


class _NoSecretsOnTheCommandLine(argparse.Action):
    """``--access-key``/``--secret-key``: refused, without echoing the value. A value on the command
    line lands in ``ps``, in Ray's job metadata (``ray job list``, the dashboard) and in every record
    that keeps the command (manifest.json, checkpoints)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not accepted: keys on the command line end up in Ray's job "
                     "metadata and in the recorded command. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                     "in the environment, or use --profile NAME or --credentials-file FILE")


def add_s3_arguments(parser) -> None:
    """``--endpoint``/``--region``/``--profile``/``--credentials-file`` (default: the AWS_* environment).

    Keys are never flags (see :class:`_NoSecretsOnTheCommandLine`); they come from the environment,
    a profile or a credentials file.
    """
    group = parser.add_argument_group("S3 (default: AWS_* environment variables, then ~/.aws/ and the "
                                      "instance's role)")
    group.add_argument("--endpoint", "--endpoint-url", dest="endpoint", default=None, metavar="URL",
                       help="S3 endpoint URL, e.g. http://127.0.0.1:8333 (sets AWS_ENDPOINT_URL)")
    group.add_argument("--region", default=None,
                       help="S3 region (sets AWS_REGION; default: the profile's, else the bucket's own)")
    group.add_argument("--profile", default=None, metavar="NAME",
                       help="AWS profile whose keys (and region) to use (sets AWS_PROFILE)")
    group.add_argument("--credentials-file", default=None, metavar="FILE",
                       help="AWS credentials file (INI, as ~/.aws/credentials) to read the keys from "
                            "(sets AWS_SHARED_CREDENTIALS_FILE)")
    for flag in ("--access-key", "--secret-key"):
        group.add_argument(flag, action=_NoSecretsOnTheCommandLine, help=argparse.SUPPRESS)


def apply_s3_arguments(args) -> None:
    """Flags win over the environment for this process, so every S3 client it makes (and the file
    systems pickled to Ray workers) uses the same settings.

    With ``--profile`` or ``--credentials-file`` the keys are read here, once, into this process's
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``: Ray workers on other nodes have no such file,
    but get the keys inside the file systems pickled to them (never on a command line).
    """
    for flag, var in _S3_FLAGS:
        if getattr(args, flag, None):
            os.environ[var] = getattr(args, flag)
            if var == "AWS_ENDPOINT_URL":
                os.environ.pop("AWS_ENDPOINT_URL_S3", None)  # it would win over the flag otherwise
    if getattr(args, "profile", None) or getattr(args, "credentials_file", None):
        _keys_from_profile(args.credentials_file)


def _keys_from_profile(credentials_file: str | None) -> None:
    import botocore.exceptions
    import botocore.session

    if credentials_file and not os.path.isfile(credentials_file):
        raise UsageError(f"--credentials-file {credentials_file}: no such file")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        os.environ.pop(var, None)  # the profile's keys, not the environment's
    profile = os.environ.get("AWS_PROFILE", "default")
    try:
        credentials = botocore.session.Session().get_credentials()
    except botocore.exceptions.BotoCoreError as e:  # ProfileNotFound, a malformed file ...
        raise UsageError(f"AWS profile {profile!r}: {e}") from e
    if credentials is None or credentials.method in ("env", "iam-role", "container-role"):
        raise UsageError(f"AWS profile {profile!r} has no aws_access_key_id/aws_secret_access_key in "
                         f"{credentials_file or os.environ.get('AWS_SHARED_CREDENTIALS_FILE', '~/.aws/credentials')} "
                         "or ~/.aws/config")
    frozen = credentials.get_frozen_credentials()
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = frozen.access_key, frozen.secret_key
    if frozen.token:
        os.environ["AWS_SESSION_TOKEN"] = frozen.token
