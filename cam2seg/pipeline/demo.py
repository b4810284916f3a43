"""``cam2seg demo``: the whole pipeline on a synthetic archive, through the same code and local
Ray a cluster run uses.

Stages: synthetic archive -> fold classifiers (Ray Train) -> CAM evaluation and tuning (Table 2)
-> labeling job (Ray Data) into a local store -> segmenters on the pseudo-masks and on the true
masks (Ray Train) -> Table 3 -> HTML report -> COCO file for review. Every stage skips work
already done in ``workdir``, so an interrupted demo resumes where it stopped (training resumes
from its last epoch checkpoint).

Presets size the run: ``quick`` (the test suite's end-to-end check, about two minutes),
``small`` (the default: about 15 minutes on 2 CPU cores with numbers worth reading) and
``paper`` (the paper's setting: 256x1600, EfficientNet-b0, 5 folds; a GPU cluster's job).
"""

from __future__ import annotations

import logging
import json
import time
from dataclasses import dataclass, field

from .. import io

__all__ = ["PRESETS", "PRESET_NAMES", "load_preset", "run_demo", "DemoResult"]

_log = logging.getLogger(__name__)

# The presets are YAML files shipped in the package (cam2seg/configs/NAME.yaml), each a base config
# (section -> key -> value) that the demo's --config file overrides key by key.
PRESET_NAMES = ("quick", "small", "paper")


def load_preset(name: str) -> dict[str, dict]:
    """The preset ``name`` as read from ``cam2seg/configs/NAME.yaml`` (duplicate keys refused)."""
    from importlib import resources

    from ..config import ConfigError, load_yaml

    if name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESET_NAMES)}")
    res = resources.files("cam2seg").joinpath("configs", f"{name}.yaml")
    data = load_yaml(res.read_text(encoding="utf-8"), f"cam2seg/configs/{name}.yaml")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"cam2seg/configs/{name}.yaml: expected section -> key -> value")
    return data


PRESETS: dict[str, dict] = {name: load_preset(name) for name in PRESET_NAMES}

# How the demo tunes post-processing: for the Kaggle mean over all images, the metric that charges
# a mask on a clean image (a positive-pair objective drops the class gate to 0).
OBJECTIVE = "kaggle"


@dataclass
class DemoResult:
    workdir: str
    seconds: dict[str, float] = field(default_factory=dict)
    auc: dict[str, float] = field(default_factory=dict)
    tables: list[str] = field(default_factory=list)
    report: str = ""
    coco: str = ""


def paths(workdir: str) -> dict[str, str]:
    names = {"archive": "archive", "classifier": "classifier", "store": "labels", "segmenter": "segmenter",
             "segmenter_truth": "segmenter-truth", "report": "report", "coco": "review.coco.json"}
    return {k: io.join(workdir, v) for k, v in names.items()}


def _say(text: str) -> None:
    """A result line: stdout, beside the progress lines on stderr."""
    print(text, flush=True)


def _stage(n: int, total: int, text: str) -> float:
    _log.info(f"\n== [{n}/{total}] {text}")
    return time.perf_counter()


def run_demo(workdir: str, preset: str = "small", config_path: str | None = None, *, guided: bool = False) -> DemoResult:
    """Run (or resume) the demo in ``workdir``; returns the numbers it printed."""
    from ..synthetic import synth
    from ..evaluate.cams import evaluate_cams
    from .classify import train_classifiers
    from ..review.coco import export_coco
    from ..config import load_config
    from .label import label_archive
    from ..review.report import build_report
    from ..evaluate.segmenters import evaluate_segmenters
    from .segment import train_segmenter

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    workdir = io.absolute(workdir.rstrip("/"))
    cfg = load_config(config_path, base=PRESETS[preset])
    p = paths(workdir)
    res = DemoResult(workdir)
    total, t_all = 8, time.perf_counter()
    _log.info(f"cam2seg demo, preset {preset!r}, in {workdir}")

    t = _stage(1, total, "synthetic Severstal-like archive")
    s = cfg.synth
    want = {"images": s.images, "height": s.height, "width": s.width, "seed": s.seed,
            "clean_fraction": s.clean_fraction, "class_mix": s.class_mix}
    meta_url = io.join(p["archive"], "synth.json")
    if io.exists(io.join(p["archive"], "train.csv")) and io.exists(meta_url):
        meta = json.loads(io.read_bytes(meta_url))
        have = {k: meta.get("clean_fraction_requested" if k == "clean_fraction" else k) for k in want}
        if have != want:
            raise ValueError(f"{p['archive']} holds an archive made with {have}, not this preset's {want}: "
                             "use another --workdir or delete it")
        _log.info(f"archive already present ({meta['images']} images at {s.height}x{s.width}); reusing it")
    else:
        out = synth.write_archive(p["archive"], s.images, s.height, s.width, s.seed, s.clean_fraction,
                                  max(s.workers, 2), mix=s.class_mix)
        _log.info(f"wrote {out['images']} images to {p['archive']} in {out['seconds']:.1f}s; "
                  f"images per class {out['images_per_class']}, clean {out['clean_images']}")
    res.seconds["synth"] = time.perf_counter() - t

    t = _stage(2, total, f"{cfg.classifier.folds} fold classifiers ({cfg.classifier.encoder} at "
               f"{cfg.classifier.size[0]}x{cfg.classifier.size[1]}, {cfg.classifier.epochs} epochs) on Ray Train")
    card = train_classifiers(p["archive"], p["classifier"], cfg.classifier)
    res.auc = {k: float(v) for k, v in card.metrics["oof_auc"].items()}
    _say("out-of-fold ROC-AUC per class: " + ", ".join(f"{n}: {v:.3f}" for n, v in zip(card.names, res.auc.values())))
    res.seconds["classifiers"] = time.perf_counter() - t

    t = _stage(3, total, "CAM pseudo-masks out of fold, post-processing tuned (the paper's Table 2)")
    if "cam_oof" in card.metrics and card.postprocess.objective == OBJECTIVE:
        _log.info(f"already evaluated (card version {card.version}); the table is in the report")
    else:
        _, table = evaluate_cams(p["classifier"], p["archive"], objective=OBJECTIVE, guided=guided,
                                 batch_size=16)
        _say(table)
        res.tables.append(table)
    res.seconds["evaluate CAMs"] = time.perf_counter() - t

    t = _stage(4, total, "labeling job: refined GradCAM++ pseudo-masks of every image on Ray Data, gated by the "
               "archive's image labels, into the label store")
    _say(str(label_archive(p["classifier"], io.join(p["archive"], "train_images"), p["store"], cfg.label,
                             incremental=True, labels=p["archive"])))
    res.seconds["label"] = time.perf_counter() - t

    seg = cfg.segmenter
    t = _stage(5, total, f"segmenter on the pseudo-masks ({seg.architecture} with {seg.encoder}, "
               f"{seg.epochs} epochs) on Ray Train")
    train_segmenter(p["archive"], p["store"], p["segmenter"], seg, compose=cfg.compose)
    res.seconds["segmenter (pseudo-masks)"] = time.perf_counter() - t

    t = _stage(6, total, "segmenter on the true masks (the upper bound), same folds")
    folds = card.folds
    train_segmenter(p["archive"], "truth", p["segmenter_truth"], seg.model_copy(update={"folds": folds}))
    res.seconds["segmenter (true masks)"] = time.perf_counter() - t

    t = _stage(7, total, "pseudo-masks and segmenters out of fold (the paper's Table 3)")
    _, table = evaluate_segmenters(p["archive"], [p["segmenter"], p["segmenter_truth"]], p["store"],
                                   objective=OBJECTIVE, batch_size=16, classifier=p["classifier"],
                                   floor=cfg.compose.floor, ceiling=cfg.compose.ceiling)
    _say(table)
    res.tables.append(table)
    res.seconds["evaluate segmenters"] = time.perf_counter() - t

    t = _stage(8, total, "report and review file")
    rep = build_report(p["report"], archive=p["archive"], store_url=p["store"], model=p["classifier"],
                       segmenters=[p["segmenter"], p["segmenter_truth"]])
    res.report = rep.html
    coco = export_coco(p["store"], p["coco"])
    res.coco = coco["out"]
    _say(str(rep))
    _say(f"COCO file for review in CVAT / Label Studio (lowest-confidence images first): {coco['out']} "
              f"({coco['images']} images, {coco['annotations']} annotations)")
    res.seconds["report"] = time.perf_counter() - t
    res.seconds["total"] = time.perf_counter() - t_all
    _say("\n== done in " + f"{res.seconds['total'] / 60:.1f} min: "
              + ", ".join(f"{k} {v:.0f}s" for k, v in res.seconds.items() if k != "total"))
    _say(f"open {rep.html} in a browser")
    return res

