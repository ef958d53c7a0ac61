"""``sail evaluate`` end to end on CPU: a tiny random SD1.5 and its baseline, random-weight
scorers in their real formats, the three benchmark formats; and a toy model with the toy
world's ground truth through the same path."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tests.engine.evaluation.conftest import save_clip_folder
from tests.engine.evaluation.test_eval_prompts import write_hps, write_parti

SCORERS = "pickscore,hpsv2,aesthetic,clip"


def _tiny_sd15(folder, seed):
    from sail.engine.models import build_components, save_model_folder

    comps = build_components("tiny-sd15", seed=seed)
    save_model_folder(folder, None, dict(comps.unet.config), comps, source=None)
    return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("evaluate")
    models = {name: _tiny_sd15(root / name, seed) for name, seed in (("sd15_base", 0), ("sd15_sail", 1))}
    clip = save_clip_folder(root / "clip")
    torch.save({"state_dict": _openclip_state(root)}, root / "hps.pt")
    head = {f"layers.{i}.{k}": v for i, (o, n) in zip((0, 2, 4, 6, 7), [(1024, 16), (128, 1024), (64, 128), (16, 64), (1, 16)])
            for k, v in (("weight", torch.randn(o, n) / n ** 0.5), ("bias", torch.zeros(o)))}
    torch.save(head, root / "aesthetic.pth")
    pq.write_table(pa.table({"caption": ["w1 w2", "w3", "w1 w2", "w4 w5 w6"]}), root / "validation_unique.parquet")
    config = {"eval": {
        "benchmarks": {"pickapic": str(root / "validation_unique.parquet"),
                       "parti": write_parti(root / "parti.tsv", [["w7 w8", "Animals", "", ""], ["w9", "People", "", ""],
                                                                 ["w10 w11", "Animals", "", ""]]),
                       "hpsv2": write_hps(root / "hps", per_style=1)},
        "scorers": {"pickscore": {"weights": clip, "batch_size": 2}, "clip": {"weights": clip},
                    "hpsv2": {"weights": str(root / "hps.pt"), "backbone": clip},
                    "aesthetic": {"weights": str(root / "aesthetic.pth"), "backbone": clip}},
        "sampling": {"sampler": "ddim", "steps": 2, "guidance_scale": 3.0, "batch_size": 3},
        "chunk_images": 2}}
    (root / "eval.json").write_text(json.dumps(config))
    return root, models


def _openclip_state(root):
    from tests.engine.evaluation.test_eval_scorers import OpenClipReference

    torch.manual_seed(7)
    return OpenClipReference().state_dict()


def _run(args):
    from sail.launch.evaluate import main

    return CliRunner().invoke(main, args + ["--no-progress"], catch_exceptions=False)


def test_sail_evaluate_end_to_end(setup):
    root, models = setup
    out = root / "out"
    result = _run(["--model", models["sd15_sail"], "--baseline", models["sd15_base"], "--config", str(root / "eval.json"),
                   "--scorers", SCORERS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "table.json").read_text())
    scores = pq.read_table(out / "scores.parquet").to_pydict()
    assert table["models"] == ["sd15_sail", "sd15_base"] and table["images"] == 2 * (3 + 3 + 4)
    assert len(scores["model"]) == 20 and set(scores["benchmark"]) == {"pickapic", "parti", "hpsv2"}

    rows = [i for i, (m, b) in enumerate(zip(scores["model"], scores["benchmark"])) if (m, b) == ("sd15_sail", "parti")]
    base_rows = [i for i, (m, b) in enumerate(zip(scores["model"], scores["benchmark"])) if (m, b) == ("sd15_base", "parti")]
    assert [scores["seed"][i] for i in rows] == [scores["seed"][i] for i in base_rows]   # same seeds per model
    for scorer in SCORERS.split(","):
        ours = np.array([scores[scorer][i] for i in rows])
        base = np.array([scores[scorer][i] for i in base_rows])
        cell = table["benchmarks"]["parti"][scorer]["sd15_sail"]
        assert cell["mean"] == pytest.approx(ours.mean()) and cell["lo"] <= cell["mean"] <= cell["hi"] and cell["n"] == 3
        want = np.where(ours > base, 1.0, np.where(ours == base, 0.5, 0.0)).mean()
        assert table["win_rate"]["parti"][scorer]["sd15_sail"]["mean"] == pytest.approx(want)
    animals = [scores["pickscore"][i] for i in rows if scores["category"][i] == "Animals"]
    assert table["categories"]["parti"]["pickscore"]["Animals"]["sd15_sail"]["mean"] == pytest.approx(np.mean(animals))
    assert list(table["categories"]["hpsv2"]["hpsv2"]) == ["anime", "concept-art", "paintings", "photo"]

    # the stored scores are the scores of the stored images (rescored here, another batch size)
    from sail.engine.config import ScorerSpec
    from sail.engine.evaluation.scorers import load_pickscore

    images = np.stack([np.asarray(Image.open(out / scores["image"][i])) for i in rows])
    again = load_pickscore(ScorerSpec(weights=str(root / "clip"), batch_size=3), torch.device("cpu")).score(
        images, [scores["prompt"][i] for i in rows])
    np.testing.assert_allclose(again, [scores["pickscore"][i] for i in rows], rtol=1e-6)
    assert images.shape == (3, 32, 32, 3) and np.ptp(images) > 0

    md = (out / "table.md").read_text()
    assert "## hpsv2 (4 prompts)" in md and "| model | pickscore | hpsv2 | aesthetic | clip |" in md
    assert "### hpsv2, hpsv2 by category" in md and "| model | anime | concept-art | paintings | photo | all |" in md
    assert "## Win rate against sd15_base" in md
    for name in ("grid_pickapic.png", "grid_parti.png", "grid_hpsv2.png", "scores_vs_model.png"):
        assert (out / name).is_file()

    # resumable: a lost chunk is made again, the others are not touched, the table is the same
    assert len(list((out / "sd15_sail" / "hpsv2" / "chunks").glob("*.parquet"))) == 2     # 4 prompts, 2 a chunk
    chunk = out / "sd15_sail" / "parti" / "chunks" / "00001.parquet"
    other = out / "sd15_base" / "hpsv2" / "chunks" / "00000.parquet"
    stamp = other.stat().st_mtime_ns
    chunk.unlink()
    assert _run(["--model", models["sd15_sail"], "--baseline", models["sd15_base"], "--config", str(root / "eval.json"),
                 "--scorers", SCORERS, "--out", str(out)]).exit_code == 0
    assert chunk.is_file() and other.stat().st_mtime_ns == stamp
    again_table = json.loads((out / "table.json").read_text())
    assert again_table["benchmarks"] == table["benchmarks"] and again_table["win_rate"] == table["win_rate"]


def test_bad_inputs_fail_before_any_generation(setup, tmp_path):
    root, models = setup
    r = _run(["--model", models["sd15_sail"], "--config", str(root / "eval.json"), "--scorers", "pickscore",
              "--set", f'scorers.pickscore.weights="{tmp_path / "missing"}"', "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "eval.scorers.pickscore.weights" in r.output and "does not exist" in r.output
    r = _run(["--model", models["sd15_sail"], "--config", str(root / "eval.json"), "--scorers", "imagereward",
              "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "eval.scorers.imagereward" in r.output   # no weights configured: named
    r = _run(["--model", models["sd15_sail"], "--config", str(root / "eval.json"), "--benchmarks", "parti",
              "--set", f'benchmarks.parti="{tmp_path / "none.tsv"}"', "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "parti: " in r.output and "cannot read TSV" in r.output
    assert not (tmp_path / "o").exists()


def test_toy_model_through_the_same_path(toy_model, tmp_path, one_thread):
    """A pixel-space toy model: the toy world's held-out prompts, oracle / fidelity per image and
    diversity per prompt; a run directory expands to its base and iterations."""
    from sail.engine.evaluation.harness import models_of
    from sail.engine.toy.scorers import world_scorer
    from sail.engine.toy.world import DEFAULT_ORACLE

    run = tmp_path / "run"
    shutil.copytree(toy_model, run / "iter_000" / "model")
    (run / "config.json").write_text(json.dumps({"model": {"path": toy_model}}))
    assert [(m.label, m.path) for m in models_of(str(run))] == [("base", toy_model),
                                                               ("iter_000", str(run / "iter_000" / "model"))]
    out = tmp_path / "out"
    r = _run(["--model", str(run), "--out", str(out), "--max-prompts", "3", "--set", "seeds_per_prompt=2",
              "--set", 'sampling={"steps": 2, "guidance_scale": 1.5, "batch_size": 8}'])
    assert r.exit_code == 0, r.output
    table = json.loads((out / "table.json").read_text())
    assert list(table["benchmarks"]["toy"]) == ["oracle", "fidelity", "diversity"]
    scores = pq.read_table(out / "scores.parquet").to_pydict()
    assert len(scores["model"]) == 2 * 3 * 2
    rows = [i for i, m in enumerate(scores["model"]) if m == "iter_000"]
    images = np.stack([np.asarray(Image.open(out / scores["image"][i])) for i in rows])
    oracle = world_scorer("oracle", DEFAULT_ORACLE)(images, [scores["prompt"][i] for i in rows])
    np.testing.assert_allclose(oracle, [scores["oracle"][i] for i in rows], atol=1e-12)
    # the same weights and seeds: base and iter_000 get the same numbers
    assert table["benchmarks"]["toy"]["oracle"]["base"] == table["benchmarks"]["toy"]["oracle"]["iter_000"]
    assert all(v > 0 for v in scores["diversity"])


def test_sail_run_evaluates_with_learned_scorers(setup, tmp_path, one_thread):
    """A real-model (pickapic world) SAIL run with eval.scorers: every iteration is scored on
    the held-out prompts and the benchmarks, and the report carries the scores."""
    from sail.engine.config import config_from_dict
    from sail.engine.controller import Controller
    from tests.engine.test_split import recipe_config, recipe_shard

    root, _ = setup
    data = recipe_config(tmp_path, recipe_shard(tmp_path))
    ev = json.loads((root / "eval.json").read_text())["eval"]
    data["eval"] = {"enabled": True, "benchmarks": {"parti": ev["benchmarks"]["parti"]}, "max_prompts": 2,
                    "scorers": {"pickscore": ev["scorers"]["pickscore"], "clip": ev["scorers"]["clip"]},
                    "sampling": ev["sampling"]}
    Controller(config_from_dict(data)).run()
    run = tmp_path / "run"
    for folder in (run / "base_eval", run / "iter_000" / "eval", run / "iter_001" / "eval"):
        metrics = json.loads((folder / "metrics.json").read_text())
        table = json.loads((folder / "table.json").read_text())
        assert metrics["heldout/pickscore/mean"] == table["benchmarks"]["heldout"]["pickscore"]["model"]["mean"]
        assert table["benchmarks"]["heldout"]["pickscore"]["model"]["n"] == 2      # eval.max_prompts
        assert metrics["parti/clip/lo"] <= metrics["parti/clip/mean"] <= metrics["parti/clip/hi"]
    report = (run / "report.md").read_text()
    assert "| heldout/clip | heldout/pickscore | parti/clip | parti/pickscore |" in report.splitlines()[4]
    base_m = json.loads((run / "base_eval" / "metrics.json").read_text())["heldout/pickscore/mean"]
    it1_m = json.loads((run / "iter_001" / "eval" / "metrics.json").read_text())["heldout/pickscore/mean"]
    assert f"{base_m:.4f}" in report and f"{it1_m:.4f}" in report and base_m != it1_m
    assert (run / "metrics.png").is_file()


def test_preflight_names_a_missing_scorer_weight(tmp_path):
    from sail.engine.config import config_from_dict
    from sail.engine.configtree import ConfigError
    from sail.engine.run import preflight
    from tests.engine.test_split import recipe_config, recipe_shard

    data = recipe_config(tmp_path, recipe_shard(tmp_path))
    data["eval"] = {"enabled": True, "scorers": {"hpsv2": {"weights": str(tmp_path / "HPS_v2.pt"), "backbone": "x"}}}
    with pytest.raises(ConfigError, match=r"eval.scorers.hpsv2.weights: .*HPS_v2.pt does not exist"):
        preflight(config_from_dict(data))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not installed")
def test_two_ranks_score_the_same_as_one_process(setup, tmp_path):
    """deepspeed --num_gpus 2 launch/evaluate.py: each rank a share of the chunks, the same rows."""
    import os
    import subprocess

    from tests.engine.test_controller import REPO

    root, models = setup
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    args = ["launch/evaluate.py", "--model", models["sd15_sail"], "--config", str(root / "eval.json"),
            "--scorers", "pickscore,hpsv2", "--benchmarks", "parti,hpsv2", "--no-progress"]
    tables = {}
    for name, launcher in (("one", [sys.executable]), ("two", ["deepspeed", "--num_gpus", "2", "--master_port", "29563"])):
        proc = subprocess.run([*launcher, *args, "--out", str(tmp_path / name)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        tables[name] = pq.read_table(tmp_path / name / "scores.parquet").to_pydict()
    one, two = tables["one"], tables["two"]
    assert (one["benchmark"], one["prompt_idx"], one["seed"]) == (two["benchmark"], two["prompt_idx"], two["seed"])
    for scorer in ("pickscore", "hpsv2"):
        np.testing.assert_allclose(one[scorer], two[scorer], rtol=1e-4, atol=1e-4)


def test_benchmark_prompts_in_a_pool_are_reported(setup, tmp_path, caplog):
    from sail.engine.config import config_from_dict
    from sail.engine.worlds import PickapicWorld
    from tests.engine.test_split import recipe_config, recipe_shard

    root, _ = setup
    data = recipe_config(tmp_path, recipe_shard(tmp_path))
    ev = json.loads((root / "eval.json").read_text())["eval"]
    data["eval"] = {"enabled": True, "benchmarks": {"parti": ev["benchmarks"]["parti"]},
                    "scorers": {"clip": ev["scorers"]["clip"]}}
    world = PickapicWorld(config_from_dict(data))
    with caplog.at_level("WARNING"):
        world._warn_benchmark_overlap([["a", "w9"], ["b"]])
    assert "eval.benchmarks.parti: 1 of its 3 evaluated prompts are also in a SAIL prompt pool (e.g. 'w9')" in caplog.text
