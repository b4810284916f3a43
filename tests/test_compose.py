"""The composed predictor (classifier gate + segmenter shape) and its constrained tuning, on
random-init artifacts and hand-made histograms (the label job with --segmenter is in
test_label_job.py)."""

import numpy as np
import pytest
import torch

from cam2seg.evaluate import tuning
from cam2seg.models.compose import (DEFAULT_COMPOSITION, ComposedPredictor, Composition, composition_for,
                                    load_composed, weights_digest)
from cam2seg.models.predict import load_predictor


@pytest.fixture(scope="module")
def pair(tmp_path_factory, random_artifact, random_segmenter):
    root = tmp_path_factory.mktemp("compose")
    cls, seg = str(root / "classifier"), str(root / "segmenter")
    random_artifact(cls)
    random_segmenter(seg)
    return cls, seg


def _images(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (n, 64, 400), dtype=np.uint8)


def test_a_class_the_classifier_rejects_stays_empty_and_shapes_come_from_the_segmenter(pair):
    cls, seg = pair
    images, shapes = _images(), [(64, 400)] * 3
    probs = load_predictor(cls, "cpu").scores(images).numpy()
    # class 2's gate above every probability the classifier gave, the others open
    conf = [0.0, float(probs[:, 1].max()) + 1e-3, 0.0, 0.0]
    comp = Composition(confidence=conf, threshold=0.5, min_seg_len=0)
    composed, why = load_composed(cls, seg, "cpu", composition=comp)
    masks, scores = composed.masks(images, shapes)
    np.testing.assert_allclose(scores, probs, rtol=1e-5, atol=1e-6)  # the gate's scores are the classifier's
    seg_maps, _ = load_predictor(seg, "cpu").maps(images)
    want = seg_maps.numpy() >= 0.5
    for i, m in enumerate(masks):
        assert m.shape == (4, 64, 400)
        assert not m[1].any()  # rejected: empty whatever the segmenter draws
        for c in (0, 2, 3):
            np.testing.assert_array_equal(m[c], want[i, c])
    assert want[:, 1].any(), "the test needs a segmenter that draws class 2 somewhere"
    # a label that names the class overrides the classifier's no
    gate = np.array([[-1, 1, -1, -1]] * 3, np.int8)
    masks, _ = composed.masks(images, shapes, gate=gate)
    np.testing.assert_array_equal(np.stack(masks)[:, 1], want[:, 1])


def test_composition_comes_from_the_card_only_for_the_same_classifier_weights(pair, tmp_path, random_artifact,
                                                                             random_segmenter):
    cls, _ = pair
    cls_card = load_predictor(cls, "cpu").card
    tuned = Composition(confidence=0.7, threshold=0.4, classifier=cls, classifier_version=weights_digest(cls_card),
                        tuned_on="pseudo-masks of somewhere")
    seg = str(tmp_path / "seg")
    seg_card = random_segmenter(seg, metrics={"composed": tuned.model_dump(mode="json")})
    comp, why = composition_for(seg_card, cls_card)
    assert comp == tuned and "pseudo-masks" in why
    other = random_artifact(str(tmp_path / "other"), seed=1)
    comp, why = composition_for(seg_card, other)
    assert comp == DEFAULT_COMPOSITION and "other classifier weights" in why


def test_a_composition_refuses_two_classifiers_or_other_classes(pair, tmp_path, random_segmenter):
    cls, seg = pair
    c = load_predictor(cls, "cpu")
    with pytest.raises(ValueError, match="a classifier and a segmenter"):
        ComposedPredictor(c, c, DEFAULT_COMPOSITION)
    from cam2seg.artifact import load_card, update_card

    renamed = str(tmp_path / "renamed")
    random_segmenter(renamed)
    update_card(renamed, load_card(renamed), class_names=["pit", "scratch", "stain", "dent"])
    with pytest.raises(ValueError, match="pit"):
        load_composed(cls, renamed, "cpu")


def _histograms(n_pos: int, n_abs: int, pos_prob: float, abs_prob: float):
    """One class: n_pos images whose map is 0.9 over a true mask of 100 pixels (of 1000), n_abs
    clean images whose map is 0.9 over 100 pixels; the classifier gives pos_prob / abs_prob."""
    bins = tuning.BINS
    n = n_pos + n_abs
    h_all = np.zeros((n, 1, bins), np.int64)
    h_in = np.zeros((n, 1, bins), np.int64)
    h_all[:, 0, 0] = 900
    h_all[:, 0, 90] = 100
    h_in[:n_pos, 0, 90] = 100
    true_area = np.zeros((n, 1), np.int64)
    true_area[:n_pos] = 100
    probs = np.array([[pos_prob]] * n_pos + [[abs_prob]] * n_abs, np.float32)
    return h_all, h_in, true_area, probs


def test_constrained_tuning_never_switches_a_class_off():
    # a weak class: the classifier can't tell its few defective images from the many clean ones
    # (both 0.6), so the Kaggle mean alone is best with the class off (confidence above 0.6)
    h_all, h_in, true_area, probs = _histograms(5, 95, 0.6, 0.6)
    free = tuning.sweep(h_all, h_in, true_area, probs, 1000)
    assert free.per_class_pp.confidence[0] > 0.6  # the unconstrained tuning switches it off
    res = tuning.constrained_sweep(h_all, h_in, true_area, probs, 1000, floor=0.8, ceiling=0.02)
    assert res.positive[0] >= 0.8 * 1.0 - 1e-9 and res.positive[0] > 0  # kept on
    assert not res.met[0]  # it cannot also keep the clean images clean: said, not hidden
    assert res.absent_masked[0] == pytest.approx(1.0)


def test_constrained_tuning_meets_both_bounds_when_it_can():
    # the classifier separates the two (0.9 vs 0.3): a confidence between them meets both bounds
    h_all, h_in, true_area, probs = _histograms(20, 80, 0.9, 0.3)
    res = tuning.constrained_sweep(h_all, h_in, true_area, probs, 1000, floor=0.8, ceiling=0.02)
    assert res.met[0] and res.absent_masked[0] == 0.0 and res.positive[0] == pytest.approx(1.0)
    assert 0.3 < res.pp.confidence[0] <= 0.9
    assert res.kaggle[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="floor and ceiling"):
        tuning.constrained_sweep(h_all, h_in, true_area, probs, 1000, floor=1.5)


def test_constrained_tuning_lowers_the_floor_before_it_breaks_the_ceiling():
    # half the defects are clear to the classifier (0.9), half look like the clean images (0.3 vs 0.5): every
    # setting that keeps all defects masks every clean image, and the ceiling holds only with half the defects
    h_all, h_in, true_area, probs = _histograms(20, 80, 0.9, 0.5)
    probs[10:20] = 0.3
    res = tuning.constrained_sweep(h_all, h_in, true_area, probs, 1000, floor=0.8, ceiling=0.02)
    assert not res.met[0]  # said: the floor as given was not kept
    assert res.absent_masked[0] == 0.0 and 0.5 < res.pp.confidence[0] <= 0.9  # the ceiling was
    assert res.positive[0] == pytest.approx(0.5) and res.floor[0] == pytest.approx(0.4)  # 1/2 of 0.8, not 0
    # with no floor to lower (the clean images' scores above every defect's), it stays on and says so
    h_all, h_in, true_area, probs = _histograms(20, 80, 0.3, 0.9)
    res = tuning.constrained_sweep(h_all, h_in, true_area, probs, 1000, floor=0.8, ceiling=0.02)
    assert not res.met[0] and res.positive[0] > 0 and res.absent_masked[0] == pytest.approx(1.0)
    assert res.floor[0] == pytest.approx(0.8 * tuning.RELAXED[-1])


def test_fold_health_check_names_each_fold_and_class_that_did_not_learn():
    from cam2seg.config import ClassifierConfig
    from cam2seg.pipeline.classify import weak_folds
    from cam2seg.train.fold_runner import config_digest

    aucs = [[0.95, 0.91, 0.99], [0.97, 0.55, float("nan")]]
    lines = weak_folds(aucs, ["pit", "scratch", "stain"], 0.6)
    assert lines == ["fold 1's validation ROC-AUC for scratch is 0.550"]
    assert weak_folds(aucs, ["pit", "scratch", "stain"], 0.0) == []
    assert len(weak_folds(aucs, ["pit", "scratch", "stain"], 0.96)) == 3
    # the check's threshold is not part of what the weights depend on (no retraining when it changes)
    assert config_digest(ClassifierConfig(min_fold_auc=0.0)) == config_digest(ClassifierConfig())
