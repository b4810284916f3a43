"""A segmenter's out-of-fold maps under fixed and per-image relative thresholds.

For every (image, class) pair with a true mask, the positive-pair Dice of the mask
``map >= t`` (fixed) or ``map >= r * max(map)`` (relative to that map's maximum, a per-image
rule a labels-only user could apply without tuning). Each image is mapped by the fold model
that did not train on it (the artifact's ``folds.csv``), at the archive's image size. Relative
thresholds cannot be read off evaluate's histograms, hence this pass over the maps themselves.

    .venv/bin/python bench/segmenter_thresholds.py --archive ARCHIVE SEGMENTER [SEGMENTER ...]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from cam2seg import io, preprocess
from cam2seg.archive import Archive
from cam2seg.folds import FOLDS_FILE, load_folds
from cam2seg.models.predict import load_predictor

RULES = [("fixed", t) for t in (0.2, 0.1, 0.05)] + [("relative", r) for r in (0.3, 0.5, 0.7)]


def pair_dices(archive: Archive, seg_url: str, batch_size: int = 32) -> dict[tuple[str, float], list[list[float]]]:
    """rule -> per class, the Dice of every positive pair."""
    pred = load_predictor(seg_url)
    raw, folds = replace(pred, refine=None), load_folds(io.join(seg_url, FOLDS_FILE))
    shape, size = archive.image_shape(archive.image_ids[0]), tuple(pred.card.input_size)
    c = pred.card.num_classes
    out = {rule: [[] for _ in range(c)] for rule in RULES}
    for k in range(len(pred.models)):
        ids = [i for i in archive.image_ids if folds[i] == k]
        for s in range(0, len(ids), batch_size):
            batch = ids[s : s + batch_size]
            with torch.no_grad():
                maps, _ = raw.maps(preprocess.load_images([archive.image_url(i) for i in batch], size), fold=k)
            if tuple(maps.shape[-2:]) != tuple(shape):
                maps = F.interpolate(maps, size=tuple(shape), mode="bilinear", align_corners=False)
            for m_img, iid in zip(maps.cpu().numpy(), batch):
                truth = archive.masks(iid, shape).astype(bool)
                for j in np.flatnonzero(truth.any(axis=(-2, -1))):
                    for kind, v in RULES:
                        p = m_img[j] >= (v if kind == "fixed" else v * m_img[j].max())
                        out[(kind, v)][j].append(2 * (p & truth[j]).sum() / (p.sum() + truth[j].sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archive", required=True)
    ap.add_argument("segmenters", nargs="+")
    args = ap.parse_args()
    archive = Archive.open(args.archive)
    for url in args.segmenters:
        print(url)
        for (kind, v), per_class in pair_dices(archive, url).items():
            print(f"  {kind} {v:.2f}: positive-pair Dice {np.mean(sum(per_class, [])):.3f}, per class "
                  + " / ".join(f"{np.mean(d):.3f}" for d in per_class))


if __name__ == "__main__":
    main()
