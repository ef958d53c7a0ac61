"""Where ZeRO-3 keeps the frozen DPO reference (``distributed.reference``): a replica in the
compute dtype on every rank, or a second partitioned engine. The same losses and gradient norms
either way, and fewer all-gathers per step with the replica (the reference's share gone).

This file is also the 2-rank worker: ``deepspeed --num_gpus 2 tests/engine/test_reference_placement.py
--spec spec.json --out result.json`` trains the tiny UNet under ZeRO-3 for each run of the spec
(``placement_worker``) and rank 0 writes per step: the loss, the gradient norm and the
all-gathers DeepSpeed issued (calls and gathered bytes, all of them and those inside the
reference's forward).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:     # run as a script by the deepspeed launcher
    sys.path.insert(0, str(REPO))

from sail.engine.config import DistributedConfig, OptimizerConfig, TrainConfig  # noqa: E402
from sail.engine.configtree import ConfigError  # noqa: E402
from sail.engine.optim import deepspeed_config, reference_deepspeed_config  # noqa: E402
from sail.engine.strategy import choose_reference_placement  # noqa: E402
from tests.engine.test_optim import _free_port, fixed_batch, tiny_unet  # noqa: E402

needs_launcher = pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not installed")
GATHERS = ("all_gather", "all_gather_into_tensor", "all_gather_base", "all_gather_coalesced")
# the tiny UNet's tensors are all below DeepSpeed's default persistence threshold (1e5 elements),
# so without this nothing of it would be partitioned (nor gathered)
PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


# ------------------------------------------------------------------------------------------------
# The decision and the reference engine's config (pure functions)
# ------------------------------------------------------------------------------------------------

def test_auto_replicates_what_fits_the_budget():
    gib = 2 ** 30
    auto = DistributedConfig(zero_stage=3, reference_memory_fraction=0.15)
    sdxl_bf16 = 2_567_463_684 * 2                      # the SDXL UNet's parameters x 2 bytes
    placement, why = choose_reference_placement(auto, sdxl_bf16, 80 * gib)
    assert placement == "replicated" and "fit" in why and "0.15" in why, why
    placement, why = choose_reference_placement(auto, sdxl_bf16, 24 * gib)
    assert placement == "partitioned" and "exceed" in why, why
    assert choose_reference_placement(auto, int(0.15 * 32 * gib), 32 * gib)[0] == "replicated"     # the edge fits
    assert choose_reference_placement(auto, int(0.15 * 32 * gib) + 1, 32 * gib)[0] == "partitioned"
    for forced in ("replicated", "partitioned"):
        dist = DistributedConfig(zero_stage=3, reference=forced)
        assert choose_reference_placement(dist, sdxl_bf16, 24 * gib)[0] == forced
        assert choose_reference_placement(dist, 1, 80 * gib)[0] == forced


def test_reference_keys_are_validated_naming_the_key():
    from sail.engine.config import config_from_dict

    with pytest.raises(ConfigError, match=r"distributed\.reference: partitioned needs zero_stage 3"):
        config_from_dict({"distributed": {"zero_stage": 2, "reference": "partitioned"}})
    with pytest.raises(ConfigError, match=r"distributed\.reference_memory_fraction: must be in \(0, 1\]"):
        config_from_dict({"distributed": {"zero_stage": 3, "reference_memory_fraction": 0}})
    with pytest.raises(ConfigError, match=r"distributed\.reference"):
        config_from_dict({"distributed": {"zero_stage": 3, "reference": "sharded"}})
    config_from_dict({"distributed": {"zero_stage": 3, "reference": "partitioned"}})


def test_the_partitioned_reference_is_partitioned_like_the_policy():
    """The passthrough's parameter knobs reach the reference engine; optimizer ones do not."""
    passthrough = {"zero_optimization": {"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 7,
                                         "offload_param": {"device": "cpu"}, "reduce_bucket_size": 5}}
    train = TrainConfig(optimizer=OptimizerConfig(name="adamw"))
    policy = deepspeed_config(train, DistributedConfig(zero_stage=3, deepspeed=passthrough, offload_optimizer=True),
                              world_size=2, precision="bf16", on_cpu=True)
    zero = reference_deepspeed_config(policy)["zero_optimization"]
    assert zero == {"stage": 3, "offload_param": {"device": "cpu"}, "overlap_comm": False,
                    "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 7}
    assert "optimizer" not in reference_deepspeed_config(policy)


# ------------------------------------------------------------------------------------------------
# The 2-rank worker
# ------------------------------------------------------------------------------------------------

class GatherCounter:
    """Counts the all-gathers DeepSpeed's communication backend issues (every ZeRO-3 parameter
    fetch goes through ``deepspeed.comm``'s backend object): calls and gathered bytes."""

    def __init__(self, backend):
        self.calls, self.bytes = 0, 0
        for name in GATHERS:
            if hasattr(backend, name):
                setattr(backend, name, self._counted(getattr(backend, name)))

    def _counted(self, fn):
        def wrapper(*args, **kwargs):
            named = [kwargs[k] for k in ("output_tensor", "tensor_list", "output_tensors") if k in kwargs]
            out = named[0] if named else args[0]
            tensors = out if isinstance(out, (list, tuple)) else [out]
            self.calls += 1
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            return fn(*args, **kwargs)
        return wrapper

    def read(self) -> tuple[int, int]:
        return self.calls, self.bytes


def _round_to_bf16(module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def placement_worker(spec: dict) -> dict:
    """Each run: {reference, precision, steps, fraction, round_init}; returns per step the loss,
    gradient norm, all-gathers (calls, bytes) of the step and of the reference's forward, and the
    placement the strategy chose."""
    import deepspeed.comm.comm as ds_comm
    from diffusers import DDPMScheduler

    from sail.engine.strategy import DeepSpeedStrategy
    from sail.engine.trainer import dpo_forward

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    results, counter = [], None
    for run in spec["runs"]:
        train = TrainConfig(beta=500.0, steps=run["steps"], micro_batch_pairs=1, clip_grad_norm=1.0,
                            precision=run["precision"], optimizer=OptimizerConfig(name="adamw", lr=3e-5, eps=1e-6))
        dist = DistributedConfig(backend="deepspeed", zero_stage=3, reference=run["reference"],
                                 reference_memory_fraction=run.get("fraction", 0.15), deepspeed=PARTITION_ALL)
        strategy = DeepSpeedStrategy(train, dist)
        counter = counter or GatherCounter(ds_comm.cdb)
        policy, reference = tiny_unet(), tiny_unet()
        if run.get("round_init"):       # what a model folder saved in bf16 holds
            _round_to_bf16(policy)
            _round_to_bf16(reference)
        strategy.prepare(policy, reference, run["steps"], strategy.world_size)
        in_reference, start = [0, 0], [0, 0]

        def entered(*_):
            start[:] = counter.read()

        def left(*_):
            in_reference[:] = [n + now - s for n, now, s in zip(in_reference, counter.read(), start)]

        strategy.reference.register_forward_pre_hook(entered)
        strategy.reference.register_forward_hook(left)
        batch, t, noise = fixed_batch(strategy.rank)
        empty = torch.zeros(1, dtype=torch.bool)
        steps = []
        for _ in range(run["steps"]):
            before, in_reference[:] = counter.read(), [0, 0]
            out = dpo_forward(strategy, sched, batch, t, noise, empty, torch.zeros(1, 16, 32), None, train.beta)
            strategy.backward(out.loss)
            strategy.step()
            after = counter.read()
            steps.append({"loss": float(strategy.all_reduce_mean(out.loss.detach().float())),
                          "grad_norm": float(strategy.grad_norm()),
                          "gathers": after[0] - before[0], "gathered_bytes": after[1] - before[1],
                          "reference_gathers": in_reference[0], "reference_gathered_bytes": in_reference[1]})
        results.append(dict(run, placement=strategy.reference_placement, steps=steps,
                            reference_class=type(strategy.reference).__name__,
                            reference_dtype=str(next(strategy.reference.parameters()).dtype),
                            reference_numel=sum(p.numel() for p in tiny_unet().parameters()),
                            reference_tensors=len(list(tiny_unet().parameters()))))
        strategy.close()
    return {"world_size": strategy.world_size, "results": results}


def launch_placement_worker(tmp_path: Path, runs: list[dict], nprocs: int = 2, timeout: int = 900) -> dict:
    from tests.engine.test_optim import launch_zero_worker

    return launch_zero_worker(tmp_path, runs, nprocs, timeout, script=Path(__file__).resolve())


@pytest.mark.slow
@needs_launcher
def test_a_replicated_reference_gives_the_same_steps_with_fewer_gathers(tmp_path):
    runs = [dict(reference="partitioned", precision="fp32", steps=3),
            dict(reference="auto", precision="fp32", steps=3),              # fits a CPU host: replicated
            dict(reference="partitioned", precision="bf16", steps=3),
            dict(reference="replicated", precision="bf16", steps=3),
            dict(reference="replicated", precision="bf16", steps=3, round_init=True),
            dict(reference="auto", precision="bf16", steps=1, fraction=1e-9)]  # over the budget
    out = launch_placement_worker(tmp_path, runs)
    assert out["world_size"] == 2
    part32, repl32, part16, repl16, rounded16, tight = out["results"]
    assert [r["placement"] for r in out["results"]] == ["partitioned", "replicated", "partitioned", "replicated",
                                                        "replicated", "partitioned"]
    assert repl16["reference_class"] == "UNet2DConditionModel" and repl16["reference_dtype"] == "torch.bfloat16"
    assert part16["reference_class"] == "DeepSpeedEngine"
    for part, repl, itemsize in ((part32, repl32, 4), (part16, repl16, 2)):
        # the same weights in the same dtype: the same losses and gradient norms, to the bit
        assert [s["loss"] for s in repl["steps"]] == [s["loss"] for s in part["steps"]]
        assert [s["grad_norm"] for s in repl["steps"]] == [s["grad_norm"] for s in part["steps"]]
        assert part["steps"][-1]["loss"] < part["steps"][0]["loss"]           # it trains
        # the partitioned reference gathers its whole UNet once per forward (ZeRO pads each
        # tensor to a multiple of the world size: fewer than 2 extra elements per tensor)
        lo, hi = part["reference_numel"] * itemsize, (part["reference_numel"] + part["reference_tensors"]) * itemsize
        for p, r in zip(part["steps"], repl["steps"]):
            assert p["reference_gathers"] > 0 and lo <= p["reference_gathered_bytes"] <= hi, (p, lo, hi)
            assert r["reference_gathers"] == 0 and r["reference_gathered_bytes"] == 0, r
            # and that share is all the difference: the policy's gathers are the same
            assert r["gathers"] == p["gathers"] - p["reference_gathers"], (p, r)
            assert r["gathered_bytes"] == p["gathered_bytes"] - p["reference_gathered_bytes"], (p, r)
    # DeepSpeed bf16 casts the module it is given: fp32 weights and their bf16 rounding (a model
    # folder saved with train.save_precision: train) start the same training
    assert rounded16["steps"] == repl16["steps"]
    print(json.dumps({r["reference"] + "/" + r["precision"]: [(s["gathers"], s["gathered_bytes"]) for s in r["steps"]]
                      for r in out["results"][:4]}))


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = placement_worker(json.loads(Path(args.spec).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    _main()
