"""Finer CAMs: fusing the maps of earlier encoder stages (strides 8 / 16) with the final one.

For each CAM method and each set of fused strides, one out-of-fold pass over the archive (each
image by the fold model that did not train on it, SWA weights, aug smoothing), scored raw and
with the default refinement, image labels as the gate (what ``cam2seg label --labels`` does),
at three thresholds: positive-pair Dice / Kaggle mean over all images / Kaggle mean over
defective images. Uses the evaluation code itself (:func:`cam2seg.evaluate.cams.oof_cam_stats`).
The seconds column is the pass's time, so fused and unfused cost compare within one run.

    .venv/bin/python bench/fused_cams.py --model MODEL --archive ARCHIVE
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cam2seg import metrics
from cam2seg.archive import Archive
from cam2seg.evaluate.cams import oof_cam_stats, pair_dice
from cam2seg.postprocess import DEFAULT_CAM
from cam2seg.refine import DEFAULT_REFINE, NO_REFINE

THRESHOLDS = (0.1, 0.2, 0.3)
FUSIONS = ((), (16,), (8, 16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--archive", required=True)
    ap.add_argument("--methods", default="gradcam++,layercam", help="comma-separated fast CAM methods")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(2)
    archive = Archive.open(args.archive)
    gate = archive.labels.astype(np.float32)
    for method in args.methods.split(","):
        for strides in FUSIONS:
            t0 = time.perf_counter()
            stats = oof_cam_stats(args.model, archive, method, True, "swa", args.batch_size,
                                  refines={"raw": NO_REFINE, "refined": DEFAULT_REFINE}, fuse_strides=strides)
            seconds = time.perf_counter() - t0
            for rid, st in stats.items():
                cells = []
                for t in THRESHOLDS:
                    s = metrics.score_dice(pair_dice(st, DEFAULT_CAM.model_copy(update={"threshold": t}), gate),
                                           st.true_area)
                    cells.append(f"t{t}: {s.positive_mean:.3f}/{s.kaggle_all_mean:.3f}/{s.kaggle_mean:.3f}")
                fused = "+".join(map(str, strides)) or "final only"
                print(f"{method:10s} fused {fused:11s} {rid:8s} | {'  '.join(cells)} | {seconds:.0f} s", flush=True)
    print("cells: positive-pair Dice / Kaggle mean, all images / Kaggle mean, defective images; image labels gate")


if __name__ == "__main__":
    main()
