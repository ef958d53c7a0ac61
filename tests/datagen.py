"""Small Pick-a-Pic v2 shards made in code for tests (random images, chosen labels), tiny
models, one-call runs, a test oracle, and clean copies of the checkout."""
from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png_bytes(rng: np.random.Generator, size=(24, 20)) -> bytes:
    arr = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def pickapic_rows(n: int, seed: int = 0, size=(24, 20)) -> dict:
    """Columns of ``n`` valid rows: captions w<i> w<j>, labels alternating 1/0 and 0/1."""
    rng = np.random.default_rng(seed)
    label0 = [1.0 if i % 2 == 0 else 0.0 for i in range(n)]
    return {
        "caption": [f"w{i % 7} w{(3 * i) % 11}" for i in range(n)],
        "jpg_0": [png_bytes(rng, size) for _ in range(n)],
        "jpg_1": [png_bytes(rng, size) for _ in range(n)],
        "label_0": label0,
        "label_1": [1.0 - v for v in label0],
        "has_label": [True] * n,
        "are_different": [True] * n,
        "ranking_id": list(range(n)),
    }


def write_pickapic(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def make_tiny_model(folder, seed: int = 0):
    """Write a tiny random-weight toy model folder (the real architecture, fewer channels)."""
    import torch

    from sail.engine.toy.model import (ToyModelSpec, build_scheduler, build_text_encoder, build_tokenizer, build_unet,
                                       save_toy_model)

    spec = ToyModelSpec(unet_channels=(8, 16, 16), text_hidden=16, text_layers=1)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    return save_toy_model(folder, build_unet(spec), build_text_encoder(spec, len(tokenizer)), tokenizer,
                          build_scheduler())


def clean_copy(repo: Path, dest: Path) -> Path:
    """The checkout as a new clone would have it: tracked and new (not ignored) files only,
    no runs/, no build outputs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (repo / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, dest / name)
    return dest


def brightness_oracle(images, prompts=None):
    """A test oracle of another taste: the mean pixel value, in [0, 255]; the default oracle's
    scores lie in [-1, 0.72], so any score above 1 came from this one."""
    return np.asarray(images, dtype=np.float64).mean(axis=(1, 2, 3))


def run_dpo(cfg) -> Path:
    """Iteration 0 of a config (method dpo) in this process; returns the trained model folder."""
    from sail.engine.controller import Controller
    from sail.engine.layout import RunLayout

    Controller(cfg).run()
    return RunLayout.of(cfg).model(0)
