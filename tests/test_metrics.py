import numpy as np
import pytest

from cam2seg import metrics


def test_dice_edge_cases():
    e = np.zeros((4, 4), bool)
    f = np.ones((4, 4), bool)
    assert metrics.dice(e, e) == 1.0  # empty/empty
    assert metrics.dice(e, f) == 0.0 and metrics.dice(f, e) == 0.0  # empty/non-empty
    assert metrics.dice(f, f) == 1.0
    half = np.zeros((4, 4), bool)
    half[:, :2] = True
    assert metrics.dice(half, f) == pytest.approx(2 * 8 / (8 + 16))


def test_dice_batched_shape():
    rng = np.random.default_rng(0)
    p = rng.random((3, 4, 8, 9)) < 0.5
    t = rng.random((3, 4, 8, 9)) < 0.5
    d = metrics.dice(p, t)
    assert d.shape == (3, 4)
    i, j = 2, 1
    inter = (p[i, j] & t[i, j]).sum()
    assert d[i, j] == pytest.approx(2 * inter / (p[i, j].sum() + t[i, j].sum()))


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.dice(np.zeros((2, 3), bool), np.zeros((3, 2), bool))


def test_score_dice_kaggle_vs_positive_and_defective_only():
    # 3 images x 2 classes; image 2 is clean.
    per_pair = np.array([[0.5, 1.0], [1.0, 0.0], [1.0, 0.0]])
    true_area = np.array([[10, 0], [0, 5], [0, 0]])
    s = metrics.score_dice(per_pair, true_area, defective_only=True)
    assert s.n_images == 2
    assert s.kaggle_mean == pytest.approx((0.5 + 1.0 + 1.0 + 0.0) / 4)
    assert s.positive_mean == pytest.approx((0.5 + 0.0) / 2)
    assert s.kaggle == pytest.approx([0.75, 0.5])
    assert s.positive == pytest.approx([0.5, 0.0])
    s_all = metrics.score_dice(per_pair, true_area, defective_only=False)
    assert s_all.n_images == 3
    assert s_all.kaggle_mean == pytest.approx(3.5 / 6)


def test_positive_is_nan_without_positive_pairs():
    s = metrics.score_dice(np.ones((2, 2)), np.array([[3, 0], [1, 0]]))
    assert np.isnan(s.positive[1]) and s.positive[0] == 1.0


def test_baselines_equal_explicit_masks():
    rng = np.random.default_rng(2)
    n, c, h, w = 20, 4, 8, 12
    truth = np.zeros((n, c, h, w), bool)
    for i in range(n):
        for k in range(c):
            if rng.random() < 0.3:
                y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
                truth[i, k, y : y + 3, x : x + 3] = True
    accepted = rng.random((n, c)) < 0.5
    true_area = truth.sum(axis=(-2, -1))
    base = metrics.baseline_counts(true_area, h * w, accepted)
    empty = np.zeros_like(truth)
    whole = np.broadcast_to(accepted[:, :, None, None], truth.shape)
    assert np.allclose(metrics.dice_from_counts(*base["all-empty"]), metrics.dice(empty, truth))
    assert np.allclose(metrics.dice_from_counts(*base["whole image if accepted"]), metrics.dice(whole, truth))


def test_all_empty_baseline_on_one_class_images_is_high():
    # Most defective images hold one class out of four: all-empty scores 3/4 on the Kaggle mean.
    true_area = np.zeros((100, 4), int)
    true_area[np.arange(100), np.arange(100) % 4] = 50
    rows = {"method": np.zeros((100, 4))}
    scores = metrics.dice_with_baselines(rows, true_area, 1000)
    assert scores["baseline: all-empty"].kaggle_mean == pytest.approx(0.75)
    assert scores["baseline: all-empty"].positive_mean == 0.0
    table = metrics.format_dice_table(scores, title="t")
    assert "baseline: all-empty" in table and "baseline: whole image if accepted" in table


def test_roc_auc_per_class():
    labels = np.array([[0, 1], [0, 1], [1, 1], [1, 1]])
    probs = np.array([[0.1, 0.5], [0.2, 0.5], [0.8, 0.5], [0.9, 0.5]])
    auc = metrics.roc_auc(labels, probs)
    assert auc[0] == 1.0
    assert np.isnan(auc[1])  # one label only: undefined
    inv = metrics.roc_auc(labels, 1 - probs)
    assert inv[0] == 0.0
    assert "mean" in metrics.format_auc_table({"b0": auc})
