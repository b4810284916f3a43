import shutil

import numpy as np
import pytest

from cam2seg import archive, rle
from cam2seg.archive import Archive, ArchiveError


def _copy(small_archive, tmp_path):
    dst = tmp_path / "a"
    shutil.copytree(small_archive, dst)
    return dst


def test_open_severstal_layout(small_archive):
    a = Archive.open(str(small_archive))
    assert a.has_masks and len(a) == 60
    assert a.image_ids == sorted(a.image_ids)
    assert a.labels.shape == (60, 4) and a.labels.dtype == np.uint8
    # A clean image is absent from train.csv but present with zero labels.
    text = (small_archive / "train.csv").read_text()
    clean = [iid for iid, lab in zip(a.image_ids, a.labels) if not lab.any()]
    assert clean and all(iid not in text for iid in clean)
    iid = next(iid for iid, d in zip(a.image_ids, a.defective) if d)
    m = a.masks(iid)
    assert m.shape == (4, 64, 400)
    assert (m.any(axis=(1, 2)) == a.labels[a.index(iid)].astype(bool)).all()
    areas = a.true_areas()
    assert areas[a.index(iid)].tolist() == m.sum(axis=(1, 2)).tolist()
    img = a.read_image(iid)
    assert img.shape == (64, 400) and img.dtype == np.uint8


def test_labels_only_file_matches_masks_file(small_archive):
    full = Archive.open(str(small_archive))
    wide = Archive.open(str(small_archive / "labels.csv"))
    assert not wide.has_masks
    assert wide.image_ids == full.image_ids
    assert (wide.labels == full.labels).all()
    with pytest.raises(ArchiveError, match="labels only"):
        wide.masks(wide.image_ids[0])


def test_labels_only_long_csv(small_archive, tmp_path):
    root = _copy(small_archive, tmp_path)
    lines = (root / "train.csv").read_text().splitlines()
    stripped = [lines[0]] + [",".join(l.split(",")[:2]) + "," for l in lines[1:]]
    (root / "train.csv").write_text("\n".join(stripped) + "\n")
    a = Archive.open(str(root))
    assert not a.has_masks
    assert (a.labels == Archive.open(str(small_archive)).labels).all()


def _write_csv(root, text):
    (root / "train.csv").write_text(text)


@pytest.mark.parametrize("csv, message", [
    ("ImageId,ClassId\nsynth_0000000.jpg,1\n", "train.csv: missing column.*EncodedPixels"),
    ("ImageId,ClassId,EncodedPixels\nsynth_0000000.jpg,1,1 3\nsynth_0000001.jpg,5,1 3\n",
     "line 3: ClassId 5 out of range 1..4"),
    ("ImageId,ClassId,EncodedPixels\nsynth_0000000.jpg,1,1 3\nsynth_0000000.jpg,1,9 3\n",
     r"duplicate.*lines 2 and 3"),
    ("ImageId,ClassId,EncodedPixels\nsynth_0000000.jpg,1,1 3\nghost.jpg,2,1 3\n", "line 3: ghost.jpg"),
    ("ImageId,ClassId,EncodedPixels\n../../etc/passwd,1,1 3\n", "line 2: bad ImageId"),
], ids=["missing-column", "class-out-of-range", "duplicate-rows", "missing-image", "unsafe-image-id"])
def test_bad_csv_names_the_problem(small_archive, tmp_path, csv, message):
    root = _copy(small_archive, tmp_path)
    _write_csv(root, csv)
    with pytest.raises(ArchiveError, match=message):
        Archive.open(str(root))


def test_bad_rle_and_mixed_rows(small_archive, tmp_path):
    root = _copy(small_archive, tmp_path)
    _write_csv(root, "ImageId,ClassId,EncodedPixels\nsynth_0000000.jpg,1,1 3 4\n")
    with pytest.raises(ArchiveError, match="line 2: EncodedPixels: odd number"):
        Archive.open(str(root))
    _write_csv(root, "ImageId,ClassId,EncodedPixels\nsynth_0000000.jpg,1,1 3\nsynth_0000001.jpg,1,\n")
    with pytest.raises(ArchiveError, match="either masks"):
        Archive.open(str(root))
    # A run past the image is caught when decoding, naming the line.
    _write_csv(root, "ImageId,ClassId,EncodedPixels\nsynth_0000000.jpg,1,1 999999\n")
    a = Archive.open(str(root))
    with pytest.raises(ArchiveError, match="line 2.*past the image"):
        a.masks("synth_0000000.jpg")


def test_wide_csv_errors(small_archive, tmp_path):
    root = _copy(small_archive, tmp_path)
    (root / "train.csv").unlink()
    (root / "labels.csv").write_text("ImageId,1,2,4\nsynth_0000000.jpg,0,1,0\n")
    with pytest.raises(ArchiveError, match="one 0/1 column per class"):
        Archive.open(str(root))
    # three numbered columns are three classes now; a caller expecting four says so
    (root / "labels.csv").write_text("ImageId,1,2,3\nsynth_0000000.jpg,0,1,0\n")
    assert Archive.open(str(root), check_images=False).class_names == ["class 1", "class 2", "class 3"]
    with pytest.raises(ArchiveError, match="labels.csv: 3 classes found.*num_classes=4"):
        Archive.open(str(root), num_classes=4)
    (root / "labels.csv").write_text("ImageId,class_1,class_2,class_3,class_4\nsynth_0000000.jpg,0,2,0,0\n")
    with pytest.raises(ArchiveError, match="line 2: class columns must be 0 or 1"):
        Archive.open(str(root))
    (root / "labels.csv").write_text("ImageId,1,2,3,4\nsynth_0000000.jpg,0,1,0,0\nsynth_0000000.jpg,0,1,0,0\n")
    with pytest.raises(ArchiveError, match="duplicate ImageId"):
        Archive.open(str(root))


def test_no_csv_and_no_images(tmp_path):
    with pytest.raises(ArchiveError, match="no train.csv or labels.csv"):
        Archive.open(str(tmp_path))
    (tmp_path / "train.csv").write_text("ImageId,ClassId,EncodedPixels\n")
    with pytest.raises(ArchiveError, match="no train_images"):
        Archive.open(str(tmp_path))


def test_iter_class_masks(small_archive):
    a = Archive.open(str(small_archive))
    got = list(archive.iter_class_masks(a, limit=5, shape=(64, 400)))
    assert got and all(m.any() and 1 <= c <= 4 for c, m in got)
    first = next(iid for iid, d in zip(a.image_ids, a.defective) if d)
    assert (got[0][1] == rle.decode(a.rle(first, got[0][0]), 64, 400)).all()
