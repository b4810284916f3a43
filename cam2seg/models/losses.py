"""The segmenter's loss: BCE + soft Dice over targets that may leave pixels out (:data:`IGNORE`).

A pure function with smp's losses doing the work, as smp's own ``losses/`` do.
"""

from __future__ import annotations

import torch

from ..train.targets import IGNORE  # where targets are made; defined there so decoding needs no torch

__all__ = ["IGNORE", "segmentation_loss"]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 1.0,
                      dice_weight: float = 1.0) -> torch.Tensor:
    """BCE + soft Dice of ``logits float[B, C, H, W]`` against ``target`` of the same shape
    with values 0, 1 or :data:`IGNORE` (those pixels count in neither term).

    smp's losses do the work: Dice per class over the batch (classes with no positive pixel in
    the batch add nothing to it), BCE averaged over all pixels with ignored ones zeroed.
    """
    from segmentation_models_pytorch.losses import DiceLoss, SoftBCEWithLogitsLoss

    target = target.to(logits.dtype)
    loss = logits.new_zeros(())
    if bce_weight:
        loss = loss + bce_weight * SoftBCEWithLogitsLoss(ignore_index=IGNORE)(logits, target)
    if dice_weight:
        loss = loss + dice_weight * DiceLoss("multilabel", from_logits=True, ignore_index=IGNORE)(logits, target)
    return loss
