"""`sdstack eval`: generate every prompt of the shapes suites with a model (the built-in one by default), several
seeds each, score the images with the oracle and write a report (JSON + contact sheets) and a table. With
`--concept ring|crescent|outline --token sks` it scores a concept the world never shows instead (or as well, with
`--suite`): the share of images that show it in the prompted colour (sdstack.eval.concepts).

`--lora FILE[:WEIGHT]` and `--embedding FILE` (both repeatable) score a fine-tuned result on its base model: every
prompt gets ` <lora:NAME:WEIGHT>` appended (the file linked into a private LoRA folder under its stem), and the
embeddings are offered to the prompts by file stem, exactly as `sdstack generate` would use them."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import click


@dataclass
class EvalNetworks:
    """LoRA files (with weights) and embedding files applied to every generated image of an evaluation."""

    loras: list[tuple[Path, float]] = field(default_factory=list)
    embeddings: list[Path] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.loras or self.embeddings)

    def settings(self) -> dict:
        """What a report's `settings` records (nothing when there are no networks)."""
        out = {}
        if self.loras:
            out["loras"] = [f"{p}:{w:g}" for p, w in self.loras]
        if self.embeddings:
            out["embeddings"] = [str(p) for p in self.embeddings]
        return out

    @contextlib.contextmanager
    def applied(self, bundle):
        """Yields (prompt suffix, generate() keyword arguments) with the files linked into a temporary folder;
        UserError (one line) for a LoRA that does not load or an embedding the model cannot use."""
        if not self:
            yield "", {}
            return
        tmp = Path(tempfile.mkdtemp(prefix="sdstack-eval-networks-"))
        try:
            yield self._prepare(bundle, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _prepare(self, bundle, tmp: Path) -> tuple[str, dict]:
        from ..errors import UserError
        from ..models.embeddings import EmbeddingLibrary
        from ..models.hashing import HashCache
        from ..models.lora import LoraLibrary

        kwargs, tags, names = {"hash_cache": HashCache(None)}, [], set()
        if self.loras:
            (tmp / "lora").mkdir()
            for path, weight in self.loras:
                name = _unique(re.sub(r"[^\w.-]", "_", path.stem), names)  # a name the <lora:...> tag can hold
                _link(path, tmp / "lora" / f"{name}{path.suffix.lower()}")
                tags.append(f"<lora:{name}:{weight:g}>")
            library = LoraLibrary(tmp / "lora", hash_cache=kwargs["hash_cache"])
            for name in names:
                library.load(name)  # a corrupt file fails here, before any image
            kwargs["lora_dir"] = tmp / "lora"
        if self.embeddings:
            (tmp / "embeddings").mkdir()
            for path in self.embeddings:
                target = tmp / "embeddings" / path.name
                if target.exists():
                    raise UserError(f"two --embedding files are both called {path.name!r}; an embedding is "
                                    "named by its file name, so rename one", field="embedding")
                _link(path, target)
            library = EmbeddingLibrary(tmp / "embeddings", bundle)
            for path in self.embeddings:
                if path.stem not in library.loaded:
                    why = library.skip_reasons.get(path.stem, "not loaded")
                    raise UserError(f"embedding {path}: {why}", field="embedding")
            kwargs["embeddings"] = library
        return "".join(" " + t for t in tags), kwargs


def _unique(name: str, taken: set) -> str:
    out, k = name, 1
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    taken.add(out)
    return out


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # no symlinks here (e.g. Windows without the right): a copy does the same
        shutil.copyfile(src, dst)


def parse_networks(loras, embeddings) -> EvalNetworks:
    """--lora FILE[:WEIGHT] and --embedding FILE values -> EvalNetworks; UserError (one line) for a missing file,
    a bad weight or a file type that is neither."""
    from ..errors import UserError
    from ..models.embeddings import EMBEDDING_EXTENSIONS
    from ..models.lora import LORA_EXTENSIONS

    nets = EvalNetworks()
    for text in loras or ():
        path, weight = Path(text), 1.0
        if not path.is_file() and ":" in text:
            head, _, tail = text.rpartition(":")
            try:
                path, weight = Path(head), float(tail)
            except ValueError:
                pass
        if not path.is_file():
            raise UserError(f"--lora: file not found: {path} (give FILE or FILE:WEIGHT)", field="lora")
        if path.suffix.lower() not in LORA_EXTENSIONS:
            raise UserError(f"--lora: {path} is not a LoRA file; use {', '.join(LORA_EXTENSIONS)}", field="lora")
        nets.loras.append((path, weight))
    for text in embeddings or ():
        path = Path(text)
        if not path.is_file():
            raise UserError(f"--embedding: file not found: {path}", field="embedding")
        if path.suffix.lower() not in EMBEDDING_EXTENSIONS:
            raise UserError(f"--embedding: {path} is not an embedding file; use "
                            f"{', '.join(EMBEDDING_EXTENSIONS)}", field="embedding")
        nets.embeddings.append(path)
    return nets


def run_eval(model, suites, seeds: int, limit: int | None, out, gen: dict,
             networks: EvalNetworks | None = None, device: str = "cpu") -> list[dict]:
    """Generate and score; returns one summary per suite (see sdstack.eval.oracle.evaluate). `networks` (LoRAs,
    embeddings) apply to every image."""
    from ..engine.generate import generate
    from ..models.loader import load_model
    from ..params import make_params
    from .oracle import evaluate
    from .report import save_report, write_json
    from .suites import Suite, get_suite

    networks = networks or EvalNetworks()
    path = _model_path(model)
    bundle = load_model(path, device=device)
    summaries = []
    with networks.applied(bundle) as (suffix, extra):
        for name in suites:
            suite = get_suite(name)
            if limit:
                suite = Suite(name, suite.prompts[:limit])
            images = []
            for spec in suite.prompts:
                p = make_params(prompt=spec.text + suffix, seed=0, batch_size=seeds, **gen)
                images.append(generate(bundle, p, **extra).images)
            summary = evaluate(images, suite)
            summary.update(model=str(path), settings=dict(gen, seeds=seeds, **networks.settings()))
            if out:
                save_report(summary, [im for ims in images for im in ims], out)
            summaries.append(summary)
    if out:
        write_json([{k: v for k, v in s.items() if k != "results"} for s in summaries], f"{out}/summary.json")
    return summaries


def run_concept_eval(model, concept: str, token: str, seeds: int, limit: int | None, out, gen: dict,
                     networks: EvalNetworks | None = None, device: str = "cpu") -> dict:
    """Generate `limit` (default 100) concept prompts, `seeds` images each, and score them (see
    sdstack.eval.concepts.evaluate_concept); writes 'concept-<concept>.json' and '.png' into `out`. `networks`
    (LoRAs, embeddings) apply to every image."""
    from ..engine.generate import generate
    from ..models.loader import load_model
    from ..params import make_params
    from .concepts import concept_prompts, evaluate_concept
    from .report import save_report

    networks = networks or EvalNetworks()
    path = _model_path(model)
    bundle = load_model(path, device=device)
    prompts = concept_prompts(concept, token, n=limit or 100)
    with networks.applied(bundle) as (suffix, extra):
        images = [generate(bundle, make_params(prompt=p.prompt + suffix, seed=i * seeds, batch_size=seeds, **gen),
                           **extra).images for i, p in enumerate(prompts)]
    summary = evaluate_concept(images, concept, prompts)
    summary.update(model=str(path), settings=dict(gen, seeds=seeds, token=token, **networks.settings()))
    if out:
        save_report(summary, [im for ims in images for im in ims], out)
    return summary


def _model_path(model):
    from ..errors import UserError
    from ..models.registry import builtin_model_path

    path = model or builtin_model_path()
    if path is None:
        raise UserError("no --model given and the built-in model is not installed", field="model")
    return path


@click.command("eval")
@click.option("--model", type=click.Path(exists=True), default=None, help="Model folder or file [default: built-in].")
@click.option("--suite", "suites", multiple=True, help="Suite(s) to run [default: all].")
@click.option("--seeds", type=int, default=4, show_default=True, help="Images per prompt (seeds 0..N-1).")
@click.option("--limit", type=int, default=None,
              help="Only the first N prompts of each suite (with --concept: N concept prompts [default: 100]).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Write JSON and contact sheets here.")
@click.option("--steps", type=int, default=None, help="Sampling steps [default: the generate default].")
@click.option("--sampler", "sampler_name", default=None, help="Sampler [default: the generate default].")
@click.option("--scheduler", default=None, help="Sigma schedule [default: the generate default].")
@click.option("--cfg", "cfg_scale", type=float, default=None, help="CFG scale [default: the generate default].")
@click.option("--concept", default=None, help="Score a concept the world never shows: ring, crescent or outline "
              "(the suites then run only if --suite is given).")
@click.option("--token", default="sks", show_default=True, help="The concept's trigger token in its prompts.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:WEIGHT]",
              help="Apply this LoRA file to every image (appends <lora:NAME:WEIGHT> to each prompt; weight 1 by "
              "default). Repeatable.")
@click.option("--embedding", "embeddings", multiple=True, metavar="FILE",
              help="Offer this textual-inversion embedding to the prompts (by its file name). Repeatable.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (checked before the model "
              "loads; the initial noise is drawn on the CPU either way).")
def eval_command(model, suites, seeds, limit, out, steps, sampler_name, scheduler, cfg_scale, concept, token, loras,
                 embeddings, device):
    """Score a model on the shapes benchmark suites with the oracle (GenEval-style), or on a new concept."""
    from .concepts import CONCEPTS
    from .report import format_overview, format_table, write_json
    from .suites import SUITE_NAMES

    if concept is not None and concept not in CONCEPTS:
        raise click.BadParameter(f"unknown concept {concept!r}; valid: {', '.join(CONCEPTS)}", param_hint="--concept")
    networks = parse_networks(loras, embeddings)
    gen = {k: v for k, v in dict(steps=steps, sampler_name=sampler_name, scheduler=scheduler,
                                 cfg_scale=cfg_scale).items() if v is not None}
    summaries = []
    if suites or concept is None:
        summaries = run_eval(model, list(suites) or list(SUITE_NAMES), seeds, limit, out, gen, networks, device)
    if concept is not None:
        summaries.append(run_concept_eval(model, concept, token, seeds, limit, out, gen, networks, device))
        if out:
            write_json([{k: v for k, v in s.items() if k != "results"} for s in summaries], f"{out}/summary.json")
    for s in summaries:
        click.echo(format_table(s))
    click.echo(format_overview(summaries))


eval = eval_command  # the name the top-level CLI registers
