"""Peak host memory of the SAIL stages that read or write the candidate pool, at several pool
sizes (prompts) and N (candidates per prompt): does it grow with either?

    python -m sail.bench.stage_memory                     # the CPU grid: prompts 128 512, N 4 16
    python -m sail.bench.stage_memory --stages pair reads --prompts 128 512 --candidates 4 16
    python -m sail.bench.stage_memory --stages generate --gen-prompts 64 256 --gen-candidates 16

Stages: ``pair`` is ``build_pair_cache`` (one (winner, loser) per prompt); ``reads`` is
``Candidates.of_prompt`` of every prompt, the read pattern of the rank stage and of OnlineDPO's
``score_candidates_external``; ``generate`` is ``generate_candidates`` on a tiny random SD1.5
(``tiny-sd15``: text states [77, 32]) saved as a model folder. Candidates are written in
generate's format (``sail.chunk_prompts`` = 64 prompts a file) with SD1.5-sized tensors: latents
4x64x64 fp32 (64 KiB each), text states 77x768 fp16.

Each case runs in a fresh process (this module with ``--worker``), which reports
its RSS after its set-up (imports, the index, a one-prompt warm-up of generate), with the
high-water mark reset there, and the high-water mark (``VmHWM``, what ru_maxrss reports for a
single-threaded process) after the stage: ``peak_delta_MiB`` is the stage's own peak above
where it started.
File-backed pages of memory-mapped safetensors count while mapped, as the kernel counts them.
``generate`` also reports ``max_cond_rows``: the most conditioning rows handed to one
``sample_conditioned`` call. The last stdout line is one JSON object; rows are appended to
--out (default bench/results/stage_memory.jsonl) with device, versions, git sha and config.
"""
from __future__ import annotations

import argparse
import inspect
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from sail.bench.common import REPO, _git, environment

LATENT = (4, 64, 64)
HIDDEN = (77, 768)
CHUNK = 64


def _maxrss_mib() -> float:
    """This process's peak RSS since the last ``_reset_peak_mib`` (``VmHWM``: ru_maxrss keeps the
    peak of exited threads, which the reset does not clear)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _reset_peak_mib() -> float:
    """Reset the high-water mark to the current RSS (Linux: ``5 > /proc/self/clear_refs``) and
    return it: the imports' and the set-up's transient peaks would otherwise hide the stage's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _maxrss_mib()


def write_pool(folder: Path, prompts: int, n: int) -> Path:
    """Random candidates of ``prompts`` prompts x ``n`` in generate_candidates' files."""
    from sail.engine.io import write_safetensors
    from sail.engine.sail import _merge_candidates, chunk_file, prompt_chunks

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for rows in prompt_chunks(prompts, CHUNK):
        write_safetensors(folder / chunk_file(rows, ".safetensors"), {
            "latents": torch.randn(len(rows) * n, *LATENT, generator=g),
            "hidden": torch.randn(len(rows), *HIDDEN, generator=g).half(),
            "prompt_ids": torch.tensor(list(rows)),
            "seeds": torch.arange(rows.start * n, rows.stop * n, dtype=torch.int64)})
    _merge_candidates(folder, [f"prompt {p}" for p in range(prompts)], n)
    return folder


def write_seed_cache(folder: Path) -> Path:
    """An empty pair cache: build_pair_cache only copies its empty-prompt states."""
    from sail.engine.data.cache import finalize_cache, write_empty_prompt

    folder.mkdir(parents=True)
    write_empty_prompt(folder, torch.zeros(1, *HIDDEN), None)
    finalize_cache(folder, 0, {"version": 1, "kind": "sd15"})
    return folder


def write_model(folder: Path) -> Path:
    from sail.engine.models import build_components, save_model_folder

    comps = build_components("tiny-sd15", seed=0)
    save_model_folder(folder, comps.unet.state_dict(), dict(comps.unet.config), comps, source=None)
    return folder


# --------------------------------------------------------------------------------------------
# one case, in its own process
# --------------------------------------------------------------------------------------------

def _pair_stage(case: dict) -> dict:
    from sail.engine import sail
    from sail.engine.data.cache import PairCache

    cands, seed_cache = sail.Candidates(Path(case["pool"])), PairCache(case["seed_cache"])
    n, prompts = cands.n, len(cands.prompts)
    pairs = {"prompt_idx": list(range(prompts)), "winner": [p % n for p in range(prompts)],
             "loser": [(p + 1) % n for p in range(prompts)]}
    kw = {}
    if "shard_pairs" in inspect.signature(sail.build_pair_cache).parameters:
        kw["shard_pairs"] = case["shard_pairs"]
    before = _reset_peak_mib()
    sail.build_pair_cache(cands, pairs, seed_cache, Path(case["out"]), **kw)
    return {"rss_before_MiB": before, "rss_peak_MiB": _maxrss_mib()}


def _reads_stage(case: dict) -> dict:
    from sail.engine import sail

    cands = sail.Candidates(Path(case["pool"]))
    before = _reset_peak_mib()
    total = 0.0
    for p in range(len(cands.prompts)):
        latents, hidden, _ = cands.of_prompt(p)
        total += float(latents[:, 0, 0, 0].sum()) + float(hidden[0, 0, 0])
    return {"rss_before_MiB": before, "rss_peak_MiB": _maxrss_mib()}


def _generate_stage(case: dict) -> dict:
    from sail.engine import sail, sampling
    from sail.engine.config import SailConfig, SamplingConfig
    from sail.engine.ranks import single_process

    rows, inner = [], sampling.sample_conditioned

    def counted(unet, noise_scheduler, cond, *args, **kw):
        rows.append(cond.hidden.shape[0])
        return inner(unet, noise_scheduler, cond, *args, **kw)

    sampling.sample_conditioned = counted
    cfg = SailConfig(candidates=case["candidates"], chunk_prompts=CHUNK, precision="fp32",
                     sampling=SamplingConfig(sampler="ddim", steps=case["steps"], guidance_scale=5.0,
                                             batch_size=case["batch_size"]))
    out = Path(case["out"])
    sail.generate_candidates(case["model"], ["warm up"], SailConfig(candidates=2, precision="fp32",
                             sampling=SamplingConfig(steps=1, batch_size=2)), out / "warmup", seed=0, iteration=1,
                             ranks=single_process())
    rows.clear()
    prompts = [f"w{p % 50} w{(3 * p) % 50} w{(7 * p) % 50}" for p in range(case["prompts"])]
    before = _reset_peak_mib()
    sail.generate_candidates(case["model"], prompts, cfg, out / "candidates", seed=0, iteration=1,
                             ranks=single_process())
    return {"rss_before_MiB": before, "rss_peak_MiB": _maxrss_mib(), "max_cond_rows": max(rows),
            "sampler_calls": len(rows)}


STAGES = {"pair": _pair_stage, "reads": _reads_stage, "generate": _generate_stage}


def run_case(case: dict) -> dict:
    """``case`` in a fresh interpreter; its JSON result, with the stage's peak delta."""
    proc = subprocess.run([sys.executable, "-m", "sail.bench.stage_memory", "--worker", json.dumps(case)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed on {case}:\n{proc.stderr[-3000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    got["peak_delta_MiB"] = round(got["rss_peak_MiB"] - got["rss_before_MiB"], 1)
    return got


def _report(result: dict, keys: tuple) -> dict:
    print(json.dumps({k: result[k] for k in ("stage", "prompts", "candidates", "peak_delta_MiB", *keys)}), flush=True)
    return result


def pool_cases(args, root: Path) -> list[dict]:
    """The pair and reads stages over pools of every (prompts, N), written once each."""
    seed_cache, results = write_seed_cache(root / "seed_cache"), []
    latent_mib = LATENT[0] * LATENT[1] * LATENT[2] * 4 / 2**20
    for stage in [s for s in args.stages if s != "generate"]:
        for prompts in args.prompts:
            for n in args.candidates:
                pool = root / f"pool_{prompts}_{n}"
                if not pool.exists():
                    write_pool(pool, prompts, n)
                case = {"stage": stage, "prompts": prompts, "candidates": n, "pool": str(pool),
                        "seed_cache": str(seed_cache), "out": str(root / f"out_{stage}_{prompts}_{n}"),
                        "shard_pairs": args.shard_pairs}
                results.append(_report({**case, **run_case(case), "latent_MiB": latent_mib,
                                        "pool_latents_MiB": prompts * n * latent_mib}, ("pool_latents_MiB",)))
    return results


def generate_cases(args, root: Path) -> list[dict]:
    model, results = write_model(root / "model"), []
    for prompts in args.gen_prompts:
        case = {"stage": "generate", "prompts": prompts, "candidates": args.gen_candidates, "model": str(model),
                "out": str(root / f"gen_{prompts}"), "steps": args.gen_steps, "batch_size": args.gen_batch}
        results.append(_report({**case, **run_case(case)}, ("max_cond_rows",)))
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=["pair", "reads", "generate"], choices=list(STAGES))
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 512], help="pool sizes (pair, reads)")
    parser.add_argument("--candidates", type=int, nargs="+", default=[4, 16], help="N (pair, reads)")
    parser.add_argument("--shard-pairs", type=int, default=64, help="pairs per pair-cache shard, where supported")
    parser.add_argument("--gen-prompts", type=int, nargs="+", default=[64, 256], help="pool sizes (generate)")
    parser.add_argument("--gen-candidates", type=int, default=16, help="N (generate)")
    parser.add_argument("--gen-steps", type=int, default=2)
    parser.add_argument("--gen-batch", type=int, default=16, help="sail.sampling.batch_size (generate)")
    parser.add_argument("--label", default="", help="free text kept with the row (e.g. before / after)")
    parser.add_argument("--out", default="bench/results/stage_memory.jsonl")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        torch.set_num_threads(1)
        case = json.loads(args.worker)
        print(json.dumps(STAGES[case["stage"]](case)))
        return
    root = Path(tempfile.mkdtemp(prefix="stage_memory_"))
    try:
        results = pool_cases(args, root) + (generate_cases(args, root) if "generate" in args.stages else [])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    env = environment(torch.device("cpu"))
    env["git_dirty_engine"] = bool(_git("status", "--porcelain", "--", "engine/sail.py"))
    config = {k: v for k, v in vars(args).items() if k != "worker"}
    row = {"bench": "stage_memory", "label": args.label, "config": config, "env": env, "cases": [
        {k: v for k, v in r.items() if k not in ("pool", "seed_cache", "out", "model")} for r in results]}
    with open(Path(REPO) / args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
