"""Exactness of moeclip.metrics against scikit-learn and brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from moeclip.metrics import (
    PixelMetricAccumulator,
    aupro,
    auroc,
    average_precision,
    f1_max,
    pixel_metrics,
    ranking_metrics,
)
from moeclip.metrics._runs import RunStore, merge, split_tallies, tally_owned, tally_torch
from moeclip.metrics.ranking import metrics_from_tallies

TOL = 1e-9


def _random_case(seed: int, n: int, decimals: int, pos_rate: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """float32 scores rounded to ``decimals`` (heavy ties) and bool labels with both classes."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(n), decimals).astype(np.float32)
    labels = rng.random(n) < pos_rate
    labels[:2] = [True, False]
    return scores, labels


def _assert_matches_sklearn(scores: np.ndarray, labels: np.ndarray, got: dict[str, float]) -> None:
    assert abs(got["auroc"] - roc_auc_score(labels, scores)) < TOL
    assert abs(got["ap"] - average_precision_score(labels, scores)) < TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [2, 17, 1000, 200_000])
@pytest.mark.parametrize("decimals", [1, 3, 7])
def test_equals_sklearn_with_ties(seed: int, n: int, decimals: int) -> None:
    scores, labels = _random_case(seed, n, decimals)
    _assert_matches_sklearn(scores, labels, ranking_metrics(scores, labels))


@pytest.mark.parametrize(
    ("scores", "labels"),
    [
        (np.array([3, 1, 2, 2, 5, 1, 0]), np.array([1, 0, 1, 0, 1, 0, 0])),  # integer scores
        (np.full(50, 0.25, np.float32), np.arange(50) % 3 == 0),  # all tied
        (np.linspace(0, 1, 100), np.arange(100) == 40),  # single positive
        (np.linspace(0, 1, 100), np.arange(100) != 7),  # single negative
        (np.array([0.5, 0.5], np.float64), np.array([True, False])),
    ],
)
def test_special_cases(scores: np.ndarray, labels: np.ndarray) -> None:
    _assert_matches_sklearn(scores, labels, ranking_metrics(scores, labels))
    assert abs(auroc(scores, labels) - roc_auc_score(labels, scores)) < TOL
    assert abs(average_precision(scores, labels) - average_precision_score(labels, scores)) < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_torch_inputs(dtype: torch.dtype) -> None:
    scores, labels = _random_case(3, 5000, 3)
    t_scores = torch.from_numpy(scores).to(dtype)
    reference = t_scores.double().numpy()
    got = ranking_metrics(t_scores, torch.from_numpy(labels).long())
    _assert_matches_sklearn(reference, labels, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_tally_matches_numpy(dtype: torch.dtype) -> None:
    """The CUDA code path (torch sort + unique_consecutive), exercised on CPU tensors."""
    scores = torch.from_numpy(_random_case(4, 10_000, 2)[0]).to(dtype)
    expected = tally_owned(scores.float().numpy())
    got = tally_torch(scores)
    np.testing.assert_array_equal(got.values, expected.values)
    np.testing.assert_array_equal(got.counts, expected.counts)


def test_small_blocks_equal_one_block() -> None:
    scores, labels = _random_case(5, 3000, 2)
    pos, neg = split_tallies(scores, labels)
    whole = metrics_from_tallies(pos, neg)
    for block in (1, 3, 64):
        blocked = metrics_from_tallies(pos, neg, block=block)
        for key in ("auroc", "ap", "f1_max"):
            assert abs(blocked[key] - whole[key]) < TOL


@pytest.mark.parametrize("as_tensor", [False, True])
def test_accumulator_chunks_equal_one_shot(as_tensor: bool) -> None:
    rng = np.random.default_rng(6)
    maps = np.round(rng.random((12, 16, 20)), 3).astype(np.float32)
    masks = rng.random((12, 16, 20)) < 0.05
    acc = PixelMetricAccumulator(min_pending=64)  # force many compactions
    for amap, mask in zip(maps, masks):
        acc.update(torch.from_numpy(amap) if as_tensor else amap, torch.from_numpy(mask) if as_tensor else mask)
    got = acc.compute()
    one_shot = ranking_metrics(maps.ravel(), masks.ravel())
    assert got == pytest.approx(one_shot, abs=TOL)
    assert got["n"] == maps.size and got["n_positive"] == int(masks.sum())
    _assert_matches_sklearn(maps.ravel(), masks.ravel(), got)


def test_accumulator_memory_bounded_by_distinct_values() -> None:
    """With 101 distinct scores the state stays tiny however many pixels are fed."""
    store = RunStore(min_pending=1000)
    rng = np.random.default_rng(7)
    for _ in range(200):
        store.add(tally_owned(np.round(rng.random(5000), 2).astype(np.float32)))
    assert store.nbytes() <= 8 * 101 + 8 * 1000 + 8 * 101
    assert store.result().total() == 200 * 5000


@pytest.mark.parametrize("block", [1, 5, 1 << 20])
@pytest.mark.parametrize("n_chunks", [4, 30])
def test_merge_equals_tally_of_concatenation(block: int, n_chunks: int) -> None:
    """Also covers hierarchical merging (more tallies than the fan-in) and empty tallies."""
    rng = np.random.default_rng(9)
    sizes = rng.choice([0, 1, 7, 50, 300], size=n_chunks)
    chunks = [np.round(rng.random(size), 2).astype(np.float32) for size in sizes]
    merged = merge([tally_owned(c.copy()) for c in chunks], block=block)
    expected = tally_owned(np.concatenate(chunks))
    np.testing.assert_array_equal(merged.values, expected.values)
    np.testing.assert_array_equal(merged.counts, expected.counts)
    assert merged.counts.dtype == np.uint32


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_f1_max_brute_force(seed: int) -> None:
    scores, labels = _random_case(seed, 400, 2, pos_rate=0.3)
    brute = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert abs(f1_max(scores, labels) - brute) < TOL


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        (np.array([0.1, 0.2]), np.array([0, 0]), "no positives"),
        (np.array([0.1, 0.2]), np.array([1, 1]), "no negatives"),
        (np.array([0.1, 0.2]), np.array([0, 1, 1]), "differ in shape"),
        (np.array([0.1, np.nan]), np.array([0, 1]), "NaN"),
        (np.array([0.1, np.inf]), np.array([0, 1]), "inf"),
        (np.array([0.1, 0.2]), np.array([0, 2]), "0/1"),
        (np.zeros((2, 2)), np.zeros((2, 2)), "1-D"),
        (torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), "NaN"),
    ],
)
def test_errors(scores: np.ndarray, labels: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        auroc(scores, labels)


def test_empty_accumulator_raises() -> None:
    with pytest.raises(ValueError, match="no scores"):
        PixelMetricAccumulator().compute()


def _official_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """Per-pixel reference in the style of the MVTec AD evaluation script."""
    fp_step = np.zeros(maps.shape)
    pro_step = np.zeros(maps.shape)
    n_regions = 0
    for i, mask in enumerate(masks):
        labeled, found = ndimage.label(mask, structure=np.ones((3, 3)))
        n_regions += found
        fp_step[i][labeled == 0] = 1
        for k in range(1, found + 1):
            pro_step[i][labeled == k] = 1.0 / np.sum(labeled == k)
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    sorted_scores = maps.ravel()[order]
    fpr = np.cumsum(fp_step.ravel()[order]) / fp_step.sum()
    pro = np.cumsum(pro_step.ravel()[order]) / n_regions
    keep = np.append(np.diff(sorted_scores) != 0, True)
    fpr, pro = np.concatenate([[0], fpr[keep]]), np.concatenate([[0], pro[keep]])
    inside = fpr <= max_fpr
    area = np.trapezoid(pro[inside], fpr[inside])
    j = np.searchsorted(fpr, max_fpr, side="right")
    if fpr[j - 1] < max_fpr:
        y_end = np.interp(max_fpr, fpr[j - 1 : j + 1], pro[j - 1 : j + 1])
        area += 0.5 * (pro[j - 1] + y_end) * (max_fpr - fpr[j - 1])
    return area / max_fpr


def test_aupro_hand_built() -> None:
    """One 2-pixel region scoring {0.9, 0.5}, normals {0.8, 0.3, 0.2, 0.1}.

    Curve: (0,0) (0,.5) (.25,.5) (.25,1) (.5,1) ... -> area to 0.3 = .125 + .05 = .175.
    """
    maps = np.array([[[0.9, 0.8, 0.3], [0.5, 0.2, 0.1]]])
    masks = np.array([[[1, 0, 0], [1, 0, 0]]])
    assert abs(aupro(maps, masks) - 0.175 / 0.3) < TOL


def test_aupro_perfect_map_is_one() -> None:
    masks = np.zeros((3, 20, 20), bool)
    masks[0, 2:5, 2:6] = True
    masks[0, 10:12, 14:19] = True
    masks[2, 15:, :3] = True
    maps = masks + 0.1 * np.random.default_rng(8).random(masks.shape) * ~masks
    assert abs(aupro(maps, masks) - 1.0) < TOL


@pytest.mark.parametrize("max_fpr", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_matches_reference(seed: int, max_fpr: float) -> None:
    rng = np.random.default_rng(seed)
    masks = ndimage.binary_opening(rng.random((4, 24, 24)) < 0.25, np.ones((1, 2, 2)))
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 2).astype(np.float32)
    expected = _official_aupro(maps, masks, max_fpr)
    assert abs(aupro(maps, masks, max_fpr=max_fpr) - expected) < TOL
    assert abs(aupro(list(torch.from_numpy(maps)), list(torch.from_numpy(masks)), max_fpr) - expected) < TOL


@pytest.mark.parametrize("as_tensor", [False, True])
def test_pixel_metrics_equal_sklearn_and_aupro(as_tensor: bool) -> None:
    rng = np.random.default_rng(11)
    maps = np.round(rng.random((4, 16, 16)), 2).astype(np.float32)  # ties
    masks = np.zeros((4, 16, 16), bool)
    masks[1, 2:6, 3:9] = True
    masks[3, 10:, 10:] = True
    masks[3, 0, 0] = True  # a second, one-pixel region
    maps[masks] += 0.3
    convert = torch.from_numpy if as_tensor else np.asarray
    result = pixel_metrics(convert(maps), convert(masks))
    assert abs(result["auroc"] - roc_auc_score(masks.ravel(), maps.ravel())) < TOL
    assert abs(result["ap"] - average_precision_score(masks.ravel(), maps.ravel())) < TOL
    assert abs(result["aupro"] - _official_aupro(maps, masks, 0.3)) < TOL
    assert result["aupro"] == aupro(maps, masks)
    assert result["f1_max"] == f1_max(maps.ravel(), masks.ravel())


def test_aupro_images_without_regions_or_normals() -> None:
    maps = np.random.default_rng(10).random((3, 8, 8))
    masks = np.zeros((3, 8, 8), bool)
    masks[1] = True  # all anomalous: no normal pixels in this image
    masks[2, :3, :3] = True  # image 0 has no regions at all
    assert abs(aupro(maps, masks, max_fpr=0.5) - _official_aupro(maps, masks, 0.5)) < TOL


def test_aupro_errors() -> None:
    with pytest.raises(ValueError, match="max_fpr"):
        aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), max_fpr=0.0)
    with pytest.raises(ValueError, match="no positives"):
        aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="no anomaly maps"):
        aupro([], [])
    with pytest.raises(ValueError, match="2-D"):
        aupro(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)))


def test_mixed_dtypes_across_blocks() -> None:
    """float64 negatives next to float32 positives: block edges must not round either."""
    pos = tally_owned(np.array([0.1, 0.3], np.float32))
    neg = tally_owned(np.array([0.1, 0.2, np.float32(0.1)], np.float64))
    scores = np.array([np.float32(0.1), np.float32(0.3), 0.1, 0.2, np.float32(0.1)])
    labels = np.array([1, 1, 0, 0, 0])
    _assert_matches_sklearn(scores, labels, metrics_from_tallies(pos, neg, block=1))
