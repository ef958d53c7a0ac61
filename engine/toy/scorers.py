"""Image scorers for evaluation, by name.

A scorer maps uint8 images [B, H, W, 3] and their prompts to one float per image (higher is
better). The toy oracle is the first; the learned scorers of the papers (PickScore, HPSv2,
ImageReward, LAION aesthetic) plug in the same way, as factories that load local weights:

    @register_scorer("pickscore")
    def _pickscore(weights: str) -> Scorer: ...

and are then evaluated with ``get_scorer("pickscore", weights="/models/pickscore")``.
Any ``"module:function"`` string is accepted as well.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np

from sail.engine.toy.oracle import load_scorer
from sail.engine.toy.world import DEFAULT_ORACLE


class Scorer(Protocol):
    """``(images_uint8 [B, H, W, 3], prompts) -> float array [B]``."""

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray: ...


_REGISTRY: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str):
    """Decorator registering a scorer factory under ``name``."""
    def wrap(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in _REGISTRY:
            raise ValueError(f"scorer {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory
    return wrap


def available_scorers() -> list[str]:
    """Registered scorer names."""
    return sorted(_REGISTRY)


def get_scorer(name: str, **kwargs) -> Scorer:
    """A registered scorer (factory called with ``kwargs``) or a ``"module:function"``."""
    if name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    if ":" in name:
        return load_scorer(name)
    raise ValueError(f"scorer: unknown {name!r}; registered: {available_scorers()}, or give 'module:function'")


def world_scorer(name: str, oracle: str) -> Scorer:
    """``get_scorer`` where ``"oracle"`` is the run's one oracle setting (``toy.world.oracle``),
    so that labels, evaluation, OnlineDPO ranking and diagnostics all score with one human."""
    return get_scorer(name, spec=oracle) if name == "oracle" else get_scorer(name)


@register_scorer("oracle")
def _oracle(spec: str = DEFAULT_ORACLE) -> Scorer:
    """The toy world's programmatic human (engine/toy/oracle.py), or another ``module:function``."""
    return load_scorer(spec)
