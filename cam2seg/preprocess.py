"""Turning archive images into model inputs: load, grey, resize, normalise.

Images are held as ``uint8[N, H, W]`` (grey) at the model's input size; the model sees
``float32[B, 3, H, W]`` with grey replicated to three channels (so ImageNet weights fit) and
normalised by the encoder's mean and std.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from . import io

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "load_images", "prepare", "resize", "to_input"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``uint8[H, W(, 3)]`` to ``size`` = (height, width); area interpolation when shrinking."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    shrink = h * w < image.shape[0] * image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def prepare(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A decoded image (grey or RGB ``uint8``) -> ``uint8[h, w]`` grey at ``size``."""
    return resize(_gray(image), size)


def load_images(urls: list[str], size: tuple[int, int], threads: int = 8) -> np.ndarray:
    """Read, decode, convert to grey and resize images: ``uint8[N, H, W]`` at ``size``."""
    out = np.empty((len(urls), *size), dtype=np.uint8)

    def one(i: int) -> None:
        try:
            out[i] = prepare(io.decode_image(io.read_bytes(urls[i])), size)
        except io.ImageDecodeError as e:
            raise io.ImageDecodeError(f"{urls[i]}: {e}") from None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(one, range(len(urls))))
    return out


def to_input(images: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD, device="cpu") -> "torch.Tensor":  # noqa: F821
    """``uint8[B, H, W]`` -> normalised ``float32[B, 3, H, W]`` on ``device``."""
    # imported here: image reading and decoding (Ray Data's decode tasks) need no torch
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True).float().div_(255.0)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
