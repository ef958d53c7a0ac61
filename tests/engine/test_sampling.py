"""The sampler: per-sample seeding (independent of batching and order), CFG in one batch,
SDXL added conditioning, the caller's scheduler left untouched, pixel conversion."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from sail.engine.sampling import latents_to_uint8, sample_latents, uint8_to_latents

SHAPE = (3, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(**extra):
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
                                cross_attention_dim=16, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **extra).eval()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(1)
    cond = torch.randn(5, 4, 16)
    uncond = torch.randn(1, 4, 16)
    sched = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    return _unet(), sched, cond, uncond


def _sample(unet, sched, cond, uncond, seeds, batch_size, guidance=3.0, steps=6):
    return sample_latents(unet, sched, cond, uncond, seeds, num_steps=steps, guidance_scale=guidance,
                          latent_shape=SHAPE, batch_size=batch_size)


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
def test_sample_independent_of_batching_and_order(setup, scheduler_cls):
    unet, base, cond, uncond = setup
    sched = scheduler_cls.from_config(base.config)
    seeds = [11, 12, 13, 14, 15]
    ref = _sample(unet, sched, cond, uncond, seeds, batch_size=5)
    assert ref.shape == (5, *SHAPE) and torch.isfinite(ref).all()
    for bs in (1, 2, 3):
        torch.testing.assert_close(_sample(unet, sched, cond, uncond, seeds, batch_size=bs), ref, atol=1e-5, rtol=0)
    perm = [3, 0, 4, 2, 1]  # another process drawing the same (prompt, seed) pairs in another order
    out = _sample(unet, sched, cond[perm], uncond, [seeds[i] for i in perm], batch_size=2)
    torch.testing.assert_close(out, ref[perm], atol=1e-5, rtol=0)
    other = _sample(unet, sched, cond, uncond, [21, 12, 13, 14, 15], batch_size=5)
    assert (other[0] - ref[0]).abs().max() > 0.05      # a different seed changes its sample...
    torch.testing.assert_close(other[1:], ref[1:], atol=1e-5, rtol=0)  # ...and only its sample


def test_ddpm_draws_per_step_noise(setup):
    unet, base, cond, uncond = setup
    # DDPM is stochastic per step: the same initial noise with another per-step stream differs.
    # Seeding is per sample, so equal seeds on equal prompts give equal samples.
    out = _sample(unet, base, cond[[0, 0]], uncond, [5, 5], batch_size=2)
    torch.testing.assert_close(out[0], out[1])
    assert not torch.equal(base.timesteps, torch.arange(0, 6))  # caller's scheduler untouched
    assert len(base.timesteps) == 100


def test_guidance_combines_conditional_and_unconditional(setup):
    unet, base, cond, uncond = setup
    sched = DDIMScheduler.from_config(base.config)
    g1 = _sample(unet, sched, cond, None, [1, 2, 3, 4, 5], batch_size=5, guidance=1.0, steps=1)
    # one DDIM step from t=T: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), clipped; reproduce it by hand
    x = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in [1, 2, 3, 4, 5]])
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    with torch.no_grad():
        eps_c = unet(x, t, cond).sample
        eps_u = unet(x, t, uncond.expand(5, -1, -1)).sample
    for g, out in ((1.0, g1), (4.0, _sample(unet, sched, cond, uncond, [1, 2, 3, 4, 5], 5, guidance=4.0, steps=1))):
        eps = eps_u + g * (eps_c - eps_u)
        expected = sched.step(eps, t, x).prev_sample
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="uncond"):
        _sample(unet, sched, cond, None, [1, 2, 3, 4, 5], 5, guidance=2.0)


def test_sdxl_added_conditioning():
    unet = _unet(addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8)
    sched = DDIMScheduler(num_train_timesteps=100)
    torch.manual_seed(2)
    cond, uncond = torch.randn(3, 4, 16), torch.zeros(1, 4, 16)
    added = {"text_embeds": torch.randn(3, 8), "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]]).expand(3, 6)}
    added_u = {"text_embeds": torch.zeros(1, 8), "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]])}
    kw = dict(num_steps=3, guidance_scale=2.0, latent_shape=SHAPE, added_cond=added, added_uncond=added_u)
    full = sample_latents(unet, sched, cond, uncond, [7, 8, 9], batch_size=3, **kw)
    split = sample_latents(unet, sched, cond, uncond, [7, 8, 9], batch_size=1, **kw)
    torch.testing.assert_close(full, split, atol=1e-5, rtol=0)
    changed = dict(added, text_embeds=added["text_embeds"] + 1.0)
    moved = sample_latents(unet, sched, cond, uncond, [7, 8, 9], batch_size=3, **dict(kw, added_cond=changed))
    assert (moved - full).abs().max() > 1e-3  # the pooled embedding reaches the UNet


def test_pixel_conversion():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    img = latents_to_uint8(x)
    assert img.shape == (1, 1, 5, 3) and img.dtype == np.uint8
    assert img[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    back = uint8_to_latents(np.array([[[[0, 255, 51]]]], dtype=np.uint8))
    torch.testing.assert_close(back.flatten(), torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
