"""Table rows with stable ids: ids are what code and model cards key on, labels are for people.

A row id is ``<source>/<setting>`` (e.g. ``gradcam++_swa_aug/tuned-per-class``); the two
baselines are ``baseline/all-empty`` and ``baseline/whole-image``. Cards store each row as
``{"label", "kaggle_mean", "positive_mean", "kaggle_all_mean", "absent_masked", "kaggle", "positive"}``
under its id (cards written before the all-images figures lack those two: NaN).
"""

from __future__ import annotations

import numpy as np

from .. import metrics

__all__ = ["BASELINES", "Table", "scored_rows", "card_rows", "card_row_scores"]

# metrics' baseline names -> stable ids
BASELINES = {"baseline: all-empty": "baseline/all-empty", "baseline: whole image if accepted": "baseline/whole-image"}


class Table(dict):
    """Row id -> :class:`~cam2seg.metrics.DiceScores`, with ``labels`` (id -> display label)."""

    def __init__(self, rows=(), labels=None):
        super().__init__(rows)
        self.labels: dict[str, str] = dict(labels or {})

    def label(self, row_id: str) -> str:
        return self.labels.get(row_id, row_id)

    def format(self, class_names, title: str) -> str:
        return metrics.format_dice_table({self.label(k): v for k, v in self.items()}, class_names, title=title)


def scored_rows(pair: dict[str, np.ndarray], labels: dict[str, str], true_area: np.ndarray, image_area,
                accepted: np.ndarray | None = None) -> Table:
    """Score pair Dice ``float[N, C]`` per row id and append the two baselines (ids in :data:`BASELINES`)."""
    out = Table(labels=labels)
    for name, s in metrics.dice_with_baselines(pair, true_area, image_area, accepted).items():
        rid = BASELINES.get(name, name)
        out[rid] = s
        out.labels.setdefault(rid, name)
    return out


def card_rows(table: Table, ids=None) -> dict[str, dict]:
    """The rows (all, or ``ids``) as a card stores them."""
    return {k: {"label": table.label(k), "kaggle_mean": s.kaggle_mean, "positive_mean": s.positive_mean,
                "kaggle_all_mean": s.kaggle_all_mean, "absent_masked": s.absent_masked,
                "kaggle": s.kaggle.tolist(), "positive": s.positive.tolist()}
            for k, s in table.items() if ids is None or k in ids}


def card_row_scores(row: dict) -> metrics.DiceScores:
    """A card's stored row back as :class:`~cam2seg.metrics.DiceScores` (counts are not stored)."""
    nan = float("nan")
    return metrics.DiceScores(np.asarray(row["kaggle"]), np.asarray(row["positive"]), row["kaggle_mean"],
                              row["positive_mean"], 0, np.zeros(len(row["kaggle"]), int),
                              _number(row.get("kaggle_all_mean"), nan), _number(row.get("absent_masked"), nan))


def _number(v, default: float) -> float:
    return default if v is None else float(v)
