"""One import name, `sail`: no name of ours may shadow a distribution the stack installs
(Hugging Face's `kernels`, which transformers 5 imports, once did), and the project works
from a checkout and from an installed wheel."""
import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.datagen import clean_copy

REPO = Path(__file__).resolve().parents[2]
OURS = "sail"


def our_import_names(root: Path) -> set[str]:
    """What a process can import from us: `sail` and, in a checkout whose root is on sys.path
    (`python -m ...` from the root, pytest, the launch scripts), each regular package and module
    at the root. A folder without __init__.py (kernels/) is only a namespace portion there: an
    installed regular package of the same name wins, so it shadows nothing."""
    names = {OURS}
    for entry in root.iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
        elif entry.is_file() and entry.suffix == ".py":
            names.add(entry.stem)
    return names


def installed_import_names() -> dict[str, set[str]]:
    """Top-level import name -> the installed distributions (not ours) that provide it; a
    distribution's normalised name counts as one of its import names."""
    names: dict[str, set[str]] = {}
    for name, dists in importlib.metadata.packages_distributions().items():
        names.setdefault(name, set()).update(dists)
    for dist in importlib.metadata.distributions():
        dist_name = dist.metadata["Name"]
        names.setdefault(re.sub(r"[-.]+", "_", dist_name).lower(), set()).add(dist_name)
    return {name: dists - {OURS} for name, dists in names.items() if dists - {OURS}}


def test_no_import_name_of_ours_is_provided_by_an_installed_distribution():
    installed = installed_import_names()
    assert "torch" in installed and "diffusers" in installed          # the scan sees the stack
    clashes = {name: sorted(installed[name]) for name in our_import_names(REPO) if name in installed}
    assert not clashes, f"import names of ours that installed distributions also provide: {clashes}"


def test_a_regular_kernels_package_at_the_root_would_be_caught(tmp_path):
    """The check above can fail: a root `kernels/__init__.py` makes `kernels` one of our names."""
    (tmp_path / "kernels").mkdir()
    assert "kernels" not in our_import_names(tmp_path)
    (tmp_path / "kernels" / "__init__.py").write_text("")
    assert "kernels" in our_import_names(tmp_path)
    assert not (REPO / "kernels" / "__init__.py").exists()


def _python(code: str, cwd: Path, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


BOTH_KERNELS = """
import json, kernels, sail.kernels.dpo_loss as ours
from diffusers import UNet2DConditionModel   # imports transformers 5, which imports `kernels`
print(json.dumps({"hf": kernels.__file__, "has_get_kernel": hasattr(kernels, "get_kernel"),
                  "ours": ours.__file__, "sail": __import__("sail").__file__}))
"""


@pytest.mark.skipif(not importlib.metadata.packages_distributions().get("kernels"),
                    reason="Hugging Face's kernels is not installed")
def test_hugging_face_kernels_and_ours_in_one_process():
    """From the repository root, where `python -m` puts the root first on sys.path."""
    got = _python(BOTH_KERNELS, cwd=REPO)
    assert got["has_get_kernel"] and not Path(got["hf"]).is_relative_to(REPO)
    assert Path(got["ours"]) == REPO / "kernels" / "dpo_loss.py"
    assert Path(got["sail"]) == REPO / "sail" / "__init__.py"


INSTALLED = """
import json, subprocess, sys, kernels, sail
from sail.engine.config import CONFIG_DIR, TOY_BASE_MODEL, find_config
from sail.kernels.dpo_loss import dpo_loss
help_ = subprocess.run([sys.executable, "-m", "sail.launch.cli", "train", "--help"], capture_output=True, text=True)
bad = subprocess.run([sys.executable, "-m", "sail.launch.cli", "train", "--config", "toy_cpu.json",
                      "--set", "method=nope"], capture_output=True, text=True)
print(json.dumps({"sail": sail.__file__, "path": list(sail.__path__), "hf": kernels.__file__,
                  "config": str(find_config("toy_cpu.json")), "toy_model": str(TOY_BASE_MODEL),
                  "toy_model_ok": (TOY_BASE_MODEL / "unet" / "diffusion_pytorch_model.safetensors").is_file(),
                  "help": help_.returncode, "bad": [bad.returncode, bad.stderr.strip()]}))
"""


def test_wheel_installs_one_package_that_runs_outside_the_checkout(tmp_path):
    src = clean_copy(REPO, tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("sail-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"sail"}
    for needed in ("sail/__init__.py", "sail/kernels/dpo_loss.py", "sail/engine/config.py", "sail/launch/cli.py",
                   "sail/bench/kernels.py", "sail/configs/toy_cpu.json", "sail/configs/sdxl_zero3.json",
                   "sail/engine/toy/base_model/unet/diffusion_pytorch_model.safetensors"):
        assert needed in names, needed
    assert "sail/kernels/__init__.py" not in names and not any(n.startswith("sail/tests") for n in names)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = _python(INSTALLED, cwd=elsewhere, PYTHONPATH=str(tmp_path / "site"))
    site = tmp_path / "site" / "sail"
    assert got["sail"] == str(site / "__init__.py") and got["path"] == [str(site)]   # no checkout on the path
    assert not Path(got["hf"]).is_relative_to(tmp_path)
    assert got["config"] == str(site / "configs" / "toy_cpu.json") and got["toy_model_ok"]
    assert got["help"] == 0
    assert got["bad"] == [2, "Error: " + f"{site / 'configs' / 'toy_cpu.json'}: method: must be one of "
                             "['dpo', 'sail', 'online_dpo', 'sspo'], got 'nope'"]
