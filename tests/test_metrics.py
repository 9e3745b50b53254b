"""Metrics against independent implementations (set arithmetic, brute-force point distances)."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from unet.metrics import MetricAccumulator, counts, hd95, hd95_per_image, scores_from_counts


# ---------------------------------------------------------------- independent reference implementations
def _set_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Dice/IoU/precision/recall from sets of foreground coordinates, with the documented empty rule."""
    a = {tuple(ix) for ix in np.argwhere(pred)}
    b = {tuple(ix) for ix in np.argwhere(target)}
    if not a and not b:
        return {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    inter = len(a & b)
    return {
        "dice": 2 * inter / (len(a) + len(b)),
        "iou": inter / len(a | b),
        "precision": inter / len(a) if a else 0.0,
        "recall": inter / len(b) if b else 0.0,
    }


def _boundary_points(mask: np.ndarray, spacing=(1.0, 1.0)) -> np.ndarray:
    """Foreground pixels with a 4-neighbour outside the mask (image outside counts as background)."""
    m = np.pad(mask.astype(bool), 1, constant_values=False)
    core = m[1:-1, 1:-1]
    interior = core & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return np.argwhere(core & ~interior) * np.asarray(spacing, dtype=float)


def _brute_hd95_monai(pred, target, spacing=(1.0, 1.0)) -> float:
    bp, bt = _boundary_points(pred, spacing), _boundary_points(target, spacing)
    d = cdist(bp, bt)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def _brute_hd95_medpy(pred, target) -> float:
    d = cdist(_boundary_points(pred), _boundary_points(target))
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


def _random_blobs(rng: np.random.Generator, size=(40, 48), max_blobs=3) -> np.ndarray:
    """Union of random ellipses; sometimes touching the image edge, sometimes empty."""
    yy, xx = np.mgrid[: size[0], : size[1]]
    mask = np.zeros(size, dtype=bool)
    for _ in range(rng.integers(0, max_blobs + 1)):
        cy, cx = rng.uniform(0, size[0]), rng.uniform(0, size[1])
        ry, rx = rng.uniform(2, size[0] / 3), rng.uniform(2, size[1] / 3)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return mask


# ---------------------------------------------------------------- counts
def test_counts_small_hand_example():
    pred = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)
    target = np.array([[1, 0, 0], [1, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(counts(pred, target), [[2, 1, 1, 2]])
    assert counts(pred, target).dtype == np.int64


def test_counts_and_scores_match_set_arithmetic_on_random_masks():
    rng = np.random.default_rng(0)
    for trial in range(40):
        density_p, density_t = rng.uniform(0, 0.6, size=2)
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 12)), int(rng.integers(1, 12)))
        pred = rng.random(shape) < density_p * (trial % 5 != 0)  # every 5th prediction is empty
        target = rng.random(shape) < density_t * (trial % 7 != 0)  # every 7th truth is empty
        c = counts(pred, target)
        assert c.shape == (shape[0], 4)
        assert (c.sum(axis=1) == shape[1] * shape[2]).all()
        per_image = scores_from_counts(c[:, 0], c[:, 1], c[:, 2])
        for i in range(shape[0]):
            expected = _set_scores(pred[i], target[i])
            for key, value in expected.items():
                assert per_image[key][i] == pytest.approx(value), (trial, i, key)


def test_counts_accepts_torch_numpy_mixed_and_all_shapes():
    rng = np.random.default_rng(1)
    pred = rng.random((3, 9, 7)) > 0.5
    target = rng.random((3, 9, 7)) > 0.5
    ref = counts(pred, target)
    variants = [
        (pred[:, None], target[:, None]),
        (torch.from_numpy(pred), torch.from_numpy(target)),
        (torch.from_numpy(pred)[:, None].float(), target.astype(np.uint8) * 255),  # mixed torch/numpy, 0/255
        (pred.astype(np.int32), torch.from_numpy(target).to(torch.uint8)[:, None]),
        (pred.astype(np.float32), target.astype(np.float64)),
    ]
    for p, t in variants:
        np.testing.assert_array_equal(counts(p, t), ref)
    np.testing.assert_array_equal(counts(pred[1], target[1]), ref[1:2])  # (H, W) is one image


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (np.full((4, 4), 0.3), np.zeros((4, 4)), "pred is a float array"),
        (np.zeros((4, 4)), torch.full((4, 4), 0.7), "target is a float tensor"),
        (np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4, 4)), r"pred must have shape .*\(2, 3, 4, 4\)"),
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), "does not match"),
        (np.array([["a"]]), np.zeros((1, 1)), "dtype"),
    ],
)
def test_counts_rejects_bad_inputs(pred, target, message):
    with pytest.raises(ValueError, match=message):
        counts(pred, target)


# ---------------------------------------------------------------- scores
@pytest.mark.parametrize(
    ("tp", "fp", "fn", "expected"),
    [
        (0, 0, 0, dict(dice=1.0, iou=1.0, precision=1.0, recall=1.0)),  # empty truth, empty prediction
        (0, 5, 0, dict(dice=0.0, iou=0.0, precision=0.0, recall=0.0)),  # empty truth, false positives
        (0, 0, 5, dict(dice=0.0, iou=0.0, precision=0.0, recall=0.0)),  # missed lesion, empty prediction
        (3, 1, 2, dict(dice=6 / 9, iou=3 / 6, precision=3 / 4, recall=3 / 5)),
        (4, 0, 0, dict(dice=1.0, iou=1.0, precision=1.0, recall=1.0)),
    ],
)
def test_scores_from_counts_rule_for_empties(tp, fp, fn, expected):
    got = scores_from_counts(tp, fp, fn)
    assert got == pytest.approx(expected)
    assert all(isinstance(v, float) for v in got.values())


def test_scores_from_counts_elementwise_on_arrays():
    got = scores_from_counts(np.array([0, 3]), np.array([0, 1]), np.array([0, 2]))
    np.testing.assert_allclose(got["dice"], [1.0, 6 / 9])
    np.testing.assert_allclose(got["recall"], [1.0, 3 / 5])
    with pytest.raises(ValueError, match="fp must hold"):
        scores_from_counts(1, -1, 0)


# ---------------------------------------------------------------- HD95
def test_hd95_matches_brute_force_monai_definition_on_random_blobs():
    rng = np.random.default_rng(2)
    compared = differs_from_medpy = 0
    for _ in range(60):
        pred, target = _random_blobs(rng), _random_blobs(rng)
        got = hd95(pred, target)
        if not pred.any() and not target.any():
            assert got == 0.0
            continue
        if not pred.any() or not target.any():
            assert math.isnan(got)
            continue
        assert got == pytest.approx(_brute_hd95_monai(pred, target), rel=1e-9, abs=1e-9)
        compared += 1
        differs_from_medpy += not math.isclose(got, _brute_hd95_medpy(pred, target), rel_tol=1e-6)
    assert compared >= 30
    # The two published HD95 definitions really do differ; we match MONAI's, not medpy's.
    assert differs_from_medpy > 0


def test_hd95_anisotropic_spacing_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(10):
        pred, target = _random_blobs(rng, max_blobs=2), _random_blobs(rng, max_blobs=2)
        if pred.any() and target.any():
            assert hd95(pred, target, spacing=(0.5, 2.0)) == pytest.approx(
                _brute_hd95_monai(pred, target, (0.5, 2.0)), rel=1e-9
            )


def test_hd95_known_values_and_empties():
    a = np.zeros((20, 20), dtype=bool)
    b = np.zeros((20, 20), dtype=bool)
    a[5, 5] = True
    b[8, 9] = True
    assert hd95(a, b) == pytest.approx(5.0)
    assert hd95(a, b, spacing=2.0) == pytest.approx(10.0)
    assert hd95(a, a) == 0.0
    empty = np.zeros((20, 20), dtype=bool)
    assert hd95(empty, empty) == 0.0
    assert math.isnan(hd95(a, empty)) and math.isnan(hd95(empty, a))


def test_hd95_torch_input_and_batches():
    rng = np.random.default_rng(4)
    pred = np.stack([_random_blobs(rng, max_blobs=2) | (np.arange(48) == 3)[None, :] for _ in range(3)])
    target = np.stack([_random_blobs(rng, max_blobs=2) | (np.arange(48) == 4)[None, :] for _ in range(3)])
    per_image = hd95_per_image(torch.from_numpy(pred)[:, None], torch.from_numpy(target)[:, None])
    assert per_image.shape == (3,)
    expected = [_brute_hd95_monai(p, t) for p, t in zip(pred, target, strict=True)]
    np.testing.assert_allclose(per_image, expected)
    assert hd95(torch.from_numpy(pred[0]), target[0]) == pytest.approx(expected[0])
    with pytest.raises(ValueError, match="one image"):
        hd95(pred, target)
    with pytest.raises(ValueError, match="spacing"):
        hd95(pred[0], target[0], spacing=0)


# ---------------------------------------------------------------- accumulation
def _dataset(seed=5, n=7):
    rng = np.random.default_rng(seed)
    pred = np.stack([_random_blobs(rng, (24, 24)) for _ in range(n)])
    target = np.stack([_random_blobs(rng, (24, 24)) for _ in range(n)])
    target[0] = pred[0] = False  # a normal image predicted normal
    target[1] = False  # a normal image with a false positive (pred[1] forced non-empty below)
    pred[1, 3:6, 3:6] = True
    return pred, target


def test_accumulator_micro_and_macro_match_independent_computation():
    pred, target = _dataset()
    acc = MetricAccumulator(with_hd95=True)
    for start in range(0, len(pred), 3):  # uneven batches: 3, 3, 1
        acc.update(torch.from_numpy(pred[start : start + 3]), target[start : start + 3])
    out = acc.compute()

    assert out["images"] == len(pred)
    union_scores = _set_scores(pred, target)  # micro = all pixels of the set as one big image
    per_image = [_set_scores(p, t) for p, t in zip(pred, target, strict=True)]
    for key in ("dice", "iou", "precision", "recall"):
        assert out[f"{key}_micro"] == pytest.approx(union_scores[key])
        assert out[f"{key}_macro"] == pytest.approx(np.mean([s[key] for s in per_image]))
    hd = [hd95(p, t) for p, t in zip(pred, target, strict=True)]
    assert out["hd95"] == pytest.approx(np.nanmean(hd))
    assert out["hd95_nan"] == int(np.isnan(hd).sum()) >= 1
    assert out["hd95_images"] + out["hd95_nan"] == len(pred)
    assert out["tp"] + out["fp"] + out["fn"] + out["tn"] == pred.size


def test_accumulator_merge_equals_single_pass_and_rejects_bad_state():
    pred, target = _dataset(seed=6)
    whole = MetricAccumulator()
    whole.update(pred, target)
    left, right = MetricAccumulator(), MetricAccumulator()
    left.update(pred[:4], target[:4])
    right.update(pred[4:], target[4:])
    assert left.merge(right).compute() == pytest.approx(whole.compute())
    assert "hd95" not in whole.compute()
    with pytest.raises(ValueError, match="state vector"):
        whole.merge(np.zeros(3))
    with pytest.raises(ValueError, match="no images"):
        MetricAccumulator().compute()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce_worker(rank: int, port: int, pred, target, queue) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        acc = MetricAccumulator()
        half = len(pred) // 2
        part = slice(0, half) if rank == 0 else slice(half, None)
        acc.update(pred[part], target[part])
        queue.put((rank, acc.all_reduce().compute()))
    finally:
        torch.distributed.destroy_process_group()


def test_accumulator_all_reduce_is_noop_without_process_group():
    pred, target = _dataset(seed=7)
    acc = MetricAccumulator()
    acc.update(pred, target)
    before = acc.state()
    np.testing.assert_array_equal(acc.all_reduce().state(), before)


# fork rather than spawn: spawn re-imports torch in each child (~10 s on 2 CPUs); the children only
# run numpy and one gloo all_reduce, so the usual fork-after-threads hazard does not bite.
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_accumulator_all_reduce_sums_over_two_gloo_ranks():
    pred, target = _dataset(seed=8, n=6)
    whole = MetricAccumulator()
    whole.update(pred, target)
    ctx = torch.multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_all_reduce_worker, args=(r, port, pred, target, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert results[0] == pytest.approx(whole.compute())
    assert results[1] == pytest.approx(whole.compute())
