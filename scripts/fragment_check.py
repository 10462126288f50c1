"""How often a model draws extra fragments (mottled backgrounds, fringes) that the oracle reads as extra objects,
and how the score depends on it, on `single` prompts (one object each).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/fragment_check.py [--model M] [--prompts 77] [--every 2] [--seeds 2]
        [--sampler S] [--scheduler K] [--steps N] [--cfg C]

Prints, for images where the oracle finds 0, 1 or 2+ objects: how many, and how many are right in every claim.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder [default: built-in shapes-v1]")
    ap.add_argument("--prompts", type=int, default=77, help="the first N prompts of `single`")
    ap.add_argument("--every", type=int, default=2, help="take every k-th of them")
    ap.add_argument("--seeds", type=int, default=2, help="seeds 0..n-1 per prompt")
    ap.add_argument("--sampler", default="DPM++ 2M", help="sampler [default: sdstack's default]")
    ap.add_argument("--scheduler", default="Automatic")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    args = ap.parse_args()

    from sdstack.engine.generate import generate
    from sdstack.eval.oracle import analyze, score
    from sdstack.eval.suites import get_suite
    from sdstack.models.loader import load_model
    from sdstack.models.registry import builtin_model_path
    from sdstack.params import make_params

    bundle = load_model(args.model or builtin_model_path())
    stats: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for spec in get_suite("single").prompts[:args.prompts:args.every]:
        for seed in range(args.seeds):
            params = make_params(prompt=spec.text, steps=args.steps, seed=seed, sampler_name=args.sampler,
                                 scheduler=args.scheduler, cfg_scale=args.cfg)
            image = generate(bundle, params).images[0]
            n = len(analyze(image).objects)
            key = "0 objects" if n == 0 else "1 object" if n == 1 else "2+ objects"
            stats[key][0] += 1
            stats[key][1] += bool(score(image, spec)["all_correct"])
    for key, (n, ok) in sorted(stats.items()):
        print(f"{key}: {n} images, right in every claim {ok}/{n}")


if __name__ == "__main__":
    main()
