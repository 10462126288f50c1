"""The README's sample sheet of a model: fixed prompts x seeds 1-3, made by the engine with `sdstack generate`'s
defaults (DPM++ 2M, 20 steps, CFG 7), one row per prompt with the prompt under it.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/sample_sheet.py [--model M] [--out docs/shapes-v1-samples.png]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PROMPTS = ("a red star on a blue background", "a yellow circle", "a large green square on the left",
           "two white hearts on a black background", "a blue triangle above a pink hexagon", "a purple cross")
SEEDS = (1, 2, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or file [default: built-in]")
    ap.add_argument("--out", default="docs/shapes-v1-samples.png")
    args = ap.parse_args()
    from sdstack.engine.generate import generate
    from sdstack.models.loader import load_model
    from sdstack.models.registry import builtin_model_path
    from sdstack.params import make_params
    from sdstack.train.plots import image_grid, save_png

    bundle = load_model(args.model or builtin_model_path())
    images = []
    for prompt in PROMPTS:
        for seed in SEEDS:
            images += generate(bundle, make_params(prompt=prompt, seed=seed)).images
    save_png(image_grid(images, columns=len(SEEDS), cell=96, labels=list(PROMPTS)), args.out)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
