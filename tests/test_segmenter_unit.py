"""Stage 3's plain parts: the padded smp model, the loss with ignored pixels, pseudo-mask targets."""

import numpy as np
import pytest
import torch

from cam2seg import rle
from cam2seg.config import SegmenterConfig
from cam2seg.train.targets import edge_band, refine_targets
from cam2seg.models.losses import IGNORE, segmentation_loss  # IGNORE is re-exported from train.targets
from cam2seg.models.segmenter import create_segmenter, predict_maps
from cam2seg.train.targets import build_targets

ENC = "tu-mobilenetv3_small_100"


@pytest.mark.parametrize("size", [(64, 400), (32, 128), (50, 70)])
def test_any_input_size_gives_logits_of_that_size(size):
    model = create_segmenter("Unet", ENC, 4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 4, *size)


def test_unknown_encoder_or_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="no-such-encoder"):
        create_segmenter("Unet", "no-such-encoder")
    with pytest.raises(ValueError, match="NoSuchNet"):
        create_segmenter("NoSuchNet", ENC)


def test_ignored_pixels_get_no_gradient_and_others_do():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 24, requires_grad=True)
    target = torch.randint(0, 2, (2, 4, 16, 24))
    ignored = torch.rand(2, 4, 16, 24) < 0.3
    target[ignored] = IGNORE
    segmentation_loss(logits, target).backward()
    assert torch.all(logits.grad[ignored] == 0)
    assert (logits.grad[~ignored] != 0).float().mean() > 0.99
    # and the loss does not depend on what the network says there
    moved = logits.detach().clone()
    moved[ignored] += 5.0
    assert torch.isclose(segmentation_loss(moved, target), segmentation_loss(logits.detach(), target))


def test_refine_targets_uses_the_image_level_label():
    masks = np.zeros((4, 20, 30), bool)
    masks[0, 5:15, 5:20] = True  # labelled present, has a mask: kept
    masks[1, 2:6, 2:6] = True  # labelled absent: zeroed
    labels = np.array([1, 0, 1, 0], np.uint8)  # class 3 present but its pseudo-mask is empty
    t = refine_targets(masks, labels)
    assert t.dtype == np.int8
    assert np.array_equal(t[0], masks[0].astype(np.int8))
    assert t[1].max() == 0 and t[3].max() == 0
    assert np.all(t[2] == IGNORE)
    assert np.all(refine_targets(masks, labels, present_empty="empty")[2] == 0)
    assert np.array_equal(refine_targets(masks, labels, absent_zero=False)[1], masks[1].astype(np.int8))
    assert np.array_equal(refine_targets(masks, None), masks.astype(np.int8))
    with pytest.raises(ValueError, match="present_empty"):
        refine_targets(masks, labels, present_empty="maybe")


def test_ignore_band_straddles_the_edge_only():
    mask = np.zeros((40, 60), bool)
    mask[10:30, 15:45] = True
    band = edge_band(mask, 3)
    t = refine_targets(mask[None], np.array([1]), ignore_band=3)[0]
    assert np.array_equal(t == IGNORE, band)
    assert band[10, 30] and band[9, 30] and band[12, 30]  # on, just outside and just inside the top edge
    assert not band[20, 30] and not band[2, 30]  # deep inside, far outside
    assert np.all(t[20, 20:40] == 1) and np.all(t[0:5] == 0)
    assert not edge_band(np.zeros((5, 5), bool), 3).any()


def test_build_targets_decodes_resizes_and_refines():
    h, w = 64, 400
    m = np.zeros((h, w), bool)
    m[10:40, 100:300] = True
    rles = [[rle.encode(m), "", "", ""], ["", "", rle.encode(m), ""]]
    labels = [[1, 0, 0, 0], [0, 0, 0, 1]]  # second image: class 3 masked but labelled absent; class 4 missed
    t = build_targets(rles, [(h, w)] * 2, (32, 200), labels, SegmenterConfig(ignore_band=0))
    assert t.shape == (2, 4, 32, 200) and t.dtype == np.int8
    assert t[0, 0].sum() == 15 * 100 and t[0, 0, 5:20, 50:150].min() == 1
    assert t[1, 2].max() == 0 and np.all(t[1, 3] == IGNORE)
    band = SegmenterConfig().ignore_band
    assert band >= 1
    banded = build_targets(rles, [(h, w)] * 2, (32, 200), labels, SegmenterConfig())  # the default band
    assert np.array_equal(banded[0, 0] == IGNORE, edge_band(t[0, 0] == 1, band))
    wide = build_targets(rles, [(h, w)] * 2, (32, 200), labels, SegmenterConfig(ignore_band=3))
    assert np.array_equal(wide[0, 0] == IGNORE, edge_band(t[0, 0] == 1, 3))
    truth = build_targets(rles, [(h, w)] * 2, (h, w), None, SegmenterConfig())
    assert np.array_equal(truth[1, 2], m.astype(np.int8))


def test_predict_maps_averages_folds_and_scores_by_maximum():
    torch.manual_seed(0)
    models = [create_segmenter("Unet", ENC, 4).eval() for _ in range(2)]
    x = torch.randn(1, 3, 32, 128)
    maps, scores = predict_maps(models, x, out_size=(64, 256))
    with torch.no_grad():
        mean = (torch.sigmoid(models[0](x)) + torch.sigmoid(models[1](x))) / 2
    assert maps.shape == (1, 4, 64, 256) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert torch.allclose(scores, mean.amax(dim=(-2, -1)), atol=1e-6)


def test_the_loss_and_targets_teach_a_unet_to_find_defects(small_archive):
    """A few dozen steps on a handful of images: Dice on them must rise far above the
    whole-image baseline (a sign error or a broken target path would not)."""
    from cam2seg import preprocess, metrics
    from cam2seg.archive import Archive

    a = Archive.open(str(small_archive))
    ids = [i for i, lab in zip(a.image_ids, a.labels) if lab.any()][:8]
    size = (32, 200)
    imgs = preprocess.load_images([a.image_url(i) for i in ids], size)
    rles = [[a.rle(i, c) for c in a.class_ids] for i in ids]
    y = build_targets(rles, [(64, 400)] * len(ids), size, None, SegmenterConfig())
    torch.manual_seed(0)
    model = create_segmenter("Unet", ENC, 4, in_channels=1)  # grey images: one input channel
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, t = preprocess.to_input(imgs), torch.from_numpy(y)
    for _ in range(60):
        opt.zero_grad()
        segmentation_loss(model(x), t).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = (torch.sigmoid(model(x)) >= 0.5).numpy()
    truth = y.astype(bool)
    dice = metrics.score_dice(metrics.dice(pred, truth), truth.sum(axis=(-2, -1)))
    whole = metrics.score_dice(metrics.dice(np.ones_like(truth), truth), truth.sum(axis=(-2, -1)))
    print(dice.positive_mean, whole.positive_mean)
    assert dice.positive_mean > max(0.5, 3 * whole.positive_mean), (dice.positive_mean, whole.positive_mean)
