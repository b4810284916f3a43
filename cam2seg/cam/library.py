"""pytorch-grad-cam as a CAM engine: the numerical reference for the fast engine, and every
method the library offers (XGradCAM, EigenCAM, LayerCAM, ScoreCAM, ...) for users who want one.

The library computes one class per call (one target per image) on the CPU in numpy, with a
backward through the whole network; this wrapper loops over classes and returns the same
shapes as :func:`cam2seg.cam.compute_cams`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LIBRARY_METHODS", "find_feature_layer", "library_cams"]


def _methods():
    import pytorch_grad_cam as g

    return {
        "gradcam": g.GradCAM, "gradcam++": g.GradCAMPlusPlus, "xgradcam": g.XGradCAM, "eigencam": g.EigenCAM,
        "eigengradcam": g.EigenGradCAM, "layercam": g.LayerCAM, "scorecam": g.ScoreCAM, "hirescam": g.HiResCAM,
        "ablationcam": g.AblationCAM, "gradcamelementwise": g.GradCAMElementWise,
    }


LIBRARY_METHODS = ("gradcam", "gradcam++", "xgradcam", "eigencam", "eigengradcam", "layercam", "scorecam",
                   "hirescam", "ablationcam", "gradcamelementwise")


def find_feature_layer(model, example: torch.Tensor) -> torch.nn.Module:
    """The module whose output *is* ``model.forward_features(example)``: the library's target
    layer that matches the fast engine (for EfficientNet, ``bn2`` with its SiLU)."""
    calls = []
    hooks = [m.register_forward_hook(lambda mod, i, o: calls.append((mod, o))) for m in model.modules()]
    try:
        with torch.no_grad():
            out = model.forward_features(example)
    finally:
        for h in hooks:
            h.remove()
    # Nested modules can return the same tensor; the outermost finishes last.
    for mod, o in reversed(calls):
        if o is out:
            return mod
    raise ValueError("no single module produces forward_features' output; pass target_layers explicitly")


def library_cams(model, images: torch.Tensor, method: str = "gradcam++", aug_smooth: bool = True,
                 out_size: tuple[int, int] | None = None, target_layers=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`cam2seg.cam.compute_cams`, computed by pytorch-grad-cam."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    methods = _methods()
    if method not in methods:
        raise ValueError(f"unknown library CAM method {method!r}; choose from {', '.join(LIBRARY_METHODS)}")
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    total, probs = None, None
    for m in models:
        layers = target_layers or [find_feature_layer(m, images[:1])]
        with torch.no_grad():
            logits = m(images)
        b, c = logits.shape
        with methods[method](model=m, target_layers=layers) as cam:
            per_class = [cam(input_tensor=images, targets=[ClassifierOutputTarget(k)] * b, aug_smooth=aug_smooth)
                         for k in range(c)]
        maps = torch.from_numpy(np.stack(per_class, axis=1).astype(np.float32))
        total = maps if total is None else total + maps
        p = torch.sigmoid(logits.float()).cpu()
        probs = p if probs is None else probs + p
    cams, probs = total / len(models), probs / len(models)
    if out_size is not None and tuple(out_size) != tuple(cams.shape[-2:]):
        cams = F.interpolate(cams, size=tuple(out_size), mode="bilinear", align_corners=False)
    return cams.clamp_(0, 1), probs
