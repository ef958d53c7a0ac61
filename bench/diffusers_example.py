"""Run the diffusers Diffusion-DPO example script under a step clock, for ``bench/lora_dpo.py``.

    python -m sail.bench.diffusers_example --example /tmp/diffusers_dpo/train_diffusion_dpo.py \
        --timing-out steps.json -- --pretrained_model_name_or_path MODEL --dataset_name DATA ...

Their script (``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` of
huggingface/diffusers) is never copied into this repository: its path is an argument, and it
runs unchanged through ``runpy`` with ``sys.argv`` set to the arguments after ``--``.

The clock: ``Accelerator.log`` is wrapped to note ``time.perf_counter()`` at each call. The
script calls it once per optimizer step, right after reading loss, accuracy and lr with
``.item()``, so each stamp falls after the step's device work has finished. ``--timing-out``
gets ``{"start": t, "steps": [[global_step, t], ...], "stand_ins": [...]}``, written even when
the script fails or exits (``--help``).

Stand-ins, only for a package that does not import here (listed under ``stand_ins``), and
served to the example's own ``import`` statements alone (``builtins_serving``):
- ``wandb``: imported at the top of the script but used only by ``--run_validation``, which the
  benchmark never passes; the stand-in fails loudly if anything touches it.
- ``torchvision``: the script's per-step image transforms (Resize, CenterCrop / RandomCrop,
  RandomHorizontalFlip, ToTensor, Normalize), written below with the same PIL and torch calls
  torchvision's PIL path makes. The PyPI torchvision wheel does not import with a CPU-only torch.
- ``datasets``: ``load_dataset(folder, split=...)`` on a folder of ``<split>-*.parquet`` files,
  with the two methods the script uses (``with_transform`` and row access, including the batched
  ``__getitems__`` that torch's DataLoader calls, so the transform runs once per batch as with
  the real package). datasets 5.0.1 needs huggingface-hub < 2 and transformers 5.25 needs >= 2.4,
  so the real one cannot join this environment.
"""
from __future__ import annotations

import argparse
import builtins
import glob
import json
import os
import runpy
import sys
import time
import types


# ----------------------------------------------------------------------------------------------
# Stand-ins for packages this environment cannot import
# ----------------------------------------------------------------------------------------------

class _Unavailable(types.ModuleType):
    """A module whose every public attribute is an error naming the missing package."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise RuntimeError(f"{self.__name__}.{attr}: {self.__name__} is not installed; the benchmark's "
                           f"stand-in only lets the example import")


def _torchvision_stand_in() -> types.ModuleType:
    """``torchvision.transforms`` for PIL inputs: the same PIL and torch calls as torchvision's
    PIL path (resize with shorter side = size, centre crop offsets rounded, flip by transpose)."""
    import enum

    import numpy as np
    import torch
    from PIL import Image

    class InterpolationMode(enum.Enum):
        NEAREST, BILINEAR, BICUBIC = "nearest", "bilinear", "bicubic"

    pil_filter = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.BILINEAR: Image.BILINEAR,
                  InterpolationMode.BICUBIC: Image.BICUBIC}

    class Compose:
        def __init__(self, transforms):
            self.transforms = list(transforms)

        def __call__(self, x):
            for t in self.transforms:
                x = t(x)
            return x

    class Resize:
        def __init__(self, size: int, interpolation=InterpolationMode.BILINEAR):
            self.size, self.filter = int(size), pil_filter[interpolation]

        def __call__(self, img):
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            return img.resize((new_w, new_h), self.filter)

    class CenterCrop:
        def __init__(self, size: int):
            self.size = int(size)

        def __call__(self, img):
            w, h = img.size
            top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
            return img.crop((left, top, left + self.size, top + self.size))

    class RandomCrop(CenterCrop):
        def __call__(self, img):
            w, h = img.size
            top = int(torch.randint(0, h - self.size + 1, (1,)))
            left = int(torch.randint(0, w - self.size + 1, (1,)))
            return img.crop((left, top, left + self.size, top + self.size))

    class RandomHorizontalFlip:
        def __init__(self, p: float = 0.5):
            self.p = p

        def __call__(self, img):
            return img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < self.p else img

    class ToTensor:
        def __call__(self, img):
            arr = torch.from_numpy(np.array(img, np.uint8, copy=True))
            return arr.view(img.size[1], img.size[0], -1).permute(2, 0, 1).contiguous().float().div(255)

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = torch.as_tensor(mean), torch.as_tensor(std)

        def __call__(self, t):
            return (t - self.mean[:, None, None]) / self.std[:, None, None]

    class Lambda:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, x):
            return self.fn(x)

    transforms = types.ModuleType("torchvision.transforms")
    for obj in (Compose, Resize, CenterCrop, RandomCrop, RandomHorizontalFlip, ToTensor, Normalize, Lambda,
                InterpolationMode):
        setattr(transforms, obj.__name__, obj)
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    return package


class ParquetSplit:
    """One split of a local parquet data set, as much of ``datasets.Dataset`` as the example uses."""

    def __init__(self, table, transform=None):
        self.table, self.transform = table, transform

    def __len__(self) -> int:
        return self.table.num_rows

    def with_transform(self, transform) -> "ParquetSplit":
        return ParquetSplit(self.table, transform)

    def _batch(self, keys: list[int]) -> dict:
        batch = self.table.take(keys).to_pydict()
        return self.transform(batch) if self.transform is not None else batch

    def __getitem__(self, key):
        if isinstance(key, int):
            return {name: values[0] for name, values in self._batch([key]).items()}
        return self._batch(list(key))

    def __getitems__(self, keys: list[int]) -> list[dict]:
        batch = self._batch(list(keys))
        return [{name: values[i] for name, values in batch.items()} for i in range(len(keys))]


def _datasets_stand_in() -> types.ModuleType:
    """``datasets.load_dataset`` for a local parquet file or a folder of ``<split>-*.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def load_dataset(path: str, cache_dir: str | None = None, split: str = "train", **_):
        files = [path] if path.endswith(".parquet") else sorted(
            glob.glob(os.path.join(path, f"{split}-*.parquet")) + glob.glob(os.path.join(path, f"{split}.parquet")))
        if not files:
            raise FileNotFoundError(f"{path}: no {split}-*.parquet or {split}.parquet (datasets stand-in)")
        return ParquetSplit(pa.concat_tables([pq.read_table(f) for f in files]))

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


STAND_INS = {"wandb": lambda: _Unavailable("wandb"), "torchvision": _torchvision_stand_in,
             "datasets": _datasets_stand_in}


def stand_ins() -> dict[str, types.ModuleType]:
    """The stand-in of each package of ``STAND_INS`` that does not import here (missing, or a
    broken build such as a CUDA torchvision over a CPU torch; its half-imported modules are
    dropped again)."""
    out = {}
    for name, build in STAND_INS.items():
        try:
            __import__(name)
        except Exception:   # ImportError, or RuntimeError from a torchvision built for another torch
            for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[mod]
            out[name] = build()
    return out


def builtins_serving(modules: dict[str, types.ModuleType]) -> dict:
    """A ``__builtins__`` whose ``import`` returns ``modules`` for their names, for the example's
    globals only: the stand-ins never enter ``sys.modules``, so the libraries' own availability
    checks (``importlib.util.find_spec("torchvision")``...) still see the real environment."""
    real_import = builtins.__import__

    def importer(name, globals=None, locals=None, fromlist=(), level=0):
        top = name.partition(".")[0]
        if level == 0 and top in modules:
            return modules[top]
        return real_import(name, globals, locals, fromlist, level)

    return {**vars(builtins), "__import__": importer}


# ----------------------------------------------------------------------------------------------
# The step clock and the run
# ----------------------------------------------------------------------------------------------

def clock_accelerator_log(stamps: list) -> None:
    """Note (step, perf_counter) at each ``Accelerator.log`` call: once per optimizer step in the
    example, after its per-step ``.item()`` reads."""
    from accelerate import Accelerator

    original = Accelerator.log

    def log(self, values, *args, **kwargs):
        stamps.append([kwargs.get("step", args[0] if args else None), time.perf_counter()])
        return original(self, values, *args, **kwargs)

    Accelerator.log = log


def run_example(example: str, example_args: list[str], timing_out: str) -> None:
    """Run ``example`` as ``__main__`` with ``example_args``; write its step stamps to ``timing_out``."""
    start = time.perf_counter()
    modules = stand_ins()
    stamps: list = []
    clock_accelerator_log(stamps)
    sys.argv = [example, *example_args]
    try:
        runpy.run_path(example, init_globals={"__builtins__": builtins_serving(modules)}, run_name="__main__")
    finally:
        with open(timing_out, "w") as f:
            json.dump({"start": start, "steps": stamps, "stand_ins": sorted(modules)}, f)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", required=True, help="path of diffusers' train_diffusion_dpo.py")
    parser.add_argument("--timing-out", required=True, help="JSON file for the step stamps")
    parser.add_argument("example_args", nargs=argparse.REMAINDER, help="-- then the example's own arguments")
    args = parser.parse_args(argv)
    rest = args.example_args[1:] if args.example_args[:1] == ["--"] else args.example_args
    run_example(args.example, rest, args.timing_out)


if __name__ == "__main__":
    main()
