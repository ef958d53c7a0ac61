import torch
import torch.nn.functional as F

from sail.engine.losses import dpo_loss


def official_diffusion_dpo_loss(model_pred, ref_pred, target, beta):
    """The loss as the official Diffusion-DPO training code writes it: per-sample MSE mean
    over C,H,W; [winners; losers]; -logsigmoid(-0.5 * beta * (model_diff - ref_diff))."""
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    return -F.logsigmoid(inside_term).mean(), (inside_term > 0).float().mean()


def test_dpo_loss_equals_official_formula_fp32():
    gen = torch.Generator().manual_seed(0)
    for pairs in (1, 3, 8):
        noise = torch.randn(pairs, 4, 8, 8, generator=gen)
        target = torch.cat([noise, noise])
        ref = target + 0.3 * torch.randn(2 * pairs, 4, 8, 8, generator=gen)
        model = ref + 0.01 * torch.randn(2 * pairs, 4, 8, 8, generator=gen)
        expected, acc = official_diffusion_dpo_loss(model.double(), ref.double(), target.double(), 5000.0)
        for tgt in (target, noise):   # per-sample and shared-per-pair target layouts
            out = dpo_loss(model, ref, tgt, beta=5000.0)
            assert abs(out.loss.item() - expected.item()) < 1e-6 * max(1.0, abs(expected.item()))
            assert (out.z > 0).float().mean().item() == acc.item()


def test_dpo_loss_gradient_matches_official_autograd():
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 3, 4, 4, generator=gen)
    target = torch.cat([noise, noise])
    ref = target + 0.2 * torch.randn(4, 3, 4, 4, generator=gen)
    m1 = (ref + 0.05 * torch.randn(4, 3, 4, 4, generator=gen)).requires_grad_(True)
    m2 = m1.detach().double().requires_grad_(True)
    dpo_loss(m1, ref, noise, 500.0).loss.backward()
    official_diffusion_dpo_loss(m2, ref.double(), target.double(), 500.0)[0].backward()
    scale = m2.grad.abs().max().item()
    torch.testing.assert_close(m1.grad.double(), m2.grad, rtol=1e-4, atol=1e-5 * scale)
