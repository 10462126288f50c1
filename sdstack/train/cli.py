"""`sdstack train ...`: thin click commands over sdstack.train (heavy imports inside the functions)."""

from __future__ import annotations

from pathlib import Path

import click

_CONFIG = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                       help="TOML config file (optional with --resume: the checkpoint's own config is used).")
_RESUME = click.option("--resume", type=click.Path(), default=None,
                       help="Continue from a checkpoint folder, or from a run folder's latest checkpoint.")
_OUT = click.option("--out", type=click.Path(file_okay=False), default=None,
                    help="Run folder (overrides run.out): checkpoints, samples, loss curve, the final model.")
_STOP = click.option("--stop-at", type=int, default=None,
                     help="Stop (with a checkpoint) after this step, without changing the schedule.")


def _load(config_path, resume, out, cls, sets=()):
    """The run's config: the TOML file (or the checkpoint's with --resume alone), then --set KEY=VALUE."""
    from ..errors import UserError
    from .config import from_dict, validate

    if config_path is None and resume is None:
        raise UserError("give --config C.toml (or --resume RUN to continue with the run's own config)",
                        field="config")
    raw = _raw_config(config_path, resume)
    if out is not None:
        _set(raw, "run.out", str(out))
    _apply_sets(raw, sets)
    cfg = from_dict(cls, raw)
    validate(cfg)
    return cfg


def _raw_config(config_path, resume) -> dict:
    """The TOML table of --config, else of the --resume checkpoint, else empty."""
    from ..tomlio import read_toml
    from .checkpoint import find_checkpoint

    if config_path is None and resume is not None:
        config_path = find_checkpoint(resume) / "config.toml"
    return read_toml(config_path, "config file", "config") if config_path else {}


def _apply_sets(raw: dict, sets) -> None:
    from ..errors import UserError

    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set takes KEY=VALUE (e.g. optim.lr=1e-4), got {item!r}", field="set")
        _set(raw, key.strip(), _parse_value(value.strip()))


_SET = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                    help="Any config key over the file's, e.g. --set optim.lr=1e-4 --set run.grad_accum=4.")


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
@_SET
def autoencoder(config_path, resume, out, stop_at, sets):
    """Train an AutoencoderKL (the VAE)."""
    from .autoencoder import train_autoencoder
    from .config import AutoencoderConfig

    cfg = _load(config_path, resume, out, AutoencoderConfig, sets)
    _report(train_autoencoder(cfg, resume=resume, stop_at=stop_at))


@train.command()
@_CONFIG
@_RESUME
@_OUT
@_STOP
@_SET
def text2image(config_path, resume, out, stop_at, sets):
    """Train a text-to-image UNet and its CLIP text encoder on a trained, frozen VAE."""
    from .config import Text2ImageConfig
    from .text2image import train_text2image

    cfg = _load(config_path, resume, out, Text2ImageConfig, sets)
    _report(train_text2image(cfg, resume=resume, stop_at=stop_at))


@train.command("check-vae")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--resolution", type=int, default=64, show_default=True)
@click.option("--per-suite", type=int, default=None, help="Only the first N prompts of each suite.")
@click.option("--min-score", type=float, default=0.98, show_default=True,
              help="Exit with status 1 unless every suite scores at least this.")
@click.option("--concept", "concepts", multiple=True, metavar="NAME",
              help="Also report the round trip of 88 images of a concept the world never shows (ring, crescent, "
                   "outline): the ceiling of what fine-tuning can teach through this VAE. Repeatable; not gated.")
def check_vae(folder, resolution, per_suite, min_score, concepts):
    """Score a VAE's encode-decode round trip of the shapes suites with the oracle."""
    from ..errors import UserError
    from ..eval.concepts import CONCEPTS
    from .vae_check import concept_round_trip, load_vae_folder, oracle_round_trip

    for c in concepts:
        if c not in CONCEPTS:
            raise UserError(f"--concept: unknown concept {c!r}; valid: {', '.join(CONCEPTS)}", field="concept")
    vae = load_vae_folder(folder)
    scores = oracle_round_trip(vae, per_suite=per_suite, resolution=resolution)
    for name, s in scores.items():
        click.echo(f"{name:<14}{s:>8.1%}")
    for c in concepts:
        source, decoded = concept_round_trip(vae, c, resolution=resolution)
        click.echo(f"concept {c:<8}{decoded:>6.1%} of 88 images (the renders themselves: {source:.1%})")
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


@train.command("trim-vocab")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--keep", type=int, default=10000, show_default=True,
              help="CLIP's first N merges to keep (common English words and pieces), besides those the texts need.")
@click.option("--world", is_flag=True, help="Keep every word of the shapes world (captions, eval and concept prompts).")
@click.option("--text", "text_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Keep every word of this file's lines (e.g. your training captions); repeatable.")
def trim_vocab(source, dest, keep, world, text_files):
    """Write SOURCE to DEST with its text-encoder vocabulary trimmed: the kept words tokenize and encode exactly as
    before, other text splits into shorter known pieces, and the token table holds only the kept rows."""
    from ..models.trim_vocab import trim_model_vocabulary, world_texts

    texts = world_texts() if world else []
    for f in text_files:
        texts += Path(f).read_text(encoding="utf-8", errors="replace").splitlines()
    r = trim_model_vocabulary(source, dest, keep=keep, texts=texts)
    click.echo(f"written {dest}: {r['tokens_before']} -> {r['tokens_after']} tokens, token table "
               f"{r['bytes_before'] / 1e6:.1f} -> {r['bytes_after'] / 1e6:.1f} MB ({r['texts']} texts checked)")


# ---------------------------------------------------------------------------------------------- finetune

_FLAGS = {  # flag -> config key (dotted)
    "model": "model", "vae": "vae", "data": "data.train_data_dir", "dataset": "data.dataset",
    "resolution": "data.resolution", "steps": "run.max_steps", "batch_size": "run.batch_size",
    "lr": "optim.lr", "seed": "run.seed", "output_name": "output_name", "rank": "lora.rank", "alpha": "lora.alpha",
    "token": "textual_inversion.token", "init_word": "textual_inversion.init_word",
    "num_vectors": "textual_inversion.num_vectors", "instance_prompt": "dreambooth.instance_prompt",
    "class_prompt": "dreambooth.class_prompt", "num_class_images": "dreambooth.num_class_images",
}


def _set(raw: dict, dotted: str, value) -> None:
    *tables, key = dotted.split(".")
    for t in tables:
        raw = raw.setdefault(t, {})
    raw[key] = value


def _parse_value(text: str):
    """A --set value as TOML reads it (numbers, booleans, quoted strings, lists); bare words are strings."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def finetune_config(method: str, config_path, resume, out, flags: dict, sets: tuple[str, ...]):
    """The run's config: the TOML file (or the checkpoint's), then the flags, then --set KEY=VALUE."""
    from .config import from_dict
    from .finetune_config import FinetuneConfig

    raw = _raw_config(config_path, resume)
    raw["method"] = method
    for name, value in flags.items():
        if isinstance(value, tuple):  # a repeatable flag: absent when not given, one value as itself
            value = None if not value else value[0] if len(value) == 1 else list(value)
        if value is not None:
            _set(raw, _FLAGS[name], value)
    if out is not None:
        _set(raw, "run.out", str(out))
    _apply_sets(raw, sets)
    raw.setdefault("run", {}).setdefault("out", f"runs/{method.replace('_', '-')}")
    cfg = from_dict(FinetuneConfig, raw)
    cfg.check()
    return cfg


def _finetune_command(method: str, doc: str):
    @click.command(name=method.replace("_", "-"), help=doc)
    @_CONFIG
    @_RESUME
    @_OUT
    @_STOP
    @click.option("--model", default=None, help="Base model: diffusers folder or single file (default: built-in).")
    @click.option("--vae", default=None, help="A separate VAE for the base model.")
    @click.option("--data", default=None, help="Image folder: images + same-name captions, or N_name sub-folders.")
    @click.option("--dataset", default=None, help="A kohya dataset TOML instead of --data.")
    @click.option("--resolution", type=int, default=None, help="Training resolution (default: the model's).")
    @click.option("--steps", type=int, default=None, help="Optimizer steps (run.max_steps).")
    @click.option("--batch-size", type=int, default=None)
    @click.option("--lr", type=float, default=None, help="Learning rate.")
    @click.option("--seed", type=int, default=None)
    @click.option("--output-name", default=None, help="File name of the result (default: the run folder's name).")
    @click.option("--rank", type=int, default=None, help="LoRA rank.")
    @click.option("--alpha", type=float, default=None, help="LoRA alpha (scale alpha / rank).")
    @click.option("--token", default=None, help="Textual inversion: the new word (and embedding file name). With "
                  "lora, dreambooth or full: a new word whose vectors train with the model (pivotal tuning).")
    @click.option("--init-word", default=None, help="Textual inversion: start from this word's embedding.")
    @click.option("--num-vectors", type=int, default=None, help="Textual inversion: vectors per token.")
    @click.option("--instance-prompt", default=None, help="DreamBooth: caption of images without one.")
    @click.option("--class-prompt", multiple=True, help="Prior preservation (dreambooth, lora, full): prompt of the "
                  "class images; repeat it for several (taken in turn).")
    @click.option("--num-class-images", type=int, default=None,
                  help="Prior preservation (dreambooth, lora, full): how many class images (0 = none).")
    @_SET
    def command(config_path, resume, out, stop_at, sets, **flags):
        from .finetune import finetune

        cfg = finetune_config(method, config_path, resume, out, flags, sets)
        for line in cfg.ignored_settings():
            click.echo(line, err=True)
        _report(finetune(cfg, resume=resume, stop_at=stop_at))

    return command


@click.group()
def finetune():
    """Fine-tune a model on your own images: LoRA, DreamBooth, textual inversion or the full model."""


for _method, _doc in (
        ("lora", "Train a LoRA (kohya .safetensors, read by A1111, ComfyUI, diffusers and <lora:name:w>)."),
        ("dreambooth", "DreamBooth: fine-tune the UNet on a subject, with optional prior preservation."),
        ("textual_inversion", "Textual inversion: learn a new word's embedding (A1111 embedding file)."),
        ("full", "Fine-tune the whole UNet (and optionally the text encoder); diffusers folder + single file.")):
    finetune.add_command(_finetune_command(_method, _doc))
