"""Every seed a run derives, in one place: a run is a function of ``cfg.seed`` (and of where
in the run a draw happens), the same on 1 process or N ranks and after a resume.

The formulas are part of the results: changing one changes every number downstream (the
main job's report, the results table), so they are kept exactly as they were measured with.
"""
from __future__ import annotations


def combine(*parts: int) -> int:
    """A 62-bit seed from integers (iteration, prompt, candidate, ...), stable across runs."""
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p) + 1) % (2 ** 62)
    return value


# ---- the controller's per-iteration seeds (run seed, iteration i) ---------------------------
def stage_training(run_seed: int, iteration: int) -> int:
    """The DPO stage of iteration i (pair order, t, noise, empty prompts)."""
    return run_seed + 1000 * iteration


def pairing(run_seed: int, iteration: int) -> int:
    """Random pairing (the ablation) of iteration i."""
    return run_seed + iteration


def mixing(run_seed: int, iteration: int) -> int:
    """Which seed pairs join the generated ones in iteration i's training set."""
    return run_seed * 31 + iteration


# ---- within a stage --------------------------------------------------------------------------
def candidate(run_seed: int, iteration: int, prompt: int, n: int) -> int:
    """The sampling noise of candidate n of a prompt (recorded with the candidate)."""
    return combine(run_seed, iteration, prompt, n)


def ranking_draws(run_seed: int, iteration: int, prompt: int) -> int:
    """The K (t, noise) draws shared by a prompt's candidates when ranking."""
    return combine(run_seed, iteration, prompt, 99)


def random_pair(pairing_seed: int, prompt: int) -> int:
    """The two candidates a random pairing picks for a prompt."""
    return combine(pairing_seed, prompt, 7)


def pair_order(stage_seed: int, epoch: int) -> int:
    """The permutation of the training set in an epoch."""
    return stage_seed * 7919 + epoch


def pair_draw(stage_seed: int, step: int, position: int) -> int:
    """t, noise and empty-prompt dropout of the pair at ``position`` of a global batch."""
    return (stage_seed * 1_000_003 + step) * 65_537 + position


def replay_draw(stage_seed: int, step: int) -> int:
    """SSPO: which checkpoint of the replay pool is the reference at ``step``."""
    return combine(stage_seed, step, 31)


def reference_sample(stage_seed: int, checkpoint_step: int, pair: int) -> int:
    """SSPO: the sampling noise of the reference sample of training row ``pair`` drawn by the
    pool's checkpoint of ``checkpoint_step`` (the same sample whichever step or rank needs it)."""
    return combine(stage_seed, checkpoint_step, pair, 37)


def encode_shard(run_seed: int, shard: int) -> tuple[list[int], int]:
    """Pre-encoding of a shard: (numpy seed for crops and flips, torch seed for VAE sampling)."""
    return [run_seed, shard], run_seed * 100003 + shard


# ---- evaluation with learned scorers (engine/evaluation/harness.py) -----------------------
def eval_image(eval_seed: int, benchmark: str, prompt: int, image: int) -> int:
    """Image ``image`` of prompt ``prompt`` of a benchmark: the same for every model compared,
    on any number of ranks (a prompt set may bring its own: ``PromptSet.image_seed``)."""
    import zlib

    return combine(eval_seed, zlib.crc32(benchmark.encode()), prompt, image)
