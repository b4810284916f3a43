"""Any factory's archive end to end: a 3-class colour archive with named classes and no true masks
through train-classifiers -> label --labels -> train-segmenter -> report -> export-coco with the
defaults, and a one-class grey archive through training and labelling; names in every card,
marker, the report and the COCO categories; the refusals when class lists disagree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow

NAMES = ["pit", "scratch", "stain"]
TRAIN = ["--folds", "2", "--epochs", "1", "--size", "32x200", "--encoder", "mobilenetv3_small_100",
         "--batch-size", "8"]


def _ok(argv):
    rc, out, err = run_cli(argv)
    assert rc == 0, f"{argv[0]} failed ({rc}): {err[-2000:]}"
    return out, err


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory, local_ray):
    """The whole labels-only path on a colour archive whose labels.csv names three classes."""
    root = tmp_path_factory.mktemp("colour")
    arch, model, st, seg = root / "archive", root / "model", root / "store", root / "seg"
    _ok(["synth", str(arch), "--classes", "3", "--class-names", ",".join(NAMES), "--color", "--images", "40",
         "--height", "32", "--width", "200", "--seed", "1"])
    (arch / "train.csv").unlink()  # no true masks: the labels-only case
    # the fold health check: a bar no 1-epoch fold reaches fails the run, naming fold and class, and writes
    # no model; the folds stay, so the run with the defaults (check off) assembles them without training
    strict = root / "strict.yaml"
    strict.write_text("classifier:\n  min_fold_auc: 0.999\n")
    rc, _, err = run_cli(["train-classifiers", "--data", str(arch / "labels.csv"), "--out", str(model), *TRAIN,
                          "--config", str(strict)])
    assert rc == 2 and "fold health check" in err and "validation ROC-AUC for " in err, err[-2000:]
    assert any(f"for {n} is" in err for n in NAMES) and not (model / "model.json").exists()
    _, err = _ok(["train-classifiers", "--data", str(arch / "labels.csv"), "--out", str(model), *TRAIN])
    assert err.count("finished in an earlier run, reusing it") == 2, err[-2000:]
    label_out, _ = _ok(["label", "--model", str(model), "--images", str(arch / "train_images"), "--out", str(st),
                        "--labels", str(arch)])
    _ok(["train-segmenter", "--data", str(arch), "--masks", str(st), "--out", str(seg), "--folds", "2",
         "--epochs", "1", "--size", "32x200", "--encoder", "tu-mobilenetv3_small_100", "--batch-size", "8"])
    _ok(["report", "--out", str(root / "report"), "--archive", str(arch), "--store", str(st),
         "--segmenter", str(seg), "--examples", "1"])
    _ok(["export-coco", "--store", str(st), "--out", str(root / "review.json")])
    return {"root": root, "archive": arch, "model": model, "store": st, "seg": seg, "label_out": label_out}


def test_cards_and_marker_carry_names_and_channels(colour_run):
    from cam2seg import store
    from cam2seg.artifact import load_card

    card, seg = load_card(str(colour_run["model"])), load_card(str(colour_run["seg"]))
    assert card.names == NAMES and seg.names == NAMES
    assert (card.channels, card.in_chans, seg.channels, seg.in_chans) == (3, 3, 3, 3)  # auto saw colour
    assert card.num_classes == 3 and len(card.metrics["oof_auc"]) == 3
    (marker,) = store.committed_runs(str(colour_run["store"]))
    assert marker.class_names == NAMES
    t = store.read_masks(str(colour_run["store"]))
    assert t.num_rows == 40 * 3 and sorted(set(t.column("class_id").to_pylist())) == [1, 2, 3]
    for name in NAMES:  # the label command's summary names the classes
        assert f"{name}: " in colour_run["label_out"]


def test_report_and_coco_speak_names(colour_run):
    html = (colour_run["root"] / "report" / "index.html").read_text()
    for name in NAMES:
        assert name in html
    assert "class 1" not in html
    coco = json.loads((colour_run["root"] / "review.json").read_text())
    assert [c["name"] for c in coco["categories"]] == NAMES
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]


def test_import_coco_matches_categories_by_name(colour_run, tmp_path):
    """A reviewer's file whose categories are renumbered comes back to the right classes by name."""
    from cam2seg.truemasks import read_true_masks
    from cam2seg.archive import Archive

    coco = json.loads((colour_run["root"] / "review.json").read_text())
    remap = {1: 7, 2: 5, 3: 9}  # CVAT may renumber; only the names are kept
    for c in coco["categories"]:
        c["id"] = remap[c["id"]]
        c["name"] = c["name"].upper()  # and a reviewer's capitals
    for a in coco["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    path = tmp_path / "reviewed.json"
    path.write_text(json.dumps(coco))
    out = tmp_path / "masks.csv"
    _ok(["import-coco", str(path), "--archive", str(colour_run["archive"]), "--out", str(out)])
    tm = read_true_masks(str(out), Archive.open(str(colour_run["archive"])))
    exported = {(a["image_id"], a["category_id"]) for a in coco["annotations"]}
    by_rank = {im["id"]: im["file_name"] for im in coco["images"]}
    inverse = {v: k for k, v in remap.items()}
    assert set(tm.rles) == {(by_rank[i], inverse[c]) for i, c in exported}


def test_a_model_of_other_classes_is_refused(colour_run, tmp_path):
    """Labelling a store with a model of other classes, and training a segmenter on a store of other
    classes, are refused with both lists named; so are labels of other classes."""
    grey = tmp_path / "grey4"
    _ok(["synth", str(grey), "--images", "16", "--height", "32", "--width", "200", "--seed", "2"])
    rc, _, err = run_cli(["label", "--model", str(colour_run["model"]), "--images", str(grey / "train_images"),
                          "--out", str(tmp_path / "s"), "--labels", str(grey)])
    assert rc == 2 and "['class 1', 'class 2', 'class 3', 'class 4']" in err and str(NAMES) in err
    rc, _, err = run_cli(["train-segmenter", "--data", str(grey), "--masks", str(colour_run["store"]),
                          "--out", str(tmp_path / "seg"), "--folds", "2", "--epochs", "1", "--size", "32x200"])
    assert rc == 2 and "the label store" in err and str(NAMES) in err and "'class 4'" in err
    assert not (tmp_path / "seg").exists()


def _mvtec_layout(synth_root, out):
    """A one-class synthetic archive rewritten in MVTec AD's layout (images/<class>/, good/ clean,
    ground_truth/<class>/<stem>_mask.png), every other image enlarged to 48x300: mixed sizes."""
    import cv2
    from PIL import Image

    from cam2seg.archive import Archive

    src = Archive.open(str(synth_root))
    sizes = {}
    for k, iid in enumerate(src.image_ids):
        img, mask = src.read_image(iid), src.masks(iid)[0]
        if k % 2:
            img = cv2.resize(img, (300, 48), interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask.astype(np.uint8), (300, 48), interpolation=cv2.INTER_NEAREST).astype(bool)
        folder = "defect" if mask.any() else "good"
        stem = iid.rsplit(".", 1)[0]
        (out / "images" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(out / "images" / folder / f"{stem}.png")
        if mask.any():
            (out / "ground_truth" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "ground_truth" / folder / f"{stem}_mask.png")
        sizes[f"{folder}/{stem}.png"] = img.shape[:2]
    return sizes


@pytest.fixture(scope="module")
def one_class_run(tmp_path_factory, local_ray):
    """One defect class in a folder-per-class archive with PNG masks and two image sizes."""
    root = tmp_path_factory.mktemp("one")
    synth_root, arch, model, st = root / "synth", root / "archive", root / "model", root / "store"
    _ok(["synth", str(synth_root), "--classes", "1", "--images", "32", "--height", "32", "--width", "200",
         "--seed", "4"])
    sizes = _mvtec_layout(synth_root, arch)
    _ok(["train-classifiers", "--data", str(arch), "--out", str(model), *TRAIN])
    _ok(["label", "--model", str(model), "--images", str(arch / "images"), "--out", str(st), "--labels", str(arch)])
    return {"archive": arch, "model": model, "store": st, "sizes": sizes}


def test_one_class_is_a_first_class_case(one_class_run):
    from cam2seg import store
    from cam2seg.artifact import load_card

    card = load_card(str(one_class_run["model"]))
    assert (card.num_classes, card.names, card.channels, card.in_chans) == (1, ["defect"], 1, 1)
    t = store.read_masks(str(one_class_run["store"])).to_pydict()
    assert len(t["image_id"]) == 32 and set(t["class_id"]) == {1}
    assert all(0 <= s <= 1 for s in t["score"])
    # masks at each image's own size, whatever size the model ran at
    assert {i: (h, w) for i, h, w in zip(t["image_id"], t["height"], t["width"])} == one_class_run["sizes"]
    assert {h for h, _ in one_class_run["sizes"].values()} == {32, 48}
    # image labels gate: every clean image's mask is empty
    clean = [e for i, e in zip(t["image_id"], t["encoded_pixels"]) if i.startswith("good/")]
    assert clean and not any(clean)
    rc, out, err = run_cli(["evaluate", "--model", str(one_class_run["model"]), "--truth",
                            str(one_class_run["archive"]), "--store", str(one_class_run["store"]), "--no-guided",
                            "--no-write"])
    assert rc == 0, err[-2000:]
    assert "defect" in out and "Kaggle" in out
    report = one_class_run["archive"].parent / "report"
    _ok(["report", "--out", str(report), "--archive", str(one_class_run["archive"]), "--store",
         str(one_class_run["store"]), "--examples", "1"])
    html = (report / "index.html").read_text()
    assert "<h3>defect</h3>" in html and "(the paper's Table 3)" in html
