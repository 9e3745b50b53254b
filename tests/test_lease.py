"""The lease on an inference output (unet.inference.lease): one run writes an output at a time.

The lease is taken with create-only writes, locally (``O_EXCL``) and on the S3 test server
(conditional ``PUT``, ``If-None-Match: *``: SeaweedFS and moto's server both answer 412 when the
key exists). The slow test starts two ``jobs.infer`` runs on one output with a file arriving
between their plans: the second refuses in one line, or waits with ``--wait-for-lease``, and the
output holds every input exactly once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from PIL import Image

from unet import storage
from unet.inference.lease import LEASE_NAME, LeaseHeld, OutputLease, create_only


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_env")
    return f"{bucket}/masks"


def _stale_lease(output: str, run_id: str = "dead-run", age_s: float = 3600.0) -> None:
    """The lease a killed run leaves behind: never renewed again."""
    storage.makedirs(output)
    then = time.time() - age_s
    assert create_only(storage.join(output, LEASE_NAME), json.dumps(
        {"run_id": run_id, "host": "elsewhere", "pid": 1, "started": then, "renewed": then, "ttl_s": 60}).encode())


def test_create_only_refuses_an_existing_object(output):
    storage.makedirs(output)
    uri = storage.join(output, "x.json")
    assert create_only(uri, b"first")
    assert not create_only(uri, b"second")
    assert storage.read_bytes(uri) == b"first"


def test_a_held_lease_is_refused_naming_the_holder_and_its_age_then_freed_on_release(output):
    storage.makedirs(output)
    first = OutputLease(output, "run-a")
    first.acquire()
    try:
        with pytest.raises(LeaseHeld) as info:
            OutputLease(output, "run-b").acquire()
        message = str(info.value)
        assert message.startswith(f"{output} is being written by run run-a (host ")
        assert "started 0 s ago" in message and "--wait-for-lease" in message and "\n" not in message
    finally:
        first.release()
    assert not storage.exists(storage.join(output, LEASE_NAME))
    with OutputLease(output, "run-b"):
        pass


def test_a_lease_renewed_by_its_run_stays_held_past_its_ttl(tmp_path):
    output = str(tmp_path / "out")
    storage.makedirs(output)
    with OutputLease(output, "run-a", ttl_s=0.5):
        time.sleep(1.2)  # more than twice the ttl: only the renewals keep it
        with pytest.raises(LeaseHeld):
            OutputLease(output, "run-b", ttl_s=0.5).acquire()


def test_an_expired_lease_is_taken_over_by_exactly_one_of_many_runs(output, caplog):
    _stale_lease(output)
    leases = [OutputLease(output, f"run-{i}") for i in range(6)]
    results: dict[int, object] = {}
    start = threading.Barrier(len(leases))

    def contend(i: int) -> None:
        start.wait()
        results[i] = leases[i].try_acquire()

    with caplog.at_level(logging.WARNING, logger="unet.inference"):
        threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(leases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    winners = [i for i, holder in results.items() if holder is None]
    assert len(winners) == 1, results
    holder = json.loads(storage.read_bytes(storage.join(output, LEASE_NAME)))
    assert holder["run_id"] == f"run-{winners[0]}"
    assert "taking over the expired lease" in caplog.text and "run dead-run" in caplog.text


def test_a_run_whose_lease_was_taken_over_notices_and_leaves_the_new_holder_alone(tmp_path, caplog):
    output = str(tmp_path / "out")
    storage.makedirs(output)
    lease = OutputLease(output, "slow-run")
    lease.acquire()
    storage.delete(storage.join(output, LEASE_NAME))  # as a takeover after missed renewals does
    _stale_lease(output, run_id="new-holder", age_s=0)
    with caplog.at_level(logging.ERROR, logger="unet.inference"):
        lease.renew()
    assert lease.lost and "lost the lease" in caplog.text and "run new-holder" in caplog.text
    lease.release()
    assert json.loads(storage.read_bytes(storage.join(output, LEASE_NAME)))["run_id"] == "new-holder"


def test_a_waiting_run_gets_the_lease_when_the_holder_releases_it(tmp_path, monkeypatch):
    monkeypatch.setattr("unet.inference.lease.WAIT_POLL_S", 0.1)
    output = str(tmp_path / "out")
    storage.makedirs(output)
    first = OutputLease(output, "run-a")
    first.acquire()
    waiter = OutputLease(output, "run-b", wait=True)
    thread = threading.Thread(target=waiter.acquire)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # still waiting
    first.release()
    thread.join(10)
    assert not thread.is_alive()
    assert json.loads(storage.read_bytes(storage.join(output, LEASE_NAME)))["run_id"] == "run-b"
    waiter.release()


# --- two jobs.infer runs on one output --------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    from unet.runtime import local_ray_options

    ray.init(**local_ray_options(2), log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from unet.artifact import save_artifact
    from unet.models import build_model

    return save_artifact(build_model("unet", channels=(4, 8)), tmp_path_factory.mktemp("model") / "tiny",
                         architecture="unet", model_kwargs={"channels": [4, 8]}, input_size=(32, 32),
                         normalization={"mean": 0.5, "std": 0.25}, threshold=0.5)


def _write_images(root: Path, names: list[str], seed: int) -> None:
    from unet.phantoms import generate

    root.mkdir(parents=True, exist_ok=True)
    for name, p in zip(names, generate(len(names), seed=seed, size=(32, 32))):
        Image.fromarray(p.image).save(root / name)


def _image_ids(output: str) -> list[str]:
    fs, path = storage.get_filesystem(output)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image_id"]).column(0).to_pylist()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_on_one_output_second_refuses_or_waits_and_every_input_lands_once(
        where, ray_local, model_dir, tmp_path, monkeypatch, capsys, request):
    import unet.inference.run as run_module
    from jobs.infer import main
    from unet.cli import run_main

    monkeypatch.setattr("unet.inference.lease.WAIT_POLL_S", 0.2)
    root = tmp_path / "in"
    _write_images(root, [f"a{i}.png" for i in range(4)], seed=1)
    output = str(tmp_path / "out") if where == "local" else f"{request.getfixturevalue('s3_env')}/masks"
    argv = ["--model", model_dir, "--input", str(root), "--output", output, "--incremental",
            "--chunk-size", "2", "--batch-size", "4"]

    # The first run stops after its plan until the test lets it go on.
    planned, go_on = threading.Event(), threading.Event()
    real_plan = run_module.plan_inputs

    def plan_then_pause(*args, **kwargs):
        result = real_plan(*args, **kwargs)
        if threading.current_thread().name == "first-run":
            planned.set()
            go_on.wait(120)
        return result

    monkeypatch.setattr(run_module, "plan_inputs", plan_then_pause)
    codes: dict[str, int] = {}
    first = threading.Thread(name="first-run", target=lambda: codes.update(first=main(argv)))
    first.start()
    try:
        assert planned.wait(120), "the first run never planned"
        _write_images(root, ["late.png"], seed=2)  # arrives between the two runs' plans

        # The same scheduled command again: refused in one line naming the holder and its age.
        assert run_main(main, argv, prog="python -m jobs.infer") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"python -m jobs.infer: error: {output} is being written by run ") and "\n" not in err
        assert "started" in err and "ago" in err

        # With --wait-for-lease it waits for the first run, then does what is left: the late file.
        second = threading.Thread(name="second-run",
                                  target=lambda: codes.update(second=main(argv + ["--wait-for-lease"])))
        second.start()
        time.sleep(1.0)
        assert second.is_alive()
    finally:
        go_on.set()
        first.join(300)
    second.join(300)
    assert codes == {"first": 0, "second": 0}
    ids = _image_ids(output)
    assert sorted(ids) == sorted([f"a{i}.png" for i in range(4)] + ["late.png"]), ids  # each exactly once
    assert not storage.exists(storage.join(output, LEASE_NAME))
    assert not storage.exists(storage.join(output, "_tmp"))
    records = [json.loads(storage.read_bytes(u)) for u in storage.iter_files(storage.join(output, "_runs"))]
    assert sorted(r["summary"]["units_planned"] for r in records) == [1, 4]
