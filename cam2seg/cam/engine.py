"""The fast CAM engine: all classes, all augmentations, one forward pass, head-only gradients.

For a timm classifier ``A = model.forward_features(x)`` is the last activation before pooling
and ``logits = model.forward_head(A)``. GradCAM, GradCAM++ and LayerCAM need only d logit_c / dA, which
flows through the head alone, so the encoder runs once without autograd and the gradients of
every class come from one batched backward through the head (``is_grads_batched``). The
maps then follow pytorch-grad-cam step by step, so the two agree numerically:

1. weights from (A, dA) per method; cam = ReLU(sum_F weights * A)  (feature resolution)
2. per-map min-max scaling (x - min) / (1e-7 + max), bilinear resize to the input size
3. ReLU and min-max again (the library's aggregation over target layers). With
   ``fuse_strides`` the maps of earlier encoder stages join the final one here: one forward
   with autograd, one batched backward from the logits to every stage, the mean of the
   per-stage maps of step 2, then ReLU and min-max, as the library does for several layers
4. aug smoothing: the mean over {identity, horizontal flip} x {x0.9, x1.0, x1.1} of the
   de-augmented maps (the factors multiply the normalised input, as ttach does); the six
   variants go through the encoder one after another by default (memory of one batch) or
   together in one 6x batch (``variants_per_pass=None``)

Finally the maps are resized to ``out_size`` (the original image's size) for the masks.
Shapes: images ``float32[B, in_chans, h, w]`` normalised (1 grey or 3 RGB channels); cams
``float32[B, C, H, W]`` in [0, 1]; probs ``float32[B, C]`` (sigmoid of the un-augmented logits).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .gradcam import gradcam_weights
from .gradcam_plusplus import gradcam_plusplus_weights
from .layercam import layercam_weights
from .guided import GUIDED_METHODS, guided_backprop, guided_model, guided_saliency

__all__ = ["METHODS", "GUIDED_METHODS", "CAM_METHODS", "DEFAULT_METHOD", "AUG_VARIANTS", "compute_cams", "feature_maps_to_cams",
           "head_gradients", "stage_gradients", "stage_indices"]

# Weights per channel ``[..., F]`` or per location ``[..., F, h, w]`` (LayerCAM).
METHODS = {"gradcam": gradcam_weights, "gradcam++": gradcam_plusplus_weights, "layercam": layercam_weights}
# Every name the fast engine takes: the one list that config, CLI and predictors read.
CAM_METHODS: tuple[str, ...] = (*METHODS, *GUIDED_METHODS)
DEFAULT_METHOD = "gradcam++"  # the paper's
# (horizontal flip, intensity factor): pytorch-grad-cam's default aug smoothing.
AUG_VARIANTS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))
_SCALE_EPS = 1e-7
_log = logging.getLogger(__name__)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    x = x - x.amin(dim=(-2, -1), keepdim=True)
    return x / (_SCALE_EPS + x.amax(dim=(-2, -1), keepdim=True))


def head_gradients(model, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits ``[N, C]``, d logit_c / d features ``[C, N, F, h, w]``) through the head only."""
    features = features.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.forward_head(features)
        n, c = logits.shape
        # One backward per class, vectorised: grad_outputs[k] selects logit k of every image.
        eye = torch.eye(c, device=logits.device, dtype=logits.dtype).unsqueeze(1).expand(c, n, c)
        (grads,) = torch.autograd.grad(logits, features, grad_outputs=eye, is_grads_batched=True)
    return logits.detach(), grads


def _layer_maps(features: torch.Tensor, grads: torch.Tensor, weigh, size: tuple[int, int]) -> torch.Tensor:
    """One layer: ``features [N, F, h, w]``, ``grads [C, N, F, h, w]`` -> min-max scaled ``[C, N, H, W]``."""
    acts = features.detach().unsqueeze(0)
    weights = weigh(acts, grads)
    if weights.dim() < acts.dim():  # one weight per channel
        weights = weights[..., None, None]
    cam = torch.relu((weights * acts).sum(dim=2))
    c, n, h, w = cam.shape
    cam = F.interpolate(_minmax(cam).reshape(c * n, 1, h, w), size=size, mode="bilinear", align_corners=False)
    return cam.reshape(c, n, *size)


def feature_maps_to_cams(features, grads, method: str, size: tuple[int, int]) -> torch.Tensor:
    """Steps 1-3 for one layer (``features [N, F, h, w]``, ``grads [C, N, F, h, w]``) or
    several (lists of both, fused as the library fuses target layers: the mean of the
    per-layer scaled maps, then ReLU and min-max) -> ``[C, N, H, W]``."""
    try:
        weigh = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown fast CAM method {method!r}; fast methods: {', '.join(METHODS)}") from None
    if isinstance(features, torch.Tensor):
        features, grads = [features], [grads]
    layers = [_layer_maps(a, g, weigh, size) for a, g in zip(features, grads)]
    fused = layers[0] if len(layers) == 1 else torch.stack(layers).relu_().mean(dim=0)
    return _minmax(torch.relu(fused))


def stage_indices(model, strides: Sequence[int]) -> list[int]:
    """timm ``feature_info`` indices of the stages that end at each of ``strides`` (the last
    stage at that stride, as ``forward_intermediates`` numbers them)."""
    info = getattr(getattr(model, "encoder", model), "feature_info", None)
    if info is None:
        raise ValueError(f"{type(model).__name__} has no timm feature_info: fused stages need a timm encoder")
    reductions = [f["reduction"] for f in info]
    out = []
    for s in strides:
        found = [i for i, r in enumerate(reductions) if r == s]
        if not found:
            raise ValueError(f"no encoder stage at stride {s}; stages end at strides {sorted(set(reductions))}")
        out.append(found[-1])
    return out


def stage_gradients(model, x: torch.Tensor, indices: Sequence[int], batched: bool = True):
    """One forward with autograd, and the gradient of every class logit at every stage.

    Returns (logits ``[N, C]``, [stage activations ``[N, F_i, h_i, w_i]`` ..., then the final
    features], [their gradients ``[C, N, F_i, h_i, w_i]``, same order]). Unlike
    :func:`head_gradients` this backpropagates through the encoder's later stages, once for
    all classes where autograd can batch it (``is_grads_batched``), else (or with
    ``batched=False``) once per class.
    """
    with torch.enable_grad():
        # The input requires grad so the stages are in the graph even with frozen weights;
        # autograd.grad only computes what reaches the stages, never the input gradient.
        x = x.detach().requires_grad_(True)
        final, inter = model.forward_intermediates(x, indices=list(indices))
        outs = [*inter, final]
        logits = model.forward_head(final)
        n, c = logits.shape
        eye = torch.eye(c, device=logits.device, dtype=logits.dtype).unsqueeze(1).expand(c, n, c)
        grads = None
        if batched:
            try:
                grads = torch.autograd.grad(logits, outs, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
            except RuntimeError as e:  # an op without a batching rule
                _log.debug(f"batched stage gradients failed ({e}); one backward per class")
        if grads is None:
            per_class = [torch.autograd.grad(logits, outs, grad_outputs=eye[k], retain_graph=True) for k in range(c)]
            grads = [torch.stack(g) for g in zip(*per_class)]
    return logits.detach(), [o.detach() for o in outs], list(grads)


@torch.no_grad()
def _one_model(model, x: torch.Tensor, method: str, variants: Sequence[tuple[bool, float]],
               variants_per_pass: int | None = None, stages: Sequence[int] = ()):
    b = x.shape[0]
    per_pass = len(variants) if variants_per_pass is None else max(1, variants_per_pass)
    total, probs = None, None
    for s in range(0, len(variants), per_pass):
        chunk = variants[s : s + per_pass]
        xs = torch.cat([(x.flip(-1) if flip else x) * f for flip, f in chunk])
        if stages:
            logits, features, grads = stage_gradients(model, xs, stages)
        else:
            features = model.forward_features(xs)
            logits, grads = head_gradients(model, features)
        cams = feature_maps_to_cams(features, grads, method, tuple(x.shape[-2:]))  # [C, v*B, H, W]
        del features, grads
        cams = cams.reshape(cams.shape[0], len(chunk), b, *cams.shape[-2:])
        for v, (flip, factor) in enumerate(chunk):
            m = cams[:, v].flip(-1) if flip else cams[:, v]
            total = m if total is None else total + m
            if (flip, factor) == (False, 1.0):
                probs = torch.sigmoid(logits.reshape(len(chunk), b, -1)[v].float())
    return (total / len(variants)).transpose(0, 1), probs


def _guided_one_model(model, x: torch.Tensor, method: str, variants, variants_per_pass=None, stages=()):
    cams, probs = _one_model(model, x, GUIDED_METHODS[method], variants, variants_per_pass, stages)
    saliency = guided_saliency(guided_backprop(guided_model(model), x))
    return _minmax(cams * saliency), probs


def compute_cams(model, images: torch.Tensor, method: str = DEFAULT_METHOD, aug_smooth: bool = True,
                 out_size: tuple[int, int] | None = None,
                 variants_per_pass: int | None = 1,
                 fuse_strides: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """CAMs of every class for a batch, on the model's device.

    ``model``: a classifier with ``forward_features``/``forward_head`` (any timm model or
    :class:`cam2seg.models.classifier.Classifier`), or a list of them (fold ensemble: maps and
    probabilities averaged). Models must be in eval mode. ``method``: "gradcam", "gradcam++",
    or "guided-gradcam"/"guided-gradcam++" (the CAM times guided backpropagation, see
    :mod:`cam2seg.cam.guided`; a full backward per class, so several times slower).
    ``variants_per_pass``: aug variants the encoder sees in one batch (None: all six at once,
    6x the batch; 1, the default: one after another, so aug smoothing needs the memory of
    one batch; the maps are the same up to float rounding). ``fuse_strides``: encoder stages
    (by output stride, e.g. ``(8, 16)``) whose maps are fused with the final features' map,
    as pytorch-grad-cam fuses several target layers: finer maps, for a backward through the
    encoder's later stages (empty, the default: the final features alone, head-only gradients).
    Returns (cams ``float32[B, C, H, W]`` in [0, 1] at ``out_size`` or the input size,
    probs ``float32[B, C]``).
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if images.ndim != 4:
        raise ValueError(f"images must be [B, channels, h, w], got {tuple(images.shape)}")
    variants = AUG_VARIANTS if aug_smooth else ((False, 1.0),)
    if method not in CAM_METHODS:
        raise ValueError(f"unknown fast CAM method {method!r}; fast methods: {', '.join(CAM_METHODS)}")
    one = _guided_one_model if method in GUIDED_METHODS else _one_model
    cams, probs = None, None
    for m in models:
        c, p = one(m, images, method, variants, variants_per_pass, stage_indices(m, fuse_strides) if fuse_strides else ())
        cams = c if cams is None else cams + c
        probs = p if probs is None else probs + p
    cams, probs = cams / len(models), probs / len(models)
    if out_size is not None and tuple(out_size) != tuple(cams.shape[-2:]):
        cams = F.interpolate(cams, size=tuple(out_size), mode="bilinear", align_corners=False)
    return cams.clamp_(0, 1), probs
