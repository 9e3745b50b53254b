"""unet.storage against local disk and a real S3-protocol server (tests/conftest.py)."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from unet import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A writable root URI on local disk, then on the test S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_env") + "/prefix"


def test_write_read_exists_roundtrip(root):
    uri = storage.join(root, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00payload")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"\x00payload"
    storage.write_bytes(uri, b"replaced")  # overwrite is allowed and complete
    assert storage.read_bytes(uri) == b"replaced"
    storage.delete(uri)
    assert not storage.exists(uri)


def test_iter_files_recursive_sorted_and_filtered(root):
    names = ["z.parquet", "a.parquet", "notes.txt", "train/part-00001.parquet",
             "train/part-00000.parquet", "val/sub/part-00000.parquet"]
    for name in names:
        storage.write_bytes(storage.join(root, name), name.encode())
    got = list(storage.iter_files(root, suffixes=".parquet"))
    # Full paths in lexicographic order (S3's key order).
    expected = ["a.parquet", "train/part-00000.parquet", "train/part-00001.parquet",
                "val/sub/part-00000.parquet", "z.parquet"]
    assert got == [storage.join(root, n) for n in expected]
    assert len(list(storage.iter_files(root))) == len(names)
    # URIs come back in the caller's scheme and can be read directly.
    assert storage.read_bytes(got[0]) == b"a.parquet"


def test_local_order_is_s3_key_order_also_where_names_share_a_prefix(tmp_path):
    # (S3 servers differ here: AWS lists keys in byte order, SeaweedFS folder by folder.)
    names = ["a.png", "a/b.png", "a-b.png", "a0.png", "ab/c.png", "b.png"]
    for name in names:
        storage.write_bytes(storage.join(str(tmp_path), name), b"x")
    assert list(storage.iter_files(str(tmp_path))) == [storage.join(str(tmp_path), n) for n in sorted(names)]


def test_s3_listing_streams_page_by_page(s3_env, monkeypatch):
    """With 10 keys per page, a key written after the first page was consumed still appears:
    the listing is fetched as it is consumed, never whole up front."""
    monkeypatch.setattr(storage, "S3_LIST_PAGE", 10)
    root = s3_env + "/many"
    names = [f"img_{i:03d}.png" for i in range(35)] + ["sub/x.png", "sub/y.txt"]
    for name in names:
        storage.write_bytes(storage.join(root, name), b"x")
    listing = storage.iter_files(root, suffixes=".png")
    first = next(listing)
    storage.write_bytes(storage.join(root, "zz_late.png"), b"x")
    got = [first, *listing]
    expected = sorted(n for n in names if n.endswith(".png")) + ["zz_late.png"]
    assert got == [storage.join(root, n) for n in expected]


def test_iter_files_missing_directory_raises(root):
    with pytest.raises(FileNotFoundError, match="cannot list"):
        list(storage.iter_files(storage.join(root, "nope")))


def test_read_missing_file_names_uri(root):
    uri = storage.join(root, "missing.bin")
    with pytest.raises(storage.StorageNotFoundError) as info:
        storage.read_bytes(uri)
    assert uri in str(info.value)


def test_whole_object_helpers_use_a_file_system_the_caller_holds(s3_server, tmp_path, monkeypatch):
    """``at=(fs, path)``: a Ray task holding the output's pickled file system reads, writes and
    deletes with it, even where its own environment has no AWS_* settings; errors name the URI."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    uri = s3_server.create_bucket("held-fs") + "/dir/x.bin"
    at = (s3_server.filesystem(), uri[len("s3://"):])
    local_uri = str(tmp_path / "d" / "x.bin")
    for uri, at in ((uri, at), (local_uri, (pafs.LocalFileSystem(), local_uri))):
        storage.write_bytes(uri, b"payload", at=at)
        assert storage.read_bytes(uri, at=at) == b"payload"
        storage.delete(uri, at=at)
        storage.delete(uri, missing_ok=True, at=at)  # gone already: no error with missing_ok
        for op in (lambda: storage.read_bytes(uri, at=at), lambda: storage.delete(uri, at=at)):
            with pytest.raises(storage.StorageNotFoundError, match=uri.replace(".", r"\.")):
                op()


def test_a_delete_whose_answer_was_lost_is_not_an_error_on_its_retry(tmp_path, monkeypatch):
    """The store deletes the file, then the connection breaks before the answer: the retry finds
    no file, which means done, not "no such file"."""
    monkeypatch.setattr(storage, "RETRY_DELAY_S", 0.0)
    local = pafs.LocalFileSystem()

    class AnswerLost:  # a real local delete whose reply is lost once
        calls = 0

        def delete_file(self, path):
            self.calls += 1
            local.delete_file(path)  # raises FileNotFoundError once the file is gone
            if self.calls == 1:
                raise OSError("connection reset by peer")

    path = tmp_path / "x.bin"
    path.write_bytes(b"x")
    fs = AnswerLost()
    storage.delete(str(path), at=(fs, str(path)))
    assert fs.calls == 2 and not path.exists()
    with pytest.raises(storage.StorageNotFoundError):  # gone before the first attempt: an error
        storage.delete(str(path), at=(AnswerLost(), str(path)))


def test_get_filesystem_local_and_file_scheme(tmp_path):
    fs, path = storage.get_filesystem(f"file://{tmp_path}/x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/x"
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        storage.get_filesystem("gs://bucket/x")


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    s = storage.resolve_s3_settings()
    assert (s.endpoint, s.scheme, s.region) == ("127.0.0.1:9", "http", "eu-west-1")
    assert "very-secret" not in repr(s)
    # Explicit arguments win over the environment.
    s = storage.resolve_s3_settings(endpoint="https://minio.example:443", region="us-west-2")
    assert (s.endpoint, s.scheme, s.region) == ("minio.example:443", "https", "us-west-2")
    opts = storage.fsspec_options("s3://b/k")
    assert opts["endpoint_url"] == "http://127.0.0.1:9" and opts["key"] == "AK"


def test_incomplete_credentials_rejected(monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(storage.StorageError, match="incomplete"):
        storage.get_filesystem("s3://b/k", access_key="AK")


def test_wrong_credentials_give_clear_error(s3_env, s3_server, monkeypatch):
    if not s3_server.enforces_credentials:
        pytest.skip("fallback server (moto) accepts any credentials")
    uri = s3_env + "/data/x.bin"
    storage.write_bytes(uri, b"ok")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    for action in (lambda: storage.read_bytes(uri), lambda: storage.write_bytes(uri, b"no"),
                   lambda: list(storage.iter_files(s3_env)), lambda: storage.exists(uri)):
        with pytest.raises(storage.StoragePermissionError) as info:
            action()
        message = str(info.value)
        assert s3_env in message and "AWS_SECRET_ACCESS_KEY" in message
        assert "definitely-wrong-secret" not in message
    # Explicit (correct) arguments override the broken environment.
    assert storage.read_bytes(uri, access_key=s3_server.access_key,
                              secret_key=s3_server.secret_key) == b"ok"


def test_missing_bucket_gives_clear_error(s3_env):
    uri = "s3://no-such-bucket-4f1c/data/x.bin"
    for action in (lambda: storage.read_bytes(uri), lambda: storage.write_bytes(uri, b"x"),
                   lambda: list(storage.iter_files("s3://no-such-bucket-4f1c/data"))):
        with pytest.raises(storage.StorageNotFoundError) as info:
            action()
        assert "bucket 'no-such-bucket-4f1c' does not exist" in str(info.value)
        assert "AWS_ENDPOINT_URL" in str(info.value)


def test_unreachable_endpoint_gives_clear_error(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    with pytest.raises(storage.StorageError) as info:
        storage.read_bytes("s3://bucket/x", endpoint="http://127.0.0.1:9")
    assert "s3://bucket/x" in str(info.value) and "AWS_ENDPOINT_URL" in str(info.value)


# --- region and retries (issue 13) ---------------------------------------------------------------

@pytest.fixture
def no_aws_config(monkeypatch, tmp_path):
    """No region, retry setting or profile anywhere: environment cleared, AWS config files absent."""
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_MAX_ATTEMPTS",
                "AWS_RETRY_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


@pytest.fixture(scope="module")
def moto_server():
    """moto's S3 server: unlike SeaweedFS it keeps a bucket's region and reports it."""
    from unet.testing.s3server import running_s3_server

    with running_s3_server("moto") as server:
        yield server


def test_region_is_what_the_bucket_says_when_none_is_set(moto_server, no_aws_config, monkeypatch):
    moto_server.filesystem(region="eu-central-1", allow_bucket_creation=True).create_dir("in-frankfurt")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.secret_key)
    assert storage.resolve_s3_settings().region is None  # nothing configured: nothing made up
    fs, _ = storage.get_filesystem("s3://in-frankfurt/x")
    assert fs.region == "eu-central-1"
    assert storage.fsspec_options("s3://in-frankfurt/x")["client_kwargs"]["region_name"] == "eu-central-1"
    storage.write_bytes("s3://in-frankfurt/a/x.bin", b"ok")
    assert storage.read_bytes("s3://in-frankfurt/a/x.bin") == b"ok"
    assert list(storage.iter_files("s3://in-frankfurt/a")) == ["s3://in-frankfurt/a/x.bin"]
    # An explicit region wins over what the bucket says.
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert storage.get_filesystem("s3://in-frankfurt/x")[0].region == "ap-south-1"


def test_region_from_the_test_server_and_from_aws_region(s3_env, no_aws_config, monkeypatch):
    # SeaweedFS sends no region header and an empty LocationConstraint, which S3 defines as us-east-1.
    fs, _ = storage.get_filesystem(s3_env + "/x")
    assert fs.region == "us-east-1"
    storage.write_bytes(s3_env + "/x.bin", b"ok")
    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    assert storage.get_filesystem(s3_env + "/x")[0].region == "eu-north-1"
    assert storage.read_bytes(s3_env + "/x.bin") == b"ok"


def test_region_of_a_missing_bucket_is_a_clear_error(s3_env, no_aws_config):
    with pytest.raises(storage.BucketNotFoundError, match="bucket 'no-such-bucket-9a7e' does not exist"):
        storage.read_bytes("s3://no-such-bucket-9a7e/x")


def test_region_and_retries_from_the_profile(no_aws_config, monkeypatch, tmp_path):
    config = tmp_path / "config"
    config.write_text("[profile lab]\nregion = ap-southeast-2\nmax_attempts = 6\nretry_mode = legacy\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    s = storage.resolve_s3_settings()
    assert (s.region, s.max_attempts, s.retry_mode) == ("ap-southeast-2", 6, "legacy")
    monkeypatch.setenv("AWS_PROFILE", "nope")
    with pytest.raises(ValueError, match="nope"):
        storage.resolve_s3_settings()


def test_retries_from_aws_max_attempts_and_retry_mode(no_aws_config, monkeypatch):
    assert (storage.resolve_s3_settings().max_attempts, storage.resolve_s3_settings().retry_mode) == (3, "standard")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "9")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    s = storage.resolve_s3_settings(endpoint="http://127.0.0.1:9", region="eu-west-1")
    assert (s.max_attempts, s.retry_mode) == (9, "adaptive")
    retries = storage._s3_client(s).meta.config.retries
    assert retries["total_max_attempts"] == 9 and retries["mode"] == "standard"
    options = storage.fsspec_options("s3://b/k", endpoint="http://127.0.0.1:9", region="eu-west-1")
    assert options["config_kwargs"]["retries"] == {"total_max_attempts": 9, "mode": "standard"}
    for var, bad in (("AWS_MAX_ATTEMPTS", "many"), ("AWS_MAX_ATTEMPTS", "0"), ("AWS_RETRY_MODE", "eager")):
        monkeypatch.setenv(var, bad)
        with pytest.raises(ValueError, match=var):
            storage.resolve_s3_settings()
        monkeypatch.delenv(var)


def test_one_attempt_gives_up_sooner_than_five(no_aws_config, monkeypatch):
    """AWS_MAX_ATTEMPTS reaches the client that does the work: on a closed port the standard mode
    backs off between attempts, so five attempts take measurably longer than one."""
    import time

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    took = {}
    for attempts in ("1", "5"):
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", attempts)
        t0 = time.monotonic()
        with pytest.raises(storage.StorageError):
            storage.read_bytes("s3://bucket/x", endpoint="http://127.0.0.1:9", region="eu-west-1")
        took[attempts] = time.monotonic() - t0
    assert took["5"] > took["1"] + 0.5, took
