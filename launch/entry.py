"""What the entry points share: process defaults, and user-input errors as one line with
exit status 2."""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

import click


def process_defaults(threads: int | None = None) -> None:
    """Set before torch, DeepSpeed or any Hugging Face library does its work:
    - log lines with time, level and module, at INFO;
    - no hub access at run time (models, data and scorers are local paths; bitsandbytes
      otherwise asks the hub for a CPU kernel at import): ``HF_HUB_OFFLINE=1`` unless set;
    - on a machine without CUDA, DeepSpeed's CPU accelerator (it must be chosen before
      DeepSpeed is imported) and one share of the cores per local rank;
    - on a machine without CUDA, glibc's allocator kept from returning freed memory to the
      system between UNet calls (``tune_host_allocator``);
    - ``threads``: torch's CPU threads, when a tool's --threads asks for a number."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if threads:
        torch.set_num_threads(threads)

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # Ranks on one CPU machine share its cores: more threads than cores makes OpenMP
            # spin and runs ~10x slower (measured here: 0.41 s vs 4.5 s for one tiny UNet step).
            ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
        tune_host_allocator()


MMAP_THRESHOLD = 256 << 20
"""Host allocations below this come from the heap, not from a fresh mmap (glibc: 128 KiB, rising
to at most 32 MiB as freed blocks are seen)."""
TRIM_THRESHOLD = 1 << 30
"""Free memory kept at the top of the heap before it is handed back (glibc: twice the mmap threshold)."""


def tune_host_allocator() -> bool:
    """CPU runs: keep activation-sized host blocks in the process. With glibc's defaults every UNet
    call of a large batch maps fresh pages for its activations and unmaps them again, and the
    page faults cost more than the arithmetic (toy UNet, batch 1024: ~1.6x slower per image,
    ``bench/e2e.py``). The numbers computed do not change, only where their memory comes from.
    No effect off glibc; ``SAIL_HOST_ALLOCATOR=default`` leaves the allocator alone. Returns
    whether it was tuned."""
    if os.environ.get("SAIL_HOST_ALLOCATOR", "") == "default":
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3        # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


def config_options(cls_name: str):
    """``--config FILE`` (a JSON object of ``cls_name``'s fields) and ``--set KEY=VALUE``
    (repeatable; dotted keys reach nested dataclasses): the one way a launch script takes the
    settings of a dataclass, read with ``engine.configtree.load_dataclass``."""
    def wrap(fn):
        fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help=f"Override a {cls_name} field (value parsed as JSON), e.g. --set steps=100.")(fn)
        return click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
                            help=f"JSON file of {cls_name} fields (default: its defaults).")(fn)
    return wrap


class UserInputError(click.ClickException):
    """Printed by click as ``Error: <message>`` on stderr; the process exits with status 2."""

    exit_code = 2


@contextmanager
def user_input_errors(*also: type[Exception]):
    """Turn an ``InputError`` (and the exception types in ``also``) raised inside into one line
    on stderr and exit status 2, without a traceback. Checks run before any work is spent, so
    such an error leaves nothing written."""
    from sail.engine.errors import InputError

    try:
        yield
    except (InputError, *also) as err:
        # Raised by every rank together and already said once by rank 0 (Ranks.agreed): the
        # ranks leave quietly with the same status.
        if getattr(err, "reported", False):
            sys.exit(UserInputError.exit_code)
        raise UserInputError(str(err)) from None
