"""Can the text side alone make a frozen model draw a concept? A probe for textual inversion.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/context_probe.py --concept ring|outline [--model M] [--steps 600]

Textual inversion trains a few input vectors of the text encoder; the UNet stays as it is, so it can only reach
what the UNet draws under *some* conditioning. This probe drops the constraints of the text side: for each of the
fine-tune proof's 10 training images (`concept_dataset`, the proof's data, seed 0) it optimises that image's whole
cross-attention context (77 x width, started from the encoding of its caption) for the model's own denoising loss
on that image, with the UNet frozen (each caption its own free context: a far larger family than the encodings of
a few trained tokens). Then it samples each caption with its context (the defaults of `sdstack generate`, 4 seeds)
and reads the images with the oracle: how many show the concept at all (`detect_concept`, any colour). A share near
0% says no text-side method can teach the concept to this UNet; a large one says the UNet can draw it and
textual inversion is limited by what its few vectors and the text encoder can express (or by its optimisation).
The contexts are fitted to single images, so this measures what the UNet can draw, not what generalises.
600 steps is far from converged on shapes-v1 (session 18: ring 50% / outline 55% at 600 steps, 75.0% / 77.5% at
3000, 82.5% / 87.5% at 6000, about 0.36 s a step at one thread).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", choices=("ring", "outline"), required=True)
    ap.add_argument("--model", default=None, help="model folder or file [default: the built-in shapes-v1]")
    ap.add_argument("--steps", type=int, default=600, help="optimisation steps (all 10 images each step)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seeds", type=int, default=4, help="images per caption")
    ap.add_argument("--token", default="zwx")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the sampled images here")
    args = ap.parse_args()

    import numpy as np
    from PIL import Image

    from sdstack.engine import images as im
    from sdstack.engine.generate import generate
    from sdstack.eval.concepts import concept_dataset, detect_concept
    from sdstack.models.loader import load_model
    from sdstack.models.registry import builtin_model_path
    from sdstack.params import make_params
    from sdstack.prompts import conditioning
    from sdstack.train.diffusion import diffusion_loss, training_alphas

    bundle = load_model(args.model or builtin_model_path())
    unet = bundle.unet.eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        paths = concept_dataset(args.concept, tmp, n=10, seed=args.data_seed, token=args.token)
        captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
        pixels = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                              for p in paths]).float() / 127.5 - 1
    latents = im.encode(bundle, pixels)
    start = torch.stack([conditioning.TextConditioner(bundle)(c).context for c in captions])
    context = torch.nn.Parameter(start.clone())
    opt = torch.optim.Adam([context], lr=args.lr)
    alpha_bar = training_alphas(bundle.schedule).float()
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(args.steps):
        loss, _ = diffusion_loss(lambda x, t: unet(x, t, encoder_hidden_states=context).sample, latents,
                                 alpha_bar, prediction_type=bundle.prediction_type, min_snr_gamma=5.0,
                                 generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}, context moved {(context - start).norm() / start.norm():.3f} "
                  f"(relative), {time.time() - t0:.0f} s", flush=True)

    learned = {c: conditioning.Cond(context=context[i].detach().clone()) for i, c in enumerate(captions)}
    real = conditioning.TextConditioner._encode
    conditioning.TextConditioner._encode = lambda self, text: learned.get(text) or real(self, text)
    shown = total = 0
    for i, caption in enumerate(captions):
        for seed in range(args.seeds):
            img = generate(bundle, make_params(prompt=caption, seed=seed)).images[0]
            hit = bool(detect_concept(img, args.concept))
            shown += hit
            total += 1
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                img.save(args.out / f"{i:02d}-{seed}{'-hit' if hit else ''}.png")
        print(f"{caption!r}: {shown}/{total} so far", flush=True)
    print(f"\n{args.concept}: shown in {shown} of {total} images ({100 * shown / total:.1f}%) with free per-caption "
          f"contexts after {args.steps} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
