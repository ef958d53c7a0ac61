"""Image decoding and the per-pair geometric augmentation of the pre-encoding pass.

All decoding goes through ``decode_image`` so that a GPU decoder (DALI) can replace it in
one place. ``prepare_pair`` is split in two so that the pre-encoding pass can decode on a
thread pool and still match the serial path: ``decode_resized`` (no random draw, any thread)
and ``place_pair`` (the pair's flip and crops, drawn in pair order on one thread).
"""
from __future__ import annotations

import io

import numpy as np
import torch


class ImageDecodeError(ValueError):
    """The bytes of an image cell are not a decodable image."""


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> uint8 RGB array [H, W, 3]."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise ImageDecodeError("empty or non-bytes image cell")
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as err:  # PIL raises several unrelated types for corrupt data
        raise ImageDecodeError(str(err)) from None


def resize_shorter(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize (bicubic) so that the shorter side is ``resolution`` and the longer one keeps the
    aspect ratio, never below ``resolution``; unchanged when already that size."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
    return image


def decode_resized(data: bytes, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``decode_image`` then ``resize_shorter``: (resized uint8 [h, w, 3], original (h, w)).
    No random draw, so it may run on any thread (PIL releases the GIL while it decodes and
    resamples)."""
    image = decode_image(data)
    return resize_shorter(image, resolution), image.shape[:2]


def crop_square(image: np.ndarray, resolution: int, rng: np.random.Generator | None
                ) -> tuple[np.ndarray, tuple[int, int]]:
    """A ``resolution`` square of a ``resize_shorter`` output: random when ``rng`` is given
    (two draws: top, then left), else centred. Returns the crop and its top-left offset (SDXL
    conditions on it)."""
    nh, nw = image.shape[:2]
    if rng is not None:
        top, left = int(rng.integers(0, nh - resolution + 1)), int(rng.integers(0, nw - resolution + 1))
    else:
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return image[top:top + resolution, left:left + resolution], (top, left)


def to_model_range(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float [B, 3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return arr / 127.5 - 1.0


def place_pair(winner: np.ndarray, loser: np.ndarray, originals: list[tuple[int, int]], resolution: int,
               random_crop: bool, flip: bool, rng: np.random.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random part of ``prepare_pair``, on ``resize_shorter`` outputs: one flip for the pair
    (drawn first), then the crops of winner and loser, in that order of draws."""
    crops, offsets = [], []
    do_flip = flip and rng.random() < 0.5
    for image in (winner, loser):
        crop, tl = crop_square(image, resolution, rng if random_crop else None)
        crops.append(crop[:, ::-1].copy() if do_flip else crop)
        offsets.append(tl)
    return to_model_range(crops), torch.tensor(originals), torch.tensor(offsets)


def prepare_pair(winner: np.ndarray, loser: np.ndarray, resolution: int, random_crop: bool, flip: bool,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both images of a pair: resized, cropped, flipped together (the same flip for both).

    Returns pixels [2, 3, R, R] in [-1, 1], original sizes [2, 2] (h, w) and crop offsets [2, 2].
    """
    return place_pair(resize_shorter(winner, resolution), resize_shorter(loser, resolution),
                      [winner.shape[:2], loser.shape[:2]], resolution, random_crop, flip, rng)
