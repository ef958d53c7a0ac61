"""Diffusion-DPO training throughput, ours against the references, in one sitting on one machine.

    python -m sail.bench.lora_dpo --example /tmp/diffusers_dpo/train_diffusion_dpo.py
    python -m sail.bench.lora_dpo --example PATH --modes lora --precision bf16 --compile --steps 60
    python -m sail.bench.lora_dpo --modes full --official-encode cached

Two comparisons on the same tiny SD1.5 folder (``build_components("tiny-sd15")``, VAE factor 2)
and the same Pick-a-Pic v2 parquet (``tests/datagen.py``: random images of ``--image-size``
pixels), both built in a work folder, at the same resolution, batch and precision:

* ``lora``: ours (``launch/train.py``, ``model.lora.rank`` = ``--lora-rank``) against the
  diffusers example ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``, whose
  path is ``--example`` (it is never copied into this repository). Both put peft adapters of
  that rank (alpha = rank, gaussian init) on to_q/to_k/to_v/to_out.0, and both take the
  reference as the UNet with its adapters off. The example runs through
  ``bench/diffusers_example.py``: a step clock and stand-ins for wandb / torchvision / datasets
  where this environment cannot import them (see that file).
* ``full``: ours (``model.lora.rank`` 0) against ``official_style_full`` below: full fine-tuning
  as the official Diffusion-DPO train.py runs it (policy and separate reference UNet forward,
  the eager loss of ``tests/engine/test_losses.py``, AdamW), written here from the method.

What each side does per step is what its user gets, and differs on purpose: ours pre-encodes
the images (VAE) and captions (text encoder) once in its encode stage, reported apart as
``encode_s``, and syncs the host only at log steps; the example and the official-style loop
decode, resize and encode every batch at every step (``--official-encode cached`` encodes once
before the loop instead, to isolate the training step) and read their loss every step.

Throughput is steady state: the pairs of steps ``warmup+1 .. steps`` over the wall time between
the ends of step ``warmup`` and step ``steps``, start-up and compilation excluded. Ours: from
``pairs_per_s`` of the ``metrics.json`` history rows (logged at steps ``warmup``, ``2 warmup``,
..., ``steps``; each row's value is pairs since the loop started over seconds since then, so
the time of step k is ``batch k / pairs_per_s(k)``). Example and official-style: a
``perf_counter`` stamp after each step's host sync.

Every run is a fresh subprocess with ``OMP_NUM_THREADS=--threads``; every row is appended to
``--out`` with ``env`` (device, versions, git sha), and the last stdout line is one JSON object
with the ratios (ours over the reference). Run from the repository root.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sail.bench.common import REPO, environment

BETA = 5000.0
LR = {"lora": 5e-4, "full": 1e-5}          # the example's default LoRA lr; a full fine-tuning lr
BASELINE = {"lora": "diffusers_example", "full": "official_style"}


@dataclass(frozen=True)
class Settings:
    """What every run of one benchmark shares (written into each row's ``config``)."""

    resolution: int
    batch: int
    """Pairs per optimizer step (2x images), one process, no accumulation."""
    steps: int
    warmup: int
    """Steps excluded from the throughput (start-up, allocator warm-up, compilation)."""
    precision: str
    """fp32, or bf16: autocast over fp32 trainable weights for ours and the official-style loop
    (frozen reference, VAE and text encoder cast to bf16 there); the example's
    ``--mixed_precision bf16``, which casts its whole UNet to bf16 before adding the adapters
    (peft gives them their layer's dtype; the script upcasts them to fp32 only under fp16)."""
    compile: bool
    """``train.compile`` for ours; the references run eagerly."""
    lora_rank: int
    pairs: int
    """Rows of the parquet (pairs encoded by ours once, cycled through by every side)."""
    image_size: int
    threads: int
    seed: int
    official_encode: str


@dataclass(frozen=True)
class Inputs:
    """The one model folder and data set every run reads."""

    model: str
    data_dir: str
    """Holds ``train-00000-of-00001.parquet``: split "train" by the datasets naming rule."""
    parquet: str


# ----------------------------------------------------------------------------------------------
# Inputs and subprocesses
# ----------------------------------------------------------------------------------------------

def build_inputs(work: Path, s: Settings) -> Inputs:
    """The tiny SD1.5 folder (seeded random weights) and a Pick-a-Pic v2 parquet of ``s.pairs``
    rows (no ties, labels alternating) with ``s.image_size`` pixel PNGs."""
    from sail.engine.models import build_components, save_model_folder
    from tests.datagen import pickapic_rows, write_pickapic

    comps = build_components("tiny-sd15", seed=s.seed)
    model = work / "model"
    save_model_folder(model, comps.unet.state_dict(), dict(comps.unet.config), comps, source=None)
    data_dir = work / "pickapic"
    data_dir.mkdir(parents=True, exist_ok=True)
    parquet = write_pickapic(data_dir / "train-00000-of-00001.parquet",
                             pickapic_rows(s.pairs, seed=s.seed, size=(s.image_size, s.image_size)))
    return Inputs(str(model), str(data_dir), parquet)


def child_env(threads: int) -> dict:
    """Offline hubs and the same CPU thread count for every side (ours honours OMP_NUM_THREADS,
    ``launch/entry.py``; the others take torch's reading of it)."""
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")


def run_logged(cmd: list[str], folder: Path, s: Settings) -> tuple[str | None, float]:
    """Run ``cmd`` from the repository root, output to ``folder/log.txt``; (error or None, wall s)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=child_env(s.threads)).returncode
    wall = time.perf_counter() - t0
    if rc == 0:
        return None, wall
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    return f"exit {rc} (log {log}):\n" + "\n".join(tail), wall


def steady(stamps: dict[int, float], s: Settings) -> dict:
    """Pairs/s between the ends of step ``s.warmup`` and of the last step, from {step: seconds}."""
    first = min(k for k in stamps if k >= s.warmup)
    last = max(stamps)
    if last <= first:
        raise ValueError(f"no timed steps: stamps at {sorted(stamps)}")
    seconds = stamps[last] - stamps[first]
    return {"pairs_per_s": s.batch * (last - first) / seconds, "step_s": seconds / (last - first),
            "timed_steps": [first + 1, last], "timed_s": seconds}


def _failed(error: str, wall: float) -> dict:
    return {"pairs_per_s": None, "error": error, "wall_s": wall}


# ----------------------------------------------------------------------------------------------
# Ours: launch/train.py
# ----------------------------------------------------------------------------------------------

def sail_config(inputs: Inputs, mode: str, s: Settings, run_dir: Path) -> dict:
    """One Diffusion-DPO stage of ``s.steps`` steps on the local strategy; history rows at steps
    ``warmup, 2 warmup, ..., steps`` (the only host syncs of our loop)."""
    return {
        "name": f"bench_{mode}", "method": "dpo", "seed": s.seed, "run_dir": str(run_dir),
        "model": {"path": inputs.model, "attention": "sdpa",
                  "lora": {"rank": s.lora_rank if mode == "lora" else 0}},
        "data": {"train": [inputs.parquet], "resolution": s.resolution, "encode_batch_size": 8},
        "train": {"beta": BETA, "steps": s.steps, "micro_batch_pairs": s.batch, "grad_accum": 1,
                  "clip_grad_norm": 1.0, "precision": s.precision, "compile": s.compile, "log_every": s.warmup,
                  "optimizer": {"name": "adamw", "lr": LR[mode], "weight_decay": 1e-2}},
        "distributed": {"backend": "local"},
        "eval": {"enabled": False},
    }


def run_sail(inputs: Inputs, mode: str, s: Settings, folder: Path) -> dict:
    """Ours end to end (encode, train, save); throughput from the history of ``metrics.json``."""
    from sail.engine.io import read_json
    from sail.engine.layout import RunLayout
    from sail.engine.manifest import Manifest

    run_dir = folder / "run"
    config = folder / "config.json"
    folder.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(sail_config(inputs, mode, s, run_dir), indent=2))
    error, wall = run_logged([sys.executable, "launch/train.py", "--config", str(config)], folder, s)
    if error:
        return _failed(error, wall)
    history = read_json(RunLayout(run_dir).train_metrics(0))["history"]
    stamps = {row["step"]: s.batch * row["step"] / row["pairs_per_s"] for row in history}
    manifest = Manifest(run_dir)
    encode_s = manifest.get(0, "encode")["seconds"]
    row = {**steady(stamps, s), "wall_s": wall, "encode_s": encode_s, "encode_pairs": s.pairs,
           "train_stage_s": manifest.get(0, "train")["seconds"], "error": None}
    # one epoch's encode spread over one epoch of training: what a single pass over the data costs
    row["pairs_per_s_with_encode"] = 1.0 / (1.0 / row["pairs_per_s"] + encode_s / s.pairs)
    return row


# ----------------------------------------------------------------------------------------------
# The diffusers example (LoRA)
# ----------------------------------------------------------------------------------------------

def example_args(inputs: Inputs, s: Settings, folder: Path) -> list[str]:
    """The example's flags for the same model, data, resolution, batch, rank, steps and precision;
    no checkpoint inside the run, no validation, data loading in the main process (its default)."""
    return ["--pretrained_model_name_or_path", inputs.model,
            "--dataset_name", inputs.data_dir, "--dataset_split_name", "train",
            "--cache_dir", str(folder / "hf_cache"), "--output_dir", str(folder / "output"),
            "--resolution", str(s.resolution), "--train_batch_size", str(s.batch), "--rank", str(s.lora_rank),
            "--max_train_steps", str(s.steps), "--checkpointing_steps", str(s.steps + 1),
            "--learning_rate", str(LR["lora"]), "--lr_scheduler", "constant", "--beta_dpo", str(int(BETA)),
            "--mixed_precision", "bf16" if s.precision == "bf16" else "no", "--seed", str(s.seed),
            "--report_to", "tensorboard"]


def run_clocked(cmd: list[str], timing: Path, folder: Path, s: "Settings", stand_ins: bool) -> dict:
    """Run a reference side that stamps each step into ``timing``; its steady-state row."""
    error, wall = run_logged(cmd, folder, s)
    if error:
        return _failed(error, wall)
    clock = json.loads(timing.read_text())
    stamps = {int(step): t for step, t in clock["steps"]}
    row = {**steady(stamps, s), "wall_s": wall, "to_first_step_s": stamps[min(stamps)] - clock["start"],
           "encode_s": clock.get("encode_s"), "error": None}
    if stand_ins:
        row["stand_ins"] = clock["stand_ins"]
    return row


def run_example(example: str, inputs: Inputs, s: Settings, folder: Path) -> dict:
    timing = folder / "steps.json"
    cmd = [sys.executable, "-m", "sail.bench.diffusers_example", "--example", example, "--timing-out", str(timing),
           "--", *example_args(inputs, s, folder)]
    return run_clocked(cmd, timing, folder, s, stand_ins=True)


# ----------------------------------------------------------------------------------------------
# Official-style full fine-tuning (our code, written from the method)
# ----------------------------------------------------------------------------------------------

def _pixels(data: bytes, resolution: int) -> torch.Tensor:
    """One image: shorter side to ``resolution`` (bilinear), centre crop, [-1, 1], [3, H, W]."""
    import io

    import numpy as np
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    scale = resolution / min(img.size)
    img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
                     Image.BILINEAR)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def pixel_pairs(table, rows: list[int], resolution: int) -> tuple[torch.Tensor, list[str]]:
    """[2B, 3, H, W] laid out [winners; losers] (``label_0`` 1: jpg_0 won), and the captions."""
    batch = table.take(rows).to_pydict()
    won, lost = [], []
    for a, b, label0 in zip(batch["jpg_0"], batch["jpg_1"], batch["label_0"]):
        w, l = (a, b) if label0 == 1 else (b, a)
        won.append(_pixels(w, resolution))
        lost.append(_pixels(l, resolution))
    return torch.stack(won + lost), batch["caption"]


def _load_official_models(folder: str, device: torch.device, frozen: torch.dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    policy = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device).train()
    reference = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device, frozen)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").to(device, frozen)
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").to(device, frozen)
    for module in (reference, vae, text):
        module.requires_grad_(False).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"official-style loop: epsilon prediction only, got {scheduler.config.prediction_type}")
    return policy, reference, vae, text, tokenizer, scheduler


def official_style_full(opts: dict) -> None:
    """Full-UNet Diffusion-DPO the way the official train.py (SalesforceAIResearch/DiffusionDPO)
    runs it: a trainable policy (fp32 weights, bf16 autocast under bf16) and a separate frozen
    reference UNet (cast to the compute dtype) predict the noise of [winners; losers] at shared
    timesteps and noise; per step the batch is decoded and VAE/text-encoded (``encode`` "step"),
    or read from tensors encoded once before the loop ("cached"); the eager loss
    ``-log sigmoid(-beta/2 ((e_w - e_ref_w) - (e_l - e_ref_l)))`` (tests/engine/test_losses.py);
    clipping at 1, AdamW, and one host sync per step (``loss.item()``, the official loop reads
    its loss every step to log it). Writes {"start", "steps": [[step, t]], "encode_s"} to
    ``opts["timing_out"]``."""
    import pyarrow.parquet as pq

    from tests.engine.test_losses import official_diffusion_dpo_loss

    start = time.perf_counter()
    torch.manual_seed(opts["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = opts["precision"] == "bf16"
    frozen = torch.bfloat16 if bf16 else torch.float32
    policy, reference, vae, text, tokenizer, scheduler = _load_official_models(opts["model"], device, frozen)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR["full"], weight_decay=1e-2)
    table, batch = pq.read_table(opts["parquet"]), opts["batch"]

    @torch.no_grad()
    def encode(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, captions = pixel_pairs(table, rows, opts["resolution"])
        ids = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        latents = vae.encode(pixels.to(device, frozen)).latent_dist.sample() * vae.config.scaling_factor
        return latents, text(ids.to(device))[0]

    g = torch.Generator().manual_seed(opts["seed"])
    epochs = math.ceil(opts["steps"] * batch / table.num_rows)
    order = torch.cat([torch.randperm(table.num_rows, generator=g) for _ in range(epochs)]).tolist()
    cache, encode_s = None, None
    if opts["encode"] == "cached":      # winners, losers and captions of every pair, encoded in batches
        t0 = time.perf_counter()
        chunks = [encode(list(range(i, min(i + batch, table.num_rows)))) for i in range(0, table.num_rows, batch)]
        latents_w, latents_l = (torch.cat([lat.chunk(2)[k] for lat, _ in chunks]) for k in (0, 1))
        cache = (latents_w, latents_l, torch.cat([hidden for _, hidden in chunks]))
        encode_s = time.perf_counter() - t0
    stamps = []
    for step in range(1, opts["steps"] + 1):
        rows = order[(step - 1) * batch: step * batch]
        if cache is None:
            latents, hidden = encode(rows)
        else:
            latents, hidden = torch.cat([cache[0][rows], cache[1][rows]]), cache[2][rows]
        noise = torch.randn_like(latents[:batch]).repeat(2, 1, 1, 1)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device).repeat(2)
        x_t = scheduler.add_noise(latents, noise, t)
        hidden2 = hidden.repeat(2, 1, 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model_pred = policy(x_t, t, hidden2).sample
            with torch.no_grad():
                ref_pred = reference(x_t, t, hidden2).sample
        loss, _ = official_diffusion_dpo_loss(model_pred.float(), ref_pred.float(), noise.float(), BETA)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()       # the per-step host sync of the official loop's logging
        stamps.append([step, time.perf_counter()])
    Path(opts["timing_out"]).write_text(json.dumps({"start": start, "steps": stamps, "encode_s": encode_s}))


def run_official(inputs: Inputs, s: Settings, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    timing = folder / "steps.json"
    opts = {"model": inputs.model, "parquet": inputs.parquet, "resolution": s.resolution, "batch": s.batch,
            "steps": s.steps, "precision": s.precision, "seed": s.seed, "encode": s.official_encode,
            "timing_out": str(timing)}
    cmd = [sys.executable, "-m", "sail.bench.lora_dpo", "--child-official", json.dumps(opts)]
    return run_clocked(cmd, timing, folder, s, stand_ins=False)


# ----------------------------------------------------------------------------------------------
# The sitting
# ----------------------------------------------------------------------------------------------

def _versions(example: str | None) -> dict:
    out = {}
    for dist in ("torch", "diffusers", "transformers", "accelerate", "peft", "datasets", "torchvision"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    if example:
        out["example_sha256"] = hashlib.sha256(Path(example).read_bytes()).hexdigest()
    return out


def _line(row: dict) -> str:
    what = f"{row['mode']:4s} {row['impl']:17s} #{row['repeat']}"
    if row["error"]:
        return f"{what}  ERROR {row['error']}"
    encode = f"  encode {row['encode_s']:.1f} s" if row.get("encode_s") is not None else ""
    first, last = row["timed_steps"]
    return (f"{what}  {row['pairs_per_s']:7.2f} pairs/s  step {1e3 * row['step_s']:7.1f} ms  "
            f"(steps {first}-{last}){encode}  wall {row['wall_s']:.0f} s")


def measure(mode: str, impl: str, example: str | None, inputs: Inputs, s: Settings, folder: Path) -> dict:
    """One run of one side: a table of the three, greppable by ``impl``."""
    runners = {"sail": lambda: run_sail(inputs, mode, s, folder),
               "diffusers_example": lambda: run_example(example, inputs, s, folder),
               "official_style": lambda: run_official(inputs, s, folder)}
    return runners[impl]()


def ratios(rows: list[dict], modes: list[str]) -> dict:
    """Median pairs/s of ours over the median of its reference, per mode (None if one failed)."""
    out = {}
    for mode in modes:
        med = {}
        for impl in ("sail", BASELINE[mode]):
            values = [r["pairs_per_s"] for r in rows if r["mode"] == mode and r["impl"] == impl and not r["error"]]
            med[impl] = statistics.median(values) if values else None
        both = med["sail"] is not None and med[BASELINE[mode]] is not None
        out[mode] = {"ours_pairs_per_s": med["sail"], "reference": BASELINE[mode],
                     "reference_pairs_per_s": med[BASELINE[mode]],
                     "speedup": med["sail"] / med[BASELINE[mode]] if both else None}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", help="path of diffusers' examples/research_projects/diffusion_dpo/"
                                          "train_diffusion_dpo.py (needed by --modes lora)")
    parser.add_argument("--modes", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    parser.add_argument("--resolution", type=int, default=64, help="training resolution in pixels")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=10, help="first steps left out of the throughput")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="default: bf16 on CUDA, fp32 on a CPU")
    parser.add_argument("--compile", action="store_true", help="train.compile for ours (the references run eagerly)")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=128, help="rows of the generated parquet (a multiple of --batch)")
    parser.add_argument("--image-size", type=int, default=None, help="stored image side (default: --resolution)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of every run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, interleaved; medians are compared")
    parser.add_argument("--official-encode", choices=["step", "cached"], default="step",
                        help="official-style loop: encode every batch at every step (as train.py) or once first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="where models, data and runs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, run folders)")
    parser.add_argument("--out", default="bench/results/lora_dpo.jsonl")
    parser.add_argument("--child-official", help=argparse.SUPPRESS)    # internal: one official-style run (JSON)
    args = parser.parse_args(argv)
    if args.child_official:
        return args
    if "lora" in args.modes and not (args.example and Path(args.example).is_file()):
        parser.error(f"--modes lora needs --example PATH of train_diffusion_dpo.py (got {args.example!r})")
    if not 1 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup-steps must be in [1, --steps), got {args.warmup_steps} with --steps {args.steps}")
    if args.pairs < args.batch or args.pairs % args.batch:
        parser.error(f"--pairs must be a positive multiple of --batch (no short last batch), got {args.pairs}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child_official:
        official_style_full(json.loads(args.child_official))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = Settings(resolution=args.resolution, batch=args.batch, steps=args.steps, warmup=args.warmup_steps,
                 precision=args.precision or ("bf16" if device.type == "cuda" else "fp32"), compile=args.compile,
                 lora_rank=args.lora_rank, pairs=args.pairs, image_size=args.image_size or args.resolution,
                 threads=args.threads, seed=args.seed, official_encode=args.official_encode)
    example = str(Path(args.example).resolve()) if args.example else None
    env = {**environment(device), "versions": _versions(example)}
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lora_dpo_")).resolve()
    inputs = build_inputs(work, s)
    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for repeat in range(args.repeats):
        for mode in args.modes:
            for impl in ("sail", BASELINE[mode]):
                result = measure(mode, impl, example, inputs, s, work / f"{mode}_{impl}_{repeat}")
                config = {**asdict(s), "mode": mode, "example": example if impl == "diffusers_example" else None}
                row = {"bench": "lora_dpo", "mode": mode, "impl": impl, "repeat": repeat, "config": config,
                       **result, "env": env}
                rows.append(row)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(_line(row), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    summary = ratios(rows, args.modes)
    for mode, r in summary.items():
        if r["speedup"] is not None:
            print(f"{mode}: ours {r['ours_pairs_per_s']:.2f} / {r['reference']} {r['reference_pairs_per_s']:.2f} "
                  f"pairs/s = {r['speedup']:.2f}x", flush=True)
    print(json.dumps({"bench": "lora_dpo", "device": env["device"], "settings": asdict(s), "ratios": summary,
                      "rows": [{k: r.get(k) for k in ("mode", "impl", "repeat", "pairs_per_s", "encode_s", "wall_s",
                                                      "error")} for r in rows]}))


if __name__ == "__main__":
    main()
