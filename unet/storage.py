"""One way to reach files, whether they sit on local disk or in an S3-compatible object store.

Every job takes a URI — a local path, ``file:///abs/path`` or ``s3://bucket/prefix`` — and every
job reads and writes through this module, so the rules for endpoint, credentials and region live
in one place:

* endpoint: the ``endpoint`` argument, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``
  (``http://host:port`` selects plain HTTP; a bare ``host:port`` means HTTPS); unset = AWS itself.
* credentials: ``access_key``/``secret_key`` arguments, else ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``); unset = the AWS SDK's own chain
  (``~/.aws/credentials``, instance metadata).
* region: ``region`` argument, else ``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else the ``region``
  of the AWS profile (``AWS_PROFILE``, ``~/.aws/config``), else the bucket's own answer (AWS:
  ``pyarrow.fs.resolve_s3_region``; another endpoint: its ``x-amz-bucket-region`` header or
  ``GetBucketLocation``, where no location constraint means ``us-east-1`` by S3's definition).
  Never a silent default: a bucket that cannot be asked raises :class:`StorageError`.
* retries: ``AWS_MAX_ATTEMPTS`` (attempts in all, first one included) and ``AWS_RETRY_MODE``
  (``standard``, ``legacy``; ``adaptive`` is retried as ``standard``: pyarrow has no client-side
  rate limiter), else the profile's ``max_attempts``/``retry_mode``, else standard with 3 attempts.

The file systems are pyarrow's, because Parquet I/O and Ray Data (``read_parquet(...,
filesystem=fs)``) take them directly and they pickle to Ray workers with their settings.

Failures come back as :class:`StorageError` (an ``OSError``) whose message names the URI, what
went wrong and which variables or flags to check. Secrets never appear in messages.

Example::

    from unet import storage
    storage.write_bytes("s3://my-bucket/run1/hello.txt", b"hi")   # endpoint etc. from AWS_* env
    for uri in storage.iter_files("s3://my-bucket/run1", suffixes=(".txt",)):
        print(uri, storage.read_bytes(uri))
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

from .runtime import UsageError

# What the AWS SDKs' "standard" retry mode does when nothing is configured.
DEFAULT_RETRY_MODE, DEFAULT_MAX_ATTEMPTS = "standard", 3
RETRY_MODES = ("standard", "legacy", "adaptive")
logger = logging.getLogger("unet.storage")

# Shown in every S3 error so users know what to check without reading this module.
_S3_SETTINGS_HINT = (
    "Check the endpoint (--endpoint or AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3), the credentials "
    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, --profile or --credentials-file) and the region "
    "(--region or AWS_REGION / AWS_DEFAULT_REGION)."
)


class StorageError(OSError):
    """A storage operation failed; the message names the URI, the cause and what to check."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object, directory or bucket behind a URI does not exist."""


class BucketNotFoundError(StorageNotFoundError):
    """The S3 bucket named in a URI does not exist (as opposed to a key inside it)."""


class StoragePermissionError(StorageError, PermissionError):
    """The store refused the request: wrong credentials or no permission on the bucket."""


@dataclass(frozen=True)
class S3Settings:
    """Resolved S3 connection settings (arguments first, then environment)."""

    endpoint: str | None  # "host:port" without scheme, or None for AWS
    scheme: str  # "http" or "https"
    access_key: str | None
    secret_key: str | None
    session_token: str | None
    region: str | None  # None: ask the bucket (resolve_region)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_mode: str = DEFAULT_RETRY_MODE

    def __repr__(self) -> str:  # never leak the secret through logs or tracebacks
        return (f"S3Settings(endpoint={self.endpoint!r}, scheme={self.scheme!r}, "
                f"access_key={'set' if self.access_key else None}, "
                f"secret_key={'***' if self.secret_key else None}, region={self.region!r}, "
                f"retries={self.retry_mode}/{self.max_attempts})")

    @property
    def endpoint_url(self) -> str | None:
        return f"{self.scheme}://{self.endpoint}" if self.endpoint else None


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return str(uri).startswith("s3://")


def is_shared(uri: str) -> bool:
    """True for URIs every node of a cluster reads alike: ``s3://``, and ``file://`` (by which the
    user says the path is a mount every node has). A plain or relative path is this machine's own."""
    return is_s3(uri) or str(uri).startswith("file://")


def resolve_s3_settings(*, endpoint: str | None = None, access_key: str | None = None,
                        secret_key: str | None = None, region: str | None = None) -> S3Settings:
    """Merge explicit arguments with the AWS environment variables (arguments win)."""
    env = os.environ
    endpoint = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    scheme = "https"
    if endpoint:
        match = re.match(r"^(https?)://(.*)$", endpoint.strip())
        if match:
            scheme, endpoint = match.group(1), match.group(2)
        endpoint = endpoint.rstrip("/")
    # A session token belongs to the key it was issued with, i.e. only to the one from the env.
    session_token = None if access_key else env.get("AWS_SESSION_TOKEN") or None
    access_key = access_key or env.get("AWS_ACCESS_KEY_ID") or None
    secret_key = secret_key or env.get("AWS_SECRET_ACCESS_KEY") or None
    if bool(access_key) != bool(secret_key):
        raise StorageError(
            "S3 credentials are incomplete: an access key was given without a secret key or the other "
            "way round. Set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither (then a "
            "profile, --credentials-file or the instance's role).")
    profile = _profile_config()
    region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or profile.get("region") or None
    retry_mode = (env.get("AWS_RETRY_MODE") or profile.get("retry_mode") or DEFAULT_RETRY_MODE).strip().lower()
    if retry_mode not in RETRY_MODES:
        raise UsageError(f"AWS_RETRY_MODE (or retry_mode in the AWS profile) is {retry_mode!r}; "
                           f"expected one of {', '.join(RETRY_MODES)}")
    attempts = env.get("AWS_MAX_ATTEMPTS") or profile.get("max_attempts") or str(DEFAULT_MAX_ATTEMPTS)
    if not attempts.strip().isdigit() or int(attempts) < 1:
        raise UsageError(f"AWS_MAX_ATTEMPTS (or max_attempts in the AWS profile) is {attempts!r}; "
                           "expected a whole number >= 1 (attempts in all, the first one included)")
    return S3Settings(endpoint, scheme, access_key, secret_key, session_token, region, int(attempts), retry_mode)


def _profile_config() -> dict:
    """The AWS profile's settings (``AWS_PROFILE``, else ``default``, from ``AWS_CONFIG_FILE`` or
    ``~/.aws/config``), as the AWS SDKs read them; empty when there is no such file."""
    env = os.environ
    path = os.path.expanduser(env.get("AWS_CONFIG_FILE") or "~/.aws/config")
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        mtime = None
    # Read once per profile and file version: every storage call resolves its settings.
    return _read_profile_config(env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE"), path, mtime)


@functools.lru_cache(maxsize=8)
def _read_profile_config(profile: str | None, path: str, mtime: int | None) -> dict:
    import botocore.exceptions
    import botocore.session

    try:
        return botocore.session.Session().get_scoped_config()
    except botocore.exceptions.ProfileNotFound as e:
        raise UsageError(f"{e}: AWS_PROFILE (or --profile) names a profile that "
                           f"{os.environ.get('AWS_CONFIG_FILE', '~/.aws/config')} does not have") from e


def resolve_region(settings: S3Settings, bucket: str) -> str:
    """The region to sign requests for ``bucket`` with: the configured one, else the bucket's own."""
    return settings.region or _bucket_region(settings, bucket)


@functools.lru_cache(maxsize=64)
def _bucket_region(settings: S3Settings, bucket: str) -> str:
    # Asked once per bucket and settings (one HEAD request), and said once.
    region = _ask_bucket_region(settings, bucket)
    logger.debug("bucket %s: region %s, as the store reports it (AWS_REGION or --region overrides)", bucket, region)
    return region


def _ask_bucket_region(settings: S3Settings, bucket: str) -> str:
    # Raises OSError; s3_settings names the URI and what to check.
    if not settings.endpoint:
        return pafs.resolve_s3_region(bucket)
    import botocore.config
    import botocore.session
    from botocore.exceptions import BotoCoreError, ClientError

    # Any region signs the question; a server bound to another one still names its own in the
    # x-amz-bucket-region header of its refusal.
    client = botocore.session.get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key,
        aws_session_token=settings.session_token,
        config=botocore.config.Config(retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
                                      connect_timeout=5, s3={"addressing_style": "path"}))
    try:
        try:
            response = client.head_bucket(Bucket=bucket)
        except ClientError as e:
            response = e.response
        region = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
        if region:
            return region
        # No header (SeaweedFS, some MinIO set-ups): GetBucketLocation, where an empty answer is
        # us-east-1 by S3's definition ("buckets in us-east-1 have a LocationConstraint of null").
        return client.get_bucket_location(Bucket=bucket).get("LocationConstraint") or "us-east-1"
    except (BotoCoreError, ClientError) as e:
        raise OSError(str(e)) from e


@functools.lru_cache(maxsize=16)
def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    # Cached because creating an S3 client costs a few ms and every helper call needs one;
    # the key is the full resolved settings, so changing the environment gives a new client.
    retry = pafs.AwsDefaultS3RetryStrategy if settings.retry_mode == "legacy" else pafs.AwsStandardS3RetryStrategy
    kwargs = dict(region=settings.region, scheme=settings.scheme,
                  retry_strategy=retry(max_attempts=settings.max_attempts), connect_timeout=5.0)
    if settings.endpoint:
        kwargs["endpoint_override"] = settings.endpoint
    if settings.access_key:
        kwargs.update(access_key=settings.access_key, secret_key=settings.secret_key,
                      session_token=settings.session_token)
    return pafs.S3FileSystem(**kwargs)


def s3_settings(uri: str, **storage_kw) -> S3Settings:
    """:func:`resolve_s3_settings` with the region of ``uri``'s bucket filled in."""
    settings = resolve_s3_settings(**storage_kw)
    if settings.region:
        return settings
    try:
        region = resolve_region(settings, _bucket(uri))
    except OSError as e:
        raise translate_error(uri, OSError(f"cannot find the bucket's region (set AWS_REGION or --region to "
                                           f"skip asking): {e}"), "reach", _settings=settings) from e
    return dataclasses.replace(settings, region=region)


def get_filesystem(uri: str, *, endpoint: str | None = None, access_key: str | None = None,
                   secret_key: str | None = None, region: str | None = None
                   ) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a URI.

    Local paths and ``file://`` URIs give a ``LocalFileSystem`` and an absolute path;
    ``s3://bucket/prefix`` gives an ``S3FileSystem`` (settings as in the module docstring) and
    ``"bucket/prefix"``. Other schemes raise ``ValueError``.
    """
    uri = os.fspath(uri)
    if is_s3(uri):
        path = uri[len("s3://"):].strip("/")
        if not path:
            raise ValueError(f"S3 URI {uri!r} names no bucket; expected s3://bucket/prefix")
        settings = s3_settings(uri, endpoint=endpoint, access_key=access_key, secret_key=secret_key,
                               region=region)
        return _s3_filesystem(settings), path
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def fsspec_options(uri: str, *, endpoint: str | None = None, access_key: str | None = None,
                   secret_key: str | None = None, region: str | None = None) -> dict:
    """``storage_options`` for fsspec/s3fs (pandas, duckdb...) equivalent to :func:`get_filesystem`.

    Empty for local URIs. The returned dict contains the secret: pass it on, never log it.
    """
    if not is_s3(uri):
        return {}
    s = s3_settings(uri, endpoint=endpoint, access_key=access_key, secret_key=secret_key, region=region)
    options: dict = {"client_kwargs": {"region_name": s.region}}
    if s.endpoint_url:
        options["endpoint_url"] = s.endpoint_url
    if s.access_key:
        options.update(key=s.access_key, secret=s.secret_key)
        if s.session_token:
            options["token"] = s.session_token
    options["config_kwargs"] = {"retries": {"total_max_attempts": s.max_attempts,
                                            "mode": "standard" if s.retry_mode == "adaptive" else s.retry_mode}}
    return options


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (keeps the scheme; local paths use the OS join)."""
    uri = os.fspath(uri)
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest.rstrip("/") or rest, *[p.strip("/") for p in parts])
    return os.path.join(uri, *[p.lstrip("/") for p in parts])


def _to_uri(original: str, path: str) -> str:
    # Give results back in the caller's vocabulary: s3:// stays s3://, local paths stay paths.
    return f"s3://{path}" if is_s3(original) else path


# --- error translation -------------------------------------------------------------------------

_DENIED = ("ACCESS_DENIED", "AccessDenied", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID",
           "InvalidAccessKeyId", "SignatureDoesNotMatch", "HTTP status 403", "Forbidden")
_NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket", "Bucket '", "bucket does not exist")
_UNREACHABLE = ("NETWORK_CONNECTION", "Couldn't connect", "Could not connect", "curlCode", "Connection refused",
                "Could not resolve", "Timeout was reached", "Failed to connect")


def _scrub(message: str, settings: S3Settings | None) -> str:
    if settings and settings.secret_key:
        message = message.replace(settings.secret_key, "***")
    if settings and settings.session_token:
        message = message.replace(settings.session_token, "***")
    return message


def _bucket(uri: str) -> str:
    return uri[len("s3://"):].split("/", 1)[0]


def translate_error(uri: str, error: OSError, action: str, **storage_kw) -> OSError:
    """Turn a low-level pyarrow/OS error into a :class:`StorageError` that names the URI.

    ``action`` is a short verb phrase ("read", "write", "list") used in the message.
    Returns the new exception so callers can ``raise translate_error(...) from error``.
    """
    if isinstance(error, StorageError):
        return error
    if not is_s3(uri):
        if isinstance(error, FileNotFoundError):
            return StorageNotFoundError(f"cannot {action} {uri}: no such file or directory")
        if isinstance(error, PermissionError):
            return StoragePermissionError(f"cannot {action} {uri}: permission denied ({error})")
        return StorageError(f"cannot {action} {uri}: {error}")
    settings = storage_kw.pop("_settings", None)
    try:
        settings = settings or resolve_s3_settings(**storage_kw)
    except StorageError:
        settings = None
    detail = _scrub(str(error), settings)
    where = f"endpoint {settings.endpoint_url}" if settings and settings.endpoint else "AWS S3"
    if any(k in detail for k in _DENIED):
        return StoragePermissionError(
            f"cannot {action} {uri}: access denied by {where} — the credentials are wrong or lack "
            f"permission on bucket '{_bucket(uri)}'. {_S3_SETTINGS_HINT} (detail: {detail})")
    if any(k in detail for k in _NO_BUCKET):
        return BucketNotFoundError(
            f"cannot {action} {uri}: bucket '{_bucket(uri)}' does not exist at {where}. Create it "
            f"first or fix the URI. {_S3_SETTINGS_HINT}")
    if any(k in detail for k in _UNREACHABLE):
        return StorageError(f"cannot {action} {uri}: cannot reach {where}. {_S3_SETTINGS_HINT} "
                            f"(detail: {detail})")
    if isinstance(error, FileNotFoundError):
        return StorageNotFoundError(f"cannot {action} {uri}: no such object or prefix at {where}")
    return StorageError(f"cannot {action} {uri} at {where}: {detail}. {_S3_SETTINGS_HINT}")


@contextlib.contextmanager
def errors(uri: str, action: str, **storage_kw) -> Iterator[None]:
    """Context manager: any ``OSError`` inside becomes a :class:`StorageError` naming ``uri``.

    Use it around direct pyarrow calls, e.g. ``with storage.errors(out, "write shard"):
    pq.write_table(table, path, filesystem=fs)``.
    """
    try:
        yield
    except OSError as e:
        raise translate_error(uri, e, action, **storage_kw) from e


def _raise_if_bucket_missing(fs: pafs.FileSystem, uri: str, action: str, **storage_kw) -> None:
    # S3 reports a missing key and a missing bucket the same way ("path does not exist");
    # telling them apart saves users from hunting for a typo in the key when the bucket is wrong.
    if not is_s3(uri):
        return
    bucket = _bucket(uri)
    with errors(uri, action, **storage_kw):
        info = fs.get_file_info(bucket)
    if info.type == pafs.FileType.NotFound:
        raise translate_error(uri, OSError(f"NoSuchBucket: Bucket '{bucket}'"), action, **storage_kw)


# --- transient failures --------------------------------------------------------------------------

# Attempts per read, as the S3 client's retry strategy; waits of 0.2 s, 0.4 s, ... The S3 client
# retries a failed request, but not a body that breaks off after a good status line (a reset in the
# middle of a GET): reads are retried here, from the same byte.
READ_ATTEMPTS = 3
RETRY_DELAY_S = 0.2

# Failures that another attempt cannot fix: no such object, no permission, a folder.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_PERMANENT_TEXT = ("ACCESS_DENIED", "AccessDenied", "NO_SUCH_KEY", "NoSuchKey", "NO_SUCH_BUCKET", "NoSuchBucket",
                   "HTTP status 403", "HTTP status 404", "Forbidden", "Path does not exist")
_PERMANENT_ERRNO = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG)


def is_transient(error: BaseException) -> bool:
    """Whether a failed read is worth another attempt: an ``OSError`` from the store or the network
    (reset, timeout, 5xx, EIO), not a missing or forbidden file. Bad data (a corrupt archive, an
    image that does not decode) is never retried: it is not an ``OSError`` from the file system."""
    if not isinstance(error, OSError) or isinstance(error, _PERMANENT) or error.errno in _PERMANENT_ERRNO:
        return False
    return not any(text in str(error) for text in _PERMANENT_TEXT)


def retry_wait(attempt: int) -> None:
    """Sleep before attempt ``attempt + 1``: exponential, with jitter."""
    time.sleep(RETRY_DELAY_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))


def retrying(op):
    """``op()``, repeated up to :data:`READ_ATTEMPTS` times while it fails transiently."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return op()
        except OSError as e:
            if attempt == READ_ATTEMPTS or not is_transient(e):
                raise
            retry_wait(attempt)
    raise AssertionError("unreachable")


# --- helpers -----------------------------------------------------------------------------------

def exists(uri: str, **storage_kw) -> bool:
    """True if a file or directory (S3: object or non-empty prefix) exists at ``uri``."""
    fs, path = get_filesystem(uri, **storage_kw)
    with errors(uri, "check", **storage_kw):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


Located = tuple[pafs.FileSystem, str]  # a file system and a path on it (get_filesystem's result)


def read_bytes(uri: str, *, at: Located | None = None, **storage_kw) -> bytes:
    """Whole content of the file at ``uri``; a transient failure is retried (:func:`retrying`).

    ``at``: the ``(file system, path)`` that ``uri`` names, for a caller that already holds them
    (a Ray task given the output's pickled file system, whose settings its process's environment
    may lack); ``uri`` then only names the file in errors.
    """
    fs, path = at or get_filesystem(uri, **storage_kw)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return retrying(read)
    except FileNotFoundError as e:
        _raise_if_bucket_missing(fs, uri, "read", **storage_kw)
        raise translate_error(uri, e, "read", **storage_kw) from e
    except OSError as e:
        raise translate_error(uri, e, "read", **storage_kw) from e


def write_bytes(uri: str, data: bytes, *, at: Located | None = None, **storage_kw) -> None:
    """Write ``data`` to ``uri``, replacing any existing file; a transient failure is written again.

    Local writes go to a temporary file that is renamed into place, so readers never see half a
    file and an interrupted run leaves no partial output; S3 uploads are atomic by nature.
    Parent directories are created locally; on S3 the bucket must exist (checked first, unless the
    caller passes ``at`` as in :func:`read_bytes`: then it has checked its bucket once already).
    """
    fs, path = at or get_filesystem(uri, **storage_kw)
    if isinstance(fs, pafs.LocalFileSystem):
        parent = os.path.dirname(path)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(parent, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise translate_error(uri, e, "write") from e
        return
    if at is None:
        _raise_if_bucket_missing(fs, uri, "write", **storage_kw)

    def write() -> None:  # a whole object, so a transient failure is simply written again
        with fs.open_output_stream(path) as f:
            f.write(data)

    with errors(uri, "write", **storage_kw):
        retrying(write)


def makedirs(uri: str, **storage_kw) -> None:
    """Create a directory and its parents locally; on S3 only check that the bucket exists
    (prefixes need no creating)."""
    fs, path = get_filesystem(uri, **storage_kw)
    if is_s3(uri):
        _raise_if_bucket_missing(fs, uri, "create", **storage_kw)
        return
    with errors(uri, "create directory"):
        fs.create_dir(path, recursive=True)


def delete(uri: str, *, missing_ok: bool = False, at: Located | None = None, **storage_kw) -> None:
    """Delete one file (not a directory); a transient failure is tried again. A file that is gone
    is an error unless ``missing_ok``, except on a second attempt: then the first attempt's request
    did delete it before its answer was lost. ``at`` as in :func:`read_bytes`."""
    fs, path = at or get_filesystem(uri, **storage_kw)
    attempts = 0

    def attempt() -> None:
        nonlocal attempts
        attempts += 1
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            if attempts == 1:
                raise

    try:
        retrying(attempt)
    except FileNotFoundError as e:
        if not missing_ok:
            raise translate_error(uri, e, "delete", **storage_kw) from e
    except OSError as e:
        raise translate_error(uri, e, "delete", **storage_kw) from e


S3_LIST_PAGE = 1000  # keys per ListObjectsV2 request (S3's maximum)


def iter_files(uri: str, suffixes: str | Iterable[str] | None = None, **storage_kw) -> Iterator[str]:
    """Yield the URIs of all files below ``uri`` (recursive), optionally only those ending in one
    of ``suffixes`` (case-sensitive, e.g. ``(".parquet",)``).

    Streams: on S3 one page of :data:`S3_LIST_PAGE` keys at a time (``ListObjectsV2`` through
    botocore's paginator, no delimiter), locally one directory's names at a time, so a prefix with
    millions of objects is never held in memory. Order: the store's listing order on S3 (full
    keys in byte order on AWS; some S3-compatible servers list folder by folder), full paths in
    lexicographic order locally. Locally, links to files are listed like files and links to
    folders are not followed (logged once), so a link loop or a link to ``/`` cannot run away
    and a linked folder is not listed a second time. Hidden temporaries written by :func:`write_bytes`
    (``.name.tmp-*``) and S3 folder markers are skipped. A missing directory or prefix raises
    :class:`StorageNotFoundError`.
    """
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    suffixes = tuple(suffixes) if suffixes is not None else None
    fs, root = get_filesystem(uri, **storage_kw)
    with errors(uri, "list", **storage_kw):
        info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        _raise_if_bucket_missing(fs, uri, "list", **storage_kw)
        raise StorageNotFoundError(f"cannot list {uri}: no such directory or prefix")
    if info.type == pafs.FileType.File:
        raise StorageError(f"cannot list {uri}: it is a file, expected a directory or prefix")
    paths = _iter_s3_keys(uri, root, storage_kw) if is_s3(uri) else _walk_local(uri, root)
    for path in paths:
        name = posixpath.basename(path)
        if name.startswith(".") and ".tmp-" in name:
            continue
        if suffixes is None or path.endswith(suffixes):
            yield _to_uri(uri, path)


@functools.lru_cache(maxsize=16)
def _s3_client(settings: S3Settings):
    # pyarrow's S3 filesystem can only list a prefix whole; botocore pages through it.
    import botocore.config
    import botocore.session

    mode = "standard" if settings.retry_mode == "adaptive" else settings.retry_mode
    config = botocore.config.Config(retries={"total_max_attempts": settings.max_attempts, "mode": mode},
                                    connect_timeout=5,
                                    s3={"addressing_style": "path"} if settings.endpoint else None)
    return botocore.session.get_session().create_client(
        "s3", region_name=settings.region, endpoint_url=settings.endpoint_url if settings.endpoint else None,
        aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key,
        aws_session_token=settings.session_token, config=config)


def _iter_s3_keys(uri: str, root: str, storage_kw: dict) -> Iterator[str]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = root.partition("/")
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    pages = _s3_client(s3_settings(uri, **storage_kw)).get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": S3_LIST_PAGE})
    try:
        for page in pages:
            for obj in page.get("Contents", ()):
                if not obj["Key"].endswith("/"):
                    yield f"{bucket}/{obj['Key']}"
    except (BotoCoreError, ClientError) as e:
        raise translate_error(uri, OSError(str(e)), "list", **storage_kw) from e


def _walk_local(uri: str, directory: str, skipped: list[str] | None = None) -> Iterator[str]:
    # Links to folders are not followed: a link loop would never end, a link to / would walk the
    # host, and a linked folder would list its files twice. Links to files are files.
    top = skipped is None
    skipped = [] if top else skipped
    # Names sorted with a "/" after each folder's name give full paths in lexicographic order.
    with errors(uri, "list"):
        with os.scandir(directory) as entries:
            names = []
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    names.append(e.name + "/")
                elif e.is_symlink() and e.is_dir():
                    skipped.append(posixpath.join(directory, e.name))
                else:
                    names.append(e.name)
            names.sort()
    for name in names:
        path = posixpath.join(directory, name.rstrip("/"))
        if name.endswith("/"):
            yield from _walk_local(uri, path, skipped)
        else:
            yield path
    if top and skipped:
        logger.info("listing %s: did not follow %d link(s) to folders (links to folders are never "
                    "followed), e.g. %s", uri, len(skipped), skipped[0])
