"""The toy world: a tiny pixel-space text-to-image world with a programmatic "human".

world.py    prompts, renderer, ToyWorldConfig        vision.py   reading shapes back from pixels
model.py    tokenizer, text encoder, UNet, saving    oracle.py   the preference score, BT labels
pretrain.py pretraining of the shipped base model    metrics.py  fidelity, diversity
data.py     prompt splits, seed/full preference sets evaluate.py metrics.json + sample grid
scorers.py  scorers by name (oracle; learned scorers plug in later)

The trained base model ships in ``engine/toy/base_model/``; see docs/toy_world.md.
"""
