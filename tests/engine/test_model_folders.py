"""Model folders: saved in fp32 or in the training precision (``train.save_precision``), and
read from shared storage once per node (``distributed.node_cache``, ``models.NodeCache``).

The once-per-node test starts 3 processes that load one folder at the same moment and counts,
with Linux inotify from the test process (outside the code under test), how often each of the
folder's files was opened, without and with the cache. This file is also that loader process:
``python tests/engine/test_model_folders.py --load FOLDER --cache ROOT --out PREFIX``.
"""
from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:     # run as a script
    sys.path.insert(0, str(REPO))

from sail.engine import models  # noqa: E402
from sail.engine.models import (build_components, load_components, load_unet, save_model_folder,  # noqa: E402
                                use_node_cache)

UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


_COMPONENTS = []


def _folder(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Path, dict]:
    """A tiny SD1.5 folder whose UNet weights (by ``seed``) are not representable in bf16; and
    those weights."""
    if not _COMPONENTS:                 # built once: seconds on a busy 2-core machine
        _COMPONENTS.append(build_components("tiny-sd15", seed=0))
    comps = _COMPONENTS[0]
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in comps.unet.state_dict().items()}
    save_model_folder(path, state, dict(comps.unet.config), comps, source=None, dtype=dtype)
    return path, state


@pytest.fixture
def no_node_cache():
    yield
    use_node_cache(None)


# ------------------------------------------------------------------------------------------------
# train.save_precision
# ------------------------------------------------------------------------------------------------

def test_a_folder_saved_in_bf16_holds_bf16_and_reloads_rounded(tmp_path):
    from safetensors import safe_open

    fp32, state = _folder(tmp_path / "fp32")
    bf16, _ = _folder(tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(bf16 / UNET_FILE), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    with safe_open(str(fp32 / UNET_FILE), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    ratio = (bf16 / UNET_FILE).stat().st_size / (fp32 / UNET_FILE).stat().st_size
    assert 0.49 < ratio < 0.51, ratio
    rounded, exact = load_unet(bf16).state_dict(), load_unet(fp32).state_dict()
    assert all(v.dtype == torch.float32 for v in rounded.values())          # cast on load, as asked
    for k, w in state.items():
        assert torch.equal(exact[k], w), k                                  # the default: bit-identical
        assert torch.equal(rounded[k], w.to(torch.bfloat16).float()), k     # bf16: the rounded weights
    assert any(not torch.equal(rounded[k], w) for k, w in state.items())
    in_bf16 = load_components(bf16, with_text=False, with_vae=False, dtype=torch.bfloat16).unet.state_dict()
    assert all(torch.equal(in_bf16[k], w.to(torch.bfloat16)) for k, w in state.items())


def test_the_save_dtype_follows_the_key():
    from sail.engine.config import config_from_dict
    from sail.engine.configtree import ConfigError
    from sail.engine.jobs import model_save_dtype

    assert config_from_dict({}).train.save_precision == "fp32"
    assert model_save_dtype("fp32", torch.bfloat16) == torch.float32
    assert model_save_dtype("train", torch.bfloat16) == torch.bfloat16
    assert model_save_dtype("train", torch.float16) == torch.float16
    assert model_save_dtype("train", torch.float32) == torch.float32
    with pytest.raises(ConfigError, match=r"train\.save_precision"):
        config_from_dict({"train": {"save_precision": "bf16"}})


# ------------------------------------------------------------------------------------------------
# The node cache, one process
# ------------------------------------------------------------------------------------------------

def _same(unet, state: dict) -> bool:
    loaded = unet.state_dict()
    return all(torch.equal(loaded[k], w) for k, w in state.items())


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in (root / f"uid{os.getuid()}").iterdir() if p.is_dir())


def test_the_cache_copies_once_and_copies_again_when_the_folder_changes(tmp_path, no_node_cache):
    folder, state = _folder(tmp_path / "model", seed=0)
    use_node_cache(tmp_path / "cache")
    assert _same(load_unet(folder), state)
    (entry,) = _entries(tmp_path / "cache")
    copied = entry / UNET_FILE
    first = copied.stat().st_ino
    load_components(folder, with_text=False, with_vae=False)     # the unet again, and the scheduler
    assert copied.stat().st_ino == first and (entry / "scheduler").is_dir()
    # the folder saved again (a --stage train recompute): the copy follows, never a stale one
    _, state2 = _folder(folder, seed=1)
    assert _same(load_unet(folder), state2)
    assert copied.stat().st_ino != first


def _key(folder: Path) -> str:
    return models.hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]


def test_the_cache_keeps_the_newest_folders_and_steps_aside_when_full(tmp_path, no_node_cache, monkeypatch):
    use_node_cache(tmp_path / "cache")
    folders = [_folder(tmp_path / f"m{i}", seed=i)[0] for i in range(models.NODE_CACHE_KEEP + 1)]
    for folder in folders:
        load_unet(folder)
        time.sleep(0.01)                # distinct last-use times
    # the least recently used copy deleted
    assert {e.name for e in _entries(tmp_path / "cache")} == {_key(f) for f in folders[1:]}
    # no room for another copy: the shared folder is read, with the right weights
    monkeypatch.setattr(models.shutil, "disk_usage", lambda path: _Usage(free=10))
    folder, state = _folder(tmp_path / "big", seed=7)
    assert _same(load_unet(folder), state)
    assert not (tmp_path / "cache" / f"uid{os.getuid()}" / _key(folder) / "unet").exists()


class _Usage:
    def __init__(self, free: int):
        self.total, self.used, self.free = free, 0, free


def test_the_ranks_on_a_node_come_from_the_launcher(monkeypatch):
    """What decides whether a run uses the node cache (Controller: more than one rank per node)."""
    from sail.engine.config import config_from_dict
    from sail.engine.ranks import Ranks

    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(key, raising=False)
    cpu = torch.device("cpu")
    assert Ranks(0, 1, cpu, "local").local_world_size == 1
    assert Ranks(5, 16, cpu, "deepspeed").local_world_size == 16          # no launcher count: one node
    monkeypatch.setenv("LOCAL_SIZE", "8")                                  # the deepspeed launcher
    assert Ranks(5, 16, cpu, "deepspeed").local_world_size == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")                            # torchrun
    assert Ranks(5, 16, cpu, "deepspeed").local_world_size == 4
    assert config_from_dict({}).distributed.node_cache == "/dev/shm/sail-node-cache"


# ------------------------------------------------------------------------------------------------
# The node cache, 3 processes: opens of the shared folder's files counted by inotify
# ------------------------------------------------------------------------------------------------

IN_OPEN, IN_ISDIR = 0x20, 0x40000000


class OpenWatch:
    """Opens of the files under ``root`` by any process of this machine (Linux inotify)."""

    def __init__(self, root: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.dirs = {}
        for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            wd = self.libc.inotify_add_watch(self.fd, str(d).encode(), IN_OPEN)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.dirs[wd] = d.relative_to(root)
        self.opens: Counter = Counter()

    def read(self) -> Counter:
        while True:
            try:
                buf = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                return self.opens
            off = 0
            while off < len(buf):
                wd, mask, _, size = struct.unpack_from("iIII", buf, off)
                name = buf[off + 16: off + 16 + size].rstrip(b"\0").decode()
                off += 16 + size
                if name and not mask & IN_ISDIR:
                    self.opens[str(self.dirs[wd] / name)] += 1

    def close(self) -> None:
        os.close(self.fd)


def _wait_for(paths: list[Path], procs: list) -> None:
    deadline = time.time() + 300
    while not all(p.is_file() for p in paths):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)


def _load_on_three_processes(tmp_path: Path, folder: Path, cache: Path) -> dict:
    """3 loader processes load ``folder`` twice: from where it is (one after the other), then
    through the node cache at ``cache`` (released at once); the opens of ``folder``'s files in
    each phase, and the digests of what they loaded."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    watch = OpenWatch(folder)
    outs = [tmp_path / f"out_{r}" for r in range(3)]
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--load", str(folder), "--cache",
                               str(cache), "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for out in outs]
    try:
        found = {}
        for phase in ("plain", "cached"):
            _wait_for([Path(f"{out}.ready_{phase}") for out in outs], procs)     # imports done
            # plain: one process after the other, so that no two opens of a file are one event
            # (inotify merges identical events queued back to back); cached: all at once. Merging
            # can only lower a count: the cached phase's 1 per file is exact.
            for group in ([[o] for o in outs] if phase == "plain" else [outs]):
                for out in group:
                    Path(f"{out}.go_{phase}").touch()
                _wait_for([Path(f"{out}.{phase}.json") for out in group], procs)
                watch.read()
            found[phase] = Counter(watch.opens)
            watch.opens.clear()
            found[phase + "_digests"] = [json.loads(Path(f"{out}.{phase}.json").read_text())["digest"] for out in outs]
        for p in procs:
            log, _ = p.communicate(timeout=300)
            assert p.returncode == 0, log[-4000:]
        return found
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        watch.close()


@pytest.mark.slow
def test_three_processes_of_a_node_read_the_shared_folder_once(tmp_path):
    folder, _ = _folder(tmp_path / "shared" / "model")
    loaded = ["unet", "scheduler", "vae", "tokenizer", "text_encoder"]
    files = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")
             if p.is_file() and p.relative_to(folder).parts[0] in loaded}
    found = _load_on_three_processes(tmp_path, folder, tmp_path / "node_cache")
    plain, cached = found["plain"], found["cached"]
    assert len(set(found["plain_digests"] + found["cached_digests"])) == 1      # the same weights everywhere
    # without the cache every process reads the weights from the shared folder
    assert plain[str(UNET_FILE)] == 3 and plain["text_encoder/model.safetensors"] == 3, plain
    # with it, the first process copies each file it loads (one open each); the others read the copy
    assert {k: v for k, v in cached.items() if k in files} == {k: 1 for k in files}, cached
    assert set(cached) <= set(files), set(cached) - set(files)
    plain_bytes, cached_bytes = (sum(files.get(k, 0) * n for k, n in c.items()) for c in (plain, cached))
    assert cached_bytes == sum(files.values()) and plain_bytes >= 3 * cached_bytes, (plain_bytes, cached_bytes)
    print(json.dumps({"folder_bytes": sum(files.values()), "shared_bytes_opened_per_node": {
        "no_cache": plain_bytes, "node_cache": cached_bytes}, "opens_no_cache": dict(plain)}))


def _load_twice(args) -> None:
    """One loader process: per phase (plain, cached), wait for the go file, load the whole folder
    (through the node cache in the second), write a digest of the weights."""
    torch.set_num_threads(1)
    out = Path(args.out)
    for phase, cache in (("plain", None), ("cached", args.cache)):
        Path(f"{out}.ready_{phase}").touch()
        while not Path(f"{out}.go_{phase}").is_file():
            time.sleep(0.01)
        use_node_cache(cache)
        comps = load_components(args.load)
        modules = [comps.unet, comps.vae, *comps.text_encoders]
        digest = sum(float(p.double().sum()) for m in modules for p in m.state_dict().values())
        Path(f"{out}.{phase}.json").write_text(json.dumps({"digest": f"{digest:.12e}"}))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--load", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    _load_twice(parser.parse_args())
