"""Bad user input at the entry points: one line on stderr, exit status 2, no traceback and
nothing written; and the README's smoke run (tiny SD1.5 on the toy world's pairs) from a
clean copy of the checkout."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datagen import clean_copy, pickapic_rows, write_pickapic

REPO = Path(__file__).resolve().parents[2]


def _run(cmd, cwd=REPO, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _sail_config(tmp_path, **changes) -> Path:
    """A method-sail config of a tiny random model whose inputs are all valid unless changed."""
    pools = []
    for i in range(2):
        pools.append(tmp_path / f"pool_{i}.txt")
        pools[-1].write_text("\n".join(f"w{i} w{j}" for j in range(4)) + "\n")
    cfg = {"name": "bad", "method": "sail", "model": {"arch": "tiny-sd15"},
           "data": {"train": [write_pickapic(tmp_path / "pairs.parquet", pickapic_rows(4))], "resolution": 16},
           "train": {"steps": 2}, "sail": {"iterations": 2, "prompt_files": [str(p) for p in pools]}}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        cfg.setdefault(section, {})[name] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    return path


def _not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 on black\n".encode("latin-1"))
    return str(path)


def _broken_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    return str(path)


CASES = {
    "glob_matching_nothing": (lambda t: {"data__train": [str(t / "nothing-*.parquet")]},
                              "data.train: {t}/nothing-*.parquet matches no file"),
    "missing_prompt_file": (lambda t: {"sail__prompt_files": [str(t / "pool_0.txt"), str(t / "absent.txt")]},
                            "sail.prompt_files: {t}/absent.txt: cannot read prompts (FileNotFoundError"),
    "prompt_file_not_utf8": (lambda t: {"sail__prompt_files": [str(t / "pool_0.txt"), _not_utf8(t)]},
                             "sail.prompt_files: {t}/latin1.txt: cannot read prompts (UnicodeDecodeError"),
    "prompt_file_broken_parquet": (lambda t: {"eval__prompt_files": [_broken_parquet(t)]},
                                   "eval.prompt_files: {t}/broken.parquet: cannot read prompts"),
    "unknown_method": (lambda t: {"method": "kto"},
                       "method: must be one of ['dpo', 'sail', 'online_dpo', 'sspo'], got 'kto'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    make_changes, expected = CASES[case]
    changes = make_changes(tmp_path)
    method = changes.pop("method", None)
    cfg = _sail_config(tmp_path, **changes)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "launch/train.py", "--config", str(cfg), "--run-dir", str(run_dir)]
    if method:
        cmd += ["--set", f"method={method}"]
    proc = _run(cmd)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("Error: ") and expected.format(t=tmp_path) in lines[0], lines[0]
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


def test_console_script_reports_bad_input_the_same_way(tmp_path):
    """`sail train` (the console script's module) and `python launch/train.py` share the handling."""
    cfg = _sail_config(tmp_path, data__train=[str(tmp_path / "none-*.parquet")])
    proc = _run([sys.executable, "-m", "sail.launch.cli", "train", "--config", str(cfg),
                 "--run-dir", str(tmp_path / "run")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"Error: data.train: {tmp_path}/none-*.parquet matches no file"
    assert not (tmp_path / "run").exists()


def test_readme_smoke_run_from_a_clean_checkout(tmp_path):
    """README: `python launch/toy_data.py --out runs/toy_data` then `python launch/train.py
    --config tiny_sd15.json`. The toy data is built smaller here (same schema and folder)."""
    readme = (REPO / "README.md").read_text()
    assert "python launch/toy_data.py --out runs/toy_data" in readme
    assert "python launch/train.py --config tiny_sd15.json" in readme
    root = clean_copy(REPO, tmp_path / "checkout")
    assert not (root / "runs").exists()
    small = ["--set", "num_seed_prompts=4", "--set", "images_per_seed_prompt=4", "--set", "full_multiplier=1",
             "--set", "seed_pairs_per_prompt=3", "--set", "sampling.steps=2", "--no-progress"]
    proc = _run([sys.executable, "launch/toy_data.py", "--out", "runs/toy_data", *small], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run([sys.executable, "launch/train.py", "--config", "tiny_sd15.json"], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = root / "runs" / "tiny_sd15"
    metrics = json.loads((run / "iter_000" / "metrics.json").read_text())
    assert metrics["pairs"] == json.loads((run / "cache" / "seed" / "meta.json").read_text())["report"]["kept"] > 0
    assert (run / "iter_000" / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert "iter_000/train" in stages
    # a real (non-toy) model has no scorer yet: its evaluate stage is neither run nor recorded
    assert not any(key.endswith("/evaluate") for key in stages) and not (run / "iter_000" / "eval").exists()
