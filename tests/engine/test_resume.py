"""What a resume may change: the settings finished stages depend on, the world size of a
training checkpoint; ``--stage`` recomputes from scratch; refusals made before any work."""
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from sail.engine.config import config_from_dict, load_config
from sail.engine.configtree import ConfigError
from sail.engine.controller import FREE_KEYS, STAGE_TABLE, Controller, flat_settings, run_settings
from sail.engine.data.pickapic import DataError
from sail.engine.manifest import Manifest
from tests.engine.test_controller import mini_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory, toy_model):
    """A finished mini SAIL run (iteration 0 + 1), copied per test."""
    root = tmp_path_factory.mktemp("finished")
    Controller(config_from_dict(mini_config(root, toy_model, chunk_prompts=2))).run()
    return root


def _copy(finished, tmp_path):
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path / "run"


def _config(root, toy_model, finished=None, **changes):
    data = mini_config(root, toy_model, chunk_prompts=2)
    if finished is not None:             # the finished run's data: the same data.train paths
        data["toy"]["data_dir"] = str(finished / "toy_data")
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config_from_dict(data)


def test_every_config_key_is_a_stage_dependency_or_declared_free():
    """A field added to the config must be classified before it ships: else a resume that
    changes it would pass unnoticed (or be refused for nothing)."""
    for name in ("toy_cpu.json", "sdxl_zero3.json", "sd15_sspo.json"):
        keys = run_settings(load_config(name, []), 1)
        prefixes = set(FREE_KEYS) | {k for st in STAGE_TABLE.values() for k in st.depends + st.iteration_depends}
        loose = [k for k in keys if not any(k == p or k.startswith(p + ".") for p in prefixes)]
        assert not loose, f"{name}: keys neither a stage's dependency nor in FREE_KEYS: {loose}"


def test_a_resume_with_changed_settings_is_refused_naming_keys_and_stage(finished, tmp_path, toy_model):
    run = _copy(finished, tmp_path)
    before = json.loads((run / "manifest.json").read_text())
    cases = [({"sail__rank_draws": 3}, "the rank stage of iteration 1", "sail.rank_draws (2 -> 3)"),
             ({"train__beta": 700}, "the train stage of iteration 0", "train.beta (500.0 -> 700.0)"),
             ({"sail__alpha": 0.5}, "the mix stage of iteration 1", "sail.alpha (0.25 -> 0.5)"),
             ({"eval__seeds_per_prompt": 3}, "the evaluate stage of iteration -1", "eval.seeds_per_prompt (2 -> 3)")]
    for change, stage, key in cases:
        with pytest.raises(ConfigError) as err:
            Controller(_config(tmp_path, toy_model, finished, **change)).run()
        assert stage in str(err.value) and key in str(err.value) and "--stage" in str(err.value)
    # a key no stage depends on, and the global batch factored differently: the run resumes
    Controller(_config(tmp_path, toy_model, finished, train__log_every=2, train__micro_batch_pairs=1,
                       train__grad_accum=2)).run()
    assert json.loads((run / "manifest.json").read_text())["stages"] == before["stages"]     # nothing re-ran


def test_stage_recomputes_from_scratch_and_invalidates_what_follows(finished, tmp_path, toy_model):
    run = _copy(finished, tmp_path)
    cfg = _config(tmp_path, toy_model, finished, sail__rank_draws=3)
    Controller(cfg).run(stage="rank", iteration=1)
    manifest = Manifest(run)
    assert manifest.done(1, "rank") and manifest.done(1, "generate") and manifest.done(0, "train")
    for name in ("pair", "mix", "train", "evaluate"):
        assert not manifest.done(1, name)
    assert not (run / "iter_001" / "pairs.parquet").exists() and not (run / "iter_001" / "model").exists()
    assert (run / "iter_000" / "model").is_dir() and (run / "iter_001" / "candidates" / "index.parquet").is_file()
    assert all(len(d) == 3 for d in pq.read_table(run / "iter_001" / "rewards.parquet").column("draws").to_pylist())
    Controller(cfg).run()                                    # the rest, with the new settings
    assert Manifest(run).done(1, "evaluate") and (run / "iter_001" / "pairs.parquet").is_file()


def test_an_evaluation_is_recomputed_alone(finished, tmp_path, toy_model):
    run = _copy(finished, tmp_path)
    Controller(_config(tmp_path, toy_model, finished, eval__seeds_per_prompt=3)).run(stage="evaluate", iteration=0)
    manifest = Manifest(run)
    assert all(manifest.done(i, n) for i, n in ((0, "evaluate"), (1, "train"), (1, "evaluate")))
    assert json.loads((run / "iter_000" / "eval" / "metrics.json").read_text())["n_images"] == 3 * 3


def test_a_half_done_stage_resumes_only_with_its_settings(finished, tmp_path, toy_model):
    """A stage killed half-way left chunks made with chunk_prompts 2: resuming it with 1 would
    mix chunkings; the start note catches it."""
    run = _copy(finished, tmp_path)
    manifest = Manifest(run)
    began = manifest.started(1, "generate")["settings"]
    manifest.forget([(1, n) for n in ("generate", "rank", "pair", "mix", "train", "evaluate")])
    manifest.start(1, "generate", began)
    with pytest.raises(ConfigError, match=r"generate stage of iteration 1 .*sail.chunk_prompts \(2 -> 1\)"):
        Controller(_config(tmp_path, toy_model, finished, sail__chunk_prompts=1)).run()


def test_a_training_checkpoint_of_another_world_size_is_refused(finished, tmp_path, toy_model):
    run = _copy(finished, tmp_path)
    Manifest(run).forget([(1, "train"), (1, "evaluate")])
    ckpt = run / "iter_001" / "checkpoints"
    ckpt.mkdir()
    (ckpt / "latest.json").write_text(json.dumps({"tag": "step_1", "backend": "deepspeed", "world_size": 3,
                                                  "zero_stage": 3}))
    with pytest.raises(ConfigError, match=r"checkpointed at step_1 with backend deepspeed, world_size 3; this run "
                                          r"has backend local, world_size 1\. Resume it with the same settings"):
        Controller(_config(tmp_path, toy_model, finished)).run()


def test_resolution_other_than_native_is_refused_before_any_work(tmp_path, toy_model):
    data = mini_config(tmp_path, toy_model)
    data["data"]["resolution"] = 32
    with pytest.raises(ConfigError, match=r"data.resolution: 32 px, but the model .* native 16 px"):
        Controller(config_from_dict(data))
    assert not (tmp_path / "run" / "iter_000").exists()


def test_anchor_ranking_reference_is_refused(tmp_path, toy_model):
    with pytest.raises(ConfigError, match=r"sail.rank_reference: anchor .* ranked at iteration 1"):
        Controller(config_from_dict(mini_config(tmp_path, toy_model, rank_reference="anchor")))


def test_chunks_that_overlap_are_refused_at_the_merge(finished, tmp_path):
    from sail.engine.sail import _merge_candidates

    run = _copy(finished, tmp_path)
    cand = run / "iter_001" / "candidates"
    prompts = json.loads((cand / "prompts.json").read_text())
    _merge_candidates(cand, prompts, 3)                                   # as written: fine
    shutil.copy(cand / "prompts_000000-000002.safetensors", cand / "prompts_000001-000003.safetensors")
    with pytest.raises(DataError, match=r"do not cover every prompt exactly once \(0 missing, .*; 6 repeated\)"):
        _merge_candidates(cand, prompts, 3)
    (cand / "prompts_000001-000003.safetensors").unlink()
    (cand / "prompts_000002-000004.safetensors").unlink()
    with pytest.raises(DataError, match=r"\(6 missing, e.g. \[\(2, 0\)\]; 0 repeated\)"):
        _merge_candidates(cand, prompts, 3)


def test_one_process_ranks_issue_no_collective(monkeypatch):
    """rank 0 of a group evaluating through a one-process ``Ranks`` must not meet the other
    ranks' collectives with barriers of its own (the first-evaluation hang)."""
    from sail.engine.ranks import single_process

    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: calls.append("barrier"))
    ranks = single_process()
    ranks.barrier()
    assert ranks.broadcast_object(5) == 5 and ranks.all_gather_object(5) == [5]
    assert ranks.agreed(lambda: 7) == 7
    assert calls == []


def test_flat_settings_keep_user_dicts_whole():
    tree = {"a": {"b": 1, "c": {"d": [1, 2]}}, "distributed": {"deepspeed": {"x": 1}}, "e": {}}
    assert flat_settings(tree) == {"a.b": 1, "a.c.d": [1, 2], "distributed.deepspeed": {"x": 1}, "e": {}}


def _agree_on_three_ranks(rank: int, store: str, out: str) -> None:
    import datetime

    from sail.engine.errors import InputError
    from sail.engine.ranks import Ranks

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3,
                                         timeout=datetime.timedelta(seconds=30))
    ranks = Ranks(rank, 3, torch.device("cpu"), "deepspeed")

    def work():
        if rank == 1:
            raise DataError("data.train: shard 1: no decodable pair")
        return rank * 10

    seen = {"fine": ranks.agreed(lambda: rank)}
    try:
        ranks.agreed(lambda: ranks.agreed(work))          # nested: passes the outer call as is
    except InputError as err:
        seen.update(type=type(err).__name__, message=str(err), reported=getattr(err, "reported", False))
    torch.distributed.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps(seen))


def test_an_input_error_on_one_rank_is_raised_on_every_rank(tmp_path, capfd):
    """Three gloo processes: rank 1 alone raises; every rank raises the same message (rank 1
    its own DataError), none waits for a collective that never comes, rank 0 prints it once."""
    import torch.multiprocessing as mp

    mp.spawn(_agree_on_three_ranks, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=3, join=True)
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(3)]
    assert [s["fine"] for s in seen] == [0, 1, 2]
    assert [s["type"] for s in seen] == ["AgreedInputError", "DataError", "AgreedInputError"]
    assert {s["message"] for s in seen} == {"data.train: shard 1: no decodable pair"}
    assert all(s["reported"] for s in seen)
    assert capfd.readouterr().err.count("Error: data.train: shard 1: no decodable pair") == 1


def test_prompt_sets_count_by_content_so_a_run_can_be_extended():
    """One more prompt file (sail.iterations + 1) leaves every finished stage's settings as
    they were; an edited pool changes only its own generate stage's."""
    from sail.engine.controller import Plan, prompt_digests, stage_settings

    cfg = load_config("sd15_sail.json", [])
    short, longer = Plan("m", [["a", "b"], ["c"]], ["e"]), Plan("m", [["a", "b"], ["c"], ["d"]], ["e"])
    edited = Plan("m", [["a", "b"], ["c2"]], ["e"])
    settings = {}
    for name, plan in (("short", short), ("longer", longer), ("edited", edited)):
        settings[name] = {**run_settings(cfg, 1), **prompt_digests(plan)}
    settings["longer"]["sail.prompt_files"] = ["p1", "p2", "p3"]
    for i, stage in [(0, "encode"), (0, "train"), (1, "generate"), (2, "generate"), (2, "rank"), (2, "evaluate")]:
        same = stage_settings(settings["short"], STAGE_TABLE[stage], i)
        assert same == stage_settings(settings["longer"], STAGE_TABLE[stage], i), (i, stage)
    changed = [(i, stage) for i, stage in [(1, "generate"), (2, "generate"), (2, "rank")]
               if stage_settings(settings["short"], STAGE_TABLE[stage], i)
               != stage_settings(settings["edited"], STAGE_TABLE[stage], i)]
    assert changed == [(2, "generate")]
