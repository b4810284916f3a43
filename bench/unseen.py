"""A new night without labels (issue 35): train on part of an archive, label the rest through
``cam2seg label`` as if it had arrived tonight, and score every predictor against its true masks.

Per seed: a synthetic archive of the ``small`` preset's kind (800 images at 64x400, its own seed)
is split by image into a labelled archive (2/3) and a night (1/3). On the labelled part, with the
``small`` preset's recipe and nothing tuned on true masks:

1. fold classifiers (``train-classifiers``), their card left at its defaults;
2. ``cam2seg label --labels`` of the labelled images (refined CAM pseudo-masks, gated by labels);
3. a segmenter on those pseudo-masks (``train-segmenter``); its composition with the classifier is
   tuned out of fold against the pseudo-masks (labels only);
4. the upper bound: a segmenter on the true masks, same folds, its composition tuned out of fold
   on the labelled part's true masks.

Then the night is labelled without labels (``cam2seg label`` each time, its own store):

* ``composed``: ``--model CLASSIFIER --segmenter SEGMENTER`` (what an unlabelled image gets);
* ``refined CAM``: ``--model CLASSIFIER`` (refined CAM masks, the classifier's gate);
* ``segmenter alone``: ``--model SEGMENTER`` (its card's setting: the paper's, threshold 0.2);
* ``composed, U-Net on true masks``: the upper bound's segmenter composed with the classifier;
* ``with its labels``: ``--model CLASSIFIER --labels NIGHT`` (for reference: labels the night has not).

    PYTHONPATH=. PYTHONUNBUFFERED=1 .venv/bin/python bench/unseen.py --work /tmp/unseen [--seeds 0 1 2]

Prints each seed's table (three figures beside the all-empty baseline, fold ROC-AUCs) and the
mean +- sd over the seeds; writes ``WORK/results.json`` (a seed already there is not rerun).
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from cam2seg import cli, io, metrics
from cam2seg.archive import Archive
from cam2seg.config import load_config
from cam2seg.evaluate.composed import oof_probs, segmenter_stats, shared_folds, tune_composition, write_composition
from cam2seg.evaluate.segmenters import store_pair_dice
from cam2seg.folds import FOLDS_FILE, load_folds
from cam2seg.pipeline.demo import PRESETS
from cam2seg.synthetic import synth

from archives import FIGURES, _table  # bench/archives.py: the same three figures, the same table

ROWS = ("composed (classifier gate + segmenter shape): what an unlabelled image gets",
        "refined CAM, classifier's gate", "segmenter alone (its card's setting)",
        "composed, U-Net on true masks (upper bound)", "the same night with its labels (reference)", "all-empty")


def _figures(dice: np.ndarray, true_area: np.ndarray) -> list[float]:
    s = metrics.score_dice(dice, true_area)
    return [s.positive_mean, s.kaggle_all_mean, s.kaggle_mean, s.absent_masked]


def split_archive(src: str, dst: str, ids: list[str]) -> None:
    """A copy of the archive at ``src`` with the images ``ids`` only (images, train.csv, labels.csv)."""
    keep = set(ids)
    out = Path(dst)
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    for i in ids:
        shutil.copyfile(Path(src) / "train_images" / i, out / "train_images" / i)
    for name in ("train.csv", "labels.csv"):
        rows = list(csv.reader(_io.StringIO((Path(src) / name).read_text())))
        buf = _io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([rows[0]] + [r for r in rows[1:] if r and r[0] in keep])
        (out / name).write_text(buf.getvalue())


def _label(*args: str) -> None:
    if cli.main(["label", *args]) != 0:
        raise RuntimeError(f"cam2seg label {' '.join(args)} failed")


def run_seed(work: str, seed: int, images: int) -> dict:
    base = PRESETS["small"]
    cfg = load_config(None, base=base)
    root = Path(work) / f"s{seed}"
    full, train, night = root / "full", root / "train", root / "night"
    if not (full / "labels.csv").exists():
        s = cfg.synth
        synth.write_archive(str(full), images, s.height, s.width, seed, s.clean_fraction, 2, progress=None,
                            mix=s.class_mix)
    ids = Archive.open(str(full)).image_ids
    order = np.random.default_rng(seed).permutation(len(ids))
    cut = len(ids) * 2 // 3
    if not (train / "labels.csv").exists():
        split_archive(str(full), str(train), [ids[i] for i in sorted(order[:cut])])
        split_archive(str(full), str(night), [ids[i] for i in sorted(order[cut:])])
    p = {k: str(root / k) for k in ("classifier", "store", "segmenter", "segmenter-truth")}
    t0 = time.perf_counter()
    from cam2seg.pipeline.classify import train_classifiers
    from cam2seg.pipeline.label import label_archive
    from cam2seg.pipeline.segment import train_segmenter

    card = train_classifiers(str(train), p["classifier"], cfg.classifier.model_copy(update={"seed": seed}))
    label_archive(p["classifier"], str(train / "train_images"), p["store"], cfg.label, incremental=True,
                  labels=str(train))
    seg = cfg.segmenter.model_copy(update={"seed": seed})
    train_segmenter(str(train), p["store"], p["segmenter"], seg, compose=cfg.compose)
    train_segmenter(str(train), "truth", p["segmenter-truth"], seg.model_copy(update={"folds": card.folds}),
                    compose=cfg.compose)
    # the upper bound's composition: tuned out of fold on the labelled part's true masks
    archive = Archive.open(str(train))
    folds = shared_folds(p["classifier"], p["segmenter-truth"], archive)
    st = segmenter_stats(p["segmenter-truth"], archive, folds)
    st.probs = oof_probs(p["classifier"], archive, folds)
    write_composition(p["segmenter-truth"], tune_composition(st, p["classifier"], f"true masks of {train}",
                                                             floor=cfg.compose.floor, ceiling=cfg.compose.ceiling))
    train_s = time.perf_counter() - t0
    imgs = str(night / "train_images")
    stores = {ROWS[0]: ("--model", p["classifier"], "--segmenter", p["segmenter"]),
              ROWS[1]: ("--model", p["classifier"]),
              ROWS[2]: ("--model", p["segmenter"]),
              ROWS[3]: ("--model", p["classifier"], "--segmenter", p["segmenter-truth"]),
              ROWS[4]: ("--model", p["classifier"], "--labels", str(night))}
    truth = Archive.open(str(night))
    true_area = truth.true_areas()
    rows = {}
    for k, (name, args) in enumerate(stores.items()):
        out = str(root / f"night-{k}")
        if not io.exists(io.join(out, "_runs")):
            _label(*args, "--images", imgs, "--out", out)
        dice, held = store_pair_dice(out, truth, true_area)
        if not held.all():
            raise RuntimeError(f"{out} lacks {int((~held).sum())} night images")
        rows[name] = _figures(dice, true_area)
    rows[ROWS[5]] = _figures(np.where(true_area > 0, 0.0, 1.0), true_area)
    fold_auc = [f.get("auc") for f in card.metrics["folds"]]
    return {"seed": seed, "classes": card.names, "rows": rows, "oof_auc": list(card.metrics["oof_auc"].values()),
            "fold_auc": fold_auc, "train_images": cut, "night_images": len(ids) - cut,
            "train_seconds": round(train_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=800)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results_url = io.join(args.work, "results.json")
    results = json.loads(io.read_bytes(results_url)) if io.exists(results_url) else []
    for seed in args.seeds:
        if any(r["seed"] == seed for r in results):
            continue
        r = run_seed(args.work, seed, args.images)
        results.append(r)
        io.write_bytes(results_url, json.dumps(results, indent=1).encode())
        print(f"\nseed {seed}: {r['train_images']} labelled images, a night of {r['night_images']}; OOF ROC-AUC "
              f"{'/'.join(f'{a:.3f}' for a in r['oof_auc'])}; fold ROC-AUC "
              f"{'; '.join('/'.join(f'{a:.3f}' for a in f) for f in r['fold_auc'] if f)}; "
              f"training {r['train_seconds']} s")
        print(_table(f"seed {seed}", r["rows"]), flush=True)
    rs = [r for r in results if r["seed"] in args.seeds]
    agg = {}
    for name in rs[0]["rows"]:
        v = np.array([r["rows"][name] for r in rs], np.float64)
        agg[name] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(v.mean(0), v.std(0, ddof=1) if len(rs) > 1 else v.std(0))]
    print(f"\n## mean ± sd over {len(rs)} seed(s)")
    print(_table("the night, no labels", agg))


if __name__ == "__main__":
    main()
