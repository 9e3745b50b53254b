"""Cross-validation over train+val: fold splits, the fold ensemble, out-of-fold calibration.

The split names are owned by ``unet.shards`` and read the same way by all three readers (Ray Data,
the plain iterator, evaluation); ``jobs.train --folds K`` trains the folds on a real local Ray and
writes their ensemble; ``jobs.calibrate --split oof`` scores each member on its own held-out fold.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from unet.phantoms import write_busi_layout
from unet.prepare import PrepareConfig, prepare
from unet.shards import assign_folds, fold_split, parse_split, split_ids, split_shards

SIZE = (48, 48)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """BUSI-layout phantoms with planted near-duplicates (groups of 2+), prepared into train/val/test."""
    base = tmp_path_factory.mktemp("folds_src")
    write_busi_layout(base, 40, seed=1, size=SIZE, duplicates=6)
    out = tmp_path_factory.mktemp("folds") / "prepared"
    prepare(PrepareConfig(source="busi", input=str(base), out=str(out), shard_size=8), command="test")
    return str(out)


def _rows(uri: str, split: str) -> list[tuple[str, str, str]]:
    """(id, class, group) of every row of a split, through the evaluation reader plus the group column."""
    import pyarrow.parquet as pq

    shards, groups = split_shards(uri, split)
    out = []
    for shard in shards:
        table = pq.read_table(shard, columns=["id", "class", "group"])
        out += [r for r in zip(*(table.column(c).to_pylist() for c in ("id", "class", "group")), strict=True)
                if groups is None or r[2] in groups]
    return out


# --------------------------------------------------------------------------------------------
# Units: names and assignment
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, parsed", [("val", ("val", None, None)), ("test", ("test", None, None)),
                                          ("val@fold2of5", ("val", 2, 5)), ("train@fold0of2", ("train", 0, 2))])
def test_split_names_parse(name, parsed):
    assert parse_split(name) == parsed


@pytest.mark.parametrize("name", ["tests", "test@fold0of5", "val@fold5of5", "val@fold0of1", "val@fold-1of5", "oof"])
def test_bad_split_names_are_refused(name):
    with pytest.raises(ValueError, match="split="):
        parse_split(name)


def test_folds_are_stratified_balanced_and_keep_groups_whole():
    # 60 groups: sizes 1-3, three classes in BUSI's rough mix; one mixed group (majority class wins).
    rows = []
    for i in range(60):
        cls = ("benign", "benign", "malignant", "normal")[i % 4]
        rows += [(f"g{i}", cls)] * (1 + i % 3)
    rows += [("mixed", "normal"), ("mixed", "benign"), ("mixed", "benign")]
    folds = assign_folds(rows, 5)
    assert set(folds.values()) == set(range(5))
    assert assign_folds(list(reversed(rows)), 5) == folds  # a function of the rows, not their order
    per_fold = Counter()
    for group, cls in rows:
        per_fold[folds[group], cls] += 1
    for cls in ("benign", "malignant", "normal"):
        counts = [per_fold[f, cls] for f in range(5)]
        assert max(counts) - min(counts) <= 3, (cls, counts)  # within one largest group
    # The mixed group is dealt as benign (its majority); a fold that gets it gets one normal image too.
    assert per_fold[folds["mixed"], "normal"] >= 1


# --------------------------------------------------------------------------------------------
# The readers on prepared data
# --------------------------------------------------------------------------------------------

def test_folds_partition_train_and_val_and_never_touch_test(prepared):
    pool = _rows(prepared, "train") + _rows(prepared, "val")
    test_ids = {r[0] for r in _rows(prepared, "test")}
    assert len({r[2] for r in pool}) < len(pool), "the data must hold near-duplicate groups for this test"
    seen = Counter()
    for k in range(3):
        held_out, rest = _rows(prepared, fold_split("val", k, 3)), _rows(prepared, fold_split("train", k, 3))
        assert sorted(held_out + rest) == sorted(pool)  # together, exactly train+val
        assert not {r[2] for r in held_out} & {r[2] for r in rest}  # near-duplicates never straddle
        assert {r[1] for r in held_out} == {"benign", "malignant", "normal"}
        seen.update(r[0] for r in held_out)
    assert seen == Counter(r[0] for r in pool)  # every train+val image held out exactly once
    assert not set(seen) & test_ids


def test_every_reader_reads_the_same_fold(prepared, ray_local):
    from unet.data import iter_batches, read_split
    from unet.evaluation import read_split as read_samples

    split = "val@fold1of3"
    want = sorted(r[0] for r in _rows(prepared, split))
    assert sorted(s.id for s in read_samples(prepared, split)) == want
    assert sorted(i for b in iter_batches(prepared, split, size=(32, 32), batch_size=4) for i in b["id"]) == want
    ds = read_split(prepared, split, size=(32, 32), batch_size=4)
    assert sorted(ds.to_pandas()["id"]) == want


# --------------------------------------------------------------------------------------------
# Config and jobs
# --------------------------------------------------------------------------------------------

def test_a_fold_run_is_named_and_reads_its_fold():
    from unet.training import TrainConfig

    cfg = TrainConfig(data="d", name="cv", folds=5)
    one = cfg.for_fold(2)
    assert (one.name, one.split("train"), one.split("val")) == ("cv-fold2", "train@fold2of5", "val@fold2of5")
    assert one.resolved().name == "cv-fold2"  # idempotent
    assert TrainConfig(data="d").resolved().split("val") == "val"
    with pytest.raises(ValueError, match="fold=5 needs folds"):
        TrainConfig(fold=5, folds=5).resolved()
    with pytest.raises(ValueError, match="fold=1 needs folds"):
        TrainConfig(fold=1).resolved()


def test_bad_split_flags_are_one_line_usage_errors(prepared, capsys):
    from jobs import calibrate as calibrate_job
    from jobs import evaluate as evaluate_job
    from unet.cli import run_main

    assert run_main(evaluate_job.main, ["--model", "busi-unet", "--data", prepared, "--split", "val@fold3of3",
                                        "--out", "/tmp/unused"]) == 2
    assert "val@fold3of3" in capsys.readouterr().err
    # oof needs a cross-validation ensemble: busi-unet is a single model.
    assert run_main(calibrate_job.main, ["--model", "busi-unet", "--data", prepared, "--split", "oof",
                                         "--out", "/tmp/unused-cal"]) == 2
    err = capsys.readouterr().err
    assert "cross-validation ensemble" in err and "Traceback" not in err


def test_train_folds_then_calibrate_out_of_fold(prepared, tmp_path, capsys):
    """jobs.train --folds 2 on a real local Ray: two fold runs and their ensemble; jobs.calibrate
    --split oof then predicts every train+val image once, each by the member that never trained on it."""
    import ray

    from jobs import calibrate as calibrate_job
    from jobs import train as train_job
    from unet.artifact import load_artifact
    from unet.calibration import fold_members, predict_out_of_fold, predict_split
    from unet.cli import run_main
    from unet.runtime import UsageError

    if ray.is_initialized():
        ray.shutdown()
    runs = tmp_path / "runs"
    code = run_main(train_job.main, ["--smoke-test", "--data", prepared, "--storage", str(runs), "--name", "cv",
                                     "--folds", "2", "--model-kwargs", "{image_classes: 3}", "--num-cpus", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "fold 0: run" in out and "fold 1: run" in out and f"--data {prepared} --split oof" in out
    artifact = out.strip().splitlines()[-1].removeprefix("model artifact: ")
    assert artifact == str(runs / "cv" / "model")
    loaded = load_artifact(artifact)
    config = json.loads((runs / "cv" / "model" / "config.json").read_text())
    assert loaded.settings.architecture == "ensemble" and config["provenance"]["folds"] == 2
    assert [m["provenance"]["config"]["fold"] for m in config["provenance"]["members"]] == [0, 1]
    assert [split for _, split in fold_members(loaded, prepared)] == ["val@fold0of2", "val@fold1of2"]

    preds = predict_out_of_fold(loaded, prepared)
    pool = _rows(prepared, "train") + _rows(prepared, "val")
    assert sorted(preds.ids) == sorted(r[0] for r in pool)
    # Each prediction is its own fold model's, not the ensemble's.
    member, split = fold_members(loaded, prepared)[1]
    alone = predict_split(member, prepared, split)
    first = preds.ids.index(alone.ids[0])
    assert (preds.probs[False][first] == alone.probs[False][0]).all()

    # The out-of-fold predictions of val's images alone: a comparison with a model trained on train only.
    val_ids = {r[0] for r in _rows(prepared, "val")}
    part = preds.subset(val_ids)
    assert sorted(part.ids) == sorted(val_ids) and len(part.probs[True]) == len(part.lesion[True]) == len(val_ids)
    assert part.probs[False][0] is preds.probs[False][preds.ids.index(part.ids[0])]

    # Other prepared data (here: the same with an edited manifest) would make the folds someone else's.
    other = tmp_path / "other"
    shutil.copytree(prepared, other)
    (other / "manifest.json").write_text((other / "manifest.json").read_text() + " ")
    with pytest.raises(UsageError, match="other prepared data"):
        fold_members(loaded, str(other))

    code = run_main(calibrate_job.main, ["--model", artifact, "--data", prepared, "--split", "oof",
                                         "--max-false-lesion-rate", "1.0", "--out", str(tmp_path / "cal")])
    out = capsys.readouterr().out
    assert code == 0, out
    calibrated = json.loads((tmp_path / "cal" / "config.json").read_text())
    assert calibrated["provenance"]["calibration"]["data"]["split"] == "oof"
    assert calibrated["provenance"]["calibration"]["images"]["images"] == len(pool)
    by_split = calibrated["provenance"]["calibration"]["chosen_by_split"]
    assert set(by_split) == {"train", "val"} and "of the val split's images only" in out
    assert split_ids(prepared, "val") == [r[0] for r in _rows(prepared, "val")]
