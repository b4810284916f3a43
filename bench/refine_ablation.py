"""Refinement of CAM pseudo-masks, out of fold: which steps and parameters, at which threshold.

One GradCAM++ + SWA + aug-smooth pass over the archive (each image by the fold model that did
not train on it), then every candidate refinement of those maps, scored with the archive's image
labels as the gate (what ``cam2seg label --labels`` does) at fixed thresholds: the three figures
(positive-pair Dice, Kaggle mean over all images, Kaggle mean over defective images) and the
share of absent pairs given a mask. Uses the evaluation code itself
(:func:`cam2seg.evaluate.cams.oof_cam_stats`), so the numbers are the ones ``evaluate`` prints.

    .venv/bin/python bench/refine_ablation.py --model MODEL --archive ARCHIVE
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from cam2seg import metrics
from cam2seg.archive import Archive
from cam2seg.evaluate.cams import pair_dice
from cam2seg.evaluate.cams import oof_cam_stats
from cam2seg.postprocess import DEFAULT_CAM
from cam2seg.refine import DEFAULT_REFINE, Refine

THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)


def candidates() -> dict[str, Refine]:
    c = {"none": Refine(steps=[]), "par": Refine(steps=["par"]), "contrast": Refine(steps=["contrast"]),
         "contrast+par (default)": DEFAULT_REFINE}
    for window in (0.5, 1.2):
        c[f"contrast+par window {window}"] = Refine(contrast={"window": window})
    for lo, hi in ((2.0, 5.0), (3.0, 7.0)):
        c[f"contrast+par z {lo}-{hi}"] = Refine(contrast={"z_low": lo, "z_high": hi})
    c["contrast+par cam_power 1"] = Refine(contrast={"cam_power": 1.0})
    c["contrast+par dilations 1,2,4,8,12,24"] = Refine(par={"dilations": [1, 2, 4, 8, 12, 24]})
    c["contrast+par 20 iterations"] = Refine(par={"iterations": 20})
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--archive", required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", help="also write the scores here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    archive = Archive.open(args.archive)
    refines = candidates()
    t0 = time.perf_counter()
    stats = oof_cam_stats(args.model, archive, "gradcam++", True, "swa", args.batch_size, refines=refines)
    print(f"{len(archive)} images, OOF maps and {len(refines)} refinements in {time.perf_counter() - t0:.0f} s")
    gate = archive.labels.astype(np.float32)
    out = {}
    for name, st in stats.items():
        rows = {}
        for t in THRESHOLDS:
            pp = DEFAULT_CAM.model_copy(update={"threshold": t})
            s = metrics.score_dice(pair_dice(st, pp, gate), st.true_area)
            rows[t] = (s.positive_mean, s.kaggle_all_mean, s.kaggle_mean, s.absent_masked)
        out[name] = rows
        best = max(rows, key=lambda t: rows[t][1])
        cells = "  ".join(f"t{t}: {v[0]:.3f}/{v[1]:.3f}/{v[2]:.3f}" for t, v in rows.items())
        print(f"{name:38s} best t {best} (Kaggle, all) | {cells}")
    print("cells: positive-pair Dice / Kaggle mean, all images / Kaggle mean, defective images; image labels gate")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {str(t): v for t, v in r.items()} for k, r in out.items()}, f, indent=1)


if __name__ == "__main__":
    main()
