"""The paper's multi-label classifier: a timm encoder chosen by name and the paper's head.

Head: Dropout -> Linear -> ELU -> Dropout -> Linear, one logit per class (sigmoid at
inference). timm's split is kept: ``forward_features`` returns the last activation before
pooling (for EfficientNet the SiLU after ``conv_head``) and ``forward_head`` maps it to
logits, so the CAM engine can take gradients through the head alone.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from .. import io

POOLS = ("avg", "max", "avgmax")

__all__ = ["POOLS", "PaperHead", "Classifier", "create_classifier", "load_encoder_weights", "load_fold_models"]


class PaperHead(nn.Module):
    """``float[B, F]`` pooled features -> ``float[B, C]`` logits."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ELU(),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Classifier(nn.Module):
    """timm encoder + :class:`PaperHead`. Input ``float[B, in_chans, H, W]`` normalised (1: grey,
    3: RGB); output logits ``float[B, C]``."""

    def __init__(self, encoder: str = "efficientnet_b0", num_classes: int = 4, hidden: int = 256,
                 dropout: float = 0.3, pretrained: bool = False, output_stride: int = 32, pool: str = "avg",
                 in_chans: int = 3):
        super().__init__()
        # num_classes=0: timm keeps its global pooling and drops its own classifier.
        # output_stride < 32 dilates the last stages instead of striding them: same weights,
        # a finer feature map (so finer CAMs) for more compute.
        extra = {} if output_stride == 32 else {"output_stride": output_stride}
        try:
            # pool: timm's global pooling by name. "max"/"avgmax" let a small defect drive its
            # logit instead of being averaged away over a mostly clean strip.
            # in_chans: timm builds the stem for it (and sums a pretrained 3-channel stem into 1 channel)
            self.encoder = timm.create_model(encoder, pretrained=pretrained, num_classes=0, global_pool=pool,
                                             in_chans=in_chans, **extra)
        except TypeError as e:
            if not extra:
                raise
            raise ValueError(f"timm model {encoder!r} does not support output_stride={output_stride} "
                             "(EfficientNet, MobileNetV2 and ResNet families do; MobileNetV3 does not)") from e
        self.output_stride = output_stride
        # Some encoders (MobileNetV3) add a conv after pooling: the head sees head_hidden_size.
        pooled = getattr(self.encoder, "head_hidden_size", None) or self.encoder.num_features
        self.head = PaperHead(pooled, hidden, num_classes, dropout)
        self.num_classes = num_classes
        self.in_chans = in_chans

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``float[B, in_chans, H, W]`` -> ``float[B, F, h, w]`` (the last activation before pooling)."""
        return self.encoder.forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, indices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``float[B, in_chans, H, W]`` -> (``forward_features(x)``, the outputs of the encoder stages
        ``indices`` (timm ``feature_info`` order, ``float[B, F_i, h_i, w_i]``)), in one pass."""
        return self.encoder.forward_intermediates(x, indices=indices)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``float[B, F, h, w]`` -> ``float[B, C]`` logits (or pooled ``float[B, F]``)."""
        pooled = self.encoder.forward_head(features, pre_logits=True)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def load_encoder_weights(encoder: nn.Module, url: str) -> int:
    """Load a safetensors file (local or s3) into a timm or smp encoder; returns tensors loaded.

    Keys the encoder lacks (a classifier, say) are ignored. A stem convolution whose input
    channels differ (3-channel ImageNet weights into a 1-channel grey encoder, or the reverse)
    is adapted: timm's ``adapt_input_conv`` (3 summed into 1, as timm does when it loads its own
    pretrained weights), or one channel spread evenly over three. A file that fits less than
    half of the encoder is refused, since it is almost certainly another architecture.
    """
    from safetensors.torch import load as st_load
    from timm.models import adapt_input_conv

    state = st_load(io.read_bytes(url))
    own = encoder.state_dict()
    fitting = {}
    for k, v in state.items():
        if k not in own:
            continue
        mine = own[k]
        if mine.shape == v.shape:
            fitting[k] = v
        elif v.ndim == 4 and mine.ndim == 4 and mine.shape[0] == v.shape[0] and mine.shape[2:] == v.shape[2:]:
            if v.shape[1] == 1:  # timm adapts from 3 channels only: spread one over all, same response to grey
                fitting[k] = v.repeat(1, mine.shape[1], 1, 1) / mine.shape[1]
            else:
                fitting[k] = adapt_input_conv(mine.shape[1], v)
    if len(fitting) < len(own) / 2:
        raise ValueError(
            f"pretrained weights {url} fit {len(fitting)} of the encoder's {len(own)} tensors: "
            "wrong architecture?"
        )
    encoder.load_state_dict(fitting, strict=False)
    return len(fitting)


def create_classifier(encoder: str = "efficientnet_b0", num_classes: int = 4, hidden: int = 256,
                      dropout: float = 0.3, pretrained: bool | str = False, output_stride: int = 32,
                      pool: str = "avg", in_chans: int = 3) -> Classifier:
    """Build a classifier; ``pretrained``: False, True (timm hub download) or a safetensors URL;
    ``in_chans``: 1 (grey) or 3 (RGB) input channels."""
    if encoder not in timm.list_models() and not timm.is_model(encoder):
        raise ValueError(f"unknown timm model {encoder!r}")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if num_classes < 1:
        raise ValueError(f"a classifier needs at least one class, got {num_classes}")
    model = Classifier(encoder, num_classes, hidden, dropout, pretrained=pretrained is True, output_stride=output_stride,
                       pool=pool, in_chans=in_chans)
    if isinstance(pretrained, str):
        load_encoder_weights(model.encoder, pretrained)
    return model


def load_fold_models(url: str, device="cpu", weights: str = "swa") -> tuple["ModelCard", list[Classifier]]:
    """The card and the K fold classifiers of an artifact, in eval mode on ``device``.

    ``weights``: "swa" (the fold weights) or "best-epoch" (each fold's single best epoch,
    kept for ablations).
    """
    from ..artifact import build_fold_models, load_artifact, load_extra_states

    card, states = load_artifact(url, kind="classifier")
    if weights == "best-epoch":
        states = load_extra_states(url, card, [f"fold-{k}.best-epoch.safetensors" for k in range(card.folds)])
    elif weights != "swa":
        raise ValueError(f"weights must be swa or best-epoch, got {weights!r}")
    models = build_fold_models(url, card, states, lambda: Classifier(
        card.architecture, card.num_classes, card.head.hidden, card.head.dropout,
        output_stride=card.head.output_stride, pool=card.head.pool, in_chans=card.in_chans), device)
    return card, models
