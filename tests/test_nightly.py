"""The nightly run's retrain policy and its checks (no Ray here: the submitted nightly job is in
test_job_submit.py, a retraining on Ray in test_segmenter_ray.py)."""

import pytest

from cam2seg import io, store
from cam2seg.artifact import ModelCard, write_artifact
from cam2seg.cli import main
from cam2seg.config import load_config
from cam2seg.pipeline.nightly import new_labels, retrain_decision, run_nightly


def _run(url: str, run_id: str, labeled: int) -> None:
    store.commit(url, run_id, {"labeled": labeled, "complete": True, "parts": {"masks": [], "errors": []}})


def _segmenter_card(url: str, masks: str, runs: list[str], supervision: dict | None = None) -> ModelCard:
    card = ModelCard(kind="segmenter", architecture="tu-mobilenetv3_small_100", num_classes=4, class_ids=[1, 2, 3, 4],
                     input_size=(32, 200), mean=(0.5,) * 3, std=(0.2,) * 3, folds=1, fold_files=[],
                     training={"masks": masks, "store_runs": runs, "supervision": supervision})
    return write_artifact(url, card, [{}])


def test_new_labels_counts_runs_the_segmenter_has_not_seen():
    runs = [store.RunMarker(run_id="a", labeled=10), store.RunMarker(run_id="b", labeled=5), store.RunMarker(run_id="c")]
    assert new_labels(runs, []) == 15
    assert new_labels(runs, ["a"]) == 5
    assert new_labels(runs, ["a", "b", "c"]) == 0


def test_retrain_decision(tmp_path):
    labels, seg = io.absolute(str(tmp_path / "labels")), str(tmp_path / "seg")
    _run(labels, "2026-11-01-a", 30)
    _run(labels, "2026-11-02-b", 25)
    off = retrain_decision(labels, seg, 0)
    assert not off.due and "off" in off.reason
    first = retrain_decision(labels, seg, 50)   # no segmenter yet: every label counts
    assert first.due and first.new == 55 and "no segmenter" in first.reason
    _segmenter_card(seg, labels, ["2026-11-01-a", "2026-11-02-b"])
    assert retrain_decision(labels, seg, 50).new == 0
    _run(labels, "2026-11-03-c", 40)
    later = retrain_decision(labels, seg, 50)
    assert not later.due and later.new == 40 and "not retraining yet" in later.reason
    _run(labels, "2026-11-04-d", 10)
    assert retrain_decision(labels, seg, 50).due
    _segmenter_card(seg, "truth", [])           # trained on other masks: all of this store is new
    other = retrain_decision(labels, seg, 100)
    assert other.due and other.new == 105 and "other masks" in other.reason


def test_a_changed_corrections_file_makes_a_retraining_due(tmp_path):
    from cam2seg.pipeline.segment import file_digest

    labels, seg, fixes = io.absolute(str(tmp_path / "labels")), str(tmp_path / "seg"), tmp_path / "fixes.csv"
    _run(labels, "2026-11-01-a", 30)
    fixes.write_text("ImageId,ClassId,EncodedPixels\na.png,1,1 5\n")
    _segmenter_card(seg, labels, ["2026-11-01-a"], {"true_masks": str(fixes), "true_masks_sha256": file_digest(str(fixes))})
    same = retrain_decision(labels, seg, 50, str(fixes))
    assert not same.due and "corrections" not in same.reason
    fixes.write_text("ImageId,ClassId,EncodedPixels\na.png,1,1 5\nb.png,2,3 4\n")  # a reviewer's new masks
    changed = retrain_decision(labels, seg, 50, str(fixes))
    assert changed.due and changed.new == 0 and "corrections file changed since" in changed.reason
    _segmenter_card(seg, labels, ["2026-11-01-a"])  # trained without corrections
    assert "was not used by it" in retrain_decision(labels, seg, 50, str(fixes)).reason
    with pytest.raises(ValueError, match="set nightly.retrain_after too"):
        run_nightly(load_config(overrides={"nightly": {"model": "m", "images": "x", "store": "y",
                                                       "true_masks": str(fixes)}}))


@pytest.mark.parametrize("nightly,message", [
    ({"images": "x", "store": "y"}, "nightly needs model"),
    ({"model": "m", "images": "x", "store": "y", "retrain_after": 5}, "needs nightly.data"),
    ({"model": "seg", "images": "x", "store": "y", "retrain_after": 5, "data": "d", "segmenter": "seg"},
     "learn from its own masks"),
])
def test_run_nightly_refuses_incomplete_settings(nightly, message):
    with pytest.raises(ValueError, match=message):
        run_nightly(load_config(overrides={"nightly": nightly}))


def test_retraining_needs_labels_of_the_labeled_images(small_archive, tmp_path):
    cfg = load_config(overrides={"nightly": {"model": str(tmp_path / "clf"), "images": str(tmp_path / "incoming"),
                                             "store": str(tmp_path / "labels"), "retrain_after": 5,
                                             "data": str(small_archive), "segmenter": str(tmp_path / "seg")}})
    with pytest.raises(ValueError, match="image ids would not match"):
        run_nightly(cfg)


def test_nightly_command_errors(tmp_path, capsys):
    assert main(["nightly", "--images", str(tmp_path)]) == 2
    assert "nightly needs model, store" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("nightly:\n  model: m\n  sometimes: true\n")
    assert main(["nightly", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "nightly.sometimes" in capsys.readouterr().err
