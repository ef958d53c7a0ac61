"""The toy world: 16x16 RGB images of one shape on a plain background.

A prompt names three attributes, ``"<colour> <shape> on <background>"``; everything else
(position and size of the shape) is left unnamed and varies at random in the pretraining
data, so that a model trained on the world has something to vary that a preference can
reward. The palette is chosen with every pair of colours at least ~80 apart in RGB, so that
colours classified from pixels (engine/toy/vision.py) are reliable even at anti-aliased edges.

Geometry: image coordinates in pixels, x to the right and y down, pixel (i, j) covers
[j, j+1) x [i, i+1); a shape of ``size`` s fits a box of side s centred on (cx, cy).
Rendering is anti-aliased by 4x4 supersampling of the inside tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sail.engine.config import SamplingConfig
from sail.engine.configtree import OVERLAY

DEFAULT_ORACLE = "sail.engine.toy.oracle:size_and_centre_score"

# Ordered: ids are positions in these tuples, and prompt order (all_prompts) follows them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 50),
    "cyan": (40, 210, 220),
    "blue": (40, 70, 220),
    "purple": (120, 50, 170),
    "magenta": (220, 50, 200),
    "pink": (250, 165, 200),
    "brown": (125, 75, 30),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # [C, 3]
# "cross" is the diagonal X; "plus" the upright +; "bar" a horizontal rectangle.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "plus", "cross", "ring", "bar")
BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray", "blue", "green", "red", "yellow", "purple")
CONNECTIVE = "on"
SUPERSAMPLE = 4


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


@dataclass
class ToyWorldConfig:
    """The toy world and the data built from it (plain types only: embedded as-is in the run
    config tree). Prompt budget: seed + iterations x pool + eval prompts <= 768 prompts."""

    seed: int = 0
    """Master seed of the prompt splits, the sampled layouts, the image seeds and the labels."""
    image_size: int = 16
    """Side of the square RGB images in pixels."""
    min_shape_size: float = 6.0
    """Smallest shape (side of its bounding box, pixels) in pretraining renders."""
    max_shape_size: float = 13.0
    """Largest shape in pretraining renders."""
    margin: float = 1.0
    """Pixels kept free at every border in renders (the border ring is pure background)."""
    num_seed_prompts: int = 96
    """Prompts of the seed preference set (and of the full set, which shares them)."""
    images_per_seed_prompt: int = 12
    """Base-model samples drawn per seed prompt; pairs are drawn among them."""
    seed_pairs_per_prompt: int = 4
    """Labelled pairs per seed prompt in the seed set."""
    full_multiplier: int = 16
    """The full set (DPO-on-all-labels baseline) has this many times the seed set's pairs."""
    num_iterations: int = 3
    """SAIL iterations T: one disjoint prompt pool each."""
    pool_prompts: int = 128
    """Prompts per iteration pool (paper: pools are 20-40% of the seed-set size in pairs)."""
    num_eval_prompts: int = 128
    """Held-out evaluation prompts (never in seed or pools)."""
    eval_seeds_per_prompt: int = 10
    """Images per evaluation prompt (fixed seeds)."""
    label_temperature: float = 0.05
    """Bradley-Terry temperature of the oracle's labels: p(a beats b) = sigmoid((s_a - s_b) / T); 0 = no noise."""
    tie_margin: float = 0.005
    """Pairs whose oracle scores differ by at most this are labelled a tie (0.5 / 0.5), kept in
    the parquet files like Pick-a-Pic's no-preference votes (~2% of the pairs at 0.005)."""
    oracle: str = DEFAULT_ORACLE
    """The "human": a ``module:function`` scoring (images_uint8 [B,H,W,3], prompts) -> [B]."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(guidance_scale=1.5, batch_size=512),
                                     metadata=OVERLAY)
    """How the base model is sampled for the seed/full sets, and every model for evaluation
    (DDIM 20 steps, CFG 1.5, 512 images per UNet batch)."""

    def __post_init__(self):
        _check(self.image_size >= 8, "image_size", f"must be >= 8, got {self.image_size}")
        _check(0 < self.min_shape_size <= self.max_shape_size, "min_shape_size",
               f"must be in (0, max_shape_size={self.max_shape_size}], got {self.min_shape_size}")
        _check(self.max_shape_size + 2 * self.margin <= self.image_size, "max_shape_size",
               f"{self.max_shape_size} + 2 x margin {self.margin} exceeds image_size {self.image_size}")
        _check(self.margin >= 0, "margin", f"must be >= 0, got {self.margin}")
        for name in ("num_seed_prompts", "images_per_seed_prompt", "seed_pairs_per_prompt", "full_multiplier",
                     "pool_prompts", "num_eval_prompts", "eval_seeds_per_prompt"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.num_iterations >= 0, "num_iterations", f"must be >= 0, got {self.num_iterations}")
        n = self.images_per_seed_prompt
        _check(self.full_multiplier * self.seed_pairs_per_prompt <= n * (n - 1) // 2, "full_multiplier",
               f"{self.full_multiplier} x {self.seed_pairs_per_prompt} pairs per prompt exceed the "
               f"{n * (n - 1) // 2} distinct pairs of {n} images (raise images_per_seed_prompt)")
        used = self.num_seed_prompts + self.num_iterations * self.pool_prompts + self.num_eval_prompts
        _check(used <= len(all_prompts()), "num_seed_prompts",
               f"seed {self.num_seed_prompts} + {self.num_iterations} x pool {self.pool_prompts} + eval "
               f"{self.num_eval_prompts} = {used} prompts, the world has {len(all_prompts())}")
        _check(self.tie_margin >= 0, "tie_margin", f"must be >= 0, got {self.tie_margin}")
        _check(self.label_temperature >= 0, "label_temperature", f"must be >= 0, got {self.label_temperature}")
        _check(":" in self.oracle, "oracle", f"expected 'module:function', got {self.oracle!r}")

    @property
    def num_seed_pairs(self) -> int:
        return self.num_seed_prompts * self.seed_pairs_per_prompt

    @property
    def num_full_pairs(self) -> int:
        return self.num_seed_pairs * self.full_multiplier


@dataclass(frozen=True)
class Attributes:
    """What a prompt names: indices into COLOUR_NAMES, SHAPES and COLOUR_NAMES (background)."""

    colour: int
    shape: int
    background: int

    @property
    def prompt(self) -> str:
        return f"{COLOUR_NAMES[self.colour]} {SHAPES[self.shape]} {CONNECTIVE} {COLOUR_NAMES[self.background]}"


def vocabulary() -> list[str]:
    """Every word a prompt can contain, in a fixed order."""
    words = list(COLOUR_NAMES) + list(SHAPES) + [CONNECTIVE]
    return list(dict.fromkeys(words))


def all_prompts() -> list[str]:
    """All valid prompts (background never equal to the shape colour), in a fixed order."""
    out = []
    for colour in COLOUR_NAMES:
        for shape in SHAPES:
            for bg in BACKGROUNDS:
                if bg != colour:
                    out.append(f"{colour} {shape} {CONNECTIVE} {bg}")
    return out


def parse_prompt(prompt: str) -> Attributes:
    """``"red circle on black"`` -> Attributes; raises ValueError naming the bad word."""
    words = prompt.lower().split()
    if len(words) != 4 or words[2] != CONNECTIVE:
        raise ValueError(f"prompt {prompt!r}: expected '<colour> <shape> on <background>'")
    colour, shape, bg = words[0], words[1], words[3]
    for word, allowed, what in ((colour, COLOUR_NAMES, "colour"), (shape, SHAPES, "shape"),
                                (bg, BACKGROUNDS, "background")):
        if word not in allowed:
            raise ValueError(f"prompt {prompt!r}: unknown {what} {word!r} (known: {', '.join(allowed)})")
    if colour == bg:
        raise ValueError(f"prompt {prompt!r}: background equals the shape colour")
    return Attributes(COLOUR_NAMES.index(colour), SHAPES.index(shape), COLOUR_NAMES.index(bg))


def _circle(u, v):
    return u * u + v * v <= 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 1.0


def _triangle(u, v):  # apex up (v grows downwards)
    return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)


def _diamond(u, v):
    return np.abs(u) + np.abs(v) <= 1.0


def _plus(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 1 / 3) & (av <= 1.0)) | ((av <= 1 / 3) & (au <= 1.0))


def _cross(u, v):  # the diagonal X
    return _square(u, v) & ((np.abs(u - v) <= 0.45) | (np.abs(u + v) <= 0.45))


def _ring(u, v):  # inner radius 1/2
    rr = u * u + v * v
    return (rr <= 1.0) & (rr >= 0.25)


def _bar(u, v):
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.4)


# Inside tests in the shape's unit box (u, v in [-1, 1] at the box edges), in SHAPES order.
_INSIDE = (_circle, _square, _triangle, _diamond, _plus, _cross, _ring, _bar)


def _inside(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """shape: [B] ids; u, v: [B, P] -> bool [B, P]; each test runs only on its own rows."""
    out = np.zeros(u.shape, dtype=bool)
    for s in np.unique(shape):
        rows = shape == s
        out[rows] = _INSIDE[s](u[rows], v[rows])
    return out


def coverage(shape, size, cx, cy, image_size: int = 16, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel covered by the shape: float32 [B, H, W] in [0, 1].

    shape: [B] shape ids; size, cx, cy: [B] floats in pixels.
    """
    shape = np.atleast_1d(np.asarray(shape, dtype=np.int64))
    size, cx, cy = (np.atleast_1d(np.asarray(a, dtype=np.float32)) for a in (size, cx, cy))
    n = image_size * supersample
    grid = (np.arange(n, dtype=np.float32) + 0.5) / supersample  # sub-pixel centres
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    half = (size / 2.0)[:, None]
    u = (xs.reshape(1, -1) - cx[:, None]) / half
    v = (ys.reshape(1, -1) - cy[:, None]) / half
    inside = _inside(shape, u, v).reshape(-1, image_size, supersample, image_size, supersample)
    return inside.mean(axis=(2, 4), dtype=np.float32)


def compose(alpha: np.ndarray, colour: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Blend shape colour over background: alpha [B,H,W], colour/background [B] ids -> uint8 [B,H,W,3]."""
    fg = PALETTE[np.asarray(colour)][:, None, None, :]
    bg = PALETTE[np.asarray(background)][:, None, None, :]
    img = bg + alpha[..., None] * (fg - bg)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_batch(colour, shape, background, size, cx, cy, image_size: int = 16) -> np.ndarray:
    """Vectorised renderer: per-image attribute arrays [B] -> uint8 [B, H, W, 3]."""
    alpha = coverage(shape, size, cx, cy, image_size)
    return compose(alpha, np.atleast_1d(colour), np.atleast_1d(background))


def render(prompt_or_attrs: str | Attributes, size: float = 10.0, position: tuple[float, float] | None = None,
           image_size: int = 16) -> np.ndarray:
    """Render one image: uint8 [H, W, 3]. ``position`` is the shape centre (x, y) in pixels,
    default the image centre."""
    attrs = parse_prompt(prompt_or_attrs) if isinstance(prompt_or_attrs, str) else prompt_or_attrs
    cx, cy = position if position is not None else (image_size / 2.0, image_size / 2.0)
    return render_batch([attrs.colour], [attrs.shape], [attrs.background], [size], [cx], [cy], image_size)[0]


@dataclass
class Layout:
    """The unnamed attributes of a batch of images: sizes and centres in pixels, [B] each."""

    size: np.ndarray
    cx: np.ndarray
    cy: np.ndarray


def sample_layout(rng: np.random.Generator, n: int, image_size: int, min_size: float, max_size: float,
                  margin: float) -> Layout:
    """Uniform size in [min_size, max_size], then a uniform centre keeping ``margin`` pixels
    free at every border (so the border ring of a render is pure background)."""
    size = rng.uniform(min_size, max_size, n).astype(np.float32)
    lo = margin + size / 2.0
    hi = image_size - margin - size / 2.0
    cx = (lo + (hi - lo) * rng.random(n)).astype(np.float32)
    cy = (lo + (hi - lo) * rng.random(n)).astype(np.float32)
    return Layout(size, cx, cy)


def render_prompts(prompts: list[str], layout: Layout, image_size: int = 16) -> np.ndarray:
    """Render one image per prompt with the given layout: uint8 [B, H, W, 3]."""
    attrs = [parse_prompt(p) for p in prompts]
    colour = np.array([a.colour for a in attrs])
    shape = np.array([a.shape for a in attrs])
    bg = np.array([a.background for a in attrs])
    return render_batch(colour, shape, bg, layout.size, layout.cx, layout.cy, image_size)
