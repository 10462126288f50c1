"""Implementations behind the CLI commands (kept out of cli.py so it stays a thin argument parser)."""

from __future__ import annotations

from pathlib import Path

import click

from .errors import UserError
from .paths import DataDir


def _load_for_cli(data: DataDir, opts: dict, facts: dict):
    import torch

    from .models.hashing import HashCache
    from .models.loader import load_model
    from .models.registry import resolve_checkpoint, resolve_from_infotext, resolve_vae

    cache = HashCache(data.hash_cache)
    if opts.get("model") or not facts:
        path = resolve_checkpoint(data, opts.get("model"), cache)
    else:
        path = resolve_from_infotext(data, facts, cache)
    vae = resolve_vae(data, opts.get("vae"))
    dtype = torch.bfloat16 if opts.get("bf16") else torch.float32
    return load_model(path, vae=vae, prediction_type=opts.get("prediction_type"), device=opts.get("device", "cpu"),
                      dtype=dtype, hash_cache=cache), cache


def _collect_params(prompt: str | None, opts: dict) -> tuple[dict, dict]:
    from .engine.infotext import params_from_infotext
    from .metadata.images import read_infotext
    from .params import PARAMS_BY_NAME

    values, facts = {}, {}
    if opts.get("from_image"):
        text = read_infotext(opts["from_image"])
        if not text:
            raise UserError(f"{opts['from_image']}: no generation parameters found in this image")
        values, facts = params_from_infotext(text)
    if prompt is not None:
        values["prompt"] = prompt
    for name in PARAMS_BY_NAME:
        if opts.get(name) is not None:
            values[name] = opts[name]
    hires_given = any(opts.get(k) is not None for k in ("hr_scale", "hr_second_pass_steps", "hires_strength",
                                                          "hires_upscaler"))
    if opts.get("hires_flag") or hires_given:
        values["enable_hr"] = True
    if opts.get("hires_strength") is not None:
        values["denoising_strength"] = opts["hires_strength"]
    if opts.get("hires_upscaler"):
        values["hr_upscaler"] = opts["hires_upscaler"]
    if "prompt" not in values:
        raise UserError("a PROMPT is required (or --from IMAGE)")
    return values, facts


def run_generate(prompt: str | None, opts: dict) -> None:
    from tqdm import tqdm

    from .engine.generate import generate
    from .models.embeddings import EmbeddingLibrary
    from .outputs import output_folder, save_images
    from .params import make_params

    data = DataDir.at(opts.get("data_dir"))
    values, facts = _collect_params(prompt, opts)
    params = make_params(**values)
    init = [opts["init_image"]] if opts.get("init_image") else None
    if init:
        from .engine.images import open_image

        init = [open_image(init[0])]
    bundle, cache = _load_for_cli(data, opts, facts)
    embeddings = EmbeddingLibrary(data.embeddings, bundle) if data.embeddings.is_dir() else None
    bar = tqdm(total=1, desc="sampling", unit="step", leave=False)

    def on_step(pr):
        bar.total = pr.total
        bar.update(pr.step - bar.n)

    try:
        result = generate(bundle, params, init_images=init, lora_dir=data.lora, embeddings=embeddings,
                          on_step=on_step, hash_cache=cache)
    finally:
        bar.close()
    out = Path(opts["out"]) if opts.get("out") else None
    paths = save_images(result.images, result.seeds, result.infotexts,
                        folder=output_folder(data.outputs, bool(init)), out=out)
    for p in paths:
        click.echo(str(p))


def run_info(image: str) -> None:
    from .metadata.images import read_infotext
    from .metadata.infotext import parse_infotext

    if not Path(image).is_file():
        raise UserError(f"image not found: {image}")
    text = read_infotext(image)
    if not text:
        raise UserError(f"{image}: no generation parameters found in this image")
    for key, value in parse_infotext(text).items():
        click.echo(f"{key}: {value}")


def run_models(data_dir: str | None, no_hash: bool) -> None:
    from .models.hashing import HashCache
    from .models.registry import builtin_model_path
    from .paths import checkpoint_title, list_checkpoints, list_vaes

    data = DataDir.at(data_dir)
    cache = HashCache(data.hash_cache)

    def short(p: Path) -> str | None:
        return None if no_hash or p.is_dir() else cache.sha256(p)[:10]

    builtin = builtin_model_path()
    click.echo(f"Checkpoints ({data.checkpoints}):")
    if builtin:
        click.echo(f"  {builtin.name} (built-in)")
    for p in list_checkpoints(data.checkpoints):
        click.echo(f"  {checkpoint_title(p, data.checkpoints, short(p))}")
    click.echo(f"VAEs ({data.vae}):")
    for p in list_vaes(data):
        click.echo(f"  {p.name} [{short(p)}]" if short(p) else f"  {p.name}")
    for title, folder, suffixes in (("LoRAs", data.lora, (".safetensors", ".pt", ".ckpt")),
                                    ("Embeddings", data.embeddings, (".safetensors", ".pt", ".bin"))):
        click.echo(f"{title} ({folder}):")
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in suffixes) if folder.is_dir() else []
        for f in files:
            h = None if no_hash else cache.sha256(f, "addnet" if f.suffix == ".safetensors" and title == "LoRAs"
                                                 else "sha256")[:12]
            click.echo(f"  {f.stem} [{h}]" if h else f"  {f.stem}")
