"""Turning archive images into model inputs: load, convert to the model's channels, resize, normalise.

Images are held as ``uint8[N, H, W]`` (grey, ``channels=1``) or ``uint8[N, H, W, 3]`` (RGB,
``channels=3``) at the model's input size. The model sees ``float32[B, C_in, H, W]`` normalised
by the encoder's mean and std: ``C_in`` is the length of the mean (and std) tuple. A grey model
has one input channel (timm's ``in_chans=1``, smp's ``in_channels=1``) normalised by the mean of
ImageNet's three statistics; an RGB model has three. Model cards written before the channel
setting existed hold ImageNet's 3-tuple with grey images: their grey is replicated to three
channels, as those models were trained.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from . import io

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CHANNELS", "normalisation", "image_channels", "channels_of",
           "detect_channels", "load_images", "prepare", "resize", "to_input", "to_channels"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the image channel counts a model can read: grey or RGB
CHANNELS = (1, 3)
# What a grey model sees: the mean of ImageNet's channel statistics, as timm averages a
# 3-channel stem into a 1-channel one.
_GREY_MEAN = (round(sum(IMAGENET_MEAN) / 3, 4),)
_GREY_STD = (round(sum(IMAGENET_STD) / 3, 4),)


def normalisation(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a model reading ``channels`` (1 or 3) image channels, in [0, 1] units."""
    if channels == 1:
        return _GREY_MEAN, _GREY_STD
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")


def channels_of(images: np.ndarray, batched: bool = True) -> int:
    """1 for grey ``uint8[(N,) H, W]``, 3 for RGB ``uint8[(N,) H, W, 3]``."""
    nd = images.ndim - (1 if batched else 0)
    if nd == 2:
        return 1
    if nd == 3 and images.shape[-1] == 3:
        return 3
    raise ValueError(f"expected grey [{'N, ' if batched else ''}H, W] or RGB [{'N, ' if batched else ''}H, W, 3] "
                     f"images, got shape {images.shape}")


def image_channels(image: np.ndarray, tolerance: float = 2.0) -> int:
    """How many channels an archive image really has: 1 for a grey one, also when it is stored
    as RGB with (nearly) equal channels (JPEG noise), 3 when its channels differ by more than
    ``tolerance`` grey levels on average."""
    if image.ndim == 2:
        return 1
    x = image.astype(np.int16)
    spread = (np.abs(x[..., 0] - x[..., 1]) + np.abs(x[..., 1] - x[..., 2])).mean() / 2
    return 3 if spread > tolerance else 1


def detect_channels(urls: list[str], setting: str | int = "auto", sample: int = 16, threads: int = 8) -> int:
    """The channels a model of ``setting`` reads: 1 or 3 as given, or for "auto" 3 when any of
    ``sample`` images spread evenly over ``urls`` has colour (:func:`image_channels`), else 1."""
    if str(setting) != "auto":
        channels = int(setting)
        normalisation(channels)  # validates
        return channels
    if not urls:
        return 1
    picks = sorted({int(i) for i in np.linspace(0, len(urls) - 1, min(sample, len(urls)))})

    def one(i: int) -> int:
        try:
            return image_channels(io.decode_image(io.read_bytes(urls[i])))
        except io.ImageDecodeError as e:
            raise io.ImageDecodeError(f"{urls[i]}: {e}") from None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return max(pool.map(one, picks))


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``uint8[H, W(, 3)]`` to ``size`` = (height, width); area interpolation when shrinking."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    shrink = h * w < image.shape[0] * image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def to_channels(image: np.ndarray, channels: int = 1) -> np.ndarray:
    """A decoded ``uint8[H, W]`` or ``uint8[H, W, 3]`` image as grey (1) or RGB (3)."""
    if channels == 1:
        return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if channels == 3:
        return image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")


def prepare(image: np.ndarray, size: tuple[int, int], channels: int = 1) -> np.ndarray:
    """A decoded image (grey or RGB ``uint8``) -> ``uint8[h, w]`` grey or ``uint8[h, w, 3]`` RGB at ``size``."""
    return resize(to_channels(image, channels), size)


def load_images(urls: list[str], size: tuple[int, int], threads: int = 8, channels: int = 1) -> np.ndarray:
    """Read, decode, convert to ``channels`` and resize images: ``uint8[N, H, W]`` (grey) or
    ``uint8[N, H, W, 3]`` (RGB) at ``size``."""
    out = np.empty((len(urls), *size) + ((3,) if channels == 3 else ()), dtype=np.uint8)

    def one(i: int) -> None:
        try:
            out[i] = prepare(io.decode_image(io.read_bytes(urls[i])), size, channels)
        except io.ImageDecodeError as e:
            raise io.ImageDecodeError(f"{urls[i]}: {e}") from None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(one, range(len(urls))))
    return out


def to_input(images: np.ndarray, mean=None, std=None, device="cpu") -> "torch.Tensor":  # noqa: F821
    """``uint8[B, H, W]`` (grey) or ``uint8[B, H, W, 3]`` (RGB) -> normalised ``float32[B, C_in, H, W]``
    on ``device``, ``C_in = len(mean)``. ``mean``/``std`` None: :func:`normalisation` of the
    images' own channels. Grey images with a 3-tuple mean are replicated to three channels
    (cards from before the channel setting); RGB images with a 1-tuple mean are refused."""
    # imported here: image reading and decoding (Ray Data's decode tasks) need no torch
    import torch

    images = np.asarray(images)
    c_img = channels_of(images)
    if mean is None or std is None:
        mean, std = normalisation(c_img)
    c_in = len(mean)
    if c_img == 3 and c_in != 3:
        raise ValueError(f"RGB images for a model with {c_in} input channel(s); convert them first (prepare)")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True).float().div_(255.0)
    x = x.permute(0, 3, 1, 2) if c_img == 3 else x.unsqueeze(1).expand(-1, c_in, -1, -1)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, c_in, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, c_in, 1, 1)
    return (x - m) / s
