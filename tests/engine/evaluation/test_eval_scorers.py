"""Learned scorers on random-weight models of their architectures, loaded by the real loading
code from files in the real formats, checked against references written here."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sail.engine.config import ScorerSpec
from sail.engine.errors import InputError
from sail.engine.evaluation.scorers import (load_aesthetic, load_clip_score, load_hpsv2, load_imagereward,
                                            load_pickscore, read_state_dict)
from tests.engine.evaluation.conftest import WORDS, save_clip_folder

CPU = torch.device("cpu")


def _inputs(folder, images, prompts):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    pixels = AutoImageProcessor.from_pretrained(folder)(images=[Image.fromarray(i) for i in images],
                                                         return_tensors="pt").pixel_values
    return tok, pixels


def test_pickscore_matches_clip_logits(clip_folder, images_and_prompts):
    """PickScore = logit_scale.exp() x cosine: the diagonal of transformers' own CLIP logits."""
    from transformers import CLIPModel

    images, prompts = images_and_prompts
    scorer = load_pickscore(ScorerSpec(weights=clip_folder, batch_size=3), CPU)
    got = scorer.score(images, prompts)
    model = CLIPModel.from_pretrained(clip_folder).eval()
    tok, pixels = _inputs(clip_folder, images, prompts)
    with torch.no_grad():
        logits = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels).logits_per_image
    want = torch.diagonal(logits).double().numpy()
    assert got.shape == (7,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)   # scores ~30: fp32 rounding is ~4e-6 absolute
    assert np.ptp(got) > 1e-3   # the rows differ: a constant would pass the comparison above only by luck


@pytest.mark.parametrize("loader", [load_pickscore, load_clip_score])
def test_scores_do_not_depend_on_batch_size(loader, clip_folder, images_and_prompts):
    images, prompts = images_and_prompts
    one = loader(ScorerSpec(weights=clip_folder, batch_size=1), CPU).score(images, prompts)
    many = loader(ScorerSpec(weights=clip_folder, batch_size=5), CPU).score(images, prompts)
    np.testing.assert_allclose(one, many, rtol=1e-6, atol=0)   # padding lengths differ: fp32 rounding only


def test_clip_score_is_100_times_clamped_cosine(clip_folder, images_and_prompts):
    from transformers import CLIPModel

    images, prompts = images_and_prompts
    got = load_clip_score(ScorerSpec(weights=clip_folder), CPU).score(images, prompts)
    model = CLIPModel.from_pretrained(clip_folder).eval()
    tok, pixels = _inputs(clip_folder, images, prompts)
    with torch.no_grad():
        out = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels)
    cos = F.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1).double()
    np.testing.assert_allclose(got, (100 * cos.clamp(min=0)).numpy(), atol=1e-4, rtol=0)


# ---- HPSv2: an open_clip checkpoint through the conversion -------------------------------------

class _Block(torch.nn.Module):
    """open_clip's ResidualAttentionBlock, written here from its published structure."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = torch.nn.Sequential()
        self.mlp.add_module("c_fc", torch.nn.Linear(width, 2 * width))
        self.mlp.add_module("gelu", torch.nn.GELU())
        self.mlp.add_module("c_proj", torch.nn.Linear(2 * width, width))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipReference(torch.nn.Module):
    """A tiny open_clip ``CLIP`` (ViT tower + text tower) with open_clip's state-dict names."""

    def __init__(self, width=32, heads=4, layers=2, patch=8, image=32, ctx=16, vocab=len(WORDS) + 4, embed=16):
        super().__init__()
        self.visual = torch.nn.Module()
        v = self.visual
        v.conv1 = torch.nn.Conv2d(3, width, patch, patch, bias=False)
        v.class_embedding = torch.nn.Parameter(torch.randn(width) * 0.1)
        v.positional_embedding = torch.nn.Parameter(torch.randn((image // patch) ** 2 + 1, width) * 0.1)
        v.ln_pre, v.ln_post = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        v.transformer = torch.nn.Module()
        v.transformer.resblocks = torch.nn.ModuleList(_Block(width, heads) for _ in range(layers))
        v.proj = torch.nn.Parameter(torch.randn(width, embed) * 0.1)
        self.token_embedding = torch.nn.Embedding(vocab, width)
        self.positional_embedding = torch.nn.Parameter(torch.randn(ctx, width) * 0.1)
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln_final = torch.nn.LayerNorm(width)
        self.text_projection = torch.nn.Parameter(torch.randn(width, embed) * 0.1)
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
        for p in self.parameters():   # LayerNorms off their identity init, so that a swap would show
            if p.dim() == 1 and p.numel() == width:
                p.data.add_(torch.randn_like(p) * 0.2)

    def encode_image(self, x):
        v = self.visual
        x = v.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        for block in v.transformer.resblocks:
            x = block(x)
        return F.normalize(v.ln_post(x[:, 0]) @ v.proj, dim=-1)

    def encode_text(self, ids):
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        mask = torch.full((n, n), float("-inf")).triu(1)
        for block in self.transformer.resblocks:
            x = block(x, mask)
        x = self.ln_final(x)
        return F.normalize(x[torch.arange(x.shape[0]), ids.argmax(-1)] @ self.text_projection, dim=-1)


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    """An open_clip checkpoint as HPSv2 ships it ({"state_dict": ...}, a .pt pickle) and the
    transformers backbone folder (config, tokenizer, processor) of the same architecture."""
    folder = tmp_path_factory.mktemp("hps")
    torch.manual_seed(3)
    ref = OpenClipReference().eval()
    torch.save({"state_dict": ref.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    save_clip_folder(folder / "backbone")
    return ref, str(folder / "HPS_v2.1_compressed.pt"), str(folder / "backbone")


def test_hpsv2_conversion_matches_open_clip_forward(hps_files, images_and_prompts):
    ref, weights, backbone = hps_files
    images, prompts = images_and_prompts
    got = load_hpsv2(ScorerSpec(weights=weights, backbone=backbone, batch_size=4), CPU).score(images, prompts)
    tok, pixels = _inputs(backbone, images, prompts)
    with torch.no_grad():
        want = 100 * (ref.encode_image(pixels) * ref.encode_text(tok.input_ids)).sum(-1)
    np.testing.assert_allclose(got, want.double().numpy(), atol=1e-4, rtol=0)
    assert np.ptp(got) > 1e-2


def test_hpsv2_refuses_a_checkpoint_of_another_shape(hps_files, tmp_path):
    _, weights, _ = hps_files
    other = save_clip_folder(tmp_path / "wide", projection_dim=24)   # text_projection 32x16 no longer fits
    with pytest.raises(InputError, match="hpsv2.weights"):
        load_hpsv2(ScorerSpec(weights=weights, backbone=other), CPU)


# ---- aesthetic ---------------------------------------------------------------------------------

def test_aesthetic_head_on_normalised_embedding(clip_folder, images_and_prompts, tmp_path):
    from transformers import CLIPModel

    images, prompts = images_and_prompts
    torch.manual_seed(5)
    dims = [(16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    sd = {}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), dims):   # the LAION predictor's key layout
        sd[f"layers.{idx}.weight"], sd[f"layers.{idx}.bias"] = torch.randn(o, i) / i ** 0.5, torch.randn(o)
    torch.save(sd, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    scorer = load_aesthetic(ScorerSpec(weights=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"),
                                       backbone=clip_folder, batch_size=2), CPU)
    got = scorer.score(images, prompts)
    model = CLIPModel.from_pretrained(clip_folder).eval()
    _, pixels = _inputs(clip_folder, images, prompts)
    with torch.no_grad():
        x = F.normalize(model(input_ids=torch.zeros(1, 2, dtype=torch.long), pixel_values=pixels).image_embeds, dim=-1)
    for idx in (0, 2, 4, 6, 7):   # Linear layers only: the predictor has no activations
        x = x @ sd[f"layers.{idx}.weight"].T + sd[f"layers.{idx}.bias"]
    np.testing.assert_allclose(got, x.squeeze(-1).double().numpy(), atol=1e-4, rtol=0)


# ---- errors ------------------------------------------------------------------------------------

def test_missing_weights_name_the_key(tmp_path, clip_folder):
    with pytest.raises(InputError, match=r"eval.scorers.pickscore.weights: .*nope does not exist"):
        load_pickscore(ScorerSpec(weights=str(tmp_path / "nope")), CPU)
    with pytest.raises(InputError, match="eval.scorers.aesthetic.backbone: required"):
        load_aesthetic(ScorerSpec(weights=str(tmp_path / "x.pth")), CPU)
    with pytest.raises(InputError, match="not a transformers CLIP model folder"):
        load_clip_score(ScorerSpec(weights=str(tmp_path)), CPU)


def test_pickled_code_is_refused(tmp_path):
    """A checkpoint that would run code when unpickled is an input error, not an execution."""
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": Exception("not a tensor")}, tmp_path / "evil.pt")
    torch.save({"w": "a string"}, tmp_path / "strings.pt")
    with pytest.raises(InputError, match="cannot read weights"):
        read_state_dict(tmp_path / "evil.pt", "k")
    with pytest.raises(InputError, match="expected a state dict of tensors"):
        read_state_dict(tmp_path / "strings.pt", "k")


def test_imagereward_says_why_it_is_not_available():
    with pytest.raises(InputError, match="transformers.modeling_utils.*timm==0.6.13"):
        load_imagereward(ScorerSpec(weights="ImageReward.pt"))


def test_config_names_an_unknown_scorer(tmp_path):
    from sail.engine.config import EvalConfig
    from sail.engine.configtree import ConfigError, build_dataclass

    with pytest.raises(ConfigError, match=r"f.json: eval.scorers: unknown 'pickscor'"):
        build_dataclass(EvalConfig, {"scorers": {"pickscor": {"weights": "x"}}}, "f.json", "eval")
    with pytest.raises(ConfigError, match=r"f.json: unknown key 'eval.scorers.pickscore.weight'"):
        build_dataclass(EvalConfig, {"scorers": {"pickscore": {"weight": "x"}}}, "f.json", "eval")
    cfg = build_dataclass(EvalConfig, {"scorers": {"hpsv2": {"weights": "h.pt", "backbone": "b"}}}, "f.json", "eval")
    assert isinstance(cfg.scorers["hpsv2"], ScorerSpec) and cfg.scorers["hpsv2"].backbone == "b"
