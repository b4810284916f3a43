"""How a fold's rows reach its training loop (cam2seg/train/ingest.py): Ray Data's pipeline on a
real local Ray decodes the same images and targets as the in-memory path, every row once."""

import numpy as np
import pytest

from cam2seg.archive import Archive
from cam2seg.config import ClassifierConfig, SegmenterConfig
from cam2seg.folds import make_folds
from cam2seg.train import ingest, manifest
from cam2seg.train.fold_runner import fit_folds, fold_configs
from cam2seg.train.tasks import TASKS

SIZE = (32, 200)


def _segmenter_manifest(archive: Archive, url: str) -> tuple[str, dict]:
    ids = archive.image_ids
    idx = [archive.index(i) for i in ids]
    table = manifest.manifest_table(ids, [archive.image_url(i) for i in ids], make_folds(archive.labels, 2, 0),
                                    archive.labels[idx], [[archive.rle(i, c) for c in archive.class_ids] for i in ids],
                                    [archive.image_shape(i) for i in ids])
    url = manifest.write_manifest(url, table)
    cfg = SegmenterConfig(size=SIZE, ignore_band=1, batch_size=8, load_threads=2)
    (config,) = fold_configs("segmenter", cfg, url, 2, [1], {"num_classes": 4, "size": list(SIZE),
                                                              "refine": True}).values()
    return url, config


def _by_id(batches) -> dict:
    out = {}
    for x, y, ids in batches:
        for j, i in enumerate(ids):
            assert i not in out, f"{i} came twice"
            out[i] = (x[j], y[j])
    return out


def test_ray_data_decodes_what_memory_decodes_every_row_once(small_archive, tmp_path, local_ray):
    archive = Archive.open(str(small_archive))
    url, config = _segmenter_manifest(archive, str(tmp_path / "manifest"))
    task = TASKS["segmenter"](config)
    memory = ingest.InMemory(task, url, 1, 2, 8, 0, 0, 1)
    datasets = ingest.fold_datasets(config, cpus=0.25, decoders=1, batch_rows=8, seed=5)
    streamed = {}
    for name, ds in datasets.items():
        streamed[name] = _by_id((b["image"], b["target"], b["image_id"].tolist())
                                for b in ds.iter_batches(batch_size=8, batch_format="numpy"))
    train_ids, val_ids = manifest.read_fold(url, 1, 2)
    assert sorted(streamed["train"]) == sorted(train_ids.column("image_id").to_pylist())
    assert sorted(streamed["val"]) == sorted(val_ids.column("image_id").to_pylist())
    expect_val = _by_id(memory.val())
    for iid, (x, y) in streamed["val"].items():
        assert x.dtype == np.uint8 and y.dtype == np.int8 and x.shape == SIZE and y.shape == (4, *SIZE)
        assert np.array_equal(x, expect_val[iid][0]) and np.array_equal(y, expect_val[iid][1])
    ids = train_ids.column("image_id").to_pylist()
    for j, iid in enumerate(ids):
        assert np.array_equal(streamed["train"][iid][0], memory.x_train[j])
        assert np.array_equal(streamed["train"][iid][1], memory.y_train[j])
    # the in-memory source gives the whole fold: every training row once an epoch, every validation row once
    assert sum(len(x) for x, _ in memory.train(0)) == len(ids) and set(expect_val) == set(streamed["val"])


def test_idle_workers_outlive_a_pass_while_training_holds_the_cpus(local_ray):
    """cam2seg's local Ray (cam2seg/raycluster.py lean_local) keeps idle workers while training
    workers hold every CPU, so a streamed fold's next Ray Data pass reuses its read and decode
    workers. Ray's default keeps as many as there are unallocated CPUs (none here): it kills the
    worker after 1 s idle, and each pass started new ones."""
    import os
    import time

    import psutil
    import ray

    @ray.remote(num_cpus=2)
    class Training:
        def ready(self):
            return True

    @ray.remote(num_cpus=0)
    def pid():
        return os.getpid()

    holder = Training.remote()
    try:
        ray.get(holder.ready.remote(), timeout=120)
        first = ray.get(pid.remote(), timeout=120)
        time.sleep(3)  # Ray checks every 0.2 s for workers idle over 1 s beyond the soft limit
        assert psutil.pid_exists(first) and psutil.Process(first).status() != psutil.STATUS_ZOMBIE
    finally:
        ray.kill(holder)


def test_data_config_bounds_each_streamed_dataset_in_the_object_store():
    from ray.train import DataConfig

    assert ingest.data_config(None)._user_execution_options is None
    cfg = ingest.data_config(ingest.decoded_bytes(512, (64, 400), 4))
    opts = cfg._resolve_execution_options("train")
    assert opts.resource_limits.object_store_memory == 512 * 64 * 400 * 5
    default = DataConfig.default_ingest_options()
    assert opts.preserve_order == default.preserve_order and opts.resource_limits.cpu == default.resource_limits.cpu
    assert cfg._resolve_execution_options("val").resource_limits.object_store_memory == 512 * 64 * 400 * 5


def test_auto_streams_only_what_would_not_fit():
    assert ingest.ingest_mode("auto", 2_000, (64, 400), 4, 8.0) == "memory"
    assert ingest.ingest_mode("auto", 1_000_000, (256, 1600), 0, 8.0) == "stream"  # 410 GB
    assert ingest.ingest_mode("memory", 1_000_000, (256, 1600), 0, 8.0) == "memory"
    assert ingest.ingest_mode("stream", 10, (64, 400), 0, 8.0) == "stream"
    assert ingest.decoded_bytes(10, (64, 400), 4) == 10 * 64 * 400 * 5


def test_streaming_on_too_few_cpus_is_refused_before_anything_trains(small_archive, tmp_path, local_ray):
    """Ray Data's tasks need CPUs beside the training workers'; without them it would wait forever."""
    archive = Archive.open(str(small_archive))
    ids = archive.image_ids
    table = manifest.manifest_table(ids, [archive.image_url(i) for i in ids], make_folds(archive.labels, 2, 0),
                                    archive.labels[[archive.index(i) for i in ids]])
    cfg = ClassifierConfig(ingest="stream", folds=2, epochs=1, size=SIZE, cpus_per_worker=1.0)
    with pytest.raises(ValueError, match=r"streaming 2 fold\(s\) needs about 3.5 CPUs .* the cluster has 2"):
        fit_folds("classifier", cfg, table, str(tmp_path / "work"), 2, extra={"num_classes": 4}, staged=(),
                  what="classifiers")
    assert not (tmp_path / "work" / "runs").exists()


@pytest.mark.stream
@pytest.mark.slow
def test_both_stages_train_streamed_with_out_of_fold_rows_for_every_image(small_archive, tmp_path, local_ray,
                                                                          log_lines):
    """Real Ray Train runs fed by Ray Data (one epoch, 2 folds): the classifier's out-of-fold
    predictions cover every image once, and the segmenter trains on the streamed targets."""
    import pyarrow.parquet as pq

    from cam2seg.pipeline.classify import train_classifiers
    from cam2seg.pipeline.segment import train_segmenter

    run = dict(folds=2, epochs=1, batch_size=16, size=SIZE, load_threads=2, ingest="stream", cpus_per_worker=0.5,
               decode_cpus=0.1, swa_epochs=1)
    with log_lines() as lines:
        clf = train_classifiers(str(small_archive), str(tmp_path / "clf"),
                                ClassifierConfig(encoder="mobilenetv3_small_050", **run))
        seg = train_segmenter(str(small_archive), "truth", str(tmp_path / "seg"),
                              SegmenterConfig(encoder="tu-mobilenetv3_small_050", **run))
    text = "\n".join(lines)
    assert text.count("images streamed by Ray Data") == 2, text[-3000:]
    archive = Archive.open(str(small_archive))
    oof = pq.read_table(tmp_path / "clf" / "oof.parquet").column("image_id").to_pylist()
    assert sorted(oof) == sorted(archive.image_ids)
    for card in (clf, seg):
        folds = card.metrics["folds"]
        assert [f["ingest"] for f in folds] == ["stream", "stream"]
        assert sum(f["rows"]["val"] for f in folds) == len(archive)
        assert all(np.isfinite(f["val_loss"]) for f in folds)
        assert all(0 < f["peak_private_mib"] <= f["peak_rss_mib"] + 1 for f in folds)
    assert all(f["ignored_fraction"] == 0 for f in seg.metrics["folds"])  # true masks: nothing ignored
