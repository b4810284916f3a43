"""The label store at the mission's scale: time and peak memory of each store operation.

``store`` builds a synthetic store of ``--images`` images x 4 classes directly as Parquet parts
(no CAM: the label job's layout, ``images_per_file`` 2000 images per part, one error part per
run), in two runs: the first labels every image, the second relabels ``--relabel`` of them with
another model version (so the newest-run-wins path is exercised). Mask strings are real Kaggle
RLE of Severstal-sized (256x1600) masks whose size follows ``shared/severstal_mask_stats.md``
(about half the images clean, mask widths of tens to ~1,500 columns): a pool of distinct
strings sampled with replacement, so the files compress better than real ones, while memory
once read is that of real strings. Then each operation runs in a fresh process, and the bench
prints its wall time, the process's resident memory when it starts (imports and the ids it is
given) and the process's peak resident memory.

    PYTHONPATH=. .venv/bin/python bench/scale.py store [--images 1000000] [--dir DIR] [--ops NAME ...]

The last two operations are the segmenter driver's manifest step (run key and the fold-partitioned
Parquet manifest, 5 folds) over the same images: fold by fold, as training does it
(cam2seg/train/masks.py ``FoldMasks``), and with every image's mask strings pivoted at once first
(``mask_targets``, the small-store path).

Goal (issue 18): each operation < 60 s and < 2 GB peak on 2 cores.

``train`` trains the segmenter (true masks, 2 folds, ``--epochs`` epochs at 64x400) on synthetic
archives of ``--base`` (200) and of ``--images`` images, once with each fold's images in memory and once
streamed by Ray Data (``ingest``), all in one process on one local Ray, and prints each run's
training images/s (epochs after the first: per epoch, its validation pass included, and over the
training pass after its first batch, i.e. without the pass's start-up) and its workers' peak
memory (from each fold's ``final.json``: the peak resident set ``peak_rss_mib``, and its private
and shared parts, ``peak_private_mib`` / ``peak_shared_mib``: cam2seg/train/memory.py says why
the shared part, Ray's object store, is told apart), then each epoch's private peak: with more
epochs (``--epochs``) more rows pass one worker, so peaks that climb epoch by epoch show a leak
that the difference between two archives cannot tell from the allocator's spread.

    PYTHONPATH=. .venv/bin/python bench/scale.py train [--images 2000] [--base 200] [--epochs 2] [--modes memory stream]

Goals (issue 18): streamed, the workers' peak memory grows from 200 to 2,000 images by less than
20% of what holding the 1,800 extra images (and their targets) in memory takes; streamed
images/s >= 0.9x in memory.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa

from cam2seg import rle, store

H, W, CLASSES = 256, 1600, (1, 2, 3, 4)
PER_PART = 2000
#: per class: share of images with it, and the median mask width / height in pixels
GEOMETRY = {1: (0.073, 52, 160), 2: (0.028, 22, 172), 3: (0.405, 325, 254), 4: (0.060, 458, 219)}


def rle_pool(rng: np.random.Generator, n: int = 1000) -> dict[int, list[str]]:
    """Per class, ``n`` Kaggle RLE strings of masks of 1-3 components, each a band of columns
    whose top and bottom edges wander (one run per column and component, as in real masks)."""
    pool = {}
    for c, (_, width, height) in GEOMETRY.items():
        out = []
        for _ in range(n):
            m = np.zeros((H, W), bool)
            for _ in range(int(rng.integers(1, 4))):
                w = int(np.clip(rng.lognormal(np.log(width), 0.9), 4, W))
                h = int(np.clip(rng.lognormal(np.log(height), 0.3), 8, H))
                x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
                top = np.clip(y0 + np.cumsum(rng.integers(-2, 3, w)), 0, H - 2)
                bottom = np.clip(top + h + np.cumsum(rng.integers(-2, 3, w)), top + 1, H)
                rows = np.arange(H)[:, None]
                m[:, x0 : x0 + w] |= (rows >= top[None]) & (rows < bottom[None])
            out.append(rle.encode(m))
        pool[c] = out
    return pool


def build_store(root: str, images: int, relabel: int, seed: int = 0) -> dict:
    """Write the synthetic store; returns what the operations need (a few ids, the first run)."""
    rng = np.random.default_rng(seed)
    pool = rle_pool(rng)
    ids = np.array([f"{i:08d}.jpg" for i in range(images)], dtype=object)
    runs = []
    for version, chosen in (("v1", ids), ("v2", ids[rng.permutation(images)[:relabel]])):
        run_id = store.new_run_id()
        masks, errors, positives = [], [], np.zeros(len(CLASSES), np.int64)
        for s in range(0, len(chosen), PER_PART):
            part_ids = chosen[s : s + PER_PART]
            n = len(part_ids)
            cols = {"image_id": pa.array(np.repeat(part_ids, len(CLASSES)), pa.string()),
                    "class_id": pa.array(np.tile(np.array(CLASSES, np.int8), n), pa.int8())}
            enc = np.empty((n, len(CLASSES)), dtype=object)
            for k, c in enumerate(CLASSES):
                has = rng.random(n) < GEOMETRY[c][0]
                positives[k] += has.sum()
                picks = rng.integers(0, len(pool[c]), n)
                enc[:, k] = [pool[c][p] if h else "" for p, h in zip(picks, has)]
            area = np.where(enc != "", rng.integers(500, 100_000, enc.shape), 0)
            cols.update({
                "encoded_pixels": pa.array(enc.ravel(), pa.string()),
                "score": pa.array(rng.random(n * len(CLASSES)).astype(np.float32)),
                "area": pa.array(area.ravel().astype(np.int32)),
                "height": pa.array(np.full(n * len(CLASSES), H, np.int16)),
                "width": pa.array(np.full(n * len(CLASSES), W, np.int16)),
                "model_version": pa.array([version] * (n * len(CLASSES)), pa.string()),
                "run_id": pa.array([run_id] * (n * len(CLASSES)), pa.string()),
            })
            masks.append(store.write_part(root, "masks", run_id, pa.table(cols, schema=store.MASK_SCHEMA)))
        bad = [f"bad-{version}-{i:05d}.jpg" for i in range(max(1, len(chosen) // 1000))]
        errors.append(store.write_part(root, "errors", run_id, pa.table(
            {"image_id": bad, "uri": [f"s3://b/{b}" for b in bad], "error": ["undecodable"] * len(bad),
             "run_id": [run_id] * len(bad)}, schema=store.ERROR_SCHEMA)))
        store.commit(root, run_id, {"model": "s3://models/m", "model_version": version, "listed": len(chosen),
                                    "to_do": len(chosen), "labeled": len(chosen), "errors": len(bad),
                                    "complete": True, "parts": {"masks": masks, "errors": errors},
                                    "positives": positives.tolist()})
        runs.append((run_id, [str(i) for i in chosen] + bad))
    return {"sample": [str(i) for i in ids[rng.integers(0, images, 12)]], "first_run": runs[0]}


def _op_committed_runs(root, ctx):
    return f"{len(store.committed_runs(root))} runs"


def _op_labeled_ids(root, ctx):
    return f"{len(store.labeled_ids(root, 'v1'))} ids of v1, {len(store.labeled_ids(root, None))} of any model"


def _op_skip(root, ctx):
    import pyarrow.compute as pc

    listed = pa.array([f"{i:08d}.jpg" for i in range(ctx["images"] + ctx["images"] // 10)], pa.string())
    done = pc.is_in(listed, value_set=store.labeled_ids(root, None))
    return f"{len(listed)} listed, {len(listed) - pc.sum(done).as_py()} to do (the label job's skip step)"


def _op_read_keys(root, ctx):
    t = store.read_masks(root, columns=["score", "area"])
    return f"{t.num_rows} rows, {t.nbytes / 2**20:.0f} MiB (the report's histograms)"


def _op_iter_all(root, ctx):
    rows = nbytes = 0
    for b in store.iter_masks(root):
        rows, nbytes = rows + b.num_rows, nbytes + b.nbytes
    return f"{rows} rows, {nbytes / 2**30:.2f} GiB streamed"


def _op_read_some(root, ctx):
    return f"{store.read_masks(root, image_ids=ctx['sample']).num_rows} rows of 12 images (the gallery)"


def _op_read_errors(root, ctx):
    return f"{store.read_errors(root).num_rows} error rows"


def _op_reconcile(root, ctx):
    run_id, todo = ctx["first_run"]
    m = next(m for m in store.committed_runs(root) if m.run_id == run_id)
    m = m.model_copy(update={"complete": False})
    with store.RunWriter(root, m, commit_every=10**9) as w:
        w.finish(todo, m.positives or [0, 0, 0, 0])
    return f"run of {len(todo)} images reconciled and recommitted"


def _op_remove_uncommitted(root, ctx):
    return f"{store.remove_uncommitted(root)} parts removed"


def _bench_archive(root, ctx):
    """An archive of the store's images with image-level labels only (no image files: the
    manifest reads none)."""
    from cam2seg.archive import Archive

    ids = [f"{i:08d}.jpg" for i in range(ctx["images"])]
    labels = (np.random.default_rng(1).random((len(ids), len(CLASSES))) < [g[0] for g in GEOMETRY.values()])
    return Archive(root=f"{root}-archive", source="bench", image_ids=ids, labels=labels.astype(np.uint8),
                   has_masks=False, num_classes=len(CLASSES), _index={i: n for n, i in enumerate(ids)})


def _manifest(root, ctx, whole: bool):
    """The segmenter driver's manifest step, 5 folds: the run key, then the Parquet manifest
    written fold by fold, or with the mask strings of every image pivoted at once first
    (``whole``). The fold split and the image URLs, which the driver computes whatever the
    masks, are timed apart."""
    from cam2seg import io
    from cam2seg.folds import make_folds
    from cam2seg.train.masks import FoldMasks, mask_keys, mask_targets, masks_digest
    from cam2seg.train import manifest

    a = _bench_archive(root, ctx)
    t0 = time.perf_counter()
    runs = store.committed_runs(root)
    rows, _ = mask_targets(a, root) if whole else mask_keys(a, root, runs)
    ids = rows.column("image_id").to_pylist()
    shapes = np.stack([rows.column("height").to_numpy(), rows.column("width").to_numpy()], 1)
    t1 = time.perf_counter()
    folds = make_folds(a.labels, 5, 0)
    t_urls = time.perf_counter()
    uris = [a.image_url(i) for i in ids]
    t2 = time.perf_counter()
    table = manifest.manifest_table(ids, uris, folds, a.labels, rows.column("rles") if whole else None, shapes)
    key = manifest.table_digest(table) + ("" if whole else masks_digest(a, root, runs))
    url = manifest.write_manifest(f"{root}-manifest-{'whole' if whole else 'folds'}", table,
                                  None if whole else FoldMasks(a, root, runs, table))
    t3 = time.perf_counter()
    fs, path = io.filesystem(url)
    mib = sum(fs.size(p) for p in fs.find(path) if p.endswith(".parquet")) / 2**20
    return (f"{len(ids)} images, key {key[:8]}, {mib:.0f} MiB of Parquet; masks {t1 - t0:.0f} s + key and "
            f"manifest {t3 - t2:.0f} s, and the fold split {t_urls - t1:.0f} s and image URLs {t2 - t_urls:.0f} s")


def _op_manifest_folds(root, ctx):
    return _manifest(root, ctx, whole=False)


def _op_manifest_whole(root, ctx):
    return _manifest(root, ctx, whole=True)


OPS = {"committed_runs": _op_committed_runs, "labeled_ids (v1, any)": _op_labeled_ids,
       "label job skip (is_in)": _op_skip, "read_masks(score, area)": _op_read_keys,
       "iter_masks (all columns)": _op_iter_all, "read_masks(12 image ids)": _op_read_some,
       "read_errors": _op_read_errors, "RunWriter.finish (reconcile)": _op_reconcile,
       "remove_uncommitted": _op_remove_uncommitted,
       "segmenter manifest, fold by fold": _op_manifest_folds,
       "segmenter manifest, all at once": _op_manifest_whole}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _child(name, root, ctx, out):
    if name.startswith("segmenter manifest"):
        import cam2seg.train.masks  # noqa: F401 -- its imports are counted in "start", not the step
    start = _rss_mib()
    t0 = time.perf_counter()
    try:
        what = OPS[name](root, ctx)
    except Exception as e:  # noqa: BLE001 -- e.g. an older cam2seg without this operation
        what = f"failed: {type(e).__name__}: {str(e)[:200]}"
    # ru_maxrss: the process's peak resident set, in KiB on Linux
    out.put((time.perf_counter() - t0, start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, what))


def _train(root: str, images: int, epochs: int, modes=("memory", "stream"), base: int = 200) -> None:
    from cam2seg.config import SegmenterConfig
    from cam2seg.pipeline.segment import train_segmenter
    from cam2seg.synthetic import synth
    from cam2seg.train.ingest import decoded_bytes

    size = (64, 400)
    rows = []
    for n in sorted({base, images}):
        data = f"{root}/archive-{n}"
        synth.write_archive(data, images=n, height=size[0], width=size[1], seed=1, mix="balanced", progress=None)
        for mode in modes:
            cfg = SegmenterConfig(encoder="tu-mobilenetv3_small_100", folds=2, epochs=epochs, batch_size=16, size=size,
                                  load_threads=2, ingest=mode, cpus_per_worker=0.5, decode_cpus=0.1, seed=0)
            t0 = time.perf_counter()
            card = train_segmenter(data, "truth", f"{root}/seg-{n}-{mode}", cfg)
            folds = card.metrics["folds"]
            epochs_ = [(f, h) for f in folds for h in f["history"]
                       if "seconds" in h and (h.get("epoch", 0) > 0 or epochs == 1)]
            # epochs after the first (Ray Data's and torch's start-up), unless there is only one:
            # the whole epoch (its validation pass included), and the training pass after its
            # first batch (without the pass's start-up: a new Ray Data execution when streamed)
            per_s = float(np.mean([f["rows"]["train"] / h["seconds"] for f, h in epochs_]))
            flowing = float(np.mean([f["rows"]["train"] / (h["train_seconds"] - h["first_batch_seconds"])
                                     for f, h in epochs_]))
            startup = float(np.mean([h["first_batch_seconds"] for _, h in epochs_]))
            peaks = {k: max(f.get(k) or 0 for f in folds) for k in ("peak_rss_mib", "peak_private_mib", "peak_shared_mib")}
            # each epoch's own private peak: climbing epoch by epoch, the worker holds what has passed
            by_epoch = [[round(h["peak_private_mib"]) for h in f["history"] if "peak_private_mib" in h] for f in folds]
            rows.append({"n": n, "mode": mode, "secs": time.perf_counter() - t0, "per_s": per_s, "flowing": flowing,
                         "startup": startup, **peaks, "private_by_epoch": by_epoch})
            print("done:", rows[-1], flush=True)  # so a run cut off by a time limit keeps what it measured
    print(f"{'images':>6s} {'ingest':>7s} {'seconds':>8s} {'epoch img/s':>11s} {'flowing img/s':>13s} "
          f"{'1st batch s':>11s} {'peak RSS MiB':>12s} {'private MiB':>11s} {'shared MiB':>10s}")
    for r in rows:
        print(f"{r['n']:6d} {r['mode']:>7s} {r['secs']:8.0f} {r['per_s']:11.2f} {r['flowing']:13.2f} "
              f"{r['startup']:11.1f} {r['peak_rss_mib']:12.0f} {r['peak_private_mib']:11.0f} {r['peak_shared_mib']:10.0f}")
    for r in rows:
        print(f"{r['n']} images, {r['mode']}: private peak MiB by epoch, per fold: "
              + "; ".join(", ".join(map(str, fold)) for fold in r["private_by_epoch"]))
    if base == images:
        return
    extra = decoded_bytes(images - base, size, 4) / 2**20
    at = {(r["n"], r["mode"]): r for r in rows}
    for mode in modes:
        for key, what in (("peak_rss_mib", "peak RSS"), ("peak_private_mib", "peak private memory")):
            grew = at[(images, mode)][key] - at[(base, mode)][key]
            print(f"{mode}: {what} grew {grew:.0f} MiB from {base} to {images} images = {grew / extra:.2f}x the "
                  f"{extra:.0f} MiB the extra images and targets take decoded (goal for stream: < 0.2x)")
    for n in (base, images) if len(modes) == 2 else ():
        s_, m_ = at[(n, "stream")], at[(n, "memory")]
        print(f"{n} images: streamed / in-memory images/s = {s_['per_s'] / m_['per_s']:.2f}x per epoch (goal >= 0.9x), "
              f"{s_['flowing'] / m_['flowing']:.2f}x once the training pass flows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["store", "train"])
    ap.add_argument("--epochs", type=int, default=2, help="train: epochs per fold")
    ap.add_argument("--modes", nargs="+", choices=["memory", "stream"], default=["memory", "stream"],
                    help="train: the ingest modes to run (both for the images/s ratio)")
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--base", type=int, default=200, help="train: the smaller archive the larger is compared with")
    ap.add_argument("--relabel", type=float, default=0.1, help="share of images the second run relabels")
    ap.add_argument("--dir", help="where to build the store (default: a temp folder, removed afterwards)")
    ap.add_argument("--ops", nargs="+", choices=list(OPS), help="store: the operations to run (default: all)")
    args = ap.parse_args()
    if args.what == "train":
        tmp = tempfile.mkdtemp(prefix="c2s-scale-")
        try:
            _train(tmp, args.images if args.images != ap.get_default("images") else 2000, args.epochs, tuple(args.modes),
                   args.base)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp = None if args.dir else tempfile.mkdtemp(prefix="c2s-scale-")
    root = args.dir or f"{tmp}/store"
    try:
        t0 = time.perf_counter()
        ctx = build_store(root, args.images, int(args.images * args.relabel))
        ctx["images"] = args.images
        parts = [len(m.parts.masks) + len(m.parts.errors) for m in store.committed_runs(root)]
        print(f"built {args.images} images x {len(CLASSES)} classes in {time.perf_counter() - t0:.0f} s "
              f"(runs of {' + '.join(map(str, parts))} parts)")
        spawn = mp.get_context("spawn")
        print(f"{'operation':32s} {'seconds':>8s} {'start MiB':>9s} {'peak MiB':>9s}  result")
        for name in args.ops or OPS:
            q = spawn.Queue()
            p = spawn.Process(target=_child, args=(name, root, ctx, q))
            p.start()
            seconds, start, peak, what = q.get()
            p.join()
            print(f"{name:32s} {seconds:8.1f} {start:9.0f} {peak:9.0f}  {what}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
