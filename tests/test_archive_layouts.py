"""Archive layouts beyond Severstal's: named classes, any number of them, long labels CSVs, folder
per class with MVTec-style PNG masks, mixed image sizes (tiny images in tmp_path; no Ray, no torch)."""

import numpy as np
import pytest
from PIL import Image

from cam2seg import rle
from cam2seg.archive import Archive, ArchiveError
from cam2seg.truemasks import covered_archive, masks_csv, read_true_masks


def _png(path, h=6, w=8, value=128, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), value, np.uint8)).convert(mode).save(path)


def _csv_archive(tmp_path, files: dict[str, str], images=("a.png", "b.png", "c.png"), sizes=None):
    root = tmp_path / "arch"
    for name in images:
        _png(root / "train_images" / name, *(sizes or {}).get(name, (6, 8)))
    for name, text in files.items():
        (root / name).write_text(text)
    return root


# ------------------------------------------------------------------ wide labels.csv
def test_wide_labels_with_named_classes(tmp_path):
    root = _csv_archive(tmp_path, {"labels.csv": "ImageId,scratch,dent,stain\na.png,1,0,0\nb.png,0,1,1\nc.png,0,0,0\n"})
    a = Archive.open(str(root))
    assert a.class_names == ["scratch", "dent", "stain"] and a.class_ids == [1, 2, 3] and a.num_classes == 3
    assert a.labels.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]] and not a.has_masks
    assert a.images_url == f"{root}/train_images"


def test_wide_labels_with_one_class(tmp_path):
    root = _csv_archive(tmp_path, {"labels.csv": "ImageId, defect \na.png,1\nb.png,0\nc.png,0\n"})
    a = Archive.open(str(root))
    assert a.class_names == ["defect"] and a.labels[:, 0].tolist() == [1, 0, 0]


def test_a_named_header_may_name_class_k_k(tmp_path):
    root = _csv_archive(tmp_path, {"labels.csv": "ImageId,pit,2\na.png,1,0\nb.png,0,1\nc.png,0,0\n",
                                   "train.csv": "ImageId,ClassId,EncodedPixels\na.png,pit,\nb.png,2,\n"})
    a = Archive.open(str(root))
    assert a.class_names == ["pit", "2"] and a.labels.tolist() == [[1, 0], [0, 1], [0, 0]]
    assert (Archive.open(str(root / "labels.csv")).labels == a.labels).all()


def test_numbered_headers_keep_working(tmp_path):
    root = _csv_archive(tmp_path, {"labels.csv": "ImageId,class_2,class_1\na.png,1,0\nb.png,0,1\nc.png,0,0\n"})
    a = Archive.open(str(root), num_classes=2)
    assert a.class_names == ["class 1", "class 2"]
    assert a.labels.tolist() == [[0, 1], [1, 0], [0, 0]]  # mapped by number, not position
    assert Archive.open(str(root), classes=["b", "a"]).class_names == ["b", "a"]


@pytest.mark.parametrize("header, message", [
    ("ImageId,dent,scratch,dent", r"labels\.csv: column 4: class name 'dent' repeats column 2"),
    ("ImageId,dent,,scratch", r"labels\.csv: column 3: class name '' is empty"),
    ('ImageId,dent,"scr\tatch"', r"labels\.csv: column 3: class name 'scr\\tatch' has non-printable"),
    ("ImageId,dent," + "x" * 101, r"labels\.csv: column 3: class name 'x{100}'\.\.\. is longer than 100"),
    ("ImageId", r"labels\.csv: expected 1\.\.127 class columns"),
    ("ImageId,2,1,dent", r"labels\.csv: numbered class columns mixed with named ones"),
], ids=["duplicate", "empty", "non-printable", "too-long", "no-class", "mixed"])
def test_bad_wide_headers_name_the_file_and_column(tmp_path, header, message):
    root = _csv_archive(tmp_path, {"labels.csv": header + "\n"})
    with pytest.raises(ArchiveError, match=message):
        Archive.open(str(root))


def test_classes_override_reorders_a_named_header_and_must_match(tmp_path):
    root = _csv_archive(tmp_path, {"labels.csv": "ImageId,scratch,dent\na.png,1,0\nb.png,0,1\nc.png,0,0\n"})
    a = Archive.open(str(root), classes=["dent", "scratch"])
    assert a.class_names == ["dent", "scratch"] and a.labels.tolist() == [[0, 1], [1, 0], [0, 0]]
    with pytest.raises(ArchiveError, match="labels.csv: the header's classes"):
        Archive.open(str(root), classes=["dent", "hole"])
    with pytest.raises(ArchiveError, match="classes="):
        Archive.open(str(root), classes="dent")


# ------------------------------------------------------------------ long CSVs
def test_train_csv_with_name_ids_takes_the_order_of_labels_csv_beside(tmp_path):
    m = np.zeros((6, 8), bool)
    m[1:3, 2:5] = True
    root = _csv_archive(tmp_path, {
        "train.csv": f"ImageId,ClassId,EncodedPixels\na.png,stain,{rle.encode(m)}\nb.png,1,{rle.encode(m)}\n",
        "labels.csv": "ImageId,scratch,dent,stain\na.png,0,0,1\nb.png,1,0,0\nc.png,0,0,0\n"})
    a = Archive.open(str(root))
    assert a.source.endswith("train.csv") and a.has_masks
    assert a.class_names == ["scratch", "dent", "stain"]  # "dent" has no row at all: the header says it is there
    assert a.labels.tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 0]]  # c.png clean: from the image listing
    assert (a.masks("a.png")[2] == m).all() and not a.masks("a.png")[:2].any()
    assert a.rle("b.png", 1) == rle.encode(m) and a.true_areas().tolist() == [[0, 0, 6], [6, 0, 0], [0, 0, 0]]


def test_train_csv_with_name_ids_alone_sorts_them(tmp_path):
    root = _csv_archive(tmp_path, {"train.csv": "ImageId,ClassId,EncodedPixels\na.png,stain,\nb.png,dent,\n"
                                                "b.png,stain,\n"})
    a = Archive.open(str(root))
    assert a.class_names == ["dent", "stain"] and not a.has_masks
    assert a.labels.tolist() == [[0, 1], [1, 1], [0, 0]]
    with pytest.raises(ArchiveError, match=r"2 classes found \('dent', 'stain'\), but num_classes=4"):
        Archive.open(str(root), num_classes=4)
    (root / "train.csv").write_text("ImageId,ClassId,EncodedPixels\na.png,stain,\nb.png,hole,\n")
    with pytest.raises(ArchiveError, match=r"line 3: ClassId 'hole' is neither a class name"):
        Archive.open(str(root), classes=["dent", "stain"])


def test_integer_ids_without_labels_csv_count_up_to_the_largest(tmp_path):
    root = _csv_archive(tmp_path, {"train.csv": "ImageId,ClassId,EncodedPixels\na.png,3,\nb.png,1,\n"})
    a = Archive.open(str(root))
    assert a.class_names == ["class 1", "class 2", "class 3"] and a.labels.tolist() == [[0, 0, 1], [1, 0, 0],
                                                                                         [0, 0, 0]]
    assert Archive.open(str(root), num_classes=3).num_classes == 3
    with pytest.raises(ArchiveError, match=r"3 classes found.*num_classes=4"):
        Archive.open(str(root), num_classes=4)
    assert Archive.open(str(root), classes=["x", "y", "z", "w"]).class_names == ["x", "y", "z", "w"]
    with pytest.raises(ArchiveError, match="line 2: ClassId 3 out of range 1..2"):
        Archive.open(str(root), classes=["x", "y"])
    (root / "train.csv").write_text("ImageId,ClassId,EncodedPixels\na.png,999999999,\n")
    with pytest.raises(ArchiveError, match="line 2: ClassId 999999999: over 127 classes"):
        Archive.open(str(root))


def test_long_labels_csv_with_names_and_indices(tmp_path):
    root = _csv_archive(tmp_path, {"labels.csv": "ImageId,Class\na.png,stain\nb.png,dent\nb.png,stain\n"})
    a = Archive.open(str(root))
    assert a.class_names == ["dent", "stain"] and not a.has_masks
    assert a.image_ids == ["a.png", "b.png", "c.png"] and a.labels.tolist() == [[0, 1], [1, 1], [0, 0]]
    # indices, and an explicit CSV with another name; class names from classes=
    (root / "mine.csv").write_text("ImageId,Class\na.png,2\nb.png,1\n")
    a = Archive.open(str(root / "mine.csv"), classes=["dent", "stain"])
    assert a.labels.tolist() == [[0, 1], [1, 0], [0, 0]]
    # a wide labels.csv beside an explicit long one gives the order
    (root / "labels.csv").write_text("ImageId,stain,dent\na.png,1,0\nb.png,1,1\nc.png,0,0\n")
    assert Archive.open(str(root / "mine.csv")).class_names == ["stain", "dent"]
    (root / "mine.csv").write_text("ImageId,Class\na.png,2\na.png,dent\nb.png,3\n")
    with pytest.raises(ArchiveError, match=r"mine\.csv: 1 bad row\(s\): line 4: Class 3 out of range 1\.\.2"):
        Archive.open(str(root / "mine.csv"))
    (root / "mine.csv").write_text("ImageId,Class\na.png,2\na.png,dent\n")
    with pytest.raises(ArchiveError, match=r"mine\.csv: 1 duplicate \(ImageId, Class\) row\(s\): lines 2 and 3"):
        Archive.open(str(root / "mine.csv"))


def test_no_layout_lists_what_was_looked_for(tmp_path):
    with pytest.raises(ArchiveError, match=r"no train\.csv or labels\.csv.*looked for: train\.csv.*folder per class"):
        Archive.open(str(tmp_path))


# ------------------------------------------------------------------ folder per class
def _folders(tmp_path, files, clean="good"):
    root = tmp_path / "mv"
    for rel, shape in files.items():
        _png(root / "images" / rel.replace("GOOD", clean), *shape)
    return root


def test_folder_per_class(tmp_path):
    root = _folders(tmp_path, {"GOOD/000.png": (6, 8), "GOOD/001.png": (6, 8), "scratch/000.png": (6, 8),
                               "scratch/deep/001.png": (6, 8), "crack/000.png": (6, 8)})
    (root / "images" / "scratch" / "notes.txt").write_text("not an image")
    (root / "images" / "scratch" / "Thumbs.db").write_bytes(b"\0\1")
    (root / "images" / "crack" / ".DS_Store").write_bytes(b"\0\1")
    (root / "images" / ".cache").mkdir()  # hidden: not a class
    (root / "images" / "hole").mkdir()  # a class with no images
    a = Archive.open(str(root))
    assert a.class_names == ["crack", "hole", "scratch"] and not a.has_masks
    assert a.image_ids == ["crack/000.png", "good/000.png", "good/001.png", "scratch/000.png",
                           "scratch/deep/001.png"]
    assert a.labels.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 1]]
    assert a.images_url == f"{root}/images" and a.image_shape("scratch/deep/001.png") == (6, 8)
    assert a.read_image("crack/000.png").shape == (6, 8)
    a.check_images()
    with pytest.raises(ArchiveError, match="labels only"):
        a.masks("crack/000.png")
    assert Archive.open(str(root), classes=["scratch", "crack", "hole", "dent"]).class_names == [
        "scratch", "crack", "hole", "dent"]
    with pytest.raises(ArchiveError, match=r"folder\(s\) 'hole', 'scratch' are neither classes="):
        Archive.open(str(root), classes=["crack"])
    with pytest.raises(ArchiveError, match="names the clean folder"):
        Archive.open(str(root), classes=["crack", "good"])


def test_folder_per_class_custom_clean_name(tmp_path):
    root = _folders(tmp_path, {"GOOD/000.png": (6, 8), "dent/000.png": (6, 8)}, clean="ok")
    a = Archive.open(str(root), clean="ok")
    assert a.class_names == ["dent"] and a.labels.tolist() == [[1], [0]] and a.image_ids == ["dent/000.png",
                                                                                            "ok/000.png"]
    assert Archive.open(str(root)).class_names == ["dent", "ok"]  # "good" expected: "ok" is a class then


def test_folder_per_class_refuses_loose_images_and_no_classes(tmp_path):
    root = _folders(tmp_path, {"GOOD/000.png": (6, 8)})
    with pytest.raises(ArchiveError, match="no class folders besides good/"):
        Archive.open(str(root))
    _png(root / "images" / "loose.png")
    with pytest.raises(ArchiveError, match=r"1 image\(s\) outside any class folder.*loose\.png"):
        Archive.open(str(root))
    (root / "images" / "loose.png").unlink()
    (root / "images" / "dent").mkdir()
    (root / "images" / "dent" / "0.png").write_bytes(b"")
    with pytest.raises(ArchiveError, match=r"unreadable image\(s\) under images/: dent/0\.png \(empty file\)"):
        Archive.open(str(root))
    assert Archive.open(str(root), strict_images=False).image_ids == ["dent/0.png", "good/000.png"]


# ------------------------------------------------------------------ MVTec PNG masks
def _mask_png(path, mask, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).convert(mode).save(path)


def _mvtec(tmp_path):
    root = _folders(tmp_path, {"GOOD/000.png": (6, 8), "scratch/000.png": (6, 8), "scratch/sub/001.png": (5, 7),
                               "crack/000.png": (6, 8)})
    m1 = np.zeros((6, 8), bool)
    m1[1:4, 2:6] = True
    m2 = np.zeros((5, 7), bool)
    m2[0, :] = True
    m3 = np.zeros((6, 8), bool)
    m3[5, 7] = True
    _mask_png(root / "ground_truth" / "scratch" / "000_mask.png", m1)
    _mask_png(root / "ground_truth" / "scratch" / "sub" / "001_mask.png", m2, mode="1")
    palette = Image.fromarray(m3.astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 200, 30, 30])
    (root / "ground_truth" / "crack").mkdir()
    palette.save(root / "ground_truth" / "crack" / "000_mask.png")
    return root, (m1, m2, m3)


def test_mvtec_png_masks(tmp_path):
    root, (m1, m2, m3) = _mvtec(tmp_path)
    a = Archive.open(str(root))
    assert a.has_masks and a.class_names == ["crack", "scratch"]
    m = a.masks("scratch/000.png")
    assert m.shape == (2, 6, 8) and (m[1] == m1).all() and not m[0].any()
    assert (a.masks("scratch/sub/001.png")[1] == m2).all()  # 1-bit PNG, its own size
    assert (a.masks("crack/000.png")[0] == m3).all()  # palette PNG
    assert not a.masks("good/000.png").any()
    assert a.true_areas().tolist() == [[1, 0], [0, 0], [0, 12], [0, 7]]
    assert rle.decode(a.rle("scratch/000.png", 2), 6, 8).tolist() == m1.tolist()
    assert a.rle("scratch/000.png", 1) == "" and a.rle("good/000.png", 2) == ""


def test_mvtec_missing_orphan_and_wrong_size_masks(tmp_path):
    root, (m1, _, _) = _mvtec(tmp_path)
    gt = root / "ground_truth"
    (gt / "scratch" / "000_mask.png").rename(tmp_path / "kept.png")
    with pytest.raises(ArchiveError, match=r"ground_truth: 1 image\(s\) of a defect class have no mask file: "
                                           r"scratch/000\.png \(no ground_truth/scratch/000_mask\.png\)"):
        Archive.open(str(root))
    (tmp_path / "kept.png").rename(gt / "scratch" / "000_mask.png")
    _mask_png(gt / "good" / "000_mask.png", m1)
    _mask_png(gt / "scratch" / "999_mask.png", m1)
    with pytest.raises(ArchiveError, match=r"2 mask file\(s\) with no image.*good/000_mask\.png; scratch/999_mask"):
        Archive.open(str(root))
    (gt / "good" / "000_mask.png").unlink()
    (gt / "scratch" / "999_mask.png").unlink()
    _mask_png(gt / "scratch" / "000_mask.png", np.zeros((6, 9), bool))  # the image is 6x8
    a = Archive.open(str(root))  # open only lists
    with pytest.raises(ArchiveError, match=r"scratch/000_mask\.png: mask is 6x9 \(HxW\) but its image "
                                           r"scratch/000\.png is 6x8"):
        a.masks("scratch/000.png")
    with pytest.raises(ArchiveError, match="mask is 6x9"):
        a.true_areas()
    (gt / "scratch" / "000_mask.png").write_bytes(b"not a png")
    with pytest.raises(ArchiveError, match=r"000_mask\.png: not a readable mask PNG"):
        a.rle("scratch/000.png", 2)


def test_sixteen_bit_mask_is_read_too(tmp_path):
    root, _ = _mvtec(tmp_path)
    m = np.zeros((6, 8), np.uint16)
    m[2, 3] = 1000
    Image.fromarray(m).save(root / "ground_truth" / "scratch" / "000_mask.png")
    a = Archive.open(str(root))
    assert a.masks("scratch/000.png")[1].sum() == 1 and a.masks("scratch/000.png")[1, 2, 3]


# ------------------------------------------------------------------ mixed sizes
def test_mixed_image_sizes(tmp_path):
    m = np.zeros((10, 4), bool)
    m[9, 3] = True
    root = _csv_archive(tmp_path, {"train.csv": f"ImageId,ClassId,EncodedPixels\nb.png,1,{rle.encode(m)}\n"
                                                "a.png,1,1 2\n"},
                        images=("a.png", "b.png"), sizes={"a.png": (3, 5), "b.png": (10, 4)})
    a = Archive.open(str(root))
    assert a.image_shape("a.png") == (3, 5) and a.image_shape("b.png") == (10, 4)
    assert a.masks("a.png").shape == (1, 3, 5) and a.masks("a.png").sum() == 2
    assert (a.masks("b.png")[0] == m).all() and a.true_areas().tolist() == [[2], [1]]


# ------------------------------------------------------------------ masks files (truemasks)
def test_masks_file_with_name_class_ids(tmp_path):
    root = _csv_archive(tmp_path, {"labels.csv": "ImageId,scratch,dent\na.png,1,0\nb.png,0,1\nc.png,0,0\n"})
    a = Archive.open(str(root))
    m = np.zeros((6, 8), bool)
    m[2:4, 1:3] = True
    path = tmp_path / "masks.csv"
    path.write_text(f"ImageId,ClassId,EncodedPixels\na.png,dent,{rle.encode(m)}\na.png,scratch,\nb.png,1,\n")
    tm = read_true_masks(str(path), a)
    assert tm.image_ids == ["a.png", "b.png"] and tm.rles == {("a.png", 2): rle.encode(m)}
    # what masks_csv writes (integer ids) reads back the same
    path.write_text(masks_csv({"a.png": {2: rle.encode(m)}, "b.png": {}}, a.class_ids))
    assert read_true_masks(str(path), a).rles == tm.rles
    cov = covered_archive(a, tm)
    assert cov.class_names == ["scratch", "dent"] and cov.images_dir == "train_images"
    assert cov.labels.tolist() == [[0, 1], [0, 0]] and (cov.masks("a.png")[1] == m).all()
    path.write_text("ImageId,ClassId,EncodedPixels\na.png,stain,\n")
    with pytest.raises(ArchiveError, match=r"masks\.csv: 1 bad row\(s\): line 2: ClassId 'stain' is neither"):
        read_true_masks(str(path), a)


def test_covered_archive_of_a_folder_archive_keeps_its_image_folder(tmp_path):
    root, (m1, _, _) = _mvtec(tmp_path)
    a = Archive.open(str(root))
    path = tmp_path / "masks.csv"
    path.write_text(f"ImageId,ClassId,EncodedPixels\nscratch/000.png,scratch,{rle.encode(m1)}\n")
    cov = covered_archive(a, read_true_masks(str(path), a))
    assert cov.images_url == f"{root}/images" and cov.class_names == ["crack", "scratch"]
    assert (cov.masks("scratch/000.png")[1] == m1).all() and cov.image_shape("scratch/000.png") == (6, 8)


# ------------------------------------------------------------------ the command line's archive options
def test_cli_archive_options_reach_every_open(tmp_path):
    """`--clean` / `--classes` (the config's archive section) set how a whole command reads archives:
    `cam2seg stats` on an MVTec-style archive whose clean folder is `ok`."""
    from conftest import run_cli

    root, _ = _mvtec(tmp_path)
    (root / "images" / "good").rename(root / "images" / "ok")
    rc, _, err = run_cli(["stats", str(root)])  # "ok" taken for a class whose images lack masks
    assert rc == 2 and "ok" in err and "mask" in err
    rc, out, err = run_cli(["stats", str(root), "--clean", "ok"])
    assert rc == 0, err
    rc, _, err = run_cli(["stats", str(root), "--clean", "ok", "--classes", "scratch,dent"])
    assert rc == 2 and "crack" in err  # a class folder the list does not name
    cfg = tmp_path / "c.yaml"
    cfg.write_text("archive:\n  clean: ok\n  classes: scratch,crack\n")
    rc, out, err = run_cli(["stats", str(root), "--config", str(cfg)])
    assert rc == 0, err


def test_reading_context_sets_defaults_that_a_caller_overrides(tmp_path):
    from cam2seg.archive import reading

    root, _ = _mvtec(tmp_path)
    (root / "images" / "good").rename(root / "images" / "ok")
    with reading(clean="ok", classes=["scratch", "crack"]):
        a = Archive.open(str(root))
        assert a.class_names == ["scratch", "crack"] and not a.labels[a.index("ok/000.png")].any()
        b = Archive.open(str(root), classes=["crack", "scratch"])
        assert b.class_names == ["crack", "scratch"]
    with pytest.raises(ArchiveError):
        Archive.open(str(root))  # outside the block: ok/ is a class again, and its image has no mask
