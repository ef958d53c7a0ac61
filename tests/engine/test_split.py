"""The paper's data recipe from Pick-a-Pic shards (engine/data/split.py) and a SAIL run on it."""
import json
import signal
import sys

import pyarrow.parquet as pq
import pytest
import torch

from sail.engine.config import config_from_dict
from sail.engine.configtree import ConfigError
from sail.engine.controller import Controller
from sail.engine.data.cache import PairCache
from sail.engine.data.pickapic import scan_pickapic
from sail.engine.data.split import PickapicConfig, make_split
from tests.datagen import pickapic_rows, write_pickapic
from tests.engine.test_controller import _launch, _weights


def recipe_shard(tmp_path, n: int = 120, seed: int = 0) -> str:
    """A Pick-a-Pic-schema shard: 40 captions, each in 3 rows; every 10th row a tie."""
    cols = pickapic_rows(n, seed=seed, size=(16, 16))
    cols["caption"] = [f"prompt {i % 40}" for i in range(n)]
    for i in range(0, n, 10):
        cols["label_0"][i] = cols["label_1"][i] = 0.5
    return write_pickapic(tmp_path / "train-0.parquet", cols)


def test_split_sizes_disjointness_and_determinism(tmp_path):
    refs, report = scan_pickapic([recipe_shard(tmp_path)])
    assert report.ties == 12 and len(refs) == 108
    settings = PickapicConfig(seed_pairs=12, pool_sizes=[5, 6], eval_prompts=4)
    split = make_split(refs, settings, iterations=2, seed=3)
    r = split.report(refs)
    assert (r["seed_pairs"], r["pool_sizes"], r["eval_prompts"]) == (12, [5, 6], 4)
    assert all(v == 0 for v in r["overlaps"].values()) and len(r["overlaps"]) == 6
    seed_prompts = {refs[i].caption for i in split.seed_rows}
    for pool in split.pools:
        assert len(set(pool)) == len(pool) and not set(pool) & seed_prompts     # de-duplicated, held apart
    assert make_split(refs, settings, 2, seed=3) == split                       # a function of the seed
    assert make_split(refs, settings, 2, seed=4).seed_rows != split.seed_rows
    given = make_split(refs, settings, 2, seed=3, eval_prompts=["prompt 1", "prompt 2"])
    assert given.eval_prompts == ["prompt 1", "prompt 2"]
    assert not {"prompt 1", "prompt 2"} & ({refs[i].caption for i in given.seed_rows} | set(sum(given.pools, [])))
    with pytest.raises(ConfigError, match=r"pickapic.pool_sizes: 60 pool prompts asked"):
        make_split(refs, PickapicConfig(seed_pairs=12, pool_sizes=[30, 30]), 2, seed=3)
    with pytest.raises(ConfigError, match=r"pickapic.seed_pairs: 500 seed pairs asked, data.train keeps 108 pairs outside"):
        make_split(refs, PickapicConfig(seed_pairs=500, pool_sizes=[1]), 1, seed=3)
    with pytest.raises(ConfigError, match=r"2 SAIL iterations need 2 pool sizes"):
        make_split(refs, PickapicConfig(seed_pairs=5, pool_sizes=[1]), 2, seed=3)


def recipe_config(root, shard: str) -> dict:
    return {"name": "recipe", "method": "sail", "seed": 0, "run_dir": str(root / "run"),
            "model": {"arch": "tiny-sd15"},
            "data": {"train": [shard], "resolution": 32, "encode_batch_size": 8, "random_flip": False},
            "pickapic": {"seed_pairs": 24, "pool_sizes": [4], "eval_prompts": 3},
            "train": {"beta": 500, "steps": 2, "micro_batch_pairs": 2, "log_every": 1, "save_every": 1,
                      "optimizer": {"lr": 1e-4}},
            "distributed": {"backend": "local"},
            "sail": {"iterations": 1, "candidates": 2, "rank_draws": 2, "sampling": {"steps": 2, "batch_size": 8},
                     "rank_batch_size": 8, "train_steps": 2},
            "eval": {"enabled": False}}


def test_sail_on_the_recipe_split_resumes_after_a_kill_in_generate(tmp_path, one_thread):
    shard = recipe_shard(tmp_path)
    Controller(config_from_dict(recipe_config(tmp_path / "a", shard))).run()
    run = tmp_path / "a" / "run"
    split = pq.read_table(run / "split.parquet").to_pydict()
    meta = json.loads((run / "split.json").read_text())
    assert (meta["seed_pairs"], meta["pool_sizes"], meta["eval_prompts"]) == (24, [4], 3)
    assert all(v == 0 for v in meta["overlaps"].values())
    assert len(PairCache(run / "cache" / "seed")) == 24                          # only the seed rows encoded
    cands = json.loads((run / "iter_001" / "candidates" / "prompts.json").read_text())
    assert sorted(cands) == sorted(c for c, r in zip(split["caption"], split["role"]) if r == "pool_1")

    cfg_path = tmp_path / "b.json"
    cfg_path.write_text(json.dumps(recipe_config(tmp_path / "b", shard)))
    proc = _launch(cfg_path, "generate", extra=[sys.executable])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    proc = _launch(cfg_path, None, extra=[sys.executable])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(run, 1), _weights(tmp_path / "b" / "run", 1)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-5)
    # the written split is checked on resume: other settings are refused, not silently re-split
    changed = recipe_config(tmp_path / "b", shard)
    changed["pickapic"]["seed_pairs"] = 20
    with pytest.raises(ConfigError, match="split of this run was made from other data.train files or pickapic"):
        Controller(config_from_dict(changed))


def test_sdxl_sail_iteration_writes_pairs_with_time_ids(tmp_path, one_thread):
    """SDXL conditioning through a whole SAIL iteration in one process (pooled embeddings, the
    generated pairs' time ids: two separate tensors, as safetensors requires)."""
    data = recipe_config(tmp_path, recipe_shard(tmp_path))
    data["model"] = {"arch": "tiny-sdxl"}
    data["sail"]["precision"] = "bf16"              # generate and rank in bf16, as on a GPU
    Controller(config_from_dict(data)).run()
    gen = PairCache(tmp_path / "run" / "iter_001" / "pairs_cache").load([0, 1, 2, 3])
    assert gen.pooled is not None and gen.time_ids_w.shape == (4, 6)
    assert torch.equal(gen.time_ids_w, gen.time_ids_l) and gen.time_ids_w[0, 0] == 32     # native 32 px
    rewards = pq.read_table(tmp_path / "run" / "iter_001" / "rewards.parquet").to_pydict()["reward"]
    assert len(rewards) == 8 and all(r == r for r in rewards) and len(set(rewards)) > 1    # finite, distinct


def test_recipe_and_prompt_files_are_exclusive(tmp_path):
    from sail.engine.run import preflight

    data = recipe_config(tmp_path, recipe_shard(tmp_path))
    data["sail"]["prompt_files"] = [str(tmp_path / "p.txt")]
    with pytest.raises(ConfigError, match="give prompt files or the recipe, not both"):
        preflight(config_from_dict(data))


def tiny_sdxl_folder(folder) -> str:
    """A random-weight tiny SDXL (two text encoders, pooled embeddings, time ids) in the
    diffusers folder layout, as a user's model.path would be."""
    from sail.engine.models import build_components, save_model_folder

    comps = build_components("tiny-sdxl", seed=0)
    save_model_folder(folder, None, dict(comps.unet.config), comps, source=None)
    comps.unet.save_pretrained(folder / "unet", safe_serialization=True)
    return str(folder)
