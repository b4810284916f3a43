"""COCO export of a label store, checked with pycocotools (the reference COCO implementation):
masks of assorted shapes round-trip, the file loads, images come lowest-confidence first."""

import json

import numpy as np
import pyarrow as pa
import pytest
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from cam2seg.review import coco
from cam2seg import io, rle, store
from conftest import commit_rows

# pycocotools 2.0.x on numpy 2 warns about its own __array__ use; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

H, W = 48, 80


def _disc(cy, cx, r):
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _shapes() -> dict[str, np.ndarray]:
    ring = _disc(24, 40, 15) & ~_disc(24, 40, 4)  # a blob with a hole
    ring[20:23, 30:33] = False  # and a second, square hole
    several = _disc(10, 12, 6) | _disc(34, 60, 8)
    several[40:44, 5:9] = True
    several[30, 20] = several[31, 21] = True  # two pixels touching only at a corner
    streak = np.zeros((H, W), bool)
    streak[5:40, 33] = True  # one pixel wide, vertical
    border = np.zeros((H, W), bool)
    border[:10, :15] = border[-6:, -20:] = border[20:30, -1] = True  # touches all four sides
    ell = np.zeros((H, W), bool)
    ell[10:30, 10:16] = ell[24:30, 10:40] = True  # concave corners
    single = np.zeros((H, W), bool)
    single[0, W - 1] = True
    return {"blob_with_holes": ring, "several": several, "streak": streak, "border": border, "ell": ell,
            "single_pixel": single, "empty": np.zeros((H, W), bool)}


def _fill_holes(mask):
    """What COCO polygons can express: the mask with enclosed background filled."""
    from scipy import ndimage

    return ndimage.binary_fill_holes(mask)


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def _raster(segmentation, h, w) -> np.ndarray:
    """pycocotools' rasterisation of a COCO segmentation (polygons or uncompressed RLE)."""
    if isinstance(segmentation, dict):
        rles = [coco_mask.frPyObjects(segmentation, h, w)]
    else:
        rles = coco_mask.frPyObjects(segmentation, h, w)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


@pytest.mark.parametrize("name", list(_shapes()))
def test_rle_round_trips_exactly_through_pycocotools(name):
    mask = _shapes()[name]
    seg = coco.mask_to_coco_rle(mask)
    assert seg["size"] == [H, W] and sum(seg["counts"]) == H * W
    assert all(isinstance(c, int) for c in seg["counts"])
    decoded = _raster(seg, H, W)
    assert decoded.shape == (H, W) and (decoded == mask).all()
    # the same compressed RLE pycocotools makes from the mask itself
    ref = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert coco_mask.frPyObjects(seg, H, W)["counts"] == ref["counts"]
    if mask.any():
        assert coco.mask_bbox(mask) == tuple(int(v) for v in coco_mask.toBbox(ref))
        assert coco.mask_area(mask) == int(coco_mask.area(ref))
    else:
        assert coco.mask_bbox(mask) is None and coco.mask_annotation(mask, "rle") is None


def test_rle_starts_with_zeros_and_is_column_major():
    m = np.zeros((3, 4), bool)
    m[0, 0] = m[2, 0] = m[0, 1] = True  # column-major pixels 0, 2, 3
    assert coco.mask_to_coco_rle(m) == {"size": [3, 4], "counts": [0, 1, 1, 2, 8]}
    m[0, 0] = False
    assert coco.mask_to_coco_rle(m)["counts"] == [2, 2, 8]
    assert coco.mask_to_coco_rle(np.ones((2, 2), bool))["counts"] == [0, 4]


@pytest.mark.parametrize("name", [n for n in _shapes() if n != "empty"])
def test_polygons_rasterise_back_to_the_mask(name):
    mask = _shapes()[name]
    polygons = coco.mask_to_polygons(mask)
    assert polygons and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
    assert all(isinstance(v, float) for p in polygons for v in p)
    back = _raster(polygons, H, W)
    # Outlines follow pixel edges: exact, but COCO polygons cannot hold holes.
    assert (back == _fill_holes(mask)).all()
    assert _iou(back, mask) > 0.9
    ann = coco.mask_annotation(mask, "polygon")
    assert ann["iscrowd"] == 0 and ann["area"] == mask.sum()


def test_thin_and_tiny_shapes_keep_a_real_polygon():
    # a 1-pixel-wide streak: a 1 x 35 rectangle on pixel edges, not a degenerate 2-point line
    assert coco.mask_to_polygons(_shapes()["streak"]) == [[33.0, 5.0, 33.0, 40.0, 34.0, 40.0, 34.0, 5.0]]
    # a single pixel in the top-right corner: its unit square
    assert coco.mask_to_polygons(_shapes()["single_pixel"]) == [[79.0, 0.0, 79.0, 1.0, 80.0, 1.0, 80.0, 0.0]]
    assert coco.mask_to_polygons(np.zeros((4, 4), bool)) == []
    # components: three discs/blocks plus the corner-touching pair, which share one outline
    assert len(coco.mask_to_polygons(_shapes()["several"])) == 4


def test_image_confidence_is_the_least_sure_decision():
    assert coco.image_confidence([0.9, 0.1, 0.52]) == pytest.approx(0.52)
    assert coco.image_confidence([0.48]) == pytest.approx(0.52)
    assert coco.image_confidence([0.0, 1.0]) == 1.0
    assert coco.image_confidence([]) == 1.0
    # a class gate other than 0.5: 0.5 at the gate, 1 at the ends, linear each side
    assert coco.image_confidence([0.3], gate=0.3) == pytest.approx(0.5)
    assert coco.image_confidence([0.65], gate=0.3) == pytest.approx(0.75)
    assert coco.image_confidence([0.15, 0.9], gate=[0.3, 0.5]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="gate must lie strictly between 0 and 1"):
        coco.image_confidence([0.5], gate=1.0)
    with pytest.raises(ValueError, match="scores must lie in"):
        coco.image_confidence([1.5])


# ---- a real label store: write_part + commit, read back by the export --------------------------

# image -> class -> (mask name, score); an empty mask is a class decided "absent"
PLAN = {
    "sure.jpg": {1: ("blob_with_holes", 0.97), 2: ("empty", 0.02), 3: ("empty", 0.05)},
    "nested/near_gate.jpg": {1: ("several", 0.90), 2: ("streak", 0.53), 3: ("empty", 0.1)},
    "clean.jpg": {1: ("empty", 0.01), 2: ("empty", 0.04), 3: ("empty", 0.03)},
    "middle.jpg": {1: ("empty", 0.3), 2: ("border", 0.8), 3: ("ell", 0.75)},
}
EXPECTED_ORDER = ["nested/near_gate.jpg", "middle.jpg", "sure.jpg", "clean.jpg"]  # confidences .53 .70 .95 .96


def _write_store(root: str) -> dict:
    shapes = _shapes()
    rows = []
    for image_id, classes in PLAN.items():
        for c, (name, score) in classes.items():
            m = shapes[name]
            rows.append({"image_id": image_id, "class_id": c, "encoded_pixels": rle.encode(m), "score": score,
                         "area": int(m.sum()), "height": H, "width": W, "model_version": "m-1", "run_id": ""})
    commit_rows(root, rows)
    return {(r["image_id"], r["class_id"]): shapes[PLAN[r["image_id"]][r["class_id"]][0]] for r in rows}


def _check_loaded(path: str, masks: dict, fmt: str) -> dict:
    """Load with pycocotools' COCO and compare every annotation with the stored mask."""
    api = COCO(path)
    doc = json.loads(open(path).read())
    by_rank = {img["id"]: img for img in doc["images"]}
    for ann in api.loadAnns(api.getAnnIds()):
        img = by_rank[ann["image_id"]]
        truth = masks[(img["file_name"], ann["category_id"])]
        got = api.annToMask(ann).astype(bool)
        if fmt == "rle":
            assert ann["iscrowd"] == 1 and (got == truth).all()
        else:
            assert ann["iscrowd"] == 0 and (got == _fill_holes(truth)).all() and _iou(got, truth) > 0.9
        assert ann["area"] == truth.sum() and ann["bbox"] == list(map(float, coco.mask_bbox(truth)))
    return doc


@pytest.mark.parametrize("fmt", ["polygon", "rle"])
def test_export_loads_in_pycocotools_lowest_confidence_first(tmp_path, fmt):
    root = str(tmp_path / "store")
    masks = _write_store(root)
    out = str(tmp_path / "review" / f"coco_{fmt}.json")
    summary = coco.export_coco(root, out, fmt=fmt)
    assert summary == {"images": 4, "annotations": 5, "out": out}
    doc = _check_loaded(out, masks, fmt)

    assert [i["file_name"] for i in doc["images"]] == EXPECTED_ORDER
    assert [i["id"] for i in doc["images"]] == [1, 2, 3, 4] == [i["cam2seg_rank"] for i in doc["images"]]
    conf = [i["cam2seg_confidence"] for i in doc["images"]]
    assert conf == sorted(conf) and conf[0] == pytest.approx(0.53)
    assert doc["images"][0]["cam2seg_scores"] == {"1": 0.9, "2": 0.53, "3": 0.1}
    assert all((i["height"], i["width"]) == (H, W) for i in doc["images"])
    assert doc["categories"] == [{"id": c, "name": f"class {c}", "supercategory": "defect"} for c in (1, 2, 3)]
    assert doc["info"]["model_versions"] == ["m-1"] and doc["info"]["source"] == root
    assert [a["id"] for a in doc["annotations"]] == list(range(1, 6))
    first = [a for a in doc["annotations"] if a["image_id"] == 1]
    assert [(a["category_id"], a["score"]) for a in first] == [(1, 0.9), (2, 0.53)]


def test_fields_cvat_and_label_studio_importers_read(tmp_path):
    """The keys and shapes CVAT's COCO importer (Datumaro) insists on: int ids, an int
    iscrowd, polygons of >= 3 points, RLE size equal to the image's, category ids >= 1;
    Label Studio's converter also reads ``score`` and the image's width and height."""
    root = str(tmp_path / "store")
    _write_store(root)
    for fmt in ("polygon", "rle"):
        doc = coco.build_coco(store.read_masks(root), [1, 2, 3], fmt=fmt)
        sizes = {i["id"]: [i["height"], i["width"]] for i in doc["images"]}
        assert all(isinstance(i["id"], int) and isinstance(i["file_name"], str) for i in doc["images"])
        for a in doc["annotations"]:
            assert {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd", "score"} <= set(a)
            assert all(isinstance(a[k], int) for k in ("id", "image_id", "category_id", "iscrowd"))
            assert a["category_id"] >= 1 and len(a["bbox"]) == 4
            if fmt == "polygon":
                assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
            else:
                assert a["segmentation"]["size"] == sizes[a["image_id"]]
        json.dumps(doc)  # plain Python types only


def test_order_limit_and_empty_images(tmp_path):
    root = str(tmp_path / "store")
    _write_store(root)
    table = store.read_masks(root)
    by_id = coco.build_coco(table, [1, 2, 3], order="id")
    assert [i["file_name"] for i in by_id["images"]] == sorted(PLAN)
    assert by_id["info"]["description"].endswith("in image id order")

    two = coco.build_coco(table, [1, 2, 3], limit=2)
    assert [i["file_name"] for i in two["images"]] == EXPECTED_ORDER[:2]
    assert {a["image_id"] for a in two["annotations"]} == {1, 2} and len(two["annotations"]) == 4
    assert coco.build_coco(table, [1, 2, 3], limit=0)["images"] == []

    no_empty = coco.build_coco(table, [1, 2, 3], include_empty_images=False)
    assert "clean.jpg" not in [i["file_name"] for i in no_empty["images"]] and len(no_empty["images"]) == 3

    # a per-class gate moves the decision boundary, and with it the review order
    gated = coco.build_coco(table, [1, 2, 3], gate=[0.5, 0.8, 0.5])
    assert gated["images"][0]["file_name"] == "middle.jpg"  # class 2 at 0.8 is now on the gate


def test_bad_inputs_raise_clearly(tmp_path):
    root = str(tmp_path / "store")
    _write_store(root)
    table = store.read_masks(root)
    with pytest.raises(ValueError, match="fmt must be one of polygon, rle, got 'mask'"):
        coco.build_coco(table, [1, 2, 3], fmt="mask")
    with pytest.raises(ValueError, match="order must be one of confidence, id, got 'score'"):
        coco.build_coco(table, [1, 2, 3], order="score")
    with pytest.raises(ValueError, match="limit must be a non-negative integer or None, got -1"):
        coco.build_coco(table, [1, 2, 3], limit=-1)
    with pytest.raises(ValueError, match="missing required column.*encoded_pixels, score"):
        coco.build_coco(table.drop_columns(["encoded_pixels", "score"]), [1, 2, 3])
    with pytest.raises(ValueError, match=r"class ids \[3\] that are not in class_ids"):
        coco.build_coco(table, [1, 2])
    with pytest.raises(ValueError, match="class ids must be >= 1"):
        coco.build_coco(table, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="several rows for one class"):
        coco.build_coco(pa.concat_tables([table, table.slice(0, 1)]), [1, 2, 3])
    with pytest.raises(ValueError, match="limit must be"):  # checked before the store is read
        coco.export_coco(str(tmp_path / "nowhere"), str(tmp_path / "x.json"), limit=-2)
    with pytest.raises(store.StoreError, match="no committed masks to export"):
        coco.export_coco(str(tmp_path / "empty-store"), str(tmp_path / "x.json"))
    assert not (tmp_path / "x.json").exists()


def test_export_from_and_to_s3(s3, tmp_path):
    s3.mkdir("labels")
    s3.mkdir("review")
    masks = _write_store("s3://labels/store")
    summary = coco.export_coco("s3://labels/store", "s3://review/batch-1/coco.json", fmt="rle", limit=3)
    assert summary == {"images": 3, "annotations": 5, "out": "s3://review/batch-1/coco.json"}
    local = tmp_path / "coco.json"
    local.write_bytes(io.read_bytes("s3://review/batch-1/coco.json"))
    doc = _check_loaded(str(local), masks, "rle")
    assert [i["file_name"] for i in doc["images"]] == EXPECTED_ORDER[:3]


def test_export_coco_command_and_its_flags(tmp_path, capsys):
    """``cam2seg export-coco`` end to end on a real store: defaults, each flag, a config file
    under the flags, and errors as exit 2 with one line and no file."""
    from cam2seg import cli

    root = str(tmp_path / "store")
    masks = _write_store(root)
    out = tmp_path / "review" / "default.json"
    assert cli.main(["export-coco", "--store", root, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"wrote 4 images and 5 polygon annotations to {out}" in said and "lowest-confidence first" in said
    doc = _check_loaded(str(out), masks, "polygon")
    assert [i["file_name"] for i in doc["images"]] == EXPECTED_ORDER

    flagged = tmp_path / "review" / "flags.json"
    assert cli.main(["export-coco", "--store", root, "--out", str(flagged), "--format", "rle", "--order", "id",
                     "--limit", "2"]) == 0
    assert "wrote 2 images and" in capsys.readouterr().out
    doc = _check_loaded(str(flagged), masks, "rle")
    assert [i["file_name"] for i in doc["images"]] == sorted(PLAN)[:2]

    cfg = tmp_path / "c.yaml"
    cfg.write_text("export:\n  format: rle\n  limit: 1\n")
    both = tmp_path / "review" / "both.json"
    assert cli.main(["export-coco", "--store", root, "--out", str(both), "--config", str(cfg), "--limit", "3"]) == 0
    doc = _check_loaded(str(both), masks, "rle")  # rle from the file, limit from the flag
    assert [i["file_name"] for i in doc["images"]] == EXPECTED_ORDER[:3]
    capsys.readouterr()

    bad = tmp_path / "review" / "bad.json"
    for argv, message in ((["--format", "png"], "invalid choice: 'png'"), (["--limit", "-1"], "export.limit")):
        try:
            rc = cli.main(["export-coco", "--store", root, "--out", str(bad), *argv])
        except SystemExit as e:  # argparse's own refusal of a choice
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and message in err, err
    assert cli.main(["export-coco", "--store", str(tmp_path / "nothing"), "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cam2seg export-coco: error:") and "nothing" in err[0], err
    assert not bad.exists()
