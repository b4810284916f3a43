"""True masks for some images of an archive: a masks file (README.md, "Corrections").

A masks file is a CSV in Severstal's layout, ``ImageId,ClassId,EncodedPixels``, that covers some
images of an archive (reviewers' corrections from :mod:`cam2seg.review.coco_import`, or the masks
of an old project):

* one row per non-empty (image, class) mask, Kaggle RLE at the image's own size;
* a row with an empty ``EncodedPixels`` says the class is absent from that image (a reviewed
  clean image gets one such row per class);
* an image is *covered* when any row names it, and then every class of it is known: the classes
  without a mask row are empty.

Unlike an archive's ``train.csv`` (:mod:`cam2seg.archive`), empty and non-empty rows mix, and the
file says nothing about images it does not name. An archive's own ``train.csv`` with masks is a
masks file that covers every image it lists.

:func:`read_true_masks` parses one against an archive (every ImageId must be an archive image);
:func:`masks_csv` writes the text. A ``ClassId`` is a name of the archive's ``class_names`` or a
1-based index into them (class id k is ``class_names[k - 1]``, as everywhere in files); the
files written here carry the indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import io, rle
from .archive import Archive, ArchiveError, _lines, _read_csv, mask_rows

__all__ = ["TrueMasks", "read_true_masks", "masks_csv", "covered_archive", "HEADER"]

HEADER = ("ImageId", "ClassId", "EncodedPixels")


@dataclass
class TrueMasks:
    """True masks of the images a masks file covers. ``image_ids``: the covered images, in
    archive order; ``rles``: (image id, 1-based class id) -> Kaggle RLE, non-empty masks only."""

    source: str
    image_ids: list[str]
    rles: dict[tuple[str, int], str] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    def rle_row(self, image_id: str, class_ids) -> list[str]:
        """The image's RLE per class in ``class_ids`` order ("" for an empty mask)."""
        return [self.rles.get((image_id, int(c)), "") for c in class_ids]

    def masks(self, image_id: str, class_ids, shape: tuple[int, int]) -> np.ndarray:
        """``bool[C, H, W]`` of one covered image at its own ``shape``."""
        out = np.zeros((len(class_ids), *shape), bool)
        for k, text in enumerate(self.rle_row(image_id, class_ids)):
            if text:
                out[k] = rle.decode(text, *shape)
        return out

    @property
    def positives(self) -> int:
        """Non-empty (image, class) masks."""
        return len(self.rles)


def read_true_masks(url: str, archive: Archive) -> TrueMasks:
    """Parse the masks file at ``url`` (any fsspec URL) for ``archive``; raises ArchiveError naming
    the file and lines for bad rows, duplicates, ImageIds that are not in the archive and class
    ids that are neither a class name of the archive nor an index into its classes. RLE syntax
    is checked here, its bounds when a mask is decoded."""
    url = io.absolute(str(url))
    rows = _read_csv(url)
    if not rows:
        raise ArchiveError(f"{url} is empty (expected the header {','.join(HEADER)})")
    header = [h.strip() for h in rows[0]]
    if any(c not in header for c in HEADER):
        raise ArchiveError(f"{url}: a masks file has the columns {','.join(HEADER)}; found {', '.join(header)}")
    rles: dict[tuple[str, int], str] = {}
    covered: set[str] = set()
    bad, dup, foreign = [], [], []

    def in_archive(line: int, image_id: str) -> bool:
        try:
            archive.index(image_id)
            return True
        except KeyError:
            foreign.append(f"line {line}: {image_id}")
            return False

    for _, image_id, class_id, text in mask_rows(url, header, rows[1:], archive.class_names, bad, dup, in_archive):
        if text:
            rles[(image_id, class_id)] = text
        covered.add(image_id)
    if foreign:
        raise ArchiveError(f"{url}: {len(foreign)} row(s) name images that are not in archive {archive.root}: "
                           + _lines(foreign))
    if bad:
        raise ArchiveError(f"{url}: {len(bad)} bad row(s): " + _lines(bad))
    if dup:
        raise ArchiveError(f"{url}: {len(dup)} duplicate (ImageId, ClassId) row(s): " + _lines(dup))
    return TrueMasks(url, [i for i in archive.image_ids if i in covered], rles)


def _csv_field(text: str) -> str:
    if any(ch in text for ch in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def masks_csv(masks: dict[str, dict[int, str]], class_ids) -> str:
    """The text of a masks file: ``masks`` maps each covered image id to {class id: Kaggle RLE}
    of its non-empty masks ({} for a reviewed clean image, which gets one empty row per class
    in ``class_ids``). Rows sorted by image id, then class id."""
    out = [",".join(HEADER)]
    for image_id in sorted(masks):
        per_class = {int(c): t for c, t in masks[image_id].items() if t}
        name = _csv_field(image_id)
        if not per_class:
            out.extend(f"{name},{int(c)}," for c in class_ids)
        out.extend(f"{name},{c},{per_class[c]}" for c in sorted(per_class))
    return "\n".join(out) + "\n"


def covered_archive(archive: Archive, true_masks: TrueMasks) -> Archive:
    """``archive`` cut to the images ``true_masks`` covers, with those masks as its true masks
    (and image-level labels from them: a reviewer's masks overrule the archive's labels), so
    whatever scores an archive against its masks (``cam2seg evaluate``) uses the covered
    images only."""
    ids = list(true_masks.image_ids)
    c = archive.num_classes
    labels = np.zeros((len(ids), c), np.uint8)
    index = {iid: i for i, iid in enumerate(ids)}
    for image_id, class_id in true_masks.rles:
        labels[index[image_id], class_id - 1] = 1
    return Archive(root=archive.root, source=true_masks.source, image_ids=ids, labels=labels, has_masks=True,
                   num_classes=c, class_names=list(archive.class_names), images_dir=archive.images_dir,
                   _rles={k: (v, 0) for k, v in true_masks.rles.items()}, _index=index)
