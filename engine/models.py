"""Diffusion model components: loaded from a local diffusers folder or built with random weights.

Everything SD1.5 / SDXL conditioning needs is in this one file (as in the diffusers SDXL
training example): prompt encoding with one or two text encoders, the pooled projection of
the second encoder, and the SDXL ``time_ids`` from the real original size and crop.
The VAE may be absent (pixel-space models such as the toy world): latents are then images.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import nn

from sail.engine.configtree import ConfigError
from sail.engine.io import link_tree, write_json

log = logging.getLogger(__name__)

Kind = Literal["sd15", "sdxl"]


@dataclass
class Conditioning:
    """Text conditioning of a batch. hidden: [B, L, D]; pooled: [B, P] (SDXL) or None."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass
class Components:
    """The parts of a text-to-image diffusion model that training and sampling touch."""

    unet: nn.Module
    noise_scheduler: object
    text_encoders: list
    tokenizers: list
    vae: nn.Module | None
    kind: Kind

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1


def vae_scale_factor(folder: str | os.PathLike) -> int:
    """Pixels per latent along a side, read from the folder's vae/config.json without loading
    the VAE (1: a pixel-space model without VAE); equals ``Components.vae_factor``."""
    config = Path(folder) / "vae" / "config.json"
    if not config.is_file():
        return 1
    return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)


def native_resolution(folder: str | os.PathLike) -> int:
    """Pixels per side the model generates at (its UNet's sample_size x ``vae_scale_factor``),
    read from the folder's config files without loading weights."""
    side = json.loads((Path(folder) / "unet" / "config.json").read_text())["sample_size"]
    return int(side) * vae_scale_factor(folder)


# --------------------------------------------------------------------------------------------
# Loading from a local folder
# --------------------------------------------------------------------------------------------

def detect_kind(path: Path) -> Kind:
    """SDXL folders have a second text encoder; everything else is treated as SD1.5-style."""
    return "sdxl" if (path / "text_encoder_2").is_dir() else "sd15"


def check_model_folder(path: str | os.PathLike, key: str = "model.path") -> Path:
    """Fail fast (no download attempt) when a model folder is missing or incomplete."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{key}: model folder {folder} does not exist (local diffusers-format folder expected; "
                          "nothing is downloaded)")
    for sub in ("unet", "scheduler"):
        if not (folder / sub).is_dir():
            raise ConfigError(f"{key}: {folder} has no '{sub}/' subfolder: not a diffusers-format model folder")
    return folder


def load_components(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                    with_text: bool = True, with_vae: bool = True) -> Components:
    """Load UNet, scheduler, text encoder(s), tokenizer(s) and the VAE (if present) from disk
    (through the node cache when one is in use: ``use_node_cache``). A folder saved in another
    dtype (``train.save_precision``) is cast to ``dtype`` on load."""
    shared = check_model_folder(folder)
    kind = detect_kind(shared)
    parts = ["unet", "scheduler"]
    if with_vae and (shared / "vae").is_dir():
        parts.append("vae")
    if with_text:
        parts += ["tokenizer", "text_encoder"] + (["tokenizer_2", "text_encoder_2"] if kind == "sdxl" else [])
    with node_local(shared, parts) as local:
        return _load_components(local, kind, dtype, "vae" in parts, with_text)


def _load_components(folder: Path, kind: Kind, dtype: torch.dtype, with_vae: bool, with_text: bool) -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True, torch_dtype=dtype)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    vae = None
    if with_vae:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True, torch_dtype=dtype)
    encoders, tokenizers = [], []
    if with_text:
        tokenizers.append(AutoTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True))
        encoders.append(CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True,
                                                      torch_dtype=dtype))
        if kind == "sdxl":
            tokenizers.append(AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", local_files_only=True, torch_dtype=dtype))
    for module in [vae, *encoders]:
        if module is not None:
            module.requires_grad_(False).eval()
    return Components(unet, sched, encoders, tokenizers, vae, kind)


def load_unet(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Only the UNet of a model folder (the DPO reference, or a policy checkpoint), cast to
    ``dtype``; through the node cache when one is in use."""
    from diffusers import UNet2DConditionModel

    with node_local(check_model_folder(folder), ["unet"]) as local:
        return UNet2DConditionModel.from_pretrained(local, subfolder="unet", local_files_only=True, torch_dtype=dtype)


# --------------------------------------------------------------------------------------------
# Reading a model folder once per node
# --------------------------------------------------------------------------------------------

NODE_CACHE_KEEP = 3
"""Model folders a node cache keeps (the most recently used): a SAIL rank stage reads two at once
(the current model and its ranking reference), the next stage the newest of them."""
_node_cache: "NodeCache | None" = None


def use_node_cache(root: str | os.PathLike | None) -> None:
    """Load model folders of this process through a ``NodeCache`` at ``root`` (None: from where
    they are). Set once per process (``Controller``) where several ranks share a node."""
    global _node_cache
    _node_cache = NodeCache(root) if root else None


@contextlib.contextmanager
def node_local(folder: Path, parts: list[str]) -> Iterator[Path]:
    """A folder holding the subfolders ``parts`` of ``folder`` while the block reads them: the
    node cache's copy, or ``folder`` itself without a cache."""
    if _node_cache is None:
        yield folder
    else:
        with _node_cache.local(folder, parts) as local:
            yield local


def _stamp(src: Path) -> list:
    """What identifies the files under ``src`` without reading them: (path, size, mtime, inode)."""
    out = []
    for dirpath, _, files in os.walk(src, followlinks=True):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            out.append([os.path.relpath(os.path.join(dirpath, name), src), st.st_size, st.st_mtime_ns, st.st_ino])
    return sorted(out)


class NodeCache:
    """Node-local copies of model folders from shared storage (``distributed.node_cache``).

    The first process of a node to load a folder copies the subfolders it needs into
    ``root/uid<uid>/<key>/`` while it holds ``<key>.lock`` exclusively (``fcntl.flock``: local to
    the node, released if the process dies); the node's other processes wait on that lock, then
    hold it shared while they read the copy. So shared storage serves each folder once per node,
    and no collective is issued: a rank with nothing to load is not waited for. Each copied
    subfolder is stamped with its source files' (size, mtime, inode), and copied again when they
    change (a model folder re-saved by ``--stage train``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root) / f"uid{os.getuid()}"

    @contextlib.contextmanager
    def local(self, folder: Path, parts: list[str]) -> Iterator[Path]:
        import fcntl

        folder = Path(folder)
        key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
        entry, lock = self.root / key, None
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock = open(self.root / f"{key}.lock", "a+")
        except OSError as err:
            log.warning("node cache %s unusable (%s): reading %s from where it is", self.root, err, folder)
        if lock is None:
            yield folder
            return
        with lock:
            where = folder
            for _ in range(3):
                fcntl.flock(lock, fcntl.LOCK_EX)
                os.utime(lock.name)                   # last use: the eviction order
                if not self._fill(folder, entry, parts):
                    fcntl.flock(lock, fcntl.LOCK_UN)  # the others read the shared folder too, unhindered
                    break
                # flock's conversion to shared is not atomic: an eviction may slip in between
                fcntl.flock(lock, fcntl.LOCK_SH)
                if all((entry / part).is_dir() and (entry / f"{part}.stamp.json").is_file() for part in parts):
                    where = entry
                    break
            yield where

    def _fill(self, folder: Path, entry: Path, parts: list[str]) -> bool:
        """Copy the parts whose stamps differ (under the entry's exclusive lock); False when the
        copy cannot be made (no room, an I/O error): then the shared folder is read."""
        for part in parts:
            src, dst, stamp_file = folder / part, entry / part, entry / f"{part}.stamp.json"
            stamp = _stamp(src)
            if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and dst.is_dir():
                continue
            self._evict(keep=entry.name)
            need = sum(size for _, size, _, _ in stamp)
            free = shutil.disk_usage(self.root).free
            if need > 0.9 * free:
                log.warning("node cache %s: %s (%.2f GiB) does not fit in %.2f GiB free; reading it from %s",
                            self.root, part, need / 2 ** 30, free / 2 ** 30, folder)
                return False
            tmp = entry / f".{part}.tmp"
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                stamp_file.unlink(missing_ok=True)
                shutil.copytree(src, tmp)             # links followed: the copy holds the bytes
                shutil.rmtree(dst, ignore_errors=True)
                os.replace(tmp, dst)
                write_json(stamp_file, stamp)
            except OSError as err:
                shutil.rmtree(tmp, ignore_errors=True)
                log.warning("node cache %s: copying %s/%s failed (%s); reading it from there", self.root, folder,
                            part, err)
                return False
            log.info("node cache: %s/%s copied to %s (%.2f GiB)", folder, part, dst, need / 2 ** 30)
        return True

    def _evict(self, keep: str) -> None:
        """Delete the copies beyond the ``NODE_CACHE_KEEP`` most recently used (``keep``'s
        counted) that no process is reading (their lock taken without waiting). Lock files stay
        (empty): one replaced while a process waits on the old one would let two processes hold
        "the" lock."""
        import fcntl

        locks = sorted(self.root.glob("*.lock"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        others = [p for p in locks if p.stem != keep and (self.root / p.stem).is_dir()]
        for path in others[NODE_CACHE_KEEP - 1:]:       # room for ``keep``'s copy
            entry = self.root / path.stem
            with open(path, "a+") as other:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                shutil.rmtree(entry, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Building from an architecture (random weights)
# --------------------------------------------------------------------------------------------

def _unet_config(arch: str) -> dict:
    tiny = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                norm_num_groups=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    if arch == "tiny-sd15":
        return dict(tiny, cross_attention_dim=32, attention_head_dim=8)
    if arch == "tiny-sdxl":
        # projection_class_embeddings_input_dim = 6 time ids x addition_time_embed_dim + pooled dim
        return dict(tiny, cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=8,
                    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32)
    if arch == "sd15":
        return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    if arch == "sdxl":
        return dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    raise ConfigError(f"model.arch: unknown architecture {arch!r}")


def _text_configs(arch: str) -> list[dict]:
    clip_l = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                  num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    clip_g = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                  num_hidden_layers=32, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
    tiny = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
                bos_token_id=0, pad_token_id=1, eos_token_id=2)  # the word tokenizer's special ids
    return {"tiny-sd15": [tiny], "tiny-sdxl": [tiny, tiny], "sd15": [clip_l], "sdxl": [clip_l, clip_g]}[arch]


def _vae_config(arch: str) -> dict:
    if arch.startswith("tiny"):
        return dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    norm_num_groups=32, sample_size=32)
    return dict(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024 if arch == "sdxl" else 512,
                scaling_factor=0.13025 if arch == "sdxl" else 0.18215)


def build_word_tokenizer(words: list[str], max_length: int):
    """A word-level tokenizer in the standard (tokenizer.json) format, built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<bos>", "<pad>", "<eos>", "<unk>"]  # ids 0-2 match CLIPTextConfig's bos/pad/eos defaults
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words) - set(specials)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)


def build_components(arch: str, seed: int = 0, *, with_vae: bool = True) -> Components:
    """Random-weight components of a known architecture (tiny ones for tests, full for benchmarks)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    kind: Kind = "sdxl" if arch.endswith("sdxl") else "sd15"
    unet = UNet2DConditionModel(**_unet_config(arch))
    vae = AutoencoderKL(**_vae_config(arch)) if with_vae else None
    encoders, tokenizers = [], []
    for i, cfg in enumerate(_text_configs(arch)):
        text_cfg = CLIPTextConfig(**cfg)
        encoders.append((CLIPTextModelWithProjection if i == 1 else CLIPTextModel)(text_cfg))
        words = [f"w{j}" for j in range(min(cfg["vocab_size"], 1000) - 4)]
        tokenizers.append(build_word_tokenizer(words, cfg["max_position_embeddings"] if not arch.startswith("tiny")
                                               else 16))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, clip_sample=False, prediction_type="epsilon",
                          steps_offset=1)
    for module in [vae, *encoders]:
        if module is not None:
            module.requires_grad_(False).eval()
    return Components(unet, sched, encoders, tokenizers, vae, kind)


# --------------------------------------------------------------------------------------------
# Attention backend
# --------------------------------------------------------------------------------------------

_warned_fallback = False


def set_attention_backend(unet: nn.Module, backend: str) -> str:
    """Select xformers or PyTorch SDPA; returns the backend that will actually run.

    xformers needs CUDA and the xformers package; anywhere else it falls back to SDPA with a
    single warning per process, so a config written for a GPU box still runs on a laptop.
    """
    global _warned_fallback
    from diffusers.models.attention_processor import AttnProcessor2_0

    if backend == "xformers":
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("xformers needs CUDA")
            unet.enable_xformers_memory_efficient_attention()
            log.info("attention backend: xformers")
            return "xformers"
        except Exception as err:  # ImportError, ValueError (no CUDA), RuntimeError
            if not _warned_fallback:
                warnings.warn(f"xformers attention unavailable ({err}); falling back to PyTorch SDPA", stacklevel=2)
                _warned_fallback = True
    unet.set_attn_processor(AttnProcessor2_0())
    log.info("attention backend: sdpa")
    return "sdpa"


# --------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------

def _tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def encode_prompts(text_encoders: list, tokenizers: list, prompts: list[str]) -> Conditioning:
    """SD1.5: the encoder's last hidden state. SDXL: penultimate hidden states of both encoders
    concatenated (768 + 1280), and the pooled projection of the second encoder."""
    device = next(text_encoders[0].parameters()).device
    if len(text_encoders) == 1:
        hidden = text_encoders[0](_tokenize(tokenizers[0], prompts, device)).last_hidden_state
        return Conditioning(hidden.float())
    states, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        out = encoder(_tokenize(tokenizer, prompts, device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    return Conditioning(torch.cat(states, dim=-1).float(), pooled.float())


def force_zeros_for_empty_prompt(folder: str | os.PathLike | None) -> bool:
    """Whether the SDXL pipeline of model folder ``folder`` zeroes its unconditional branch
    when no negative prompt is given: the ``force_zeros_for_empty_prompt`` key of the folder's
    model_index.json. Without the key, the file or a folder: True, the default of every
    diffusers StableDiffusionXL*Pipeline (and the value SDXL base ships)."""
    index = Path(folder) / "model_index.json" if folder is not None else None
    if index is None or not index.is_file():
        return True
    return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))


def unconditional_conditioning(empty: Conditioning, folder: str | os.PathLike | None) -> Conditioning:
    """The unconditional branch of classifier-free guidance when sampling (no negative prompt),
    built as the model's diffusers pipeline builds it: the one place that decides it.

    empty: the encoded ``""`` (hidden [1, L, D], pooled [1, P] or None), from ``encode_prompts``
    or a pair cache's empty_prompt file. SD1.5 (no pooled embedding): ``""`` itself, as
    StableDiffusionPipeline encodes it. SDXL: zeros of the same shapes for both the text states
    and the pooled embedding when ``force_zeros_for_empty_prompt(folder)``, else ``""``.
    Training's empty-prompt dropout is another matter and keeps the encoded ``""``.
    """
    if empty.pooled is None or not force_zeros_for_empty_prompt(folder):
        return empty
    return Conditioning(torch.zeros_like(empty.hidden), torch.zeros_like(empty.pooled))


def sdxl_time_ids(original_hw: torch.Tensor, crop_tl: torch.Tensor, target_hw: tuple[int, int]) -> torch.Tensor:
    """SDXL micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``: [B, 6].

    original_hw: [B, 2] real size of each source image; crop_tl: [B, 2] crop offsets applied
    after resizing; target_hw: the training resolution.
    """
    target = torch.tensor(target_hw, dtype=torch.float32).expand(original_hw.shape[0], 2)
    return torch.cat([original_hw.float(), crop_tl.float(), target], dim=1)


def native_time_ids(size: int, n: int) -> torch.Tensor:
    """SDXL time ids of ``n`` square images generated at ``size`` pixels, uncropped: [n, 6]
    (the generated candidates, and the pairs made of them)."""
    return sdxl_time_ids(torch.tensor([[size, size]]).expand(n, 2), torch.zeros(n, 2), (size, size))


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

def save_model_folder(out: Path, unet_state: dict | None, unet_config: dict, comps: Components,
                      source: str | None, dtype: torch.dtype = torch.float32) -> None:
    """Write a complete diffusers-format folder: the trained UNet (safetensors, in ``dtype``:
    ``train.save_precision``) plus the frozen components (linked from ``source`` or saved from
    memory). Written to a temp folder, then renamed, so a folder that exists is complete."""
    from diffusers import UNet2DConditionModel

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet = UNet2DConditionModel.from_config(unet_config)
    if unet_state is not None:
        unet.load_state_dict(unet_state)
    # nn.Module.to: ModelMixin.to warns about modules to keep in fp32, of which a UNet has none
    nn.Module.to(unet, dtype).save_pretrained(tmp / "unet", safe_serialization=True)
    if source:
        for sub in Path(source).iterdir():
            if sub.name == "unet":
                continue
            if sub.is_dir():
                link_tree(sub, tmp / sub.name)   # frozen parts: large, never changed
            else:
                shutil.copy2(sub, tmp / sub.name)
    else:
        _save_frozen(tmp, comps)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _save_frozen(folder: Path, comps: Components) -> None:
    comps.noise_scheduler.save_pretrained(folder / "scheduler")
    names = ["text_encoder", "text_encoder_2"]
    tok_names = ["tokenizer", "tokenizer_2"]
    index = {"_class_name": "StableDiffusionXLPipeline" if comps.kind == "sdxl" else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
             "vae": [None, None]}
    for enc, tok, name, tok_name in zip(comps.text_encoders, comps.tokenizers, names, tok_names):
        enc.save_pretrained(folder / name, safe_serialization=True)
        tok.save_pretrained(folder / tok_name)
        index[name] = ["transformers", type(enc).__name__]
        index[tok_name] = ["transformers", type(tok).__name__]
    if comps.vae is not None:
        comps.vae.save_pretrained(folder / "vae", safe_serialization=True)
        index["vae"] = ["diffusers", "AutoencoderKL"]
    if comps.kind == "sd15":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
