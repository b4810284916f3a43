"""Refinement of maps on the image (cam2seg.refine): range and shape kept, a coarse blob pulled
onto the drawn shape under it, every image refined on its own pixels only."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cam2seg import metrics
from cam2seg.refine import NO_REFINE, REFINERS, Refine, refine_maps
from cam2seg.refine.contrast import background, contrast
from cam2seg.refine.par import par


def _scene(seed: int = 0, h: int = 64, w: int = 200):
    """A textured grey strip with a dark thin scratch and a bright blob drawn on it; the "CAM" is
    each shape's box, coarsened to a 2x7 grid and upsampled (what a stride-32 map looks like)."""
    g = torch.Generator().manual_seed(seed)
    image = 0.5 + 0.03 * torch.randn(1, 1, h, w, generator=g)
    shapes = torch.zeros(1, 2, h, w, dtype=torch.bool)
    shapes[0, 0, 8:56, 40:42] = True  # a 2 px vertical scratch
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    shapes[0, 1] = (yy - 30) ** 2 + (xx - 140) ** 2 <= 8 ** 2
    image[0, 0][shapes[0, 0]] -= 0.3
    image[0, 0][shapes[0, 1]] += 0.3
    boxes = torch.zeros(1, 2, h, w)
    boxes[0, 0, 0:64, 20:62] = 1
    boxes[0, 1, 10:50, 115:165] = 1
    coarse = F.adaptive_avg_pool2d(boxes, (2, 7))
    cam = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    cam = cam / cam.amax(dim=(-2, -1), keepdim=True)
    return image.clamp(0, 1), shapes, cam


def _best_dice(maps: torch.Tensor, shapes: torch.Tensor) -> np.ndarray:
    """Per class, the best Dice with the shape over thresholds 0.05..0.95."""
    best = np.zeros(maps.shape[1])
    for t in np.arange(0.05, 1.0, 0.05):
        d = metrics.dice((maps >= t).numpy()[0], shapes.numpy()[0])
        best = np.maximum(best, d)
    return best


def test_par_keeps_shape_and_range_and_validates():
    image, _, cam = _scene()
    out = par(cam, image)
    assert out.shape == cam.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(par(cam, image, iterations=0), cam.float())
    with pytest.raises(ValueError, match="image \\[B, 1 or 3, H, W\\]"):
        par(cam, image.expand(-1, 2, -1, -1))
    # an RGB image whose channels are equal refines as its grey one (both steps)
    assert torch.allclose(par(cam, image.expand(-1, 3, -1, -1)), out, atol=1e-5)
    from cam2seg.refine.contrast import contrast
    assert torch.allclose(contrast(cam, image.expand(-1, 3, -1, -1)), contrast(cam, image), atol=1e-6)
    with pytest.raises(ValueError, match="differ in batch or size"):
        par(cam, image[..., :100])
    with pytest.raises(ValueError, match="dilations"):
        par(cam, image, dilations=[0])


@pytest.mark.parametrize("steps", [["par"], ["contrast"], ["contrast", "par"]])
def test_refinement_pulls_a_coarse_blob_onto_the_shape_under_it(steps):
    image, shapes, cam = _scene()
    before = _best_dice(cam, shapes)
    refined = refine_maps(cam, image, Refine(steps=steps))
    assert refined.shape == cam.shape and refined.min() >= 0 and refined.max() <= 1
    after = _best_dice(refined, shapes)
    print(steps, "best Dice before", before.round(3), "after", after.round(3))
    assert (after > before + 0.1).all(), (before, after)


def test_contrast_background_is_the_median_and_validates():
    image, shapes, cam = _scene()
    bg = background(image, 0.8)
    assert bg.shape == image.shape
    # the strip's level, not the shapes': they cover a small part of every window
    assert (bg - 0.5).abs().max() < 0.05
    out = contrast(cam, image)
    assert out[shapes].mean() > 10 * out[~shapes].mean()
    with pytest.raises(ValueError, match="z_low < z_high"):
        contrast(cam, image, z_low=3, z_high=2)
    with pytest.raises(ValueError, match="differ in batch or size"):
        contrast(cam, image[..., :100])


def test_each_image_is_refined_on_its_own_pixels():
    scenes = [_scene(seed) for seed in range(3)]
    image = torch.cat([s[0] for s in scenes]) * torch.tensor([1.0, 0.8, 0.6])[:, None, None, None]
    cam = torch.cat([s[2] for s in scenes]) * torch.tensor([1.0, 0.7, 0.4])[:, None, None, None]
    refine = Refine()
    together = refine_maps(cam, image, refine)
    alone = torch.cat([refine_maps(cam[i : i + 1], image[i : i + 1], refine) for i in range(3)])
    reversed_ = refine_maps(cam.flip(0), image.flip(0), refine).flip(0)
    assert torch.allclose(together, alone, atol=1e-6) and torch.allclose(together, reversed_, atol=1e-6)


def test_registry_and_settings():
    assert set(REFINERS) == {"contrast", "par"} and Refine().steps == ["contrast", "par"]
    image, _, cam = _scene()
    assert refine_maps(cam, image, None) is cam and refine_maps(cam, image, NO_REFINE) is cam
    assert torch.equal(refine_maps(cam, image, Refine(steps=["par"])), par(cam, image))
    with pytest.raises(ValueError, match="dilations"):
        Refine(par={"dilations": []})
    with pytest.raises(ValueError):
        Refine(steps=["crf"])
    with pytest.raises(ValueError):
        Refine(contrast={"sigma": 2})  # unknown keys are refused


def test_a_shared_cache_changes_no_result():
    """evaluate refines one batch several ways with one cache: each result equals its own
    uncached run, and a second setting of a step does not reuse the first's image terms."""
    g = torch.Generator().manual_seed(5)
    images, maps = torch.rand(3, 1, 32, 96, generator=g), torch.rand(3, 2, 32, 96, generator=g)
    settings = [Refine(steps=["par"]), Refine(steps=["contrast"]), Refine(),
                Refine(par={"dilations": [1, 2]}), Refine(contrast={"window": 0.5})]
    cache = {}
    for r in settings:
        assert torch.equal(refine_maps(maps, images, r, cache), refine_maps(maps, images, r))
    assert len(cache) == 4  # two PAR settings, two contrast settings
