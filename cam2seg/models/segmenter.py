"""Stage 3's model: a segmentation-models-pytorch network (U-Net by default) with one sigmoid
channel per class, reading grey (1) or RGB (3) inputs (its loss is :mod:`cam2seg.models.losses`).

smp networks need both input sides divisible by 32; :class:`Segmenter` pads the input by
reflection and crops the logits back, so any image size works and masks keep the size the
image had. Weights start random unless a local or s3 safetensors file of encoder weights is
given (nothing is downloaded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Segmenter", "create_segmenter", "load_segmenters", "predict_maps"]


class Segmenter(nn.Module):
    """``float[B, in_channels, H, W]`` normalised -> logits ``float[B, C, H, W]`` (any H, W)."""

    def __init__(self, architecture: str = "Unet", encoder: str = "efficientnet-b0", num_classes: int = 4,
                 decoder_channels: tuple[int, ...] | None = None, in_channels: int = 3):
        super().__init__()
        import segmentation_models_pytorch as smp

        # decoder_channels: None keeps smp's default; narrower U-Net decoders (e.g. 64..8) train
        # about 3x faster on a CPU, where the full-resolution decoder stages dominate.
        extra = {} if decoder_channels is None else {"decoder_channels": tuple(decoder_channels)}
        try:
            self.net = smp.create_model(architecture, encoder_name=encoder, encoder_weights=None, in_channels=in_channels,
                                        classes=num_classes, **extra)
        except TypeError as e:
            raise ValueError(f"{architecture} does not take decoder_channels={decoder_channels}: {e}") from None
        except KeyError as e:
            raise ValueError(f"segmentation-models-pytorch has no {e.args[0]!r} (architecture {architecture!r}, "
                             f"encoder {encoder!r})") from None
        self.num_classes = num_classes
        self.divisor = int(getattr(self.net.encoder, "output_stride", 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.divisor, (-w) % self.divisor
        if ph or pw:
            # reflection keeps the padded border looking like steel rather than a black edge
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        return self.net(x)[..., :h, :w]


def create_segmenter(architecture: str = "Unet", encoder: str = "efficientnet-b0", num_classes: int = 4,
                     encoder_weights: str | None = None, decoder_channels: tuple[int, ...] | None = None,
                     in_channels: int = 3) -> Segmenter:
    """Build a segmenter; ``encoder_weights``: None or a safetensors URL for the encoder (a
    3-channel stem is adapted to a 1-channel encoder); ``in_channels``: 1 (grey) or 3 (RGB)."""
    from .classifier import load_encoder_weights

    model = Segmenter(architecture, encoder, num_classes, decoder_channels, in_channels)
    if encoder_weights:
        load_encoder_weights(model.net.encoder, encoder_weights)
    return model


def load_segmenters(url: str, device="cpu") -> tuple["ModelCard", list[Segmenter]]:  # noqa: F821
    """The card and the K fold segmenters of an artifact, in eval mode on ``device``."""
    from ..artifact import build_fold_models, load_artifact

    card, states = load_artifact(url, kind="segmenter")
    models = build_fold_models(url, card, states, lambda: Segmenter(card.head.architecture,
                                                                    card.architecture, card.num_classes,
                                                                    card.head.decoder_channels, card.in_chans),
                                device)
    return card, models


@torch.no_grad()
def predict_maps(models, x: torch.Tensor, out_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sigmoid of one model or a fold ensemble over ``x float[B, in_channels, h, w]``.

    Returns (maps ``float[B, C, H, W]`` in [0, 1] at ``out_size`` (default h, w), scores
    ``float[B, C]`` = each map's maximum at the model's size, used as the class score).
    """
    models = models if isinstance(models, (list, tuple)) else [models]
    probs = torch.stack([torch.sigmoid(m(x).float()) for m in models]).mean(0)
    scores = probs.amax(dim=(-2, -1))
    if out_size is not None and tuple(probs.shape[-2:]) != tuple(out_size):
        probs = F.interpolate(probs, size=tuple(out_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return probs, scores
