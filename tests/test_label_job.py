"""The Ray Data labeling job on a real local Ray: contents, bad input, incremental runs,
leases, a killed actor, a killed driver."""

import io as _io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from cam2seg import preprocess, store
from cam2seg.synthetic import synth
from cam2seg.models.predict import load_predictor
from cam2seg.config import LabelConfig
from cam2seg.pipeline.label import label_archive, label_images

from conftest import run_cli

pytestmark = pytest.mark.slow
CFG = dict(batch_size=4, read_batch=8, images_per_file=8, commit_every=8, lease_ttl=30)

BAD = {
    "bad/empty.jpg": "empty file",
    "bad/truncated.jpg": "truncated",
    "bad/random.png": "not a recognised image",
    "bad/notes.jpg": "not a recognised image",
    "bad/small.png": "unexpected size 32x200",
    "bad/deep.png": "16/32-bit",
    "bad/clear.png": "transparent",
}


def plant_bad_files(folder) -> None:
    """One file of each kind the job must refuse without stopping."""
    folder = os.path.join(folder, "bad")
    os.makedirs(folder, exist_ok=True)
    good = _io.BytesIO()
    Image.fromarray(np.full((64, 400), 90, np.uint8)).save(good, "JPEG")
    raw = {
        "empty.jpg": b"",
        "truncated.jpg": good.getvalue()[: len(good.getvalue()) // 3],
        "random.png": np.random.default_rng(0).bytes(3000),
        "notes.jpg": b"these are not pixels\n" * 20,
    }
    for name, b in raw.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b)
    Image.fromarray(np.zeros((32, 200), np.uint8)).save(os.path.join(folder, "small.png"))
    Image.fromarray(np.zeros((64, 400), np.uint16) + 1000).save(os.path.join(folder, "deep.png"))
    rgba = np.zeros((64, 400, 4), np.uint8)
    rgba[..., 3] = 10
    Image.fromarray(rgba, "RGBA").save(os.path.join(folder, "clear.png"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, random_artifact):
    root = tmp_path_factory.mktemp("label")
    synth.write_archive(str(root / "archive"), images=20, height=64, width=400, seed=5, mix="balanced",
                        progress=None)
    images = root / "archive" / "train_images"
    plant_bad_files(str(images))
    model = str(root / "model")
    random_artifact(model, size=(32, 200))
    return {"root": root, "images": str(images), "model": model, "make_model": random_artifact}


def expected_rows(model_url, images_dir, ids):
    """The same images through the in-process engine: what the store must hold."""
    predictor = load_predictor(model_url)
    imgs = preprocess.load_images([os.path.join(images_dir, i) for i in ids], tuple(predictor.card.input_size))
    cols = label_images(predictor, imgs, [(64, 400)] * len(ids))
    return {(i, c): e for i, c, e in zip([i for i in ids for _ in range(4)], cols["class_id"], cols["encoded_pixels"])}


@pytest.fixture(scope="module")
def labeled(local_ray, setup):
    """One full run into a fresh store (tests that write copy it first)."""
    out = str(setup["root"] / "store")
    return out, label_archive(setup["model"], setup["images"], out, LabelConfig(**CFG))


def test_labels_every_image_once_and_reconciles_bad_files(setup, labeled):
    out, s = labeled
    assert s["listed"] == 27 and s["labeled"] == 20 and s["errors"] == 7
    t = store.read_masks(out)
    assert t.num_rows == 20 * 4
    pairs = list(zip(t.column("image_id").to_pylist(), t.column("class_id").to_pylist()))
    assert len(set(pairs)) == len(pairs)
    errors = {r["image_id"]: r["error"] for r in store.read_errors(out).to_pylist()}
    assert set(errors) == set(BAD)
    for key, reason in BAD.items():
        assert reason in errors[key], (key, errors[key])
    # the same masks the in-process engine gives; some of them non-empty
    ids = sorted({i for i, _ in pairs})
    want = expected_rows(setup["model"], setup["images"], ids)
    got = {(r["image_id"], r["class_id"]): r["encoded_pixels"] for r in t.to_pylist()}
    assert got == want
    assert sum(bool(e) for e in got.values()) >= 10
    assert sum(s["positives"].values()) == sum(bool(e) for e in got.values())
    marker = store.committed_runs(out)[0]
    assert marker.complete and marker.labeled == 20 and marker.errors == 7
    assert len(marker.parts.masks) >= 3  # images_per_file=8: parts, not one file per image


def test_incremental_relabel_and_new_model_version(setup, labeled, tmp_path, log_lines):
    out = str(tmp_path / "store")
    shutil.copytree(labeled[0], out)
    first = labeled[1]
    again = label_archive(setup["model"], setup["images"], out, LabelConfig(**CFG), incremental=True)
    assert again["skipped"] == 20 and again["labeled"] == 0 and again["errors"] == 7  # bad files retried
    with log_lines() as logs:
        forced = label_archive(setup["model"], setup["images"], out, LabelConfig(**CFG), incremental=True,
                               relabel=True)
    assert forced["labeled"] == 20
    progress = [m for m in logs if m.startswith("committed ")]   # a long run's progress in job logs
    assert progress and all(" / 27 images (" in m and "images/s" in m for m in progress)
    other = str(tmp_path / "model2")
    card2 = setup["make_model"](other, size=(32, 200), seed=1)
    new = label_archive(other, setup["images"], out, LabelConfig(**CFG), incremental=True)
    assert new["labeled"] == 20
    t = store.read_masks(out)
    assert t.num_rows == 80 and set(t.column("model_version").to_pylist()) == {card2.version}
    assert first["model_version"] != card2.version
    assert len(store.committed_runs(out)) == 4
    assert store.read_errors(out).num_rows == 7


def test_clear_errors_and_a_busy_store(local_ray, setup, tmp_path):
    cfg = LabelConfig(**CFG)
    with pytest.raises(FileNotFoundError, match="image prefix not found"):
        label_archive(setup["model"], str(tmp_path / "nope"), str(tmp_path / "s"), cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images under"):
        label_archive(setup["model"], str(tmp_path / "empty"), str(tmp_path / "s"), cfg)
    from cam2seg.artifact import ArtifactError

    with pytest.raises(ArtifactError):
        label_archive(str(tmp_path / "no-model"), setup["images"], str(tmp_path / "s"), cfg)
    (tmp_path / "file").write_text("x")
    with pytest.raises(store.StoreError, match="cannot write"):
        label_archive(setup["model"], setup["images"], str(tmp_path / "file" / "s"), cfg)
    out = str(tmp_path / "busy")
    with store.Lease(out, "someone-else", settle=0.01):
        with pytest.raises(store.StoreBusy, match="someone-else"):
            label_archive(setup["model"], setup["images"], out, cfg)
    assert store.committed_runs(out) == []


def test_killed_actor_is_replaced_and_nothing_is_lost(local_ray, setup, tmp_path):
    import psutil

    images = str(tmp_path / "images")
    synth.write_archive(str(tmp_path / "a"), images=40, height=64, width=400, seed=6, progress=None)
    shutil.copytree(tmp_path / "a" / "train_images", images)
    out = str(tmp_path / "store")
    killed = []

    def kill_labeler():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for p in psutil.process_iter(["cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "Labeler" in cmd and "ray::" in cmd:
                    # wait until it has produced something, so the kill lands mid-run
                    if os.path.isdir(os.path.join(out, "masks")):
                        p.kill()
                        killed.append(p.pid)
                        return
            time.sleep(0.2)

    th = threading.Thread(target=kill_labeler, daemon=True)
    th.start()
    s = label_archive(setup["model"], images, out, LabelConfig(**{**CFG, "batch_size": 2}))
    th.join(5)
    assert killed, "the labeling actor was never found and killed"
    assert s["labeled"] == 40 and s["errors"] == 0
    t = store.read_masks(out)
    pairs = set(zip(t.column("image_id").to_pylist(), t.column("class_id").to_pylist()))
    assert t.num_rows == 160 and len(pairs) == 160


def test_killed_driver_then_rerun_completes_the_store(local_ray, setup, tmp_path):
    """The command's driver killed (SIGKILL, with its process group) after some commits; the
    same command again (in process, on the session's Ray) completes the store."""
    import psutil

    images = str(tmp_path / "images")
    synth.write_archive(str(tmp_path / "a"), images=32, height=64, width=400, seed=7, progress=None)
    shutil.copytree(tmp_path / "a" / "train_images", images)
    out = tmp_path / "store"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("label:\n  batch_size: 2\n  read_batch: 4\n  images_per_file: 4\n  commit_every: 4\n")
    exe = os.path.join(os.path.dirname(sys.executable), "cam2seg")
    cmd = [exe, "label", "--model", setup["model"], "--images", images, "--out", str(out), "--config", str(cfg),
           "--incremental"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    family = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            runs = list((out / "_runs").glob("*.json")) if (out / "_runs").exists() else []
            if runs and json.loads(runs[0].read_text())["labeled"] >= 8:
                break
            assert proc.poll() is None, "the labeling command ended before it could be killed"
            time.sleep(0.2)
        else:
            raise AssertionError("no commit within 180 s")
        family = psutil.Process(proc.pid).children(recursive=True)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        for p in family:  # the local Ray cluster it started, by pid
            try:
                p.kill()
            except psutil.Error:
                pass
    partial = store.committed_runs(str(out))[0]
    assert not partial.complete and 8 <= partial.labeled < 32
    assert json.loads((out / "_lock.json").read_text())["pid"] == proc.pid  # left behind by the kill

    rc, out_text, err = run_cli(cmd[1:])
    assert rc == 0, err[-3000:]
    assert "already labeled by model" in out_text
    runs = store.committed_runs(str(out))
    assert runs[-1].complete and runs[-1].labeled == 32 - partial.labeled
    t = store.read_masks(str(out))
    pairs = set(zip(t.column("image_id").to_pylist(), t.column("class_id").to_pylist()))
    assert t.num_rows == 128 and len(pairs) == 128
    assert not (out / "_lock.json").exists()


def test_image_labels_gate_every_class(setup, labeled, tmp_path):
    """``labels=``: a class the image-level label calls absent is always written empty, a named
    one keeps the mask the ungated run wrote (the random model's confidence is 0: every class
    passes its gate); rows stay images x classes; the marker says what gated the run."""
    from cam2seg.archive import Archive

    archive = Archive.open(str(setup["root"] / "archive"), strict_images=False)  # bad/ files planted
    ungated = {(r["image_id"], r["class_id"]): r for r in store.read_masks(labeled[0]).to_pylist()}
    labels = str(setup["root"] / "archive")
    out = str(tmp_path / "store")
    s = label_archive(setup["model"], setup["images"], out, LabelConfig(**CFG), labels=labels)
    assert s["labeled"] == 20 and s["errors"] == 7
    rows = store.read_masks(out).to_pylist()
    assert len(rows) == 20 * 4
    for r in rows:
        before = ungated[(r["image_id"], r["class_id"])]
        assert r["score"] == pytest.approx(before["score"])  # the classifier's probability stays
        if archive.labels[archive.index(r["image_id"]), r["class_id"] - 1]:
            assert r["encoded_pixels"] == before["encoded_pixels"]
        else:
            assert r["area"] == 0 and r["encoded_pixels"] == "", r
    assert sum(b["area"] > 0 for (i, c), b in ungated.items()
               if not archive.labels[archive.index(i), c - 1]) >= 5  # the gate mattered
    marker = store.committed_runs(out)[0]
    assert marker.labels == labels and marker.label_gated == 27  # the 20 images and the 7 bad files


def test_label_gates_from_a_folder_or_a_csv(setup, tmp_path):
    """A long train.csv with its folder: unlisted images under train_images/ are clean. A wide
    labels.csv alone: only the images it lists are known (the rest keep the classifier's gate).
    Classes must match the model's."""
    from cam2seg.archive import Archive
    from cam2seg.classes import ClassMismatch
    from cam2seg.pipeline.label import label_gates

    folder = setup["root"] / "archive"
    archive = Archive.open(str(folder), strict_images=False)
    names = ["class 1", "class 2", "class 3", "class 4"]
    gates = label_gates(str(folder), names)
    clean = [i for i in archive.image_ids if not archive.labels[archive.index(i)].any()]
    assert set(gates) == set(archive.image_ids) and clean and all(not gates[i].any() for i in clean)
    assert all((gates[i] == archive.labels[archive.index(i)]).all() for i in archive.image_ids)
    known = [i for i in archive.image_ids if not i.startswith("bad/")][3:]
    wide = tmp_path / "labels.csv"
    wide.write_text("ImageId,class_1,class_2,class_3,class_4\n" + "".join(
        f"{i},{','.join(str(int(v)) for v in archive.labels[archive.index(i)])}\n" for i in known))
    assert set(label_gates(str(wide), names)) == set(known)
    with pytest.raises(ClassMismatch, match=r"has classes \['class 1', 'class 2', 'class 3', 'class 4'\], the model "
                       r"has \['class 1', 'class 2', 'class 3'\]"):
        label_gates(str(folder), names[:3])
    with pytest.raises(ClassMismatch, match="the model has"):
        label_gates(str(folder), ["pit", "streak", "scratch", "blotch"])  # same count, other names


def test_composed_labeling_gates_by_the_classifier_and_draws_with_the_segmenter(local_ray, setup, tmp_path,
                                                                                random_segmenter):
    """``segmenter=``: the store holds what the in-process ComposedPredictor gives, at the setting
    the segmenter's card holds for this classifier; a class whose gate nothing passes stays empty;
    the marker records the composition."""
    from cam2seg.models.compose import Composition, load_composed, weights_digest

    model_card = load_predictor(setup["model"], "cpu").card
    comp = Composition(confidence=[0.0, 0.0, 1.0, 0.0], threshold=0.5, classifier=setup["model"],
                       classifier_version=weights_digest(model_card), tuned_on="a test")
    seg = str(tmp_path / "segmenter")
    seg_card = random_segmenter(seg, size=(32, 200), metrics={"composed": comp.model_dump(mode="json")})
    out = str(tmp_path / "store")
    s = label_archive(setup["model"], setup["images"], out, LabelConfig(**CFG), segmenter=seg)
    assert s["labeled"] == 20 and s["errors"] == 7
    rows = store.read_masks(out).to_pylist()
    assert len(rows) == 20 * 4
    assert all(r["area"] == 0 for r in rows if r["class_id"] == 3)  # gated shut: confidence 1
    assert sum(r["area"] > 0 for r in rows if r["class_id"] != 3) >= 10
    composed, why = load_composed(setup["model"], seg, "cpu")
    assert "a test" in why
    ids = sorted({r["image_id"] for r in rows})
    imgs = preprocess.load_images([os.path.join(setup["images"], i) for i in ids], (32, 200))
    cols = label_images(composed, imgs, [(64, 400)] * len(ids))
    want = {(i, c): e for i, c, e in zip([i for i in ids for _ in range(4)], cols["class_id"], cols["encoded_pixels"])}
    assert {(r["image_id"], r["class_id"]): r["encoded_pixels"] for r in rows} == want
    marker = store.committed_runs(out)[0]
    assert marker.model_kind == "composed" and marker.segmenter == seg
    assert marker.composition["confidence"] == [0.0, 0.0, 1.0, 0.0]
    assert marker.model_version == f"{model_card.version}+{seg_card.version}"
    assert {r["model_version"] for r in rows} == {marker.model_version}
