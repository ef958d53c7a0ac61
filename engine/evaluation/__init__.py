"""Evaluation of a model with the papers' learned scorers on the papers' prompt sets.

``scorers.py``: PickScore, HPSv2 / HPSv2.1, LAION aesthetic, CLIP score (local weights);
``prompts.py``: Pick-a-Pic v2 / PartiPrompts / HPSv2 benchmark files and the toy world's
held-out prompts; ``stats.py``: bootstrap intervals and win rates; ``harness.py``: generate
(data-parallel, resumable), score, and write ``scores.parquet``, ``table.md`` / ``table.json``,
sample grids and the plot over SAIL iterations. ``sail evaluate`` (launch/evaluate.py) and the
evaluate stage of a run both go through ``harness.evaluate_models``.
"""
