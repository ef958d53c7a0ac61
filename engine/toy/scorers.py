"""The toy world's scorer: its programmatic human, registered as ``"oracle"``.

``world_scorer`` resolves a scorer name against the run's one oracle setting
(``toy.world.oracle``), so that labels, evaluation, OnlineDPO ranking and diagnostics all
score with one human.
"""
from __future__ import annotations

from sail.engine.scorers import Scorer, get_scorer, load_scorer, register_scorer
from sail.engine.toy.world import DEFAULT_ORACLE


def world_scorer(name: str, oracle: str) -> Scorer:
    """``get_scorer`` where ``"oracle"`` is the run's oracle setting ``oracle``."""
    return get_scorer(name, spec=oracle) if name == "oracle" else get_scorer(name)


@register_scorer("oracle")
def _oracle(spec: str = DEFAULT_ORACLE) -> Scorer:
    """The toy world's programmatic human (engine/toy/oracle.py), or another ``module:function``."""
    return load_scorer(spec)
