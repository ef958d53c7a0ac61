"""Environment record, timing helpers and the engine's ZeRO refusals, shared by the benchmarks."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Everything needed to tell two result rows apart: hardware, versions, code revision."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    on_gpu = device.type == "cuda"
    dirty = _git("status", "--porcelain", "--", "kernels", "bench/kernels.py", "bench/common.py")
    return {
        "device": torch.cuda.get_device_name(device) if on_gpu else _cpu_model(),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if on_gpu else None,
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "python": platform.python_version(),
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty_kernels": bool(dirty) if dirty is not None else None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def zero_refusal(optimizer: str, zero_stage: int) -> str | None:
    """Why the engine refuses ``optimizer`` under DeepSpeed ZeRO ``zero_stage`` (its one-line
    ConfigError), or None when it runs there. Asks ``engine/optim.py`` itself, on the DeepSpeed
    config it derives, so the rule (``UPDATE_COUPLING``, ``check_update_exact``: no Adafactor or
    AdamW8bit under ZeRO 1-3) has one home; that check holds at any precision and world size."""
    from sail.engine.config import DistributedConfig, OptimizerConfig, TrainConfig
    from sail.engine.configtree import ConfigError
    from sail.engine.optim import deepspeed_config

    train = TrainConfig(optimizer=OptimizerConfig(name=optimizer))
    try:
        deepspeed_config(train, DistributedConfig(backend="deepspeed", zero_stage=zero_stage), world_size=1,
                         precision="bf16", on_cpu=False)
    except ConfigError as err:
        return str(err)
    return None


class Timer:
    """Median-of-repeats wall time of a callable, in milliseconds.

    GPU: CUDA events around each call, after overwriting a 256 MiB buffer so that every repeat
    starts with a cold L2 (otherwise inputs of a few MiB would be served from L2 and the GB/s
    would be overstated).  CPU: perf_counter; no cache flush (CPU numbers are for reference only).
    """

    def __init__(self, device: torch.device, repeats: int, warmup: int):
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.on_gpu = device.type == "cuda"
        self._flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if self.on_gpu else None

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.on_gpu:
                self._flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(self.device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def copy_bandwidth_gbps(device: torch.device, repeats: int = 10) -> float:
    """Device copy bandwidth: ``dst.copy_(src)`` of 1 GiB on GPU (256 MiB on CPU), counting the
    bytes read plus the bytes written, median of repeats.  The roofline of a streaming kernel."""
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device, repeats, warmup=2)
    ms = median(timer(lambda: dst.copy_(src)))
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9
