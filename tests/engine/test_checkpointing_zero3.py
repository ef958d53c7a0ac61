"""Gradient checkpointing under ZeRO-3 on 2 CPU ranks: full fine-tuning and LoRA (frozen base
weights, the case that fails with "recomputed shape [0]" on DeepSpeed < 0.19.3). With and
without checkpointing the same fixed batch must give the same losses, and the checkpoint
function must really run."""
from __future__ import annotations

import shutil

import pytest

from sail.engine.configtree import ConfigError
from sail.engine.lora import require_frozen_recompute_support
from tests.engine.test_optim import assert_decreasing, launch_zero_worker


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not installed")
def test_checkpointing_matches_plain_backward_under_zero3(tmp_path):
    base = dict(optimizer="adamw", zero_stage=3, steps=3, beta=500.0)
    runs = [dict(base, lr=3e-5, lora_rank=0, checkpointing=False), dict(base, lr=3e-5, lora_rank=0, checkpointing=True),
            dict(base, lr=1e-3, lora_rank=4, checkpointing=False), dict(base, lr=1e-3, lora_rank=4, checkpointing=True)]
    out = launch_zero_worker(tmp_path, runs)
    full_off, full_on, lora_off, lora_on = out["results"]
    for off, on in ((full_off, full_on), (lora_off, lora_on)):
        assert off["checkpoint_calls"] == 0
        # tiny-sd15 has 4 checkpointed blocks per forward: >= 4 per step on each rank
        assert on["checkpoint_calls"] >= 4 * on["steps"]
        assert on["losses"] == pytest.approx(off["losses"], rel=1e-5, abs=1e-7)
        assert_decreasing(on["losses"], factor=0.95)
        assert on["wrapper"] == "DeepSpeedZeroOptimizer_Stage3"


def test_frozen_recompute_support_is_checked_only_under_zero3(monkeypatch):
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator

    require_frozen_recompute_support(3)                      # the installed DeepSpeed has the fix
    monkeypatch.delattr(coordinator, "update_recompute_parameters")
    require_frozen_recompute_support(2)                      # ZeRO-2 does not partition parameters
    with pytest.raises(ConfigError, match=r"needs deepspeed >= 0.19.3"):
        require_frozen_recompute_support(3)
