"""The toy world's data folder: disjoint prompt splits and oracle-labelled preference sets.

    <data>/splits.json     seed / pool_1..pool_T / eval prompts (checked disjoint on read)
    <data>/seed.parquet    the seed preference set (Pick-a-Pic v2 schema)
    <data>/full.parquet    16x more pairs on the same prompts (DPO-on-all-labels baseline)
    <data>/manifest.json   written last: config, base-model fingerprint, file sizes, label stats

Pairs are made of BASE-MODEL samples (as Pick-a-Pic pairs are samples of the models of the
day), labelled by the oracle with Bradley-Terry noise. The seed set is a subset of the full
set (the first pairs of each prompt), as the paper's seed set is a subset of Pick-a-Pic.
Everything is deterministic from the config's seed and the base model's weights.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sail.engine.io import read_json, write_json, write_parquet
from sail.engine.scorers import load_scorer
from sail.engine.worlds import check_disjoint
from sail.engine.toy.model import load_toy_model, sample_images
from sail.engine.toy.oracle import bradley_terry_labels
from sail.engine.toy.world import ToyWorldConfig, all_prompts

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS_FILE, SEED_FILE, FULL_FILE, MANIFEST_FILE = "splits.json", "seed.parquet", "full.parquet", "manifest.json"
BASE_MODEL_NAME = "toy-base"
ORACLE_USER_ID = 0


# --------------------------------------------------------------------------------------------
# Prompt splits
# --------------------------------------------------------------------------------------------

@dataclass
class PromptSplits:
    """Disjoint prompt sets: seed preference prompts, one pool per SAIL iteration, held-out eval."""

    seed: list[str]
    pools: list[list[str]]
    eval: list[str]

    def named(self) -> dict[str, list[str]]:
        """{"seed": ..., "pool_1": ..., ..., "eval": ...}"""
        out = {"seed": self.seed}
        out.update({f"pool_{i + 1}": pool for i, pool in enumerate(self.pools)})
        out["eval"] = self.eval
        return out

    def pool(self, iteration: int) -> list[str]:
        """Prompts of SAIL iteration ``iteration`` (1-based)."""
        if not 1 <= iteration <= len(self.pools):
            raise ValueError(f"iteration: must be in 1..{len(self.pools)}, got {iteration}")
        return self.pools[iteration - 1]


def make_splits(cfg: ToyWorldConfig) -> PromptSplits:
    """Shuffle all prompts with the config's seed and cut them into the splits."""
    prompts = all_prompts()
    order = np.random.default_rng([cfg.seed, 1]).permutation(len(prompts))
    shuffled = [prompts[i] for i in order]
    n_seed, n_pool = cfg.num_seed_prompts, cfg.pool_prompts
    seed = shuffled[:n_seed]
    pools = [shuffled[n_seed + i * n_pool: n_seed + (i + 1) * n_pool] for i in range(cfg.num_iterations)]
    start = n_seed + cfg.num_iterations * n_pool
    splits = PromptSplits(seed, pools, shuffled[start:start + cfg.num_eval_prompts])
    check_disjoint(splits.named())
    return splits


def write_splits(path: str | os.PathLike, splits: PromptSplits) -> Path:
    """splits.json: {"version", "splits": {name: [prompts]}}, written atomically."""
    check_disjoint(splits.named())
    return write_json(path, {"version": FORMAT_VERSION, "splits": splits.named()})


def read_splits(path: str | os.PathLike) -> PromptSplits:
    """Read and re-check splits.json."""
    named = read_json(path)["splits"]
    check_disjoint(named)
    pools = [named[k] for k in sorted((k for k in named if k.startswith("pool_")), key=lambda k: int(k[5:]))]
    return PromptSplits(named["seed"], pools, named["eval"])


# --------------------------------------------------------------------------------------------
# Preference sets
# --------------------------------------------------------------------------------------------

def image_seed(world_seed: int, stream: int, prompt_index: int, image_index: int) -> int:
    """Seed of image ``image_index`` of prompt ``prompt_index`` in a stream (1: seed data, 2: eval)."""
    return ((world_seed * 16 + stream) * 100_000 + prompt_index) * 1000 + image_index


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG encoding of one uint8 [H, W, 3] image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def choose_pairs(n_images: int, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """``n_pairs`` distinct unordered pairs of ``n_images`` in random order and random
    left/right placement: int [n_pairs, 2]."""
    iu = np.stack(np.triu_indices(n_images, 1), axis=1)
    pairs = iu[rng.permutation(len(iu))[:n_pairs]]
    swap = rng.random(n_pairs) < 0.5
    return np.where(swap[:, None], pairs[:, ::-1], pairs)


def _pair_rows(prompts: list[str], images: np.ndarray, scores: np.ndarray, seeds: np.ndarray,
               cfg: ToyWorldConfig) -> dict[str, list]:
    """Columns of the full set, prompt by prompt; each row also records its rank within its prompt."""
    rng = np.random.default_rng([cfg.seed, 2])
    n_img, n_full = cfg.images_per_seed_prompt, cfg.full_multiplier * cfg.seed_pairs_per_prompt
    blobs = [png_bytes(im) for im in images]
    cols: dict[str, list] = {k: [] for k in ("caption", "a", "b", "rank")}
    for k, prompt in enumerate(prompts):
        pairs = choose_pairs(n_img, n_full, rng) + k * n_img
        cols["caption"] += [prompt] * n_full
        cols["a"] += pairs[:, 0].tolist()
        cols["b"] += pairs[:, 1].tolist()
        cols["rank"] += list(range(n_full))
    a, b = np.array(cols["a"]), np.array(cols["b"])
    label_0 = bradley_terry_labels(scores[a], scores[b], cfg.label_temperature, rng, cfg.tie_margin)
    uid = [f"toy-{s:016d}" for s in seeds]
    winner = np.where(label_0 == 1.0, a, b)
    return {
        "caption": cols["caption"], "jpg_0": [blobs[i] for i in a], "jpg_1": [blobs[i] for i in b],
        "label_0": label_0.tolist(), "label_1": (1.0 - label_0).tolist(),
        "has_label": [True] * len(a), "are_different": [blobs[i] != blobs[j] for i, j in zip(a, b)],
        "model_0": [BASE_MODEL_NAME] * len(a), "model_1": [BASE_MODEL_NAME] * len(a),
        "best_image_uid": [uid[w] if l != 0.5 else "" for w, l in zip(winner, label_0)],
        "ranking_id": list(range(len(a))), "user_id": [ORACLE_USER_ID] * len(a),
        "image_0_uid": [uid[i] for i in a], "image_1_uid": [uid[i] for i in b],
        "oracle_score_0": scores[a].tolist(), "oracle_score_1": scores[b].tolist(), "_rank": cols["rank"],
    }


def _to_table(cols: dict[str, list], keep: np.ndarray):
    import pyarrow as pa

    types = {"label_0": pa.float64(), "label_1": pa.float64(), "ranking_id": pa.int64(), "user_id": pa.int64(),
             "jpg_0": pa.binary(), "jpg_1": pa.binary()}
    return pa.table({k: pa.array([v[i] for i in keep], type=types.get(k)) for k, v in cols.items()
                     if not k.startswith("_")})


def label_stats(cols: dict[str, list]) -> dict:
    """How noisy the labels are: ties, and agreement with the noiseless oracle preference."""
    l0 = np.array(cols["label_0"])
    s0, s1 = np.array(cols["oracle_score_0"]), np.array(cols["oracle_score_1"])
    decided = (l0 != 0.5) & (s0 != s1)
    agree = ((l0 == 1.0) == (s0 > s1))[decided]
    return {"pairs": int(l0.size), "ties": int((l0 == 0.5).sum()),
            "agreement_with_oracle": float(agree.mean()) if agree.size else float("nan"),
            "mean_abs_score_gap": float(np.abs(s0 - s1).mean())}


# --------------------------------------------------------------------------------------------
# The data folder
# --------------------------------------------------------------------------------------------

@dataclass
class ToyDataPaths:
    """The files of a toy data folder."""

    root: Path
    splits: Path
    seed: Path
    full: Path
    manifest: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> "ToyDataPaths":
        root = Path(root)
        return cls(root, root / SPLITS_FILE, root / SEED_FILE, root / FULL_FILE, root / MANIFEST_FILE)


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over the weights that shape the samples (UNet and text encoder)."""
    digest = hashlib.sha256()
    for sub in ("unet", "text_encoder"):
        for path in sorted((Path(model_dir) / sub).glob("*.safetensors")):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def invalid_reason(paths: ToyDataPaths, cfg: ToyWorldConfig, fingerprint: str) -> str | None:
    """Why the folder cannot be used as is (None: it is complete and matches the config and model)."""
    if not paths.manifest.is_file():
        return "no manifest (absent or incomplete)"
    manifest = read_json(paths.manifest)
    if manifest.get("version") != FORMAT_VERSION:
        return f"format version {manifest.get('version')} != {FORMAT_VERSION}"
    if manifest.get("config") != asdict(cfg):
        return "built with another world config"
    if manifest.get("base_model_sha256") != fingerprint:
        return "built from other base-model weights"
    for name, size in manifest.get("files", {}).items():
        path = paths.root / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} missing or changed"
    return None


def build_toy_data(out_dir: str | os.PathLike, cfg: ToyWorldConfig, base_model_dir: str | os.PathLike,
                   progress: bool = False) -> ToyDataPaths:
    """Sample the base model on the seed prompts, label pairs with the oracle, write the folder."""
    start = time.time()
    paths = ToyDataPaths.at(out_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.manifest.unlink(missing_ok=True)  # the folder is invalid until the manifest is rewritten
    splits = make_splits(cfg)
    n_img = cfg.images_per_seed_prompt
    prompts = [p for p in splits.seed for _ in range(n_img)]
    seeds = np.array([image_seed(cfg.seed, 1, k, j) for k in range(len(splits.seed)) for j in range(n_img)])
    model = load_toy_model(base_model_dir)
    images = sample_images(model, prompts, seeds, cfg.sampling, progress=progress)
    scores = np.asarray(load_scorer(cfg.oracle)(images, prompts), dtype=np.float64)
    cols = _pair_rows(splits.seed, images, scores, seeds, cfg)
    rank = np.array(cols["_rank"])
    write_splits(paths.splits, splits)
    write_parquet(paths.seed, _to_table(cols, np.flatnonzero(rank < cfg.seed_pairs_per_prompt)))
    write_parquet(paths.full, _to_table(cols, np.arange(rank.size)))
    seed_cols = {k: [v[i] for i in np.flatnonzero(rank < cfg.seed_pairs_per_prompt)] for k, v in cols.items()}
    manifest = {
        "version": FORMAT_VERSION, "config": asdict(cfg), "base_model_sha256": model_fingerprint(base_model_dir),
        "base_model": str(base_model_dir),
        "files": {p.name: p.stat().st_size for p in (paths.splits, paths.seed, paths.full)},
        "counts": {name: len(v) for name, v in splits.named().items()} | {"seed_images": int(len(images))},
        "labels": {"seed": label_stats(seed_cols), "full": label_stats(cols)},
        "base_oracle_score": {"mean": float(scores.mean()), "std": float(scores.std())},
        "duration(s)": round(time.time() - start, 1),
    }
    write_json(paths.manifest, manifest)
    log.info("toy data in %s: %d seed pairs, %d full pairs (%.1f s)", paths.root, manifest["labels"]["seed"]["pairs"],
             manifest["labels"]["full"]["pairs"], manifest["duration(s)"])
    return paths


def ensure_toy_data(out_dir: str | os.PathLike, cfg: ToyWorldConfig, base_model_dir: str | os.PathLike,
                    progress: bool = False) -> ToyDataPaths:
    """Return the data folder's paths, building it first if it is absent, incomplete or stale
    (other config or base model). Idempotent and cheap when the folder is valid."""
    paths = ToyDataPaths.at(out_dir)
    reason = invalid_reason(paths, cfg, model_fingerprint(base_model_dir))
    if reason is None:
        return paths
    log.info("building toy data in %s: %s", paths.root, reason)
    return build_toy_data(out_dir, cfg, base_model_dir, progress=progress)


def describe(paths: ToyDataPaths) -> str:
    """One-paragraph summary of a data folder (for the CLI)."""
    m = read_json(paths.manifest)
    return json.dumps({"root": str(paths.root), "counts": m["counts"], "labels": m["labels"],
                       "base_oracle_score": m["base_oracle_score"]}, indent=2)
