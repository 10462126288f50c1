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

`--space ln` keeps every context position on the set the text encoder can output: the input of its final LayerNorm
is optimised instead (started from the caption's last hidden states; `--lr 6e-2` moves it as fast, relative to its
size, as 1e-2 moves the context, the hidden states being about 6x longer). No text-side method can leave that set,
textual inversion included. Session 19, 3000 steps: outline 80.0%, ring 37.5% (free: 77.5%, 75.0%); ring at
6000 steps 27.5% (free 82.5%). `--space input` frees all 77 input vectors of each caption, seen through the
whole text encoder (a smaller family still; session 19: ring 45.0%, outline 75.0%). `--embedding FILE` fits nothing
and samples the captions with a textual-inversion file instead.
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

from sdstack.eval.concepts import CONCEPTS  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", choices=CONCEPTS, required=True)
    ap.add_argument("--model", default=None, help="model folder or file [default: the built-in shapes-v1]")
    ap.add_argument("--steps", type=int, default=600, help="optimisation steps (all 10 images each step)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seeds", type=int, default=4, help="images per caption")
    ap.add_argument("--token", default="zwx")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the sampled images here")
    ap.add_argument("--space", choices=("free", "ln", "input"), default="free",
                    help="free: the context itself is optimised; ln: the input of the text encoder's final "
                         "LayerNorm is, so every context position stays on the set the text encoder can output; "
                         "input: all 77 input vectors of the text encoder are (per caption, through the encoder)")
    ap.add_argument("--embedding", type=Path, default=None,
                    help="no optimisation: sample the same captions with this textual-inversion file (its name "
                         "is the token), to compare an embedding's fit on its own training captions")
    args = ap.parse_args()
    if args.embedding is not None:
        if not args.embedding.is_file():
            ap.error(f"--embedding {args.embedding}: no such file")
        args.token = args.embedding.stem

    import numpy as np
    from PIL import Image

    from sdstack.engine.generate import generate
    from sdstack.eval.concepts import concept_dataset, detect_concept
    from sdstack.models.loader import load_model
    from sdstack.models.registry import builtin_model_path
    from sdstack.params import make_params

    bundle = load_model(args.model or builtin_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        paths = concept_dataset(args.concept, tmp, n=10, seed=args.data_seed, token=args.token)
        captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
        pixels = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                              for p in paths]).float() / 127.5 - 1
    if args.embedding is not None:
        from sdstack.models.embeddings import EmbeddingLibrary

        library = EmbeddingLibrary(args.embedding.parent, bundle)
        if args.token not in library.loaded:
            ap.error(f"--embedding {args.embedding}: {library.skip_reasons.get(args.token, 'not loaded')}")
        extra, what = {"embeddings": library}, f"the embedding {args.embedding}"
    else:
        fit_contexts(args, bundle, pixels, captions)
        extra, what = {}, f"free per-caption contexts ({args.space}) after {args.steps} steps"
    shown = total = 0
    for i, caption in enumerate(captions):
        for seed in range(args.seeds):
            img = generate(bundle, make_params(prompt=caption, seed=seed), **extra).images[0]
            hit = bool(detect_concept(img, args.concept))
            shown += hit
            total += 1
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                img.save(args.out / f"{i:02d}-{seed}{'-hit' if hit else ''}.png")
        print(f"{caption!r}: {shown}/{total} so far", flush=True)
    print(f"\n{args.concept}: shown in {shown} of {total} images ({100 * shown / total:.1f}%) with {what}")
    return 0


def fit_contexts(args, bundle, pixels, captions) -> None:
    """Fit each caption's context (in `args.space`) to its image by the frozen UNet's denoising loss; the text
    conditioner then returns the fitted context for each caption."""
    from sdstack.engine import images as im
    from sdstack.prompts import conditioning
    from sdstack.train.diffusion import diffusion_loss, training_alphas

    unet = bundle.unet.eval().requires_grad_(False)
    latents = im.encode(bundle, pixels)
    start = torch.stack([conditioning.TextConditioner(bundle)(c).context for c in captions])
    encoder = bundle.text_encoders[0].requires_grad_(False)
    final_ln = conditioning.final_layer_norm(encoder)
    if args.space == "ln":
        # the same start, one step earlier: the last hidden states before the final LayerNorm (which the encoder
        # applies once itself and the conditioner again: every other call)
        pre = torch.stack([x.float() for x, _ in _captured(bundle, captions, final_ln)[::2]])
        print(f"ln space: start matches the conditioner to {(final_ln(pre) - start).abs().max():.2e}; pre-LayerNorm "
              f"norm per position {pre.norm(dim=-1).mean():.2f}", flush=True)
        free = torch.nn.Parameter(pre.clone())
        context_of = lambda: final_ln(free)  # noqa: E731
    elif args.space == "input":
        # every input vector of the caption (token embeddings; the encoder adds the positions) is free
        table = encoder.get_input_embeddings()
        seen = _captured(bundle, captions, table)
        ids = torch.stack([i for i, _ in seen])
        free = torch.nn.Parameter(torch.stack([e.float() for _, e in seen]))

        def context_of():
            hook = table.register_forward_hook(lambda mod, inp, out: free.to(out.dtype))
            try:
                return final_ln(encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1])
            finally:
                hook.remove()
        with torch.no_grad():
            print(f"input space: start matches the conditioner to {(context_of() - start).abs().max():.2e}; "
                  f"input norm per position {free.norm(dim=-1).mean():.2f}", flush=True)
    else:
        free = torch.nn.Parameter(start.clone())
        context_of = lambda: free  # noqa: E731
    opt = torch.optim.Adam([free], lr=args.lr)
    alpha_bar = training_alphas(bundle.schedule).float()
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(args.steps):
        context = context_of()
        loss, _ = diffusion_loss(lambda x, t: unet(x, t, encoder_hidden_states=context).sample, latents,
                                 alpha_bar, prediction_type=bundle.prediction_type, min_snr_gamma=5.0,
                                 generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}, context moved {(context - start).norm() / start.norm():.3f} "
                  f"(relative), {time.time() - t0:.0f} s", flush=True)

    context = context_of()
    print(f"context norm per position: start {start.norm(dim=-1).mean():.2f}, now {context.norm(dim=-1).mean():.2f}",
          flush=True)
    learned = {c: conditioning.Cond(context=context[i].detach().clone()) for i, c in enumerate(captions)}
    real = conditioning.TextConditioner._encode
    conditioning.TextConditioner._encode = lambda self, text: learned.get(text) or real(self, text)


def _captured(bundle, captions, module) -> list:
    """(first input, output) of each call of `module` while the text conditioner encodes each caption anew."""
    from sdstack.prompts import conditioning

    seen = []
    hook = module.register_forward_hook(lambda mod, inp, out: seen.append((inp[0][0].detach(), out[0].detach())))
    cond = conditioning.TextConditioner(bundle)
    try:
        with torch.no_grad():
            for c in captions:
                cond._encode_chunks(conditioning.tokenize_prompt(c, bundle.tokenizers[0], None)[0])
    finally:
        hook.remove()
    return seen


if __name__ == "__main__":
    raise SystemExit(main())
