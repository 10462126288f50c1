"""sdstack vs stock diffusers StableDiffusionPipeline on the same weights and settings, in one process.

    .venv/bin/python bench/bench_generate.py            # (a) tiny model, 64x64, 20 steps DPM++ 2M Karras, CFG 7
    .venv/bin/python bench/bench_generate.py --full     # (b) also SD 1.5 architecture, random weights, 512x512, 2 steps

Prints seconds per image for diffusers (fp32, its defaults), sdstack at identical math (fp32), and sdstack's
bf16 CPU path (bf16 weights, channels_last), with the ratios. Threads: torch default (all cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sdstack.engine.generate import generate  # noqa: E402
from sdstack.models.bundle import ModelBundle  # noqa: E402
from sdstack.models.tiny import full_size_random_bundle, tiny_bundle  # noqa: E402
from sdstack.params import make_params  # noqa: E402
from sdstack.engine.perf import set_inference_dtype  # noqa: E402

PROMPT = "a red star on a blue background"


def diffusers_pipeline(bundle: ModelBundle):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    d = tempfile.mkdtemp()
    bundle.tokenizers[0].save_pretrained(d)
    tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=77)
    sched = DPMSolverMultistepScheduler(**{k: v for k, v in bundle.schedule.items() if not k.startswith("_")
                                           and k in ("beta_start", "beta_end", "beta_schedule",
                                                     "num_train_timesteps", "steps_offset")},
                                        use_karras_sigmas=True)
    return StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=tok,
                                   unet=bundle.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def timed(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def bench(bundle: ModelBundle, size: int, steps: int, repeats: int, warmup: bool = True) -> None:
    pipe = diffusers_pipeline(bundle)
    pipe.set_progress_bar_config(disable=True)
    params = make_params(prompt=PROMPT, steps=steps, sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=7.0,
                         seed=1, width=size, height=size)

    def run_diffusers():
        g = torch.Generator().manual_seed(1)
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.0, height=size, width=size, generator=g,
             output_type="pil")

    t_diff = timed(run_diffusers, repeats, warmup)
    t_ours = timed(lambda: generate(bundle, params), repeats, warmup)
    set_inference_dtype(bundle, torch.bfloat16, channels_last=True)  # last: the cast is one way
    t_bf16 = timed(lambda: generate(bundle, params), repeats, warmup)
    print(f"{bundle.name} {size}x{size} {steps} steps DPM++ 2M Karras CFG 7 (threads={torch.get_num_threads()}):")
    print(f"  diffusers fp32   {t_diff:8.3f} s/img")
    print(f"  sdstack  fp32    {t_ours:8.3f} s/img   ratio sdstack/diffusers = {t_ours / t_diff:.3f}")
    print(f"  sdstack  bf16    {t_bf16:8.3f} s/img   speed-up vs diffusers fp32 = {t_diff / t_bf16:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also run the SD 1.5-architecture 512x512 case")
    ap.add_argument("--only-full", action="store_true", help="skip the tiny case")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not args.only_full:
        bench(tiny_bundle("sd1"), 64, 20, args.repeats)
    if args.full or args.only_full:
        bench(full_size_random_bundle("sd1"), 512, 2, 1, warmup=False)


if __name__ == "__main__":
    main()
