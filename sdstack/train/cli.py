"""`sdstack train ...`: thin click commands over sdstack.train (heavy imports inside the functions)."""

from __future__ import annotations

import click

_CONFIG = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                       help="TOML config file (optional with --resume: the checkpoint's own config is used).")
_RESUME = click.option("--resume", type=click.Path(), default=None,
                       help="Continue from a checkpoint folder, or from a run folder's latest checkpoint.")
_OUT = click.option("--out", type=click.Path(file_okay=False), default=None,
                    help="Run folder (overrides run.out): checkpoints, samples, loss curve, the final model.")
_STOP = click.option("--stop-at", type=int, default=None,
                     help="Stop (with a checkpoint) after this step, without changing the schedule.")


def _load(config_path, resume, out, cls):
    from ..errors import UserError
    from .checkpoint import find_checkpoint
    from .config import load_config

    if config_path is None:
        if resume is None:
            raise UserError("give --config C.toml (or --resume RUN to continue with the run's own config)",
                            field="config")
        config_path = find_checkpoint(resume) / "config.toml"
    cfg = load_config(config_path, cls)
    if out is not None:
        cfg.run.out = str(out)
    return cfg


def _report(result: dict) -> None:
    if not result.get("main_process", True):
        return
    click.echo(f"stopped at step {result['step']}" if result.get("stopped") else f"step {result['step']}")
    if result.get("loss") is not None:
        click.echo(f"last loss {result['loss']:.5f}, {result['images_per_second']:.1f} images/s")
    if result.get("model"):
        click.echo(f"model written to {result['model']}")


@click.group()
def train():
    """Train models from scratch on the shapes world or a folder of captioned images."""


@train.command()
@_CONFIG
@_RESUME
@_OUT
@_STOP
def autoencoder(config_path, resume, out, stop_at):
    """Train an AutoencoderKL (the VAE)."""
    from .autoencoder import train_autoencoder
    from .config import AutoencoderConfig

    cfg = _load(config_path, resume, out, AutoencoderConfig)
    _report(train_autoencoder(cfg, resume=resume, stop_at=stop_at))


@train.command()
@_CONFIG
@_RESUME
@_OUT
@_STOP
def text2image(config_path, resume, out, stop_at):
    """Train a text-to-image UNet and its CLIP text encoder on a trained, frozen VAE."""
    from .config import Text2ImageConfig
    from .text2image import train_text2image

    cfg = _load(config_path, resume, out, Text2ImageConfig)
    _report(train_text2image(cfg, resume=resume, stop_at=stop_at))


@train.command("check-vae")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--resolution", type=int, default=64, show_default=True)
@click.option("--per-suite", type=int, default=None, help="Only the first N prompts of each suite.")
@click.option("--min-score", type=float, default=0.98, show_default=True,
              help="Exit with status 1 unless every suite scores at least this.")
def check_vae(folder, resolution, per_suite, min_score):
    """Score a VAE's encode-decode round trip of the shapes suites with the oracle."""
    from .vae_check import check_vae_folder

    scores = check_vae_folder(folder, resolution=resolution, per_suite=per_suite)
    for name, s in scores.items():
        click.echo(f"{name:<14}{s:>8.1%}")
    if min(scores.values()) < min_score:
        click.echo(f"below {min_score:.0%} on at least one suite")
        raise SystemExit(1)


@train.command("export")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--fp16/--fp32", default=True, show_default=True)
@click.option("--vae", type=click.Path(exists=True, file_okay=False), default=None,
              help="Use this VAE's decoder (same encoder as in training, e.g. after decoder fine-tuning).")
@click.option("--no-ema", is_flag=True, help="From a checkpoint: the training weights, not the EMA ones.")
def export(source, dest, fp16, vae, no_ema):
    """Write a text2image model to DEST: from a finished run, or from a run's latest checkpoint (EMA weights)."""
    from .text2image import export_model

    click.echo(f"written {export_model(source, dest, fp16=fp16, vae=vae, use_ema=not no_ema)}")
