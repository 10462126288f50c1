"""Weight interpolation of two models of the same architecture (WiSE-FT, Wortsman et al. 2022): every UNet and
text-encoder tensor becomes a * A + (1 - a) * B, computed in float32 and saved in A's dtype; the VAE, tokenizer and
configs are A's. Used to pick the built-in model between two training runs of one lineage.

    .venv/bin/python scripts/soup.py A B ALPHA OUT      # OUT: a copy of model folder A with the mixed weights
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FILES = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


def soup(a_dir: Path, b_dir: Path, alpha: float, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(a_dir, out)
    for name in FILES:
        a, b = load_file(a_dir / name), load_file(b_dir / name)
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise SystemExit(f"{name}: the two models differ in layout")
        mixed = {k: (alpha * a[k].float() + (1 - alpha) * b[k].float()).to(a[k].dtype) for k in a}
        save_file(mixed, out / name, metadata={"format": "pt"})


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    soup(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]))
