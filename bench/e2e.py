"""End-to-end stage timings: the work of each SAIL stage, eager against compiled, fp32 against bf16.

    python -m sail.bench.e2e                           # toy world + tiny SD1.5, every stage, 4 variants
    python -m sail.bench.e2e --worlds toy --stages sample --variants fp32-eager fp32-compiled
    python -m sail.bench.e2e --main-job                # the main job itself, stage by stage (minutes)
    python -m sail.bench.e2e --main-job --set train.compile=true --set sail.compile=true

Per (world, stage, variant) it times one unit of the stage's work as the stage does it:
``sample`` (generation and evaluation: ``sampling.sample_latents``, DDIM 20 steps with CFG),
``rank`` (``sail.reward_prompt``: N candidates x K draws, current model and reference), ``train``
(``trainer.dpo_forward`` + backward + AdamW step on the local strategy). Worlds: ``toy`` (the
shipped toy base model, the main job's shapes) and ``tiny-sd15`` (a random-weight tiny SD1.5,
latents 4x32x32). Variants: ``{fp32,bf16}-{eager,compiled}``. For each: the first call (with a
compiled variant, its compilation: each variant starts from a reset dynamo cache, though inductor's
on-disk cache may serve kernels compiled by an earlier run), the median of the timed calls after
it, and the graph breaks dynamo finds in the stage's UNet call (``compilation.graph_breaks``).

``--main-job`` runs ``launch/train.py --config toy_cpu.json`` (plus ``--set`` overrides) in a
fresh run directory and reads each stage's seconds from the run's manifest, the toy data build
from its log line; run it alone on the machine.

Every row is appended to ``--out`` (default ``bench/results/e2e.jsonl``) with ``env`` (device,
versions, git sha) as the other benchmarks write it; a table is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sail.bench.common import REPO, environment

VARIANTS = ("fp32-eager", "fp32-compiled", "bf16-eager", "bf16-compiled")
STAGES = ("sample", "rank", "train")
WORLDS = ("toy", "tiny-sd15")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# the models and shapes of each world
# --------------------------------------------------------------------------------------------

def _world(name: str):
    """(unet, noise scheduler, latent shape, text states [1, L, D], vae factor) in fp32."""
    from sail.engine.models import build_components, load_components

    if name == "toy":
        comps = load_components(Path(REPO) / "engine" / "toy" / "base_model", with_vae=False, with_text=False)
        vae_factor = 1
    else:
        comps = build_components(name, 0)
        vae_factor = comps.vae_factor
    cfg = comps.unet.config
    side = int(cfg.sample_size)
    g = torch.Generator().manual_seed(0)
    tokens = 8 if name == "toy" else 77
    hidden = torch.randn(1, tokens, cfg.cross_attention_dim, generator=g)
    return comps.unet.eval(), comps.noise_scheduler, (int(cfg.in_channels), side, side), hidden, vae_factor


def _unit(world: str, stage: str, variant: str, args):
    """(callable doing one unit of the stage's work, the UNet call's example inputs, a description)."""
    from sail.engine.compilation import compile_module, compile_training

    precision, mode = variant.split("-")
    dtype, compiled = DTYPES[precision], mode == "compiled"
    unet, sched, shape, hidden, vae_factor = _world(world)
    g = torch.Generator().manual_seed(1)
    if stage == "sample":
        from sail.engine.sampling import sample_latents, sampling_scheduler

        unet = compile_module(unet.to(dtype), f"{world} sampling UNet", compiled)
        n = args.images
        cond, uncond = hidden.expand(n, -1, -1), torch.randn(1, *hidden.shape[1:], generator=g)
        sampler = sampling_scheduler(sched, "ddim")
        fn = lambda: sample_latents(unet, sampler, cond, uncond, list(range(n)), num_steps=args.sample_steps,  # noqa: E731
                                    guidance_scale=1.5, latent_shape=shape, batch_size=n)
        example = (torch.randn(2 * n, *shape, dtype=dtype), torch.full((2 * n,), 500),
                   torch.cat([uncond.expand(n, -1, -1), cond]).to(dtype))
        return fn, unet, example, {"images": n, "steps": args.sample_steps, "unet_rows": 2 * n}
    if stage == "rank":
        from sail.engine.sail import reward_prompt

        cur = compile_module(unet.to(dtype), f"{world} ranked UNet", compiled)
        ref, *_ = _world(world)
        ref = compile_module(ref.eval().to(dtype), f"{world} ranking reference", compiled)
        latents = [torch.randn(args.candidates, *shape, generator=g) for _ in range(args.prompts)]

        def fn():
            for p, lat in enumerate(latents):
                reward_prompt(cur, ref, sched, lat, hidden, None, draws=args.draws, beta=2000.0, seed=p,
                              batch=args.candidates * args.draws, vae_factor=vae_factor, t_range=(0.7, 1.0))
        rows = args.candidates * args.draws
        example = (torch.randn(rows, *shape, dtype=dtype), torch.full((rows,), 800), hidden.expand(rows, -1, -1).to(dtype))
        return fn, cur, example, {"prompts": args.prompts, "candidates": args.candidates, "draws": args.draws,
                                  "unet_rows": rows}
    # train: the local strategy's step as the trainer takes it
    from sail.engine.config import DistributedConfig, OptimizerConfig, TrainConfig
    from sail.engine.data.cache import PairBatch
    from sail.engine.strategy import LocalStrategy
    from sail.engine.trainer import dpo_forward

    pairs = args.pairs
    ref, *_ = _world(world)
    ref.load_state_dict(unet.state_dict())
    strategy = LocalStrategy(TrainConfig(precision=precision, micro_batch_pairs=pairs, steps=10 ** 6,
                                         optimizer=OptimizerConfig(name="adamw", lr=1e-5)), DistributedConfig())
    strategy.prepare(unet.train(), ref, 10 ** 6, pairs)
    compile_training(strategy, compiled)
    batch = PairBatch(torch.randn(pairs, *shape, generator=g), torch.randn(pairs, *shape, generator=g),
                      hidden.expand(pairs, -1, -1).clone(), None)
    t = torch.randint(0, 1000, (pairs,), generator=g)
    noise = torch.randn(pairs, *shape, generator=g)
    empty = torch.zeros(pairs, dtype=torch.bool)

    def fn():
        out = dpo_forward(strategy, sched, batch, t, noise, empty, torch.zeros_like(hidden), None, 2000.0)
        strategy.backward(out.loss)
        strategy.step()
    example = (torch.randn(2 * pairs, *shape), torch.cat([t, t]), hidden.expand(2 * pairs, -1, -1))
    return fn, strategy.policy, example, {"pairs": pairs, "unet_rows": 2 * pairs}


def run_case(world: str, stage: str, variant: str, args) -> dict:
    from sail.engine.compilation import graph_breaks, is_compiled

    torch._dynamo.reset()
    fn, module, example, unit = _unit(world, stage, variant, args)
    breaks, reasons = (None, [])
    if variant == "fp32-eager" and not args.no_breaks:     # once per (world, stage): fp32, the stage's shapes
        x, t, h = example
        grad = torch.enable_grad() if stage == "train" else torch.no_grad()
        with grad:
            breaks, reasons = graph_breaks(lambda: module(x, t, encoder_hidden_states=h).sample)
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"bench": "e2e", "world": world, "stage": stage, "variant": variant, "unit": unit,
            "first_call_s": first, "s_median": statistics.median(times), "s_min": min(times),
            "repeats": args.repeats, "compiled": is_compiled(module), "graph_breaks": breaks,
            "break_reasons": reasons[:5]}


# --------------------------------------------------------------------------------------------
# the main job, stage by stage
# --------------------------------------------------------------------------------------------

def main_job(overrides: list[str], run_root: Path, data_dir: str | None) -> dict:
    """Run the toy main job in a fresh run directory; seconds per stage from its manifest."""
    run_dir = run_root / "run"
    cmd = [sys.executable, str(Path(REPO) / "launch" / "train.py"), "--config", "toy_cpu.json",
           "--run-dir", str(run_dir)]
    if data_dir:
        cmd += ["--set", f"toy.data_dir={json.dumps(data_dir)}"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(run_root), capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the main job failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = {}
    for key, rec in manifest.get("stages", manifest).items():
        if isinstance(rec, dict) and "seconds" in rec:
            stages[key] = rec["seconds"]
    built = re.search(r"toy data in \S+: .*\(([\d.]+) s\)", proc.stderr)
    if built:
        stages["toy data build"] = float(built.group(1))
    metrics = {}
    for path in sorted(run_dir.glob("**/eval/metrics.json")) + sorted(run_dir.glob("base_eval/metrics.json")):
        m = json.loads(path.read_text())
        metrics[str(path.parent.relative_to(run_dir))] = {k: m.get(k) for k in ("oracle/mean", "fidelity/all",
                                                                                "diversity/mean")}
    return {"bench": "e2e-main-job", "overrides": overrides, "stages_s": stages, "total_s": total,
            "metrics": metrics}


def _print_table(rows: list[dict]) -> None:
    base = {(r["world"], r["stage"]): r["s_median"] for r in rows if r["variant"] == "fp32-eager"}
    print(f"{'world':10s} {'stage':7s} {'variant':14s} {'first call s':>12s} {'median s':>9s} {'x fp32-eager':>12s} "
          f"{'breaks':>6s}")
    for r in rows:
        ref = base.get((r["world"], r["stage"]))
        ratio = f"{ref / r['s_median']:.2f}" if ref else "-"
        breaks = "-" if r["graph_breaks"] is None else str(r["graph_breaks"])
        print(f"{r['world']:10s} {r['stage']:7s} {r['variant']:14s} {r['first_call_s']:12.2f} {r['s_median']:9.3f} "
              f"{ratio:>12s} {breaks:>6s}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", nargs="+", choices=WORLDS, default=list(WORLDS))
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--images", type=int, default=256, help="sample: images per call (one UNet batch, x2 CFG)")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=4, help="rank: prompts per call")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=16, help="train: pairs per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-breaks", action="store_true", help="skip the graph-break count")
    parser.add_argument("--main-job", action="store_true", help="run the toy main job and time its stages")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="--main-job: a config override")
    parser.add_argument("--toy-data", default=None, help="--main-job: an existing toy data folder (else built)")
    parser.add_argument("--keep", default=None, help="--main-job: run in this folder and keep it (default: a temp folder)")
    parser.add_argument("--out", default=str(Path(REPO) / "bench" / "results" / "e2e.jsonl"))
    args = parser.parse_args(argv)

    from sail.launch.entry import process_defaults

    process_defaults()
    env = environment(torch.device("cpu"))
    rows = []
    if args.main_job:
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            rows.append(main_job(args.overrides, Path(args.keep), args.toy_data))
        else:
            with tempfile.TemporaryDirectory(prefix="sail_e2e_") as tmp:
                rows.append(main_job(args.overrides, Path(tmp), args.toy_data))
        print(json.dumps(rows[-1], indent=1))
    else:
        for world in args.worlds:
            for stage in args.stages:
                for variant in args.variants:
                    rows.append(run_case(world, stage, variant, args))
                    r = rows[-1]
                    print(f"{world} {stage} {variant}: first {r['first_call_s']:.2f} s, median {r['s_median']:.3f} s, "
                          f"breaks {r['graph_breaks']}", flush=True)
        _print_table(rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps({**row, "env": env}) + "\n")


if __name__ == "__main__":
    main()
