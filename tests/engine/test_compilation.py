"""torch.compile of the denoiser (engine/compilation.py): the UNet calls of every stage trace
without a graph break, and a compilation that fails falls back to eager, saying why."""
import logging

import pytest
import torch
from torch import nn

from sail.engine import compilation
from sail.engine.compilation import call, compile_module, compile_training, graph_breaks, is_compiled


@pytest.fixture(scope="module")
def unets():
    from sail.engine.models import build_components

    return {arch: build_components(arch, seed=0) for arch in ("tiny-sd15", "tiny-sdxl")}


def _inputs(comps, rows: int, dtype=torch.float32):
    from sail.engine.models import native_time_ids

    cfg = comps.unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(dtype)
    kw = {"encoder_hidden_states": torch.randn(rows, 77, cfg.cross_attention_dim, generator=g).to(dtype)}
    if comps.kind == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(rows, pooled, generator=g).to(dtype),
                                   "time_ids": native_time_ids(cfg.sample_size * 8, rows).to(dtype)}
    return x, torch.full((rows,), 700), kw


def test_graph_break_count_sees_a_break():
    """The counter itself: a host sync in a forward is one break, none without it."""
    class Synced(nn.Module):
        def forward(self, x):
            y = x * 2
            if y.sum().item() > 0:          # data-dependent Python control flow
                return y + 1
            return y - 1

    assert graph_breaks(Synced(), torch.ones(3))[0] >= 1
    assert graph_breaks(nn.Linear(3, 3), torch.ones(2, 3)) == (0, [])


@pytest.mark.parametrize("arch", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("path", ["sampling", "training_checkpointed"])
def test_stage_unet_calls_trace_without_graph_breaks(unets, arch, path):
    """Generation, ranking and evaluation call the UNet without grad (sampling); training with
    grad and gradient checkpointing on (the recipes' setting): one graph each, SDXL's added
    conditioning included."""
    comps = unets[arch]
    unet = comps.unet
    x, t, kw = _inputs(comps, 4)
    if path == "sampling":
        unet.eval()
        with torch.no_grad():
            breaks, reasons = graph_breaks(lambda: unet(x, t, **kw).sample)
    else:
        unet.train()
        unet.enable_gradient_checkpointing()
        try:
            breaks, reasons = graph_breaks(lambda: unet(x, t, **kw).sample)
        finally:
            unet.disable_gradient_checkpointing()
            unet.eval()
    assert breaks == 0, reasons


def test_lora_policy_and_its_adapter_off_reference_trace_without_graph_breaks():
    from sail.engine.config import LoRAConfig
    from sail.engine.lora import add_lora, adapters_disabled
    from sail.engine.models import build_components

    comps = build_components("tiny-sd15", seed=0)
    add_lora(comps.unet, LoRAConfig(rank=4))
    x, t, kw = _inputs(comps, 2)
    assert graph_breaks(lambda: comps.unet(x, t, **kw).sample)[0] == 0
    with torch.no_grad(), adapters_disabled(comps.unet):
        assert graph_breaks(lambda: comps.unet(x, t, **kw).sample)[0] == 0


class Net(nn.Module):
    """A two-layer net (a module class of its own: dynamo does not trace into torch.nn's
    containers when their call is the compiled frame)."""

    def __init__(self, out: int = 2):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, out)

    def forward(self, x):
        return self.b(torch.nn.functional.silu(self.a(x)))


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler on this test machine")


def test_a_failed_compilation_falls_back_to_eager_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(compilation, "BACKEND", _failing_backend)
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 4)
    want = net(x)
    compile_module(net, "the test net", True, torch.device("cpu"))
    assert is_compiled(net)
    with caplog.at_level(logging.WARNING, logger="sail.engine.compilation"):
        got = call(net, x)
    assert torch.equal(got, want)
    assert not is_compiled(net)
    assert any("the test net failed" in r.getMessage() and "no compiler on this test machine" in r.getMessage()
               for r in caplog.records)


def test_a_backward_that_fails_to_compile_falls_back_before_any_gradient(monkeypatch, caplog):
    """train.compile compiles the backward with the forward: a backward that cannot be compiled
    fails in the forward call, which falls back, and the step's gradients are exactly eager's."""
    from types import SimpleNamespace

    import torch._functorch.config as functorch_config
    from torch._dynamo.backends.common import aot_autograd

    def bw_fails(gm, example_inputs):
        raise RuntimeError("backward kernels cannot be built")

    monkeypatch.setattr(compilation, "BACKEND", aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=bw_fails))
    torch.manual_seed(0)
    net = Net(out=1)
    x = torch.randn(5, 4)
    net(x).pow(2).mean().backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    with functorch_config.patch(force_non_lazy_backward_lowering=False):   # restored on exit
        compile_training(SimpleNamespace(policy=net, reference=None, device=torch.device("cpu")), True)
        assert is_compiled(net) and functorch_config.force_non_lazy_backward_lowering
        with caplog.at_level(logging.WARNING, logger="sail.engine.compilation"):
            loss = call(net, x).pow(2).mean()
    assert not is_compiled(net)
    assert any("backward kernels cannot be built" in r.getMessage() for r in caplog.records)
    loss.backward()
    for p, g in zip(net.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_no_compiler_is_said_before_any_work(monkeypatch, caplog):
    from torch._inductor import cpp_builder

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "no-such-cxx-sail-test")
    assert "no-such-cxx-sail-test" in compilation.preflight(torch.device("cpu"))
    net = nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="sail.engine.compilation"):
        compile_module(net, "the evaluated UNet", True, torch.device("cpu"))
    assert not is_compiled(net)
    assert any("the evaluated UNet runs eagerly" in r.getMessage() for r in caplog.records)


def test_disabled_leaves_the_module_alone():
    net = nn.Linear(2, 2)
    assert compile_module(net, "x", False) is net and not is_compiled(net)


@pytest.mark.slow
def test_compiled_tiny_unet_matches_eager(unets):
    """Inductor for real (a C++ compile: slow on 2 cores): the compiled sampling call gives the
    eager prediction to rounding, and its state-dict keys are unchanged."""
    comps = unets["tiny-sd15"]
    unet = comps.unet.eval()
    x, t, kw = _inputs(comps, 2)
    keys = list(unet.state_dict())
    with torch.no_grad():
        want = unet(x, t, **kw).sample
        compile_module(unet, "tiny", True)
        got = call(unet, x, t, **kw).sample
    try:
        assert is_compiled(unet) and list(unet.state_dict()) == keys
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        unet._compiled_call_impl = None
