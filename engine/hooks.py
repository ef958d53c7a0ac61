"""Named points of a run where a test may act; nothing happens there in a real run.

Production code only announces that it reached a point (``reached("pair")``, or
``reached("train", step=...)`` after each training checkpoint). Tests decide what happens
there from outside: in-process with ``installed(hook)`` (e.g. raise ``StopRun`` to end a
stage after a checkpoint), in a subprocess by starting the entry point through
``tests/kill_at.py`` (SIGKILL at a point, for the resume tests).

Points: generate (a rank's candidates sampled, not yet written), rank (half of a rank's
prompts ranked), pair, mix (outputs written, manifest not yet), train (a step checkpoint
saved; ``step``), sspo_samples (a segment's reference samples written, its first step not yet
trained; ``step``), evaluate.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

Hook = Callable[[str, dict], None]
_hooks: list[Hook] = []


class StopRun(Exception):
    """Raised by a test hook to end the run at a point, as a kill would, but in-process."""


def reached(point: str, **info) -> None:
    """Tell the installed hooks (none in a real run) that the run reached ``point``."""
    for hook in tuple(_hooks):
        hook(point, info)


def install(hook: Hook) -> None:
    _hooks.append(hook)


def uninstall(hook: Hook) -> None:
    _hooks.remove(hook)


@contextmanager
def installed(hook: Hook) -> Iterator[Hook]:
    """``hook`` is called at every point reached inside the ``with`` block."""
    install(hook)
    try:
        yield hook
    finally:
        uninstall(hook)
