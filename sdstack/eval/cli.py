"""`sdstack eval`: generate every prompt of the shapes suites with a model (the built-in one by default), several
seeds each, score the images with the oracle and write a report (JSON + contact sheets) and a table. With
`--concept ring|crescent|outline --token sks` it scores a concept the world never shows instead (or as well, with
`--suite`): the share of images that show it in the prompted colour (sdstack.eval.concepts)."""

from __future__ import annotations

import click


def run_eval(model, suites, seeds: int, limit: int | None, out, gen: dict) -> list[dict]:
    """Generate and score; returns one summary per suite (see sdstack.eval.oracle.evaluate)."""
    from ..engine.generate import generate
    from ..models.loader import load_model
    from ..params import make_params
    from .oracle import evaluate
    from .report import save_report, write_json
    from .suites import Suite, get_suite

    path = _model_path(model)
    bundle = load_model(path)
    summaries = []
    for name in suites:
        suite = get_suite(name)
        if limit:
            suite = Suite(name, suite.prompts[:limit])
        images = []
        for spec in suite.prompts:
            p = make_params(prompt=spec.text, seed=0, batch_size=seeds, **gen)
            images.append(generate(bundle, p).images)
        summary = evaluate(images, suite)
        summary.update(model=str(path), settings=dict(gen, seeds=seeds))
        if out:
            save_report(summary, [im for ims in images for im in ims], out)
        summaries.append(summary)
    if out:
        write_json([{k: v for k, v in s.items() if k != "results"} for s in summaries], f"{out}/summary.json")
    return summaries


def run_concept_eval(model, concept: str, token: str, seeds: int, limit: int | None, out, gen: dict) -> dict:
    """Generate `limit` (default 100) concept prompts, `seeds` images each, and score them (see
    sdstack.eval.concepts.evaluate_concept); writes 'concept-<concept>.json' and '.png' into `out`."""
    from ..engine.generate import generate
    from ..models.loader import load_model
    from ..params import make_params
    from .concepts import concept_prompts, evaluate_concept
    from .report import save_report

    path = _model_path(model)
    bundle = load_model(path)
    prompts = concept_prompts(concept, token, n=limit or 100)
    images = [generate(bundle, make_params(prompt=p.prompt, seed=i * seeds, batch_size=seeds, **gen)).images
              for i, p in enumerate(prompts)]
    summary = evaluate_concept(images, concept, prompts)
    summary.update(model=str(path), settings=dict(gen, seeds=seeds, token=token))
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
def eval_command(model, suites, seeds, limit, out, steps, sampler_name, scheduler, cfg_scale, concept, token):
    """Score a model on the shapes benchmark suites with the oracle (GenEval-style), or on a new concept."""
    from .concepts import CONCEPTS
    from .report import format_overview, format_table, write_json
    from .suites import SUITE_NAMES

    if concept is not None and concept not in CONCEPTS:
        raise click.BadParameter(f"unknown concept {concept!r}; valid: {', '.join(CONCEPTS)}", param_hint="--concept")
    gen = {k: v for k, v in dict(steps=steps, sampler_name=sampler_name, scheduler=scheduler,
                                 cfg_scale=cfg_scale).items() if v is not None}
    summaries = []
    if suites or concept is None:
        summaries = run_eval(model, list(suites) or list(SUITE_NAMES), seeds, limit, out, gen)
    if concept is not None:
        summaries.append(run_concept_eval(model, concept, token, seeds, limit, out, gen))
        if out:
            write_json([{k: v for k, v in s.items() if k != "results"} for s in summaries], f"{out}/summary.json")
    for s in summaries:
        click.echo(format_table(s))
    click.echo(format_overview(summaries))


eval = eval_command  # the name the top-level CLI registers
