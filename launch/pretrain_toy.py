"""Pretrain the toy world's base model: ``python launch/pretrain_toy.py --out DIR --steps N``.

A one-off (the trained folder ships in engine/toy/base_model/); everything lives in
engine/toy/pretrain.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# Run as a script without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402


@click.command(context_settings={"show_default": True})
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@click.option("--steps", type=int, default=20000, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=128, help="Rendered images per step.")
@click.option("--lr", type=float, default=1e-3, help="Peak learning rate.")
@click.option("--warmup-steps", type=int, default=500, help="Linear warm-up steps.")
@click.option("--ema-decay", type=float, default=0.999, help="EMA decay of the saved weights.")
@click.option("--empty-prompt-prob", type=float, default=0.1, help="Classifier-free guidance dropout.")
@click.option("--max-loss-weight", type=float, default=30.0,
              help="Cap of the 1/abar_t timestep weight (v-loss for an epsilon model); 1 = plain epsilon loss.")
@click.option("--seed", type=int, default=0, help="Seed of everything.")
@click.option("--save-every", type=int, default=2000, help="Steps between saves of the EMA model.")
@click.option("--log-every", type=int, default=100, help="Steps between loss logs.")
@click.option("--unet-channels", default="16,32,64", help="UNet block widths, comma-separated.")
@click.option("--text-hidden", type=int, default=64, help="Text encoder width.")
@click.option("--init-from", default=None, type=click.Path(file_okay=False, exists=True),
              help="Continue from this toy model folder's weights (fresh optimizer and lr schedule).")
@click.option("--freeze-text-encoder", is_flag=True, help="Keep the text encoder at its random initialisation.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(out, steps, batch_size, lr, warmup_steps, ema_decay, empty_prompt_prob, max_loss_weight, seed, save_every, log_every,
         unet_channels, text_hidden, init_from, freeze_text_encoder, threads, quiet):
    """Pretrain the toy base model on rendered images and write a diffusers-format folder."""
    from sail.launch.entry import process_defaults, user_input_errors

    process_defaults(threads)
    from sail.engine.toy.model import ToyModelSpec
    from sail.engine.toy.pretrain import PretrainConfig, pretrain

    with user_input_errors(ValueError):   # the dataclasses validate their fields with ValueError
        spec = ToyModelSpec(unet_channels=tuple(int(c) for c in unet_channels.split(",")), text_hidden=text_hidden)
        cfg = PretrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(warmup_steps, steps),
                             ema_decay=ema_decay, empty_prompt_prob=empty_prompt_prob, seed=seed,
                             max_loss_weight=max_loss_weight,
                             save_every=save_every, log_every=min(log_every, steps),
                             train_text_encoder=not freeze_text_encoder, spec=spec, init_from=init_from)
    record = pretrain(cfg, out, progress=not quiet)
    last = record["losses"][-1] if record["losses"] else {}
    click.echo(json.dumps({"out": str(out), "steps": record.get("steps_done"), "duration_s": record.get("duration_s"),
                           "unet_parameters": record["unet_parameters"], "final_loss": last.get("loss")}))


if __name__ == "__main__":
    main()
