"""DPO training-step benchmark: pairs/s, MFU and memory over a matrix of options.

    python -m sail.bench.train_step                         # CPU: tiny-sd15 and tiny-sdxl, reduced matrix
    python -m sail.bench.train_step --arch sd15 sdxl        # GPU: full architectures, random weights
    python -m sail.bench.train_step --arch sdxl --attention xformers sdpa --checkpointing 1 \
        --optimizer adafactor adamw8bit --zero local 0 --pairs 1 2

One step = policy forward on [winners; losers], reference forward (no grad), the fused DPO loss,
backward and the optimizer step: exactly ``engine.trainer.dpo_forward`` + the strategy verbs, on
a synthetic batch of pre-encoded shape (latents, text states, SDXL pooled + time ids).

Each option set runs in its own subprocess, so the peak memory of one does not hide another's
(on CPU ``ru_maxrss`` only grows). ``--zero local`` is the plain-torch strategy; ``--zero 0..3``
is DeepSpeed in one process (world size 1: ZeRO partitions nothing there, so the stages differ in
code path and overhead only; memory savings need more ranks, see bench/scaling.py).
An option set that ``engine/optim.py`` refuses before any work (Adafactor and AdamW8bit under
ZeRO 1-3: their update is not element-wise, ``check_update_exact``) is not run: its row holds
``refused``, the engine's one-line reason, and no measurements.

MFU = model FLOPs per step / step time / peak FLOP/s. Model FLOPs are counted once per
(arch, pairs), in a subprocess on the benchmark's device, with
``torch.utils.flop_counter.FlopCounterMode`` on one step without checkpointing (policy fwd + bwd,
reference fwd; recompute is not useful work); ``hfu`` uses the FLOPs counted with the option's
own checkpointing. Peak FLOP/s: a table of dense tensor-core
numbers for H100 / H200 / A100 (bf16/fp16; TF32 for fp32), or on CPU the measured fp32 matmul
peak of this machine (``peak_source`` says which).

The last stdout line is one JSON object; every row is appended to --out
(default bench/results/train_step.jsonl) with device, versions, git sha and the full config.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time

import torch

from sail.bench.common import environment, zero_refusal
from sail.engine.forecast import peak_flops  # noqa: F401  (the one table of peak FLOP/s)

CPU_ARCHS, GPU_ARCHS = ["tiny-sd15", "tiny-sdxl"], ["sd15", "sdxl"]


# ----------------------------------------------------------------------------------------------
# One option set (runs in a subprocess)
# ----------------------------------------------------------------------------------------------

def synthetic_batch(arch: str, unet_config: dict, pairs: int, seed: int = 0):
    """A pre-encoded batch of the architecture's shapes: latents [P, 4, h, w], text states
    [P, L, D], and for SDXL pooled [P, 1280 or 32] and time ids [P, 6]."""
    from sail.engine.data.cache import PairBatch
    from sail.engine.models import native_time_ids

    g = torch.Generator().manual_seed(seed)
    side = unet_config["sample_size"]
    tokens = 16 if arch.startswith("tiny") else 77
    latents = lambda: torch.randn(pairs, 4, side, side, generator=g)  # noqa: E731
    batch = PairBatch(latents(), latents(), torch.randn(pairs, tokens, unet_config["cross_attention_dim"], generator=g))
    if unet_config.get("addition_embed_type") == "text_time":
        pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
        batch.pooled = torch.randn(pairs, pooled, generator=g)
        batch.time_ids_w = batch.time_ids_l = native_time_ids(side * 8, pairs)   # the real SDXL VAE: 8 pixels a latent
    return batch


def _make_strategy(opts: dict):
    from sail.engine.config import DistributedConfig, OptimizerConfig, TrainConfig
    from sail.engine.strategy import LocalStrategy, make_strategy

    train = TrainConfig(beta=5000.0, steps=opts["steps"] + opts["warmup"] + 1, micro_batch_pairs=opts["pairs"],
                        precision=opts["precision"], optimizer=OptimizerConfig(name=opts["optimizer"], lr=1e-6))
    if opts["zero"] == "local":
        return LocalStrategy(train, DistributedConfig(backend="local"))
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(opts.get("port", 29561)))):
        os.environ.setdefault(key, value)
    return make_strategy(train, DistributedConfig(backend="deepspeed", zero_stage=int(opts["zero"])))


def _unets(arch: str):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from sail.engine.models import _unet_config   # the architecture table of build_components

    config = _unet_config(arch)
    torch.manual_seed(0)
    policy = UNet2DConditionModel(**config)
    reference = UNet2DConditionModel(**config)
    reference.load_state_dict(policy.state_dict())
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return policy, reference, sched, dict(policy.config)


def count_step_flops(opts: dict) -> float:
    """FLOPs of one DPO step (policy fwd + bwd, reference fwd) on the local strategy, with the
    option's checkpointing (recompute included) and SDPA attention (xformers ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    opts = dict(opts, attention="sdpa", optimizer="adamw", zero="local", steps=1, warmup=0)
    strategy, step = _prepare(opts)
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def _prepare(opts: dict):
    from sail.engine.models import set_attention_backend
    from sail.engine.trainer import dpo_forward

    strategy = _make_strategy(opts)
    policy, reference, sched, config = _unets(opts["arch"])
    backend = set_attention_backend(policy, opts["attention"])
    set_attention_backend(reference, opts["attention"])
    if opts["checkpointing"]:
        policy.enable_gradient_checkpointing()
    strategy.prepare(policy, reference, opts["steps"] + opts["warmup"] + 1, opts["pairs"])
    opts["attention_backend"] = backend
    batch = synthetic_batch(opts["arch"], config, opts["pairs"])
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (opts["pairs"],), generator=g)
    noise = torch.randn(batch.latents_w.shape, generator=g)
    empty = torch.zeros(opts["pairs"], dtype=torch.bool)
    empty_hidden = torch.zeros(1, *batch.hidden.shape[1:])
    empty_pooled = None if batch.pooled is None else torch.zeros(1, batch.pooled.shape[1])

    def step():
        out = dpo_forward(strategy, sched, batch, t, noise, empty, empty_hidden, empty_pooled, 5000.0)
        strategy.backward(out.loss)
        strategy.step()
        return out.loss

    return strategy, step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def state_bytes(strategy) -> dict:
    """Exact bytes of policy and reference parameters, gradients and optimizer states held by
    this process. Gradients are counted as the trainable parameters' size, which they occupy at
    the step's peak (the local strategy frees them after the optimizer step)."""
    unwrap = lambda m: m.module if hasattr(m, "module") else m  # noqa: E731  (a DeepSpeed engine)
    module = unwrap(strategy.policy)
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731   (ZeRO-3: the full size)
    params = sum(numel(p) * p.element_size() for p in module.parameters())
    reference = 0 if strategy.reference is None else sum(numel(p) * p.element_size()
                                                         for p in unwrap(strategy.reference).parameters())
    grads = sum(numel(p) * p.element_size() for p in module.parameters() if p.requires_grad)
    opt = getattr(strategy, "engine", None)
    optimizer = opt.basic_optimizer if opt is not None else strategy.optimizer
    states = 0
    for state in optimizer.state.values():
        for value in state.values():
            tensors = value.values() if isinstance(value, dict) else [value]
            states += sum(v.numel() * v.element_size() for v in tensors if torch.is_tensor(v))
    return {"params_gib": params / 2 ** 30, "reference_params_gib": reference / 2 ** 30, "grads_gib": grads / 2 ** 30,
            "optimizer_states_gib": states / 2 ** 30}


def run_one(opts: dict) -> dict:
    """Time ``steps`` DPO steps after ``warmup`` for one option set; memory and throughput."""
    if opts.get("threads"):
        torch.set_num_threads(opts["threads"])
    rss0 = _rss_gib()
    strategy, step = _prepare(opts)
    device = strategy.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_setup = _rss_gib()
    for _ in range(opts["warmup"]):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(opts["steps"]):
        loss = step()
    _sync(device)
    seconds = (time.perf_counter() - t0) / opts["steps"]
    row = {"step_s": seconds, "pairs_per_s": opts["pairs"] / seconds, "loss": float(loss),
           "precision": strategy.precision, "attention_backend": opts["attention_backend"]}
    row.update(state_bytes(strategy))
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        row["memory_source"] = "torch.cuda.max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        row.update(peak_rss_gib=peak, rss_before_models_gib=rss0, rss_after_setup_gib=rss_setup,
                   step_peak_over_setup_gib=peak - rss_setup, memory_source="ru_maxrss of a fresh process")
    strategy.close()
    return row


# ----------------------------------------------------------------------------------------------
# The matrix
# ----------------------------------------------------------------------------------------------

def default_matrix(on_gpu: bool, args) -> list[dict]:
    archs = args.arch or (GPU_ARCHS if on_gpu else CPU_ARCHS)
    if any([args.attention, args.checkpointing, args.optimizer, args.zero]) or on_gpu:
        attention = args.attention or (["sdpa", "xformers"] if on_gpu else ["sdpa"])
        grid = itertools.product(archs, attention, args.checkpointing or [0, 1],
                                 args.optimizer or ["adamw", "adamw8bit", "adafactor"],
                                 args.zero or (["3"] if on_gpu else ["local"]), args.pairs)
        return [dict(arch=a, attention=at, checkpointing=bool(c), optimizer=o, zero=z, pairs=p)
                for a, at, c, o, z, p in grid]
    # CPU default: one change at a time from (sdpa, no checkpointing, adamw, local) per arch
    rows = []
    for arch in archs:
        base = dict(arch=arch, attention="sdpa", checkpointing=False, optimizer="adamw", zero="local", pairs=args.pairs[0])
        rows += [base, dict(base, checkpointing=True), dict(base, optimizer="adamw8bit"),
                 dict(base, optimizer="adafactor"), dict(base, zero="0"), dict(base, zero="3")]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", choices=["tiny-sd15", "tiny-sdxl", "sd15", "sdxl"])
    parser.add_argument("--attention", nargs="+", choices=["sdpa", "xformers"])
    parser.add_argument("--checkpointing", nargs="+", type=int, choices=[0, 1])
    parser.add_argument("--optimizer", nargs="+", choices=["adamw", "adamw8bit", "adafactor"])
    parser.add_argument("--zero", nargs="+", choices=["local", "0", "1", "2", "3"])
    parser.add_argument("--pairs", nargs="+", type=int, default=[1], help="pairs per step (micro batch)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3 GPU, 1 CPU)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per process (default 1 on CPU: on a small shared machine OpenMP "
                             "barriers with busy neighbours make 2-thread timings swing several-fold)")
    parser.add_argument("--out", default="bench/results/train_step.jsonl")
    parser.add_argument("--one", help=argparse.SUPPRESS)          # internal: run one option set (JSON)
    args = parser.parse_args(argv)
    if args.one:
        opts = json.loads(args.one)
        print(json.dumps({"flops": count_step_flops(opts)} if opts.get("count_flops") else run_one(opts)))
        return
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    steps, warmup = args.steps or (10 if on_gpu else 3), args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    if args.threads is None and not on_gpu:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)       # also the thread count of the CPU matmul peak
    env = environment(device)
    precision = args.precision if args.precision != "auto" else ("bf16" if on_gpu else "fp32")
    peak, peak_source = peak_flops(device, precision)
    flops_cache: dict = {}
    rows = []
    for i, opts in enumerate(default_matrix(on_gpu, args)):
        opts.update(steps=steps, warmup=warmup, precision=args.precision, threads=args.threads, port=29561 + i)
        row = {"config": {k: v for k, v in opts.items() if k != "port"}, "env": env}
        refused = None if opts["zero"] == "local" else zero_refusal(opts["optimizer"], int(opts["zero"]))
        row.update({"refused": refused, "error": None} if refused else _measure(opts, peak, peak_source, flops_cache))
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(_line(row), flush=True)
    summary = {"bench": "train_step", "device": env["device"], "peak_flops": peak, "peak_source": peak_source,
               "rows": [{**{k: r["config"][k] for k in ("arch", "attention", "checkpointing", "optimizer", "zero",
                                                         "pairs")},
                         **{k: r.get(k) for k in ("pairs_per_s", "step_s", "mfu", "hfu", "peak_memory_gib",
                                                  "peak_rss_gib", "step_peak_over_setup_gib", "refused",
                                                  "error")}}
                        for r in rows]}
    print(json.dumps(summary))


def _measure(opts: dict, peak: float, peak_source: str, flops_cache: dict) -> dict:
    """One option set's measurements: its FLOPs (counted once per arch, pairs and checkpointing,
    cached in ``flops_cache``) and its timed run, each in a fresh subprocess."""
    key = (opts["arch"], opts["pairs"])
    for ckpt in {False, opts["checkpointing"]}:
        if key + (ckpt,) not in flops_cache:
            out = _subprocess(dict(opts, checkpointing=ckpt, count_flops=True)).stdout.strip().splitlines()
            flops_cache[key + (ckpt,)] = json.loads(out[-1])["flops"] if out else float("nan")
    proc = _subprocess(opts)
    row = {"model_flops_per_step": flops_cache[key + (False,)],
           "hardware_flops_per_step": flops_cache[key + (opts["checkpointing"],)],
           "peak_flops": peak, "peak_source": peak_source, "refused": None}
    try:
        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        row["mfu"] = row["model_flops_per_step"] / row["step_s"] / peak
        row["hfu"] = row["hardware_flops_per_step"] / row["step_s"] / peak
        row["error"] = None
    except (IndexError, json.JSONDecodeError):
        row["error"] = (proc.stderr or proc.stdout)[-2000:]
    return row


def _subprocess(opts: dict) -> subprocess.CompletedProcess:
    """One option set in a fresh interpreter (clean peak-memory counters)."""
    return subprocess.run([sys.executable, "-m", "sail.bench.train_step", "--one", json.dumps(opts)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def _line(row: dict) -> str:
    c = row["config"]
    what = f"{c['arch']:9s} {c['attention']:8s} ckpt={int(c['checkpointing'])} {c['optimizer']:9s} zero={c['zero']:5s} P={c['pairs']}"
    if row.get("refused"):
        return f"{what}  REFUSED {row['refused'][:160]}"
    if row["error"]:
        return f"{what}  ERROR {row['error'].strip().splitlines()[-1][:160]}"
    mem = row.get("peak_memory_gib", row.get("peak_rss_gib"))
    return (f"{what}  {row['pairs_per_s']:8.3f} pairs/s  step {row['step_s'] * 1e3:8.1f} ms  "
            f"MFU {100 * row['mfu']:5.2f}%  peak mem {mem:.2f} GiB")


if __name__ == "__main__":
    main()
