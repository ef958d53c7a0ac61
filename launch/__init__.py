"""Entry points: launch/train.py (python or deepspeed), the `sail` click CLI, tools."""
