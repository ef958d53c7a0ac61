"""The newest-versions smoke: does the project still work with the newest releases that
setup.py's ranges allow? Run by .ci/run in a fresh virtual environment without the lock.

Three checks, each a subprocess in a scratch folder: every module of ours imports; a few
Diffusion-DPO steps of a tiny SD1.5 (VAE, CLIP text encoder, UNet) on Pick-a-Pic-schema
pairs; one SAIL iteration of a shrunken toy world (generate, rank, pair, mix, train). On a
failure it names the installed packages whose versions differ from constraints-cpu.txt, and
the package whose code raised, so that drift is caught the day it happens.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints-cpu.txt"

IMPORT_ALL = """
import importlib, pkgutil
for name in ("sail.engine", "sail.kernels", "sail.launch", "sail.bench"):
    pkg = importlib.import_module(name)
    for info in pkgutil.walk_packages(pkg.__path__, name + "."):
        importlib.import_module(info.name)
print("imported every module")
"""
SMALL_WORLD = ["num_seed_prompts=8", "images_per_seed_prompt=4", "seed_pairs_per_prompt=2", "full_multiplier=1",
               "pool_prompts=8", "num_eval_prompts=8", "sampling.steps=2"]
CHECKS = {
    "import every module": [sys.executable, "-c", IMPORT_ALL],
    "toy data (Pick-a-Pic schema)": [sys.executable, str(REPO / "launch/toy_data.py"), "--out", "runs/toy_data",
                                     "--no-progress", *[a for kv in SMALL_WORLD for a in ("--set", kv)]],
    "tiny SD1.5 DPO steps": [sys.executable, str(REPO / "launch/train.py"), "--config", "tiny_sd15.json"],
    "one SAIL iteration of the toy world": [
        sys.executable, str(REPO / "launch/train.py"), "--config", "toy_cpu.json", "--run-dir", "runs/sail",
        *[a for kv in ["train.steps=3", "train.micro_batch_pairs=4", "sail.iterations=1", "sail.train_steps=3",
                       "sail.candidates=2", "sail.rank_draws=2", "sail.sampling.steps=2", "eval.enabled=false",
                       *[f"toy.world.{w}" for w in SMALL_WORLD]] for a in ("--set", kv)]],
}


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[_norm(name)] = version.strip()
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def drift() -> list[str]:
    """'name locked -> installed' for every installed distribution whose version differs."""
    pins, out = locked_versions(), []
    for dist in importlib.metadata.distributions():
        name, version = _norm(dist.metadata["Name"]), dist.version.split("+")[0]
        if name in ("sail", "pip"):   # ourselves, and the installer (not a dependency)
            continue
        if name not in pins:
            out.append(f"{name} (not in the lock) {version}")
        elif pins[name] != version:
            out.append(f"{name} {pins[name]} -> {version}")
    return sorted(out)


def raised_in(stderr: str) -> str | None:
    """The installed distribution whose file the last traceback frame points into."""
    frames = re.findall(r'File "([^"]+)"', stderr)
    owners = importlib.metadata.packages_distributions()
    for path in reversed(frames):
        match = re.search(r"site-packages/([^/]+)", path)
        if match:
            top = match.group(1).removesuffix(".py")
            dists = owners.get(top, [top])
            return ", ".join(f"{d} {importlib.metadata.version(d)}" for d in dists)
    return None


def main() -> int:
    scratch = Path(tempfile.mkdtemp(prefix="sail-smoke-"))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    for name, cmd in CHECKS.items():
        proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            print(f"newest-versions smoke FAILED at: {name} (exit {proc.returncode})")
            print("\n".join(proc.stderr.strip().splitlines()[-25:]))
            culprit = raised_in(proc.stderr)
            if culprit:
                print(f"the error was raised inside: {culprit}")
            print("installed versions that differ from constraints-cpu.txt: " + ("; ".join(drift()) or "none"))
            return 1
        print(f"ok: {name}")
    changed = drift()
    print("newest-versions smoke passed; versions newer than the lock: " + ("; ".join(changed) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
