"""The papers' learned scorers, loaded from local weights, behind one interface:
``scorer.score(images_uint8 [B, H, W, 3], prompts) -> float64 [B]`` (higher is better), batched
and on the GPU when there is one. Each is registered in ``engine/scorers.py`` under its name.

- ``pickscore`` (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tune in transformers format;
  ``logit_scale.exp() * cos(image, prompt)`` (= 100 x cosine for the released model), as its
  authors compute it.
- ``hpsv2`` (Wu et al. 2023; v2 and v2.1 checkpoints): open_clip ViT-H-14 weights, converted
  once at load into transformers' ``CLIPModel`` (the same architecture: the open_clip state
  dict's names and fused q/k/v are mapped, ``openclip_to_transformers``), so it runs without
  open_clip and torchvision; ``100 x cos``, the scale of the papers' tables (the HPSv2 package
  returns the cosine).
- ``aesthetic``: the LAION improved aesthetic predictor, an MLP on the L2-normalised OpenAI
  CLIP ViT-L/14 image embedding (the 1-10 scale).
- ``clip``: CLIP score, ``100 x max(cos, 0)`` (Hessel et al. 2021, torchmetrics' form).
- ``imagereward``: not loadable beside this stack (docs/evaluation.md says why).

Checkpoints that come as pickles (.pt / .pth) are read with ``torch.load(weights_only=True)``,
which restores tensors and plain containers only and never runs code from the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sail.engine.config import ScorerSpec
from sail.engine.configtree import ConfigError
from sail.engine.errors import InputError
from sail.engine.scorers import register_scorer

AUTHORS_DTYPE = {"pickscore": torch.float32, "clip": torch.float32, "hpsv2": torch.float16,
                 "aesthetic": torch.float16}
"""What each scorer's authors run it in on a GPU (precision: auto); a CPU always uses fp32."""

IMAGEREWARD_CONFLICT = (
    "imagereward: the ImageReward package (image-reward 1.5, the latest) cannot run beside this stack: it imports "
    "apply_chunking_to_forward, find_pruneable_heads_and_indices and prune_linear_layer from "
    "transformers.modeling_utils, which transformers 5 (installed by diffusers' stack) no longer has; it pins "
    "timm==0.6.13 (open_clip_torch >= 3 needs timm >= 1.0.17); and its BLIP tokenizer is fetched from the hub at "
    "construction. Score with it in a separate environment (docs/evaluation.md).")


def _check_path(path: str | None, key: str) -> Path:
    if path is None:
        raise ConfigError(f"{key}: required")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{key}: {p} does not exist (local weights expected; nothing is downloaded)")
    return p


def check_scorer_paths(specs: dict[str, ScorerSpec]) -> None:
    """Every configured weight and backbone path exists (run preflight: seconds, before training)."""
    for name, spec in specs.items():
        for key in ("weights", "backbone"):
            if getattr(spec, key) is not None:
                _check_path(getattr(spec, key), f"eval.scorers.{name}.{key}")


def read_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .pt/.pth/.bin checkpoint read with the restricted
    (weights-only) unpickler; a ``{"state_dict": ...}`` wrapper and DDP's ``module.`` are removed."""
    path = _check_path(str(path), key)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise InputError(f"{key}: {path}: cannot read weights ({type(err).__name__}: {err})") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{key}: {path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _dtype(name: str, spec: ScorerSpec, device: torch.device) -> torch.dtype:
    from sail.engine.strategy import DTYPES

    if device.type != "cuda":
        return torch.float32
    return AUTHORS_DTYPE[name] if spec.precision == "auto" else DTYPES[spec.precision]


class ClipScorer:
    """A CLIP-style scorer: image and prompt embeddings (L2-normalised) from a transformers
    ``CLIPModel``, combined by ``combine``; subclasses say how."""

    name = "clip"

    def __init__(self, model, tokenizer, image_processor, device: torch.device, dtype: torch.dtype, batch_size: int):
        self.model = model.to(device, dtype).eval().requires_grad_(False)
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    @torch.no_grad()
    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        from PIL import Image

        pixels = self.image_processor(images=[Image.fromarray(im) for im in images], return_tensors="pt").pixel_values
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return torch.nn.functional.normalize(_pooled(out).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                           attention_mask=tok.attention_mask.to(self.device))
        return torch.nn.functional.normalize(_pooled(out).float(), dim=-1)

    def combine(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return 100.0 * (image_emb * text_emb).sum(-1).clamp(min=0.0)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """Float64 [B]; the same whatever the batch size (rows are independent)."""
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images for {len(prompts)} prompts")
        out = []
        for i in range(0, len(images), self.batch_size):
            sl = slice(i, i + self.batch_size)
            out.append(self.combine(self.embed_images(images[sl]), self.embed_texts(prompts[sl])).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)

    __call__ = score


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding;
    4.x returned the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class PickScore(ClipScorer):
    name = "pickscore"

    def combine(self, image_emb, text_emb):
        return self.model.logit_scale.float().exp() * (image_emb * text_emb).sum(-1)


class HPSv2(ClipScorer):
    name = "hpsv2"

    def combine(self, image_emb, text_emb):
        return 100.0 * (image_emb * text_emb).sum(-1)


class AestheticMLP(torch.nn.Module):
    """The LAION improved aesthetic predictor's head (its state dict's ``layers.{0,2,4,6,7}``)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Aesthetic(ClipScorer):
    name = "aesthetic"

    def __init__(self, model, tokenizer, image_processor, device, dtype, batch_size, head: AestheticMLP):
        super().__init__(model, tokenizer, image_processor, device, dtype, batch_size)
        self.head = head.to(device, dtype).eval().requires_grad_(False)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                emb = self.embed_images(images[i:i + self.batch_size])
                out.append(self.head(emb.to(self.dtype)).float().squeeze(-1).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)

    __call__ = score


# --------------------------------------------------------------------------------------------
# open_clip -> transformers CLIP (HPSv2)
# --------------------------------------------------------------------------------------------

_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}
_TOP = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final": "text_model.final_layer_norm", "logit_scale": "logit_scale"}


def openclip_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip ``CLIP`` (ViT) state dict in transformers ``CLIPModel`` names: fused
    ``attn.in_proj_*`` split into q/k/v, the projection matrices transposed (open_clip applies
    ``x @ proj``, transformers ``Linear``: ``x @ W.T``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key == "attn_mask":
            continue   # the causal mask: a buffer in older open_clip, built on the fly by transformers
        elif ".transformer.resblocks." in f".{key}":
            tower, rest = ("vision_model", key[len("visual.transformer.resblocks."):]) if key.startswith("visual.") \
                else ("text_model", key[len("transformer.resblocks."):])
            layer, _, name = rest.partition(".")
            prefix = f"{tower}.encoder.layers.{layer}."
            if name.startswith("attn.in_proj_"):
                kind = name.rsplit("_", 1)[1]   # weight | bias
                for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{part}_proj.{kind}"] = chunk.contiguous()
                continue
            module, _, kind = name.rpartition(".")
            if module not in _LAYER:
                raise InputError(f"hpsv2: unexpected open_clip key {key!r}")
            out[f"{prefix}{_LAYER[module]}.{kind}"] = value
        else:
            module, _, kind = key.rpartition(".")
            if key in _TOP:
                out[_TOP[key]] = value
            elif module in _TOP:
                out[f"{_TOP[module]}.{kind}"] = value
            else:
                raise InputError(f"hpsv2: unexpected open_clip key {key!r} (an open_clip ViT CLIP checkpoint expected)")
    return out


# --------------------------------------------------------------------------------------------
# factories (registered names)
# --------------------------------------------------------------------------------------------

def _processors(folder: Path, key: str):
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        return (AutoTokenizer.from_pretrained(str(folder), local_files_only=True),
                AutoImageProcessor.from_pretrained(str(folder), local_files_only=True))
    except (OSError, ValueError) as err:
        raise InputError(f"{key}: {folder}: no CLIP tokenizer / image processor there ({err})") from None


def _clip_model(folder: Path, key: str):
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(f"{key}: {folder}: not a transformers CLIP model folder ({err})") from None


def _device(device: torch.device | None) -> torch.device:
    return device or torch.device("cuda" if torch.cuda.is_available() else "cpu")


@register_scorer("pickscore")
def load_pickscore(spec: ScorerSpec, device: torch.device | None = None) -> PickScore:
    device = _device(device)
    weights = _check_path(spec.weights, "eval.scorers.pickscore.weights")
    procs = _check_path(spec.backbone or spec.weights, "eval.scorers.pickscore.backbone")
    return PickScore(_clip_model(weights, "eval.scorers.pickscore.weights"),
                     *_processors(procs, "eval.scorers.pickscore.backbone"),
                     device, _dtype("pickscore", spec, device), spec.batch_size)


@register_scorer("clip")
def load_clip_score(spec: ScorerSpec, device: torch.device | None = None) -> ClipScorer:
    device = _device(device)
    weights = _check_path(spec.weights, "eval.scorers.clip.weights")
    procs = _check_path(spec.backbone or spec.weights, "eval.scorers.clip.backbone")
    return ClipScorer(_clip_model(weights, "eval.scorers.clip.weights"), *_processors(procs, "eval.scorers.clip.backbone"),
                      device, _dtype("clip", spec, device), spec.batch_size)


@register_scorer("hpsv2")
def load_hpsv2(spec: ScorerSpec, device: torch.device | None = None) -> HPSv2:
    from transformers import CLIPConfig, CLIPModel

    device = _device(device)
    backbone = _check_path(spec.backbone, "eval.scorers.hpsv2.backbone")
    sd = openclip_to_transformers(read_state_dict(spec.weights, "eval.scorers.hpsv2.weights"))
    try:
        model = CLIPModel(CLIPConfig.from_pretrained(str(backbone), local_files_only=True))
    except (OSError, ValueError) as err:
        raise InputError(f"eval.scorers.hpsv2.backbone: {backbone}: no CLIP config.json ({err})") from None
    fit = f"eval.scorers.hpsv2.weights: {spec.weights}: does not fit the CLIP config of {backbone}"
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as err:   # a shape mismatch
        raise InputError(f"{fit} ({str(err).splitlines()[1].strip()})") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise InputError(f"{fit} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return HPSv2(model, *_processors(backbone, "eval.scorers.hpsv2.backbone"), device,
                 _dtype("hpsv2", spec, device), spec.batch_size)


@register_scorer("aesthetic")
def load_aesthetic(spec: ScorerSpec, device: torch.device | None = None) -> Aesthetic:
    device = _device(device)
    backbone = _check_path(spec.backbone, "eval.scorers.aesthetic.backbone")
    clip = _clip_model(backbone, "eval.scorers.aesthetic.backbone")
    head = AestheticMLP(clip.config.projection_dim)
    sd = read_state_dict(spec.weights, "eval.scorers.aesthetic.weights")
    try:
        head.load_state_dict(sd)
    except RuntimeError as err:
        raise InputError(f"eval.scorers.aesthetic.weights: {spec.weights}: not the aesthetic MLP for a "
                         f"{clip.config.projection_dim}-d CLIP embedding ({str(err).splitlines()[0]})") from None
    return Aesthetic(clip, *_processors(backbone, "eval.scorers.aesthetic.backbone"), device,
                     _dtype("aesthetic", spec, device), spec.batch_size, head)


@register_scorer("imagereward")
def load_imagereward(spec: ScorerSpec, device: torch.device | None = None):
    raise InputError(IMAGEREWARD_CONFLICT)


SCORERS = ("pickscore", "hpsv2", "aesthetic", "clip", "imagereward")
"""Learned scorer names a config may use (eval.scorers)."""


def load_scorers(specs: dict[str, ScorerSpec], device: torch.device | None = None) -> dict:
    """name -> scorer, for the configured ``eval.scorers``."""
    from sail.engine.scorers import get_scorer

    return {name: get_scorer(name, spec=spec, device=device) for name, spec in specs.items()}
