"""The multi-node launch path of docs/cluster.md on one machine: ``deepspeed --hostfile`` with a
hostfile of ``localhost slots=2`` starts 2 CPU ranks of launch/train.py for a 2-step ZeRO-3 run
(``--no_ssh_check``: a one-host hostfile launches locally, there is no ssh server to probe)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.datagen import pickapic_rows, write_pickapic
from tests.engine.test_optim import _free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not installed")
def test_hostfile_launch_runs_two_ranks(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    data = write_pickapic(tmp_path / "pairs.parquet", pickapic_rows(4))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "name": "hostfile", "run_dir": str(tmp_path / "run"), "model": {"arch": "tiny-sd15"},
        "data": {"train": [data], "resolution": 16},
        "train": {"steps": 2, "micro_batch_pairs": 1, "grad_accum": 1, "log_every": 1, "beta": 500.0},
        "distributed": {"backend": "deepspeed", "zero_stage": 3, "global_batch_pairs": 2}}))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("DS_ACCELERATOR", None)          # launch/train.py sets it on a machine without CUDA
    # --no_ssh_check: the launcher otherwise probes the first host over ssh, even localhost
    proc = subprocess.run(["deepspeed", "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
                           "--master_port", str(_free_port()), "launch/train.py", "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "dist_world_size=2" in out                         # the launcher read 2 slots from the hostfile
    metrics = json.loads((tmp_path / "run" / "iter_000" / "metrics.json").read_text())
    assert json.loads(metrics["strategy"])["world_size"] == 2
    assert [row["step"] for row in metrics["history"]] == [1, 2]
    assert (tmp_path / "run" / "iter_000" / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
