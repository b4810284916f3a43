"""Stage 3 end to end on a real local Ray cluster: train-segmenter on a label store (with fold
0's worker killed midway), Table 3, and labeling with the segmenter through the same job and
store. One training serves every test here: on 2 CPU cores a Ray Train run costs ~20 s before
its first step."""

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from cam2seg import preprocess, io, metrics, rle, store
from cam2seg.archive import Archive
from cam2seg.artifact import load_card
from cam2seg.config import LabelConfig, SegmenterConfig
from cam2seg.folds import FOLDS_FILE, folds_csv, load_folds, make_folds
from cam2seg.models.predict import load_predictor
from cam2seg.pipeline.label import label_archive, label_images
from cam2seg.evaluate.segmenters import evaluate_segmenters
from cam2seg.pipeline.segment import train_segmenter

pytestmark = pytest.mark.slow

CFG = dict(encoder="tu-mobilenetv3_small_100", epochs=4, batch_size=8, size=(32, 200), ignore_band=1, load_threads=2,
           keep_checkpoints=True)


def _pseudo_store(archive: Archive, url: str, model: str) -> None:
    """A label store whose "pseudo-masks" are the true masks grown by 3 pixels, plus a spurious
    mask of a class the image does not hold on every fourth image (what absent_zero removes)."""
    shape = archive.image_shape(archive.image_ids[0])
    kernel = np.ones((7, 7), np.uint8)
    rows = {k: [] for k in store.MASK_SCHEMA.names}
    for n, iid in enumerate(archive.image_ids):
        masks = archive.masks(iid, shape)
        for k, cid in enumerate(archive.class_ids):
            m = cv2.dilate(masks[k].astype(np.uint8), kernel).astype(bool)
            if not archive.labels[n, k] and k == 0 and n % 4 == 0:
                m[5:20, 50:150] = True
            for col, v in zip(store.MASK_SCHEMA.names, [iid, cid, rle.encode(m), 0.9, int(m.sum()), shape[0],
                                                          shape[1], "pseudo-v1", "run-a"]):
                rows[col].append(v)
    part = store.write_part(url, "masks", "run-a", pa.table(rows, schema=store.MASK_SCHEMA))
    store.commit(url, "run-a", {"model": model, "model_version": "pseudo-v1", "complete": True,
                                "parts": {"masks": [part], "errors": []}})


def _kill_fold0_worker_once_it_checkpointed(runs, killed: dict) -> None:
    import psutil

    from conftest import registered_checkpoints, wait_for

    wait_for(lambda: registered_checkpoints(runs, 0), 180, "a recorded checkpoint of fold 0")
    ckpt = next(runs.glob(f"*/runs/fold-0/{registered_checkpoints(runs, 0)[-1]}"))
    victim = psutil.Process(json.loads((ckpt / "state.json").read_text())["pid"])
    killed["cmdline"] = " ".join(victim.cmdline())
    victim.kill()


@pytest.fixture(scope="module")
def trained(small_archive, tmp_path_factory, log_lines, local_ray):
    """The segmenter trained once, fold 0's Ray Train worker killed (by pid) as soon as it has a
    recorded checkpoint; then the same training again (nothing to do)."""
    import threading

    root = tmp_path_factory.mktemp("stage3")
    archive = Archive.open(str(small_archive))
    model = str(root / "classifier")  # only its folds matter here: a split the default seed would not make
    folds = make_folds(archive.labels, 2, seed=11)
    io.write_bytes(io.join(model, FOLDS_FILE), folds_csv(archive.image_ids, folds))
    pseudo = str(root / "store")
    _pseudo_store(archive, pseudo, model)
    out = root / "seg"
    killed = {}
    killer = threading.Thread(target=_kill_fold0_worker_once_it_checkpointed, args=(out / "_train", killed),
                              daemon=True)
    with log_lines() as logs:
        killer.start()
        card = train_segmenter(str(small_archive), pseudo, str(out), SegmenterConfig(**CFG))
        killer.join(5)
        again = train_segmenter(str(small_archive), pseudo, str(out), SegmenterConfig(**CFG))
    return {"archive": archive, "root": root, "store": pseudo, "seg": str(out), "card": card, "again": again,
            "folds": folds, "logs": logs, "killed": killed}


def test_segmenter_artifact_card_and_folds(trained):
    card = trained["card"]
    assert card.kind == "segmenter" and card.architecture == CFG["encoder"] and card.folds == 2
    assert card.head.architecture == "Unet" and tuple(card.input_size) == CFG["size"]
    assert card.training.masks == trained["store"] and card.training.store_runs == ["run-a"]
    assert card.training.refinements == {"absent_zero": True, "present_empty": "ignore", "ignore_band": 1}
    assert card.postprocess.threshold == 0.2 and card.postprocess.min_seg_len == 0
    # the classifier's split, not a new one
    seg_folds = load_folds(io.join(trained["seg"], FOLDS_FILE))
    assert [seg_folds[i] for i in trained["archive"].image_ids] == trained["folds"].tolist()
    assert any("using the folds of" in m for m in trained["logs"])
    for f in card.metrics["folds"]:
        epochs = [h for h in f["history"] if "epoch" in h and "val_loss" in h]
        assert len(epochs) == CFG["epochs"]
        # the time each epoch's steps waited on their batches: part of the epoch, never more
        assert all(0 <= h["data_wait_seconds"] <= h["seconds"] for h in epochs)
        # the wait for an epoch's first batch is part of that wait; training is part of the epoch
        assert all(0 <= h["first_batch_seconds"] <= h["data_wait_seconds"] <= h["train_seconds"] <= h["seconds"]
                   for h in epochs)
        # the worker's resident memory by kind: each kind's peak is within the whole peak
        assert 0 < f["peak_private_mib"] <= f["peak_rss_mib"] + 1 and 0 <= f["peak_shared_mib"] <= f["peak_rss_mib"] + 1
        # and each epoch's own peak; the last epoch ran in the process that wrote the fold's peaks
        assert all(0 < h["peak_private_mib"] and 0 <= h["peak_shared_mib"] for h in epochs)
        assert epochs[-1]["peak_private_mib"] <= f["peak_private_mib"]
        assert 0 < f["ignored_fraction"] < 0.5  # the edge band
    # the same inputs again: nothing retrained, same version
    assert trained["again"].version == card.version
    assert any("already holds this segmenter" in m for m in trained["logs"])


def test_table3_scores_store_and_segmenter(trained):
    archive = trained["archive"]
    rows, table = evaluate_segmenters(str(archive.root), [trained["seg"]], trained["store"])
    print(table)
    folder = trained["seg"].rstrip("/").rsplit("/", 1)[-1]
    stored, paper, tuned = "store/as-stored", f"segmenter:{folder}/paper", f"segmenter:{folder}/tuned-per-class"
    assert {stored, paper, tuned, "baseline/all-empty", "baseline/whole-image"} <= set(rows)
    # the store's classifier is only a folds file: no composed row, and the table says why
    assert not any(r.startswith("composed:") for r in rows) and "no composed row for" in table
    assert rows.label(paper).endswith("paper (thr 0.2, min 0)") and rows.label(paper) in table
    # the stored row equals Dice computed directly from decoded masks
    t = store.read_masks(trained["store"]).to_pylist()
    pred = {(r["image_id"], r["class_id"]): store.decode_mask(r) for r in t}
    direct = np.array([[metrics.dice(pred[(i, c)], m) for c, m in zip(archive.class_ids, archive.masks(i))]
                       for i in archive.image_ids])
    expect = metrics.score_dice(direct, archive.true_areas())
    assert rows[stored].positive_mean == pytest.approx(expect.positive_mean)
    assert rows[stored].kaggle_mean == pytest.approx(expect.kaggle_mean)
    assert rows[tuned].kaggle_mean >= rows[paper].kaggle_mean - 1e-9  # tuned for the Kaggle mean
    card = load_card(trained["seg"])
    assert card.postprocess.tuned is True and set(card.metrics["seg_oof"]) == {paper, tuned}
    assert card.metrics["seg_oof"][tuned]["kaggle_mean"] == pytest.approx(rows[tuned].kaggle_mean)


def test_label_job_with_a_segmenter_equals_in_process(trained, tmp_path):
    archive = trained["archive"]
    out = str(tmp_path / "labels")
    summary = label_archive(trained["seg"], archive.images_url, out, LabelConfig(batch_size=8))
    assert summary["labeled"] == len(archive) and summary["errors"] == 0
    got = store.read_masks(out).to_pylist()
    assert len(got) == len(archive) * 4
    marker = store.committed_runs(out)[-1]
    assert marker.model_kind == "segmenter" and marker.complete
    predictor = load_predictor(trained["seg"])
    card = predictor.card
    ids = archive.image_ids[:8]
    imgs = preprocess.load_images([archive.image_url(i) for i in ids], tuple(card.input_size))
    shape = archive.image_shape(ids[0])
    with torch.no_grad():
        cols = label_images(predictor, imgs, [shape] * len(ids))
    by_key = {(r["image_id"], r["class_id"]): r for r in got}
    for j, (enc, area) in enumerate(zip(cols["encoded_pixels"], cols["area"])):
        r = by_key[(ids[j // 4], card.class_ids[j % 4])]
        assert r["encoded_pixels"] == enc and r["area"] == area
    assert json.loads(io.read_bytes(io.join(trained["seg"], "model.json")))["kind"] == "segmenter"



def test_killed_segmenter_worker_resumes_its_fold(trained):
    """Fold 0's worker was killed once it had a recorded checkpoint: the fold resumed from that
    checkpoint, did not train its first epoch again, and its history says so. (The classifier's
    test also kills and re-runs the whole command; both go through
    ``cam2seg.train.loop.TrainState.resume``.)"""
    assert "RayTrainWorker" in trained["killed"].get("cmdline", ""), trained["killed"]
    text = "\n".join(trained["logs"])
    n = CFG["epochs"]
    resumed = re.search(rf"\[segmenter fold 0\] resuming at epoch (\d+)/{n}", text)
    assert resumed and int(resumed.group(1)) > 1, text[-3000:]
    assert text.count(f"[segmenter fold 0] epoch 1/{n} ") == 1, text[-3000:]  # before the kill only
    final = next(Path(trained["seg"]).glob("_train/*/done/fold-0/final.json"))
    events = [e["epoch"] for e in json.loads(final.read_text())["history"] if e.get("event") == "resumed"]
    assert events == [int(resumed.group(1)) - 1], events


def test_a_fold_whose_run_state_a_kill_cut_short_resumes_from_its_checkpoints(trained, tmp_path, log_lines):
    """Ray Train rewrites a run's state file in place after each checkpoint; a command killed then
    leaves it empty and Ray Train refuses the run from then on. The fold goes on from its own
    checkpoint folders instead: staged from the final one when there is one, else resumed from
    the newest, and it ends with the same weights as the run that was never cut short."""
    import shutil

    out = tmp_path / "seg"
    shutil.copytree(trained["seg"], out)
    (work,) = (out / "_train").iterdir()
    run, done = work / "runs" / "fold-0", work / "done" / "fold-0"
    swa = (done / "swa.safetensors").read_bytes()
    ckpts = sorted(run.glob("checkpoint_2*"))
    assert len(ckpts) == 2 and (ckpts[-1] / "final.json").exists() and not (ckpts[0] / "final.json").exists()
    args = (str(trained["archive"].root), trained["store"], str(out), SegmenterConfig(**CFG))

    (run / "checkpoint_manager_snapshot.json").write_text("")
    shutil.rmtree(done)
    (out / "model.json").unlink()
    with log_lines() as staged:
        train_segmenter(*args)
    text = "\n".join(staged)
    assert "moved it aside" in text and "fold 0: finished in an earlier run" in text, text[-3000:]
    assert "[segmenter fold 0]" not in text, text[-3000:]  # nothing trained
    assert (done / "swa.safetensors").read_bytes() == swa

    # Killed before the final checkpoint: the newest one left is the last epoch's.
    shutil.rmtree(ckpts[-1])
    shutil.rmtree(done)
    (out / "model.json").unlink()
    with log_lines() as resumed:
        card = train_segmenter(*args)
    text = "\n".join(resumed)
    n = CFG["epochs"]
    assert f"[segmenter fold 0] resuming at epoch {n + 1}/{n} from a checkpoint" in text, text[-3000:]
    assert "[segmenter fold 0] epoch " not in text, text[-3000:]
    assert card.folds == 2 and (done / "swa.safetensors").read_bytes() == swa
