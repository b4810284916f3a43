import numpy as np
import pytest

from cam2seg import folds


def _labels(n=600, seed=0):
    rng = np.random.default_rng(seed)
    lab = (rng.random((n, 4)) < [0.07, 0.03, 0.4, 0.07]).astype(np.uint8)
    return lab


def test_stratified_and_deterministic():
    lab = _labels()
    f = folds.make_folds(lab, 5, seed=1)
    assert f.shape == (600,) and set(f.tolist()) == set(range(5))
    assert (folds.make_folds(lab, 5, seed=1) == f).all()
    assert not (folds.make_folds(lab, 5, seed=2) == f).all()
    sizes = np.bincount(f)
    assert sizes.max() - sizes.min() <= 6  # within 1% of N: the method trades size for label balance
    clean = ~lab.any(axis=1)
    for c in range(4):
        per_fold = np.array([lab[f == k, c].sum() for k in range(5)])
        assert per_fold.max() - per_fold.min() <= 2, (c, per_fold)
    per_fold_clean = np.array([clean[f == k].sum() for k in range(5)])
    assert per_fold_clean.max() - per_fold_clean.min() <= 2


def test_rare_class_spread_over_folds():
    lab = np.zeros((100, 4), np.uint8)
    lab[:5, 1] = 1  # five images of a rare class, two folds
    f = folds.make_folds(lab, 2, seed=0)
    counts = np.bincount(f[:5], minlength=2)
    assert counts.min() >= 2


def test_bad_arguments():
    with pytest.raises(ValueError):
        folds.make_folds(np.zeros((3, 4)), 5)
    with pytest.raises(ValueError):
        folds.make_folds(np.zeros((10, 4)), 1)


def test_save_load_round_trip(tmp_path):
    ids = [f"img{i}.jpg" for i in range(10)]
    f = folds.make_folds(_labels(10), 2)
    url = str(tmp_path / "run" / folds.FOLDS_FILE)
    folds.save_folds(url, ids, f)
    assert folds.load_folds(url) == dict(zip(ids, f.tolist()))
    (tmp_path / "bad.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="not a folds file"):
        folds.load_folds(str(tmp_path / "bad.csv"))
