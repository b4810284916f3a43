import numpy as np
import pytest
import torch

from cam2seg import metrics, postprocess
from cam2seg.evaluate import tuning
from cam2seg.postprocess import PostProcess


def _data(n=30, c=4, h=16, w=24, seed=0):
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, c, h, w), bool)
    cams = rng.random((n, c, h, w)).astype(np.float32) * 0.4
    for i in range(n):
        for k in range(c):
            if rng.random() < 0.4:
                y, x = rng.integers(0, h - 6), rng.integers(0, w - 8)
                truth[i, k, y : y + 6, x : x + 8] = True
                cams[i, k, y : y + 6, x : x + 8] += rng.uniform(0.3, 0.6)
    cams = np.clip(cams, 0, 1)
    probs = np.where(truth.any(axis=(-2, -1)), rng.uniform(0.4, 1, (n, c)), rng.uniform(0, 0.7, (n, c)))
    return cams, truth, probs.astype(np.float32)


def test_apply_gates_thresholds_and_min_area():
    cams = np.zeros((1, 2, 4, 4), np.float32)
    cams[0, 0, :2, :2] = 0.9
    cams[0, 1, 0, 0] = 0.9
    probs = np.array([[0.8, 0.8]])
    m = postprocess.apply(cams, probs, PostProcess(confidence=0.5, threshold=0.5, min_seg_len=2))
    assert m[0, 0].sum() == 4 and m[0, 1].sum() == 0  # class 2 is below the minimum area
    m = postprocess.apply(cams, np.array([[0.4, 0.8]]), PostProcess(confidence=0.5, threshold=0.5))
    assert m[0, 0].sum() == 0 and m[0, 1].sum() == 1  # class 1 is gated by its probability
    m = postprocess.apply(cams, probs, PostProcess(confidence=[0, 0], threshold=[0.95, 0.5]))
    assert m[0, 0].sum() == 0 and m[0, 1].sum() == 1
    with pytest.raises(ValueError):
        PostProcess(threshold=1.5)
    with pytest.raises(ValueError, match="3 values for 2 classes"):
        postprocess.apply(cams, probs, PostProcess(threshold=[0.1, 0.2, 0.3]))


def test_histogram_counts_equal_explicit_masks():
    cams, truth, probs = _data()
    h_all, h_in = tuning.cam_histograms(torch.from_numpy(cams), torch.from_numpy(truth))
    true_area = truth.sum(axis=(-2, -1))
    for pp in [PostProcess(confidence=0.5, threshold=0.3, min_seg_len=0),
               PostProcess(confidence=[0.2, 0.5, 0.6, 0.0], threshold=[0.25, 0.5, 0.3, 0.7], min_seg_len=[0, 20, 5, 0])]:
        inter, area, ta = tuning.counts_at(h_all, h_in, true_area, probs, pp, 16 * 24)
        masks = postprocess.apply(cams, probs, pp)
        ei, ep, et = metrics.pair_counts(masks, truth)
        assert (inter == ei).all() and (area == ep).all() and (ta == et).all()


@pytest.mark.parametrize("objective", ["kaggle", "paper"])
def test_sweep_finds_the_best_grid_point_and_per_class_is_no_worse(objective):
    """kaggle: the mean over all images (clean ones included); paper: over defective images."""
    cams, truth, probs = _data(n=40, seed=3)
    h_all, h_in = tuning.cam_histograms(torch.from_numpy(cams), torch.from_numpy(truth))
    true_area = truth.sum(axis=(-2, -1))
    grid = {"threshold": [0.2, 0.3, 0.4, 0.5, 0.6], "confidence": [0.0, 0.3, 0.5], "min_seg_frac": [0.0, 0.05]}
    tuned = tuning.sweep(h_all, h_in, true_area, probs, 16 * 24, grid, objective=objective)
    scored = true_area.sum(axis=1) > 0 if objective == "paper" else np.ones(len(true_area), bool)
    assert not scored.all() or objective == "kaggle"  # the data has clean images: the two differ

    def score(pp):
        d = metrics.dice(postprocess.apply(cams, probs, pp), truth)
        return d[scored].mean()

    assert score(tuned.global_pp) == pytest.approx(tuned.global_score)
    brute = max(score(PostProcess(confidence=q, threshold=t, min_seg_len=int(round(m * 384))))
                for t in grid["threshold"] for q in grid["confidence"] for m in grid["min_seg_frac"])
    assert tuned.global_score == pytest.approx(brute)
    assert tuned.per_class_score >= tuned.global_score - 1e-12
    assert score(tuned.per_class_pp) == pytest.approx(tuned.per_class_score)
    assert tuned.surface.shape == (4, 5, 3, 2)


def test_gate_from_labels_overrides_the_confidence_test():
    from cam2seg.postprocess import PostProcess, apply

    cams = np.full((2, 3, 4, 5), 0.8)
    probs = np.array([[0.9, 0.1, 0.9], [0.1, 0.9, 0.1]])
    pp = PostProcess(confidence=0.5, threshold=0.3)
    plain = apply(cams, probs, pp).any(axis=(-2, -1))
    assert plain.tolist() == [[True, False, True], [False, True, False]]
    gate = np.array([[0, 1, -1], [1, -1, 0]])  # absent, named, unknown
    gated = apply(cams, probs, pp, gate).any(axis=(-2, -1))
    assert gated.tolist() == [[False, True, True], [True, True, False]]
    with pytest.raises(ValueError, match="gate must be"):
        apply(cams, probs, pp, gate[:1])
