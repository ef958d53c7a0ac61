"""Image decoding and the per-pair geometric augmentation of the pre-encoding pass.

All decoding goes through ``decode_image`` so that a GPU decoder (DALI) can replace it in
one place.
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


def resize_crop(image: np.ndarray, resolution: int, crop_tl: tuple[int, int] | None,
                rng: np.random.Generator | None) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize the shorter side to ``resolution`` (bicubic), then crop a square.

    ``crop_tl=None`` picks the crop: random when ``rng`` is given, else centred. Returns the
    crop and its top-left offset (SDXL conditions on it).
    """
    from PIL import Image

    h, w = image.shape[:2]
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
    if crop_tl is None:
        if rng is not None:
            crop_tl = (int(rng.integers(0, nh - resolution + 1)), int(rng.integers(0, nw - resolution + 1)))
        else:
            crop_tl = ((nh - resolution) // 2, (nw - resolution) // 2)
    top, left = crop_tl
    return image[top:top + resolution, left:left + resolution], (top, left)


def to_model_range(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float [B, 3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return arr / 127.5 - 1.0


def prepare_pair(winner: np.ndarray, loser: np.ndarray, resolution: int, random_crop: bool, flip: bool,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both images of a pair: resized, cropped, flipped together (the same flip for both).

    Returns pixels [2, 3, R, R] in [-1, 1], original sizes [2, 2] (h, w) and crop offsets [2, 2].
    """
    crops, origs, offsets = [], [], []
    do_flip = flip and rng.random() < 0.5
    for image in (winner, loser):
        origs.append(image.shape[:2])
        crop, tl = resize_crop(image, resolution, None, rng if random_crop else None)
        crops.append(crop[:, ::-1].copy() if do_flip else crop)
        offsets.append(tl)
    return to_model_range(crops), torch.tensor(origs), torch.tensor(offsets)
