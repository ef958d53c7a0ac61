"""What the stages after generation read from the candidate pool, and what generation holds.

The pair stage reads each prompt's winner and loser only, the rank stage's reads (and OnlineDPO's)
each candidate once, with one chunk file open at most and none kept: the bytes read are counted
through a wrapped ``safetensors.safe_open``, at two N and two pool sizes. Generation hands the
sampler one sampling batch of conditioning rows at a time, never [chunk prompts x N, L, D]. All of
it gives the tensors the whole-file reads and the repeated rows gave before, bit for bit: those
ways are kept below (``LegacyCandidates``, ``legacy_build_pair_cache``, ``legacy_sample_prompts``)
as the reference. ``bench/stage_memory.py`` measures the stages' peak RSS (before / after rows
in bench/results/stage_memory.jsonl).
"""
import json
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sail.engine import sail
from sail.engine.data.cache import PairBatch, PairCache, finalize_cache, write_empty_prompt, write_shard
from sail.engine.io import write_safetensors
from sail.engine.models import native_time_ids

LATENT, HIDDEN, POOLED = (4, 8, 8), (5, 8), 6
LATENT_BYTES, HIDDEN_BYTES = 4 * 8 * 8 * 4, 5 * 8 * 2          # fp32 latents, fp16 text states


# --------------------------------------------------------------------------------------------
# the reference: the candidates read as before (whole chunk files, loaded once and kept)
# --------------------------------------------------------------------------------------------

class LegacyCandidates(sail.Candidates):
    """Candidates.of_prompt as it was: ``load_file`` of the whole chunk file, cached."""

    def of_prompt(self, p):
        from safetensors.torch import load_file

        shards = self.__dict__.setdefault("shards", {})
        rows = self._rows[p]
        name = self.index["file"][rows[0]]
        if name not in shards:
            shards[name] = load_file(str(self.folder / name))
        data = shards[name]
        offs = [self.index["offset"][i] for i in rows]
        local = data["prompt_ids"].tolist().index(p)
        pooled = data["pooled"][local:local + 1] if "pooled" in data else None
        return data["latents"][offs], data["hidden"][local:local + 1].float(), pooled


def legacy_build_pair_cache(cands, pairs, seed_cache, out, vae_factor=8):
    """build_pair_cache as it was: every pair in one batch, one shard."""
    lw, ll, hid, pooled = [], [], [], []
    for p, w, l in zip(pairs["prompt_idx"], pairs["winner"], pairs["loser"]):
        latents, hidden, pool = cands.of_prompt(p)
        lw.append(latents[w:w + 1])
        ll.append(latents[l:l + 1])
        hid.append(hidden)
        if pool is not None:
            pooled.append(pool)
    batch = PairBatch(torch.cat(lw), torch.cat(ll), torch.cat(hid), torch.cat(pooled) if pooled else None)
    if pooled:
        batch.time_ids_w = native_time_ids(batch.latents_w.shape[-1] * vae_factor, len(lw))
        batch.time_ids_l = batch.time_ids_w.clone()
    captions = [cands.prompts[p] for p in pairs["prompt_idx"]]
    write_shard(out, 0, batch, captions, [f"generated:{p}" for p in pairs["prompt_idx"]])
    write_empty_prompt(out, seed_cache.empty_hidden, seed_cache.empty_pooled)
    finalize_cache(out, 1, {"version": 1, "kind": seed_cache.meta.get("kind"), "generated": True})
    return out


def write_pool(folder: Path, prompts: int, n: int, chunk: int, pooled: bool = False) -> Path:
    """Random candidates in generate_candidates' chunk files, merged as it merges them."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(prompts * 100 + n)
    for rows in sail.prompt_chunks(prompts, chunk):
        tensors = {"latents": torch.randn(len(rows) * n, *LATENT, generator=g),
                   "hidden": torch.randn(len(rows), *HIDDEN, generator=g).half(),
                   "prompt_ids": torch.tensor(list(rows)),
                   "seeds": torch.arange(rows.start * n, rows.stop * n, dtype=torch.int64)}
        if pooled:
            tensors["pooled"] = torch.randn(len(rows), POOLED, generator=g)
        write_safetensors(folder / sail.chunk_file(rows, ".safetensors"), tensors)
    sail._merge_candidates(folder, [f"prompt {p}" for p in range(prompts)], n)
    return folder


def seed_cache(folder: Path, pooled: bool) -> PairCache:
    """An empty pair cache: build_pair_cache copies only its empty-prompt states."""
    folder.mkdir(parents=True)
    write_empty_prompt(folder, torch.full((1, *HIDDEN), 0.5), torch.full((1, POOLED), 0.25) if pooled else None)
    finalize_cache(folder, 0, {"version": 1, "kind": "sdxl" if pooled else "sd15"})
    return PairCache(folder)


def chosen_pairs(prompts: int, n: int) -> dict:
    """One pair per prompt, winner and loser spread over the candidates (and not adjacent)."""
    return {"prompt_idx": list(range(prompts)), "winner": [(3 * p + 1) % n for p in range(prompts)],
            "loser": [(3 * p + 1 + n // 2) % n for p in range(prompts)]}


class CountingOpen:
    """``safetensors.safe_open`` for the files under ``folder``, counting the bytes of every tensor
    a read returns (per key) and the handles alive at once."""

    def __init__(self, real, folder: Path):
        self.real, self.folder = real, str(folder)
        self.bytes, self.live, self.max_live = Counter(), 0, 0

    def __call__(self, path, *args, **kw):
        handle = self.real(path, *args, **kw)
        if not str(path).startswith(self.folder):
            return handle
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        counted = _CountedHandle(handle, self)
        weakref.finalize(counted, self._closed)
        return counted

    def _closed(self):
        self.live -= 1


class _CountedHandle:
    def __init__(self, handle, counts: CountingOpen):
        self.handle, self.counts = handle, counts

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, key):
        t = self.handle.get_tensor(key)
        self.counts.bytes[key] += t.nbytes
        return t

    def get_slice(self, key):
        return _CountedSlice(self.handle.get_slice(key), key, self.counts)


class _CountedSlice:
    def __init__(self, rows, key, counts: CountingOpen):
        self.rows, self.key, self.counts = rows, key, counts

    def __getitem__(self, index):
        t = self.rows[index]
        self.counts.bytes[self.key] += t.nbytes
        return t


@pytest.fixture
def counting(monkeypatch):
    """Install a CountingOpen for a folder: ``counting(folder)`` -> its counts."""
    import safetensors

    def install(folder):
        counts = CountingOpen(safetensors.safe_open, folder)
        monkeypatch.setattr(safetensors, "safe_open", counts)
        return counts
    return install


# --------------------------------------------------------------------------------------------
# the reads
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooled", [False, True], ids=["sd15", "sdxl"])
def test_of_prompt_gives_what_whole_file_reads_gave(tmp_path, pooled):
    """Every prompt's latents, text states and pooled embedding equal the whole-file read's,
    dtype and all, over uneven chunk files; candidates asked for come in the order asked; every
    tensor owns its memory (a view would keep the whole memory-mapped tensor of the file alive)."""
    folder = write_pool(tmp_path / "candidates", prompts=7, n=4, chunk=3, pooled=pooled)
    ours, theirs = sail.Candidates(folder), LegacyCandidates(folder)
    for p in range(7):
        got, want = ours.of_prompt(p), theirs.of_prompt(p)
        assert (got[2] is None) == (want[2] is None) == (not pooled)
        for a, b in zip(got, want):
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b)
                assert a.untyped_storage().nbytes() == a.nbytes
        some, (w, l) = ours.of_prompt(p, [3, 0, 1]), (p % 4, (p + 2) % 4)
        assert torch.equal(some[0], want[0][[3, 0, 1]]) and some[0].untyped_storage().nbytes() == some[0].nbytes
        assert torch.equal(ours.of_prompt(p, [w, l])[0], want[0][[w, l]])
    assert torch.equal(ours.of_prompt(4, [1])[0], theirs.of_prompt(4)[0][1:2])


@pytest.mark.parametrize("prompts", [6, 18])
@pytest.mark.parametrize("n", [4, 16])
def test_pair_stage_reads_the_chosen_latents_only(tmp_path, counting, prompts, n):
    """build_pair_cache reads 2 latents and 1 text-state row per prompt and each chunk file's
    prompt ids once, whatever N and the pool: N x the pool's latents are there to be read. One
    chunk file is open at a time, and none once it returns."""
    folder = write_pool(tmp_path / "candidates", prompts, n, chunk=4)
    cache = seed_cache(tmp_path / "seed", pooled=False)
    counts = counting(folder)
    sail.build_pair_cache(sail.Candidates(folder), chosen_pairs(prompts, n), cache, tmp_path / "pairs", shard_pairs=5)
    assert counts.bytes == {"latents": 2 * prompts * LATENT_BYTES, "hidden": prompts * HIDDEN_BYTES,
                            "prompt_ids": 8 * prompts}
    assert counts.max_live == 1 and counts.live == 0


@pytest.mark.parametrize("prompts", [6, 18])
def test_rank_and_score_stages_read_each_candidate_once(tmp_path, counting, prompts):
    """The rank stage's reads (of_prompt of every prompt) and OnlineDPO's scoring read every
    candidate once, with at most one file open and none kept; the scores are the whole-file
    read's."""
    n = 4
    folder = write_pool(tmp_path / "candidates", prompts, n, chunk=4)
    weights = np.random.default_rng(0).random(8 * 8 * 4)
    scorer = lambda images, texts: images.reshape(len(images), -1) @ weights     # noqa: E731
    want = pq.read_table(sail.score_candidates_external(LegacyCandidates(folder), scorer, tmp_path / "a.parquet"))
    counts = counting(folder)
    cands = sail.Candidates(folder)
    for p in range(prompts):
        cands.of_prompt(p)
        assert counts.live == 0
    assert counts.bytes["latents"] == prompts * n * LATENT_BYTES and counts.max_live == 1
    got = pq.read_table(sail.score_candidates_external(cands, scorer, tmp_path / "b.parquet"))
    assert got.equals(want) and len(set(got.column("reward").to_pylist())) == prompts * n
    assert counts.bytes["latents"] == 2 * prompts * n * LATENT_BYTES and counts.live == 0


@pytest.mark.parametrize("pooled", [False, True], ids=["sd15", "sdxl"])
def test_pair_cache_is_the_one_batch_build_bit_for_bit(tmp_path, pooled):
    """build_pair_cache writes the files the one-batch build wrote when the pairs fit one shard,
    and the same rows, in order, over several shards: tensors, captions, sources, empty prompt."""
    from safetensors.torch import load_file

    folder = write_pool(tmp_path / "candidates", prompts=11, n=6, chunk=4, pooled=pooled)
    cache, pairs = seed_cache(tmp_path / "seed", pooled), chosen_pairs(11, 6)
    pairs = {k: v + v[:3] for k, v in pairs.items()}                     # pairs_per_prompt > 1: prompts again
    pairs["loser"][-3:] = [(w + 1) % 6 for w in pairs["winner"][-3:]]    # adjacent to their winner
    old = legacy_build_pair_cache(LegacyCandidates(folder), pairs, cache, tmp_path / "old", vae_factor=4)
    one = sail.build_pair_cache(sail.Candidates(folder), pairs, cache, tmp_path / "one", vae_factor=4)
    several = sail.build_pair_cache(sail.Candidates(folder), pairs, cache, tmp_path / "several", vae_factor=4,
                                    shard_pairs=4)
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in old.iterdir())
    for name in ("shard_00000.safetensors", "empty_prompt.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(old / name))
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    for name in ("shard_00000.json", "meta.json"):
        assert json.loads((one / name).read_text()) == json.loads((old / name).read_text())
    assert pq.read_table(one / "index.parquet").equals(pq.read_table(old / "index.parquet"))
    assert len(list(several.glob("shard_*.safetensors"))) == 4 and PairCache(several).meta["num_shards"] == 4
    a, b = PairCache(several), PairCache(old)
    assert (a.captions, a.sources) == (b.captions, b.sources) and len(a) == 14
    rows_a, rows_b = a.load(range(14)), b.load(range(14))
    for key, t in rows_b.tensors().items():
        assert torch.equal(getattr(rows_a, key), t), key
    assert (rows_b.pooled is not None) == (rows_b.time_ids_w is not None) == pooled
    assert not torch.equal(rows_b.latents_w, rows_b.latents_l)


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def legacy_sample_prompts(comps, model_dir, prompts, seeds, sampling, *, progress=False):
    """sample_prompts as it was: the prompts' states repeated N times, all rows at once."""
    from sail.engine.models import Conditioning, encode_prompts, unconditional_conditioning, vae_scale_factor
    from sail.engine.sampling import sample_conditioned

    repeat = len(seeds) // len(prompts)
    cond = encode_prompts(comps.text_encoders, comps.tokenizers, prompts)
    uncond = unconditional_conditioning(encode_prompts(comps.text_encoders, comps.tokenizers, [""]), model_dir)
    rows = Conditioning(cond.hidden.repeat_interleave(repeat, 0),
                        None if cond.pooled is None else cond.pooled.repeat_interleave(repeat, 0))
    side = int(comps.unet.config.sample_size)
    time_ids = native_time_ids(side * vae_scale_factor(model_dir), 1) if cond.pooled is not None else None
    latents = sample_conditioned(comps.unet, comps.noise_scheduler, rows, uncond, seeds, time_ids=time_ids,
                                 latent_shape=(comps.unet.config.in_channels, side, side), sampling=sampling,
                                 progress=progress)
    return latents, cond


@pytest.fixture
def cond_rows(monkeypatch):
    """The conditioning rows of every sample_conditioned call."""
    from sail.engine import sampling

    rows, inner = [], sampling.sample_conditioned

    def counted(unet, noise_scheduler, cond, *args, **kw):
        rows.append(cond.hidden.shape[0])
        assert cond.pooled is None or cond.pooled.shape[0] == cond.hidden.shape[0]
        return inner(unet, noise_scheduler, cond, *args, **kw)
    monkeypatch.setattr(sampling, "sample_conditioned", counted)
    return rows


@pytest.mark.parametrize("arch", ["tiny-sd15", "tiny-sdxl"])
def test_sample_prompts_conditions_one_batch_at_a_time_bit_for_bit(tiny_folders, cond_rows, arch, one_thread):
    """3 prompts x 3 seeds in batches of 4 (batches straddle prompts, the last one short): the
    latents of the repeated-rows sampler exactly, and no call is given more than a batch of rows."""
    from sail.engine.config import SamplingConfig
    from sail.engine.models import load_components

    comps = load_components(tiny_folders[arch], with_vae=False)
    prompts, seeds = ["w1 w2 w3", "w7 w4", "w5"], [11, 12, 13, 21, 22, 23, 31, 32, 33]
    sampling = SamplingConfig(sampler="ddpm", steps=2, guidance_scale=5.0, batch_size=4)
    want, want_cond = legacy_sample_prompts(comps, tiny_folders[arch], prompts, seeds, sampling)
    assert cond_rows == [9]
    cond_rows.clear()
    got, got_cond = sail.sample_prompts(comps, tiny_folders[arch], prompts, seeds, sampling)
    assert cond_rows == [4, 4, 1]
    assert got.dtype == want.dtype and torch.equal(got, want) and torch.equal(got_cond.hidden, want_cond.hidden)
    assert (got[0] - got[3]).abs().max() > 1e-3           # the prompts differ, not only the seeds


@pytest.mark.parametrize("prompts", [3, 9])
def test_generate_writes_the_same_chunks_with_a_batch_of_rows_per_call(tiny_folders, cond_rows, tmp_path,
                                                                       monkeypatch, prompts, one_thread):
    """generate_candidates' chunk files and index equal those written with the repeated rows, and
    the sampler is never given more than ``sampling.batch_size`` conditioning rows, at either
    pool size (chunk_prompts x N = 8 rows before)."""
    from safetensors.torch import load_file

    from sail.engine.config import SailConfig, SamplingConfig
    from sail.engine.ranks import single_process

    folder, texts = tiny_folders["tiny-sd15"], [f"w{p} w{p + 3}" for p in range(prompts)]
    cfg = SailConfig(candidates=2, chunk_prompts=4, precision="fp32",
                     sampling=SamplingConfig(sampler="ddim", steps=2, guidance_scale=3.0, batch_size=3))
    kw = dict(seed=5, iteration=1, ranks=single_process())
    got = sail.generate_candidates(folder, texts, cfg, tmp_path / "new", **kw)
    assert max(cond_rows) == 3 and sum(cond_rows) == 2 * prompts
    cond_rows.clear()
    monkeypatch.setattr(sail, "sample_prompts", legacy_sample_prompts)
    want = sail.generate_candidates(folder, texts, cfg, tmp_path / "old", **kw)
    assert max(cond_rows) == min(8, 2 * prompts)
    files = sorted(p.name for p in want.glob("*.safetensors"))
    assert files == sorted(p.name for p in got.glob("*.safetensors")) and len(files) == (prompts + 3) // 4
    for name in files:
        a, b = load_file(str(got / name)), load_file(str(want / name))
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert pq.read_table(got / "index.parquet").equals(pq.read_table(want / "index.parquet"))
