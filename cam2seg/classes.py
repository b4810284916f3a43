"""Class lists: names in class id order, and the refusal when two parts of a run disagree.

Class ids are 1-based everywhere in files and the label store (id k is ``names[k - 1]``); a
list of names is what archives, model cards, store run markers and segmenter cards record, so
that a model is never applied to, or trained from, data of other classes.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ClassMismatch", "default_names", "check_same"]


class ClassMismatch(ValueError):
    """Two class lists that must agree do not; the message names both."""


def default_names(class_ids: Sequence[int]) -> list[str]:
    """The names of classes known by id only (Severstal's layouts, older cards and markers)."""
    return [f"class {int(c)}" for c in class_ids]


def check_same(names: Sequence[str], what: str, expected: Sequence[str], against: str) -> None:
    """Raise :class:`ClassMismatch` unless ``names`` (of ``what``) equal ``expected`` (of
    ``against``), in order."""
    if list(names) != list(expected):
        raise ClassMismatch(f"{what} has classes {list(names)}, {against} has {list(expected)}; the class lists "
                            "must be the same, in the same order")
