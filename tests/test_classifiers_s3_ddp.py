"""Stage 1 with object storage for everything (archive, checkpoints, artifact on a moto S3
server) and DDP: two Ray Train workers per fold."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cam2seg import io
from cam2seg.synthetic import synth
from cam2seg.models.classifier import load_fold_models
from cam2seg.pipeline.classify import train_classifiers
from cam2seg.config import ClassifierConfig

pytestmark = pytest.mark.slow


def test_train_on_s3_with_two_workers_per_fold(s3_ray):
    fs = s3_ray
    fs.mkdir("archive")
    fs.mkdir("models")
    synth.write_archive("s3://archive/a", images=40, height=32, width=128, seed=2, mix="balanced", progress=None)
    cfg = ClassifierConfig(encoder="mobilenetv3_small_100", folds=2, epochs=2, size=(32, 128), batch_size=8,
                           workers_per_fold=2, cpus_per_worker=0.5, keep_checkpoints=True, load_threads=2)
    card = train_classifiers("s3://archive/a", "s3://models/m", cfg)
    # checkpoints went to the bucket, one folder per epoch and fold
    ckpts = [p for p in fs.find("models/m/_train", withdirs=True) if p.rsplit("/", 1)[-1].startswith("checkpoint_2")]
    assert len({p.split("/runs/")[1].split("/")[1] for p in ckpts}) >= 4, ckpts
    assert all(f["workers"] == 2 for f in card.metrics["folds"])
    loaded, models = load_fold_models("s3://models/m")
    assert loaded.version == card.version and len(models) == 2
    oof = pq.read_table(pa.BufferReader(io.read_bytes("s3://models/m/oof.parquet"))).to_pydict()
    assert len(oof["image_id"]) == 40 and len(set(oof["image_id"])) == 40
    assert np.isfinite(np.array(oof["prob_1"])).all()
