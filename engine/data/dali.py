"""DALI image decoding for the pre-encoding pass (``data.decoder: "dali"``).

Pick-a-Pic parquet bytes go through ``external_source`` into DALI's image decoder ("mixed"
nvJPEG decoding on CUDA; CPU decoding with ``device_id=None``), then resize, crop, flip and
normalise to [-1, 1], CHW float.

The geometry of every pair is decided on the host, before decoding, from the image headers and
the same random draws in the same order as the PIL path (``images.prepare_pair``): one flip per
pair (the same for winner and loser), a resize of the shorter side to the resolution, a centre
or random square crop whose offsets are returned for the SDXL time ids. DALI only executes that
plan, so the two paths agree exactly in geometry and differ only in the resampling filter
(PIL bicubic vs DALI cubic with antialiasing) and, for JPEG, the decoder's IDCT.

Sharding and devices: the pre-encoding pass hands each global rank its own shards of the pair
list (``encode_pickapic``) and names the device its VAE runs on. On a GPU the pipeline runs on
that GPU and the pixels stay there: DALI's output is copied device-to-device into a torch tensor
that the VAE encodes where it lies. On the CPU, DALI decodes on host threads into a host tensor.
"""
from __future__ import annotations

import copy
import io
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from sail.engine.data.images import ImageDecodeError

log = logging.getLogger(__name__)


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports (pip install nvidia-dali-cuda120 or -cuda130)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from an image's header, without decoding the pixels."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise ImageDecodeError("empty or non-bytes image cell")
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            width, height = img.size
    except Exception as err:  # PIL raises several unrelated types for corrupt data
        raise ImageDecodeError(str(err)) from None
    return height, width


@dataclass(frozen=True)
class ImagePlan:
    """Where one image goes: resized to ``resized`` (h, w), then cropped at ``crop`` (top, left)."""

    original: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]


def plan_image(size: tuple[int, int], resolution: int, rng: np.random.Generator | None) -> ImagePlan:
    """The arithmetic of ``images.resize_shorter`` and ``images.crop_square``: shorter side to
    ``resolution``, square crop (random when ``rng`` is given, else centred)."""
    h, w = size
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if rng is not None:
        crop = (int(rng.integers(0, nh - resolution + 1)), int(rng.integers(0, nw - resolution + 1)))
    else:
        crop = ((nh - resolution) // 2, (nw - resolution) // 2)
    return ImagePlan((h, w), (nh, nw), crop)


def plan_pair(sizes: tuple[tuple[int, int], tuple[int, int]], resolution: int, random_crop: bool, flip: bool,
              rng: np.random.Generator) -> tuple[ImagePlan, ImagePlan, bool]:
    """Winner and loser plans and the pair's flip, drawing from ``rng`` exactly as
    ``images.prepare_pair`` does (flip first, then the crops of winner and loser)."""
    do_flip = bool(flip and rng.random() < 0.5)
    plans = [plan_image(size, resolution, rng if random_crop else None) for size in sizes]
    return plans[0], plans[1], do_flip


def _build_pipeline(batch_size: int, resolution: int, device_id: int | None, num_threads: int):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1,
                  exec_dynamic=True)
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        resized = fn.external_source(name="resized", dtype=types.FLOAT, ndim=1)    # (h, w)
        crop = fn.external_source(name="crop", dtype=types.INT32, ndim=1)          # (top, left)
        mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
        # EXIF orientation ignored, as in the PIL path (np.asarray of the stored pixels)
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   adjust_orientation=False)
        images = fn.resize(images, size=resized, interp_type=types.INTERP_CUBIC, antialias=True)
        images = fn.slice(images, start=crop, shape=[resolution, resolution], axis_names="HW",
                          out_of_bounds_policy="error")
        return fn.crop_mirror_normalize(images, mirror=mirror, mean=[127.5] * 3, std=[127.5] * 3,
                                        output_layout="CHW", dtype=types.FLOAT)

    pipe = pipeline()
    pipe.build()
    return pipe


def _torch_device(device: torch.device | str) -> torch.device:
    """``device`` with its index made explicit for CUDA (a bare "cuda": the current device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"DALI decodes on the CPU or a CUDA device, not {device}")
    return device


class DaliPairDecoder:
    """Decodes batches of up to ``max_batch_pairs`` pairs with one DALI pipeline.

    ``device``: where the pixels are wanted. "cpu": DALI's CPU decoder (``device_id=None``),
    pixels in host memory; "cuda:<i>": mixed (nvJPEG) decoding on GPU i, pixels left on GPU i.
    """

    def __init__(self, resolution: int, device: torch.device | str = "cpu", num_threads: int = 2,
                 max_batch_pairs: int = 16):
        if not dali_available():
            raise ImportError("data.decoder = 'dali' needs NVIDIA DALI: pip install nvidia-dali-cuda120 "
                              "(or nvidia-dali-cuda130); it also runs on CPU")
        self.resolution = resolution
        self.device = _torch_device(device)
        self.device_id = self.device.index if self.device.type == "cuda" else None
        self.max_batch_pairs = max_batch_pairs
        # batch_size is DALI's maximum: smaller batches are fed as they come (variable batch size)
        self._pipe = _build_pipeline(2 * max_batch_pairs, resolution, self.device_id, num_threads)

    def decode(self, pairs: list[tuple[bytes, bytes]], plans: list[tuple[ImagePlan, ImagePlan, bool]]) -> torch.Tensor:
        """Pixels [n, 2, 3, R, R] fp32 in [-1, 1] (winner, loser) following ``plans``, on
        ``self.device``."""
        out = []
        for start in range(0, len(pairs), self.max_batch_pairs):
            chunk = pairs[start:start + self.max_batch_pairs]
            chunk_plans = plans[start:start + self.max_batch_pairs]
            out.append(self._run(chunk, chunk_plans).view(len(chunk), 2, 3, self.resolution, self.resolution))
        return torch.cat(out)

    def _run(self, pairs, plans) -> torch.Tensor:
        encoded, resized, crop, mirror = [], [], [], []
        for (winner, loser), (plan_w, plan_l, flip) in zip(pairs, plans):
            for data, plan in ((winner, plan_w), (loser, plan_l)):
                encoded.append(np.frombuffer(bytes(data), dtype=np.uint8))
                resized.append(np.asarray(plan.resized, dtype=np.float32))
                crop.append(np.asarray(plan.crop, dtype=np.int32))
                mirror.append(np.asarray(int(flip), dtype=np.int32))
        for name, data in (("encoded", encoded), ("resized", resized), ("crop", crop), ("mirror", mirror)):
            self._pipe.feed_input(name, data)
        (images,) = self._pipe.run()       # TensorListGPU on GPU self.device_id, TensorListCPU on the CPU
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty((len(encoded), 3, self.resolution, self.resolution), dtype=torch.float32,
                          device=self.device)
        # No stream given: a blocking copy (device-to-device on a GPU). When it returns the
        # pixels are in `out`, so DALI may reuse its output buffer at the next run and the torch
        # stream that reads `out` needs no event; one wait per batch of 2 x max_batch_pairs images.
        feed_ndarray(images.as_tensor(), out)
        return out                                                  # [2n, 3, R, R]


_DECODERS: dict[tuple[int, torch.device], DaliPairDecoder] = {}


def shared_decoder(resolution: int, device: torch.device | str) -> DaliPairDecoder:
    """One decoder (and its pipeline) per process, resolution and device."""
    key = (resolution, _torch_device(device))
    if key not in _DECODERS:
        _DECODERS[key] = DaliPairDecoder(resolution, key[1], num_threads=min(4, os.cpu_count() or 1))
    return _DECODERS[key]


def prepare_shard_dali(refs: list, cfg, resolution: int, rng: np.random.Generator, report,
                       device: torch.device | str = "cpu") -> list[tuple]:
    """The pre-encoding pass's per-shard decoding through DALI: (ref, pixels [2, 3, R, R] on
    ``device``, original sizes [2, 2], crop offsets [2, 2]) per kept pair, as the PIL path yields
    them (its pixels on the CPU).

    Pairs whose headers do not parse are skipped and counted like undecodable ones. If DALI fails
    on pixel data (a corrupt body behind a valid header), the shard is redone on the PIL path
    from the same random state and the same bytes, which skips and counts exactly the bad pairs.
    """
    from sail.engine.data.encode import prepare_pairs_pil
    from sail.engine.data.pickapic import iter_pair_bytes

    start_state = copy.deepcopy(rng.bit_generator.state)
    rows = list(iter_pair_bytes(refs))
    try:
        kept, pixels, origs, crops = prepare_pairs_dali(shared_decoder(resolution, device),
                                                        [(w, l) for _, w, l in rows], cfg.random_crop,
                                                        cfg.random_flip, rng)
    except RuntimeError as err:   # DALI reports decoding errors as RuntimeError
        log.warning("DALI could not decode a pair of this shard (%s); decoding the shard with PIL",
                    str(err).splitlines()[0][:200])
        rng.bit_generator.state = start_state
        return list(prepare_pairs_pil(rows, cfg, resolution, rng, report))
    kept_set = set(kept)
    for i, ref in enumerate(refs):
        if i not in kept_set:
            report.note_undecodable(ref.row_id)
    return [(refs[i], pixels[j], origs[j], crops[j]) for j, i in enumerate(kept)]


def prepare_pairs_dali(decoder: DaliPairDecoder, raw: list[tuple[bytes, bytes]], random_crop: bool, flip: bool,
                       rng: np.random.Generator) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DALI counterpart of calling ``prepare_pair`` on each pair, for a whole shard.

    raw: (winner bytes, loser bytes) per pair. Returns the indices of the pairs kept (headers
    that do not parse are skipped, as undecodable images are on the PIL path), pixels
    [k, 2, 3, R, R] on ``decoder.device``, original sizes [k, 2, 2] and crop offsets [k, 2, 2]
    (h, w / top, left; on the CPU).
    """
    kept, plans, pairs = [], [], []
    for i, (winner, loser) in enumerate(raw):
        try:
            sizes = (image_size(winner), image_size(loser))
        except ImageDecodeError:
            continue
        kept.append(i)
        plans.append(plan_pair(sizes, decoder.resolution, random_crop, flip, rng))
        pairs.append((winner, loser))
    if not kept:
        empty = torch.zeros(0, 2, 2, dtype=torch.long)
        return kept, torch.zeros(0, 2, 3, decoder.resolution, decoder.resolution, device=decoder.device), empty, empty
    pixels = decoder.decode(pairs, plans)
    origs = torch.tensor([[p.original for p in plan[:2]] for plan in plans])
    crops = torch.tensor([[p.crop for p in plan[:2]] for plan in plans])
    return kept, pixels, origs, crops
