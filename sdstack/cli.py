"""The `sdstack` command: thin; parses arguments, calls the library, prints. Options come from params.PARAMS."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import UserError
from .params import PARAMS


def _param_options(f):
    """Add one click option per PARAMS entry that has a CLI flag (default None = 'not given')."""
    for p in reversed([p for p in PARAMS if p.cli]):
        kind = {int: int, float: float, str: str}[p.type]
        f = click.option(p.cli, p.name, type=kind, default=None, help=f"{p.help} [default: {p.default!r}]")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sdstack")
def cli():
    """sdstack: local-first Stable Diffusion (A1111-compatible parameters, prompts and metadata)."""


@cli.command()
@click.argument("prompt", required=False)
@_param_options
@click.option("--model", help="Checkpoint: a path, a diffusers folder, or a name in models/Stable-diffusion.")
@click.option("--vae", help="Separate VAE: a path or a name in models/VAE.")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default=None,
              help="Override the model's prediction type (SD 2.x 768-v models use v_prediction).")
@click.option("--init-image", type=click.Path(dir_okay=False), help="img2img: start from this image.")
@click.option("--hires-strength", type=float, default=None, help="Hires fix denoising strength (enables hires fix).")
@click.option("--hires", "hires_flag", is_flag=True, help="Enable hires fix (also enabled by any --hires-* option).")
@click.option("--hires-upscaler", default=None, help="Latent upscale mode for hires fix [default: Latent].")
@click.option("--from", "from_image", type=click.Path(dir_okay=False), help="Regenerate from an image's infotext.")
@click.option("--out", type=click.Path(), help="Output file (.png/.jpg/.webp) or folder.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder in A1111's layout [default: .]")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--bf16", is_flag=True, help="bfloat16 weights and compute (fast on CPUs with AVX-512 bf16 / GPUs).")
def generate(prompt, **opts):
    """Generate images from PROMPT (txt2img; img2img with --init-image)."""
    from .commands import run_generate

    run_generate(prompt, opts)


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
def info(image):
    """Print the generation parameters stored in IMAGE."""
    from .commands import run_info

    run_info(image)


@cli.command()
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder in A1111's layout [default: .]")
@click.option("--no-hash", is_flag=True, help="Do not compute hashes of files not hashed before.")
def models(data_dir, no_hash):
    """List checkpoints, VAEs, LoRAs and embeddings in the data folder, with hashes."""
    from .commands import run_models

    run_models(data_dir, no_hash)


def _register_optional_groups() -> None:
    """Command groups that live with their layer (e.g. `sdstack train` in sdstack/train/cli.py)."""
    try:
        from .train.cli import finetune, train
    except ImportError:
        pass
    else:
        cli.add_command(train)
        cli.add_command(finetune)
    try:
        from .server.cli import serve
    except ImportError:
        pass
    else:
        cli.add_command(serve)
    try:
        from .eval.cli import eval_command
    except ImportError:
        pass
    else:
        cli.add_command(eval_command)


_register_optional_groups()


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="sdstack", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


__all__ = ["main", "cli", "Path"]
