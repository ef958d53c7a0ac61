"""The run configuration: a tree of small dataclasses, JSON on disk, validated on load.

Each component receives its own sub-config (``ModelConfig`` to the model loader,
``TrainConfig`` to the trainer, ...), never the root. The run's world (engine/worlds.py) may own
a section named after it (``"toy": {...}``): built from the world's dataclass at load, held as
``RunConfig.world_settings``, written back under its name. ``load_config`` resolves a config name
(working directory first, then the repository's ``configs/``), applies ``--set`` overrides and
reports any unknown key, wrong type or out-of-range value with the file and the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sail.engine.configtree import ConfigError, apply_overrides, build_dataclass, read_json, require, to_dict

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the checkout's configs/, or sail/configs installed

ARCHS = ("tiny-sd15", "tiny-sdxl", "sd15", "sdxl")
TOY_MODEL_TOKEN = "@toy"
TOY_BASE_MODEL = Path(__file__).resolve().parent / "toy" / "base_model"


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft) instead of full fine-tuning."""

    rank: int = 0
    """Adapter rank; 0 trains the full UNet."""
    alpha: float | None = None
    """LoRA scaling numerator (alpha / rank); None means alpha = rank."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Module names (suffixes) that get adapters."""

    def __post_init__(self):
        require(self.rank >= 0, "rank", f"must be >= 0, got {self.rank}")
        require(bool(self.target_modules), "target_modules", "must name at least one module")


@dataclass
class ModelConfig:
    """Which model to train and how to run it."""

    path: str | None = None
    """Local diffusers-format folder (model_index.json, unet/, text_encoder/, ...). Never a hub id.
    Its scheduler config says whether the model predicts epsilon or v (both are trained)."""
    arch: Literal["tiny-sd15", "tiny-sdxl", "sd15", "sdxl"] | None = None
    """Build this architecture with random weights instead of loading ``path`` (tests, benchmarks)."""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """Attention backend; xformers falls back to SDPA with one warning where it cannot run."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass (SDXL needs it)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Adapters; rank 0 trains the whole UNet."""

    def __post_init__(self):
        require((self.path is None) != (self.arch is None), "path",
                "set exactly one of model.path (a local diffusers folder) and model.arch")

    def resolved_path(self) -> str | None:
        """``@toy`` names the toy base model shipped inside the package."""
        if self.path == TOY_MODEL_TOKEN:
            return str(TOY_BASE_MODEL)
        return self.path


@dataclass
class DataConfig:
    """Preference pairs and their pre-encoded cache."""

    train: list[str] = field(default_factory=list)
    """Pick-a-Pic v2 parquet files or globs (local paths)."""
    cache_dir: str | None = None
    """Where pre-encoded latents and text embeddings go (default: <run_dir>/cache/seed)."""
    resolution: int | None = None
    """Training image size in pixels (None: the UNet's sample size times the VAE factor)."""
    random_crop: bool = False
    """Random instead of centre crop at pre-encoding (crop kept for SDXL time ids)."""
    random_flip: bool = True
    """Horizontal flip with probability 0.5, the same for both images of a pair."""
    empty_prompt_prob: float = 0.2
    """Fraction of training pairs whose prompt is replaced by the empty prompt (reference: 20%)."""
    max_pairs: int | None = None
    """Use at most this many pairs (after ties and bad rows are dropped)."""
    select: str | None = None
    """A parquet file of (file, row) columns (rows with role "seed" when it has a role column):
    encode only these rows of data.train. The pickapic recipe sets it to its split.parquet."""
    max_bad_fraction: float = 0.01
    """Malformed rows (unreadable caption or label) and pairs with undecodable images are
    skipped, counted and named in the load report; more than this fraction of the rows is an
    error."""
    strict: bool = False
    """Refuse the data set at its first malformed row or undecodable image."""
    encode_batch_size: int = 16
    """Images per VAE / text-encoder batch in the pre-encoding pass."""
    encode_shard_pairs: int = 256
    """Pairs per cache shard: the unit of work handed to a rank and of resume in pre-encoding."""
    decoder: Literal["pil", "dali"] = "pil"
    """Image decoding backend of the pre-encoding pass."""
    decode_workers: int = 4
    """Threads that decode and resize a shard's images on the PIL path of the pre-encoding pass
    (per rank; 1: no pool). The output does not depend on it."""

    def __post_init__(self):
        require(0.0 <= self.empty_prompt_prob < 1.0, "empty_prompt_prob",
                f"must be in [0, 1), got {self.empty_prompt_prob}")
        require(self.resolution is None or self.resolution >= 8, "resolution", "must be >= 8")
        require(self.max_pairs is None or self.max_pairs > 0, "max_pairs", "must be > 0")
        require(self.encode_batch_size > 0, "encode_batch_size", "must be > 0")
        require(self.encode_shard_pairs > 0, "encode_shard_pairs", "must be > 0")
        require(self.decode_workers > 0, "decode_workers", f"must be > 0, got {self.decode_workers}")
        require(0.0 <= self.max_bad_fraction < 1.0, "max_bad_fraction",
                f"must be in [0, 1), got {self.max_bad_fraction}")


@dataclass
class OptimizerConfig:
    """Optimizer choice and hyper-parameters."""

    name: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    """adamw (torch / DeepSpeed; the recipes'), adamw8bit (bitsandbytes), adafactor (transformers,
    the Diffusion-DPO paper's SDXL optimizer). adamw8bit and adafactor are refused under ZeRO 1-3:
    their update is not element-wise (engine/optim.py::UPDATE_COUPLING)."""
    lr: float = 1e-5
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8

    def __post_init__(self):
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(all(0 <= b < 1 for b in self.betas), "betas", f"must be in [0, 1), got {self.betas}")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.eps > 0, "eps", "must be > 0")


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: linear warm-up, then constant or cosine decay to zero."""

    name: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0

    def __post_init__(self):
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")


@dataclass
class LossConfig:
    """The training objective (docs/method.md, Objectives; kernels/dpo_loss.py). Every option is
    a function of the per-row errors the fused kernel already reduces."""

    name: Literal["dpo", "dpo_sft", "dpop", "sft"] = "dpo"
    """dpo: Diffusion-DPO; dpo_sft: + gamma x the winners' denoising error (DPO + NLL, Pang et al.
    2024); dpop: the DPO-Positive hinge on the winners (Pal et al. 2024); sft: gamma x the
    winners' error alone, no DPO term (the winners-only control)."""
    gamma: float = 0.0
    """dpo_sft, sft: weight of mean_pairs e_theta(winner)."""
    lam: float = 0.0
    """dpop: weight of max(0, e_theta(w) - e_ref(w)) inside the DPO margin."""

    def __post_init__(self):
        require(self.gamma >= 0 and self.lam >= 0, "gamma", "gamma and lam must be >= 0")
        require(self.name in ("dpo_sft", "sft") or self.gamma == 0, "gamma",
                f"only with name dpo_sft or sft (name is {self.name})")
        require(self.name == "dpop" or self.lam == 0, "lam", f"only with name dpop (name is {self.name})")
        require(self.name not in ("dpo_sft", "sft") or self.gamma > 0, "gamma", f"{self.name} needs gamma > 0")
        require(self.name != "dpop" or self.lam > 0, "lam", "dpop needs lam > 0")

    def kernel_weights(self) -> dict:
        """The keyword arguments of ``engine.losses.dpo_loss``."""
        return {"sft_weight": self.gamma, "hinge_weight": self.lam, "dpo_term": self.name != "sft"}


@dataclass
class TrainConfig:
    """One Diffusion-DPO training stage."""

    beta: float = 5000.0
    """DPO temperature, calibrated to the per-sample mean error (docs/method.md, Diffusion-DPO)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective: Diffusion-DPO, or DPO with a winner-preserving term."""
    steps: int = 2000
    """Optimizer steps."""
    micro_batch_pairs: int = 1
    """Pairs per rank per forward pass (2x images)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    clip_grad_norm: float = 1.0
    """Global gradient-norm clipping; 0 disables."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on CUDA, fp32 on CPU."""
    compile: bool = False
    """torch.compile the policy and reference UNets (engine/compilation.py: inductor; each input
    shape compiles once at its first call, a compile failure falls back to eager and says why)."""
    save_every: int = 0
    """Step checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Step checkpoints kept on disk."""
    log_every: int = 10
    """Host sync + TensorBoard/tqdm update every this many steps."""
    save_precision: Literal["fp32", "train"] = "fp32"
    """dtype of the UNet in the model folder a training stage writes (iter_i/model/): fp32 (the
    fp32 master weights as trained; the default, so every later stage reads exactly what it read
    before this key existed) or train (train.precision as run: bf16 on CUDA under auto, fp32 on a
    CPU), which halves the bytes every rank of generate, rank, evaluate and the next training stage
    reads. Those stages then start from the bf16-rounded weights: the same values that DeepSpeed
    bf16 training (its module cast) and sail.precision bf16 produce from an fp32 folder, so they
    see no change; an fp32 reader (local autocast training, sail.precision fp32) sees the rounding."""

    def __post_init__(self):
        require(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        require(self.steps > 0, "steps", f"must be > 0, got {self.steps}")
        require(self.micro_batch_pairs > 0, "micro_batch_pairs", "must be > 0")
        require(self.grad_accum > 0, "grad_accum", "must be > 0")
        require(self.clip_grad_norm >= 0, "clip_grad_norm", "must be >= 0")
        require(self.save_every >= 0, "save_every", "must be >= 0")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        require(self.log_every > 0, "log_every", "must be > 0")


@dataclass
class DistributedConfig:
    """How the trainer is distributed."""

    backend: Literal["auto", "local", "deepspeed"] = "auto"
    """auto: DeepSpeed when started by a distributed launcher, else local (one process)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer states to CPU (not with bitsandbytes optimizers)."""
    global_batch_pairs: int | None = None
    """If set, must equal micro_batch_pairs x grad_accum x world size (checked at start)."""
    deepspeed: dict = field(default_factory=dict)
    """Passthrough: merged last into the derived DeepSpeed config, for rare knobs."""
    reference: Literal["auto", "replicated", "partitioned"] = "auto"
    """Where ZeRO-3 keeps the frozen DPO reference. replicated: a plain module in the compute dtype
    on every device (no all-gather in its forward; its whole size on each device); partitioned: a
    second, optimizer-less ZeRO-3 engine (1/world of it per device, but the whole UNet all-gathered
    again at every micro-step); auto: replicated when its bytes fit within
    reference_memory_fraction of one device's memory, else partitioned (the log says which and
    why). The same weights in the same dtype either way: the losses do not change. ZeRO 0-2 and
    the local strategy partition no parameter: the reference is a replica there whatever this says."""
    reference_memory_fraction: float = 0.15
    """reference auto: the largest share of one device's memory a replicated reference may take
    (a GPU: its total memory; a CPU: the host's memory divided by the ranks on the node). 0.15 of
    an 80 GB GPU holds the SDXL UNet in bf16 (4.8 GiB); of a 24 GB one it does not."""
    node_cache: str | None = "/dev/shm/sail-node-cache"
    """A node-local folder where the first rank of a node to load a model folder copies the parts
    it loads, once; the node's other ranks wait and read the copy, so shared storage serves each
    model folder once per node instead of once per rank (engine/models.py, NodeCache). Used only
    when several ranks share the node. A copy that would not fit its free space is skipped (the
    ranks read the shared folder); the 3 most recently used folders are kept, older ones deleted.
    It outlives the run (tmpfs under /dev/shm holds memory until deleted). None: every rank reads
    the shared folder."""

    def __post_init__(self):
        require(0 <= self.zero_stage <= 3, "zero_stage", f"must be 0-3, got {self.zero_stage}")
        require(self.reference != "partitioned" or self.zero_stage == 3, "reference",
                f"partitioned needs zero_stage 3 (ZeRO {self.zero_stage} partitions no parameter)")
        require(0 < self.reference_memory_fraction <= 1, "reference_memory_fraction",
                f"must be in (0, 1], got {self.reference_memory_fraction}")
        require(self.global_batch_pairs is None or self.global_batch_pairs > 0, "global_batch_pairs", "must be > 0")


@dataclass
class SamplingConfig:
    """How images are drawn (SAIL candidates, the toy world's data and evaluation): the one
    home of the sampler settings."""

    sampler: Literal["ddim", "ddpm"] = "ddim"
    """Scheduler built from the model's own scheduler config (DDIM with eta 0, or DDPM)."""
    steps: int = 20
    """Denoising steps."""
    guidance_scale: float = 7.5
    """Classifier-free guidance ``eps_u + w (eps_c - eps_u)``; 1 skips the unconditional pass."""
    batch_size: int = 64
    """Images per sampling batch (conditional + unconditional rows go through the UNet together)."""

    def __post_init__(self):
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.guidance_scale >= 1.0, "guidance_scale", f"must be >= 1, got {self.guidance_scale}")


@dataclass
class SailConfig:
    """The self-amplified loop (docs/method.md, SAIL); also OnlineDPO (ranking by a scorer)."""

    iterations: int = 2
    """SAIL iterations after iteration 0 (DPO on the seed pairs)."""
    prompt_files: list[str] = field(default_factory=list)
    """One prompt file per iteration (text: one prompt a line; parquet: a caption column).
    Read by the pickapic world; the toy world's pools come from its splits."""
    candidates: int = 8
    """N: candidates generated per prompt."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How the candidates are drawn."""
    rank_draws: int = 10
    """K: (t, noise) draws per prompt, shared by its N candidates (the cap with rank_block)."""
    rank_t_range: tuple[float, float] = (0.0, 1.0)
    """Timesteps of the ranking draws, as fractions of the training timesteps: t ~ U[lo T, hi T)."""
    rank_noise: Literal["shared", "antithetic", "own"] = "shared"
    """Noise of the ranking draws: shared (K draws common to the N candidates), antithetic
    (shared, in pairs (t, eps), (t, -eps)), or own (each candidate's own generation noise; the K
    draws differ only in t)."""
    rank_block: int = 0
    """Adaptive K: draw this many at a time and stop once the best and the worst candidates are
    settled (rank_settle_z), at most rank_draws; 0 draws all rank_draws at once."""
    rank_settle_z: float = 2.0
    """Adaptive K: standard errors by which the best must lead the runner-up, and the worst trail
    the runner-down, to stop drawing."""
    rank_min_draws: int = 0
    """Adaptive K: draws made before the first settle test (a standard error from a handful of
    draws is itself noisy, and early stops are where adaptive K picks another pair)."""
    rank_reference: Literal["base", "anchor", "previous"] = "base"
    """Reference of the implicit reward: the base model, the iteration-0 model, or the model the
    current one was trained from."""
    rank_batch_size: int = 160
    """Images per UNet forward in ranking."""
    chunk_prompts: int = 64
    """Prompts per chunk of the generate and rank stages: the unit of work handed to a rank and
    of resume (a killed stage loses at most one chunk per rank). A multiple of
    sampling.batch_size / candidates keeps the sampling batches of one process unchanged."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Weights of the models that generate and rank (auto: bf16 on CUDA, fp32 on CPU)."""
    compile: bool = False
    """torch.compile the UNets that generate and rank (as train.compile)."""
    pairing: Literal["best_worst", "best_mu2sigma", "random", "random_unranked"] = "best_worst"
    """best_worst: the highest- and lowest-rewarded candidates; best_mu2sigma: the highest against
    the one nearest mean - 2 std of the prompt's rewards; random: a random pair, the higher-rewarded
    the winner (the pair-selection ablation: the ranking still orients it); random_unranked: a
    random pair in random order (the self-distillation control: no ranking signal)."""
    pairs_per_prompt: int = 1
    """Disjoint pairs taken from each prompt's N candidates (best_worst: the i-th best against the
    i-th worst; random: 2 x this many candidates drawn at random); at most N / 2."""
    min_pair_z: float = 0.0
    """Keep a prompt's pair only if its reward gap is at least this many standard errors of the
    paired difference over the K shared draws (0: keep every prompt's pair)."""
    alpha: float = 0.25
    """Fraction of generated pairs in an iteration's training set (1: no mixup; 0: the seed pairs
    only, the seed-only continuation control)."""
    external_scorer: str = "oracle"
    """online_dpo: scorer name (engine/scorers.py; the toy world's "oracle" is its
    toy.world.oracle) or module:function ranking the candidates."""
    train_steps: int | None = None
    """Optimizer steps per iteration (None: train.steps)."""
    lr: float | None = None
    """Learning rate of the iterations' training (None: train.optimizer.lr). Each iteration
    resets the DPO reference to the previous model, so its steps add up across iterations."""
    beta: float | None = None
    """DPO beta of the iterations' training (None: train.beta); ranking uses train.beta."""
    loss: LossConfig | None = None
    """Objective of the iterations' training (None: train.loss)."""
    train_reference: Literal["previous", "anchor", "base"] = "previous"
    """DPO reference of the iterations' training: the model it starts from (the paper), the
    iteration-0 model, or the base model (a fixed KL anchor: the drift cannot compound)."""

    def __post_init__(self):
        require(self.lr is None or self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.beta is None or self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        require(self.iterations >= 0, "iterations", "must be >= 0")
        require(self.candidates >= 2, "candidates", f"must be >= 2 to form a pair, got {self.candidates}")
        require(self.rank_draws >= 1, "rank_draws", "must be >= 1")
        require(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        require(self.rank_batch_size >= 1, "rank_batch_size", "must be >= 1")
        require(self.chunk_prompts >= 1, "chunk_prompts", f"must be >= 1, got {self.chunk_prompts}")
        require(1 <= self.pairs_per_prompt <= self.candidates // 2, "pairs_per_prompt",
                f"must be in 1..candidates/2 = {self.candidates // 2}, got {self.pairs_per_prompt}")
        require(self.pairs_per_prompt == 1 or self.pairing != "best_mu2sigma", "pairs_per_prompt",
                "best_mu2sigma takes one pair per prompt")
        require(self.min_pair_z >= 0, "min_pair_z", f"must be >= 0, got {self.min_pair_z}")
        lo, hi = self.rank_t_range
        require(0.0 <= lo < hi <= 1.0, "rank_t_range", f"must be 0 <= lo < hi <= 1, got {self.rank_t_range}")
        require(self.rank_block >= 0 and self.rank_settle_z > 0, "rank_block",
                "rank_block must be >= 0 and rank_settle_z > 0")
        require(0 <= self.rank_min_draws <= self.rank_draws, "rank_min_draws",
                f"must be in 0..rank_draws, got {self.rank_min_draws}")
        require(self.train_steps is None or self.train_steps >= 1, "train_steps", "must be >= 1")


@dataclass
class SSPOConfig:
    """SSPO (docs/method.md, SSPO): random checkpoint replay and self-sampling regularization,
    trained on the winners of the preference set (train.* gives beta, steps, optimizer)."""

    checkpoint_every: int = 30
    """Optimizer steps between the policy snapshots added to the replay pool (paper: 30)."""
    pool_size: int = 7
    """Checkpoints in the pool: the newest ones, the initial model first (paper: 7)."""
    switch: bool = True
    """Self-sampling regularization; false: Diffusion-DPO with the reference sample as the loser."""
    sampling: SamplingConfig | None = None
    """How each checkpoint draws its reference samples x_ref (None: as SAIL draws its candidates,
    sail.sampling)."""

    def __post_init__(self):
        require(self.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        require(self.pool_size >= 1, "pool_size", f"must be >= 1, got {self.pool_size}")


@dataclass
class ScorerSpec:
    """Local weights of one learned scorer (docs/evaluation.md); nothing is downloaded."""

    weights: str
    """pickscore / clip: a transformers CLIP model folder; hpsv2: the HPS checkpoint
    (HPS_v2_compressed.pt / HPS_v2.1_compressed.pt, or .safetensors); aesthetic: the LAION
    predictor's MLP (sac+logos+ava1-l14-linearMSE.pth, or .safetensors)."""
    backbone: str | None = None
    """A transformers CLIP folder giving what ``weights`` lacks: pickscore: the processor folder
    (CLIP-ViT-H-14-laion2B; default: ``weights``); hpsv2: the config, tokenizer and processor of
    open_clip's ViT-H-14 (CLIP-ViT-H-14-laion2B); aesthetic: OpenAI CLIP ViT-L/14 (required)."""
    batch_size: int = 32
    """Images per scorer forward."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: as the scorer's authors run it on a GPU (HPSv2, aesthetic: fp16; PickScore, CLIP:
    fp32), fp32 on a CPU."""

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class EvalConfig:
    """Evaluation after each iteration (held-out prompts, fixed seeds), and ``sail evaluate``."""

    enabled: bool = True
    prompt_files: list[str] = field(default_factory=list)
    """Held-out prompts of the pickapic world (checked disjoint from the pools); the toy world
    uses its split."""
    seeds_per_prompt: int | None = None
    """Images per prompt (None: the world's default, e.g. toy.world.eval_seeds_per_prompt)."""
    evaluate_base: bool = True
    """Also evaluate the base model (the first row of the report)."""
    benchmarks: dict[str, str] = field(default_factory=dict)
    """Prompt sets of real-model evaluation: name -> local file or folder. Names: pickapic
    (Pick-a-Pic v2 parquet, e.g. validation_unique), parti (PartiPrompts TSV), hpsv2 (the HPSv2
    benchmark folder of four style JSON lists); toy (the toy world's held-out prompts)."""
    scorers: dict[str, ScorerSpec] = field(default_factory=dict)
    """Learned scorers by name: pickscore, hpsv2, aesthetic, clip (imagereward: see docs)."""
    max_prompts: int | None = None
    """In a run's evaluate stage: the first N prompts of each benchmark (iterations stay cheap);
    ``sail evaluate`` takes --max-prompts."""
    sampling: SamplingConfig | None = None
    """Sampler of real-model evaluation (None: the papers' protocol by model kind: SD1.5 DDPM 50
    steps CFG 7.5, SDXL DDIM 20 CFG 5; a pixel-space toy model: the toy world's)."""
    seed: int = 0
    """Seed of the evaluation images (the same for every model compared)."""
    chunk_images: int = 256
    """Images per chunk of ``sail evaluate``: the unit of resumption and of the split over ranks."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Weights of the evaluated UNet and text encoders (auto: bf16 on CUDA, fp32 on CPU; the VAE
    decodes in fp32 whatever this is)."""
    compile: bool = False
    """torch.compile the evaluated UNet (as train.compile)."""

    def __post_init__(self):
        require(self.seeds_per_prompt is None or self.seeds_per_prompt >= 1, "seeds_per_prompt", "must be >= 1")
        require(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be >= 1")
        require(self.chunk_images >= 1, "chunk_images", f"must be >= 1, got {self.chunk_images}")
        from sail.engine.evaluation.prompts import READERS
        from sail.engine.evaluation.scorers import SCORERS

        for name in self.benchmarks:
            require(name in READERS, "benchmarks", f"unknown {name!r}; known: {', '.join(READERS)}")
        for name in self.scorers:
            require(name in SCORERS, "scorers", f"unknown {name!r}; known: {', '.join(SCORERS)}")


@dataclass
class RunConfig:
    """The root of a run's configuration."""

    name: str = "run"
    """Run name; the run directory defaults to runs/<name>."""
    method: Literal["dpo", "sail", "online_dpo", "sspo"] = "dpo"
    """dpo: one Diffusion-DPO stage; sail / online_dpo: the iterative loop; sspo: one SSPO stage."""
    seed: int = 0
    run_dir: str | None = None
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="tiny-sd15"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sail: SailConfig = field(default_factory=SailConfig)
    sspo: SSPOConfig = field(default_factory=SSPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    world: str = "pickapic"
    """Where data, prompt pools, evaluation and ground truth come from (engine/worlds.py):
    pickapic (the user's files) or toy (the embedded toy world, configured in its "toy" section)."""
    world_settings: Any = None
    """The world's own section, built at load (not a key of its own in the JSON file)."""

    def __post_init__(self):
        require(bool(self.name) and "/" not in self.name, "name", f"must be a plain name, got {self.name!r}")
        require(self.model.lora.rank == 0 or self.sail.train_reference == "previous", "sail.train_reference",
                "with LoRA the DPO reference is the policy with its adapters off: only 'previous'")
        require(self.model.lora.rank == 0 or self.method != "sspo", "method",
                "sspo replays full checkpoints as references: not with LoRA (model.lora.rank > 0)")
        require(self.method != "sspo" or self.train.loss.name in ("dpo", "dpo_sft"), "train.loss",
                "sspo's switch needs the DPO margin without the dpop hinge: use dpo or dpo_sft")

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


def find_config(name: str) -> Path:
    """``name`` as given, else in the working directory, else in the repository's configs/."""
    candidates = [Path(name), Path.cwd() / name, CONFIG_DIR / name, CONFIG_DIR / f"{name}.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"config {name!r} not found (looked in {Path.cwd()} and {CONFIG_DIR})")


def load_config(name: str, overrides: list[str] = ()) -> RunConfig:
    """Load, override and validate a config file; errors name the file and the key."""
    path = find_config(name)
    data = apply_overrides(read_json(path), list(overrides), str(path))
    return config_from_dict(data, str(path))


def config_from_dict(data: dict, where: str = "<dict>") -> RunConfig:
    """Build a validated RunConfig from a plain dict; the world's section by the world's dataclass."""
    from sail.engine.worlds import WORLDS, world_class

    data = dict(data)
    if "world_settings" in data:
        raise ConfigError(f"{where}: unknown key 'world_settings' (a world's settings go in the section named after it)")
    name = data.get("world", "pickapic")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: world: expected a string, got {name!r}")
    cls = world_class(name, where)
    for other in WORLDS:
        if other != name and other in data:
            raise ConfigError(f"{where}: {other}: the section of world {other!r}, but this run's world is {name!r} "
                              f"(set world: {other!r}, or remove the section)")
    settings = None
    if cls.settings_class is not None:
        raw = data.pop(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: {name}: expected an object, got {raw!r}")
        settings = build_dataclass(cls.settings_class, raw, where, name)
    return dataclasses.replace(build_dataclass(RunConfig, data, where), world_settings=settings)


def config_to_dict(cfg: RunConfig) -> dict:
    """The JSON-able dict of a run config, the world's settings under the world's name."""
    data = to_dict(cfg)
    settings = data.pop("world_settings")
    if settings is not None:
        data[cfg.world] = settings
    return data


__all__ = [
    "ConfigError", "LoRAConfig", "LossConfig", "ModelConfig", "DataConfig", "OptimizerConfig", "SchedulerConfig",
    "TrainConfig", "DistributedConfig", "SamplingConfig", "SailConfig", "SSPOConfig", "EvalConfig", "RunConfig", "load_config", "config_from_dict",
    "config_to_dict", "find_config", "CONFIG_DIR",
]
