"""Run an entry point with a SIGKILL at a named point of engine/hooks.py (resume tests):

    python tests/kill_at.py POINT launch/train.py --config ...
    deepspeed --num_gpus 2 tests/kill_at.py POINT launch/train.py --config ...
"""
import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sail.engine import hooks  # noqa: E402

point, script, *args = sys.argv[1:]
hooks.install(lambda name, info: os.kill(os.getpid(), signal.SIGKILL) if name == point else None)
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
