"""Any archive (issue 34): named classes, colour, and what colour earns, on the `small` preset's recipe.

Cases (each a synthetic archive of the `small` preset's size, 800 images at 64x400, balanced
classes, 25% clean, with the seed's own archive and training):

* ``grey4``: Severstal's four classes, grey (the demo's archive);
* ``grey3``: three classes of the same geometry as ``colour3`` (pits, streaks, scratches), grey;
* ``colour3``: the same three classes with names (pit, scratch, stain) in colour: each class also
  has its own hue; the model reads RGB (``channels: auto`` detects it);
* ``colour3-grey``: the ``colour3`` archive read as grey (``channels: 1``);
* ``hue1`` / ``hue3``: one archive whose three classes have the same shape and brightness and differ
  only in hue (``synth --color-only``), read as grey (``channels: 1``) and as RGB (``channels: 3``).

Every row is scored out of fold (each image by the fold model that never saw it), with the three
figures beside the all-empty baseline:

* labels-only: the refined CAM masks (GradCAM++ + SWA + aug smooth, contrast + PAR) at the
  defaults, gated by the image-level labels (what ``cam2seg label --labels`` stores; nothing
  tuned on true masks);
* unlabelled: the same maps gated by the classifier's probability at the default confidence
  (what an image without labels gets).

    PYTHONPATH=. .venv/bin/python bench/archives.py --work /tmp/archives [--seeds 0 1 2] [--cases grey4 colour3 ...]

Prints one table per case and seed, then mean +- sd over the seeds; writes ``WORK/results.json``.
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
from cam2seg.evaluate.cams import TUNED_VARIANT, oof_cam_stats, pair_dice
from cam2seg.pipeline.classify import train_classifiers
from cam2seg.postprocess import DEFAULT_CAM
from cam2seg.refine import DEFAULT_REFINE
from cam2seg.synthetic import synth

CASES = {
    # case -> (synth options, classifier channels)
    "grey4": ({}, "auto"),
    "grey3": ({"num_classes": 3, "class_names": ["pit", "streak", "scratch"]}, "auto"),
    "colour3": ({"num_classes": 3, "class_names": ["pit", "scratch", "stain"], "color": True}, "auto"),
    # the colour3 archive read as grey: what the RGB input itself adds on that archive
    "colour3-grey": ({"num_classes": 3, "class_names": ["pit", "scratch", "stain"], "color": True}, "1"),
    "hue1": ({"num_classes": 3, "class_names": ["red", "green", "blue"], "color_only": True}, "1"),
    "hue3": ({"num_classes": 3, "class_names": ["red", "green", "blue"], "color_only": True}, "3"),
}
FIGURES = ("positive-pair Dice", "Kaggle mean, all images", "Kaggle mean, defective", "absent pairs masked")


def _figures(dice: np.ndarray, true_area: np.ndarray) -> list[float]:
    s = metrics.score_dice(dice, true_area)
    return [s.positive_mean, s.kaggle_all_mean, s.kaggle_mean, s.absent_masked]


def run_case(work: str, case: str, seed: int, images: int, epochs: int | None = None) -> dict:
    opts, channels = CASES[case]
    small = load_config(None, base=_preset("small")).classifier
    arch_dir = io.join(work, f"{_archive_of(case)}-s{seed}", "archive")
    if not io.exists(io.join(arch_dir, "labels.csv")):
        s = load_config(None, base=_preset("small")).synth
        synth.write_archive(arch_dir, images, s.height, s.width, seed, s.clean_fraction, 2, progress=None,
                            mix=s.class_mix, **opts)
    cfg = small.model_copy(update={"seed": seed, "channels": channels, **({"epochs": epochs} if epochs else {})})
    model = io.join(work, f"{case}-s{seed}", "classifier")
    t0 = time.perf_counter()
    card = train_classifiers(arch_dir, model, cfg)
    train_s = time.perf_counter() - t0
    archive = Archive.open(arch_dir)
    st = oof_cam_stats(model, archive, "gradcam++", True, "swa", 16, refines={TUNED_VARIANT: DEFAULT_REFINE})
    st = st[TUNED_VARIANT]
    rows = {
        "labels-only (image labels gate, defaults)": _figures(pair_dice(st, DEFAULT_CAM, archive.labels), st.true_area),
        "unlabelled (classifier's gate, defaults)": _figures(pair_dice(st, DEFAULT_CAM), st.true_area),
        "all-empty": _figures(np.where(st.true_area > 0, 0.0, 1.0), st.true_area),
    }
    auc = [v for v in card.metrics["oof_auc"].values()]
    return {"case": case, "seed": seed, "classes": card.names, "channels": card.channels, "rows": rows,
            "oof_auc": auc, "train_seconds": round(train_s, 1)}


def _archive_of(case: str) -> str:
    """Cases that read one archive two ways share it."""
    return "hue" if case.startswith("hue") else case.split("-")[0]


def _preset(name: str) -> dict:
    from cam2seg.pipeline.demo import PRESETS

    return PRESETS[name]


def _table(title: str, rows: dict[str, list]) -> str:
    out = [f"| {title} | " + " | ".join(FIGURES) + " |", "|---|" + "---|" * len(FIGURES)]
    for name, vals in rows.items():
        out.append(f"| {name} | " + " | ".join(v if isinstance(v, str) else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (smoke runs only)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results_url = io.join(args.work, "results.json")
    results = json.loads(io.read_bytes(results_url)) if io.exists(results_url) else []
    done = {(r["case"], r["seed"]) for r in results}
    for seed in args.seeds:
        for case in args.cases:
            if (case, seed) in done:
                continue
            r = run_case(args.work, case, seed, args.images, args.epochs)
            results.append(r)
            io.write_bytes(results_url, json.dumps(results, indent=1).encode())
            print(f"\n{case}, seed {seed}: classes {r['classes']}, {'RGB' if r['channels'] == 3 else 'grey'} input, "
                  f"OOF ROC-AUC {'/'.join(f'{a:.3f}' for a in r['oof_auc'])}, training {r['train_seconds']} s")
            print(_table(case, r["rows"]), flush=True)
    print("\n## mean +- sd over seeds")
    for case in args.cases:
        rs = [r for r in results if r["case"] == case and r["seed"] in args.seeds]
        if not rs:
            continue
        agg = {}
        for name in rs[0]["rows"]:
            v = np.array([r["rows"][name] for r in rs], np.float64)
            agg[name] = [f"{m:.3f} +- {s:.3f}" for m, s in zip(v.mean(0), v.std(0, ddof=1) if len(rs) > 1 else v.std(0))]
        auc = np.array([np.nanmean(r["oof_auc"]) for r in rs])
        print(f"\n{case} ({len(rs)} seeds; mean OOF ROC-AUC {auc.mean():.3f} +- {auc.std(ddof=1) if len(rs) > 1 else 0:.3f})")
        print(_table(case, agg))


if __name__ == "__main__":
    main()
