"""``torch.compile`` of the denoiser, with an eager fallback that says why.

The compiled region is the UNet's forward (``nn.Module.compile``: in place, so state-dict keys,
checkpoints and DeepSpeed see the same module). It is where the time goes: in every stage the
loop around it (scheduler steps, loss, reward) is a few elementwise ops per call. The UNets the
engine runs (SD1.5, SDXL with added conditioning, the toy world's, with LoRA adapters on or
off, gradient checkpointing on) trace without a graph break: tests/engine/test_compilation.py
counts them with ``torch._dynamo.explain``, and ``bench/e2e.py`` reports them per stage.

Compilation is lazy: it happens at the first call of each input shape. ``call`` runs the module
and, when compilation itself fails (no C++ compiler, an unsupported op, an inductor error), logs
the reason once, turns compilation off for that module and runs the call eagerly, so a run
never stops because of the compiler. ``preflight`` checks up front what can be checked without
compiling (a C++ compiler on the CPU, Triton on CUDA).
"""
from __future__ import annotations

import logging
import shutil

import torch
from torch import nn

log = logging.getLogger(__name__)

BACKEND = "inductor"
"""torch.compile's backend (a name or a backend callable; tests put a failing one here)."""


def _compile_errors() -> tuple[type[BaseException], ...]:
    import torch._dynamo.exc as dynamo_exc

    errors: list[type[BaseException]] = [dynamo_exc.TorchDynamoException]
    try:
        from torch._inductor.exc import CppCompileError, InductorError

        errors += [InductorError, CppCompileError]
    except ImportError:      # older torch: inductor errors surface as BackendCompilerFailed
        pass
    return tuple(errors)


def preflight(device: torch.device) -> str | None:
    """Why compilation cannot run on ``device`` here (None: nothing known against it)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (inductor generates Triton kernels on CUDA)"
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
    except Exception as err:  # noqa: BLE001 - any failure to find one is the reason to report
        return f"no C++ compiler for inductor's CPU kernels ({type(err).__name__}: {err})"
    if shutil.which(compiler) is None:
        return f"no C++ compiler for inductor's CPU kernels ({compiler!r} not on PATH)"
    return None


def _inner(module: nn.Module) -> nn.Module:
    """The module whose forward is compiled: a DeepSpeed engine's model, else the module."""
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, nn.Module) else module


def compile_module(module: nn.Module, what: str, enabled: bool, device: torch.device | None = None) -> nn.Module:
    """Compile ``module``'s forward in place when ``enabled`` and ``preflight`` finds nothing
    against it; log which. A DeepSpeed engine compiles through its own ``compile`` (which
    compiles its model in place the same way). Returns ``module``."""
    if not enabled:
        return module
    if device is None:
        device = next(_inner(module).parameters()).device
    reason = preflight(device)
    if reason is not None:
        log.warning("compile: %s runs eagerly: %s", what, reason)
        return module
    module.compile(backend=BACKEND)
    _inner(module)._sail_compiled_as = what
    log.info("compile: %s compiled (torch.compile, inductor; the first call of each input shape compiles)", what)
    return module


def is_compiled(module: nn.Module) -> bool:
    """Whether calls of ``module`` go through torch.compile."""
    return getattr(_inner(module), "_compiled_call_impl", None) is not None


def fall_back(module: nn.Module, err: BaseException) -> None:
    """Turn compilation of ``module`` off after ``err``, saying why (once)."""
    target = _inner(module)
    cause = getattr(err, "inner_exception", None) or err.__cause__ or err     # the backend's own error
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    log.warning("compile: %s failed (%s: %s); it runs eagerly from now on",
                getattr(target, "_sail_compiled_as", type(target).__name__), type(cause).__name__, first[:300])
    target._compiled_call_impl = None


def call(module: nn.Module, *args, **kwargs):
    """``module(*args, **kwargs)``; a compilation failure falls back to eager (``fall_back``)."""
    if not is_compiled(module):
        return module(*args, **kwargs)
    try:
        return module(*args, **kwargs)
    except _compile_errors() as err:
        fall_back(module, err)
        return module(*args, **kwargs)


def compile_training(strategy, enabled: bool) -> None:
    """``train.compile``: the prepared strategy's policy and reference (a module or a DeepSpeed
    engine; LoRA's reference is the policy itself). The backward is compiled with the forward, at
    the first call, not at the first backward: a backward that cannot be compiled then fails
    where ``call`` falls back, before any gradient is written."""
    if enabled:
        import torch._functorch.config as functorch_config

        functorch_config.force_non_lazy_backward_lowering = True
    compile_module(strategy.policy, "the policy UNet", enabled, strategy.device)
    if strategy.reference is not None:
        compile_module(strategy.reference, "the reference UNet", enabled, strategy.device)


def graph_breaks(fn, *args, **kwargs) -> tuple[int, list[str]]:
    """Graph breaks dynamo finds tracing ``fn(*args, **kwargs)`` (nothing is compiled): the
    count and the reasons."""
    import torch._dynamo

    torch._dynamo.reset()
    out = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = [str(getattr(b, "reason", b)).splitlines()[0] for b in out.break_reasons]
    torch._dynamo.reset()
    return out.graph_break_count, reasons
