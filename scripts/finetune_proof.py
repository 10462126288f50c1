"""Proof that fine-tuning works on the built-in model (issue 5): teach shapes-v1 a concept its world never shows,
from 10 images, with each method, and measure it with the oracle.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/finetune_proof.py                     # all 8 runs, built-in model
    OMP_NUM_THREADS=1 .venv/bin/python scripts/finetune_proof.py --model /tmp/cand --methods lora --concepts ring \
        --limit 22 --single-limit 22 --out runs/finetune-proof-dev                  # one quick run

For each concept (ring: a new shape; outline: a style) and each method (lora, dreambooth, textual_inversion,
full):
1. data: `concept_dataset(concept, OUT/data/<concept>, n=10, seed=DATA_SEED, token=TOKEN)` (--data-seed, 0 by
   default): 10 images with captions that carry the trigger TOKEN ("a red zwx ring on a white background",
   "zwx style, a blue star and a red heart"). TOKEN is one new word, not in the CLIP vocabulary (textual inversion
   refuses known words), the same for every method;
2. training: `sdstack finetune <method> --config configs/finetune-proof/<method>[-<concept>].toml --model M --data DIR
   --out OUT/runs/<method>-<concept>` in a subprocess (a clean process per run), plus what depends on the concept:
   DreamBooth's --class-prompt (CLASS_PROMPTS) and textual inversion's --token and --init-word (INIT_WORDS).
   Recorded: wall time (model loading, class images and export included) and the trainer's own images/s
   ("last loss ..., N images/s");
3. measurement, `sdstack eval` subprocesses on the trained result (`--model` for dreambooth and full, the base
   `--model` plus `--lora` / `--embedding` for lora and textual inversion), default sampling settings:
     concept share  `--concept C --token TOKEN --limit LIMIT`: the share of images that show the concept in the
                    prompted colour (and, for information, in any colour);
     single score   `--suite single --limit SINGLE_LIMIT` (prompts without the token, the LoRA applied): the
                    oracle's accuracy, against the base model's on the same prompts and seeds (one more eval).
                    The suite lists every colour-shape pair first, colour by colour, so the default 70 prompts
                    hold each pair once; a smaller limit leaves colours out.
   Goals: concept share >= 80%, retention (single score / base score) >= 95%.

Prior preservation (DreamBooth's, and kohya's regularisation images for LoRA and full fine-tuning, where a
recipe sets `dreambooth.num_class_images`) uses class images the base model draws from class prompts (`--prior`):
  shapes    the world's seven shapes without a colour ("a circle", "a square", ...), taken in turn;
  captions  the 10 instance captions without the trigger ("a red zwx ring on a white background" -> "a red circle
            on a white background", "zwx style, a blue star and a red heart" -> "a blue star and a red heart"):
            DreamBooth's "a [class noun]" pairs, so that the only difference the token must explain is the
            concept;
  mixed     those 10 plus --prior-world (40) captions of the shapes world's train split (seed PRIOR_WORLD_SEED),
            which anchor the look of ordinary prompts (the `single` suite's colours, shapes and backgrounds), that
            a few images of one new shape or style otherwise pull towards themselves.
With captions or mixed, one class image per prompt. kohya balancing draws as many class images per epoch as
instance images, so `--repeats N` (the 10 images in an `N_TOKEN` folder) lets 10 x N class images take part.
The base model's share on the concept prompts (untaught: the oracle's false positives plus chance) is measured
too and printed above the table.

Writes OUT/proof.md (the table) and OUT/proof.json (every number, the commands and settings); prints the table.
Exit status 0 even when a goal is missed (the table says which); 1 if a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdstack.eval.concepts import CONCEPTS  # noqa: E402  (the concepts the oracle reads)

METHODS = ("lora", "dreambooth", "textual_inversion", "full")
DEFAULT_CONCEPTS = ("ring", "outline")  # the proof; the crescent (`--concepts crescent`) only on request
TOKEN = "zwx"  # tokenizes to 'z' + 'wx</w>': not a CLIP word, and no word of the shapes world
# prior preservation (module docstring): the world's seven shapes, the circle (nearest the ring) first
WORLD_CLASS = ("a circle", "a square", "a triangle", "a star", "a hexagon", "a heart", "a cross")
CLASS_PROMPTS = {"ring": WORLD_CLASS, "outline": WORLD_CLASS, "crescent": WORLD_CLASS}
# textual inversion: the new word's vectors start from this word
INIT_WORDS = {"ring": "circle", "outline": "*", "crescent": "circle"}
PRIOR_WORLD_SEED = 7  # --prior mixed: world captions from this seed (the eval suites are fixed prompt lists)
REPEATS = 5  # kohya repeats of the 10 images (--repeats)
CONCEPT_GOAL = 0.80
RETENTION_GOAL = 0.95
IMAGES_PER_SECOND = re.compile(r"last loss [-+0-9.einf]+, ([0-9.]+) images/s")
WRITTEN = re.compile(r"model written to (.+)$", re.MULTILINE)


def _sdstack(args: list[str], log: Path, threads: int) -> tuple[str, float]:
    """Run `sdstack ARGS` in a fresh process; returns (its output, wall seconds). The output goes to `log` as it
    comes (a run killed half-way leaves its progress there)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "sdstack", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ sdstack " + shlex.join(args), flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    output = log.read_text(encoding="utf-8", errors="replace").split("\n", 1)[1]
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise RuntimeError(f"sdstack {args[0]} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return output, seconds


def _eval_args(opts, limit: int) -> list[str]:
    args = ["--limit", str(limit), "--seeds", str(opts.seeds)]
    for flag, value in (("--steps", opts.steps), ("--sampler", opts.sampler), ("--scheduler", opts.scheduler),
                        ("--cfg", opts.cfg), ("--device", opts.device)):
        if value is not None:
            args += [flag, str(value)]
    return args


def _summary(out_dir: Path, suite: str) -> dict:
    return json.loads((out_dir / f"{suite}.json").read_text())


def check_token(token: str) -> None:
    from sdstack.models.tokenizer import ClipTokenizer

    if f"{token.lower()}</w>" in ClipTokenizer().encoder:
        raise SystemExit(f"--token {token!r} is a CLIP word; textual inversion needs a new one (e.g. {token}x)")
    if not re.fullmatch(r"[a-z]+", token):
        raise SystemExit(f"--token {token!r}: use lower-case letters only")


def caption_class_prompt(caption: str, concept: str, token: str) -> str:
    """The class prompt of one instance caption (`--prior captions`): the same words without the trigger, the
    ring or crescent named as the world shape nearest it ("a red zwx ring on a white background" -> "a red circle on
    a white background"; "zwx style, a pink circle and a red star" -> "a pink circle and a red star")."""
    if concept in ("ring", "crescent"):
        text = caption.replace(f"{token} {concept}", "circle")
    else:
        text = caption.replace(f"{token} style, ", "")
    if token in text.split():
        raise ValueError(f"caption {caption!r} keeps the token {token!r} after removal")
    return text


def class_prompts(opts, concept: str, data: Path) -> list[str]:
    """The class prompts of a prior-preservation run: the world's shape names (`--prior shapes`) or the instance
    captions without the trigger (`--prior captions`), in the order of the image files."""
    if opts.prior == "shapes":
        return list(CLASS_PROMPTS[concept])
    captions = sorted(data.glob("*/*.txt"))
    prompts = [caption_class_prompt(p.read_text(encoding="utf-8").strip(), concept, opts.token) for p in captions]
    if opts.prior == "mixed":
        from sdstack.data.shapes import ShapesWorld

        world = ShapesWorld(64, seed=PRIOR_WORLD_SEED, split="train")
        prompts += [world.spec(i)[0].text for i in range(opts.prior_world)]
    return prompts


def recipe(opts, method: str, concept: str) -> Path:
    """The method's recipe for this concept: `<method>-<concept>.toml` where the folder has one (a style may need
    other settings than a new shape), else `<method>.toml`."""
    own = opts.configs / f"{method}-{concept}.toml"
    return own if own.is_file() else opts.configs / f"{method}.toml"


def train(opts, method: str, concept: str, data: Path) -> dict:
    """One fine-tune run in a subprocess: the result's path, wall time and the trainer's images/s."""
    name = f"{method.replace('_', '-')}-{concept}" + (f"-{opts.tag.lstrip('-')}" if opts.tag else "")
    run_dir = opts.out / "runs" / name
    from sdstack.tomlio import read_toml

    config = recipe(opts, method, concept)
    args = ["finetune", method.replace("_", "-"), "--config", str(config), "--data", str(data), "--out", str(run_dir)]
    if opts.model:
        args += ["--model", str(opts.model)]
    if method == "textual_inversion":
        args += ["--token", opts.token, "--init-word", INIT_WORDS[concept]]
    elif "textual_inversion" in read_toml(config, "recipe", "config"):
        args += ["--token", opts.token]  # pivotal tuning: the recipe trains the token's vectors with the model
    from sdstack.train.finetune_config import PRIOR_METHODS  # they take class images when their config asks

    if method in PRIOR_METHODS:
        prompts = class_prompts(opts, concept, data)
        for prompt in prompts:
            args += ["--class-prompt", prompt]
        if opts.prior != "shapes":  # one class image per prompt
            args += ["--num-class-images", str(len(prompts))]
    for item in opts.set:
        args += ["--set", item]
    output, seconds = _sdstack(args, opts.out / "logs" / f"train-{name}.log", opts.threads)
    ips = IMAGES_PER_SECOND.search(output)
    written = WRITTEN.search(output)
    if written is None:
        raise RuntimeError(f"no 'model written to' line in the output of {name}")
    return {"run": name, "result": written.group(1).strip(), "train_seconds": round(seconds, 1),
            "images_per_second": float(ips.group(1)) if ips else None, "command": "sdstack " + shlex.join(args)}


def _result_args(opts, method: str | None, result: str | None) -> list[str]:
    """The `sdstack eval` arguments that select a trained result (the base model for method None)."""
    if method in ("dreambooth", "full"):
        pivotal = Path(result).parent / "embeddings" / f"{opts.token}.safetensors"  # the token trained with it
        return ["--model", str(result)] + (["--embedding", str(pivotal)] if pivotal.is_file() else [])
    args = ["--model", str(opts.model)] if opts.model else []
    if method == "lora":
        args += ["--lora", str(result)]
    elif method == "textual_inversion":
        args += ["--embedding", str(result)]
    return args


def _same_eval(saved: str | None, command: str) -> bool:
    """Whether a saved base-model eval ran this command, wherever its output went (a copied eval folder counts)."""
    def key(cmd: str) -> list[str]:
        words = shlex.split(cmd)
        i = words.index("--out") if "--out" in words else -1
        return words[:i] + words[i + 2:] if i >= 0 else words
    return saved is not None and key(saved) == key(command)


def eval_single(opts, name: str, method: str | None = None, result: str | None = None) -> dict:
    """The `single` suite (prompts without the token) on a trained result, or on the base model (method None;
    reused from an earlier run with the same command)."""
    out_dir = opts.out / "eval" / name
    args = ["eval", "--suite", "single", "--out", str(out_dir), *_eval_args(opts, opts.single_limit),
            *_result_args(opts, method, result)]
    command = "sdstack " + shlex.join(args)
    saved = out_dir / "row.json"
    if method is None and saved.is_file() and _same_eval(json.loads(saved.read_text()).get("single_command"), command):
        print(f"base model's single score from {out_dir} (same command)", flush=True)
        return json.loads(saved.read_text())
    _, seconds = _sdstack(args, opts.out / "logs" / f"eval-single-{name}.log", opts.threads)
    row = {"single": _summary(out_dir, "single")["accuracy"], "single_seconds": round(seconds, 1),
           "single_command": command}
    saved.write_text(json.dumps(row))
    return row


def eval_concept(opts, name: str, concept: str, method: str | None, result: str | None) -> dict:
    """The concept's prompts with the token: the share of images that show the concept in the prompted colour."""
    out_dir = opts.out / "eval" / name
    args = ["eval", "--concept", concept, "--token", opts.token, "--out", str(out_dir),
            *_eval_args(opts, opts.limit), *_result_args(opts, method, result)]
    command = "sdstack " + shlex.join(args)
    saved = out_dir / "row.json"
    if method is None and saved.is_file() and _same_eval(json.loads(saved.read_text()).get("concept_command"), command):
        print(f"base model's {concept} share from {out_dir} (same command)", flush=True)
        return json.loads(saved.read_text())
    _, seconds = _sdstack(args, opts.out / "logs" / f"eval-concept-{name}.log", opts.threads)
    found = _summary(out_dir, f"concept-{concept}")
    row = {"concept_share": found["accuracy"], "concept_any_colour": found["claims"]["concept"],
           "concept_seconds": round(seconds, 1), "concept_command": command}
    if method is None:
        saved.write_text(json.dumps(row))
    return row


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(rows: list[dict], base: float) -> str:
    lines = ["| method | concept | concept share (goal >= 80%) | concept, any colour | single score "
             f"(base {_pct(base)}) | retention (goal >= 95%) | train time | img/s | concept goal | retention goal |",
             "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['method']} | {r['concept']} | {_pct(r['concept_share'])} | "
                     f"{_pct(r['concept_any_colour'])} | {_pct(r['single'])} | {_pct(r['retention'])} | "
                     f"{r['train_seconds']:.0f} s | {r['images_per_second'] or 0:.1f} | "
                     f"{'pass' if r['concept_pass'] else 'FAIL'} | {'pass' if r['retention_pass'] else 'FAIL'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="Base model folder or file [default: built-in].")
    ap.add_argument("--concepts", default=",".join(DEFAULT_CONCEPTS),
                    help=f"Comma-separated: {', '.join(CONCEPTS)} [default: {','.join(DEFAULT_CONCEPTS)}].")
    ap.add_argument("--methods", default=",".join(METHODS), help="Comma-separated: " + ", ".join(METHODS) + ".")
    ap.add_argument("--limit", type=int, default=44, help="Concept prompts per eval (11 colours in turn).")
    ap.add_argument("--single-limit", type=int, default=70,
                    help="The first N prompts of the single suite (the first 70 hold every colour-shape pair once).")
    ap.add_argument("--seeds", type=int, default=1, help="Images per prompt.")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune-proof", help="Output folder.")
    ap.add_argument("--token", default=TOKEN, help="The trigger word (not a CLIP word).")
    ap.add_argument("--configs", type=Path, default=ROOT / "configs" / "finetune-proof", help="Recipe folder.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every subprocess.")
    ap.add_argument("--repeats", type=int, default=REPEATS,
                    help="The 10 images go in a kohya `N_name` folder with N = this (an epoch = 10 x N draws; with "
                         "prior preservation, as many class images are drawn per epoch).")
    ap.add_argument("--prior", choices=("shapes", "captions", "mixed"), default="mixed",
                    help="Class prompts of prior preservation: the world's seven shape names; the 10 instance "
                         "captions without the trigger word (the ring named 'circle'); or those plus --prior-world "
                         "captions of the shapes world (train split). With captions or mixed, one class image per "
                         "prompt.")
    ap.add_argument("--prior-world", type=int, default=40, help="World captions in a mixed prior.")
    ap.add_argument("--data-seed", type=int, default=0,
                    help="Seed of the 10 training images (concept_dataset): another draw of the same rules.")
    ap.add_argument("--tag", default="",
                    help="Suffix of the run names, e.g. te for lora-outline-te (for experiments in one --out).")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="Passed to every `sdstack finetune` as --set (for experiments).")
    ap.add_argument("--steps", type=int, default=None, help="Eval sampling steps [default: sdstack eval's].")
    ap.add_argument("--sampler", default=None, help="Eval sampler [default: sdstack eval's].")
    ap.add_argument("--scheduler", default=None, help="Eval schedule [default: sdstack eval's].")
    ap.add_argument("--cfg", type=float, default=None, help="Eval CFG scale [default: sdstack eval's].")
    ap.add_argument("--device", default=None, help="Eval device, e.g. cuda [default: sdstack eval's, cpu]. Training "
                    "uses a GPU where torch sees one (Accelerate), whatever this says.")
    ap.add_argument("--base-only", action="store_true",
                    help="Only the base model's evals and the concept data (a shared start for parallel runs that "
                         "copy this --out).")
    opts = ap.parse_args(argv)
    methods = [m.strip().replace("-", "_") for m in opts.methods.split(",") if m.strip()]
    concepts = [c.strip() for c in opts.concepts.split(",") if c.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    for c in concepts:
        if c not in CONCEPTS:
            ap.error(f"unknown concept {c!r}; valid: {', '.join(CONCEPTS)}")
    check_token(opts.token)
    opts.out = opts.out.resolve()
    from sdstack.eval.concepts import concept_dataset

    started = time.perf_counter()
    try:
        base = eval_single(opts, "base")
        rows, base_concept = [], {}
        for concept in concepts:
            # the base model on the concept prompts: how often it (or the oracle) shows the concept untaught
            base_concept[concept] = eval_concept(opts, f"base-{concept}", concept, None, None)["concept_share"]
            data = opts.out / "data" / f"{concept}-r{opts.repeats}"
            concept_dataset(concept, data / f"{opts.repeats}_{opts.token}", n=10, seed=opts.data_seed,
                            token=opts.token)
            for method in [] if opts.base_only else methods:
                row = {"method": method, "concept": concept, **train(opts, method, concept, data)}
                row.update(eval_concept(opts, row["run"], concept, method, row["result"]))
                row.update(eval_single(opts, row["run"], method, row["result"]))
                row["retention"] = row["single"] / base["single"] if base["single"] else None
                row["concept_pass"] = row["concept_share"] >= CONCEPT_GOAL
                row["retention_pass"] = row["retention"] is not None and row["retention"] >= RETENTION_GOAL
                rows.append(row)
                print(f"{method} {concept}: concept {_pct(row['concept_share'])} (any colour "
                      f"{_pct(row['concept_any_colour'])}), single {_pct(row['single'])} "
                      f"(base {_pct(base['single'])}), train {row['train_seconds']:.0f} s", flush=True)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    text = table(rows, base["single"])
    settings = {"model": str(opts.model or "built-in"), "token": opts.token, "limit": opts.limit,
                "seeds": opts.seeds, "threads": opts.threads, "single_limit": opts.single_limit,
                "eval_args": _eval_args(opts, opts.limit)[4:], "set": opts.set,
                "prior": opts.prior, "data_seed": opts.data_seed,
                "class_prompts": {c: class_prompts(opts, c, opts.out / "data" / f"{c}-r{opts.repeats}")
                                  for c in concepts}, "total_seconds":
                round(time.perf_counter() - started, 1)}
    (opts.out / "proof.json").write_text(json.dumps({"settings": settings, "base": base,
                                                     "base_concept_share": base_concept, "runs": rows}, indent=1))
    md = (f"Fine-tune proof on {settings['model']}: token {opts.token!r}; {opts.limit} concept prompts and the "
          f"first {opts.single_limit} single prompts, {opts.seeds} seed(s) each; {opts.threads} thread(s); total "
          f"{settings['total_seconds'] / 60:.1f} min. The base model, untaught, shows the concept in the prompted "
          f"colour in {', '.join(f'{_pct(v)} ({c})' for c, v in base_concept.items())} of the concept prompts."
          f"\n\n{text}\n")
    (opts.out / "proof.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
