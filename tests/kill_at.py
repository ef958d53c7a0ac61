"""Run an entry point with a SIGKILL at a named point of engine/hooks.py (resume tests):

    python tests/kill_at.py POINT launch/train.py --config ...
    deepspeed --num_gpus 2 tests/kill_at.py POINT launch/train.py --config ...

POINT is a point's name, or NAME@STEP for the first time it is reached with that ``step``.
"""
import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sail.engine import hooks  # noqa: E402

# the deepspeed launcher puts --local_rank=N first; it belongs to the entry point
launcher = [a for a in sys.argv[1:] if a.startswith("--local_rank")]
point, script, *args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
args = launcher + args
name_, _, step_ = point.partition("@")


def _kill(name: str, info: dict) -> None:
    if name == name_ and (not step_ or info.get("step") == int(step_)):
        os.kill(os.getpid(), signal.SIGKILL)


hooks.install(_kill)
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
