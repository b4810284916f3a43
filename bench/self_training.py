"""A second self-training round: a segmenter's out-of-fold masks, refined and label-gated.

Each image is mapped by the fold model of ``SEGMENTER`` that did not train on it (its
``folds.csv``), at the card's input size. Each variant below turns those maps into masks; the
image-level labels of ``--archive`` gate every variant (an absent class is empty, a present one
keeps its mask), as ``cam2seg label --labels`` does. Every variant is scored against the
archive's true masks beside round 1 (``--store``, the masks the segmenter learned from), with
the three figures of every Dice table and positive-pair Dice per class.

``--write VARIANT --out STORE2`` commits that variant's masks as the one run of a new label
store, so ``cam2seg train-segmenter --masks STORE2`` trains round 2 (the marker names the
segmenter, whose folds are the classifier's, so images keep their folds).

    PYTHONPATH=. .venv/bin/python bench/self_training.py --archive A --store STORE SEGMENTER \\
        [--write NAME --out STORE2]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from cam2seg import io, metrics, preprocess, rle, store
from cam2seg.archive import Archive
from cam2seg.folds import FOLDS_FILE, load_folds
from cam2seg.models.predict import load_predictor
from cam2seg.refine import DEFAULT_REFINE, Refine, refine_maps

PAR = Refine(steps=["par"])
#: name -> (refinement or None, threshold, how round 1 enters: None, "union" (round 1's mask or the
#: variant's) or "blend" (the mean of round 1's 0/1 mask and the segmenter's map is refined))
VARIANTS = {
    "segmenter maps, t 0.2 (its card's)": (None, 0.2, None),
    "segmenter maps, t 0.5": (None, 0.5, None),
    "segmenter maps + contrast + PAR, t 0.1": (DEFAULT_REFINE, 0.1, None),
    "segmenter maps + PAR, t 0.3": (PAR, 0.3, None),
    "round 1 | segmenter maps t 0.5": (None, 0.5, "union"),
    "round 1 | segmenter maps + PAR t 0.5": (PAR, 0.5, "union"),
    "round 1 | segmenter maps + contrast + PAR t 0.1": (DEFAULT_REFINE, 0.1, "union"),
    "blend + contrast + PAR, t 0.1": (DEFAULT_REFINE, 0.1, "blend"),
    "blend + PAR, t 0.5": (PAR, 0.5, "blend"),
    "segmenter + contrast + PAR t 0.1, round 1 where empty": (DEFAULT_REFINE, 0.1, "empty"),
    "segmenter + contrast + PAR t 0.1, round 1 where < half its area": (DEFAULT_REFINE, 0.1, "half"),
}


def round1_masks(store_url: str, archive: Archive) -> dict[str, np.ndarray]:
    """Image id -> ``bool[C, H, W]``: the store's newest committed masks."""
    t = store.read_masks(store_url, columns=["image_id", "class_id", "encoded_pixels", "height", "width"]).to_pydict()
    pos = {c: k for k, c in enumerate(archive.class_ids)}
    out: dict[str, np.ndarray] = {}
    for iid, cid, enc, h, w in zip(t["image_id"], t["class_id"], t["encoded_pixels"], t["height"], t["width"]):
        m = out.setdefault(iid, np.zeros((archive.num_classes, h, w), bool))
        if enc:
            m[pos[cid]] = rle.decode(enc, h, w)
    return out


def run(archive: Archive, seg_url: str, store_url: str, batch_size: int = 32, keep: str | None = None):
    """(name -> pair Dice ``float[N, C]``, true areas ``int[N, C]``, kept masks id -> ``bool[C, H, W]``
    of variant ``keep``), rows in archive order."""
    pred = load_predictor(seg_url)
    raw, folds = replace(pred, refine=None), load_folds(io.join(seg_url, FOLDS_FILE))
    shape, size = archive.image_shape(archive.image_ids[0]), tuple(pred.card.input_size)
    first = round1_masks(store_url, archive)
    names = ["round 1 (the store)", *VARIANTS]
    n, c = len(archive), archive.num_classes
    inter = {k: np.zeros((n, c), np.int64) for k in names}
    area = {k: np.zeros((n, c), np.int64) for k in names}
    true_area, kept = np.zeros((n, c), np.int64), {}
    row = {iid: i for i, iid in enumerate(archive.image_ids)}
    for k in range(len(pred.models)):
        ids = [i for i in archive.image_ids if folds[i] == k]
        for s in range(0, len(ids), batch_size):
            batch = ids[s : s + batch_size]
            images = preprocess.load_images([archive.image_url(i) for i in batch], size)
            with torch.no_grad():
                maps, _ = raw.maps(images, fold=k)
                grey = raw.grey(images)
                cache: dict = {}
                blend = 0.5 * (maps + torch.from_numpy(np.stack([first[i] for i in batch])).to(maps))
                by_refine = {(None, False): maps}
                for ref, _, how in VARIANTS.values():
                    key = (None if ref is None else ref.name, how == "blend")
                    if key not in by_refine:
                        by_refine[key] = refine_maps(blend if how == "blend" else maps, grey, ref, cache)
            for j, iid in enumerate(batch):
                i = row[iid]
                truth = archive.masks(iid, shape).astype(bool)
                gate = archive.labels[i].astype(bool)[:, None, None]
                true_area[i] = truth.sum(axis=(-2, -1))
                candidates = {"round 1 (the store)": first[iid]}
                for name, (ref, t, how) in VARIANTS.items():
                    m = by_refine[(None if ref is None else ref.name, how == "blend")][j : j + 1]
                    if tuple(m.shape[-2:]) != tuple(shape):
                        m = F.interpolate(m, size=tuple(shape), mode="bilinear", align_corners=False)
                    mask = (m[0].cpu().numpy() >= t) & gate
                    if how == "union":
                        mask = mask | first[iid]
                    elif how in ("empty", "half"):
                        a1, a2 = first[iid].sum(axis=(-2, -1)), mask.sum(axis=(-2, -1))
                        back = (a2 == 0) if how == "empty" else (a2 < 0.5 * a1)
                        mask = np.where(back[:, None, None], first[iid], mask)
                    candidates[name] = mask
                for name, mask in candidates.items():
                    inter[name][i], area[name][i], _ = metrics.pair_counts(mask, truth)
                if keep is not None:
                    kept[iid] = candidates[keep]
    dice = {k: metrics.dice_from_counts(inter[k], area[k], true_area) for k in names}
    return dice, true_area, kept


def write_store(out: str, archive: Archive, seg_url: str, masks: dict[str, np.ndarray], variant: str) -> None:
    """Commit ``masks`` (image id -> ``bool[C, H, W]``) as the one complete run of a new store."""
    if store.committed_runs(out):
        raise SystemExit(f"{out} already holds runs; give a new folder")
    card, run_id = load_predictor(seg_url).card, store.new_run_id()
    cols = {k: [] for k in store.MASK_SCHEMA.names}
    for iid, m in masks.items():
        for k, cid in enumerate(archive.class_ids):
            cols["image_id"].append(iid)
            cols["class_id"].append(cid)
            cols["encoded_pixels"].append(rle.encode(m[k]))
            cols["score"].append(float(m[k].any()))
            cols["area"].append(int(m[k].sum()))
            cols["height"].append(m.shape[1])
            cols["width"].append(m.shape[2])
            cols["model_version"].append(card.version)
            cols["run_id"].append(run_id)
    part = store.write_part(out, "masks", run_id, pa.table(cols, schema=store.MASK_SCHEMA))
    positives = np.sum([m.any(axis=(-2, -1)) for m in masks.values()], axis=0).astype(int).tolist()
    store.commit(out, run_id, {
        "run_id": run_id, "model": seg_url, "model_kind": "segmenter", "model_version": card.version,
        "images": archive.images_url, "listed": len(masks), "to_do": len(masks), "labeled": len(masks),
        "start": store.now(), "end": store.now(), "complete": True, "parts": {"masks": [part]},
        "positives": positives, "labels": archive.source, "label_gated": len(masks),
        "config": {"bench": "self_training", "variant": variant},
    })
    print(f"wrote round 2 ({variant!r}) to {out}: {len(masks)} images, positives per class {positives}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archive", required=True, help="the archive with true masks (and image-level labels)")
    ap.add_argument("--store", required=True, help="round 1: the store the segmenter was trained on")
    ap.add_argument("--write", choices=list(VARIANTS), help="commit this variant's masks to --out")
    ap.add_argument("--out", help="a new store folder for --write")
    ap.add_argument("segmenter")
    args = ap.parse_args()
    if bool(args.write) != bool(args.out):
        ap.error("--write and --out go together")
    archive = Archive.open(args.archive)
    dice, true_area, kept = run(archive, args.segmenter, args.store, keep=args.write)
    image_area = int(np.prod(archive.image_shape(archive.image_ids[0])))
    scores = metrics.dice_with_baselines(dice, true_area, image_area)
    print(metrics.format_dice_table(scores, title=f"round 2 from {args.segmenter} (out of fold, labels gate)"))
    for name, d in dice.items():
        s = scores[name]
        print(f"{name}: positive {s.positive_mean:.3f}, Kaggle all {s.kaggle_all_mean:.3f}, defective "
              f"{s.kaggle_mean:.3f}; per class " + " / ".join(f"{p:.3f}" for p in s.positive))
    if args.write:
        write_store(args.out, archive, args.segmenter, kept, args.write)


if __name__ == "__main__":
    main()
