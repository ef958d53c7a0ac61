"""Distribution behind one object with the same verbs on two implementations.

``LocalStrategy``: plain torch in one process (CPU tests, laptops, single-GPU debugging).
``DeepSpeedStrategy``: DeepSpeed ZeRO 0-3; the policy is an engine with optimizer; the DPO
reference (loaded from disk by the caller, never deep-copied from a partitioned model) is a
plain frozen replica in the compute dtype under ZeRO 0-2, and under ZeRO-3 either that replica
or a second engine without optimizer, partitioned like the policy (``distributed.reference``,
``choose_reference_placement``).

Verbs: prepare, policy / reference (callables), backward, step, grad_norm, lr, save_checkpoint,
load_checkpoint, policy_state_dict, load_reference (SSPO's replay), all_reduce_mean, barrier,
is_main, close.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from sail.engine.configtree import ConfigError
from sail.engine.config import DistributedConfig, TrainConfig
from sail.engine.io import read_json, write_json, write_safetensors
from sail.engine.optim import (build_lr_scheduler, build_optimizer, check_batch_arithmetic, deepspeed_config,
                               reference_deepspeed_config)
from sail.engine.ranks import Ranks, init_ranks, single_process

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LATEST = "latest.json"   # {"tag": "step_N"}: the newest complete step checkpoint of a folder


def latest_checkpoint(folder: str | os.PathLike) -> str | None:
    """The tag of the newest complete checkpoint in ``folder`` (both strategies), or None."""
    path = Path(folder) / LATEST
    return read_json(path)["tag"] if path.is_file() else None


def checkpoint_layout(backend: str, world_size: int, zero_stage: int) -> dict:
    """What a training checkpoint's files depend on besides the model: the strategy, the number
    of ranks and, under DeepSpeed, the ZeRO stage (each rank saves its own partition)."""
    if backend == "local":
        return {"backend": "local", "world_size": 1}
    return {"backend": "deepspeed", "world_size": world_size, "zero_stage": zero_stage}


def check_resumable(folder: str | os.PathLike, layout: dict) -> None:
    """Refuse (one line, before any work) to resume the checkpoint in ``folder`` with another
    strategy, world size or ZeRO stage than the one that wrote it: its partitions would not
    load, or would load into the wrong ranks."""
    path = Path(folder) / LATEST
    if not path.is_file():
        return
    saved = read_json(path)
    was = {k: saved[k] for k in layout if k in saved}
    if was and was != layout:
        def say(d: dict) -> str:
            return ", ".join(f"{k} {v}" for k, v in d.items())

        raise ConfigError(f"{folder}: this training stage was checkpointed at {saved['tag']} with {say(was)}; this "
                          f"run has {say(layout)}. Resume it with the same settings ({say(was)}), or delete "
                          f"{folder} to restart the stage from its first step.")


class Strategy:
    """Shared bookkeeping; subclasses implement the distribution-specific verbs. Rank, world
    size, device and the collectives are the process's ``Ranks`` (engine/ranks.py)."""

    ranks: Ranks
    compute_dtype: torch.dtype = torch.float32
    policy: nn.Module
    reference: nn.Module | None
    reference_placement: str | None = None
    """replicated or partitioned once ``prepare`` has placed a reference; None without one."""

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    @property
    def device(self) -> torch.device:
        return self.ranks.device

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main

    def barrier(self) -> None:
        self.ranks.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.ranks.all_reduce_mean(tensor)

    def broadcast_object(self, obj):
        return self.ranks.broadcast_object(obj)

    def close(self) -> None:
        """Drop the stage's models, optimizer state and caches, so that the next stage (generation,
        ranking: the model loaded whole) does not need more memory than training did."""
        self._release()

    def _release(self) -> None:
        import gc

        for name in ("policy", "reference", "optimizer", "scheduler", "engine"):
            if hasattr(self, name):
                setattr(self, name, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _prune_checkpoints(folder: Path, keep: int) -> None:
    tags = sorted((p for p in folder.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class LocalStrategy(Strategy):
    """One process, plain torch; gradient accumulation and clipping done here."""

    def __init__(self, train: TrainConfig, dist: DistributedConfig, ranks: Ranks | None = None):
        self.train, self.dist = train, dist
        self.ranks = ranks or single_process()
        self.precision = resolve_precision(train.precision, self.device)
        self.compute_dtype = DTYPES[self.precision]
        self._micro = 0
        self._grad_norm = torch.zeros(())

    def prepare(self, policy: nn.Module, reference: nn.Module | None, total_steps: int, num_pairs: int) -> None:
        check_batch_arithmetic(self.train, self.dist, 1, num_pairs)
        # Mixed precision here is autocast over fp32 master weights (DeepSpeed keeps its own).
        self.policy = policy.to(self.device).train()
        self.reference = reference.to(self.device).eval().requires_grad_(False) if reference is not None else None
        self.reference_placement = "replicated" if reference is not None else None
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, self.train.optimizer)
        self.scheduler = build_lr_scheduler(self.optimizer, self.train.scheduler, total_steps)

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.train.grad_accum).backward()

    def step(self) -> bool:
        """Counts micro-batches; steps the optimizer at the accumulation boundary."""
        self._micro += 1
        if self._micro % self.train.grad_accum:
            return False
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = self.train.clip_grad_norm if self.train.clip_grad_norm > 0 else float("inf")
        self._grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def grad_norm(self) -> torch.Tensor:
        return self._grad_norm

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save_checkpoint(self, folder: Path, step: int, client_state: dict) -> None:
        """model.safetensors + optimizer.safetensors/json + client_state.json (no pickle)."""
        folder = Path(folder)
        tag = folder / f"step_{step}"
        tmp = folder / f".step_{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_safetensors(tmp / "model.safetensors", self.policy.state_dict())
        tensors, meta = optimizer_state_to_flat(self.optimizer.state_dict())
        write_safetensors(tmp / "optimizer.safetensors", tensors)
        write_json(tmp / "optimizer.json", meta)
        write_json(tmp / "client_state.json", dict(client_state, micro=self._micro))
        shutil.rmtree(tag, ignore_errors=True)
        os.replace(tmp, tag)
        write_json(folder / LATEST, {"tag": tag.name, **checkpoint_layout("local", 1, 0)})
        _prune_checkpoints(folder, self.train.keep_checkpoints)

    def load_checkpoint(self, folder: Path) -> dict | None:
        from safetensors.torch import load_file

        tag = latest_checkpoint(folder)
        if tag is None:
            return None
        tag = Path(folder) / tag
        self.policy.load_state_dict(load_file(tag / "model.safetensors", device=str(self.device)))
        state = optimizer_state_from_flat(load_file(tag / "optimizer.safetensors"), read_json(tag / "optimizer.json"))
        self.optimizer.load_state_dict(state)
        client = read_json(tag / "client_state.json")
        self._micro = client.pop("micro")
        self.scheduler.last_epoch = client["step"] - 1
        self.scheduler.step()  # re-derive the lr of the next step from the step count
        return client

    def policy_state_dict(self) -> dict | None:
        return {k: v.detach().float().cpu() for k, v in self.policy.state_dict().items()}

    def load_reference(self, state: dict) -> None:
        """Replace the reference's weights (every rank passes the same ``state``)."""
        self.reference.load_state_dict(state)


def optimizer_state_to_flat(state: dict) -> tuple[dict, dict]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able rest). One level of
    nesting is kept as ``idx.name/sub`` (bitsandbytes >= 0.48 nests its 8-bit states)."""
    tensors, scalars, seen = {}, {}, set()
    for idx, entry in state["state"].items():
        flat = {}
        for name, value in entry.items():
            if isinstance(value, dict):
                flat.update({f"{name}/{sub}": v for sub, v in value.items()})
            else:
                flat[name] = value
        for name, value in flat.items():
            if not torch.is_tensor(value):
                scalars[f"{idx}.{name}"] = value
                continue
            if value.data_ptr() in seen:     # shared (bitsandbytes' quantization maps): safetensors refuses aliases
                value = value.clone()
            seen.add(value.data_ptr())
            tensors[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_flat(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        entry = state.setdefault(int(idx), {})
        if "/" in name:
            outer, inner = name.split("/", 1)
            entry.setdefault(outer, {})[inner] = value
        else:
            entry[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class DeepSpeedStrategy(Strategy):
    """DeepSpeed engines for the policy (with optimizer) and, under ZeRO-3, the reference."""

    def __init__(self, train: TrainConfig, dist: DistributedConfig, ranks: Ranks | None = None):
        self.train, self.dist = train, dist
        self.ranks = ranks or init_ranks(dataclasses.replace(dist, backend="deepspeed"))
        on_cpu = self.device.type == "cpu"
        self.precision = resolve_precision(train.precision, self.device)
        self.compute_dtype = DTYPES[self.precision]
        self.ds_config = deepspeed_config(train, dist, self.world_size, self.precision, on_cpu)
        self._stepped = False

    def prepare(self, policy: nn.Module, reference: nn.Module | None, total_steps: int, num_pairs: int) -> None:
        import deepspeed

        check_batch_arithmetic(self.train, self.dist, self.world_size, num_pairs)
        params = [p for p in policy.parameters() if p.requires_grad]
        client_opt = None if "optimizer" in self.ds_config else build_optimizer(params, self.train.optimizer)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=policy, model_parameters=params, optimizer=client_opt, config=self.ds_config,
            lr_scheduler=lambda opt: build_lr_scheduler(opt, self.train.scheduler, total_steps))
        self.policy = self.engine
        self.reference, self.reference_placement = None, None
        if reference is not None:
            reference.requires_grad_(False).eval()
            self.reference_placement = self._place_reference(reference)
            if self.reference_placement == "partitioned":
                ref_engine, *_ = deepspeed.initialize(model=reference, config=reference_deepspeed_config(self.ds_config))
                ref_engine.eval()
                self.reference = ref_engine
            else:   # the dtype the engine would cast it to (a UNet has no buffers to keep in fp32)
                self.reference = reference.to(self.device, self.compute_dtype)

    def _place_reference(self, reference: nn.Module) -> str:
        """replicated or partitioned (``choose_reference_placement``), the same on every rank."""
        if self.dist.zero_stage != 3:
            return "replicated"      # ZeRO 0-2 partition no parameter
        nbytes = sum(p.numel() for p in reference.parameters()) * self.compute_dtype.itemsize
        # Rank 0 decides and tells the others: the two placements issue different collectives.
        placement, why = self.broadcast_object(
            choose_reference_placement(self.dist, nbytes, device_memory_bytes(self.ranks)) if self.is_main else None)
        log.info("DPO reference under ZeRO-3: %s (%s)", placement, why)
        return placement

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the module; inputs are cast by the trainer

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def grad_norm(self) -> torch.Tensor:
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float32)

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save_checkpoint(self, folder: Path, step: int, client_state: dict) -> None:
        self.engine.save_checkpoint(str(folder), tag=f"step_{step}", client_state=client_state)
        self.barrier()
        if self.is_main:
            write_json(Path(folder) / LATEST, {"tag": f"step_{step}", **checkpoint_layout(
                "deepspeed", self.world_size, self.dist.zero_stage)})
            _prune_checkpoints(Path(folder), self.train.keep_checkpoints)
        self.barrier()

    def load_checkpoint(self, folder: Path) -> dict | None:
        # rank 0 decides which checkpoint (if any) every rank loads: it sets the collectives
        tag = self.broadcast_object(latest_checkpoint(folder) if self.is_main else None)
        if tag is None:
            return None
        path, client = self.engine.load_checkpoint(str(folder), tag=tag)
        if path is None:
            raise RuntimeError(f"{folder}/{tag}: DeepSpeed could not load the checkpoint")
        return client

    def close(self) -> None:
        """Release the engines: ZeRO-3 partition caches, the optimizer's partitions and state,
        DeepSpeed's own references (``destroy``), then the modules; a collective-free call."""
        engines = [e for e in (getattr(self, "engine", None), self.reference) if hasattr(e, "destroy")]
        for engine in engines:
            if self.dist.zero_stage == 3:
                engine.empty_partition_cache()
            engine.destroy()
        if self.dist.zero_stage == 3:
            # ZeRO-3 pushes each engine's top module on a module-level stack that nothing pops
            # (deepspeed/runtime/zero/parameter_offload.py, FWD_MODULE_STACK): left there, the
            # module keeps its partitions and hooks alive for the rest of the process.
            from deepspeed.runtime.zero import parameter_offload

            ours = [e.module for e in engines]
            stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
            if isinstance(stack, list):
                stack[:] = [m for m in stack if all(m is not o for o in ours)]
        self._release()

    def policy_state_dict(self) -> dict | None:
        """fp32 master weights gathered from all ranks (a collective call); rank 0 gets them."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(param) if param.requires_grad else None
            if full is None:
                with self._gather([param]):
                    full = param.detach().float().clone()
            if self.is_main:
                out[name] = full.detach().float().cpu()
        for name, buf in self.engine.module.named_buffers():
            if self.is_main:
                out[name] = buf.detach().float().cpu()
        return out if self.is_main else None

    def load_reference(self, state: dict) -> None:
        """Replace the reference's weights (every rank passes the same full ``state``); under
        ZeRO-3 the partitioned engine's parameters are gathered, written on rank 0 and
        re-partitioned."""
        if self.reference_placement != "partitioned":
            self.reference.load_state_dict(state)
            return
        import deepspeed

        module = self.reference.module
        params = dict(module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if self.is_main:
                with torch.no_grad():
                    for name, param in params.items():
                        param.copy_(state[name])
        for name, buf in module.named_buffers():
            buf.copy_(state[name])

    def _gather(self, params):
        import deepspeed

        if self.dist.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()


def device_memory_bytes(ranks: Ranks) -> int:
    """One device's memory: a GPU's total memory; on a CPU the host's physical memory divided by
    the ranks on the node (they share it)."""
    if ranks.device.type == "cuda":
        return torch.cuda.get_device_properties(ranks.device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // ranks.local_world_size


def choose_reference_placement(dist: DistributedConfig, reference_bytes: int, device_bytes: int) -> tuple[str, str]:
    """(placement, why) of the frozen DPO reference under ZeRO-3: ``distributed.reference``, or
    under auto replicated when its ``reference_bytes`` (parameters x compute dtype size) fit
    within ``reference_memory_fraction`` of ``device_bytes``, else partitioned."""
    if dist.reference != "auto":
        return dist.reference, f"distributed.reference: {dist.reference}"
    budget = dist.reference_memory_fraction * device_bytes
    fits = reference_bytes <= budget
    why = (f"auto: its {reference_bytes / 2 ** 30:.3g} GiB {'fit' if fits else 'exceed'} reference_memory_fraction "
           f"{dist.reference_memory_fraction} x {device_bytes / 2 ** 30:.3g} GiB of device memory")
    return ("replicated" if fits else "partitioned"), why


def make_strategy(train: TrainConfig, dist: DistributedConfig, ranks: Ranks | None = None) -> Strategy:
    """The training engine of one stage on the process's ranks: DeepSpeed when the process
    group is DeepSpeed's (``backend: auto`` under a distributed launcher), else local."""
    ranks = ranks or init_ranks(dist)
    if ranks.backend == "deepspeed":
        return DeepSpeedStrategy(train, dist, ranks)
    return LocalStrategy(train, dist, ranks)


def describe_strategy(strategy: Strategy) -> str:
    name = type(strategy).__name__.replace("Strategy", "").lower()
    extra = f", zero {strategy.dist.zero_stage}" if name == "deepspeed" else ""
    reference = {"reference": strategy.reference_placement} if strategy.reference_placement else {}
    return json.dumps({"strategy": name + extra, "world_size": strategy.world_size,
                       "device": str(strategy.device), "precision": strategy.precision, **reference})
