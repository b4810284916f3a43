"""The ``cam2seg`` command line (README.md, "Command line").

Every command takes ``--config FILE``: flags override the file, the file overrides defaults.
The flags that set a config field are generated from that field (``config_flags``): its type,
its choices (a Literal), its description and its default make the flag and its ``--help``.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
import typing
from collections.abc import Sequence

from . import __version__, io, logs

__all__ = ["main", "build_parser", "config_flags", "effective_config"]


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (any fsspec URL); flags override it")


_METAVARS = {int: "N", float: "F"}


def _flag_kwargs(annotation) -> dict:
    """argparse keywords for a field of this type (Optional[X] as X): a bool gets --x/--no-x, a
    Literal its choices, int/float/str their type, a tuple (size) a HEIGHTxWIDTH string."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _flag_kwargs(rest[0])
    elif origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    elif annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    elif annotation in (int, float, str):
        return {"type": annotation, **({"metavar": _METAVARS[annotation]} if annotation in _METAVARS else {})}
    elif origin is tuple:
        return {"type": str, "metavar": "HxW"}  # the field's own validator parses it
    raise TypeError(f"no command-line flag for a field of type {annotation}")


def _default_text(value) -> str:
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    return str(value)


def config_flags(p: argparse.ArgumentParser, section: str, fields: Sequence[str | tuple[str, dict]]) -> None:
    """Add one flag per field of the config section ``section`` (a key of ``Config``).

    A field is a name (flag ``--field-name``) or (name, {"flag": "--other", "metavar": "M"}).
    The flag's type and choices come from the field's annotation, its help from the field's
    description plus "(default: X)" with the field's default; a bool field gets --name and
    --no-name. The flag's default is None ("not given"), so the file and the defaults stay in
    charge until the flag is given; ``effective_config`` applies the flags given.
    """
    from .config import Config

    model = Config.model_fields[section].annotation
    added = list(p.get_default("config_fields") or [])
    for spec in fields:
        name, opts = (spec, {}) if isinstance(spec, str) else spec
        info = model.model_fields[name]
        default = info.get_default(call_default_factory=True)
        desc = info.description or name.replace("_", " ")
        shown = "" if default is None and "None" in desc else f" (default: {_default_text(default)})"
        help_text = f"{desc}{shown}".replace("%", "%%")  # "None: ..." in desc already says what unset means
        flag = opts.get("flag", "--" + name.replace("_", "-"))
        kw = {"dest": name, "default": None, "help": help_text, **_flag_kwargs(info.annotation)}
        if "metavar" in opts:
            kw["metavar"] = opts["metavar"]
        p.add_argument(*([flag] if isinstance(flag, str) else flag), **kw)
        added.append((section, name))
    p.set_defaults(config_fields=added)


def effective_config(args):
    """The config a command runs with: defaults, then ``--config``, then the generated flags given."""
    from .config import load_config

    over: dict[str, dict] = {}
    for section, name in getattr(args, "config_fields", None) or []:
        over.setdefault(section, {})[name] = getattr(args, name)
    return load_config(getattr(args, "config", None), over)


def _archive_flags(p: argparse.ArgumentParser) -> None:
    """--classes and --clean: how the command reads archives (the config's archive section)."""
    config_flags(p, "archive", [("classes", {"metavar": "A,B,..."}), ("clean", {"metavar": "FOLDER"})])


def _print_stats(url: str, limit: int | None) -> None:
    from . import archive as archive_mod
    from .synthetic import maskstats

    arch = archive_mod.Archive.open(url)
    if not arch.has_masks:
        raise archive_mod.ArchiveError(f"{arch.source} holds no masks: nothing to measure")
    first = next(iid for iid, d in zip(arch.image_ids, arch.defective) if d)
    h, w = arch.image_shape(first)
    t0 = time.perf_counter()
    # each image's own size (one header read each): an archive may mix sizes
    values = maskstats.collect(archive_mod.iter_class_masks(arch, limit))
    summary = maskstats.summarise(values)
    print(maskstats.format_comparison(summary, h, w))
    print(f"(measured {sum(len(v['area']) for v in values.values())} masks in {time.perf_counter() - t0:.1f}s)")


def cmd_synth(args) -> int:
    from .synthetic import synth

    cfg = effective_config(args).synth
    # Spaces after the commas are the user's layout, not part of a name ("pit, scratch").
    names = None if cfg.class_names is None else [n.strip() for n in cfg.class_names.split(",")]
    try:
        summary = synth.write_archive(args.out, cfg.images, cfg.height, cfg.width, cfg.seed, cfg.clean_fraction,
                                      cfg.workers, mix=cfg.class_mix, force=args.force, num_classes=cfg.classes,
                                      class_names=names, color=cfg.color, color_only=cfg.color_only)
    except (FileExistsError, ValueError) as e:  # a non-empty OUT without --force, bad names...: refused before writing
        print(f"cam2seg synth: error: {e}", file=sys.stderr)
        return 2
    look = ", RGB, classes differ only in hue" if cfg.color_only else ", RGB" if cfg.color else ""
    print(f"wrote {summary['images']} images ({cfg.height}x{cfg.width}{look}) to {args.out} "
          f"in {summary['seconds']:.1f}s ({summary['images_per_second']} images/s)")
    # Severstal's layout keys the counts by ClassId 1..4, a named archive by class name.
    per_class = ", ".join(f"class {c}: {n}" if c.isdigit() else f"{c}: {n}"
                          for c, n in summary["images_per_class"].items())
    print(f"  clean images: {summary['clean_images']}; images per class: {per_class}; masks: {summary['masks']}")
    print(f"  {args.out}/train.csv (masks, Kaggle RLE), {args.out}/labels.csv (labels only), "
          f"{args.out}/train_images/")
    if args.stats:
        _print_stats(args.out, None)
    return 0


def cmd_stats(args) -> int:
    _print_stats(args.archive, effective_config(args).stats.limit)
    return 0


def cmd_train_classifiers(args) -> int:
    from .pipeline.classify import train_classifiers

    cfg = effective_config(args).classifier
    card = train_classifiers(args.data, args.out, cfg, force=args.force)
    print(f"model {args.out}: {card.architecture}, {card.folds} folds, version {card.version}, "
          f"OOF mean ROC-AUC {card.metrics['oof_auc_mean']:.4f}")
    return 0


def cmd_label(args) -> int:
    from .pipeline.label import label_archive

    cfg = effective_config(args).label
    summary = label_archive(args.model, args.images, args.out, cfg, incremental=args.incremental,
                            relabel=args.relabel, labels=args.labels, segmenter=args.segmenter)
    print(summary)
    return 0


def cmd_nightly(args) -> int:
    from .pipeline.nightly import run_nightly

    cfg = effective_config(args)
    print(run_nightly(cfg))
    return 0


def cmd_train_segmenter(args) -> int:
    from .pipeline.segment import train_segmenter

    full = effective_config(args)
    card = train_segmenter(args.data, args.masks, args.out, full.segmenter, force=args.force,
                           true_masks=args.true_masks, compose=full.compose)
    mixed = card.training.supervision
    also = f" and the true masks of {mixed['true_mask_images']} image(s)" if mixed else ""
    print(f"segmenter {args.out}: {card.head.architecture} with {card.architecture}, {card.folds} folds, "
          f"trained on {card.training.masks}{also}, version {card.version}, "
          f"mean validation loss {card.metrics['val_loss_mean']:.4f}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate.cams import evaluate_cams
    from .evaluate.segmenters import evaluate_segmenters

    if not (args.model or args.store or args.segmenter):
        raise ValueError("give --model (CAM masks, Table 2), --store and/or --segmenter (Table 3)")
    full = effective_config(args)
    cfg = full.evaluate
    truth, write = args.truth, not args.no_write
    if args.archive:
        truth, enough, note = _covered_truth(args.truth, args.archive, cfg)
        print(note)
        write = write and enough
    if args.model:
        _, table = evaluate_cams(args.model, truth, write=write, objective=cfg.objective,
                                 batch_size=cfg.batch_size, guided=cfg.guided)
        print(table)
        if write:
            print(f"wrote Table 2 and the tuned thresholds to {args.model}/model.json")
    if args.store or args.segmenter:
        _, table = evaluate_segmenters(truth, args.segmenter or [], args.store, objective=cfg.objective,
                                       write=write, batch_size=cfg.batch_size, classifier=args.model,
                                       floor=full.compose.floor, ceiling=full.compose.ceiling)
        print(table)
        if args.segmenter and write:
            print("wrote out-of-fold Dice and tuned thresholds to " + ", ".join(f"{s}/model.json" for s in args.segmenter))
    return 0


def _covered_truth(masks_url: str, archive_url: str, cfg):
    """(the archive cut to the images a masks file covers, whether they are enough to tune on,
    the line that says what the tuning rests on)."""
    from .archive import Archive
    from .truemasks import covered_archive, read_true_masks

    archive = Archive.open(archive_url)
    tm = read_true_masks(masks_url, archive)
    if not len(tm):
        raise ValueError(f"{masks_url} covers no image of {archive.source}")
    truth = covered_archive(archive, tm)
    rests = (f"tuning rests on the {len(tm)} image(s) of {masks_url} ({tm.positives} positive pairs; the archive has "
             f"{len(archive)} images)")
    if len(tm) < cfg.min_images or tm.positives < cfg.min_positive_pairs:
        return truth, False, (f"{rests}: fewer than evaluate.min_images {cfg.min_images} / min_positive_pairs "
                              f"{cfg.min_positive_pairs}, so the cards keep their defaults (scores below are printed "
                              "only)")
    return truth, True, rests


def cmd_demo(args) -> int:
    from .pipeline.demo import run_demo

    run_demo(args.workdir, args.preset, args.config, guided=args.guided)
    return 0


def cmd_report(args) -> int:
    from .review.report import build_report

    cfg = effective_config(args).report
    summary = build_report(args.out, archive=args.archive, store_url=args.store, model=args.model,
                           segmenters=args.segmenter or [], examples=cfg.examples)
    print(summary)
    return 0


def cmd_export_coco(args) -> int:
    from .review.coco import export_coco

    cfg = effective_config(args).export
    s = export_coco(args.store, args.out, fmt=cfg.format, order=cfg.order, limit=cfg.limit)
    order = "lowest-confidence first" if cfg.order == "confidence" else "in image id order"
    print(f"wrote {s['images']} images and {s['annotations']} {cfg.format} annotations to {s['out']} "
          f"(COCO instance segmentation; images {order})")
    return 0


def _category_map(items) -> dict[str, int]:
    out = {}
    for item in items or []:
        name, sep, cls = item.rpartition("=")
        if not sep or not name.strip() or not cls.strip().isdigit():
            raise ValueError(f"--category {item!r}: expected NAME=CLASS (a COCO category name or id, and a class id)")
        out[name.strip()] = int(cls)
    return out


def cmd_import_coco(args) -> int:
    from .review.coco_import import import_coco

    cfg = effective_config(args).import_coco
    s = import_coco(args.file, args.archive, args.out, categories={**cfg.categories, **_category_map(args.category)},
                    unannotated=cfg.unannotated, force=args.force, max_bytes=cfg.max_mb * 2**20)
    print(f"wrote {s['out']}: true masks of {s['images']} reviewed image(s) ({s['masks']} non-empty masks from "
          f"{s['annotations']} annotations; {s['clean']} reviewed clean); {s['skipped']} image(s) without "
          "annotations left out" + (" (pass --unannotated clean if the reviewers checked them)" if s["skipped"] else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .pipeline.demo import PRESET_NAMES

    parser = argparse.ArgumentParser(prog="cam2seg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cam2seg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic Severstal-like archive")
    p.add_argument("out", metavar="OUT", help="output folder (local path, file:// or s3:// URL)")
    config_flags(p, "synth", ["images", ("height", {"metavar": "H"}), ("width", {"metavar": "W"}),
                              ("seed", {"metavar": "S"}), "clean_fraction", "workers", "class_mix",
                              ("classes", {"metavar": "N"}), ("class_names", {"metavar": "A,B,..."}), "color",
                              "color_only"])
    p.add_argument("--stats", action="store_true", help="print mask geometry beside real Severstal's")
    p.add_argument("--force", action="store_true", help="empty OUT first when it is not empty (else refused)")
    _add_config(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("stats", help="mask geometry of an archive with true masks, beside real Severstal's")
    p.add_argument("archive", metavar="ARCHIVE", help="archive folder or its train.csv")
    config_flags(p, "stats", ["limit"])
    _archive_flags(p)
    _add_config(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("train-classifiers", help="stage 1: K fold classifiers on Ray Train, with SWA")
    p.add_argument("--data", required=True, metavar="ARCHIVE", help="archive folder or CSV (labels are enough)")
    p.add_argument("--out", required=True, metavar="MODEL", help="artifact folder to write (any fsspec URL)")
    config_flags(p, "classifier", [("folds", {"metavar": "K"}), "epochs", "size", ("encoder", {"metavar": "NAME"}),
                                   "output_stride", "batch_size", ("seed", {"metavar": "S"}), "channels"])
    _archive_flags(p)
    p.add_argument("--force", action="store_true", help="retrain even if MODEL already holds this classifier")
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
    p.add_argument("--labels", metavar="ARCHIVE|CSV",
                   help="image-level labels of these images (an archive folder or its train.csv / labels.csv): "
                   "classes they call absent get empty masks, the named ones always get theirs")
    p.add_argument("--segmenter", metavar="SEG",
                   help="with a classifier --model: images are labeled by both, the classifier's probability "
                   "gating each class and this segmenter's map giving its shape, at the setting the segmenter's "
                   "card holds (what images without labels should get)")
    config_flags(p, "label", ["actors", "batch_size", "method"])
    _archive_flags(p)
    _add_config(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("nightly", help="label the images that arrived since the last run; optionally retrain the "
                       "segmenter (for a nightly schedule)")
    config_flags(p, "nightly", [("model", {"metavar": "MODEL"}), ("images", {"metavar": "PREFIX"}),
                                ("store", {"flag": "--out", "metavar": "STORE"}), "retrain_after",
                                ("data", {"metavar": "ARCHIVE"}), ("segmenter", {"metavar": "SEG"}),
                                ("true_masks", {"metavar": "MASKS.csv"})])
    _archive_flags(p)
    _add_config(p)
    p.set_defaults(func=cmd_nightly)

    p = sub.add_parser("train-segmenter", help="stage 3: K fold U-Nets on pseudo-masks (or true masks), Ray Train")
    p.add_argument("--data", required=True, metavar="ARCHIVE", help="archive folder or CSV (image-level labels)")
    p.add_argument("--masks", required=True, metavar="STORE|truth",
                   help="a label store of pseudo-masks, or 'truth' for the archive's true masks (the upper bound)")
    p.add_argument("--out", required=True, metavar="SEG", help="artifact folder to write (any fsspec URL)")
    config_flags(p, "segmenter", [("folds", {"metavar": "K"}), "epochs", "size", ("encoder", {"metavar": "NAME"}),
                                  ("architecture", {"metavar": "NAME"}), "batch_size", ("ignore_band", {"metavar": "PX"}),
                                  ("seed", {"metavar": "S"}), "true_mask_weight", "channels"])
    _archive_flags(p)
    p.add_argument("--true-masks", metavar="MASKS.csv",
                   help="mixed supervision: a masks file (from import-coco, or an old project's) whose images train "
                        "on their true masks; every other image on its pseudo-mask (needs a STORE as --masks)")
    p.add_argument("--force", action="store_true", help="retrain even if SEG already holds this segmenter")
    _add_config(p)
    p.set_defaults(func=cmd_train_segmenter)

    p = sub.add_parser("evaluate", help="score pseudo-masks and segmenters out of fold (paper's Tables 2 and 3)")
    p.add_argument("--truth", required=True, metavar="ARCHIVE|MASKS.csv",
                   help="the archive the models were trained on, with masks; or, with --archive, a masks file "
                        "(import-coco's) covering some of its images, which are then the only ones scored and tuned on")
    p.add_argument("--archive", metavar="ARCHIVE", help="the archive when --truth is a masks file")
    p.add_argument("--model", metavar="MODEL", help="classifier artifact: its CAM masks (Table 2), tunes its thresholds")
    p.add_argument("--store", metavar="STORE", help="label store: score its pseudo-masks as stored (Table 3)")
    p.add_argument("--segmenter", metavar="SEG", action="extend", nargs="+",
                   help="segmenter artifact(s), one or more, the flag repeatable: out-of-fold Dice, paper "
                        "heuristics and tuned (Table 3)")
    config_flags(p, "evaluate", ["objective", "guided", "batch_size", "min_images", "min_positive_pairs"])
    _archive_flags(p)
    p.add_argument("--no-write", action="store_true", help="print only; leave the model card as it is")
    _add_config(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="an HTML report (tables, plots, overlays) of any archive, store and models")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for index.html and its pictures")
    p.add_argument("--archive", metavar="ARCHIVE", help="archive: labels (score plots) and true masks (Dice tables)")
    p.add_argument("--store", metavar="STORE", help="label store: score distributions and the gallery")
    p.add_argument("--model", metavar="MODEL", help="classifier artifact (default: the one that wrote the store)")
    p.add_argument("--segmenter", metavar="SEG", action="extend", nargs="+",
                   help="segmenter artifact(s), one or more, the flag repeatable")
    config_flags(p, "report", ["examples"])
    _archive_flags(p)
    _add_config(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export-coco", help="pseudo-masks of a label store as COCO JSON, for review in CVAT or Label Studio")
    p.add_argument("--store", required=True, metavar="STORE", help="label store (folder or s3:// prefix)")
    p.add_argument("--out", required=True, metavar="FILE", help="COCO .json file to write (any fsspec URL)")
    config_flags(p, "export", ["format", "order", "limit"])
    _add_config(p)
    p.set_defaults(func=cmd_export_coco)

    p = sub.add_parser("import-coco", help="reviewed masks from a COCO file (CVAT / Label Studio export) as a masks "
                       "file for --true-masks and evaluate --truth")
    p.add_argument("file", metavar="FILE.json", help="COCO instance-segmentation file (any fsspec URL)")
    p.add_argument("--archive", required=True, metavar="ARCHIVE", help="the archive the images belong to")
    p.add_argument("--out", required=True, metavar="MASKS.csv",
                   help="masks file to write (ImageId,ClassId,EncodedPixels; never the archive's own train.csv)")
    p.add_argument("--category", action="append", metavar="NAME=CLASS",
                   help="map a COCO category (name or id) to a class id; repeatable, added to the config's "
                        "import_coco.categories (default: names like 'class 3')")
    config_flags(p, "import_coco", ["unannotated"])
    _archive_flags(p)
    p.add_argument("--force", action="store_true", help="replace MASKS.csv when it exists")
    _add_config(p)
    p.set_defaults(func=cmd_import_coco)

    p = sub.add_parser("demo", help="the whole pipeline on a synthetic archive, with a report (see --preset)")
    p.add_argument("--workdir", default="demo-run", help="where everything is written (default ./demo-run); "
                   "re-running in the same folder resumes")
    p.add_argument("--preset", "--size", dest="preset", choices=list(PRESET_NAMES), default="small",
                   help="quick: ~2 min smoke run; small (default): ~15 min on 2 CPU cores; paper: 256x1600, "
                        "EfficientNet-b0, 5 folds (for a GPU cluster)")
    p.add_argument("--guided", action="store_true", help="also score Guided GradCAM++ (slow on a CPU)")
    _add_config(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .archive import ArchiveError
    from .archive import reading as archive_reading
    from .artifact import ArtifactError
    from .config import ConfigError
    from .rle import RLEError
    from .review.coco_import import CocoError
    from .store import StoreError

    args = build_parser().parse_args(argv)
    logs.configure()
    try:
        reading = effective_config(args).archive
        with archive_reading(reading.class_list, reading.clean):
            return args.func(args)
    except (ConfigError, ArchiveError, ArtifactError, RLEError, StoreError, CocoError, FileNotFoundError, FileExistsError,
            NotADirectoryError, ValueError) as e:
        print(f"cam2seg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cam2seg {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        network = io.unreachable(e)
        if network is None:
            raise
        print(f"cam2seg {args.command}: error: {network}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
