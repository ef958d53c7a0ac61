"""Image scorers, by name: what ranks candidates for OnlineDPO and scores held-out samples.

A scorer maps uint8 images [B, H, W, 3] and their prompts to one float per image (higher is
better). A world registers its own (the toy world's oracle, ``engine/toy/scorers.py``); the
learned scorers of the papers (PickScore, HPSv2, ImageReward, LAION aesthetic) plug in the
same way, as factories that load local weights:

    @register_scorer("pickscore")
    def _pickscore(weights: str) -> Scorer: ...

and are then used as ``get_scorer("pickscore", weights="/models/pickscore")``. Any
``"module:function"`` string is accepted as well.
"""
from __future__ import annotations

import importlib
from typing import Callable, Protocol, Sequence

import numpy as np


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


def load_scorer(spec: str, key: str = "oracle") -> Scorer:
    """``"package.module:function"`` -> the function; errors name ``key``, the spec and what is wrong."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"{key}: expected 'module:function', got {spec!r}")
    module_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{key}: cannot import module {module_name!r} of {spec!r} ({err})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{key}: {module_name!r} has no callable {fn_name!r}")
    return fn
