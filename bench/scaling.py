"""Cluster scaling model and per-GPU memory model for Diffusion-DPO training (SD1.5, SDXL).

    python -m sail.bench.scaling                       # both tables, markdown, + JSON last line
    python -m sail.bench.scaling --step-s 0.42         # use a measured single-GPU step time (s per micro-step)

FLOPs and activation bytes come from the real UNet graphs traced on PyTorch's meta device
(shapes only, no memory, no compute): ``FlopCounterMode`` for FLOPs, saved-tensor hooks for the
activations kept for backward. Everything else is arithmetic stated in bench/SCALING.md.

Communication per micro-step and rank (Psi = UNet parameters, 2 bytes in bf16):
  ZeRO-3: policy all-gather in forward (Psi) + again in backward (Psi) + gradient
          reduce-scatter (Psi) = 3 Psi, plus the reference's forward all-gather (Psi; a second
          ZeRO-3 engine, or the same UNet re-gathered in LoRA mode) = 4 Psi x 2 bytes.
  ZeRO-1/2: gradient reduce-scatter + all-gather of the updated bf16 weights once per optimizer
          step = 2 Psi x 2 bytes / grad_accum per micro-step (DDP all-reduce: the same volume).
A ring collective of S bytes over N ranks costs S (N-1)/N / busbw, with busbw the NVLink
bandwidth inside one node and min(NVLink, NIC bandwidth of a node) across nodes (NCCL runs one
ring per NIC; each ring crosses every node boundary once).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

import torch

from sail.bench.common import zero_refusal

GIB = 2 ** 30
# Interconnects: bytes/s of bus bandwidth a ring collective reaches (stated assumptions).
NVLINK = 360e9          # H100 SXM NVLink 4: 450 GB/s per direction, ~360 GB/s measured busbw (nccl-tests)
INTERCONNECTS = {"400Gb/s per node": 50e9, "3.2Tb/s per node": 400e9}
GPUS_PER_NODE = 8
H100_BF16 = 989.4e12    # dense bf16 tensor-core peak, H100 SXM
ASSUMED_MFU = 0.40      # for the compute time when no GPU measurement is given
ARCH_RES = {"sd15": 64, "sdxl": 128, "tiny-sd15": 16, "tiny-sdxl": 16}   # latent side


@dataclass
class Trace:
    params: int                 # UNet parameters
    fwd_flops: float            # one forward of one image
    act_bytes: float            # bytes saved for backward by one image's forward, no checkpointing
    act_bytes_ckpt: float       # the same with diffusers' block checkpointing (inputs + largest block)
    lora_params: int            # rank-8 adapters on to_q/k/v/out (the sd15_lora recipe)


def _meta_unet(arch: str, checkpointing: bool):
    from diffusers import UNet2DConditionModel

    from sail.engine.models import _unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**_unet_config(arch))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def _meta_inputs(unet, arch: str, dtype):
    side, cfg = ARCH_RES[arch], unet.config
    tokens = 16 if arch.startswith("tiny") else 77
    kw = {"encoder_hidden_states": torch.empty(1, tokens, cfg.cross_attention_dim, device="meta", dtype=dtype)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.empty(1, pooled, device="meta", dtype=dtype),
                                   "time_ids": torch.empty(1, 6, device="meta", dtype=dtype)}
    return torch.empty(1, 4, side, side, device="meta", dtype=dtype), torch.tensor([500], device="meta"), kw


class _FlashAttentionSaves(torch.autograd.Function):
    """Stand-in for SDPA while tracing saved bytes: saves what flash / memory-efficient attention
    keeps for backward on a GPU (q, k, v, out and a [B, H, L] fp32 logsumexp), not the [L, L]
    probabilities of the math path that the meta device would otherwise trace."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _saved_bytes(unet, arch: str, dtype=torch.float32, checkpointing: bool = False) -> float:
    """Bytes of the tensors autograd keeps for backward in one forward (parameters excluded).
    With checkpointing: the checkpointed blocks keep only their inputs, and one block at a time
    is recomputed in backward (its saved tensors counted once, for the largest block)."""
    params = {id(p) for p in unet.parameters()}
    state = {"outside": 0.0, "inputs": 0.0, "largest_block": 0.0}
    current = {"block": None}

    def pack(t):
        if id(t) not in params:
            nbytes = t.numel() * t.element_size()
            if current["block"] is None:
                state["outside"] += nbytes
            else:
                current["block"] += nbytes
        return t

    def run_block(module, *args):
        state["inputs"] += sum(a.numel() * a.element_size() for a in args if torch.is_tensor(a))
        current["block"] = 0.0
        out = module(*args)            # traced as if not checkpointed: its saves are the recompute's
        state["largest_block"] = max(state["largest_block"], current["block"])
        current["block"] = None
        return out

    if checkpointing:
        unet.enable_gradient_checkpointing(run_block)
    x, t, kw = _meta_inputs(unet, arch, dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, **_: _FlashAttentionSaves.apply(q, k, v)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(x, t, **kw)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    if not checkpointing:
        return state["outside"]
    return state["outside"] + state["inputs"] + state["largest_block"]


def trace(arch: str) -> Trace:
    from peft import LoraConfig

    from sail.engine.forecast import unet_forward_flops   # the stage-time forecast counts the same way
    from sail.engine.models import _unet_config

    unet = _meta_unet(arch, False)
    flops = unet_forward_flops(_unet_config(arch), ARCH_RES[arch], 16 if arch.startswith("tiny") else 77)
    act = _saved_bytes(unet, arch)
    act_ckpt = _saved_bytes(_meta_unet(arch, False), arch, checkpointing=True)
    params = sum(p.numel() for p in unet.parameters())
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    return Trace(params, flops, act, act_ckpt, lora)


# ----------------------------------------------------------------------------------------------
# Memory model
# ----------------------------------------------------------------------------------------------

# Optimizer bytes per trainable parameter, fp32 master weights included (mixed precision).
# Adafactor and AdamW8bit run only locally or at ZeRO-0 (engine/optim.py refuses them under ZeRO
# 1-3, see memory_table). Adafactor's 8 B is what ZeRO 1-3 gave it (flat 1-D partitions, v
# unfactored); at ZeRO-0 it steps fp32 copies of the real shapes and factors v: 8 B is an upper bound.
OPTIMIZER_BYTES = {
    "adamw": 4 + 4 + 4,                 # master + m + v (fp32)
    "adamw8bit": 4 + 1 + 1 + 8 / 256,   # master + two 8-bit moments + fp32 absmax per 256-block x2
    "adafactor": 4 + 4,                 # master + unfactored v (upper bound: ZeRO-0 factors v, see above)
}


def memory_per_gpu(tr: Trace, *, zero: int, optimizer: str, checkpointing: bool, pairs: int, world: int,
                   lora: bool = False, precision_bytes: int = 2) -> dict:
    """GiB per GPU by component, mixed precision (bf16 weights/grads, fp32 master + states).
    ZeRO-3 partitions policy and reference weights, gradients and states over ``world`` ranks;
    ZeRO-2 gradients and states; ZeRO-1 states; ZeRO-0 nothing. Arithmetic only: whether the
    engine runs ``optimizer`` at ``zero`` is not checked here (``memory_table`` marks refusals)."""
    psi = tr.params
    trainable = tr.lora_params if lora else psi
    n = max(world, 1)
    w_part = n if zero == 3 else 1
    g_part = n if zero >= 2 else 1
    s_part = n if zero >= 1 else 1
    policy_w = precision_bytes * psi / w_part
    reference_w = 0.0 if lora else precision_bytes * psi / w_part      # LoRA: the same UNet, adapters off
    grads = precision_bytes * trainable / g_part
    states = OPTIMIZER_BYTES[optimizer] * trainable / s_part
    # activations of the policy forward on 2 x pairs images, in the compute dtype
    per_image = (tr.act_bytes_ckpt if checkpointing else tr.act_bytes) * precision_bytes / 4
    acts = 2 * pairs * per_image
    out = {"policy_weights": policy_w, "reference_weights": reference_w, "grads": grads,
           "optimizer_states": states, "activations": acts}
    out = {k: v / GIB for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------------
# Scaling model
# ----------------------------------------------------------------------------------------------

def comm_bytes_per_microstep(params: int, zero: int, grad_accum: int, bytes_per: int = 2) -> float:
    if zero == 3:
        return 4 * params * bytes_per
    return 2 * params * bytes_per / grad_accum


def busbw(world: int, inter_node: float) -> float:
    return NVLINK if world <= GPUS_PER_NODE else min(NVLINK, inter_node)


def project(tr: Trace, *, zero: int, pairs: int, grad_accum: int, step_s: float | None, checkpointing: bool,
            worlds=(8, 16, 32, 64, 128, 256, 512)) -> list[dict]:
    """Pairs/s and efficiency per world size and interconnect; compute time per micro-step from
    ``step_s`` (measured, one GPU, no communication) or FLOPs at ASSUMED_MFU of an H100."""
    flops = pairs * tr.fwd_flops * (8 + (2 if checkpointing else 0))   # policy fwd+bwd(2+4) + ref fwd(2) (+recompute)
    compute = step_s if step_s is not None else flops / (H100_BF16 * ASSUMED_MFU)
    rows = []
    for label, inter in INTERCONNECTS.items():
        for n in worlds:
            comm = comm_bytes_per_microstep(tr.params, zero, grad_accum) * (n - 1) / n / busbw(n, inter)
            ideal = n * pairs / compute
            overlap, serial = n * pairs / max(compute, comm), n * pairs / (compute + comm)
            rows.append({"interconnect": label, "gpus": n, "compute_s": compute, "comm_s": comm,
                         "pairs_per_s_overlapped": overlap, "pairs_per_s_serial": serial,
                         "efficiency_overlapped": overlap / ideal, "efficiency_serial": serial / ideal})
    return rows


def _fmt_gib(x: float) -> str:
    return f"{x:.2f}" if x >= 0.01 else f"{x * 1024:.1f} MiB"


def memory_table(traces: dict) -> tuple[str, list]:
    """The per-GPU memory table and its rows. Option sets that ``engine/optim.py`` refuses
    (Adafactor and AdamW8bit under ZeRO 1-3) keep their arithmetic, marked ``(refused)`` in the
    table and with the engine's reason in the row's ``refused`` (None for the others)."""
    lines = ["| arch | ZeRO | ranks | optimizer | ckpt | pairs | weights (pol+ref) | grads | opt states | activations | total GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for arch, tr in traces.items():
        pairs = 1
        for zero, world in ((0, 8), (2, 8), (3, 8), (3, 64)):
            for opt in ("adamw", "adamw8bit", "adafactor"):
                refused = zero_refusal(opt, zero)
                for ckpt in (False, True):
                    m = memory_per_gpu(tr, zero=zero, optimizer=opt, checkpointing=ckpt, pairs=pairs, world=world)
                    rows.append({"arch": arch, "zero": zero, "world": world, "optimizer": opt, "ckpt": ckpt,
                                 "refused": refused, **m})
                    name = f"{opt} (refused)" if refused else opt
                    lines.append(f"| {arch} | {zero} | {world} | {name} | {int(ckpt)} | {pairs} | "
                                 f"{m['policy_weights'] + m['reference_weights']:.2f} | {m['grads']:.2f} | "
                                 f"{m['optimizer_states']:.2f} | {m['activations']:.2f} | {m['total']:.2f} |")
        m = memory_per_gpu(tr, zero=0, optimizer="adamw", checkpointing=False, pairs=pairs, world=8, lora=True)
        rows.append({"arch": arch, "zero": 0, "world": 8, "optimizer": "adamw", "ckpt": False, "lora": 8,
                     "refused": None, **m})
        lines.append(f"| {arch} LoRA r8 | 0 | 8 | adamw | 0 | {pairs} | {m['policy_weights']:.2f} | "
                     f"{_fmt_gib(m['grads'])} | {_fmt_gib(m['optimizer_states'])} | {m['activations']:.2f} | {m['total']:.2f} |")
    lines.append("\n(refused): engine/optim.py::check_update_exact refuses the optimizer at this ZeRO stage (its "
                 "update is not element-wise, so on flat partitions it would change with the world size); the "
                 "row is what it would take, kept as arithmetic; the engine's reason is in the JSON row's `refused`.")
    return "\n".join(lines), rows


def local_fp32_bytes(arch: str, optimizer: str) -> dict:
    """Exact analytic bytes of the one-process fp32 run that bench.train_step measures on CPU
    (local strategy: no master copy; optimizer states as each library lays them out)."""
    shapes = [tuple(p.shape) for p in _meta_unet(arch, False).parameters()]
    numels = [math.prod(s) for s in shapes]
    psi = sum(numels)
    if optimizer == "adamw":
        states = 8 * psi
    elif optimizer == "adamw8bit":   # bitsandbytes: 8-bit blockwise (256) from 4096 elements, else fp32
        states = sum(2 * n + 2 * 4 * math.ceil(n / 256) + 2 * 256 * 4 if n >= 4096 else 8 * n for n in numels)
    else:                            # transformers Adafactor on real shapes: factored rows + columns
        states = sum(4 * (math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1]) if len(s) >= 2 else 4 * n
                     for s, n in zip(shapes, numels))
    return {"params": 4 * psi, "grads": 4 * psi, "optimizer_states": states}


def tiny_comparison(results: str) -> str:
    """Analytic vs measured memory of the CPU rows of bench/results/train_step.jsonl (tiny
    architectures, local strategy, fp32, 1 pair)."""
    rows = [json.loads(line) for line in open(results)] if os.path.exists(results) else []
    rows = [r for r in rows if r.get("config", {}).get("zero") == "local" and not r.get("error")
            and r["config"]["arch"].startswith("tiny") and r["env"]["device_type"] == "cpu"]
    latest = {}
    for r in rows:                   # the newest row of each option set
        c = r["config"]
        latest[(c["arch"], c["optimizer"], c["checkpointing"], c["pairs"])] = r
    mib = lambda b: b / 2 ** 20  # noqa: E731
    lines = ["| arch | optimizer | ckpt | params+ref MiB (model / measured) | grads MiB | optimizer states MiB | "
             "activations MiB (model) | step peak RSS over setup MiB (measured) |", "|---|---|---|---|---|---|---|---|"]
    traces = {}
    for (arch, opt, ckpt, pairs), r in sorted(latest.items()):
        if arch not in traces:
            traces[arch] = trace(arch)
        model = local_fp32_bytes(arch, opt)
        acts = 2 * pairs * (traces[arch].act_bytes_ckpt if ckpt else traces[arch].act_bytes)
        measured_w = (r["params_gib"] + r.get("reference_params_gib", r["params_gib"])) * 1024
        lines.append(f"| {arch} | {opt} | {int(ckpt)} | {mib(2 * model['params']):.2f} / {measured_w:.2f} | "
                     f"{mib(model['grads']):.2f} / {r['grads_gib'] * 1024:.2f} | "
                     f"{mib(model['optimizer_states']):.2f} / {r['optimizer_states_gib'] * 1024:.2f} | "
                     f"{mib(acts):.2f} | {r['step_peak_over_setup_gib'] * 1024:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--results", default="bench/results/train_step.jsonl",
                        help="measured CPU rows for the tiny-architecture comparison")
    parser.add_argument("--step-s", type=float, default=None,
                        help="measured single-GPU compute time per micro-step (s); default: FLOPs at 40%% MFU")
    args = parser.parse_args(argv)
    traces = {arch: trace(arch) for arch in args.arch}
    for arch, tr in traces.items():
        print(f"{arch}: {tr.params / 1e9:.3f} B params, forward {tr.fwd_flops / 1e12:.3f} TFLOP/image, "
              f"saved activations {tr.act_bytes / GIB:.2f} GiB/image fp32 "
              f"({tr.act_bytes_ckpt / GIB:.2f} with checkpointing), LoRA r8 {tr.lora_params / 1e6:.2f} M params")
    table, mem_rows = memory_table(traces)
    print("\nMemory per GPU (GiB; bf16 weights/grads, fp32 master + states; 1 pair = 2 images per micro-step)\n")
    print(table)
    recipes = {"sdxl": dict(zero=3, pairs=1, grad_accum=1, checkpointing=True),
               "sd15": dict(zero=2, pairs=8, grad_accum=32, checkpointing=False)}
    projections = {}
    for arch, tr in traces.items():
        recipe = recipes.get(arch, recipes["sd15"])
        rows = project(tr, step_s=args.step_s, **recipe)
        projections[arch] = {"recipe": recipe, "rows": rows}
        print(f"\n{arch} (ZeRO-{recipe['zero']}, {recipe['pairs']} pair(s)/micro-step, accum {recipe['grad_accum']}, "
              f"ckpt {int(recipe['checkpointing'])}): compute {rows[0]['compute_s']:.3f} s per micro-step\n")
        print("| interconnect | GPUs | comm s | pairs/s (overlap) | eff. (overlap) | pairs/s (serial) | eff. (serial) |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['interconnect']} | {r['gpus']} | {r['comm_s']:.3f} | {r['pairs_per_s_overlapped']:.1f} | "
                  f"{100 * r['efficiency_overlapped']:.0f}% | {r['pairs_per_s_serial']:.1f} | "
                  f"{100 * r['efficiency_serial']:.0f}% |")
    comparison = tiny_comparison(args.results)
    print("\nTiny architectures, one CPU process, fp32: analytic model vs measured (bench.train_step rows)\n")
    print(comparison)
    print(json.dumps({"bench": "scaling", "traces": {a: t.__dict__ for a, t in traces.items()},
                      "assumptions": {"nvlink_busbw": NVLINK, "interconnects": INTERCONNECTS,
                                      "gpus_per_node": GPUS_PER_NODE, "peak_flops": H100_BF16,
                                      "assumed_mfu": ASSUMED_MFU if args.step_s is None else None,
                                      "step_s": args.step_s, "optimizer_bytes": OPTIMIZER_BYTES},
                      "memory": mem_rows, "projections": projections}))


if __name__ == "__main__":
    main()
