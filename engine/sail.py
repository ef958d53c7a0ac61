"""The stages of one SAIL iteration (docs/method.md, SAIL): generate, rank, pair, mix.

Each stage reads the previous stage's files and writes its own, atomically:

    iter_00i/candidates/prompts_000000-000064.safetensors   latents [n, C, h, w] of the chunk's
                                                prompts + their embeddings, ids and seeds
    iter_00i/candidates/index.parquet           prompt, candidate, seed, file, offset
    iter_00i/rewards_chunks/prompts_000000-000064.parquet   the chunk's rewards
    iter_00i/rewards.parquet                    reward and the K per-draw values of every candidate
    iter_00i/pairs.parquet + pairs_cache/       chosen (winner, loser) per prompt, as a pair cache
    iter_00i/train_set.parquet                  rows of the seed cache and of pairs_cache

Generation and ranking are data-parallel over chunks of ``sail.chunk_prompts`` prompts, named
by the prompts they cover, never by the rank that wrote them: rank 0 lists the chunks without
a file and every rank takes every W-th of them, so a stage killed half-way resumes at its
first missing chunk on any number of ranks. Rank 0 merges the chunks and checks that every
(prompt, candidate) is there exactly once. Models are loaded whole from their saved folders, so
sampling under ZeRO-3 never all-gathers per step.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from sail.engine import hooks, seeds as run_seeds
from sail.engine.compilation import call, compile_module
from sail.engine.config import SailConfig
from sail.engine.data.cache import (PairBatch, PairCache, finalize_cache, write_empty_prompt, write_shard,
                                    write_train_set)
from sail.engine.data.pickapic import DataError
from sail.engine.io import read_json, write_json, write_parquet, write_safetensors
from sail.engine.losses import implicit_reward
from sail.engine.models import encode_prompts, load_components, load_unet, native_time_ids, vae_scale_factor
from sail.engine.ranks import Ranks
from sail.engine.sampling import initial_noise

log = logging.getLogger(__name__)


@dataclass
class Candidates:
    """The candidates of an iteration: ``index`` rows (prompt_idx, prompt, cand, seed, file,
    offset) and the chunk files' tensors, read row by row: ``of_prompt`` reads only the rows it
    returns and keeps no file open, so no stage's memory grows with the pool or N (whole chunk
    files loaded and kept, as before, ended with the whole pool in memory)."""

    folder: Path

    def __post_init__(self):
        self.index = pq.read_table(self.folder / "index.parquet").to_pydict()
        self.prompts = read_json(self.folder / "prompts.json")
        self.n = read_json(self.folder / "meta.json")["candidates"]
        self._ids: tuple[str, list[int]] = ("", [])    # the prompt ids of the file last read
        self._rows: dict[int, list[int]] = {}     # prompt -> index rows, in candidate order
        for i, p in enumerate(self.index["prompt_idx"]):
            self._rows.setdefault(p, []).append(i)
        for rows in self._rows.values():
            rows.sort(key=lambda i: self.index["cand"][i])

    def _open(self, name: str) -> tuple[object, list[int]]:
        """A new handle on chunk file ``name``, and the prompts the file holds. Each read opens
        its own: a handle memory-maps the file, and one kept open across prompts keeps every page
        it touched resident (page-cache folios of megabytes: the whole file, measured)."""
        from safetensors import safe_open

        handle = safe_open(str(self.folder / name), framework="pt")
        if self._ids[0] != name:
            self._ids = (name, handle.get_tensor("prompt_ids").tolist())
        return handle, self._ids[1]

    def seeds_of(self, p: int) -> list[int]:
        """The sampling seeds of prompt ``p``'s candidates, in candidate order."""
        return [int(self.index["seed"][i]) for i in self._rows[p]]

    def of_prompt(self, p: int, cands: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                         torch.Tensor | None]:
        """latents [len(cands), C, h, w] of prompt ``p``'s candidates ``cands`` in that order (all
        N by default), hidden [1, L, D] float32, pooled [1, P] or None; only these rows are read."""
        rows = self._rows[p]
        handle, ids = self._open(self.index["file"][rows[0]])
        offs = [self.index["offset"][rows[c]] for c in (range(len(rows)) if cands is None else cands)]
        local = ids.index(p)
        hidden = handle.get_slice("hidden")[local:local + 1].to(torch.float32, copy=True)
        pooled = handle.get_slice("pooled")[local:local + 1].clone() if "pooled" in handle.keys() else None
        return _read_rows(handle.get_slice("latents"), offs), hidden, pooled


def _read_rows(rows_of, offsets: list[int]) -> torch.Tensor:
    """Rows ``offsets`` of a safetensors slice, in that order, each run of consecutive rows read
    at once; a tensor of its own (a slice may be a view of the whole memory-mapped tensor)."""
    runs, start = [], 0
    for i in range(1, len(offsets) + 1):
        if i == len(offsets) or offsets[i] != offsets[i - 1] + 1:
            runs.append(rows_of[offsets[start]:offsets[i - 1] + 1])
            start = i
    return runs[0].clone() if len(runs) == 1 else torch.cat(runs)


def read_prompt_file(path: str, key: str = "prompt file") -> list[str]:
    """Prompts from a text file (UTF-8, one a line) or a parquet file with a caption/prompt
    column. A missing, unreadable or empty file is a ``DataError`` naming ``key`` and the file."""
    try:
        if str(path).endswith(".parquet"):
            table = pq.read_table(path)
            col = "caption" if "caption" in table.column_names else "prompt"
            if col not in table.column_names:
                raise DataError(f"{key}: {path}: needs a 'caption' or 'prompt' column (found {table.column_names})")
            prompts = [str(x).strip() for x in table.column(col).to_pylist() if x is not None and str(x).strip()]
        else:
            prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, pa.ArrowException) as err:
        raise DataError(f"{key}: {path}: cannot read prompts ({type(err).__name__}: {err})") from None
    if not prompts:
        raise DataError(f"{key}: {path}: no prompts in the file")
    return prompts


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------

def inference_dtype(cfg: SailConfig, device: torch.device) -> torch.dtype:
    """The weights' dtype of the generate and rank stages (``sail.precision``)."""
    from sail.engine.strategy import DTYPES, resolve_precision

    return DTYPES[resolve_precision(cfg.precision, device)]


@torch.no_grad()
def sample_prompts(comps, model_dir: str, prompts: list[str], seeds: list[int], sampling, *,
                   progress: bool = False) -> tuple[torch.Tensor, "object"]:
    """``len(seeds) / len(prompts)`` samples of each prompt (seeds in prompt-major order) from
    loaded components on their device: (latents float32 [B, C, h, w], the prompts' Conditioning).
    Guidance as the model folder's diffusers pipeline does it (``unconditional_conditioning``).
    SDXL samples at its native size without crop (the time ids say so)."""
    from sail.engine.models import Conditioning, unconditional_conditioning
    from sail.engine.sampling import sample_conditioned

    repeat = len(seeds) // len(prompts)
    cond = encode_prompts(comps.text_encoders, comps.tokenizers, prompts)
    uncond = unconditional_conditioning(encode_prompts(comps.text_encoders, comps.tokenizers, [""]), model_dir)
    side = int(comps.unet.config.sample_size)
    time_ids = native_time_ids(side * vae_scale_factor(model_dir), 1) if cond.pooled is not None else None
    # The sampler takes one conditioning row per sample: the rows of one sampling batch at a time,
    # never [prompts x N, L, D]. Same batches, per-sample generators: the same samples, bit for bit.
    batch, parts = sampling.batch_size, []
    for start in tqdm(range(0, len(seeds), batch), desc="sample", unit="batch", disable=not progress):
        prompt_of = torch.arange(start, min(start + batch, len(seeds)), device=cond.hidden.device) // repeat
        rows = Conditioning(cond.hidden[prompt_of], None if cond.pooled is None else cond.pooled[prompt_of])
        parts.append(sample_conditioned(comps.unet, comps.noise_scheduler, rows, uncond, seeds[start:start + batch],
                                        time_ids=time_ids, latent_shape=(comps.unet.config.in_channels, side, side),
                                        sampling=sampling))
    return torch.cat(parts), cond


def prompt_chunks(n_prompts: int, size: int) -> list[range]:
    """Prompts 0..n-1 cut into consecutive chunks of ``size`` (the last one shorter)."""
    return [range(s, min(s + size, n_prompts)) for s in range(0, n_prompts, size)]


def chunk_file(rows: range, suffix: str) -> str:
    """The name of a chunk's file: the prompts it covers, ``prompts_000064-000128<suffix>``."""
    return f"prompts_{rows.start:06d}-{rows.stop:06d}{suffix}"


def pending_chunks(folder: Path, chunks: list[range], suffix: str, ranks: Ranks, stage: str) -> list[range]:
    """This rank's share of the chunks that have no file yet. Rank 0 reads the folder and tells
    the others (a rank listing it itself could see a chunk another rank has just written)."""
    todo = None
    if ranks.is_main:
        todo = [c for c in chunks if not (folder / chunk_file(c, suffix)).is_file()]
        if len(todo) < len(chunks):
            log.info("%s: resuming, %d of %d chunks already done, %d to do on %d rank(s)", stage,
                     len(chunks) - len(todo), len(chunks), len(todo), ranks.world_size)
    todo = ranks.broadcast_object(todo)
    return todo[ranks.rank::ranks.world_size]


@torch.no_grad()
def generate_candidates(model_dir: str, prompts: list[str], cfg: SailConfig, out: Path, *, seed: int,
                        iteration: int, ranks: Ranks) -> Path:
    """N candidates per prompt from ``model_dir``, written chunk by chunk (``sail.chunk_prompts``
    prompts each); the seeds are a function of (run seed, iteration, prompt, candidate) only."""
    out.mkdir(parents=True, exist_ok=True)
    mine = pending_chunks(out, prompt_chunks(len(prompts), cfg.chunk_prompts), ".safetensors", ranks, "generate")

    def work() -> None:
        if not mine:
            return
        device = ranks.device
        comps = load_components(model_dir, with_vae=False, dtype=inference_dtype(cfg, device))
        compile_module(comps.unet.to(device).eval(), "the generating UNet", cfg.compile)
        for enc in comps.text_encoders:
            enc.to(device)
        for k, rows in enumerate(tqdm(mine, desc="generate", unit="chunk", disable=not ranks.is_main)):
            seeds = [run_seeds.candidate(seed, iteration, p, n) for p in rows for n in range(cfg.candidates)]
            latents, cond = sample_prompts(comps, model_dir, [prompts[p] for p in rows], seeds, cfg.sampling)
            tensors = {"latents": latents.float().cpu(), "hidden": cond.hidden.half().cpu(),
                       "prompt_ids": torch.tensor(list(rows)), "seeds": torch.tensor(seeds, dtype=torch.int64)}
            if cond.pooled is not None:
                tensors["pooled"] = cond.pooled.float().cpu()
            hooks.reached("generate", step=k)       # k chunks of this rank written, one more sampled
            write_safetensors(out / chunk_file(rows, ".safetensors"), tensors)

    ranks.agreed(work)
    ranks.agreed(lambda: _merge_candidates(out, prompts, cfg.candidates) if ranks.is_main else None)
    return out


def _check_coverage(folder: Path, got: list, expected: list, what: str) -> None:
    """``got`` (sorted keys read from the chunk files) is ``expected`` exactly once each."""
    if got == expected:
        return
    have = set(got)
    missing = [k for k in expected if k not in have]
    repeated = len(got) - len(have)
    raise DataError(f"{folder}: the {what} chunks do not cover every prompt exactly once ({len(missing)} missing, "
                    f"e.g. {missing[:1]}; {repeated} repeated): a foreign or partial file is there; delete the folder "
                    "or re-run the stage with --stage")


def _merge_candidates(out: Path, prompts: list[str], n: int) -> None:
    from safetensors import safe_open

    cols = {k: [] for k in ("prompt_idx", "prompt", "cand", "seed", "file", "offset")}
    for path in sorted(out.glob("prompts_*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            ids, seeds = f.get_tensor("prompt_ids").tolist(), f.get_tensor("seeds").tolist()
        for j, p in enumerate(ids):
            for c in range(n):
                for key, value in zip(cols, (p, prompts[p], c, seeds[j * n + c], path.name, j * n + c)):
                    cols[key].append(value)
    _check_coverage(out, sorted(zip(cols["prompt_idx"], cols["cand"])),
                    [(p, c) for p in range(len(prompts)) for c in range(n)], "candidate")
    write_json(out / "prompts.json", prompts)
    write_json(out / "meta.json", {"candidates": n, "prompts": len(prompts)})
    write_parquet(out / "index.parquet", cols)


# --------------------------------------------------------------------------------------------
# rank
# --------------------------------------------------------------------------------------------

def _forward_chunks(unet, x, t, hidden, pooled, time_ids, batch: int) -> torch.Tensor:
    dtype = next(unet.parameters()).dtype
    outs = []
    for i in range(0, x.shape[0], batch):
        sl = slice(i, i + batch)
        kwargs = {}
        if pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled[sl].to(dtype), "time_ids": time_ids[sl].to(dtype)}
        outs.append(call(unet, x[sl].to(dtype), t[sl], encoder_hidden_states=hidden[sl].to(dtype),
                         **kwargs).sample.float())
    return torch.cat(outs)


def ranking_settled(per_draw: torch.Tensor, settle_z: float) -> bool:
    """Whether the best and the worst candidate are settled after the draws so far (per_draw
    [N, k]): the best's reward gap over the runner-up, and the runner-down's over the worst, are
    each at least ``settle_z`` standard errors of the paired difference (``pair_confidence``)."""
    if per_draw.shape[1] < 2:
        return False
    order = per_draw.mean(1).argsort(descending=True).tolist()
    d = per_draw.double().numpy()
    return (pair_confidence(d[order[0]], d[order[1]]) >= settle_z
            and pair_confidence(d[order[-2]], d[order[-1]]) >= settle_z)


def draws_until_settled(block_values: Callable[[slice], torch.Tensor], draws: int, block: int,
                        settle_z: float, min_draws: int = 0) -> torch.Tensor:
    """The adaptive-K rule: per-draw values [N, k] of blocks of ``block`` draws
    (``block_values(slice)`` -> [N, len]) until, after at least ``min_draws``, ``ranking_settled``,
    or all ``draws`` are used."""
    parts = []
    for k0 in range(0, draws, block):
        parts.append(block_values(slice(k0, k0 + block)))
        if min(k0 + block, draws) >= min_draws and ranking_settled(torch.cat(parts, 1), settle_z):
            break
    return torch.cat(parts, 1)


def ranking_draws(seed: int, draws: int, n_train: int, t_range: tuple[float, float], shape, noise: str = "shared",
                  cand_seeds=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The K ranking draws of a prompt: t [K] uniform in ``t_range`` (fractions of the training
    timesteps), and eps [K, *shape] shared by the candidates (``shared``; ``antithetic``: pairs
    (t, eps), (t, -eps)), or [N, K, *shape] (``own``: each candidate's generation noise, from
    ``cand_seeds``, at every draw)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = int(round(t_range[0] * n_train)), int(round(t_range[1] * n_train))
    if noise == "antithetic":
        half = (draws + 1) // 2
        t = torch.randint(lo, hi, (half,), generator=gen).repeat_interleave(2)[:draws]
        e = torch.randn((half, *shape), generator=gen)
        return t, torch.stack([e, -e], 1).flatten(0, 1)[:draws]
    t = torch.randint(lo, hi, (draws,), generator=gen)
    if noise == "own":
        own = initial_noise(cand_seeds, shape)
        return t, own.unsqueeze(1).expand(len(cand_seeds), draws, *shape)
    return t, torch.randn((draws, *shape), generator=gen)


@torch.no_grad()
def reward_prompt(cur, ref, scheduler, latents, hidden, pooled, *, draws: int, beta: float, seed: int,
                  batch: int, vae_factor: int = 8, t_range: tuple[float, float] = (0.0, 1.0), block: int = 0,
                  settle_z: float = 2.0, min_draws: int = 0, noise: str = "shared",
                  cand_seeds=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit reward of a prompt's N candidates over K (t, noise) draws (``ranking_draws``).

    ``block`` > 0: adaptive K. The draws are made ``block`` at a time and stop once
    ``ranking_settled`` (at most ``draws``); the first k draws are the same whatever K ends up.
    Returns reward [N] and per-draw values [N, k] (k = draws unless adaptive)."""
    t, eps = ranking_draws(seed, draws, scheduler.config.num_train_timesteps, t_range, latents.shape[1:], noise,
                           cand_seeds)
    sl_eps = (lambda sl: eps[:, sl]) if noise == "own" else (lambda sl: eps[sl])
    if block <= 0 or block >= draws:
        out = _reward_draws(cur, ref, scheduler, latents, hidden, pooled, t, eps, beta, batch, vae_factor)
        return out.reward[0].cpu(), out.per_draw[0].cpu()
    per_draw = draws_until_settled(
        lambda sl: _reward_draws(cur, ref, scheduler, latents, hidden, pooled, t[sl], sl_eps(sl), beta, batch,
                                 vae_factor).per_draw[0].cpu(), draws, block, settle_z, min_draws)
    return per_draw.mean(1), per_draw


def _reward_draws(cur, ref, scheduler, latents, hidden, pooled, t, eps, beta: float, batch: int, vae_factor: int):
    """``implicit_reward`` of the N candidates on the draws (t [k], eps [k, ...] shared by the
    candidates or [N, k, ...] per candidate)."""
    n, shape, draws = latents.shape[0], latents.shape[1:], len(t)
    dev = next(cur.parameters()).device
    per_cand = eps.dim() == latents.dim() + 1
    x0 = latents.to(dev).unsqueeze(1).expand(n, draws, *shape).reshape(n * draws, *shape)
    tt = t.to(dev).repeat(n)
    noise = (eps.to(dev) if per_cand else eps.to(dev).unsqueeze(0).expand(n, draws, *shape)).reshape(n * draws, *shape)
    x_t = scheduler.add_noise(x0, noise, tt)
    h = hidden.to(dev).expand(n * draws, *hidden.shape[1:])
    p = pooled.to(dev).expand(n * draws, -1) if pooled is not None else None
    tids = None
    if p is not None:
        tids = native_time_ids(shape[-1] * vae_factor, 1).to(dev).expand(n * draws, 6)
    cur_pred = _forward_chunks(cur, x_t, tt, h, p, tids, batch).view(1, n, draws, *shape)
    ref_pred = _forward_chunks(ref, x_t, tt, h, p, tids, batch).view(1, n, draws, *shape)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, tt).view(1, n, draws, *shape)
    elif per_cand:
        target = noise.view(1, n, draws, *shape)
    else:
        target = eps.to(dev).unsqueeze(0)                     # [1, K, ...] shared by the N candidates
    return implicit_reward(cur_pred, ref_pred, target, beta)


def rank_reference_model(reference: str, iteration: int) -> int:
    """The model index (-1: base, 0: M_0, ...) the implicit reward of ``iteration``'s ranking is
    measured against: base, anchor (M_0) or previous (the model the ranked M_{i-1} was trained from)."""
    return {"base": -1, "anchor": 0, "previous": iteration - 2}[reference]


def rank_candidates(cands: Candidates, cur_dir: str, ref_dir: str, cfg: SailConfig, beta: float, out: Path,
                    parts: Path, *, seed: int, iteration: int, ranks: Ranks) -> Path:
    """Self-ranking: implicit reward of every candidate (current model vs ranking reference),
    chunk by chunk into the folder ``parts``, merged into ``out``."""
    parts.mkdir(parents=True, exist_ok=True)
    mine = pending_chunks(parts, prompt_chunks(len(cands.prompts), cfg.chunk_prompts), ".parquet", ranks, "rank")

    def work() -> None:
        if not mine:
            return
        dtype = inference_dtype(cfg, ranks.device)
        comps = load_components(cur_dir, with_text=False, with_vae=False, dtype=dtype)
        cur = compile_module(comps.unet.to(ranks.device).eval(), "the ranked UNet", cfg.compile)
        ref = compile_module(load_unet(ref_dir, dtype).to(ranks.device).eval(), "the ranking reference UNet",
                             cfg.compile)
        bar = tqdm(total=sum(len(rows) for rows in mine), desc="rank", disable=not ranks.is_main, mininterval=2)
        for k, rows in enumerate(mine):
            table = {"prompt_idx": [], "cand": [], "reward": [], "draws": []}
            for p in rows:
                latents, hidden, pooled = cands.of_prompt(p)
                reward, per_draw = reward_prompt(
                    cur, ref, comps.noise_scheduler, latents, hidden, pooled, draws=cfg.rank_draws, beta=beta,
                    seed=run_seeds.ranking_draws(seed, iteration, p), batch=cfg.rank_batch_size,
                    vae_factor=vae_scale_factor(cur_dir), t_range=cfg.rank_t_range, block=cfg.rank_block,
                    settle_z=cfg.rank_settle_z, min_draws=cfg.rank_min_draws, noise=cfg.rank_noise,
                    cand_seeds=cands.seeds_of(p))
                table["prompt_idx"] += [p] * len(reward)
                table["cand"] += list(range(len(reward)))
                table["reward"] += reward.tolist()
                table["draws"] += per_draw.tolist()
                bar.update()
            hooks.reached("rank", step=k)          # k chunks of this rank written, one more ranked
            write_parquet(parts / chunk_file(rows, ".parquet"), table)
        bar.close()

    ranks.agreed(work)
    ranks.agreed(lambda: _merge_rewards(parts, cands, out) if ranks.is_main else None)
    return out


def _merge_rewards(parts: Path, cands: Candidates, out: Path) -> None:
    expected = [(p, c) for p in range(len(cands.prompts)) for c in range(cands.n)]
    tables = [pq.read_table(f) for f in sorted(parts.glob("prompts_*.parquet"))]
    if not tables:
        _check_coverage(parts, [], expected, "reward")
    table = pa.concat_tables(tables).sort_by([("prompt_idx", "ascending"), ("cand", "ascending")])
    _check_coverage(parts, list(zip(table.column("prompt_idx").to_pylist(), table.column("cand").to_pylist())),
                    expected, "reward")
    write_parquet(out, table)


def score_candidates_external(cands: Candidates, scorer, out: Path) -> Path:
    """OnlineDPO: rewards from an external scorer on the decoded candidates (pixel space here)."""
    from sail.engine.sampling import latents_to_uint8

    rows = {"prompt_idx": [], "cand": [], "reward": [], "draws": []}
    for p in range(len(cands.prompts)):
        latents, _, _ = cands.of_prompt(p)
        scores = np.asarray(scorer(latents_to_uint8(latents), [cands.prompts[p]] * len(latents)), dtype=np.float64)
        rows["prompt_idx"] += [p] * len(scores)
        rows["cand"] += list(range(len(scores)))
        rows["reward"] += scores.tolist()
        rows["draws"] += [[s] for s in scores.tolist()]
    return write_parquet(out, rows)


# --------------------------------------------------------------------------------------------
# pair and mix
# --------------------------------------------------------------------------------------------

def pair_confidence(draws_w, draws_l) -> float:
    """How many standard errors the reward gap of a pair is: the mean over the K shared draws of
    ``r_k(w) - r_k(l)`` over its standard error (common draws make the paired difference far
    less noisy than either reward). inf for a deterministic scorer (K = 1) or a noiseless gap."""
    diff = np.asarray(draws_w, dtype=np.float64) - np.asarray(draws_l, dtype=np.float64)
    mean = diff.mean()
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
    if se == 0:
        return float("inf") if mean > 0 else 0.0
    return float(mean / se)


def pick_pairs(rs: np.ndarray, pairing: str, rng_seed: int = 0, per_prompt: int = 1) -> list[tuple[int, int]]:
    """``per_prompt`` disjoint (winner, loser) pairs among one prompt's candidates from their
    rewards ``rs`` [N]. best_worst: the i-th best against the i-th worst (i = 1: argmax and
    argmin); best_mu2sigma (one pair): argmax and the candidate nearest to mean - 2 std (a
    clearly worse sample that is not the extreme, which may be a degenerate one); random:
    ``2 per_prompt`` distinct candidates paired in the order drawn, the higher-rewarded the winner;
    random_unranked: the same pairs, the first drawn the winner (the rewards are not used: the
    self-distillation control, no ranking signal at all)."""
    if pairing == "best_worst":
        winners = np.argsort(-rs, kind="stable")[:per_prompt]
        losers = [c for c in np.argsort(rs, kind="stable") if c not in winners][:per_prompt]
        return [(int(w), int(l)) for w, l in zip(winners, losers)]
    if pairing == "best_mu2sigma":
        w = int(rs.argmax())
        gap = np.abs(rs - (rs.mean() - 2.0 * rs.std()))
        gap[w] = np.inf
        return [(w, int(gap.argmin()))]
    picks = np.random.default_rng(rng_seed).choice(len(rs), size=2 * per_prompt, replace=False)
    drawn = [(int(a), int(b)) for a, b in zip(picks[0::2], picks[1::2])]
    if pairing == "random_unranked":
        return drawn
    return [(a, b) if rs[a] >= rs[b] else (b, a) for a, b in drawn]


def choose_pairs(rewards: dict, pairing: str, seed: int, min_z: float = 0.0, per_prompt: int = 1) -> dict:
    """Per prompt: the pairs ``pick_pairs`` chooses; with ``min_z`` > 0, only pairs whose reward
    gap is at least ``min_z`` standard errors (``pair_confidence``) are kept."""
    by_prompt: dict[int, list[tuple[int, float, list]]] = {}
    for p, c, r, d in zip(rewards["prompt_idx"], rewards["cand"], rewards["reward"], rewards["draws"]):
        by_prompt.setdefault(p, []).append((c, r, d))
    out = {"prompt_idx": [], "winner": [], "loser": [], "margin": [], "z": []}
    for p in sorted(by_prompt):
        items = sorted(by_prompt[p])
        rs = np.array([r for _, r, _ in items])
        for w, l in pick_pairs(rs, pairing, run_seeds.random_pair(seed, p), per_prompt):
            z = pair_confidence(items[w][2], items[l][2])
            if min_z > 0 and not z >= min_z:
                continue
            out["prompt_idx"].append(p)
            out["winner"].append(items[w][0])
            out["loser"].append(items[l][0])
            out["margin"].append(float(rs[w] - rs[l]))
            out["z"].append(z)
    if not out["prompt_idx"]:
        raise DataError(f"sail.min_pair_z: no prompt's pair has a reward gap of {min_z} standard errors "
                        f"(of {len(by_prompt)} prompts); lower it or raise sail.rank_draws")
    return out


def build_pair_cache(cands: Candidates, pairs: dict, seed_cache: PairCache, out: Path, vae_factor: int = 8,
                     shard_pairs: int = 256) -> Path:
    """The chosen pairs as a pair cache: latents stay latents (no decode / re-encode). Only each
    pair's two latents are read, and the cache is written ``shard_pairs`` pairs a shard, so memory
    holds one shard's pairs, not the pool's (the seed cache's ``data.encode_shard_pairs`` default).
    ``vae_factor``: pixels per latent of the model that generated them (SDXL time ids)."""
    chosen = list(zip(pairs["prompt_idx"], pairs["winner"], pairs["loser"]))
    shards = [chosen[s:s + shard_pairs] for s in range(0, len(chosen), shard_pairs)]
    for k, part in enumerate(shards):
        write_shard(out, k, _pair_batch(cands, part, vae_factor), [cands.prompts[p] for p, _, _ in part],
                    [f"generated:{p}" for p, _, _ in part])
    write_empty_prompt(out, seed_cache.empty_hidden, seed_cache.empty_pooled)
    finalize_cache(out, len(shards), {"version": 1, "kind": seed_cache.meta.get("kind"), "generated": True})
    return out


def _pair_batch(cands: Candidates, chosen: list[tuple[int, int, int]], vae_factor: int) -> PairBatch:
    """The (prompt, winner, loser) triples ``chosen`` as one PairBatch."""
    lw, ll, hid, pooled = [], [], [], []
    for p, w, l in chosen:
        latents, hidden, pool = cands.of_prompt(p, [w, l])
        lw.append(latents[0:1])
        ll.append(latents[1:2])
        hid.append(hidden)
        if pool is not None:
            pooled.append(pool)
    batch = PairBatch(torch.cat(lw), torch.cat(ll), torch.cat(hid), torch.cat(pooled) if pooled else None)
    if pooled:
        batch.time_ids_w = native_time_ids(batch.latents_w.shape[-1] * vae_factor, len(lw))
        batch.time_ids_l = batch.time_ids_w.clone()     # two tensors: safetensors refuses shared storage
    return batch


def mix_pairs(n_generated: int, n_seed: int, alpha: float, seed: int) -> list[tuple[int, int]]:
    """Training entries (cache, row): all generated pairs (cache 1) and seed pairs (cache 0) in
    the proportion alpha : 1 - alpha; alpha = 1 is the no-mixup ablation, alpha = 0 the seed-only
    continuation control (every seed pair, no generated one)."""
    if alpha <= 0.0:
        return [(0, r) for r in range(n_seed)]
    entries = [(1, r) for r in range(n_generated)]
    if alpha >= 1.0:
        return entries
    want = int(round(n_generated * (1.0 - alpha) / alpha))
    rng = np.random.default_rng(seed)
    rows = rng.choice(n_seed, size=want, replace=want > n_seed)
    return [(0, int(r)) for r in rows] + entries


def write_mix(out: Path, seed_cache_dir: Path, gen_cache_dir: Path, entries: list[tuple[int, int]]) -> Path:
    caches = [os.path.relpath(seed_cache_dir, out.parent), os.path.relpath(gen_cache_dir, out.parent)]
    write_train_set(out, caches, entries)
    return out
