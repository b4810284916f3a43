"""A broken model artifact fails the labeling command on the driver, before Ray or any listing:
exit 2, one line naming the file, nothing written (issue 16, item 6)."""

import json
import os
import shutil

import pytest
from PIL import Image

from cam2seg import artifact
from cam2seg.cli import main


@pytest.fixture
def model_and_images(tmp_path, random_artifact):
    model = tmp_path / "model"
    random_artifact(str(model), size=(32, 64), image_size=(32, 64))
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (64, 32), 128).save(images / "a.jpg")
    return model, images, tmp_path / "store"


def _label(capsys, model, images, out) -> tuple[int, str, bool]:
    """(exit status, stderr, whether the command started Ray)."""
    import ray

    before = ray.is_initialized()
    rc = main(["label", "--model", str(model), "--images", str(images), "--out", str(out)])
    return rc, capsys.readouterr().err, ray.is_initialized() and not before


def test_swapped_fold_files_are_refused_on_the_driver(model_and_images, capsys):
    model, images, out = model_and_images
    a, b = model / "fold-0.safetensors", model / "fold-1.safetensors"
    tmp = model / "swap"
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)
    rc, err, started = _label(capsys, model, images, out)
    assert rc == 2 and "fold-0.safetensors does not match the card's hash" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not started


def test_a_missing_fold_file_is_refused_on_the_driver(model_and_images, capsys):
    model, images, out = model_and_images
    (model / "fold-1.safetensors").unlink()
    rc, err, started = _label(capsys, model, images, out)
    assert rc == 2 and "fold-1.safetensors is missing" in err and "Traceback" not in err
    assert not out.exists() and not started


def test_a_card_naming_an_unknown_encoder_is_refused(model_and_images, capsys):
    model, images, out = model_and_images
    card = artifact.load_card(str(model))
    # rewritten through update_card, so the hash matches and only the architecture is wrong
    artifact.update_card(str(model), card, architecture="no_such_encoder_b9")
    rc, err, started = _label(capsys, model, images, out)
    assert rc == 2 and "cannot build the model its card describes (no_such_encoder_b9)" in err
    assert "Traceback" not in err and not out.exists() and not started


def test_a_marker_without_run_id_is_a_clear_store_error(tmp_path, capsys):
    store_dir = tmp_path / "store" / "_runs"
    store_dir.mkdir(parents=True)
    (store_dir / "r1.json").write_text(json.dumps({"parts": {"masks": [], "errors": []}}))
    rc = main(["export-coco", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "commit marker r1.json is not a cam2seg marker: run_id" in err and "Traceback" not in err
    assert not (tmp_path / "c.json").exists()
    shutil.rmtree(tmp_path / "store")
