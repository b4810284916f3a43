"""The labeling job end to end on object storage: archive, model and label store on a moto
S3 server at 127.0.0.1, labels read back with pyarrow and decoded."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from cam2seg import data, io, store, synth
from cam2seg.classifier import load_fold_models
from cam2seg.config import LabelConfig
from cam2seg.label_job import label_archive, label_images
from cam2seg.postprocess import PostProcess

pytestmark = pytest.mark.slow


def test_label_s3_archive_into_s3_store(s3_ray, tmp_path, random_artifact):
    fs = s3_ray
    synth.write_archive(str(tmp_path / "a"), images=16, height=64, width=400, seed=8, progress=None)
    random_artifact(str(tmp_path / "model"), size=(32, 200))
    for b in ("archive", "models", "labels"):
        fs.mkdir(b)
    fs.put(str(tmp_path / "a" / "train_images") + "/", "archive/night-1/", recursive=True)
    fs.put(str(tmp_path / "model") + "/", "models/m/", recursive=True)
    s = label_archive("s3://models/m", "s3://archive/night-1", "s3://labels/store",
                      LabelConfig(batch_size=4, read_batch=8, images_per_file=8), log=print)
    assert s["labeled"] == 16 and s["errors"] == 0
    assert fs.exists("labels/store/_runs") and not fs.exists("labels/store/_lock.json")

    # read back: the API, and the committed part files straight through pyarrow
    t = store.read_masks("s3://labels/store")
    assert t.num_rows == 64
    marker = store.committed_runs("s3://labels/store")[0]
    direct = sum(pq.read_table(f"labels/store/{p['file']}", filesystem=fs).num_rows for p in marker["parts"]["masks"])
    assert direct == 64

    card, models = load_fold_models(str(tmp_path / "model"))
    ids = sorted(set(t.column("image_id").to_pylist()))
    imgs = data.load_images([io.join("s3://archive/night-1", i) for i in ids], tuple(card.input_size))
    cols = label_images(models, card, PostProcess(**card.postprocess), imgs, [(64, 400)] * len(ids))
    rows = {(r["image_id"], r["class_id"]): r for r in t.to_pylist()}
    nonempty = 0
    for j, i in enumerate(ids):
        for k, cid in enumerate(card.class_ids):
            want = cols["encoded_pixels"][j * 4 + k]
            row = rows[(i, cid)]
            assert row["encoded_pixels"] == want
            mask = store.decode_mask(row)
            assert mask.shape == (64, 400) and mask.sum() == row["area"]
            nonempty += bool(mask.any())
    assert nonempty >= 8
    assert np.isclose(rows[(ids[0], 1)]["score"], cols["score"][0], atol=1e-6)
