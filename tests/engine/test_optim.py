"""Optimizers locally and under DeepSpeed on 2 CPU ranks; the derived DeepSpeed settings; the
refusals: an optimizer whose update is not element-wise under ZeRO 1-3 (and why: its update
changes with the partition), bitsandbytes + optimizer offload.

This file is also the 2-rank worker: ``deepspeed --num_gpus 2 tests/engine/test_optim.py
--spec spec.json --out result.json`` trains tiny UNets on a fixed batch for each run of the
spec (see ``zero_worker``) and rank 0 writes the losses and optimizer-state facts; and, with
``--views`` instead of ``--spec``, the one-process probe of what DeepSpeed hands a client
optimizer (``optimizer_views``).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:     # run as a script by the deepspeed launcher
    sys.path.insert(0, str(REPO))

from sail.engine.config import DistributedConfig, LoRAConfig, OptimizerConfig, TrainConfig  # noqa: E402
from sail.engine.configtree import ConfigError  # noqa: E402
from sail.engine.optim import UPDATE_COUPLING, build_optimizer, deepspeed_config  # noqa: E402

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes not installed (pip install bitsandbytes)")
needs_launcher = pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not installed")


# ------------------------------------------------------------------------------------------------
# Fixed-batch training shared by the local tests and the 2-rank worker
# ------------------------------------------------------------------------------------------------

def tiny_unet(seed: int = 0):
    from sail.engine.models import _unet_config
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**_unet_config("tiny-sd15"))


def fixed_batch(rank: int, pairs: int = 1):
    """One rank's fixed pairs, timesteps and noise (different per rank, the same every step)."""
    from sail.engine.data.cache import PairBatch

    g = torch.Generator().manual_seed(100 + rank)
    batch = PairBatch(torch.randn(pairs, 4, 16, 16, generator=g), torch.randn(pairs, 4, 16, 16, generator=g),
                      torch.randn(pairs, 16, 32, generator=g))
    t = torch.randint(100, 900, (pairs,), generator=g)
    noise = torch.randn(pairs, 4, 16, 16, generator=g)
    return batch, t, noise


def train_fixed_batch(strategy, steps: int, beta: float, rank: int = 0, pairs: int = 1) -> list[float]:
    """``steps`` optimizer steps on one fixed batch; the loss of every step (mean over ranks)."""
    from diffusers import DDPMScheduler

    from sail.engine.trainer import dpo_forward

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    batch, t, noise = fixed_batch(rank, pairs)
    empty = torch.zeros(pairs, dtype=torch.bool)
    losses = []
    for _ in range(steps):
        out = dpo_forward(strategy, sched, batch, t, noise, empty, torch.zeros(1, 16, 32), None, beta)
        strategy.backward(out.loss)
        strategy.step()
        losses.append(float(strategy.all_reduce_mean(out.loss.detach().float())))
    return losses


def state_facts(optimizer) -> dict:
    """Dtypes and shapes of an optimizer's state tensors, by state name."""
    facts: dict = {}
    for state in optimizer.state.values():
        for name, value in state.items():
            if torch.is_tensor(value) and value.numel() > 1:
                facts.setdefault(name, {"dtypes": set(), "max_dim": 0})
                facts[name]["dtypes"].add(str(value.dtype).replace("torch.", ""))
                facts[name]["max_dim"] = max(facts[name]["max_dim"], value.dim())
    return {k: {"dtypes": sorted(v["dtypes"]), "max_dim": v["max_dim"]} for k, v in facts.items()}


# ------------------------------------------------------------------------------------------------
# The 2-rank worker
# ------------------------------------------------------------------------------------------------

def zero_worker(spec: dict) -> dict:
    """Runs under the deepspeed launcher. Each run: {optimizer, zero_stage, lr, steps, beta,
    checkpointing, lora_rank, precision}; returns losses, optimizer-state facts, and how many
    times the gradient-checkpointing function ran."""
    from sail.engine.lora import add_lora
    from sail.engine.strategy import DeepSpeedStrategy

    results = []
    for run in spec["runs"]:
        train = TrainConfig(beta=run["beta"], steps=run["steps"], micro_batch_pairs=1, clip_grad_norm=1.0,
                            precision=run.get("precision", "fp32"),
                            optimizer=OptimizerConfig(name=run["optimizer"], lr=run["lr"], eps=1e-6))
        dist = DistributedConfig(backend="deepspeed", zero_stage=run["zero_stage"])
        strategy = DeepSpeedStrategy(train, dist)
        policy = tiny_unet()
        reference = None
        if run.get("lora_rank", 0):
            add_lora(policy, LoRAConfig(rank=run["lora_rank"]))
        else:
            reference = tiny_unet()
        calls = [0]
        if run.get("checkpointing"):
            def counting_checkpoint(module, *args):
                calls[0] += 1
                return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
            policy.enable_gradient_checkpointing(counting_checkpoint)
        strategy.prepare(policy, reference, run["steps"], strategy.world_size)
        losses = train_fixed_batch(strategy, run["steps"], run["beta"], rank=strategy.rank)
        results.append(dict(run, losses=losses, checkpoint_calls=calls[0],
                            basic_optimizer=type(strategy.engine.basic_optimizer).__name__,
                            wrapper=type(strategy.engine.optimizer).__name__,
                            states=state_facts(strategy.engine.basic_optimizer)))
        # what closing the engine releases (the generate / rank stages run after it)
        watched = [weakref.ref(t) for t in [*strategy.engine.module.parameters(), *state_tensors(strategy)]]
        del policy, reference
        before = live_tensor_bytes()
        strategy.close()
        results[-1].update(bytes_before_close=before, bytes_after_close=live_tensor_bytes(),
                           watched=len(watched), alive_after_close=sum(w() is not None for w in watched))
        del watched
    return {"world_size": strategy.world_size, "results": results}


def state_tensors(strategy) -> list:
    """The tensors of the engine's optimizer state (ZeRO's flat partitions included)."""
    opt = strategy.engine.optimizer
    out = [v for st in strategy.engine.basic_optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        out += [t for t in getattr(opt, name, []) if torch.is_tensor(t)]
    return out


def live_tensor_bytes() -> int:
    """Bytes of the distinct tensor storages alive in the process (after a garbage collection)."""
    import gc

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen and storage.nbytes():
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except (RuntimeError, ReferenceError):
            continue
    return total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_zero_worker(tmp_path: Path, runs: list[dict], nprocs: int = 2, timeout: int = 900,
                       script: Path | None = None) -> dict:
    """Start ``script``'s worker (default: this file's ``zero_worker``) on ``nprocs`` CPU ranks with
    the deepspeed launcher, given ``--spec`` (the runs) and ``--out``; rank 0's result."""
    spec, out = tmp_path / "spec.json", tmp_path / "result.json"
    spec.write_text(json.dumps({"runs": runs}))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    cmd = ["deepspeed", "--num_gpus", str(nprocs), "--master_port", str(_free_port()),
           str(script or Path(__file__).resolve()), "--spec", str(spec), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(out.read_text())


def assert_decreasing(losses: list[float], factor: float = 0.7) -> None:
    """Starts at log 2 (policy == reference), falls at every step, ends well below the start."""
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4), losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < factor * losses[0], losses


# ------------------------------------------------------------------------------------------------
# Derived DeepSpeed settings and refusals (pure functions)
# ------------------------------------------------------------------------------------------------

def _ds(name: str, stage: int = 3, offload: bool = False, passthrough: dict | None = None,
        precision: str = "bf16", backend: str = "deepspeed") -> dict:
    train = TrainConfig(optimizer=OptimizerConfig(name=name))
    dist = DistributedConfig(backend=backend, zero_stage=stage, offload_optimizer=offload, deepspeed=passthrough or {})
    return deepspeed_config(train, dist, world_size=2, precision=precision, on_cpu=False)


def test_every_offered_optimizer_has_an_update_rule():
    """The table covers exactly the names the config accepts; adamw alone is element-wise."""
    import typing

    offered = typing.get_args(typing.get_type_hints(OptimizerConfig)["name"])
    assert set(UPDATE_COUPLING) == set(offered)
    assert [name for name, coupling in UPDATE_COUPLING.items() if coupling is None] == ["adamw"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("name", ["adafactor", "adamw8bit"])
def test_non_elementwise_optimizers_are_refused_under_zero(name, stage, precision):
    with pytest.raises(ConfigError) as err:
        _ds(name, stage=stage, precision=precision)
    message = str(err.value)
    assert message.startswith(f"train.optimizer.name: {name} cannot run under DeepSpeed ZeRO-{stage}"), message
    assert "not element-wise" in message and "Use adamw" in message and "\n" not in message


def test_a_passthrough_zero_stage_counts():
    """The stage DeepSpeed will run, after the distributed.deepspeed passthrough is merged."""
    with pytest.raises(ConfigError, match="adafactor cannot run under DeepSpeed ZeRO-2"):
        _ds("adafactor", stage=0, passthrough={"zero_optimization": {"stage": 2}})
    _ds("adafactor", stage=3, passthrough={"zero_optimization": {"stage": 0}})


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adafactor"])
def test_stage_0_keeps_every_optimizer(name, precision):
    """At stage 0 DeepSpeed steps the parameters' own tensors at every precision (bf16 / fp16:
    FP16_UnfusedOptimizer's per-parameter fp32 copies; ``test_deepspeed_flattens_from_zero_1``)."""
    cfg = _ds(name, stage=0, precision=precision)
    assert cfg["zero_optimization"]["stage"] == 0
    assert ("optimizer" in cfg) == (name == "adamw")       # client optimizers: no DeepSpeed section
    assert "zero_allow_untested_optimizer" not in cfg       # no client optimizer reaches ZeRO 1-3


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_adamw_passes_at_every_stage(stage):
    cfg = _ds("adamw", stage=stage)
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["zero_optimization"]["stage"] == stage


def test_the_refusal_follows_the_backend(monkeypatch):
    """``backend: auto`` is DeepSpeed under a launcher (refused) and local without one (the
    preflight derives the DeepSpeed config of a local run too: no refusal)."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    _ds("adafactor", backend="auto")
    _ds("adafactor", backend="local")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="adafactor cannot run under DeepSpeed ZeRO-3"):
        _ds("adafactor", backend="auto")


def test_adamw_uses_the_native_deepspeed_section():
    cfg = _ds("adamw")
    assert cfg["optimizer"]["type"] == "AdamW"
    assert "zero_allow_untested_optimizer" not in cfg


def test_a_client_optimizer_with_offload_may_use_a_client_cpu_optimizer():
    cfg = _ds("adafactor", stage=0, offload=True)
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_force_ds_cpu_optimizer"] is False


def test_shipped_sdxl_recipes_run_exactly_under_zero3():
    """The SDXL recipes: AdamW (the Diffusion-DPO lr 1.28e-6 and weight decay kept), ZeRO-3 on
    DeepSpeed; their DeepSpeed config derives on 8 ranks (128 = 1 x 16 x 8) without a refusal."""
    from sail.engine.config import load_config

    for name in ("sdxl_zero3.json", "sdxl_dpo.json"):
        cfg = load_config(name)
        opt = cfg.train.optimizer
        assert (opt.name, opt.lr, opt.weight_decay, opt.betas, opt.eps) == ("adamw", 1.28e-6, 0.01, (0.9, 0.999), 1e-8)
        assert (cfg.distributed.backend, cfg.distributed.zero_stage, cfg.train.precision) == ("deepspeed", 3, "bf16")
        ds = deepspeed_config(cfg.train, cfg.distributed, world_size=8, precision="bf16", on_cpu=False)
        assert ds["optimizer"]["type"] == "AdamW" and ds["train_batch_size"] == 128


# ------------------------------------------------------------------------------------------------
# Why: an update that is not element-wise changes with the partition (plain torch, CPU)
# ------------------------------------------------------------------------------------------------

SHAPES = [(96, 100), (50, 100)]
"""Two weights of 9600 and 5000 elements: both over bitsandbytes' 4096-element threshold for
8-bit states, and no boundary (9600, 14600 / 2, 14600 / 3) on a multiple of its 256-element blocks."""


def _optimizer(name: str, params):
    return build_optimizer(params, OptimizerConfig(name=name, lr=1e-2, weight_decay=0.0))


def flat_update(name: str, pieces: int | None) -> torch.Tensor:
    """The change of all parameters, flattened, after two steps of ``name``: on the parameters
    themselves (``pieces`` None: one process, or ZeRO stage 0), or on ``pieces`` contiguous slices
    of their concatenation, one optimizer each (what ZeRO 1-3 on ``pieces`` ranks steps; DeepSpeed
    also pads, which moves the boundaries again). The second step's gradient is 10x larger on
    the second weight, so the update's RMS differs along the flat vector."""
    sizes = [math.prod(s) for s in SHAPES]
    g = torch.Generator().manual_seed(0)
    start = torch.randn(sum(sizes), generator=g)
    grads = [torch.randn(sum(sizes), generator=g),
             torch.randn(sum(sizes), generator=g) * torch.cat([torch.ones(sizes[0]), torch.full((sizes[1],), 10.0)])]
    if pieces is None:
        params = [t.reshape(s).clone().requires_grad_(True) for t, s in zip(start.split(sizes), SHAPES)]
        optimizers = [_optimizer(name, params)]
    else:
        params = [t.clone().requires_grad_(True) for t in start.tensor_split(pieces)]
        optimizers = [_optimizer(name, [p]) for p in params]
    for grad in grads:
        for p, part in zip(params, grad.split([p.numel() for p in params])):
            p.grad = part.reshape(p.shape).clone()
        for opt in optimizers:
            opt.step()
    return torch.cat([p.detach().flatten() for p in params]) - start


@pytest.mark.parametrize("name", ["adamw", pytest.param("adamw8bit", marks=needs_bnb), "adafactor"])
def test_only_elementwise_updates_survive_partitioning(name, one_thread):
    """The claim behind the refusal, for every optimizer of ``UPDATE_COUPLING``: AdamW's update
    is the same on the parameters and on 1, 2 or 3 flat partitions (to float rounding);
    Adafactor's (the per-tensor RMS clip, the factored second moment) and AdamW8bit's (per-block
    quantisation scales) differ from the one-process update and between 2 and 3 ranks."""
    one_process = flat_update(name, None)
    zero = {ranks: flat_update(name, ranks) for ranks in (1, 2, 3)}
    scale = one_process.abs().max()
    if UPDATE_COUPLING[name] is None:
        for ranks, update in zero.items():
            torch.testing.assert_close(update, one_process, rtol=1e-6, atol=1e-6 * scale, msg=f"{ranks} ranks")
    else:
        # measured: 2.9 % to 61 % of the largest update element; float rounding is ~1e-7 of it
        for ranks, update in zero.items():
            assert (update - one_process).abs().max() > 1e-3 * scale, f"{name}: ZeRO on {ranks} ranks"
        assert (zero[2] - zero[3]).abs().max() > 1e-3 * scale, f"{name}: 2 vs 3 ranks"


@pytest.mark.parametrize("how", ["flag", "passthrough"])
def test_bitsandbytes_with_offload_is_refused(how):
    kwargs = {"offload": True} if how == "flag" else {
        "passthrough": {"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/x"}}}}
    with pytest.raises(ConfigError) as err:
        _ds("adamw8bit", **kwargs)
    assert "adamw8bit (bitsandbytes) cannot be combined with optimizer offload" in str(err.value)
    _ds("adamw8bit", stage=0, passthrough={"zero_optimization": {"offload_optimizer": {"device": "none"}}})  # fine


@pytest.mark.parametrize("sets, expected", [
    (["train.optimizer.name=adamw8bit", "distributed.offload_optimizer=true"],
     "adamw8bit (bitsandbytes) cannot be combined with optimizer offload"),
    (["train.optimizer.name=adafactor"], "train.optimizer.name: adafactor cannot run under DeepSpeed ZeRO-3"),
])
def test_a_refused_optimizer_fails_fast_at_the_entry_point(tmp_path, sets, expected):
    """The whole launch path (tiny_sd15.json is ZeRO-3): one line, exit status 2, no model or
    data touched."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
    overrides = [arg for value in sets for arg in ("--set", value)]
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config", "tiny_sd15.json", "--run-dir", str(tmp_path / "run"),
         *overrides, "--set", "distributed.backend=deepspeed", "--set", 'data.train=["/nonexistent/*.parquet"]'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert expected in out, out[-3000:]
    assert "matches no file" not in out          # refused before the data is read
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# Local strategy (one process)
# ------------------------------------------------------------------------------------------------

def _local(name: str, lr: float):
    from sail.engine.ranks import Ranks
    from sail.engine.strategy import LocalStrategy

    train = TrainConfig(beta=500.0, steps=6, optimizer=OptimizerConfig(name=name, lr=lr, eps=1e-6))
    cpu = Ranks(rank=0, world_size=1, device=torch.device("cpu"), backend="local")
    strategy = LocalStrategy(train, DistributedConfig(backend="local"), cpu)
    strategy.prepare(tiny_unet(), tiny_unet(), train.steps, 1)
    return strategy


@pytest.mark.parametrize("name", ["adamw", pytest.param("adamw8bit", marks=needs_bnb), "adafactor"])
def test_the_local_strategy_keeps_every_optimizer(name):
    """One process steps the parameters themselves: every optimizer, whatever zero_stage says
    (it is a DeepSpeed setting); Adafactor factors the weight's second moment."""
    from sail.engine.ranks import Ranks
    from sail.engine.strategy import LocalStrategy

    train = TrainConfig(steps=1, optimizer=OptimizerConfig(name=name))
    dist = DistributedConfig(backend="local", zero_stage=3)
    deepspeed_config(train, dist, world_size=1, precision="fp32", on_cpu=True)    # what run.preflight derives
    strategy = LocalStrategy(train, dist, Ranks(0, 1, torch.device("cpu"), "local"))
    strategy.prepare(torch.nn.Linear(64, 64), None, total_steps=1, num_pairs=1)
    assert type(strategy.optimizer).__name__ == {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "adafactor": "Adafactor"}[name]
    strategy.policy(torch.randn(2, 64)).square().mean().backward()
    strategy.optimizer.step()
    if name == "adafactor":
        assert "exp_avg_sq_row" in state_facts(strategy.optimizer)


@pytest.mark.parametrize("name, lr", [pytest.param("adamw8bit", 3e-5, marks=needs_bnb), ("adafactor", 3e-5)])
def test_local_optimizer_lowers_the_loss_on_a_fixed_batch(name, lr, one_thread):
    strategy = _local(name, lr)
    assert_decreasing(train_fixed_batch(strategy, 5, beta=500.0))
    facts = state_facts(strategy.optimizer)
    if name == "adamw8bit":
        assert type(strategy.optimizer).__name__ == "AdamW8bit"
        # bitsandbytes keeps 32-bit states for tensors under 4096 elements (biases, norms) only
        for param, state in strategy.optimizer.state.items():
            expected = torch.uint8 if param.numel() >= 4096 else torch.float32
            assert state["state1"].dtype == expected and state["state2"].dtype == expected, param.shape
    else:
        # SDXL recipe: fixed lr (no relative step, no parameter scaling), no first moment, and
        # factored second moments (row + column vectors) for the 2-D / 4-D weights.
        group = strategy.optimizer.param_groups[0]
        assert group["relative_step"] is False and group["scale_parameter"] is False and group["lr"] == lr
        assert "exp_avg" not in facts and "exp_avg_sq_row" in facts and "exp_avg_sq_col" in facts


@pytest.mark.parametrize("name", [pytest.param("adamw8bit", marks=needs_bnb), "adafactor"])
def test_local_checkpoint_resumes_the_optimizer_exactly(tmp_path, name, one_thread):
    """4 steps straight == 2 steps, save (safetensors + JSON), fresh strategy, load, 2 steps."""
    straight = _local(name, 3e-5)
    ref_losses = train_fixed_batch(straight, 4, beta=500.0)
    first = _local(name, 3e-5)
    train_fixed_batch(first, 2, beta=500.0)
    first.save_checkpoint(tmp_path, 2, {"step": 2})
    resumed = _local(name, 3e-5)
    assert resumed.load_checkpoint(tmp_path)["step"] == 2
    losses = train_fixed_batch(resumed, 2, beta=500.0)
    assert losses == pytest.approx(ref_losses[2:], rel=1e-6, abs=1e-7)
    for (k, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------------------------------
# DeepSpeed, 2 CPU ranks
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@needs_launcher
def test_adamw_under_zero3_on_two_ranks(tmp_path):
    """The recipes' optimizer under ZeRO-3; closing the engine frees what ZeRO-3 allocated."""
    out = launch_zero_worker(tmp_path, [dict(optimizer="adamw", zero_stage=3, lr=3e-5, steps=5, beta=500.0)])
    assert out["world_size"] == 2
    (res,) = out["results"]
    assert_decreasing(res["losses"])
    assert res["wrapper"] == "DeepSpeedZeroOptimizer_Stage3"
    # Closing the engine frees its buffers, partitions and optimizer state (measured with the
    # client optimizers: ~2 GB of ZeRO-3 buckets and flat partitions -> ~10 MB live tensor
    # storage in the process). The Python parameter objects themselves stay reachable from
    # DeepSpeed's internals (their data is released), so the check is on the bytes.
    assert res["bytes_after_close"] < 0.05 * res["bytes_before_close"], res


@pytest.mark.slow
@needs_launcher
@needs_bnb
def test_client_optimizers_at_stage_0_on_two_ranks(tmp_path):
    """Where adamw8bit and adafactor are allowed under DeepSpeed: stage 0, whose optimizer steps
    the parameters themselves (Adafactor factors the second moment of the weights)."""
    runs = [dict(optimizer=name, zero_stage=0, lr=3e-5, steps=3, beta=500.0) for name in ("adamw8bit", "adafactor")]
    out = launch_zero_worker(tmp_path, runs)
    for res in out["results"]:
        assert_decreasing(res["losses"], factor=0.9)
        expected = {"adamw8bit": "AdamW8bit", "adafactor": "Adafactor"}[res["optimizer"]]
        assert res["basic_optimizer"] == expected, res
    adafactor = out["results"][1]["states"]
    assert "exp_avg_sq_row" in adafactor and "exp_avg_sq_col" in adafactor and "exp_avg" not in adafactor


def optimizer_views() -> list[dict]:
    """What DeepSpeed hands a client optimizer (Adafactor) for each stage and precision, in this
    process as a 1-rank group on the CPU: the shapes of the tensors it steps and the wrapper."""
    import deepspeed
    from transformers.optimization import Adafactor

    views = []
    for stage, precision in [(0, "fp32"), (0, "bf16"), (1, "fp32"), (1, "bf16"), (2, "fp32"), (3, "bf16")]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        params = list(model.parameters())
        opt = Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)
        cfg = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
               "bf16": {"enabled": precision == "bf16"}, "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=opt, config=cfg)
        stepped = ([p for g in engine.basic_optimizer.param_groups for p in g["params"]] if stage < 3
                   else engine.optimizer.fp32_partitioned_groups_flat)     # stage 3 fills its groups per step
        views.append(dict(stage=stage, precision=precision, wrapper=type(engine.optimizer).__name__,
                          shapes=[list(t.shape) for t in stepped]))
        engine.destroy()
    return views


@pytest.mark.slow
def test_deepspeed_flattens_from_zero_1(tmp_path):
    """The DeepSpeed behaviour ``check_update_exact`` encodes: from stage 1 a client optimizer
    steps one flat 1-D partition (even on one rank); at stage 0 it steps the parameters' own
    shapes, bf16 included (FP16_UnfusedOptimizer's per-parameter fp32 copies)."""
    out = tmp_path / "views.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", RANK="0",
               LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--views", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    shapes = [[16, 8], [16], [4, 16], [4]]
    flat = [[sum(math.prod(s) for s in shapes)]]
    for view in json.loads(out.read_text()):
        assert view["shapes"] == (shapes if view["stage"] == 0 else flat), view
        if view["stage"] == 0 and view["precision"] == "bf16":
            assert view["wrapper"] == "FP16_UnfusedOptimizer", view


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--spec", help="runs of zero_worker (under the deepspeed launcher)")
    what.add_argument("--views", action="store_true", help="optimizer_views (one process)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = optimizer_views() if args.views else zero_worker(json.loads(Path(args.spec).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    _main()


def test_the_configured_objective_reaches_the_loss():
    """dpo_forward with dpo_sft: the DPO loss plus gamma x the winners' mean policy error, on the
    same forward; dpop while the policy equals its reference (d_w = 0, hinge off): the DPO loss."""
    from diffusers import DDPMScheduler

    from sail.engine.config import LossConfig
    from sail.engine.trainer import dpo_forward

    strategy = _local("adafactor", 3e-5)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    batch, t, noise = fixed_batch(0, pairs=2)
    args = (strategy, sched, batch, t, noise, torch.zeros(2, dtype=torch.bool), torch.zeros(1, 16, 32), None, 500.0)
    with torch.no_grad():
        plain = dpo_forward(*args)
        sft = dpo_forward(*args, LossConfig(name="dpo_sft", gamma=7.0))
        hinge = dpo_forward(*args, LossConfig(name="dpop", lam=5.0))
    assert torch.equal(plain.z, sft.z)
    torch.testing.assert_close(sft.loss, plain.loss + 7.0 * plain.model_err[:2].mean(), rtol=1e-6, atol=0)
    d_w = (plain.model_err - plain.ref_err)[:2]
    assert (d_w == 0).all()                # the policy starts as its reference: the hinge is off
    assert torch.equal(hinge.loss, plain.loss)
