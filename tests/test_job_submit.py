"""The jobs/ entry points as a user submits them: `ray job submit --working-dir .` to a real Ray
head on 127.0.0.1 (`ray start --head`), on a synthetic archive in a moto S3 bucket.

The head gets the S3 settings in its environment, as a cluster node gets them from its instance
role or a Kubernetes Secret: nothing secret travels with the jobs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cam2seg import rle, store
from cam2seg.synthetic import synth

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BUCKET = "s3://c2s-jobs"
IMAGES = f"{BUCKET}/archive/train_images"
STORE = f"{BUCKET}/labels/nightly"
MODEL = f"{BUCKET}/models/classifier"


def submit_cmd(head: dict, script: str, *args: str, job_id: str) -> list[str]:
    """``ray job submit --working-dir <repo>`` of ``jobs/<script>`` (blocking, as users run it)."""
    return [str(head["bin"] / "ray"), "job", "submit", "--address", head["address"], "--working-dir", str(REPO),
            "--submission-id", job_id, "--", "python", f"jobs/{script}", *args]


def submit(head: dict, script: str, *args: str, job_id: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """:func:`submit_cmd`, run; the CLI's completed process has the job's log in its stdout."""
    return subprocess.run(submit_cmd(head, script, *args, job_id=job_id), env=head["env"], capture_output=True,
                          text=True, timeout=timeout)


def job_status(head: dict, job_id: str) -> str:
    return str(head["client"]().get_job_status(job_id).value)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """19 synthetic images: the first 12 are the archive, the rest arrive later."""
    root = tmp_path_factory.mktemp("incoming")
    synth.write_archive(str(root), images=19, height=64, width=400, seed=5, progress=None)
    return sorted((root / "train_images").iterdir())


def upload(fs, files) -> list[str]:
    for f in files:
        fs.put_file(str(f), f"{IMAGES}/{f.name}")
    return [f.name for f in files]


def _same_as_in_process(table, images_url: str, model_url: str) -> None:
    """The stored masks are the plain function's on the same images (the job only moves data);
    up to a pixel's rounding at the threshold, as the actor sums in another thread count."""
    from cam2seg import preprocess, io
    from cam2seg.models.predict import load_predictor
    from cam2seg.pipeline.label import label_images

    predictor = load_predictor(model_url)
    card = predictor.card
    ids = sorted(set(table.column("image_id").to_pylist()))
    imgs = preprocess.load_images([io.join(images_url, i) for i in ids], tuple(card.input_size))
    cols = label_images(predictor, imgs, [(64, 400)] * len(ids))
    rows = {(r["image_id"], r["class_id"]): r for r in table.to_pylist()}
    for j, i in enumerate(ids):
        for k, cid in enumerate(card.class_ids):
            row = rows[(i, cid)]
            stored, plain = store.decode_mask(row), rle.decode(cols["encoded_pixels"][j * 4 + k], 64, 400)
            assert stored.sum() == row["area"] and stored.any() == plain.any()
            assert np.mean(stored != plain) < 1e-3
            assert row["score"] == pytest.approx(cols["score"][j * 4 + k], abs=1e-5)


def test_nightly_twice_through_ray_job_submit(ray_head, s3, images, random_artifact):
    """Two nightly runs through ``ray job submit``: the first labels the archive (from its config
    file in the bucket), the second what arrived since, and retrains the segmenter."""
    import pyarrow.parquet as pq

    from cam2seg.artifact import load_card

    s3.mkdir(BUCKET.removeprefix("s3://"))
    first = upload(s3, images[:12])
    card = random_artifact(MODEL)

    # the nightly job: its paths and settings from one config file in the bucket
    config = f"{BUCKET}/config/cam2seg.yaml"
    s3.pipe_file(config, json.dumps({
        "nightly": {"model": MODEL, "images": IMAGES, "store": STORE}, "label": {"batch_size": 4},
        "segmenter": {"encoder": "tu-mobilenetv3_small_100", "decoder_channels": [32, 16, 16, 8, 8], "folds": 2,
                      "epochs": 1, "batch_size": 8, "size": [32, 200], "load_threads": 2}}).encode())
    r = submit(ray_head, "nightly.py", "--config", config, job_id="c2s-nightly-1")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert job_status(ray_head, "c2s-nightly-1") == "SUCCEEDED"
    assert "already labeled by any model: 0; labeled now: 12" in r.stdout and f"committed to {STORE}" in r.stdout
    assert f"labels: {STORE}" in r.stdout and "retraining is off" in r.stdout
    table = store.read_masks(STORE)
    assert sorted(set(table.column("image_id").to_pylist())) == first
    assert table.num_rows == 12 * 4 and set(table.column("model_version").to_pylist()) == {card.version}
    (run1,) = store.committed_runs(STORE)
    assert run1.complete and run1.labeled == 12 and run1.config["batch_size"] == 4
    assert not s3.exists(STORE.removeprefix("s3://") + "/_lock.json")
    parts = [f"{STORE}/{p.file}".removeprefix("s3://") for p in run1.parts.masks]
    assert sum(pq.read_table(p, filesystem=s3).num_rows for p in parts) == 48   # plain Parquet underneath
    _same_as_in_process(table, IMAGES, MODEL)

    # more images and their labels arrive; flags override the file and turn retraining on
    third = upload(s3, images[12:])
    s3.put_file(str(images[0].parent.parent / "labels.csv"), f"{BUCKET}/archive/labels.csv")
    seg = f"{BUCKET}/models/unet"
    r = submit(ray_head, "nightly.py", "--config", config, "--retrain-after", "15", "--data", f"{BUCKET}/archive",
               "--segmenter", seg, job_id="c2s-nightly-2")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert job_status(ray_head, "c2s-nightly-2") == "SUCCEEDED"
    assert "already labeled by any model: 12; labeled now: 7" in r.stdout
    assert "19 images labeled since, threshold 15: retraining" in r.stdout and f"segmenter: {seg}" in r.stdout
    runs = store.committed_runs(STORE)
    new_rows = store.read_parts(STORE, runs[-1:], "masks", store.MASK_SCHEMA, ["image_id"])
    assert len(runs) == 2 and sorted(set(new_rows.column("image_id").to_pylist())) == third
    # every image once, each labeled by the run that first saw it
    table = store.read_masks(STORE, columns=["image_id", "run_id"]).to_pydict()
    by_image = dict(zip(table["image_id"], table["run_id"]))
    assert sorted(by_image) == first + third
    assert {by_image[i] for i in first} == {runs[0].run_id}
    assert {by_image[i] for i in third} == {runs[1].run_id}
    # the segmenter was trained on the whole store, as the config's segmenter section says
    seg_card = load_card(seg)
    assert seg_card.kind == "segmenter" and seg_card.training.masks == STORE
    assert seg_card.training.store_runs == [m.run_id for m in runs] and seg_card.data["images"] == 19
    assert seg_card.folds == 2 and seg_card.head.decoder_channels == [32, 16, 16, 8, 8]


def test_a_failing_job_fails_with_a_clear_message(ray_head, s3):
    """Both job scripts that take a model: a missing one fails the job with one clear line
    (the two submitted at once, as their drivers start up in parallel on the head)."""
    s3.mkdir(BUCKET.removeprefix("s3://"))
    procs = {}
    for script, command in (("nightly.py", "nightly"), ("label_archive.py", "label")):
        job = f"c2s-{command}-bad"
        cmd = submit_cmd(ray_head, script, "--model", f"{BUCKET}/models/missing", "--images", IMAGES, "--out", STORE,
                         job_id=job)
        procs[(job, command)] = subprocess.Popen(cmd, env=ray_head["env"], stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True)
    try:
        for (job, command), p in procs.items():
            out, _ = p.communicate(timeout=120)
            assert p.returncode != 0
            assert job_status(ray_head, job) == "FAILED"
            assert f"cam2seg {command}: error: no model artifact at" in out, out[-2000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert not s3.exists(STORE.removeprefix("s3://") + "/_runs")
