"""Does a text-to-image model keep what it is shown? One-step denoising of the `single` suite's reference renders,
scored by the oracle.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/denoise_probe.py MODEL|RUN [--raw] [--n 70] [--t 50,100,200,300,500]

Each reference render (the world's own drawing of the prompt) is encoded, noised to timestep t with fixed noise (seeded by t),
and the model's one-step x0 estimate with the right prompt (no CFG) is decoded and scored: colour and shape right
(the suite's score), and the shape and the colour each on its own (an object of that shape / colour). A perfect denoiser scores what the VAE round trip scores (printed
as t = 0) at every t; where the shape score falls off tells at which noise level the model stops reproducing the
shapes it can still see. MODEL is a diffusers-layout folder or a `sdstack train text2image` run (its latest
checkpoint, EMA weights unless --raw).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from text_sensitivity import Parts, model_folder  # noqa: E402


@torch.no_grad()
def probe(folder: Path, n: int, timesteps: list[int]) -> dict[int, dict[str, float]]:
    from sdstack.eval.oracle import analyze, score
    from sdstack.eval.suites import get_suite
    from sdstack.train.data import to_pil

    m = Parts(folder)
    suite = get_suite("single")
    n = min(n, len(suite))
    specs = [suite.prompts[i] for i in range(n)]
    x0 = m.encode([suite.reference_image(i) for i in range(n)])
    ctx = m.context([s.text for s in specs])
    results = {}
    for t in [0, *timesteps]:
        if t == 0:
            est = x0
        else:
            a = m.alpha_bar[t]
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
            noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
            out = m.unet(noisy, torch.full((n,), t), encoder_hidden_states=ctx).sample
            est = a.sqrt() * noisy - (1 - a).sqrt() * out if m.v_pred else (noisy - (1 - a).sqrt() * out) / a.sqrt()
        images = m.vae.decode(est / m.scale).sample
        found = [analyze(to_pil(img)) for img in images]
        obj = [s.objects[0] for s in specs]
        results[t] = {"all": sum(score(f, s)["all_correct"] for f, s in zip(found, specs)) / n,
                      "shape": sum(any(o.shape == w.shape for o in f.objects) for f, w in zip(found, obj)) / n,
                      "colour": sum(any(o.colour == w.colour for o in f.objects) for f, w in zip(found, obj)) / n}
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--raw", action="store_true", help="a run's raw weights instead of its EMA")
    ap.add_argument("--n", type=int, default=70, help="prompts of the single suite [default: 70, each pair once]")
    ap.add_argument("--t", default="50,100,200,300,500", help="timesteps [default: 50,100,200,300,500]")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        res = probe(model_folder(args.model, args.raw, Path(work)), args.n, [int(x) for x in args.t.split(",")])
    print("one-step x0 estimate from the reference render noised to t, scored by the oracle (single suite):")
    print("t      colour+shape  shape  colour")
    for t, r in res.items():
        print(f"{t:<6} {100 * r['all']:11.1f}% {100 * r['shape']:5.1f}% {100 * r['colour']:6.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
