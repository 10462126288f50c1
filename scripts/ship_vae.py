"""Put a refined decoder into a model folder: the VAE of `--vae` replaces the model's VAE, as fp16 safetensors,
after checking that its encoder (and quant_conv) is the model's own, so the UNet's latent space is unchanged. The
model's scaling factor stays (a decoder-only stage does not change the latents' scale).

    .venv/bin/python scripts/ship_vae.py --vae runs/shapes-v1/ae-decoder3/vae --model sdstack/builtin/shapes-v1

Exit status 2 with one line if the encoders differ or a folder is not a VAE / model folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", required=True, help="the refined VAE folder (config.json + safetensors)")
    ap.add_argument("--model", default=str(ROOT / "sdstack" / "builtin" / "shapes-v1"), help="the model folder")
    args = ap.parse_args()
    from diffusers import AutoencoderKL

    target = Path(args.model) / "vae"
    for folder in (Path(args.vae), target):
        if not (folder / "config.json").is_file():
            print(f"error: {folder} is not a VAE folder (no config.json)", file=sys.stderr)
            return 2
    new = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32)
    old = AutoencoderKL.from_pretrained(target, torch_dtype=torch.float32)
    old_sd, new_sd = old.state_dict(), new.state_dict()
    if old_sd.keys() != new_sd.keys():
        print("error: the two VAEs have different layouts", file=sys.stderr)
        return 2
    for k in old_sd:
        if k.startswith(("encoder.", "quant_conv.")) and not torch.equal(old_sd[k].half(), new_sd[k].half()):
            print(f"error: {k} differs: {args.vae} has another encoder; its latents would not fit the UNet",
                  file=sys.stderr)
            return 2
    changed = sum(not torch.equal(old_sd[k].half(), new_sd[k].half()) for k in old_sd)
    new.register_to_config(scaling_factor=float(old.config.scaling_factor))
    new = new.to(torch.float16)
    work = Path(tempfile.mkdtemp(prefix=".vae-", dir=target.parent))
    try:
        new.save_pretrained(work, safe_serialization=True)
        cfg_file = work / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.pop("_name_or_path", None)  # where the VAE was read from: a local path, not part of the model
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    backup = target.with_name(".vae-old")
    target.rename(backup)
    work.rename(target)
    shutil.rmtree(backup)
    for f in target.iterdir():
        f.chmod(0o644)
    target.chmod(0o755)
    print(f"{target}: {changed} decoder tensors replaced, scaling factor {old.config.scaling_factor} kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
