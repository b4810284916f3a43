"""``cam2seg report``: one HTML page (plus its PNGs) that people can look at.

What it shows depends on what it is given, so it works for any archive, store and model:

* classifier card -> ROC-AUC per class and per fold (paper's Table 1), ROC curves when the
  archive's labels are at hand, the CAM Dice ablation (Table 2) and its threshold sweep once
  ``cam2seg evaluate`` has written them into the card;
* archive with true masks + store and/or segmenters -> Table 3 (stored pseudo-masks, the
  classifier's tuned CAM row, each segmenter out of fold, both baselines) and per-class bars;
* store -> score distributions per class (split by the image-level labels when known) and a
  gallery per class: image | true mask | CAM heatmap | pseudo-mask | segmenter mask for the
  best, typical and worst images by the pseudo-mask's Dice, or, without true masks, by score.

Gallery maps are out of fold where the model's ``folds.csv`` holds the image (the fold model
that did not train on it), as the evaluation scores them. File names in the output are made
up here, never taken from image ids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from .. import __version__, io, metrics, rle, store
from . import overlay, plots
from ..archive import Archive
from ..classes import check_same
from ..artifact import ArtifactError, load_card
from ..folds import FOLDS_FILE, load_folds
from ..models.predict import pick_device
from ..evaluate.rows import Table, card_rows, scored_rows
from ..evaluate.segmenters import CARD_CAM_ROW, STORE_ROW, store_row, tuned_cam_row

__all__ = ["build_report", "compose_report", "write_report", "pick_examples", "Report", "ReportSummary", "REPORT_FILE"]

_log = logging.getLogger(__name__)

REPORT_FILE = "index.html"
IMG_DIR = "img"


@dataclass
class ReportSummary:
    out: str
    html: str
    images: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"report: {self.html} ({len(self.images)} pictures; sections: {', '.join(self.sections)}) "
                f"in {self.seconds:.1f}s")


def pick_examples(values: np.ndarray, n: int = 3) -> list[tuple[int, str]]:
    """Indices of ``values float[M]`` to show, highest first: with n=3 the best, the median
    and the worst; otherwise n evenly spaced ranks. Returns (index, label) without repeats."""
    values = np.asarray(values, float)
    if values.size == 0 or n <= 0:
        return []
    order = np.argsort(-values, kind="stable")
    ranks = np.unique(np.round(np.linspace(0, len(order) - 1, min(n, len(order)))).astype(int))
    names = {len(order) - 1: "worst", 0: "best"}  # one image: it is the best
    out = []
    for r in ranks:
        label = names.get(int(r), "typical" if n == 3 else f"rank {int(r) + 1} of {len(order)}")
        out.append((int(order[r]), label))
    return out


def _rows_table(rows: dict[str, metrics.DiceScores | dict], class_names: list[str]) -> list[dict]:
    """Dice rows (id -> card row dict or DiceScores; a :class:`~cam2seg.evaluate.rows.Table`
    gives the labels of its DiceScores) as plain dicts for the template."""
    out = []
    for rid, s in rows.items():
        get = (lambda k: s[k]) if isinstance(s, dict) else (lambda k: getattr(s, k))
        name = s.get("label", rid) if isinstance(s, dict) else rows.label(rid) if isinstance(rows, Table) else rid
        opt = (lambda k: s.get(k)) if isinstance(s, dict) else (lambda k: getattr(s, k))
        out.append({"name": name, "kaggle_mean": get("kaggle_mean"), "positive_mean": get("positive_mean"),
                    "kaggle_all_mean": opt("kaggle_all_mean"), "absent_masked": opt("absent_masked"),
                    "classes": [(get("kaggle")[i], get("positive")[i]) for i in range(len(class_names))]})
    return out


class _Pictures(dict):
    """The report's pictures, relative path under the report folder -> PNG bytes, with
    made-up names; nothing is written until :func:`write_report`."""

    def png(self, name: str, content: bytes | np.ndarray) -> str:
        if isinstance(content, np.ndarray):
            content = io.encode_png(content)
        rel = f"{IMG_DIR}/{name}.png"
        self[rel] = content
        return rel


@dataclass
class Report:
    """A composed report: the page, its pictures (relative path -> PNG bytes), its sections."""

    html: str
    pictures: dict[str, bytes]
    sections: list[str]


def _fmt(x) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _pct(x) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.1f}%"


def _load_predictor(url: str, device):
    """(predictor, folds) of an artifact: the folds say which model did not see an image."""
    from ..models.predict import load_predictor

    return load_predictor(url, device), _folds_of(url)


def _folds_of(url: str) -> dict[str, int]:
    try:
        return load_folds(io.join(url, FOLDS_FILE))
    except FileNotFoundError:
        return {}


def _oof(predictor, folds: dict[str, int], image_id: str) -> tuple[int | None, str]:
    """The fold to map ``image_id`` with: its out-of-fold model if known, else (None) the ensemble."""
    k = folds.get(image_id)
    if k is not None and 0 <= k < len(predictor.models):
        return k, f"fold {k} model (out of fold)"
    return None, "fold ensemble"


def _classifier_sections(card, url: str, archive: Archive | None, w: _Pictures, names: list[str]) -> dict:
    sec = {"url": url, "version": card.version, "architecture": card.architecture, "folds": card.folds,
           "input_size": f"{card.input_size[0]}x{card.input_size[1]}"}
    auc = card.metrics.get("oof_auc", {})
    sec["auc"] = [{"name": f"{card.architecture}, out of fold ({card.folds} folds)",
                   "values": [auc.get(str(c)) for c in card.class_ids],
                   "mean": card.metrics.get("oof_auc_mean")}]
    for f in card.metrics.get("folds", []):
        vals = list(f.get("auc", []))
        sec["auc"].append({"name": f"fold {f['fold']} (its validation images)", "values": vals,
                           "mean": float(np.nanmean(vals)) if vals else None})
    if archive is not None:
        try:
            import pyarrow.parquet as pq

            fs, path = io.filesystem(io.join(url, "oof.parquet"))
            with fs.open(path, "rb") as f:
                oof = pq.read_table(f).to_pydict()
            idx = {iid: i for i, iid in enumerate(oof["image_id"])}
            common = [iid for iid in archive.image_ids if iid in idx]
            if len(common) >= 2:
                probs = np.array([[oof[f"prob_{c}"][idx[i]] for c in card.class_ids] for i in common])
                labels = archive.labels[[archive.index(i) for i in common]]
                sec["roc_png"] = w.png("roc", plots.roc_curves(labels, probs, names,
                                                               f"out-of-fold ROC, {len(common)} images"))
        except FileNotFoundError:
            pass
    cam = card.metrics.get("cam_oof")
    if cam:
        sec["table2"] = _rows_table(cam, names)
    return sec


def _table3(archive: Archive, store_url: str | None, model_card, seg_cards: dict, names: list[str]):
    """Rows of Table 3 (name -> DiceScores or card dict) and the stored masks' pair Dice."""
    true_area = archive.true_areas()
    shape = archive.image_shape(archive.image_ids[0])
    pair, store_dice, store_label, partial = {}, None, "", None
    if store_url:
        store_dice, held, store_label = store_row(store_url, archive, true_area)
        if held.all():
            pair[STORE_ROW] = store_dice
        else:
            partial = Table({STORE_ROW: metrics.score_dice(store_dice[held], true_area[held])},
                            {STORE_ROW: store_label})
    computed = scored_rows(pair, {STORE_ROW: store_label}, true_area, shape[0] * shape[1])
    if partial is not None:
        computed.update(partial)
        computed.labels.update(partial.labels)
    rows: dict = {k: card_rows(computed)[k] for k in computed}
    cam_row = tuned_cam_row(model_card) if model_card is not None else None
    if cam_row is not None:
        rows[CARD_CAM_ROW] = {**cam_row, "label": "CAM masks out of fold, tuned per class (classifier card)"}
    for url, card in seg_cards.items():
        rows.update(card.metrics.get("seg_oof", {}))
    # what an unlabelled image gets first and baselines last, as in the printed tables
    order = ([k for k in rows if k.startswith("composed:")]
             + [k for k in rows if not k.startswith(("composed:", "baseline/"))]
             + [k for k in rows if k.startswith("baseline/")])
    return {k: rows[k] for k in order}, store_dice


def _sweeps(model_card, seg_cards: dict) -> dict:
    curves = {}
    if model_card is not None and model_card.metrics.get("cam_oof_sweep"):
        curves["CAM (GradCAM++ + SWA + aug smooth + contrast + PAR), out of fold"] = model_card.metrics["cam_oof_sweep"]
    for url, card in seg_cards.items():
        if card.metrics.get("seg_oof_sweep"):
            curves[f"{url.rstrip('/').rsplit('/', 1)[-1]}: segmenter, out of fold"] = card.metrics["seg_oof_sweep"]
    return curves


def _gallery(archive: Archive | None, images_prefix: str | None, store_url: str, table, cls_models, seg_models,
             store_dice, examples: int, w: _Pictures, names: dict[int, str] | None = None) -> list[dict]:
    """Per class, the picked images as rows of captioned panels; ``table``: the store's rows
    without their masks (image_id, class_id, score, area); ``names``: class id -> name."""
    names = names or {}
    t = table.to_pydict()
    rows = {(i, c): (a, s) for i, c, a, s in zip(t["image_id"], t["class_id"], t["area"], t["score"])}
    class_ids = sorted({c for _, c in rows})
    has_truth = archive is not None and archive.has_masks
    ta = archive.true_areas() if has_truth and store_dice is not None else None
    chosen = []
    for cid in class_ids:
        if ta is not None:
            col = archive.class_ids.index(cid)
            cand = [i for i in range(len(archive)) if ta[i, col] > 0 and (archive.image_ids[i], cid) in rows]
            ids = [archive.image_ids[i] for i in cand]
            values = store_dice[cand, col] if cand else np.zeros(0)
            how = "Dice of the stored pseudo-mask against the true mask"
        else:
            ids = sorted(i for (i, c), r in rows.items() if c == cid and r[0] > 0)
            values = np.array([rows[(i, cid)][1] for i in ids])
            how = "class score (no true masks: most confident, typical and least confident masked images)"
        chosen.append((cid, how, ids, values, pick_examples(values, examples)))
    # only the picked images' masks are read: the store may hold millions
    picked = sorted({ids[p] for _, _, ids, _, picks in chosen for p, _ in picks})
    enc = store.read_masks(store_url, columns=["encoded_pixels"], image_ids=picked).to_pydict()
    rles = {(i, c): e for i, c, e in zip(enc["image_id"], enc["class_id"], enc["encoded_pixels"])}
    out = []
    for cid, how, ids, values, picks in chosen:
        section = {"class_id": cid, "class_name": names.get(cid, f"class {cid}"), "how": how, "candidates": len(ids),
                   "examples": []}
        for j, (p, label) in enumerate(picks):
            iid = ids[p]
            url = archive.image_url(iid) if archive is not None else io.join(images_prefix, io.check_key(iid))
            img = io.decode_image(io.read_bytes(url))
            img = np.array(img)  # writable, for torch; grey or RGB as stored (each predictor converts it)
            h, wd = img.shape[:2]
            score, code = rows[(iid, cid)][1], rles[(iid, cid)]
            pseudo = rle.decode(code, h, wd) if code else np.zeros((h, wd), bool)
            color = overlay.CLASS_COLORS[(cid - 1) % len(overlay.CLASS_COLORS)]
            truth = archive.masks(iid, (h, wd))[archive.class_ids.index(cid)] if has_truth else None
            panels = [("image", img)]
            if truth is not None:
                panels.append((f"true mask ({int(truth.sum())} px)", overlay.mask_overlay(img, truth, color)))
            if cls_models is not None:
                pred, folds = cls_models
                fold, which = _oof(pred, folds, iid)
                cams, probs = pred.maps(img[None], out_size=(h, wd), fold=fold)
                kc = pred.class_ids.index(cid)
                panels.append((f"{pred.method}{' + aug smooth' if pred.aug_smooth else ''} heatmap, {which}, "
                               f"class probability {float(probs[0, kc]):.2f}", overlay.heatmap_overlay(img, cams[0, kc].cpu().numpy())))
            cap = f"pseudo-mask in the store ({int(pseudo.sum())} px, score {score:.2f}"
            if truth is not None:
                cap += f", Dice {float(metrics.dice(pseudo, truth)):.2f}"
            panels.append((cap + ")", overlay.mask_overlay(img, pseudo, color)))
            for name, (pred, folds) in (seg_models or {}).items():
                fold, which = _oof(pred, folds, iid)
                m = pred.masks(img[None], [(h, wd)], fold=fold)[0][0][pred.class_ids.index(cid)]
                cap = f"segmenter {name}, {which} ({int(m.sum())} px"
                if truth is not None:
                    cap += f", Dice {float(metrics.dice(m, truth)):.2f}"
                panels.append((cap + ")", overlay.mask_overlay(img, m, color)))
            files = [(caption, w.png(f"gallery-c{cid}-{j}-{n}", pic)) for n, (caption, pic) in enumerate(panels)]
            section["examples"].append({"label": label, "image_id": iid, "value": float(values[p]), "panels": files})
        _log.info(f"  gallery: {section['class_name']}, {len(picks)} of {len(ids)} images")
        out.append(section)
    return out


def build_report(out: str, *, archive: str | None = None, store_url: str | None = None, model: str | None = None,
                 segmenters: list[str] | tuple = (), examples: int = 3, device=None) -> ReportSummary:
    """Write ``out/index.html`` and ``out/img/*.png`` from whatever is given (see module doc):
    :func:`compose_report`, then :func:`write_report`."""
    t0 = time.perf_counter()
    report = compose_report(archive=archive, store_url=store_url, model=model, segmenters=segmenters,
                            examples=examples, device=device)
    return write_report(out, report, seconds=time.perf_counter() - t0)


def write_report(out: str, report: Report, seconds: float = 0.0) -> ReportSummary:
    """Write the pictures, then the page (so a page on disk always has its pictures)."""
    for rel, content in report.pictures.items():
        io.write_bytes(io.join(out, rel), content)
    html_url = io.join(out, REPORT_FILE)
    io.write_bytes(html_url, report.html.encode())
    return ReportSummary(out=out, html=html_url, images=list(report.pictures), sections=report.sections,
                         seconds=seconds)


def compose_report(*, archive: str | None = None, store_url: str | None = None, model: str | None = None,
                   segmenters: list[str] | tuple = (), examples: int = 3, device=None) -> Report:
    """The page and its pictures, from whatever is given (see module doc); nothing is written.

    ``model`` defaults to the classifier that wrote the store's newest run; gallery images are
    read from ``archive`` if given, else from the store's recorded image prefix.
    """
    from jinja2 import Environment, PackageLoader, select_autoescape

    if not (store_url or model or segmenters):
        raise ValueError("give at least one of --store, --model, --segmenter")
    if examples < 0:
        raise ValueError(f"examples must be >= 0, got {examples}")
    dev = pick_device(device)
    w = _Pictures()
    arch = Archive.open(archive) if archive else None
    runs = store.committed_runs(store_url) if store_url else []
    if store_url and not runs:
        raise store.StoreError(f"{store_url} holds no committed labeling run")
    newest = runs[-1] if runs else None
    if model is None and newest is not None and newest.model_kind in ("classifier", "composed") and newest.model:
        model = newest.model
    model_card = None
    if model:
        try:
            model_card = load_card(model)
        except ArtifactError as e:
            if store_url is None:
                raise
            _log.info(f"  leaving out the classifier sections: {e}")
            model = None
    if model_card is not None and model_card.kind != "classifier":
        raise ArtifactError(f"{model} holds a {model_card.kind}; pass segmenters with --segmenter")
    seg_cards = {}
    for url in segmenters:
        card = load_card(url)
        if card.kind != "segmenter":
            raise ArtifactError(f"{url} holds a {card.kind}, not a segmenter")
        seg_cards[url] = card
    source = arch if arch is not None else model_card if model_card is not None else next(iter(seg_cards.values()))
    class_ids = list(source.class_ids)
    names = list(source.class_names) if arch is not None else source.names
    for what, card in ([(model, model_card)] if model_card is not None else []) + list(seg_cards.items()):
        if arch is not None:
            check_same(card.names, what, names, f"archive {arch.source}")
    if newest is not None and newest.names is not None:
        check_same(newest.names, f"label store {store_url}", names,
                   f"archive {arch.source}" if arch is not None else model or next(iter(seg_cards), ""))
    ctx: dict = {"version": __version__, "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "names": names, "inputs": [], "fmt": _fmt, "pct": _pct, "notes": []}
    if arch is not None:
        ctx["inputs"].append(("archive", arch.source, f"{len(arch)} images, "
                              + ("true masks" if arch.has_masks else "image-level labels only")))
    if store_url:
        ctx["inputs"].append(("label store", store_url, f"{len(runs)} committed run(s); newest {newest.run_id} "
                              f"by {newest.model_kind} {newest.model_version or '?'}"))
    if model_card is not None:
        ctx["inputs"].append(("classifier", model, f"{model_card.architecture}, version {model_card.version}"))
    for url, card in seg_cards.items():
        ctx["inputs"].append(("segmenter", url, f"{card.head.architecture} with {card.architecture}, "
                              f"trained on {card.training.masks or '?'}, version {card.version}"))
    sections = []
    if model_card is not None:
        _log.info("report: classifier sections")
        ctx["classifier"] = _classifier_sections(model_card, model, arch, w, names)
        sections.append("ROC-AUC")
        if "table2" in ctx["classifier"]:
            sections.append("Table 2")
        else:
            ctx["notes"].append(f"no CAM Dice ablation: run `cam2seg evaluate --model {model} --truth ARCHIVE` first")
    store_dice, table = None, None
    if arch is not None and arch.has_masks and (store_url or seg_cards):
        _log.info("report: Table 3")
        rows, store_dice = _table3(arch, store_url, model_card, seg_cards, names)
        ctx["table3"] = _rows_table(rows, names)
        ctx["table3_png"] = w.png("dice-per-class", plots.dice_bars(
            {r["name"]: [p for _, p in r["classes"]] for r in ctx["table3"]}, names,
            "positive-pair Dice per class", "Dice (images with the defect)"))
        sections.append("Table 3")
        missing = [u for u, c in seg_cards.items() if "seg_oof" not in c.metrics]
        if missing:
            ctx["notes"].append("segmenters not yet evaluated (no out-of-fold rows): " + ", ".join(missing))
    elif arch is None or not arch.has_masks:
        ctx["notes"].append("no true masks given: Dice tables are left out; scores and pictures only")
    curves = _sweeps(model_card, seg_cards)
    if curves:
        objective = next(iter(curves.values())).get("objective", "kaggle")
        ylabel = "mean Dice (all pairs)" if objective == "kaggle" else "Dice (positive pairs)"
        ctx["sweep_png"] = w.png("threshold-sweep", plots.threshold_sweep(curves, names, ylabel))
        ctx["sweep_objective"] = objective
        sections.append("threshold sweep")
    if store_url:
        table = store.read_masks(store_url, columns=["image_id", "class_id", "score", "area"])
        t = table.to_pydict()
        ids = sorted(set(t["image_id"]))
        pos = {iid: i for i, iid in enumerate(ids)}
        scores = np.full((len(ids), len(class_ids)), np.nan, np.float32)
        for iid, c, s in zip(t["image_id"], t["class_id"], t["score"]):
            if c in class_ids:
                scores[pos[iid], class_ids.index(c)] = s
        labels = None
        if arch is not None and set(ids) <= set(arch.image_ids):
            labels = arch.labels[[arch.index(i) for i in ids]].astype(bool)
        ctx["scores_png"] = w.png("scores", plots.score_histograms(
            np.nan_to_num(scores), names, labels, f"class scores of {len(ids)} labelled images"))
        sections.append("score distributions")
        if examples:
            _log.info("report: gallery")
            cls = _load_predictor(model, dev) if model_card is not None else None
            segs = {url.rstrip("/").rsplit("/", 1)[-1]: _load_predictor(url, dev) for url in seg_cards}
            ctx["gallery"] = _gallery(arch, newest.images, store_url, table, cls, segs, store_dice, examples, w,
                                      dict(zip(class_ids, names)))
            sections.append("gallery")
    else:
        ctx["notes"].append("no label store given: no score distributions or gallery")
    env = Environment(loader=PackageLoader("cam2seg.review", "templates"), autoescape=select_autoescape(["html"]))
    return Report(env.get_template("report.html").render(**ctx), dict(w), sections)

