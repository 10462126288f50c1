"""Score several VAE decoders on the SAME generated latents: the UNet samples each suite prompt once (as
`sdstack eval` does: seed 0, batch of --seeds), and every --vae decodes those latents; the oracle scores each set.
Differences are then the decoders' alone, not sampling noise.

    .venv/bin/python scripts/compare_vaes.py --vae runs/shapes-v1/ae-decoder2/vae --vae runs/shapes-v1/ae-decoder3/vae \
        --suite two-objects --suite heldout --seeds 2 --limit 50

Prints a table (suite x VAE: share of images with every claim right, and colour / shape claims).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", action="append", required=True, help="a VAE folder (repeatable)")
    ap.add_argument("--model", default=None, help="the model whose UNet samples [default: built-in]")
    ap.add_argument("--suite", action="append", default=None, help="suite(s) [default: all]")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="first N prompts of each suite")
    args = ap.parse_args()

    import torch

    from sdstack.engine import generate as gen_mod
    from sdstack.engine import images as im
    from sdstack.eval.oracle import evaluate
    from sdstack.eval.suites import SUITE_NAMES, Suite, get_suite
    from sdstack.models.loader import load_model
    from sdstack.models.registry import builtin_model_path
    from sdstack.params import make_params
    from sdstack.train.vae_check import load_vae_folder

    bundle = load_model(args.model or builtin_model_path())
    vaes = [load_vae_folder(v).eval() for v in args.vae]
    latents: list[torch.Tensor] = []
    real_decode = im.decode

    def capture(b, lat):
        latents.append(lat.detach().clone())
        return real_decode(b, lat)

    rows = []
    gen_mod.im.decode = capture
    try:
        for name in args.suite or list(SUITE_NAMES):
            suite = get_suite(name)
            if args.limit:
                suite = Suite(name, suite.prompts[:args.limit])
            latents.clear()
            for spec in suite.prompts:
                gen_mod.generate(bundle, make_params(prompt=spec.text, seed=0, batch_size=args.seeds))
            for path, vae in zip(args.vae, vaes):
                bundle_vae, bundle.vae = bundle.vae, vae
                try:
                    with torch.no_grad():
                        images = [im.tensor_to_pil(real_decode(bundle, lat)) for lat in latents]
                finally:
                    bundle.vae = bundle_vae
                s = evaluate(images, suite)
                rows.append((name, path, s["n_images"], s["accuracy"], s["claims"].get("colour"),
                             s["claims"].get("shape")))
    finally:
        gen_mod.im.decode = real_decode
    print(f"{'suite':<13}{'vae':<40}{'images':>7}{'all right':>10}{'colour':>8}{'shape':>8}")
    for name, path, n, acc, colour, shape in rows:
        print(f"{name:<13}{str(path)[-39:]:<40}{n:>7}{acc:>10.1%}{colour or 0:>8.1%}{shape or 0:>8.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
