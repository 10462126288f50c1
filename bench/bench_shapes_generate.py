"""Generation time of one image from a diffusers-layout model folder: sdstack vs stock diffusers, in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_shapes_generate.py                 # built-in shapes-v1
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_shapes_generate.py --model runs/shapes-v1/candidate
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_shapes_generate.py --tiny --repeats 3   # smoke test

Both sides load the SAME folder from disk: sdstack with `load_model`, diffusers with
`StableDiffusionPipeline.from_pretrained` (its scheduler swapped for DPMSolverMultistepScheduler built from the
folder's scheduler config, Karras sigmas). The same kind of prompt (each run its own, "a red star on a blue
background" and the like: 770 of them, so none comes back within a bench; each is encoded as 77 positions, so all
cost the same), negative prompt (empty in every run, as a user keeps theirs: sdstack keeps a text encoding across
jobs, as A1111 does, so it encodes that one once), seed, CFG, steps, size:
sdstack runs "DPM++ 2M" + "Karras", diffusers DPM-Solver++ (2M, order 2) with use_karras_sigmas=True, so both
evaluate the UNet twice per step (cond + uncond batched). Each timed run is one full image: text encoding,
sampling, VAE decode, to a PIL image (infotext included on sdstack's side).

Prints the median seconds per image over --repeats runs after --warmup runs, for diffusers fp32, sdstack fp32,
sdstack fp32 with its UNet fast path off (engine/fastunet.py: a lean forward of the same arithmetic, traced once
per shape; SDSTACK_FAST_UNET=0), sdstack fp32 with the fast path but without the half split (a batch's two halves
on two threads of one intra-op thread each; SDSTACK_UNET_SPLIT=0), and sdstack with its speed options (engine/perf.py: channels_last, and bf16 weights where the CPU has native
bf16), each with the ratio sdstack/diffusers. The issue's goal: sdstack fp32 <= 0.6x diffusers' time.
Runs are interleaved (diffusers, sdstack, diffusers, ...) so a background load hits both sides alike; the goal line
uses the median of the per-round ratios (each sdstack run over the diffusers run of its round), as this VM's speed
drifts by up to 1.5x within minutes.
Exit status 1 if any run fails or produces no image.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "cyan", "white", "black", "gray"]
_SHAPES = ["star", "circle", "square", "heart", "cross", "hexagon", "triangle"]
# 770 prompts, "a red star on a blue background" first: each run takes the next one (any prompt under 75 tokens
# costs the same: the text encoder always runs 77 positions)
PROMPTS = [f"a {c} {s} on a {bg} background" for s in _SHAPES for c in _COLOURS for bg in _COLOURS[1:] + _COLOURS[:1]
           if bg != c]


def model_folder(arg: str | None, tiny: bool, work: Path) -> tuple[Path, str]:
    """(folder, how it was chosen): --model, else the built-in shapes-v1, else a tiny random sd1 model."""
    from sdstack.models.registry import builtin_model_path

    if arg and not tiny:
        p = Path(arg).expanduser()
        if not (p / "model_index.json").is_file():
            raise SystemExit(f"--model {arg}: not a diffusers model folder (no model_index.json)")
        return p, "--model"
    builtin = None if tiny else builtin_model_path()
    if builtin is not None:
        return builtin, "built-in shapes-v1"
    from sdstack.models.tiny import save_diffusers_folder, tiny_bundle

    why = "--tiny" if tiny else "the built-in model sdstack/builtin/shapes-v1 is NOT installed"
    folder = save_diffusers_folder(tiny_bundle("sd1"), work / "tiny-sd1")
    return folder, f"tiny random sd1 model written to {folder} ({why})"


def diffusers_pipeline(folder: Path):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True,
                                                             algorithm_type="dpmsolver++", solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def median_interleaved(fns: dict, warmup: int, repeats: int, times: dict | None = None) -> dict[str, float]:
    """Median seconds of each fn, runs interleaved round-robin after `warmup` untimed rounds (each round's times
    appended to `times[name]` when given)."""
    times = {k: [] for k in fns} if times is None else times
    for k in fns:
        times.setdefault(k, [])
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t
            if not out:
                raise RuntimeError(f"{k}: produced no image")
            if r >= warmup:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers-layout model folder [default: built-in shapes-v1, "
                                                  "else a tiny random model]")
    ap.add_argument("--tiny", action="store_true", help="use a tiny random sd1 model (smoke test)")
    ap.add_argument("--size", type=int, default=64, help="width = height [default: 64]")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per variant; the median is reported")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs per variant first")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default: all cores)")
    ap.add_argument("--no-fast", action="store_true", help="skip sdstack's channels_last / bf16 variants")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-shapes-gen-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> int:
    from sdstack.engine.fastunet import UNetRunner
    from sdstack.engine.generate import generate
    from sdstack.engine.perf import cpu_supports_bf16, set_inference_dtype
    from sdstack.models.loader import load_model
    from sdstack.params import make_params

    folder, how = model_folder(args.model, args.tiny, work)
    print(f"model: {how}: {folder}")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    print(f"scheduler config: prediction_type={sched.get('prediction_type')} "
          f"timestep_spacing={sched.get('timestep_spacing')} zero_snr={sched.get('rescale_betas_zero_snr')}")

    s = args.size
    pipe = diffusers_pipeline(folder)
    bundle = load_model(folder)
    prompts = itertools.cycle(PROMPTS)

    def params():
        return make_params(prompt=next(prompts), negative_prompt="", steps=args.steps, sampler_name="DPM++ 2M",
                           scheduler="Karras", cfg_scale=args.cfg, seed=args.seed, width=s, height=s,
                           rescale_cfg=0.0)  # the pipeline's guidance_rescale is 0: the same work on both sides

    def run_diffusers():
        g = torch.Generator().manual_seed(args.seed)
        return pipe(next(prompts), negative_prompt="", num_inference_steps=args.steps, guidance_scale=args.cfg,
                    height=s, width=s, generator=g, output_type="pil").images

    def run_sdstack():
        return generate(bundle, params()).images

    plain = load_model(folder)  # the same weights with the UNet fast path off (the model's own forward)
    plain._unet_runner = UNetRunner(plain.unet, enabled=False)

    def run_plain():
        return generate(plain, params()).images

    whole = load_model(folder)  # fast path on, but every UNet batch on the caller's thread (no half split)
    whole._unet_runner = UNetRunner(whole.unet, split=False)

    def run_whole():
        return generate(whole, params()).images

    # (variant, s/img, diffusers s/img measured interleaved with it); the casts are one way, so the fast
    # variants come after fp32, each paired with fresh diffusers runs
    rounds: dict[str, list[float]] = {}
    t = median_interleaved({"diffusers": run_diffusers, "sdstack": run_sdstack, "plain": run_plain,
                            "whole": run_whole}, args.warmup, args.repeats, rounds)
    t_diff = t["diffusers"]
    rows = [("diffusers fp32", t_diff, t_diff), ("sdstack fp32", t["sdstack"], t_diff),
            ("sdstack fp32, no half split", t["whole"], t_diff), ("sdstack fp32, fast path off", t["plain"], t_diff)]
    if not args.no_fast:
        fast = [("sdstack fp32 channels_last", torch.float32)]
        if cpu_supports_bf16() or torch.cuda.is_available():
            fast.append(("sdstack bf16 channels_last", torch.bfloat16))
        else:
            print("(no native bf16 on this CPU: bf16 variant skipped)")
        for name, dtype in fast:
            set_inference_dtype(bundle, dtype, channels_last=True)
            tf = median_interleaved({"diffusers": run_diffusers, "sdstack": run_sdstack}, args.warmup,
                                    args.repeats)
            rows.append((name, tf["sdstack"], tf["diffusers"]))

    print(f"\n{s}x{s}, {args.steps} steps, DPM++ 2M Karras, CFG {args.cfg}, seed {args.seed}, "
          f"threads={torch.get_num_threads()}, median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'variant':<30}{'s/img':>10}{'paired diffusers':>18}{'sdstack/diffusers':>20}")
    results = {"model": str(folder), "how": how, "size": s, "steps": args.steps, "cfg": args.cfg,
               "threads": torch.get_num_threads(), "rows": []}
    for name, secs, paired in rows:
        print(f"{name:<30}{secs:>10.4f}{paired:>18.4f}{secs / paired:>20.3f}")
        results["rows"].append({"variant": name, "seconds": secs, "diffusers_seconds": paired,
                                "ratio": secs / paired})
    # this VM's speed drifts by up to 1.5x within minutes; a round's two runs are seconds apart, so the median of
    # the per-round ratios is steadier than the ratio of the medians
    paired = statistics.median(s / d for s, d in zip(rounds["sdstack"], rounds["diffusers"]))
    goal = t["sdstack"] / t_diff
    results["paired_ratio_median"] = paired
    print(f"\nsdstack fp32 / diffusers fp32 = {goal:.3f} (ratio of medians); median of the {args.repeats} "
          f"per-round ratios {paired:.3f} (goal <= 0.6: {'met' if paired <= 0.6 else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
