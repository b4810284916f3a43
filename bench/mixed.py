"""Mixed supervision on the demo archive: true masks for 0, 16, 64 and 160 images (issue 19's table).

Needs a finished ``cam2seg demo --preset small --workdir WORK`` (its archive, classifier, label store,
pseudo-mask U-Net and true-mask U-Net). For each count N, N images drawn at random (``--seed``;
the smaller sets inside the larger) get their true masks, written as a masks file as
``cam2seg import-coco`` would. Every row is scored out of fold on the *other* images (so nothing is
scored on what it was tuned or trained on), with the three figures:

* pseudo-masks: the classifier's out-of-fold CAM maps of the labeling job's variant (GradCAM++ +
  SWA + aug smooth, contrast + PAR refinement), gated by the image labels as ``label --labels``
  gates; threshold and minimum length at the defaults for N = 0, else tuned on the N images;
* U-Net, mixed supervision: ``train-segmenter --masks STORE --true-masks FILE`` (N = 0: the demo's
  pseudo-mask U-Net), post-processing at the paper's defaults for N = 0, else tuned on the N images;
* U-Net on every image's true mask (the demo's), tuned on all images out of fold: the upper bound.

    PYTHONPATH=. .venv/bin/python bench/mixed.py --work WORK [--counts 0 16 64 160] [--seed 0] [--preset small]

Target (issue 19): with 64 masked images the mixed U-Net reaches >= 0.9x the true-mask U-Net.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

from cam2seg import io, metrics
from cam2seg.archive import Archive
from cam2seg.config import load_config
from cam2seg.evaluate import tuning
from cam2seg.evaluate.cams import REFINED, TUNED_VARIANT, UNREFINED_VARIANT, VARIANTS, oof_cam_stats, pair_dice
from cam2seg.evaluate.segmenters import oof_seg_stats
from cam2seg.pipeline.demo import PRESETS, paths
from cam2seg.pipeline.segment import train_segmenter
from cam2seg.postprocess import DEFAULT_CAM, PAPER_SEGMENTER
from cam2seg.truemasks import masks_csv

FIGURES = ("positive-pair Dice", "Kaggle mean, all images", "Kaggle mean, defective")


def _figures(dice: np.ndarray, true_area: np.ndarray, held: np.ndarray) -> tuple[float, float, float]:
    s = metrics.score_dice(dice[held], true_area[held])
    return s.positive_mean, s.kaggle_all_mean, s.kaggle_mean


def _tuned(st, idx: np.ndarray, probs: np.ndarray):
    return tuning.sweep(st.h_all[idx], st.h_in[idx], st.true_area[idx], probs[idx], st.image_area).per_class_pp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="a finished `cam2seg demo --preset small` workdir")
    ap.add_argument("--counts", type=int, nargs="+", default=[0, 16, 64, 160])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--preset", default="small", help="the demo preset WORK was made with (its segmenter section)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = paths(io.absolute(args.work))
    out_dir = io.join(io.absolute(args.work), "bench-mixed")
    archive = Archive.open(p["archive"])
    order = np.random.default_rng(args.seed).permutation(len(archive))
    seg_cfg = load_config(None, base=PRESETS[args.preset]).segmenter
    t0 = time.perf_counter()

    _, method, aug, weights = VARIANTS[UNREFINED_VARIANT]
    cam = oof_cam_stats(p["classifier"], archive, method, aug, weights, args.batch_size,
                        refines={TUNED_VARIANT: REFINED[TUNED_VARIANT][1]})[TUNED_VARIANT]
    gate = archive.labels.astype(np.float32)
    truth_st = oof_seg_stats(p["segmenter_truth"], archive, args.batch_size)
    upper_pp = _tuned(truth_st, np.arange(len(archive)), truth_st.probs)
    upper = pair_dice(truth_st, upper_pp)
    upper_paper = pair_dice(truth_st, PAPER_SEGMENTER)

    results = []
    for n in args.counts:
        idx = np.sort(order[:n])
        held = np.ones(len(archive), bool)
        held[idx] = False
        if n:
            masks = {archive.image_ids[i]: {c: archive.rle(archive.image_ids[i], c) for c in archive.class_ids}
                     for i in idx}
            url = io.join(out_dir, f"masks-{n}.csv")
            io.write_bytes(url, masks_csv(masks, archive.class_ids).encode())
            seg = io.join(out_dir, f"seg-mixed-{n}")
            t = time.perf_counter()
            train_segmenter(p["archive"], p["store"], seg, seg_cfg, true_masks=url)
            train_s = time.perf_counter() - t
        else:
            seg, train_s = p["segmenter"], 0.0
        pseudo_pp = DEFAULT_CAM if not n else _tuned(cam, idx, gate)
        pseudo = pair_dice(cam, pseudo_pp, gate)
        st = oof_seg_stats(seg, archive, args.batch_size)
        seg_pp = PAPER_SEGMENTER if not n else _tuned(st, idx, st.probs)
        mixed = pair_dice(st, seg_pp)
        mixed_paper = pair_dice(st, PAPER_SEGMENTER)
        empty = metrics.dice_from_counts(np.zeros_like(cam.true_area), np.zeros_like(cam.true_area), cam.true_area)
        row = {"masked_images": n, "masked_positive_pairs": int((archive.true_areas()[idx] > 0).sum()),
               "scored_images": int(held.sum()), "train_seconds": round(train_s),
               "pseudo": _figures(pseudo, cam.true_area, held), "mixed": _figures(mixed, st.true_area, held),
               "upper": _figures(upper, truth_st.true_area, held), "empty": _figures(empty, cam.true_area, held),
               "mixed_paper": _figures(mixed_paper, st.true_area, held),
               "upper_paper": _figures(upper_paper, truth_st.true_area, held),
               "pseudo_pp": pseudo_pp.model_dump(), "mixed_pp": seg_pp.model_dump()}
        results.append(row)
        print(json.dumps(row), flush=True)

    io.write_bytes(io.join(out_dir, f"results-seed{args.seed}.json"), json.dumps(results, indent=1).encode())
    print(f"\nseed {args.seed}, {len(archive)} images; each row scored on the images without true masks "
          f"({time.perf_counter() - t0:.0f} s)")
    print("| true masks | row | " + " | ".join(FIGURES) + " |")
    print("|---|---|---|---|---|")
    for r in results:
        for key, label in (("pseudo", "pseudo-masks, labels gate" + (" (defaults)" if not r["masked_images"] else ", tuned on them")),
                           ("mixed", "U-Net, mixed supervision" + (" (pseudo only, paper defaults)" if not r["masked_images"] else ", tuned on them")),
                           ("upper", "U-Net on all true masks (tuned on all)"),
                           ("mixed_paper", "U-Net, mixed supervision, paper setting (thr 0.2, no gate)"),
                           ("upper_paper", "U-Net on all true masks, paper setting"), ("empty", "baseline: all-empty")):
            print(f"| {r['masked_images']} ({r['masked_positive_pairs']} pos.) | {label} | "
                  + " | ".join(f"{v:.3f}" for v in r[key]) + " |")
        for a, b, what in (("mixed", "upper", "tuned"), ("mixed_paper", "upper_paper", "paper setting")):
            ratio = [f"{m / u:.2f}x" if u else "n/a" for m, u in zip(r[a], r[b])]
            print(f"| {r['masked_images']} | mixed / upper, {what} | " + " | ".join(ratio) + " |")


if __name__ == "__main__":
    main()
