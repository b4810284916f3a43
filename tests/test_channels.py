"""Grey and colour inputs without Ray: conversion, normalisation, the models' input channels,
pretrained stems adapted between 1 and 3 channels, colour-aware refinement, cards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cam2seg import preprocess


def _rgb(h=32, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_prepare_converts_to_the_models_channels():
    rgb = _rgb()
    grey = preprocess.prepare(rgb, (16, 32), 1)
    assert grey.shape == (16, 32) and grey.dtype == np.uint8
    assert preprocess.prepare(rgb, (16, 32), 3).shape == (16, 32, 3)
    back = preprocess.prepare(grey, (16, 32), 3)
    assert back.shape == (16, 32, 3) and (back[..., 0] == back[..., 2]).all()
    with pytest.raises(ValueError, match="channels must be 1 .grey. or 3 .RGB., got 2"):
        preprocess.prepare(rgb, (16, 32), 2)


def test_image_channels_sees_colour_not_jpeg_noise():
    grey = np.random.default_rng(1).integers(0, 256, (32, 64), dtype=np.uint8)
    assert preprocess.image_channels(grey) == 1
    stored_rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.int16)
    stored_rgb[..., 1] += 1  # a grey image saved as RGB, with a little codec noise
    assert preprocess.image_channels(np.clip(stored_rgb, 0, 255).astype(np.uint8)) == 1
    assert preprocess.image_channels(_rgb()) == 3


def test_detect_channels_from_a_sample(tmp_path):
    from PIL import Image

    urls = []
    for i in range(5):
        p = tmp_path / f"g{i}.png"
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(p)
        urls.append(str(p))
    assert preprocess.detect_channels(urls) == 1
    p = tmp_path / "c.png"
    Image.fromarray(_rgb(8, 8)).save(p)
    assert preprocess.detect_channels(urls + [str(p)]) == 3  # the last image is always sampled
    assert preprocess.detect_channels(urls, "3") == 3 and preprocess.detect_channels([str(p)], 1) == 1
    with pytest.raises(ValueError, match="channels must be 1"):
        preprocess.detect_channels(urls, "4")


def test_to_input_shapes_and_normalisation():
    grey = np.full((2, 4, 6), 128, np.uint8)
    x = preprocess.to_input(grey)
    mean, std = preprocess.normalisation(1)
    assert x.shape == (2, 1, 4, 6) and torch.allclose(x, torch.full_like(x, (128 / 255 - mean[0]) / std[0]))
    x3 = preprocess.to_input(np.stack([_rgb(4, 6, 0), _rgb(4, 6, 1)]))
    assert x3.shape == (2, 3, 4, 6)
    # cards from before the channel setting: grey replicated to three ImageNet-normalised channels
    legacy = preprocess.to_input(grey, preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)
    assert legacy.shape == (2, 3, 4, 6)
    assert torch.allclose(legacy[:, 2], torch.full((2, 4, 6), (128 / 255 - 0.406) / 0.225))
    with pytest.raises(ValueError, match="RGB images for a model with 1 input channel"):
        preprocess.to_input(np.stack([_rgb(4, 6)]), *preprocess.normalisation(1))


@pytest.mark.parametrize("channels", [1, 3])
def test_models_read_their_channels(channels):
    from cam2seg.models.classifier import create_classifier
    from cam2seg.models.segmenter import create_segmenter

    clf = create_classifier("mobilenetv3_small_100", 3, 16, 0.0, in_chans=channels).eval()
    seg = create_segmenter("Unet", "mobilenet_v2", 3, decoder_channels=[16, 8, 8, 8, 8], in_channels=channels).eval()
    x = torch.zeros(1, channels, 32, 64)
    assert clf(x).shape == (1, 3) and seg(x).shape == (1, 3, 32, 64)
    with pytest.raises(RuntimeError):
        clf(torch.zeros(1, 4 - channels, 32, 64))  # the other channel count does not fit the stem


@pytest.mark.parametrize("into", [1, 3])
def test_pretrained_stem_adapts_between_channel_counts(tmp_path, into):
    """3-channel weights load into a 1-channel encoder (summed over the channels, timm's rule)
    and 1-channel weights into a 3-channel one: every tensor loads, none is dropped."""
    from safetensors.torch import save_file

    from cam2seg.models.classifier import create_classifier, load_encoder_weights

    source = create_classifier("mobilenetv3_small_100", 2, 8, 0.0, in_chans=4 - into).encoder
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = create_classifier("mobilenetv3_small_100", 2, 8, 0.0, in_chans=into).encoder
    loaded = load_encoder_weights(target, str(path))
    assert loaded == len(target.state_dict())
    stem, src = target.conv_stem.weight, source.conv_stem.weight
    if into == 1:
        assert torch.allclose(stem, src.sum(dim=1, keepdim=True), atol=1e-6)
    else:
        assert stem.shape[1] == 3 and torch.allclose(stem.sum(dim=1, keepdim=True), src, atol=1e-5)
    # a grey 1-channel input through the adapted stem equals the RGB stem on the grey replicated
    if into == 1:
        g = torch.rand(1, 1, 16, 16)
        a = torch.nn.functional.conv2d(g, stem, stride=2, padding=1)
        b = torch.nn.functional.conv2d(g.expand(-1, 3, -1, -1), src, stride=2, padding=1)
        assert torch.allclose(a, b, atol=1e-5)


def test_par_stops_at_a_hue_edge_that_grey_cannot_see():
    """Two halves of equal luma and different hue: on the colour image PAR keeps a map inside its
    half; on the grey image of the same pixels it spreads across."""
    from cam2seg.refine.par import par

    h, w = 16, 32
    img = np.zeros((h, w, 3), np.float32)
    img[:, : w // 2] = (0.6, 0.3, 0.3)
    img[:, w // 2 :] = (0.3, 0.45, 0.6)  # about the same luma
    img += np.random.default_rng(0).normal(0, 0.005, img.shape).astype(np.float32)
    colour = torch.from_numpy(img).permute(2, 0, 1)[None]
    grey = torch.from_numpy(preprocess.to_channels((img * 255).astype(np.uint8), 1) / 255.0).float()[None, None]
    maps = torch.zeros(1, 1, h, w)
    maps[..., w // 2 - 4 : w // 2] = 1.0  # the map's edge sits on the hue edge
    right_colour = par(maps, colour, iterations=20)[..., w // 2 + 2 :].mean()
    right_grey = par(maps, grey, iterations=20)[..., w // 2 + 2 :].mean()
    assert right_colour < 0.5 * right_grey


def test_contrast_gate_opens_on_a_chroma_defect():
    from cam2seg.refine.contrast import gate

    img = np.full((32, 64, 3), 0.5, np.float32) + np.random.default_rng(0).normal(0, 0.01, (32, 64, 3)).astype(np.float32)
    img[10:14, 30:34] += np.array([0.15, -0.15, 0.0], np.float32)  # hue changes, luma nearly not
    g = gate(torch.from_numpy(img).permute(2, 0, 1)[None], 0.8, 2.5, 6.0)
    assert g.shape == (1, 1, 32, 64)
    assert g[0, 0, 10:14, 30:34].mean() > 0.9 and g[0, 0, :8].mean() < 0.05


def test_card_records_channels_and_names():
    from pydantic import ValidationError

    from cam2seg.artifact import ModelCard

    base = dict(kind="classifier", architecture="x", num_classes=2, class_ids=[1, 2], input_size=(32, 64),
                head={"hidden": 8, "dropout": 0.0}, folds=2, fold_files=[])
    old = ModelCard(**base, mean=preprocess.IMAGENET_MEAN, std=preprocess.IMAGENET_STD)
    assert (old.channels, old.in_chans, old.names) == (1, 3, ["class 1", "class 2"])
    grey = ModelCard(**base, mean=preprocess.normalisation(1)[0], std=preprocess.normalisation(1)[1],
                     class_names=["pit", "scratch"])
    assert (grey.channels, grey.in_chans, grey.names) == (1, 1, ["pit", "scratch"])
    rgb = ModelCard(**base, grayscale=False, mean=preprocess.IMAGENET_MEAN, std=preprocess.IMAGENET_STD)
    assert (rgb.channels, rgb.in_chans) == (3, 3)
    with pytest.raises(ValidationError, match="an RGB model needs 3-channel mean and std"):
        ModelCard(**base, grayscale=False, mean=(0.5,), std=(0.2,))
    with pytest.raises(ValidationError, match="1 class names for 2 classes"):
        ModelCard(**base, mean=(0.5,), std=(0.2,), class_names=["pit"])
