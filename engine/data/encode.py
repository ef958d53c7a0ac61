"""Pre-encoding pass: Pick-a-Pic pairs -> VAE latents and text embeddings in a pair cache.

Runs once before training so that training reads no image and runs no encoder; the frozen
VAE and text encoders can then leave memory. Shards of ``shard_size`` pairs are assigned
round-robin to ranks; each shard is written atomically, so an interrupted pass resumes.
"""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from sail.engine import seeds
from sail.engine.config import DataConfig
from sail.engine.data.cache import PairBatch, finalize_cache, is_complete, shard_done, write_empty_prompt, write_shard
from sail.engine.data.images import ImageDecodeError, decode_resized, place_pair
from sail.engine.data.pickapic import DataError, LoadReport, PairRef, iter_pair_bytes, scan_pickapic
from sail.engine.io import read_json
from sail.engine.models import Components, encode_prompts, sdxl_time_ids
from sail.engine.ranks import Ranks, single_process

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_pixels(comps: Components, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[B, 3, R, R] in [-1, 1] -> latents scaled for the UNet (identity for pixel-space models)."""
    if comps.vae is None:
        return pixels.float()
    vae = comps.vae
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(dist.mean.device)
    return (dist.mean.float() + dist.std.float() * noise) * comps.latent_scale


def default_resolution(comps: Components) -> int:
    return int(comps.unet.config.sample_size) * comps.vae_factor


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """``map(fn, items)`` on ``workers`` threads, results in input order, at most 2 x workers
    items in flight (a shard's decoded images are not all held at once)."""
    if workers == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def prepare_pairs_pil(rows: Iterable[tuple[PairRef, bytes, bytes]], cfg: DataConfig, resolution: int,
                      rng: np.random.Generator, report: LoadReport) -> Iterator[tuple]:
    """(ref, pixels [2, 3, R, R], original sizes [2, 2], crop offsets [2, 2]) per decodable pair
    of ``rows`` (ref, winner bytes, loser bytes), in order: ``prepare_pair`` on each.

    Decoding and resizing run on ``cfg.decode_workers`` threads; the flips and crops are drawn
    here, one pair after the other, so the output (pixels, order, skipped pairs, the state of
    ``rng``) is the serial one whatever the number of threads. Undecodable pairs are skipped and
    counted in ``report``, drawing nothing, as on the serial path.
    """
    def decode(row):
        ref, winner, loser = row
        try:
            return ref, (decode_resized(winner, resolution), decode_resized(loser, resolution))
        except ImageDecodeError:
            return ref, None

    for ref, decoded in _ordered_map(decode, rows, cfg.decode_workers):
        if decoded is None:
            report.note_undecodable(ref.row_id)
            continue
        (winner, winner_size), (loser, loser_size) = decoded
        yield (ref, *place_pair(winner, loser, [winner_size, loser_size], resolution, cfg.random_crop,
                                cfg.random_flip, rng))


def _encode_shard(comps: Components, refs: list[PairRef], cfg: DataConfig, resolution: int, seed: int,
                  shard: int) -> tuple[PairBatch | None, list[str], list[str], LoadReport]:
    report = LoadReport(kept=len(refs))
    np_seed, torch_seed = seeds.encode_shard(seed, shard)
    rng = np.random.default_rng(np_seed)
    gen = torch.Generator().manual_seed(torch_seed)
    pixels, origs, crops, captions, sources = [], [], [], [], []
    if cfg.decoder == "dali":
        from sail.engine.data.dali import prepare_shard_dali

        # DALI leaves the pixels where the VAE runs (a GPU: no copy to the host and back);
        # pixel-space models keep them on the CPU, where their "latents" are stored
        device = comps.vae.device if comps.vae is not None else torch.device("cpu")
        items = prepare_shard_dali(refs, cfg, resolution, rng, report, device)
    else:
        items = prepare_pairs_pil(iter_pair_bytes(refs), cfg, resolution, rng, report)
    for ref, px, orig, crop in items:
        pixels.append(px)
        origs.append(orig)
        crops.append(crop)
        captions.append(ref.caption)
        sources.append(ref.row_id)
    if not captions:
        return None, [], [], report
    latents, hidden, pooled = [], [], []
    for i in range(0, len(captions), cfg.encode_batch_size):
        chunk = torch.cat(pixels[i:i + cfg.encode_batch_size])        # [2b, 3, R, R] as w0,l0,w1,l1..
        lat = encode_pixels(comps, chunk, gen)
        latents.append(lat.view(-1, 2, *lat.shape[1:]))
        cond = encode_prompts(comps.text_encoders, comps.tokenizers, captions[i:i + cfg.encode_batch_size])
        hidden.append(cond.hidden.cpu())
        if cond.pooled is not None:
            pooled.append(cond.pooled.cpu())
    lat = torch.cat(latents).cpu()
    batch = PairBatch(lat[:, 0], lat[:, 1], torch.cat(hidden), torch.cat(pooled) if pooled else None)
    if comps.kind == "sdxl":
        orig, crop = torch.stack(origs), torch.stack(crops)            # [n, 2(w/l), 2]
        batch.time_ids_w = sdxl_time_ids(orig[:, 0], crop[:, 0], (resolution, resolution))
        batch.time_ids_l = sdxl_time_ids(orig[:, 1], crop[:, 1], (resolution, resolution))
    return batch, captions, sources, report


def encode_pickapic(cfg: DataConfig, comps: Components, cache_dir: str | Path, *, seed: int = 0,
                    ranks: Ranks | None = None, shard_size: int | None = None, progress: bool = True) -> Path:
    """Encode ``cfg.train`` into ``cache_dir`` (no-op when already complete); returns the folder.

    Every rank validates all files first (cheap columns only), so bad data fails before any
    image is decoded; then each rank encodes its shards; rank 0 writes the index and meta.
    """
    cache_dir, ranks = Path(cache_dir), ranks or single_process()
    if ranks.broadcast_object(is_complete(cache_dir) if ranks.is_main else None):     # rank 0 decides
        return cache_dir
    refs, report = scan_pickapic(cfg.train, cfg.max_pairs, max_bad_fraction=cfg.max_bad_fraction, strict=cfg.strict,
                                 select=cfg.select)
    log.info("preference data: %s", report.summary())
    resolution = cfg.resolution or default_resolution(comps)
    shard_size = shard_size or cfg.encode_shard_pairs
    cache_dir.mkdir(parents=True, exist_ok=True)
    num_shards = (len(refs) + shard_size - 1) // shard_size
    # Rank 0 lists the shards still to encode (a rank listing the folder itself could see a
    # shard another rank has just written); each rank takes every W-th.
    todo = ranks.broadcast_object([s for s in range(num_shards) if not shard_done(cache_dir, s)]
                                  if ranks.is_main else None)
    mine = todo[ranks.rank::ranks.world_size]

    def encode_mine() -> None:
        for shard in tqdm(mine, desc="pre-encode", disable=not progress or not ranks.is_main):
            part = refs[shard * shard_size:(shard + 1) * shard_size]
            batch, captions, sources, shard_report = _encode_shard(comps, part, cfg, resolution, seed, shard)
            if cfg.strict and shard_report.undecodable:
                raise DataError(f"data.train: undecodable image in pair {shard_report.undecodable_ids[0]} "
                                "(data.strict)")
            if batch is None:
                raise DataError(f"data.train: shard {shard}: no decodable pair ({shard_report.summary()})")
            write_shard(cache_dir, shard, batch, captions, sources,
                        {"undecodable": shard_report.undecodable, "ids": shard_report.undecodable_ids})
        if ranks.is_main:
            empty = encode_prompts(comps.text_encoders, comps.tokenizers, [""])
            write_empty_prompt(cache_dir, empty.hidden.cpu(), None if empty.pooled is None else empty.pooled.cpu())

    # A bad shard is seen by the rank that encodes it: the others hear of it here, not at a
    # barrier that rank never reaches.
    ranks.agreed(encode_mine)
    # Every rank tallies the shards' skipped pairs, so that all of them refuse too-bad data
    # together (one rank raising alone would leave the others waiting at the next barrier).
    for shard in range(num_shards):
        skipped = read_json(cache_dir / f"shard_{shard:05d}.json")["skipped"]
        for row_id in skipped.get("ids", []):
            report.note_undecodable(row_id)
        extra = skipped.get("undecodable", 0) - len(skipped.get("ids", []))
        report.undecodable += extra
        report.kept -= extra
    report.check_bad_fraction(cfg.max_bad_fraction)
    if ranks.is_main:
        if report.undecodable:
            log.warning("skipped %d pairs with undecodable images (first: %s)", report.undecodable,
                        ", ".join(report.undecodable_ids))
        meta = {"version": 1, "kind": comps.kind, "resolution": resolution, "pixel_space": comps.vae is None,
                "report": report.__dict__, "sources": list(cfg.train)}
        finalize_cache(cache_dir, num_shards, meta)
    ranks.barrier()
    return cache_dir
