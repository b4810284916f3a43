"""Scoring a label store against the archive's true masks (no Ray: the store row of Table 3)."""

import numpy as np
import pyarrow as pa
import pytest

from cam2seg import rle, store
from cam2seg.archive import Archive
from cam2seg.cli import main
from cam2seg.evaluate.segmenters import STORE_ROW, evaluate_segmenters
from cam2seg.synthetic import synth


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-store") / "archive"
    synth.write_archive(str(root), images=24, height=32, width=128, seed=4, mix="balanced", clean_fraction=0.25,
                        progress=None)
    return Archive.open(str(root))


def _store_of_true_masks(archive: Archive, url: str, ids: list[str]) -> None:
    """A committed store whose masks are the true masks of ``ids`` (Dice 1 on every pair)."""
    shape = archive.image_shape(archive.image_ids[0])
    rows = {k: [] for k in store.MASK_SCHEMA.names}
    for iid in ids:
        for cid, m in zip(archive.class_ids, archive.masks(iid, shape)):
            for col, v in zip(store.MASK_SCHEMA.names, [iid, cid, rle.encode(m), 0.9, int(m.sum()), shape[0],
                                                          shape[1], "v1", "run-a"]):
                rows[col].append(v)
    part = store.write_part(url, "masks", "run-a", pa.table(rows, schema=store.MASK_SCHEMA))
    store.commit(url, "run-a", {"model_version": "v1", "complete": True, "parts": {"masks": [part], "errors": []}})


def test_a_partial_store_is_scored_on_the_images_it_holds(archive, tmp_path, log_lines):
    held = [i for i, d in zip(archive.image_ids, archive.defective) if d][:8]
    url = str(tmp_path / "store")
    _store_of_true_masks(archive, url, held)
    with log_lines() as lines:
        rows, table = evaluate_segmenters(str(archive.root), [], url)
    row = rows[STORE_ROW]
    # the true masks themselves: perfect on the images held; the 16 missing images are not counted as empty
    assert row.n_images == 8 and row.positive_mean == pytest.approx(1.0) and row.kaggle_mean == pytest.approx(1.0)
    assert rows["baseline/all-empty"].n_images == int(archive.defective.sum())
    assert "8 of 24 images" in rows.label(STORE_ROW) and "8 of 24 images" in table
    assert any("holds masks of 8 of the archive's 24 images" in m and "16 missing" in m for m in lines)


def test_a_complete_store_has_no_warning(archive, tmp_path, log_lines):
    url = str(tmp_path / "store")
    _store_of_true_masks(archive, url, list(archive.image_ids))
    with log_lines() as lines:
        rows, _ = evaluate_segmenters(str(archive.root), [], url)
    assert rows[STORE_ROW].n_images == int(np.asarray(archive.defective).sum())
    assert rows[STORE_ROW].positive_mean == pytest.approx(1.0) and "images)" not in rows.label(STORE_ROW)
    assert not any("missing" in m for m in lines)


def test_evaluate_store_cli_says_what_is_missing(archive, tmp_path, capsys):
    url = str(tmp_path / "store")
    _store_of_true_masks(archive, url, list(archive.image_ids[:5]))
    assert main(["evaluate", "--truth", str(archive.root), "--store", url, "--no-write"]) == 0
    cap = capsys.readouterr()
    assert "of 24 images" in cap.out and "holds masks of 5 of the archive's 24 images" in cap.err
