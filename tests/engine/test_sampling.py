"""The sampler: per-sample seeding (independent of batching and order), CFG in one batch,
SDXL added conditioning, the caller's scheduler left untouched, pixel conversion; parity with
the diffusers SD1.5 / SDXL pipelines (unconditional branch, scheduler settings) for generation,
evaluation and SSPO."""
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


# --------------------------------------------------------------------------------------------
# Parity with the diffusers pipelines (tiny random models saved as diffusers folders)
# --------------------------------------------------------------------------------------------

# The scheduler configs the real models ship (runwayml/stable-diffusion-v1-5: PNDM;
# stabilityai/stable-diffusion-xl-base-1.0: Euler), so that the settings a DDIM / DDPM sampler
# inherits from them (set_alpha_to_one false, steps_offset 1, "leading" spacing) are exercised.
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "clip_sample": False, "interpolation_type": "linear", "sample_max_value": 1.0,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
PROMPTS, PER_PROMPT = ["w1 w2 w3", "w7 w4"], 2
PARITY_SEEDS = [31, 32, 33, 34]          # prompt-major: two samples of each prompt
# fp32 on one CPU thread, the same UNet calls on the same batches. One difference remains: we
# encode "" once (a batch of 1) where the pipeline encodes it once per prompt (a batch of 2), so
# the SD1.5 / encoded-"" text states differ in the last bit (~2e-7 in the latents after one step;
# exactly 0 where the branch is zeros, or without guidance). Guidance w = 5 and 4 steps amplify
# that to <= 2e-5 on latents of magnitude up to ~17 (the tiny random UNet), i.e. ~1e-6 relative.
# 1e-4 leaves a 5x margin and is 10^4 below what the wrong unconditional branch moves (> 1).
PARITY_ATOL = 1e-4


def _model_folder(folder, arch: str, scheduler: dict, **index_keys) -> str:
    """A random-weight tiny model saved as a diffusers folder, with ``scheduler`` as its
    scheduler config and ``index_keys`` added to its model_index.json."""
    import json

    from sail.engine.models import build_components, save_model_folder

    comps = build_components(arch, seed=0)
    save_model_folder(folder, comps.unet.state_dict(), dict(comps.unet.config), comps, source=None)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    index = json.loads((folder / "model_index.json").read_text())
    index.update(scheduler=["diffusers", scheduler["_class_name"]], **index_keys)
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {"sd15": _model_folder(root / "sd15", "tiny-sd15", SD15_SCHEDULER),
            "sdxl": _model_folder(root / "sdxl", "tiny-sdxl", SDXL_SCHEDULER),     # key absent: True
            "sdxl-encode-empty": _model_folder(root / "sdxl_ee", "tiny-sdxl", SDXL_SCHEDULER,
                                               force_zeros_for_empty_prompt=False)}


def _pipeline_latents(folder: str, sampler: str, guidance: float, steps: int, shape) -> torch.Tensor:
    """diffusers' own pipeline, loaded from the folder, from our initial noise for PARITY_SEEDS.
    The per-sample generators are handed over in the state our sampler leaves them after the
    initial draw, so the DDPM per-step noise comes from the same streams."""
    from pathlib import Path

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from sail.engine.models import detect_kind
    from sail.engine.sampling import initial_noise

    cls = StableDiffusionXLPipeline if detect_kind(Path(folder)) == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[sampler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in PARITY_SEEDS]
    for g in generators:
        torch.randn(tuple(shape), generator=g)
    return pipe(PROMPTS, num_images_per_prompt=PER_PROMPT, num_inference_steps=steps, guidance_scale=guidance,
                latents=initial_noise(PARITY_SEEDS, shape), generator=generators, output_type="latent").images


def _our_latents(folder: str, sampler: str, guidance: float, steps: int) -> torch.Tensor:
    from sail.engine.config import SamplingConfig
    from sail.engine.models import load_components
    from sail.engine.sail import sample_prompts

    comps = load_components(folder, with_vae=False)
    sampling = SamplingConfig(sampler=sampler, steps=steps, guidance_scale=guidance, batch_size=len(PARITY_SEEDS))
    return sample_prompts(comps, folder, PROMPTS, PARITY_SEEDS, sampling)[0]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("model", ["sd15", "sdxl", "sdxl-encode-empty"])
def test_sampler_matches_diffusers_pipeline(model_folders, model, sampler):
    """Generation, evaluation (both sample_prompts) and SSPO (sample_conditioned, below) give the
    latents of StableDiffusionPipeline / StableDiffusionXLPipeline for the same initial noise,
    scheduler config, steps and guidance: SD1.5 guides against "", SDXL against zeros unless its
    model_index.json sets force_zeros_for_empty_prompt false."""
    folder = model_folders[model]
    ours = _our_latents(folder, sampler, guidance=5.0, steps=4)
    theirs = _pipeline_latents(folder, sampler, 5.0, 4, ours.shape[1:])
    assert ours.shape == (4, 4, 16, 16) and ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=PARITY_ATOL)


def test_sdxl_unconditional_branch_changes_the_samples(model_folders):
    """Zeros vs the encoded "" is a visible difference on the tiny SDXL, so the parity test
    above tells the two apart (same weights, only model_index.json differs)."""
    zeros = _our_latents(model_folders["sdxl"], "ddim", guidance=5.0, steps=4)
    empty = _our_latents(model_folders["sdxl-encode-empty"], "ddim", guidance=5.0, steps=4)
    assert (zeros - empty).abs().max() > 1.0          # 2.5 measured: 10^4 x PARITY_ATOL


def test_unconditional_branch_per_model_kind(model_folders):
    from sail.engine.models import encode_prompts, load_components, unconditional_conditioning

    empty = {}
    for model, zeroed in (("sd15", False), ("sdxl", True), ("sdxl-encode-empty", False)):
        comps = load_components(model_folders[model], with_vae=False)
        empty[model] = encode_prompts(comps.text_encoders, comps.tokenizers, [""])
        uncond = unconditional_conditioning(empty[model], model_folders[model])
        assert empty[model].hidden.abs().max() > 0.1                 # "" does not encode to zeros
        expected = torch.zeros_like(empty[model].hidden) if zeroed else empty[model].hidden
        torch.testing.assert_close(uncond.hidden, expected, rtol=0, atol=0)
        if model != "sd15":
            expected = torch.zeros_like(empty[model].pooled) if zeroed else empty[model].pooled
            torch.testing.assert_close(uncond.pooled, expected, rtol=0, atol=0)
    assert unconditional_conditioning(empty["sd15"], None) is empty["sd15"]     # no folder: SD1.5 encodes ""
    no_folder = unconditional_conditioning(empty["sdxl"], None)                   # ...and SDXL zeroes
    assert no_folder.hidden.abs().max() == 0 and no_folder.pooled.abs().max() == 0


def test_sampler_inherits_the_pipeline_scheduler_settings(model_folders):
    """The DDIM built from the training scheduler (a DDPMScheduler read from the folder) keeps
    what DDIMScheduler.from_config(the folder's own config) has, set_alpha_to_one false included."""
    from diffusers import PNDMScheduler

    from sail.engine.models import load_components
    from sail.engine.sampling import sampling_scheduler

    folder = model_folders["sd15"]
    ours = sampling_scheduler(load_components(folder, with_text=False).noise_scheduler, "ddim")
    theirs = DDIMScheduler.from_config(PNDMScheduler.from_pretrained(folder, subfolder="scheduler").config)
    assert ours.config.set_alpha_to_one is False and ours.config.steps_offset == 1
    assert float(ours.final_alpha_cumprod) == float(theirs.final_alpha_cumprod) < 1.0
    ours.set_timesteps(4)
    assert ours.timesteps.tolist() == [751, 501, 251, 1]


@pytest.mark.parametrize("model_dir, like", [("sdxl-encode-empty", "sdxl-encode-empty"), (None, "sdxl")])
def test_sspo_reference_samples_use_the_same_sampler(model_folders, tmp_path, model_dir, like):
    """SSPO's reference samples (ReplayPool._sample, from the pair cache's encoded "") equal
    sample_prompts' samples of the same prompts and seeds, unconditional branch included: the
    folder's model_index.json decides it, and without a folder the SDXL default (zeros) holds."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from sail.engine import seeds
    from sail.engine.config import SamplingConfig, SSPOConfig
    from sail.engine.data.cache import PairBatch
    from sail.engine.models import encode_prompts, load_components, native_time_ids
    from sail.engine.sail import sample_prompts
    from sail.engine.sspo import ReplayPool

    folder = model_folders["sdxl-encode-empty"]     # the weights; only model_index.json differs from "sdxl"
    comps = load_components(folder, with_vae=False)
    cond = encode_prompts(comps.text_encoders, comps.tokenizers, PROMPTS)
    empty = encode_prompts(comps.text_encoders, comps.tokenizers, [""])
    shape = (4, 16, 16)

    class Rows:           # the pair cache: row r is PROMPTS[r] at the native size
        empty_hidden, empty_pooled = empty.hidden, empty.pooled

        def load(self, rows):
            return PairBatch(torch.zeros(len(rows), *shape), torch.zeros(len(rows), *shape), cond.hidden[rows],
                             cond.pooled[rows], native_time_ids(32, len(rows)), native_time_ids(32, len(rows)))

    sampling = SamplingConfig(sampler="ddpm", steps=3, guidance_scale=5.0, batch_size=2)
    strategy = SimpleNamespace(reference=comps.unet, world_size=1, rank=0, is_main=True)
    pool = ReplayPool(SSPOConfig(sampling=sampling), tmp_path, strategy, comps.noise_scheduler, Rows(), seed=5,
                      total_steps=1, rows_of_step=lambda s: [0, 1],
                      model_dir=None if model_dir is None else model_folders[model_dir])
    pool.loaded = 0                                  # checkpoint 0's weights are the UNet above
    pool._sample(0, [0, 1])
    sspo = load_file(str(next(pool.refs_dir.glob("step_000000_*.safetensors"))))
    assert sspo["rows"].tolist() == [0, 1]
    reference = sample_prompts(comps, model_folders[like], PROMPTS, [seeds.reference_sample(5, 0, r) for r in (0, 1)],
                               sampling)[0]
    torch.testing.assert_close(sspo["latents"], reference, rtol=0, atol=0)   # the same calls: bit for bit
