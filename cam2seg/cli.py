"""The ``cam2seg`` command line (DESIGN.md, "Command line").

Every command takes ``--config FILE``: flags override the file, the file overrides defaults.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import __version__

__all__ = ["main"]


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (any fsspec URL); flags override it")


def _synth_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, help="number of images (default 1000)")
    p.add_argument("--height", type=int, help="image height in pixels (default 256)")
    p.add_argument("--width", type=int, help="image width in pixels (default 1600)")
    p.add_argument("--seed", type=int, help="random seed; the same seed gives the same bytes (default 0)")
    p.add_argument("--clean-fraction", type=float, help="share of defect-free images (default 0.45)")
    p.add_argument("--workers", type=int, help="processes generating in parallel (default 1)")
    p.add_argument("--class-mix", choices=["severstal", "balanced"],
                   help="Severstal's class combinations (default) or one uniform class per defective image")


def _synth_overrides(args) -> dict:
    keys = ("images", "height", "width", "seed", "clean_fraction", "workers", "class_mix")
    return {"synth": {k: getattr(args, k) for k in keys}}


def _print_stats(url: str, limit: int | None) -> None:
    from . import archive as archive_mod
    from .synthetic import maskstats

    arch = archive_mod.Archive.open(url)
    if not arch.has_masks:
        raise archive_mod.ArchiveError(f"{arch.source} holds no masks: nothing to measure")
    first = next(iid for iid, d in zip(arch.image_ids, arch.defective) if d)
    h, w = arch.image_shape(first)
    t0 = time.perf_counter()
    values = maskstats.collect(archive_mod.iter_class_masks(arch, limit, shape=(h, w)))
    summary = maskstats.summarise(values)
    print(maskstats.format_comparison(summary, h, w))
    print(f"(measured {sum(len(v['area']) for v in values.values())} masks in {time.perf_counter() - t0:.1f}s)")


def cmd_synth(args) -> int:
    from .synthetic import synth
    from .config import load_config

    cfg = load_config(args.config, _synth_overrides(args)).synth
    summary = synth.write_archive(args.out, cfg.images, cfg.height, cfg.width, cfg.seed, cfg.clean_fraction,
                                  cfg.workers, mix=cfg.class_mix)
    print(f"wrote {summary['images']} images ({cfg.height}x{cfg.width}) to {args.out} "
          f"in {summary['seconds']:.1f}s ({summary['images_per_second']} images/s)")
    per_class = ", ".join(f"class {c}: {n}" for c, n in summary["images_per_class"].items())
    print(f"  clean images: {summary['clean_images']}; images per class: {per_class}; masks: {summary['masks']}")
    print(f"  {args.out}/train.csv (masks, Kaggle RLE), {args.out}/labels.csv (labels only), "
          f"{args.out}/train_images/")
    if args.stats:
        _print_stats(args.out, None)
    return 0


def cmd_stats(args) -> int:
    _print_stats(args.archive, args.limit)
    return 0


def cmd_train_classifiers(args) -> int:
    from .pipeline.classify import train_classifiers
    from .config import load_config

    over = {k: getattr(args, k) for k in ("folds", "epochs", "size", "encoder", "output_stride", "batch_size", "seed")}
    cfg = load_config(args.config, {"classifier": over}).classifier
    card = train_classifiers(args.data, args.out, cfg, force=args.force)
    print(f"model {args.out}: {card.architecture}, {card.folds} folds, version {card.version}, "
          f"OOF mean ROC-AUC {card.metrics['oof_auc_mean']:.4f}")
    return 0


def cmd_label(args) -> int:
    from .config import load_config
    from .pipeline.label import label_archive

    over = {"actors": args.actors, "batch_size": args.batch_size, "method": args.method}
    cfg = load_config(args.config, {"label": over}).label
    summary = label_archive(args.model, args.images, args.out, cfg, incremental=args.incremental,
                            relabel=args.relabel, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(summary)
    return 0


def cmd_nightly(args) -> int:
    from .config import load_config
    from .pipeline.nightly import run_nightly

    over = {"model": args.model, "images": args.images, "store": args.out, "retrain_after": args.retrain_after,
            "data": args.data, "segmenter": args.segmenter}
    cfg = load_config(args.config, {"nightly": over})
    print(run_nightly(cfg, log=lambda m: print(m, file=sys.stderr, flush=True)))
    return 0


def cmd_train_segmenter(args) -> int:
    from .config import load_config
    from .pipeline.segment import train_segmenter

    over = {k: getattr(args, k) for k in ("folds", "epochs", "size", "encoder", "architecture", "batch_size", "seed",
                                          "ignore_band")}
    cfg = load_config(args.config, {"segmenter": over}).segmenter
    card = train_segmenter(args.data, args.masks, args.out, cfg, force=args.force)
    print(f"segmenter {args.out}: {card.head['architecture']} with {card.architecture}, {card.folds} folds, "
          f"trained on {card.training['masks']}, version {card.version}, "
          f"mean validation loss {card.metrics['val_loss_mean']:.4f}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate.cams import evaluate_cams
    from .evaluate.segmenters import evaluate_segmenters

    if not (args.model or args.store or args.segmenter):
        raise ValueError("give --model (CAM masks, Table 2), --store and/or --segmenter (Table 3)")
    if args.model:
        _, table = evaluate_cams(args.model, args.truth, write=not args.no_write, objective=args.objective,
                                 batch_size=args.batch_size, guided=not args.no_guided)
        print(table)
        if not args.no_write:
            print(f"wrote Table 2 and the tuned thresholds to {args.model}/model.json")
    if args.store or args.segmenter:
        _, table = evaluate_segmenters(args.truth, args.segmenter or [], args.store, objective=args.objective,
                                       write=not args.no_write, batch_size=args.batch_size)
        print(table)
        if args.segmenter and not args.no_write:
            print("wrote out-of-fold Dice and tuned thresholds to " + ", ".join(f"{s}/model.json" for s in args.segmenter))
    return 0


def cmd_demo(args) -> int:
    from .pipeline.demo import run_demo

    run_demo(args.workdir, args.preset, args.config, guided=args.guided)
    return 0


def cmd_report(args) -> int:
    from .review.report import build_report

    summary = build_report(args.out, archive=args.archive, store_url=args.store, model=args.model,
                           segmenters=args.segmenter or [], examples=args.examples)
    print(summary)
    return 0


def cmd_export_coco(args) -> int:
    from .review.coco import export_coco

    s = export_coco(args.store, args.out, fmt=args.format, order=args.order, limit=args.limit)
    order = "lowest-confidence first" if args.order == "confidence" else "in image id order"
    print(f"wrote {s['images']} images and {s['annotations']} {args.format} annotations to {s['out']} "
          f"(COCO instance segmentation; images {order})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cam2seg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cam2seg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic Severstal-like archive")
    p.add_argument("out", metavar="OUT", help="output folder (local path, file:// or s3:// URL)")
    _synth_flags(p)
    p.add_argument("--stats", action="store_true", help="print mask geometry beside real Severstal's")
    _add_config(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("stats", help="mask geometry of an archive with true masks, beside real Severstal's")
    p.add_argument("archive", metavar="ARCHIVE", help="archive folder or its train.csv")
    p.add_argument("--limit", type=int, help="measure only the first N defective images")
    _add_config(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("train-classifiers", help="stage 1: K fold classifiers on Ray Train, with SWA")
    p.add_argument("--data", required=True, metavar="ARCHIVE", help="archive folder or CSV (labels are enough)")
    p.add_argument("--out", required=True, metavar="MODEL", help="artifact folder to write (any fsspec URL)")
    p.add_argument("--folds", type=int, help="K (default 5)")
    p.add_argument("--epochs", type=int, help="epochs per fold (default 20)")
    p.add_argument("--size", help="input HEIGHTxWIDTH (default 256x1600)")
    p.add_argument("--encoder", help="timm model name (default efficientnet_b0)")
    p.add_argument("--output-stride", type=int, choices=[8, 16, 32],
                   help="encoder stride: 16 or 8 give finer CAMs for more compute (default 32)")
    p.add_argument("--batch-size", type=int, help="default 64")
    p.add_argument("--seed", type=int, help="fold split and initialisation seed (default 0)")
    p.add_argument("--force", action="store_true", help="retrain even if MODEL already holds this model")
    _add_config(p)
    p.set_defaults(func=cmd_train_classifiers)

    p = sub.add_parser("label", help="stage 2: pseudo-masks for every image under a prefix, on Ray Data")
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="classifier artifact (CAM masks) or segmenter artifact (its masks)")
    p.add_argument("--images", required=True, metavar="PREFIX", help="folder or s3:// prefix of image files")
    p.add_argument("--out", required=True, metavar="STORE", help="label store (folder or s3:// prefix)")
    p.add_argument("--incremental", action="store_true",
                   help="skip images a committed run already labeled with this model version")
    p.add_argument("--relabel", action="store_true", help="label everything again even with --incremental")
    p.add_argument("--actors", type=int, help="CAM actors (default: one per GPU, or 1)")
    p.add_argument("--batch-size", type=int, help="images per CAM batch (default 16)")
    p.add_argument("--method", help="gradcam, gradcam++ (default), guided-gradcam, guided-gradcam++")
    _add_config(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("nightly", help="label the images that arrived since the last run; optionally retrain the "
                       "segmenter (for a nightly schedule)")
    p.add_argument("--model", metavar="MODEL", help="the labeling model: classifier or segmenter artifact "
                   "(or the config's nightly.model)")
    p.add_argument("--images", metavar="PREFIX", help="where new images arrive (or nightly.images)")
    p.add_argument("--out", metavar="STORE", help="the label store (or nightly.store)")
    p.add_argument("--retrain-after", type=int, metavar="N",
                   help="retrain the segmenter once N images were labeled since its training (default 0: never)")
    p.add_argument("--data", metavar="ARCHIVE", help="for retraining: the image-level labels of the images")
    p.add_argument("--segmenter", metavar="SEG", help="for retraining: the segmenter artifact to (re)write")
    _add_config(p)
    p.set_defaults(func=cmd_nightly)

    p = sub.add_parser("train-segmenter", help="stage 3: K fold U-Nets on pseudo-masks (or true masks), Ray Train")
    p.add_argument("--data", required=True, metavar="ARCHIVE", help="archive folder or CSV (image-level labels)")
    p.add_argument("--masks", required=True, metavar="STORE|truth",
                   help="a label store of pseudo-masks, or 'truth' for the archive's true masks (the upper bound)")
    p.add_argument("--out", required=True, metavar="SEG", help="artifact folder to write (any fsspec URL)")
    p.add_argument("--folds", type=int, help="K (default: the classifier's folds, else 5)")
    p.add_argument("--epochs", type=int, help="epochs per fold (default 30)")
    p.add_argument("--size", help="input HEIGHTxWIDTH (default: the images' size)")
    p.add_argument("--encoder", help="smp encoder name, tu-<timm name> for timm (default efficientnet-b0)")
    p.add_argument("--architecture", help="smp architecture (default Unet)")
    p.add_argument("--batch-size", type=int, help="default 16")
    p.add_argument("--ignore-band", type=int, help="pixels either side of a pseudo-mask's edge left out of the loss")
    p.add_argument("--seed", type=int, help="fold split and initialisation seed (default 0)")
    p.add_argument("--force", action="store_true", help="retrain even if SEG already holds this segmenter")
    _add_config(p)
    p.set_defaults(func=cmd_train_segmenter)

    p = sub.add_parser("evaluate", help="score pseudo-masks and segmenters out of fold (paper's Tables 2 and 3)")
    p.add_argument("--truth", required=True, metavar="ARCHIVE", help="the archive the models were trained on, with masks")
    p.add_argument("--model", metavar="MODEL", help="classifier artifact: its CAM masks (Table 2), tunes its thresholds")
    p.add_argument("--store", metavar="STORE", help="label store: score its pseudo-masks as stored (Table 3)")
    p.add_argument("--segmenter", metavar="SEG", action="append",
                   help="segmenter artifact (repeatable): out-of-fold Dice, paper heuristics and tuned (Table 3)")
    p.add_argument("--objective", choices=["kaggle", "positive"], default="kaggle",
                   help="what tuning maximises: Kaggle mean Dice (default) or positive-pair Dice")
    p.add_argument("--no-write", action="store_true", help="print only; leave the model card as it is")
    p.add_argument("--no-guided", action="store_true",
                   help="skip the Guided GradCAM++ rows (a full backward per class: the slowest row)")
    p.add_argument("--batch-size", type=int, default=8)
    _add_config(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="an HTML report (tables, plots, overlays) of any archive, store and models")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for index.html and its pictures")
    p.add_argument("--archive", metavar="ARCHIVE", help="archive: labels (score plots) and true masks (Dice tables)")
    p.add_argument("--store", metavar="STORE", help="label store: score distributions and the gallery")
    p.add_argument("--model", metavar="MODEL", help="classifier artifact (default: the one that wrote the store)")
    p.add_argument("--segmenter", metavar="SEG", action="append", help="segmenter artifact (repeatable)")
    p.add_argument("--examples", type=int, default=3,
                   help="gallery images per class: 3 = best, typical, worst (default 3; 0: no gallery)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export-coco", help="pseudo-masks of a label store as COCO JSON, for review in CVAT or Label Studio")
    p.add_argument("--store", required=True, metavar="STORE", help="label store (folder or s3:// prefix)")
    p.add_argument("--out", required=True, metavar="FILE", help="COCO .json file to write (any fsspec URL)")
    p.add_argument("--format", choices=["polygon", "rle"], default="polygon",
                   help="polygon: editable outlines, holes filled (default); rle: exact masks, iscrowd=1 "
                        "(CVAT imports them as masks; Label Studio's COCO converter cannot)")
    p.add_argument("--order", choices=["confidence", "id"], default="confidence",
                   help="images lowest-confidence first (default) or by image id")
    p.add_argument("--limit", type=int, metavar="N", help="export only the first N images (in --order)")
    p.set_defaults(func=cmd_export_coco)

    p = sub.add_parser("demo", help="the whole pipeline on a synthetic archive, with a report (see --preset)")
    p.add_argument("--workdir", default="demo-run", help="where everything is written (default ./demo-run); "
                   "re-running in the same folder resumes")
    p.add_argument("--preset", "--size", dest="preset", choices=["quick", "small", "paper"], default="small",
                   help="quick: ~2 min smoke run; small (default): ~15 min on 2 CPU cores; paper: 256x1600, "
                        "EfficientNet-b0, 5 folds (for a GPU cluster)")
    p.add_argument("--guided", action="store_true", help="also score Guided GradCAM++ (slow on a CPU)")
    _add_config(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .archive import ArchiveError
    from .artifact import ArtifactError
    from .config import ConfigError
    from .rle import RLEError
    from .store import StoreError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ArchiveError, ArtifactError, RLEError, StoreError, FileNotFoundError, NotADirectoryError,
            ValueError) as e:
        print(f"cam2seg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cam2seg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
